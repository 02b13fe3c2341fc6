"""The expected key sets and shapes of every part a conversion can produce.

Everything here is built from the real modules (``socokit.backbones``, hence torchvision /
timm) on the ``meta`` device, so no memory is allocated and no weights are initialised; the
converter then checks a checkpoint key by key against these tables.

Canonical names are torchvision detection names: ``backbone.body.*`` (the whole ResNet body,
``conv1`` … ``layer4``, also for C4 sources whose ``layer4`` lives in a res5 head),
``backbone.fpn.*`` and ``roi_heads.box_head.*`` (4conv-1fc head).
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from socokit import backbones

BODY = "backbone.body."
FPN = "backbone.fpn."
HEAD = "roi_heads.box_head."
RES5 = "roi_heads.box_head.res5."
LAYER4 = BODY + "layer4."

#: torchvision ResNets tried, in order, when a checkpoint does not name its architecture.
TV_RESNETS = ("resnet50", "resnet18", "resnet34", "resnet101", "resnet152",
              "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2")

Shapes = dict  # name -> tuple[int, ...]


def _shapes(module: nn.Module, prefix: str) -> Shapes:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


@functools.lru_cache(maxsize=32)
def body_shapes(arch: str) -> Shapes:
    """``backbone.body.*`` keys → shapes of the full body (conv1 … layer4, no fc) of ``arch``.

    Raises:
        ValueError: unknown architecture (message names it).
    """
    with torch.device("meta"):
        try:
            body = backbones.build_fpn_backbone(arch, zero_init_residual=False).body
        except Exception as e:  # noqa: BLE001 - timm/torchvision raise many types for bad names
            raise ValueError(f"cannot build backbone {arch!r}: {e}") from e
    return _shapes(body, BODY)


def fpn_shapes(arch: str, out_channels: int, norm: bool) -> Shapes:
    """``backbone.fpn.*`` keys → shapes for the FPN on ``arch`` (P2–P5, no extra level)."""
    return dict(_fpn_shapes_cached(arch, out_channels, norm))


@functools.lru_cache(maxsize=32)
def _fpn_shapes_cached(arch: str, out_channels: int, norm: bool):
    in_channels = _in_channels(arch)
    with torch.device("meta"):
        fpn = FeaturePyramidNetwork(in_channels, out_channels,
                                              norm_layer=nn.BatchNorm2d if norm else None)
    return tuple(_shapes(fpn, FPN).items())


@functools.lru_cache(maxsize=32)
def _in_channels(arch: str) -> list[int]:
    with torch.device("meta"):
        return list(backbones.build_fpn_backbone(arch, zero_init_residual=False).in_channels)


def box_head_shapes(in_channels: int, resolution: int, conv_dim: int, num_convs: int,
                    fc_dim: int, norm: bool) -> Shapes:
    """``roi_heads.box_head.*`` keys → shapes of the conv-fc box head."""
    with torch.device("meta"):
        head = backbones.build_box_head(norm_layer=nn.BatchNorm2d if norm else None,
                                        in_channels=in_channels, resolution=resolution,
                                        conv_dim=conv_dim, num_convs=num_convs, fc_dim=fc_dim)
    return _shapes(head, HEAD)


def infer_resnet_arch(body: dict) -> str | None:
    """The torchvision ResNet whose body keys and shapes equal ``body`` exactly, else None.

    Args:
        body: ``backbone.body.*`` name → tensor (or shape tuple).
    """
    got = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in body.items()}
    for arch in TV_RESNETS:
        if body_shapes(arch) == got:
            return arch
    return None


def closest_resnet_arch(body: dict) -> str:
    """The torchvision ResNet sharing the most keys with ``body`` (for error messages)."""
    names = set(body)
    return max(TV_RESNETS, key=lambda a: len(names & set(body_shapes(a))))


def infer_fpn_config(fpn: dict) -> tuple[int, bool]:
    """(out_channels, has_norm) of a ``backbone.fpn.*`` dict, read from its first lateral conv.

    Raises:
        KeyError: the first lateral conv is absent (message names the key).
    """
    key = FPN + "inner_blocks.0.0.weight"
    if key not in fpn:
        raise KeyError(f"FPN weights lack {key}")
    return int(fpn[key].shape[0]), (FPN + "inner_blocks.0.1.weight") in fpn


def infer_box_head_config(head: dict) -> dict:
    """Keyword arguments of :func:`box_head_shapes` read from a ``roi_heads.box_head.*`` dict.

    Raises:
        KeyError: the dict is not a conv-fc head (message names what is missing).
    """
    num_convs = 0
    while f"{HEAD}{num_convs}.0.weight" in head:
        num_convs += 1
    fc_key = f"{HEAD}{num_convs + 1}.weight"
    if num_convs == 0 or fc_key not in head:
        raise KeyError(f"box head is not a conv-fc head (need {HEAD}0.0.weight and {fc_key})")
    conv = head[f"{HEAD}0.0.weight"]
    conv_dim, in_channels = int(conv.shape[0]), int(conv.shape[1])
    fc = head[fc_key]
    resolution = int(round((fc.shape[1] / conv_dim) ** 0.5))
    return {"in_channels": in_channels, "resolution": resolution, "conv_dim": conv_dim,
            "num_convs": num_convs, "fc_dim": int(fc.shape[0]),
            "norm": f"{HEAD}0.1.weight" in head}


def c4_split_ok(body_keys) -> bool:
    """Whether a body can be split into a C4 backbone (conv1..layer3) and a res5 head (layer4)."""
    return any(k.startswith(LAYER4) for k in body_keys)
