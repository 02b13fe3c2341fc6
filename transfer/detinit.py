"""The detection-initialisation file (convert → finetune), format ``soco-detection-init`` (docs/convert.md).

A plain dict loadable with ``torch.load(..., weights_only=True)``::

    {"format": "soco-detection-init", "version": 1,
     "model": {torchvision detection key -> tensor},
     "meta": {"source": "soco|moco|...", "source_file": str, "arch": "resnet50" | "timm:<name>",
              "parts": ["backbone"] | ["backbone", "fpn"] | ["backbone", "fpn", "box_head"]
                       | ["backbone", "res5"],
              "pixel": {"channels": "RGB", "range": 1.0, "mean": [...], "std": [...]},
              "report": {...}}}

Keys: ``backbone.body.*``, ``backbone.fpn.*``, ``roi_heads.box_head.*`` (4conv-1fc:
``{0..3}.0.weight``, ``{0..3}.1.*``, ``5.*``); C4: ``backbone.body.*`` (conv1..layer3) and
``roi_heads.box_head.res5.*``.
"""
from __future__ import annotations

import torch

from socokit.fileio import CheckpointError, atomic_torch_save, safe_torch_load

FORMAT = "soco-detection-init"
VERSION = 1
PARTS = (("backbone",), ("backbone", "fpn"), ("backbone", "fpn", "box_head"), ("backbone", "res5"))
REQUIRED_META = ("source", "source_file", "arch", "parts", "pixel")
_PREFIX = {"backbone": "backbone.body.", "fpn": "backbone.fpn.", "box_head": "roi_heads.box_head.",
           "res5": "roi_heads.box_head.res5."}


class DetectionInitError(CheckpointError):
    """A detection-initialisation file is malformed (message names the file and the problem)."""


def _check(state_dict: dict, meta: dict, where: str) -> None:
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise DetectionInitError(f"{where}: meta lacks {missing}")
    parts = tuple(meta["parts"])
    if parts not in PARTS:
        raise DetectionInitError(f"{where}: meta parts {list(parts)} is not one of {[list(p) for p in PARTS]}")
    pixel = meta["pixel"]
    if not (isinstance(pixel, dict) and {"channels", "range", "mean", "std"} <= set(pixel)):
        raise DetectionInitError(f"{where}: meta pixel must hold channels, range, mean, std; got {pixel!r}")
    bad = [k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise DetectionInitError(f"{where}: non-tensor entries {bad[:5]}")
    prefixes = tuple(_PREFIX[p] for p in parts)
    stray = [k for k in state_dict if not k.startswith(prefixes)]
    if stray:
        raise DetectionInitError(f"{where}: keys outside parts {list(parts)}: {stray[:5]}")
    for p in parts:
        if not any(k.startswith(_PREFIX[p]) for k in state_dict):
            raise DetectionInitError(f"{where}: part {p!r} is listed in meta but has no keys")
    if "res5" in parts and "box_head" not in parts:
        stray = [k for k in state_dict if k.startswith("roi_heads.box_head.") and not k.startswith(_PREFIX["res5"])]
        if stray:
            raise DetectionInitError(f"{where}: C4 file holds box-head keys {stray[:5]}")


def save_detection_init(path: str, state_dict: dict, meta: dict) -> None:
    """Validate and atomically write a detection-initialisation file.

    Args:
        path: output file (``.pth``).
        state_dict: torchvision detection key → tensor.
        meta: at least ``source, source_file, arch, parts, pixel`` (plus ``report``); plain
            Python values only, so the file loads with ``weights_only=True``.

    Raises:
        DetectionInitError: the state dict or meta break the contract.
    """
    _check(state_dict, meta, str(path))
    model = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    atomic_torch_save({"format": FORMAT, "version": VERSION, "model": model, "meta": dict(meta)}, path)


def load_detection_init(path: str) -> tuple[dict, dict]:
    """Load and validate a detection-initialisation file (``weights_only=True``).

    Returns:
        (state_dict with torchvision detection names, meta).

    Raises:
        CheckpointError: missing / truncated / non-checkpoint file (from ``safe_torch_load``).
        DetectionInitError: a checkpoint that is not a valid detection initialisation.
    """
    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        got = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise DetectionInitError(f"{path}: not a {FORMAT} file (format {got!r}); convert it first "
                                 "with `python transfer/convert.py`")
    if obj.get("version") != VERSION:
        raise DetectionInitError(f"{path}: unsupported {FORMAT} version {obj.get('version')!r} "
                                 f"(this toolkit reads version {VERSION})")
    state_dict, meta = obj.get("model"), obj.get("meta")
    if not isinstance(state_dict, dict) or not isinstance(meta, dict):
        raise DetectionInitError(f"{path}: 'model' and 'meta' must be dicts")
    _check(state_dict, meta, str(path))
    return state_dict, meta
