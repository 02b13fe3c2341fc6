"""Initialise a detector: a detection-init file, a torchvision supervised ResNet, or scratch.

Loading is strict per part: for every part the file lists (``backbone``, ``fpn``,
``box_head``, ``res5``) the detector's keys of that part and the file's keys must be the same
set with the same shapes, or loading stops with an error naming the file and the keys. Every
other detector key is reported as newly initialised.

Specs accepted by :func:`initialise_detector`:

* ``None`` / ``"scratch"``: keep the builders' initialisation;
* ``PATH``: a ``soco-detection-init`` file (``python transfer/convert.py`` writes them);
* ``torchvision-supervised:PATH``: a torchvision ``resnet50`` state dict the user has
  (``fc.*`` dropped; layer4 goes to ``res5`` for C4 detectors).
"""
from __future__ import annotations

from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from socokit.backbones import PIXEL_CONVENTION
from socokit.errors import CheckpointError, ConfigError, IncompatibleWeightsError
from socokit.fileio import safe_torch_load
from transfer.detinit import load_detection_init

PART_PREFIXES = {"backbone": "backbone.body.", "fpn": "backbone.fpn.",
                 "box_head": "roi_heads.box_head.", "res5": "roi_heads.box_head.res5."}
SUPERVISED_PREFIX = "torchvision-supervised:"


def _part_of(key: str, parts) -> str | None:
    """The most specific listed part a key belongs to (``res5`` before ``box_head``)."""
    best = None
    for p in parts:
        pre = PART_PREFIXES[p]
        if key.startswith(pre) and (best is None or len(pre) > len(PART_PREFIXES[best])):
            best = p
    return best


def _frozen_bn_counters(model: nn.Module) -> set:
    """``num_batches_tracked`` names that FrozenBatchNorm2d layers do not have."""
    return {f"{n}.num_batches_tracked" for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)}


