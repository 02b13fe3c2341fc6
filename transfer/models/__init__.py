"""Detector factory: ``build_detector(name, ...)`` for every fine-tuning recipe.

Names: ``maskrcnn_fpn``, ``fasterrcnn_fpn``, ``maskrcnn_c4``, ``fasterrcnn_c4``, ``retinanet``,
``fcos`` (torchvision detection models, state-dict names as torchvision's) and ``solov2``
(:mod:`transfer.models.solov2`, same backbone names as ``maskrcnn_fpn``). Every input transform
is :class:`transfer.models.transform.DetectorInputTransform`.
"""
from __future__ import annotations

from torch import nn

from socokit.backbones import PIXEL_CONVENTION
from transfer.config import DETECTORS  # the names live with the configuration
from transfer.models.dense import build_fcos, build_retinanet
from transfer.models.norms import freeze_stages, resolve_norms
from transfer.models.parity import PARITY_MODES, check_parity
from transfer.models.rcnn import build_rcnn_c4, build_rcnn_fpn
from transfer.models.solov2 import build_solov2
from transfer.models.transform import DetectorInputTransform, pixel_to_mean_std

__all__ = ["DETECTORS", "PARITY_MODES", "apply_frozen_stages", "build_detector", "has_masks"]


_RCNN_SAMPLING = ("rpn_pre_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_train",
                  "rpn_post_nms_top_n_test", "box_batch_size_per_image")
_NOT_FOR = {"fpn": ("extra_norm",), "c4": ("fpn_channels", "conv_dim", "fc_dim"),
            "dense": ("extra_norm", "conv_dim", "fc_dim", "mask_dim") + _RCNN_SAMPLING}
_NOT_FOR["solov2"] = _NOT_FOR["dense"]


def has_masks(name: str) -> bool:
    """The detector predicts instance masks (trains on them, scores mask AP)."""
    return name.startswith("maskrcnn") or name == "solov2"


def build_detector(name: str, *, backbone: str = "resnet50", num_classes: int, norm="syncbn",
                   sync_ok: bool = False, min_size: int = 800, max_size: int = 1333,
                   pixel: dict | None = None, channels_last: bool = False,
                   resize_in_model: bool = False, parity: str = "detectron2", **widths) -> nn.Module:
    """Build a detector (weights freshly initialised; see :mod:`transfer.models.init_weights`).

    Args:
        name: one of :data:`DETECTORS`.
        backbone: torchvision ResNet name or ``timm:<name>``.
        num_classes: object classes + 1 (index 0 = background).
        norm: one norm name for all parts or a dict part → name (see
            :mod:`transfer.models.norms`); ``syncbn`` falls back to ``bn`` unless ``sync_ok``.
        sync_ok: CUDA and several processes (SyncBN possible).
        min_size, max_size: test-time resize (shorter side, cap of the longer side).
        pixel: PIXEL_CONVENTION-like dict of the weights (default: RGB, ImageNet mean/std).
        channels_last: hand the backbone channels_last batches.
        resize_in_model: let the model draw the training size (torchvision's behaviour) instead
            of the data pipeline.
        parity: ``detectron2`` (default: the behaviour of the published detectron2 / AdelaiDet
            runs, :mod:`transfer.models.parity`) or ``torchvision`` (torchvision's stock
            components).
        **widths: ``fpn_channels``, ``conv_dim``, ``fc_dim``, ``mask_dim``, ``extra_norm``,
            ``box_score_thresh``, ``detections_per_img`` (forwarded to the builders), ``solov2``
            (SOLOv2 options, see :meth:`transfer.models.solov2.SOLOv2Config.from_options`).

    Returns:
        The detector, with ``model.norms`` (the resolved policy) set.
    """
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}: use one of {', '.join(DETECTORS)}")
    norms = resolve_norms(norm, sync_ok)
    solov2 = widths.pop("solov2", None)
    family = {"retinanet": "dense", "fcos": "dense", "solov2": "solov2"}.get(name) or name.rsplit("_", 1)[1]
    # Options that do not apply to this family (e.g. fc_dim for C4) are ignored.
    widths = {k: v for k, v in widths.items() if k not in _NOT_FOR[family]}
    common = dict(arch=backbone, num_classes=num_classes, norms=norms, parity=check_parity(parity), **widths)
    if name.endswith("_fpn"):
        model = build_rcnn_fpn(with_masks=has_masks(name), **common)
    elif name.endswith("_c4"):
        model = build_rcnn_c4(with_masks=has_masks(name), **common)
    elif name == "retinanet":
        model = build_retinanet(**common)
    elif name == "solov2":
        model = build_solov2(solov2=solov2, **common)
    else:
        model = build_fcos(**common)
    mean, std, channels = pixel_to_mean_std(pixel or PIXEL_CONVENTION)
    model.transform = DetectorInputTransform(min_size, max_size, mean, std, channels=channels,
                                         resize_in_model=resize_in_model, channels_last=channels_last,
                                         parity=parity)
    model.norms = norms
    return model


def apply_frozen_stages(model: nn.Module, frozen_stages: int) -> None:
    """Freeze the first ``frozen_stages`` backbone stages (C4: stage 5 is the res5 head)."""
    if frozen_stages <= 0:
        return
    box_head = getattr(getattr(model, "roi_heads", None), "box_head", None)
    freeze_stages(model.backbone.body, frozen_stages, res5=getattr(box_head, "res5", None))
