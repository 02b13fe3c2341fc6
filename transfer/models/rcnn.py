"""Mask / Faster R-CNN with FPN (4conv1fc box head, 4-conv mask head, norm everywhere) and C4.

Built from torchvision's detection classes and ``socokit.backbones`` parts, so every state-dict
name is torchvision's (``backbone.body.*``, ``backbone.fpn.*``, ``rpn.*``, ``roi_heads.*``).

Settings follow detectron2's ``mask_rcnn_R_50_FPN_1x`` / ``mask_rcnn_R_50_C4_1x``: one RPN conv,
anchors 32–512 with aspect ratios 0.5/1/2 (one size per FPN level, all five at C4), 256 anchors
per image with 50 % positives, RPN NMS 0.7, pre/post-NMS top-k 2000/1000 (FPN, pre-NMS per
level, post-NMS per image) and 12000/2000 → 6000/1000 (C4), 512 RoIs per image with 25 %
positives (IoU 0.5), RoIAlign 7 (box) and 14 (mask), test score 0.05, NMS 0.5, 100 detections.
``parity="detectron2"`` (default) adds detectron2's behaviour where torchvision differs
(:mod:`transfer.models.parity`: aligned RoIAlign, L1 box losses, exact anchors, predictor init,
binary aligned mask targets); ``parity="torchvision"`` keeps torchvision's stock components.
C4 models always run res5 once per step (:class:`transfer.models.parity.Detectron2RoIHeads`).
"""
from __future__ import annotations

from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from socokit.backbones import (build_box_head, build_c4_backbone, build_fpn_backbone,
                               build_res5_head, fpn_init_)
from transfer.models.norms import ensure_norm, norm_layer
from transfer.models.parity import (TORCHVISION_BETA, AlignedMultiScaleRoIAlign, Detectron2AnchorGenerator,
                                    Detectron2RoIHeads, Detectron2RPN, check_parity, detectron2_init_)


def build_fpn_neck(arch: str, norms: dict, out_channels: int, extra_block: bool = True):
    """ResNet body + FPN (P2–P6) with the body's and the FPN's own norms."""
    backbone = build_fpn_backbone(arch, norm_layer=norm_layer(norms["backbone"]),
                                  out_channels=out_channels, extra_block=extra_block,
                                  fpn_norm=norms["fpn"] != "none")
    ensure_norm(backbone.body, norms["backbone"])
    if norms["fpn"] not in ("none", norms["backbone"]):
        backbone.fpn = FeaturePyramidNetwork(backbone.in_channels, out_channels,
                                             extra_blocks=LastLevelMaxPool() if extra_block else None,
                                             norm_layer=norm_layer(norms["fpn"]))
        fpn_init_(backbone.fpn)
    return backbone


def _rcnn_kwargs(defaults: dict, box_score_thresh: float, detections_per_img: int,
                 overrides: dict) -> dict:
    """torchvision (Faster|Mask)RCNN keyword arguments: recipe values, then explicit overrides.

    ``overrides`` may hold any of ``rpn_pre_nms_top_n_{train,test}``,
    ``rpn_post_nms_top_n_{train,test}``, ``box_batch_size_per_image`` (None = recipe value);
    the tests shrink them to keep CPU runs short.
    """
    kwargs = dict(defaults, box_score_thresh=box_score_thresh, box_nms_thresh=0.5,
                  box_detections_per_img=detections_per_img, box_batch_size_per_image=512,
                  box_positive_fraction=0.25, rpn_batch_size_per_image=256,
                  rpn_positive_fraction=0.5, rpn_nms_thresh=0.7)
    for key, value in overrides.items():
        if key not in kwargs:
            raise ValueError(f"unknown R-CNN option {key!r}")
        if value is not None:
            kwargs[key] = int(value)
    return kwargs


def _rcnn_parts(parity: str):
    """(anchor generator class, RoIAlign pooler class) of a parity mode."""
    if check_parity(parity) == "detectron2":
        return Detectron2AnchorGenerator, AlignedMultiScaleRoIAlign
    return AnchorGenerator, MultiScaleRoIAlign


def _finish_rcnn(model: nn.Module, parity: str, c4: bool) -> nn.Module:
    """Swap in the detectron2-parity RPN / RoI heads and initialisation (see module docstring)."""
    d2 = parity == "detectron2"
    if d2:
        model.rpn = Detectron2RPN.from_torchvision(model.rpn, smooth_l1_beta=0.0)
    if d2 or c4:
        model.roi_heads = Detectron2RoIHeads.from_torchvision(
            model.roi_heads, box_reg_beta=0.0 if d2 else TORCHVISION_BETA, aligned_mask_targets=d2,
            shared_res5=c4)
    if d2:
        detectron2_init_(model)
    return model