def load_parts_strict(model: nn.Module, state_dict: dict, parts, source: str) -> dict:
    """Load ``state_dict`` into ``model`` for ``parts``; exact key/shape match per part.

    Returns:
        report dict: ``loaded`` (count), ``parts``, ``new`` (sorted keys of the detector left at
        their fresh initialisation).

    Raises:
        socokit.errors.IncompatibleWeightsError: a listed part has no counterpart in the model,
            or missing / unexpected keys or mismatched shapes.
    """
    parts = list(parts)
    model_sd = model.state_dict()
    skip = _frozen_bn_counters(model)
    want = {k for k in model_sd if _part_of(k, parts) is not None}
    have = {k for k in state_dict if k not in skip}
    for p in parts:
        if not any(_part_of(k, parts) == p for k in want):
            raise IncompatibleWeightsError(f"{source}: part {p!r} has no counterpart in this detector "
                             "(e.g. a P2-P5 FPN for RetinaNet/FCOS, or a res5 part for an FPN model); "
                             "restrict the parts with --init-parts")
    missing, unexpected = sorted(want - have), sorted(k for k in have if _part_of(k, parts) and k not in want)
    shape_bad = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(model_sd[k].shape)}"
                 for k in sorted(want & have) if state_dict[k].shape != model_sd[k].shape]
    if missing or unexpected or shape_bad:
        lines = [f"{source}: the detector does not match the parts {parts} of the file"]
        for title, items in (("missing in file", missing), ("not in detector", unexpected),
                             ("shape mismatch", shape_bad)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        lines.append("  (check --backbone, --norm (a BN file needs a BN-family norm) and the detector)")
        raise IncompatibleWeightsError("\n".join(lines))
    subset = {k: state_dict[k] for k in want}
    result = model.load_state_dict(subset, strict=False)
    if result.unexpected_keys:  # cannot happen after the checks above
        raise IncompatibleWeightsError(f"{source}: unexpected keys {result.unexpected_keys[:5]}")
    return {"loaded": len(subset), "parts": parts, "new": sorted(set(result.missing_keys))}


def supervised_to_detection(resnet_sd: dict, c4: bool) -> tuple[dict, list]:
    """torchvision ResNet state dict → detection names (+ the parts it fills)."""
    out = {}
    for k, v in resnet_sd.items():
        if k.startswith("fc."):
            continue
        if c4 and k.startswith("layer4."):
            out["roi_heads.box_head.res5." + k[len("layer4."):]] = v
        else:
            out["backbone.body." + k] = v
    return out, (["backbone", "res5"] if c4 else ["backbone"])


def read_init(spec: str, c4: bool) -> tuple[dict, dict]:
    """(state_dict, meta) for an init spec (a detinit file or ``torchvision-supervised:PATH``).

    Raises:
        socokit.errors.CheckpointError: unreadable file, not a detection-init file, or not a
            torchvision ResNet state dict.
    """
    if spec.startswith(SUPERVISED_PREFIX):
        path = spec[len(SUPERVISED_PREFIX):]
        sd = safe_torch_load(path)
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or "conv1.weight" not in sd:
            raise CheckpointError(f"{path}: not a torchvision ResNet state dict (no conv1.weight)")
        state_dict, parts = supervised_to_detection(sd, c4)
        return state_dict, {"source": "torchvision-supervised", "source_file": path,
                            "arch": "resnet50", "parts": parts, "pixel": dict(PIXEL_CONVENTION)}
    return load_detection_init(spec)


def apply_stride_in_1x1(model: nn.Module) -> int:
    """Move each strided bottleneck's stride from its 3x3 conv to its first 1x1 conv.

    MSRA / Caffe2 ResNets (detectron2 ``RESNETS.STRIDE_IN_1X1: True``, mmdet ``style='caffe'``)
    downsample in ``conv1``; torchvision's ("ResNet v1.5") in ``conv2``. Weight shapes are the
    same, so weights of one layout load silently into the other; this makes the model follow
    the weights. The shortcut's strided 1x1 conv is unchanged.

    Returns:
        the number of blocks changed.

    Raises:
        ValueError: the model has no torchvision Bottleneck with a strided 3x3 conv.
    """
    from torchvision.models.resnet import Bottleneck

    changed = 0
    for block in model.modules():
        if isinstance(block, Bottleneck) and block.conv2.stride != (1, 1):
            block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)
            changed += 1
    if not changed:
        raise ValueError("stride_in_1x1 weights need a torchvision ResNet bottleneck backbone "
                         "(e.g. --backbone resnet50)")
    return changed


def initialise_detector(model: nn.Module, spec: str | None, parts=None, c4: bool = False, usable=None):
    """Load an init spec into ``model``.

    Args:
        model: a detector from :func:`transfer.models.build_detector`.
        spec: None/"scratch", a detinit path, or ``torchvision-supervised:PATH``.
        parts: subset of the file's parts to load (default: all of them).
        c4: the detector is a C4 model (supervised layer4 → res5).
        usable: without ``parts``, load only the file's parts in this list (e.g. SOLOv2:
            backbone and FPN; a box head has no counterpart).

    Returns:
        (report dict, meta dict or None). ``report["new"]`` lists the freshly initialised keys.

    Raises:
        socokit.errors.CheckpointError: the init file cannot be read or is not an init file.
        socokit.errors.IncompatibleWeightsError: the file's parts do not fit the detector.
        socokit.errors.ConfigError: ``parts`` names a part the file does not have.
    """
    if spec in (None, "", "scratch"):
        return {"loaded": 0, "parts": [], "new": sorted(model.state_dict())}, None
    state_dict, meta = read_init(spec, c4)
    file_parts = list(meta["parts"])
    use = list(parts) if parts else [p for p in file_parts if usable is None or p in usable]
    absent = [p for p in use if p not in file_parts]
    if absent:
        raise ConfigError(f"init_parts: {absent} are not among the parts {file_parts} of {spec}", "init_parts",
                          list(parts))
    state_dict = {k: v for k, v in state_dict.items() if _part_of(k, use) is not None}
    return load_parts_strict(model, state_dict, use, spec), meta
