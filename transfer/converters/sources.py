"""Reading a checkpoint: safe loading, format recognition, extraction into canonical names.

:func:`extract` applies a :class:`~transfer.converters.layouts.Layout` key table to every key
of the chosen state dict and to every top-level entry of the file; anything no rule explains
is an error (:class:`ConversionError`) naming the keys.
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from socokit.backbones import PIXEL_CONVENTION
from socokit.errors import ConversionError
from socokit.fileio import CheckpointError, safe_torch_load
from transfer.converters import layouts as L
from transfer.converters import targets as T


# --------------------------------------------------------------------------- loading
class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for detectron2 ``.pkl`` files: numpy arrays/dtypes and plain builtins only."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("collections", "OrderedDict"),
        ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
        ("builtins", "frozenset"), ("builtins", "int"), ("builtins", "float"), ("builtins", "str"),
        ("builtins", "bytes"), ("builtins", "bytearray"), ("builtins", "bool"), ("builtins", "complex"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED or (module.startswith("numpy") and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def load_pickle(path: str):
    """Load a detectron2-style ``.pkl`` with :class:`_RestrictedUnpickler` (latin1, like detectron2).

    Raises:
        ConversionError: missing, empty, truncated or unsafe file (message names it).
    """
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such checkpoint file")
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(io.BufferedReader(f), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise ConversionError(f"{path}: not a safe detectron2 pickle: {e}") from e
    except (EOFError, ValueError, TypeError, IndexError, AttributeError, ImportError) as e:
        raise ConversionError(f"{path}: not a readable pickle (truncated or corrupt?): {e}") from e


def load_safetensors(path: str) -> dict:
    """A ``.safetensors`` file as a flat ``{name: tensor}`` dict (the format holds nothing else).

    Raises:
        ConversionError: missing or unreadable file (message names it).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such checkpoint file")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ConversionError(f"{path}: not a readable safetensors file: {e}") from e


def load_checkpoint_file(path: str):
    """Load any supported checkpoint file safely, never running code from the file.

    ``.pkl``: :class:`_RestrictedUnpickler` (numpy arrays and builtins only); ``.safetensors``:
    the safetensors reader; anything else: ``torch.load(weights_only=True)``, with
    ``argparse.Namespace`` also allowed (DINO stores its arguments as one; it only holds
    attributes).

    Raises:
        ConversionError: missing, truncated, non-checkpoint or unsafe file (message names it).
    """
    path = os.fspath(path)
    if path.endswith(".pkl"):
        obj = load_pickle(path)
    elif path.endswith(".safetensors"):
        obj = load_safetensors(path)
    else:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = safe_torch_load(path)
        except CheckpointError as e:
            hint = ""
            if "mmengine" in str(e):
                hint = ("; an mmengine training checkpoint holds logger objects: keep only 'meta' and "
                        "'state_dict' (mmpretrain's tools/model_converters/publish_model.py does) and convert that")
            raise ConversionError(str(e) + hint) from e
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: not a checkpoint (top level is a {type(obj).__name__}, not a dict)")
    return obj


# --------------------------------------------------------------------------- recognition
def _keys(obj: dict) -> list[str]:
    for name in ("state_dict", "model"):
        if isinstance(obj.get(name), dict):
            obj = obj[name]
            break
    return [k for k in L.strip_wrapper(obj)[0] if isinstance(k, str)]