def build_rcnn_fpn(*, arch: str, num_classes: int, norms: dict, with_masks: bool,
                   fpn_channels: int = 256, conv_dim: int = 256, fc_dim: int = 1024,
                   mask_dim: int = 256, box_score_thresh: float = 0.05,
                   detections_per_img: int = 100, parity: str = "detectron2", **overrides) -> nn.Module:
    """Mask R-CNN (``with_masks``) or Faster R-CNN, R-FPN with the 4conv1fc head.

    Args:
        arch: backbone name (torchvision ResNet or ``timm:<name>``).
        num_classes: including the background (K + 1).
        norms: part → norm name (see :mod:`transfer.models.norms`).
        fpn_channels, conv_dim, fc_dim, mask_dim: widths (256, 256, 1024, 256 in the recipes;
            smaller in tests).
        parity: ``detectron2`` or ``torchvision`` (see module docstring).
    """
    anchor_cls, pooler_cls = _rcnn_parts(parity)
    backbone = build_fpn_neck(arch, norms, fpn_channels)
    anchors = anchor_cls(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    rpn_head = RPNHead(fpn_channels, 3, conv_depth=1)
    box_head = build_box_head(norm_layer=norm_layer(norms["box_head"]), in_channels=fpn_channels,
                              conv_dim=conv_dim, fc_dim=fc_dim)
    kwargs = dict(
        num_classes=None, rpn_anchor_generator=anchors, rpn_head=rpn_head,
        box_roi_pool=pooler_cls(["0", "1", "2", "3"], 7, 0), box_head=box_head,
        box_predictor=FastRCNNPredictor(fc_dim, num_classes),
        **_rcnn_kwargs(dict(rpn_pre_nms_top_n_train=2000, rpn_pre_nms_top_n_test=1000,
                            rpn_post_nms_top_n_train=1000, rpn_post_nms_top_n_test=1000),
                       box_score_thresh, detections_per_img, overrides))
    if not with_masks:
        return _finish_rcnn(FasterRCNN(backbone, **kwargs), parity, c4=False)
    mask_head = MaskRCNNHeads(fpn_channels, [mask_dim] * 4, 1, norm_layer=norm_layer(norms["mask_head"]))
    model = MaskRCNN(backbone, mask_roi_pool=pooler_cls(["0", "1", "2", "3"], 14, 0),
                     mask_head=mask_head, mask_predictor=MaskRCNNPredictor(mask_dim, mask_dim, num_classes),
                     **kwargs)
    return _finish_rcnn(model, parity, c4=False)


class Res5BoxHead(nn.Module):
    """C4 RoI head: res5 (stride 2: 14×14 → 7×7), optional extra norm, global average pool.

    Keys: ``res5.*`` (the ResNet layer4) and, with ``extra_norm``, ``norm.*`` (the MoCo /
    SoCo ``Res5ROIHeadsExtraNorm``: one more norm on the res5 output).
    """

    def __init__(self, res5: nn.Module, out_channels: int, extra_norm=None):
        super().__init__()
        self.res5 = res5
        self.out_channels = out_channels
        if extra_norm is not None:
            self.norm = extra_norm(out_channels)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def features(self, roi_features):
        """Tensor[R, C4, 14, 14] → Tensor[R, 2048, 7, 7]."""
        x = self.res5(roi_features)
        return self.norm(x) if hasattr(self, "norm") else x

    def forward(self, roi_features):
        return self.pool(self.features(roi_features)).flatten(1)  # [R, 2048]


class Res5MaskFeatures(nn.Module):
    """Test-time mask branch of the C4 detector: the *same* res5 (+ norm) as the box head.

    In training :class:`transfer.models.parity.Detectron2RoIHeads` (``shared_res5``) hands the
    mask predictor the foreground rows of the box branch's res5 output, so res5 runs once per
    step and its BN statistics cover all sampled RoIs (detectron2 ``Res5ROIHeads``). At test time
    the detections are pooled again and go through res5 a second time (eval-mode BN), as in
    detectron2. The box head is referenced, not registered, so its weights appear once in the
    state dict (under ``roi_heads.box_head``).
    """

    def __init__(self, box_head: Res5BoxHead):
        super().__init__()
        self._shared = [box_head]

    def forward(self, roi_features):
        return self._shared[0].features(roi_features)  # [R, 2048, 7, 7]


def build_rcnn_c4(*, arch: str, num_classes: int, norms: dict, with_masks: bool,
                  extra_norm: bool = True, box_score_thresh: float = 0.05,
                  detections_per_img: int = 100, mask_dim: int = 256, parity: str = "detectron2",
                  **overrides) -> nn.Module:
    """Mask / Faster R-CNN R-C4 (MoCo/SoCo ``Res5ROIHeadsExtraNorm`` with ``extra_norm``)."""
    anchor_cls, pooler_cls = _rcnn_parts(parity)
    backbone = build_c4_backbone(arch, norm_layer=norm_layer(norms["backbone"]))
    res5 = build_res5_head(arch, norm_layer=norm_layer(norms["backbone"]))
    ensure_norm(backbone.body, norms["backbone"])
    ensure_norm(res5, norms["backbone"])
    head_norm = norm_layer(norms["box_head"]) if extra_norm and norms["box_head"] != "none" else None
    box_head = Res5BoxHead(res5.res5, res5.out_channels, head_norm)
    anchors = anchor_cls(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),))
    kwargs = dict(
        num_classes=None, rpn_anchor_generator=anchors,
        rpn_head=RPNHead(backbone.out_channels, 15, conv_depth=1),
        box_roi_pool=pooler_cls(["0"], 14, 0), box_head=box_head,
        box_predictor=FastRCNNPredictor(res5.out_channels, num_classes),
        **_rcnn_kwargs(dict(rpn_pre_nms_top_n_train=12000, rpn_pre_nms_top_n_test=6000,
                            rpn_post_nms_top_n_train=2000, rpn_post_nms_top_n_test=1000),
                       box_score_thresh, detections_per_img, overrides))
    if not with_masks:
        return _finish_rcnn(FasterRCNN(backbone, **kwargs), parity, c4=True)
    model = MaskRCNN(backbone, mask_roi_pool=pooler_cls(["0"], 14, 0), mask_head=Res5MaskFeatures(box_head),
                     mask_predictor=MaskRCNNPredictor(res5.out_channels, mask_dim, num_classes), **kwargs)
    return _finish_rcnn(model, parity, c4=True)
