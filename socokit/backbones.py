"""Model parts shared by pretraining and fine-tuning, named as in torchvision's detectors.

A pretraining network built from these parts has the same module names as the matching parts
of ``torchvision.models.detection.maskrcnn_resnet50_fpn_v2`` (``body.*``, ``fpn.*``, the
4conv-1fc box head ``{0..3}.0/1``, ``5``), so conversion to a detector is a pure rename that can
be checked key by key.

``arch`` is a torchvision ResNet name (``resnet18`` … ``resnet152``; ``resnet50`` is the
recipe default) or ``timm:<name>`` for any timm model that supports ``features_only`` (the CPU
demo and the tests use small ones such as ``timm:resnet18``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

#: Pixel convention of every backbone this toolkit trains: RGB, [0, 1], ImageNet mean/std.
PIXEL_CONVENTION = {
    "channels": "RGB",
    "range": 1.0,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}

_TV_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
               "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2")

NormLayer = Callable[..., nn.Module]


def is_timm(arch: str) -> bool:
    return arch.startswith("timm:")


def _tv_resnet(arch: str, norm_layer: NormLayer) -> nn.Module:
    if arch not in _TV_RESNETS:
        raise ValueError(f"unknown backbone {arch!r}: use one of {', '.join(_TV_RESNETS)} or 'timm:<name>'")
    return getattr(tv_resnet, arch)(weights=None, norm_layer=norm_layer)


def _timm_model(arch: str, norm_layer: NormLayer | None, **kwargs) -> nn.Module:
    import timm

    name = arch[len("timm:"):]
    extra = {"norm_layer": norm_layer} if norm_layer is not None and norm_layer is not nn.BatchNorm2d else {}
    try:
        return timm.create_model(name, pretrained=False, **extra, **kwargs)
    except TypeError:  # models whose constructor takes no norm_layer
        return timm.create_model(name, pretrained=False, **kwargs)


def resnet_init_(module: nn.Module, zero_init_residual: bool = True) -> nn.Module:
    """The original's ResNet init: He fan-out convs, BN γ=1 β=0, zero γ of each block's last BN.

    Shortcut (downsample) BNs keep γ=1.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in module.modules():
            last = getattr(m, "bn3", None) if hasattr(m, "conv3") else (
                getattr(m, "bn2", None) if hasattr(m, "conv2") and hasattr(m, "downsample") else None)
            if isinstance(last, (nn.BatchNorm2d, nn.SyncBatchNorm)) and last.weight is not None:
                nn.init.zeros_(last.weight)
    return module


def fpn_init_(fpn: nn.Module) -> nn.Module:
    """The original FPN init: Kaiming-normal fan-out convs (no bias with norm), BN γ=1 β=0."""
    return resnet_init_(fpn, zero_init_residual=False)


class FPNBackbone(nn.Module):
    """ResNet body + FPN with norm. Output: OrderedDict '0'..'3' = P2..P5 (+ 'pool' = P6).

    Attributes:
        body: the feature extractor (torchvision names conv1, bn1, layer1..4, or a timm model).
        fpn: ``torchvision.ops.FeaturePyramidNetwork`` with ``norm_layer``.
        out_channels: channels of every pyramid level.
    """

    def __init__(self, body: nn.Module, in_channels: list[int], out_channels: int,
                 norm_layer: NormLayer | None, extra_block: bool):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels,
                                         extra_blocks=LastLevelMaxPool() if extra_block else None,
                                         norm_layer=norm_layer)
        self.out_channels = out_channels
        self.in_channels = list(in_channels)

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(images)  # C2..C5
        if not isinstance(feats, dict):
            feats = OrderedDict((str(i), f) for i, f in enumerate(feats))
        return self.fpn(feats)


class C4Backbone(nn.Module):
    """ResNet conv1 … layer3 (stride 16). Output: OrderedDict {'0': C4}."""

    def __init__(self, body: nn.Module, out_channels: int):
        super().__init__()
        self.body = body
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(images)
        if not isinstance(feats, dict):
            feats = OrderedDict((str(i), f) for i, f in enumerate(feats))
        return OrderedDict([("0", list(feats.values())[-1])])


class Res5Head(nn.Module):
    """The ResNet's last stage applied to RoI features (14×14 at res4 → 7×7 × 2048)."""

    def __init__(self, res5: nn.Module, out_channels: int):
        super().__init__()
        self.res5 = res5
        self.out_channels = out_channels

    def forward(self, roi_features: torch.Tensor) -> torch.Tensor:
        return self.res5(roi_features)