def detect_source(obj: dict) -> tuple[str, str]:
    """Recognise the format of a loaded checkpoint from its top level and key names.

    Returns:
        (source name, human-readable reason).

    Raises:
        ConversionError: no format fits (message lists the top-level entries and first keys).
    """
    fmt = obj.get("format")
    if fmt == "soco-pretrain":
        return "soco", "format: soco-pretrain"
    if fmt == "soco-detection-init":
        return "detinit", "format: soco-detection-init"
    if "__author__" in obj and isinstance(obj.get("model"), dict):
        return "detectron2", f"detectron2 pickle (__author__ {obj['__author__']!r})"
    if "online_network_state_dict" in obj:
        return "byol", "online_network_state_dict (PyTorch-BYOL)"
    if isinstance(obj.get("classy_state_dict"), dict):
        return "vissl", "classy_state_dict (VISSL)"
    if isinstance(obj.get("student"), dict) and isinstance(obj.get("teacher"), dict):
        return "dino", "student/teacher (DINO full checkpoint)"
    blobs = obj["blobs"] if isinstance(obj.get("blobs"), dict) else obj
    if "conv1_w" in blobs and "res_conv1_bn_s" in blobs:
        return "caffe2", "Caffe2 blob names (conv1_w, res_conv1_bn_s, res2_0_branch2a_w, ...)"
    keys = _keys(obj)
    has = lambda *p: any(k.startswith(p) for k in keys)  # noqa: E731
    if has("encoder1.", "encoder2.") and has("head1.", "head2.", "encoder1."):
        raise ConversionError(
            "PyContrast CMC checkpoint (encoder1/encoder2): CMC splits the image into an L and an ab "
            "(YDbDr) stream, each a half-width ResNet over 1 or 2 channels; neither maps onto a standard "
            "RGB ResNet, so it is refused rather than guessed. Use a PyContrast InsDis/MoCo/InfoMin checkpoint")
    if isinstance(obj.get("model"), dict) and ("contrast" in obj or has("encoder.", "head.")):
        return "pycontrast", "model (+contrast/model_ema) with encoder.*/head.*"
    if "pytorch-lightning_version" in obj or (has("backbone.", "encoder.") and has("classifier.", "projector.")
                                              and not has("neck.")):
        return "sololearn", "solo-learn (Lightning) backbone/classifier/projector"
    if (has("encoder_q.0.") or (has("backbone.") and has("encoder_q."))) and not has("neck.", "data_preprocessor."):
        return "densecl", "encoder_q.0.* / backbone.* (OpenSelfSup layout)"
    if has("encoder_q."):
        return "moco", "encoder_q.* / encoder_k.*"
    if has("base_encoder."):
        return "mocov3", "base_encoder.* / momentum_encoder.*"
    if has("online_net.", "online_network.", "online_encoder."):
        return "byol", "online/target (momentum) network keys"
    if has("momentum_backbone."):
        return "sololearn", "solo-learn backbone/momentum_backbone"
    if has("projection_head.", "prototypes"):
        return "swav", "projection_head.* / prototypes"
    if has("backbone.body."):
        return "detinit", "torchvision detection names (backbone.body.*)"
    if has("roi_head.", "rpn_head.", "bbox_head.", "neck.lateral_convs."):
        return "mmdet", "MMDetection names (backbone/neck/rpn_head/roi_head)"
    if has("backbone.") and (has("neck.", "head.", "target_net.", "encoder_k.", "momentum_encoder.",
                                 "data_preprocessor.") or isinstance(obj.get("meta"), dict)):
        return "mmselfsup", "mmselfsup 1.x / mmpretrain names (backbone/neck/head)"
    if obj.get("author") == "DenseCL":
        return "densecl", "author: DenseCL (released backbone)"
    if has("stem.conv1.", "res2.", "backbone.bottom_up.", "backbone.stem.", "backbone.res2."):
        return "detectron2", "detectron2 names (stem/res2..res5)"
    if "conv1.weight" in keys:
        if "best_acc1" in obj:
            return "torchvision", ("pytorch/examples ImageNet training checkpoint (state_dict + best_acc1; "
                                   "also MoCo's linear-classification output)")
        return "torchvision", "bare ResNet names (torchvision/timm/DINO backbone release; a timm file reads the same)"
    top = sorted(map(str, obj))[:12]
    raise ConversionError(f"unrecognised checkpoint layout: top-level entries {top}, first keys "
                          f"{keys[:8]}; pass --from explicitly")


# --------------------------------------------------------------------------- reverse layouts
def _count(keys, pattern: str) -> int:
    found = [int(m[1]) for k in keys if (m := re.search(pattern, k))]
    return max(found) if found else 0