def build_fpn_backbone(arch: str = "resnet50", norm_layer: NormLayer = nn.BatchNorm2d,
                       out_channels: int = 256, zero_init_residual: bool = True,
                       extra_block: bool = False, fpn_norm: bool = True) -> FPNBackbone:
    """ResNet + FPN (P2–P5; P6 by max-pool only with ``extra_block``).

    Args:
        arch: torchvision ResNet name or ``timm:<name>``.
        norm_layer: norm of the body (and of the FPN when ``fpn_norm``).
        out_channels: FPN width.
        zero_init_residual: zero γ of each residual block's last BN (the original's init).
        extra_block: add torchvision's LastLevelMaxPool (P6) as detectors expect.
        fpn_norm: BN (``norm_layer``) on the FPN's lateral and output convs.
    """
    if is_timm(arch):
        # The last four feature levels (strides 4..32 for ResNets, ConvNeXts, MobileNets ...).
        body = _timm_model(arch, norm_layer, features_only=True, out_indices=(-4, -3, -2, -1))
        in_channels = list(body.feature_info.channels())
    else:
        net = _tv_resnet(arch, norm_layer)
        body = IntermediateLayerGetter(net, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"})
        c = net.layer4[-1].conv3.out_channels if hasattr(net.layer4[-1], "conv3") else net.layer4[-1].conv2.out_channels
        in_channels = [c // 8, c // 4, c // 2, c]
    resnet_init_(body, zero_init_residual)
    backbone = FPNBackbone(body, in_channels, out_channels, norm_layer if fpn_norm else None, extra_block)
    fpn_init_(backbone.fpn)
    return backbone


def build_c4_backbone(arch: str = "resnet50", norm_layer: NormLayer = nn.BatchNorm2d,
                      zero_init_residual: bool = True) -> C4Backbone:
    """ResNet conv1 … layer3 (C4, stride 16) for C4 detectors and SoCo_C4."""
    if is_timm(arch):
        body = _timm_model(arch, norm_layer, features_only=True, out_indices=(-2,))
        if body.feature_info.reduction()[-1] != 16:
            raise ValueError(f"{arch}: the C4 layout needs a stride-16 level as the second-to-last feature "
                             f"level, got stride {body.feature_info.reduction()[-1]}")
        out_channels = body.feature_info.channels()[-1]
    else:
        net = _tv_resnet(arch, norm_layer)
        body = IntermediateLayerGetter(net, {"layer3": "0"})
        out_channels = net.layer3[-1].conv3.out_channels if hasattr(net.layer3[-1], "conv3") else net.layer3[-1].conv2.out_channels
    resnet_init_(body, zero_init_residual)
    return C4Backbone(body, out_channels)


def build_res5_head(arch: str = "resnet50", norm_layer: NormLayer = nn.BatchNorm2d,
                    zero_init_residual: bool = True) -> Res5Head:
    """The ResNet's layer4 as a RoI head (``.res5``), for C4 detectors and SoCo_C4."""
    net = _timm_model(arch, norm_layer) if is_timm(arch) else _tv_resnet(arch, norm_layer)
    if not hasattr(net, "layer4"):
        raise ValueError(f"{arch}: the C4 res5 head needs a ResNet-style model with a 'layer4' stage")
    res5 = net.layer4
    last = res5[-1]
    out_channels = last.conv3.out_channels if hasattr(last, "conv3") else last.conv2.out_channels
    resnet_init_(res5, zero_init_residual)
    return Res5Head(res5, out_channels)


def build_box_head(norm_layer: NormLayer | None = nn.BatchNorm2d, in_channels: int = 256,
                   resolution: int = 7, conv_dim: int = 256, num_convs: int = 4,
                   fc_dim: int = 1024) -> FastRCNNConvFCHead:
    """The 4conv-1fc box head (detectron2 ``FastRCNNConvFCHead``, torchvision's v2 head).

    Keys: ``{0..3}.0.weight`` (3×3 convs, no bias with norm), ``{0..3}.1.*`` (norm),
    ``5.weight`` / ``5.bias`` (fc 256·7·7 → 1024).
    """
    return FastRCNNConvFCHead((in_channels, resolution, resolution), [conv_dim] * num_convs,
                              [fc_dim], norm_layer=norm_layer)