def reverse_layout(source: str, obj: dict, target: bool) -> L.Layout:
    """Layouts for files in our own output formats (torchvision detinit, detectron2, mmdet)."""
    if target:
        raise ValueError(f"--target-network: a {source} file holds a single network")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    if obj.get("format") == "soco-finetune":  # a fine-tuned detector: its own top-level record
        meta = {"pixel": obj.get("pixel"), "arch": obj.get("backbone"), "stride_in_1x1": obj.get("stride_in_1x1")}
    soco_meta = obj.get("soco_meta") if isinstance(obj.get("soco_meta"), dict) else meta
    pixel = dict(soco_meta.get("pixel") or PIXEL_CONVENTION)
    notes = [] if soco_meta.get("pixel") else [
        "the file does not record its pixel convention; assuming RGB [0,1] ImageNet mean/std"]
    if source == "detinit":
        container = "model" if isinstance(obj.get("model"), dict) else None
        target_fmt = "torchvision"
        det = L.DETECTOR
        drops = [("rpn.", det), ("roi_heads.box_predictor.", det), ("roi_heads.mask_head.", det),
                 ("roi_heads.mask_predictor.", det), ("roi_heads.box_head.norm.", det)]
        keys = obj[container] if container else obj
        num_convs = _count(keys, r"^roi_heads\.box_head\.(\d+)\.0\.weight$") + 1
    elif source == "detectron2":
        container, target_fmt = "model", "detectron2"
        drops = [("proposal_generator.", L.DETECTOR), ("roi_heads.box_predictor.", L.DETECTOR),
                 ("roi_heads.mask_head.", L.DETECTOR), ("roi_heads.res5.norm.", L.DETECTOR),
                 ("stem.fc.", L.FC + " (left in by MoCo-style converters)")]
        num_convs = _count(obj["model"], r"box_head\.conv(\d+)\.")
    else:
        container, target_fmt = "state_dict", "mmdet"
        drops = [("rpn_head.", L.DETECTOR), ("roi_head.bbox_head.fc_", L.DETECTOR),
                 ("roi_head.mask_head.", L.DETECTOR), ("backbone.fc.", L.FC)]
        num_convs = _count(obj["state_dict"], r"shared_convs\.(\d+)\.") + 1
    rename = lambda k: T.from_target(k, target_fmt, num_convs=num_convs)  # noqa: E731
    rules = [L.Rule(p, reason=r) for p, r in drops] + [L.Rule("", "", rename=rename)]
    return L.Layout(source, f"{target_fmt} checkpoint names", container, rules, parts=(),
                    pixel=pixel, arch=soco_meta.get("arch"), notes=notes,
                    extra_meta={"stride_in_1x1": True} if soco_meta.get("stride_in_1x1") else {})


# --------------------------------------------------------------------------- extraction
#: Top-level entries that are not weights, with the reason they are not exported.
TOP_LEVEL = {
    "optimizer": "optimizer state", "optimizer_state_dict": "optimizer state",
    "scaler": "training state", "amp": "training state", "lr_scheduler": "training state",
    "scheduler": "training state", "fp16_scaler": "training state", "rng": "training state",
    # pytorch/examples (and MoCo's main_lincls.py) keep the best validation accuracy
    "best_acc1": "training metric (ImageNet top-1 of the classifier, not a weight)",
    "best_acc5": "training metric (ImageNet top-5 of the classifier, not a weight)",
    # PyTorch Lightning (solo-learn)
    "optimizer_states": "optimizer state", "lr_schedulers": "training state",
    "callbacks": "training state", "loops": "training state",
    "contrast": L.QUEUE, "model_ema": L.MOMENTUM, "state_dict_ema": L.MOMENTUM,
    "target_network_state_dict": L.MOMENTUM, "online_network_state_dict": L.ONLINE,
    "encoder_state_dict": L.DUPLICATE,
}


@dataclass
class Extraction:
    """A checkpoint read into canonical names.

    Attributes:
        layout: the layout used.
        tensors: canonical name → tensor.
        origin: canonical name → original key (as written in the file).
        dropped: original key (``entry/key`` for other top-level dicts) → reason category.
        groups: original dropped key → the module (rule prefix / top-level entry) it belongs to.
        metadata: top-level entries without weights (names).
    """
    layout: L.Layout
    tensors: dict = field(default_factory=dict)
    origin: dict = field(default_factory=dict)
    dropped: dict = field(default_factory=dict)
    groups: dict = field(default_factory=dict)
    metadata: list = field(default_factory=list)


def _as_tensor(value, key: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        # np.ascontiguousarray would turn 0-d arrays (num_batches_tracked) into 1-d ones.
        return torch.from_numpy(value if value.flags["C_CONTIGUOUS"] else value.copy(order="C"))
    raise ConversionError(f"{key}: value is a {type(value).__name__}, not a tensor/array")


def _holds_tensors(value) -> int:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return 1
    if isinstance(value, dict):
        return sum(_holds_tensors(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_holds_tensors(v) for v in value)
    return 0


def _apply_rules(sd: dict, wrapper: str, layout: L.Layout, out: Extraction) -> list[str]:
    unexplained = []
    for key, value in sd.items():
        original = wrapper + key
        suffix = next((r for s, r in layout.drop_suffixes if key.endswith(s)), None)
        if suffix is not None:
            out.dropped[original] = suffix
            out.groups[original] = "*" + next(s for s, _ in layout.drop_suffixes if key.endswith(s))
            continue
        for rule in layout.rules:
            if not key.startswith(rule.prefix):
                continue
            if rule.keep is None:
                out.dropped[original] = rule.reason
                out.groups[original] = wrapper + (rule.prefix or key.split(".")[0])
                break
            try:
                rest = key[len(rule.prefix):]
                name = rule.keep + (rule.rename(rest) if rule.rename else rest)
            except ValueError:
                continue
            if name in out.tensors:
                raise ConversionError(f"{original} and {out.origin[name]} both map to {name}")
            out.tensors[name] = _as_tensor(value, original)
            out.origin[name] = original
            break
        else:
            unexplained.append(original)
    return unexplained


def _check_aliases(sd: dict, layout: L.Layout) -> None:
    for alias, kept in layout.aliases:
        for key in (k for k in sd if k.startswith(alias)):
            twin = kept + key[len(alias):]
            if twin not in sd or not torch.equal(_as_tensor(sd[key], key), _as_tensor(sd[twin], twin)):
                raise ConversionError(f"{key} is expected to duplicate {twin}, but "
                                      f"{'it is absent' if twin not in sd else 'they differ'}")


def extract(obj: dict, source: str, target_network: bool = False) -> Extraction:
    """Read ``obj`` (a loaded checkpoint) as ``source`` into canonical names.

    Raises:
        ConversionError: wrong layout for ``source``, or keys / top-level entries no rule explains.
    """
    try:
        if source in ("detinit", "detectron2", "mmdet"):
            layout = reverse_layout(source, obj, target_network)
        else:
            layout = L.LAYOUTS[source](obj, target_network)
    except (ValueError, KeyError) as e:
        raise ConversionError(str(e)) from e
    out = Extraction(layout)
    top_level = dict(TOP_LEVEL, **layout.top_level)
    path = layout.container if isinstance(layout.container, tuple) else (
        (layout.container,) if layout.container else ())
    sd, where = obj, ""
    for name in path:  # every entry beside the path is explained or refused
        if not isinstance(sd, dict) or not isinstance(sd.get(name), dict):
            raise ConversionError(f"no state dict under {'/'.join(path)!r}")
        _explain_entries(sd, name, where, top_level, source, out)
        sd, where = sd[name], where + name + "/"
    if not isinstance(sd, dict) or not sd:
        raise ConversionError(f"no state dict under {'/'.join(path)!r}")
    stripped, wrapper = L.strip_wrapper(sd)
    unexplained = _apply_rules(stripped, wrapper, layout, out)
    if unexplained:
        raise ConversionError(f"{len(unexplained)} key(s) not explained by the {source} key table: "
                              f"{unexplained[:20]}{' ...' if len(unexplained) > 20 else ''}")
    _check_aliases(stripped, layout)
    if not out.tensors:
        raise ConversionError(f"no backbone weights found for source {source}")
    if layout.finish is not None:
        layout.finish(out.tensors, out.origin)
    return out


def _explain_entries(level: dict, container: str, where: str, top_level: dict, source: str,
                     out: Extraction) -> None:
    """Drop (with a reason) or record as metadata every entry of ``level`` but ``container``."""
    for entry, value in level.items():
        if entry == container:
            continue
        name = where + str(entry)
        n = _holds_tensors(value)
        if entry in top_level and isinstance(value, dict) and n and all(
                isinstance(v, (torch.Tensor, np.ndarray)) for v in value.values()):
            out.dropped.update({f"{name}/{k}": top_level[entry] for k in value})
            out.groups.update({f"{name}/{k}": name for k in value})
        elif entry in top_level:
            out.dropped[name] = top_level[entry]
            out.groups[name] = name
        elif n:
            raise ConversionError(f"unexplained top-level entry {name!r} holding {n} tensors "
                                  f"(source {source}); refusing to guess what it is")
        else:
            out.metadata.append(name)
