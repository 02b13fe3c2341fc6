"""Conversion: extract → check every part against the expected model → rename → report.

:func:`convert` works on a loaded checkpoint (a dict) and returns a :class:`Conversion` with
the target state dict and its metadata; :func:`write_output` writes it in the target's file
format. Everything that is not an exact, complete conversion raises :class:`ConversionError`.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass

import numpy as np

from socokit.fileio import atomic_torch_save, atomic_write
from transfer.converters import expected as E
from transfer.converters import targets as T
from transfer.converters.layouts import SOURCES
from transfer.converters.report import build_report
from transfer.converters.sources import ConversionError, Extraction, detect_source, extract

PARTS = {"backbone": ("backbone",), "backbone+fpn": ("backbone", "fpn"),
         "backbone+fpn+head": ("backbone", "fpn", "box_head"), "c4": ("backbone", "res5")}
NOT_REQUESTED = "part not requested (--parts)"
_PREFIX = {"fpn": E.FPN, "box_head": E.HEAD}


@dataclass
class Conversion:
    """Result of :func:`convert`.

    Attributes:
        state_dict: target name → tensor.
        meta: source, source_file, arch, parts, pixel, report (+ target-specific hints).
        table: canonical name → target name (the explicit key table used).
        loaded: target name → original source key.
        dropped: original source key → reason.
    """
    state_dict: dict
    meta: dict
    table: dict
    loaded: dict
    dropped: dict


def available_parts(ex: Extraction) -> tuple[str, ...]:
    """Parts the source provides: declared by its layout, else found among its keys."""
    if ex.layout.parts:
        return ex.layout.parts
    names = ex.tensors
    parts = ["backbone"] if any(k.startswith(E.BODY) for k in names) else []
    parts += [p for p, pre in _PREFIX.items() if any(k.startswith(pre) for k in names)]
    if any(ex.origin[k].startswith(("roi_heads.box_head.res5.", "roi_heads.res5.", "roi_head.shared_head."))
           for k in names):
        parts.append("res5")
    return tuple(parts)


def default_parts(available: tuple[str, ...]) -> str:
    """The --parts value exporting everything a source has."""
    if "res5" in available:
        return "c4"
    if "box_head" in available:
        return "backbone+fpn+head"
    return "backbone+fpn" if "fpn" in available else "backbone"


def resolve_arch(ex: Extraction, arch: str | None) -> str:
    """The body architecture: explicit ``arch``, else the file's, else inferred from shapes."""
    arch = arch or ex.layout.arch
    if arch:
        return arch
    body = {k: v for k, v in ex.tensors.items() if k.startswith(E.BODY)}
    found = E.infer_resnet_arch(body)
    if found:
        return found
    closest = E.closest_resnet_arch(body)
    _compare(body, E.body_shapes(closest), f"backbone (closest torchvision ResNet: {closest})", ex.origin)
    raise ConversionError("backbone does not match any torchvision ResNet; pass --arch")


def _compare(got: dict, want: dict, what: str, origin: dict) -> None:
    """Raise ConversionError naming missing / unexpected / mis-shaped keys of ``got`` vs ``want``.

    Unexpected and mis-shaped keys also name the source key they came from (``origin``).
    """
    def src(k: str) -> str:
        return k if origin.get(k, k) == k else f"{k} (from {origin[k]})"

    missing = sorted(set(want) - set(got))
    extra = [src(k) for k in sorted(set(got) - set(want))]
    shapes = [f"{src(k)}: {tuple(got[k].shape)} != {want[k]}" for k in sorted(set(got) & set(want))
              if tuple(got[k].shape) != tuple(want[k])]
    problems = []
    for label, items in (("missing", missing), ("unexpected", extra), ("shape mismatch", shapes)):
        if items:
            problems.append(f"{len(items)} {label}: {items[:12]}{' ...' if len(items) > 12 else ''}")
    if problems:
        raise ConversionError(f"{what} is incomplete or wrong: " + "; ".join(problems))


def expected_shapes(ex: Extraction, arch: str, parts: tuple[str, ...]) -> dict:
    """Canonical name → shape for ``parts``, from the real modules (FPN/head widths from the file)."""
    want = dict(E.body_shapes(arch))
    if "fpn" in parts:
        out_channels, norm = E.infer_fpn_config(ex.tensors)
        want.update(E.fpn_shapes(arch, out_channels, norm))
    if "box_head" in parts:
        cfg = E.infer_box_head_config(ex.tensors)
        if "fpn" in parts and cfg["in_channels"] != E.infer_fpn_config(ex.tensors)[0]:
            raise ConversionError(f"box head takes {cfg['in_channels']} channels but the FPN gives "
                                  f"{E.infer_fpn_config(ex.tensors)[0]}")
        want.update(E.box_head_shapes(**cfg))
    return want


def _select(ex: Extraction, arch: str, parts: tuple[str, ...]) -> tuple[dict, dict]:
    """(tensors of the requested parts, tensors of parts not requested) after the full check."""
    requested_prefixes = tuple([E.BODY] + [_PREFIX[p] for p in parts if p in _PREFIX])
    chosen = {k: v for k, v in ex.tensors.items() if k.startswith(requested_prefixes)}
    rest = {k: v for k, v in ex.tensors.items() if k not in chosen}
    try:
        want = expected_shapes(ex, arch, parts)
    except (KeyError, ValueError) as e:
        raise ConversionError(str(e).strip('"')) from e
    _compare(chosen, want, f"{'+'.join(parts)} of a {arch} ({ex.layout.source} source)", ex.origin)
    if "res5" in parts and not E.c4_split_ok(chosen):
        raise ConversionError(f"--parts c4 needs a ResNet layer4 (res5); backbone {arch} has none")
    return chosen, rest


def pixel_hints(pixel: dict, target: str, stride_in_1x1: bool = False) -> dict:
    """Config values a detectron2 / MMDetection user must set for these weights (docs/method.md §7, §9).

    ``stride_in_1x1``: the ResNet strides in the first 1x1 conv of a bottleneck (MSRA / Caffe2
    weights: detectron2 ``STRIDE_IN_1X1: True``, mmdet ``style='caffe'``).
    """
    scale = 255.0 / float(pixel["range"])
    mean = [round(m * scale, 3) for m in pixel["mean"]]
    std = [round(s * scale, 3) for s in pixel["std"]]
    rgb = pixel["channels"].upper() == "RGB"
    if target == "detectron2":
        return {"MODEL.PIXEL_MEAN": mean, "MODEL.PIXEL_STD": std,
                "INPUT.FORMAT": pixel["channels"].upper(), "MODEL.RESNETS.STRIDE_IN_1X1": bool(stride_in_1x1)}
    if target == "mmdet":
        return {"img_norm_cfg": {"mean": mean, "std": std, "to_rgb": rgb},
                "data_preprocessor": {"mean": mean, "std": std, "bgr_to_rgb": rgb},
                "backbone.style": "caffe" if stride_in_1x1 else "pytorch"}
    return {"image_mean": list(pixel["mean"]), "image_std": list(pixel["std"]),
            "input": f"{pixel['channels']} float in [0, {pixel['range']}]"}


def convert(obj: dict, *, source: str = "auto", target: str = "torchvision", parts: str | None = None,
            target_network: bool = False, arch: str | None = None, source_file: str = "",
            d2_full_names: bool = False) -> Conversion:
    """Convert a loaded checkpoint.

    Args:
        obj: the loaded checkpoint (top-level dict).
        source: a name from :data:`transfer.converters.layouts.SOURCES` or ``"auto"``.
        target: ``torchvision`` (detection init), ``detectron2`` or ``mmdet``.
        parts: a key of :data:`PARTS`; None exports everything the source has.
        target_network: export the target/momentum network instead of the online one.
        arch: override the backbone architecture (default: from the file or inferred).
        source_file: recorded in the metadata.
        d2_full_names: detectron2 full model names instead of bare suffix-matched names.

    Raises:
        ConversionError: anything short of an exact, complete conversion.
    """
    if target not in T.TARGETS:
        raise ConversionError(f"unknown target {target!r}; use one of {', '.join(T.TARGETS)}")
    if source != "auto" and source not in SOURCES:
        raise ConversionError(f"unknown source {source!r}; use auto or one of {', '.join(SOURCES)}")
    recognised = ""
    if source == "auto":
        source, recognised = detect_source(obj)
    ex = extract(obj, source, target_network)
    available = available_parts(ex)
    parts = parts or default_parts(available)
    if parts not in PARTS:
        raise ConversionError(f"unknown --parts {parts!r}; use one of {', '.join(PARTS)}")
    wanted = PARTS[parts]
    lacking = [p for p in wanted if p not in available and p != "res5"]
    if lacking:
        raise ConversionError(f"source {source} ({ex.layout.description}) has no {'/'.join(lacking)}; "
                              f"it provides {'+'.join(available) or 'nothing'}: refusing --parts {parts}")
    arch = resolve_arch(ex, arch)
    chosen, rest = _select(ex, arch, wanted)
    dropped = dict(ex.dropped)
    groups = dict(ex.groups)
    for name in rest:
        dropped[ex.origin[name]] = NOT_REQUESTED
        groups[ex.origin[name]] = name.split(".")[0] + "." + name.split(".")[1]
    c4 = "res5" in wanted
    num_convs = E.infer_box_head_config(chosen)["num_convs"] if "box_head" in wanted else 4
    if target != "torchvision" and not _tv_names(chosen):
        raise ConversionError(f"--to {target} needs torchvision ResNet names; backbone {arch} has others")
    try:
        table = T.key_table(sorted(chosen), target, c4=c4, num_convs=num_convs,
                            d2_full_names=d2_full_names)
    except T.KeyRuleError as e:
        raise ConversionError(str(e)) from e
    state_dict = {table[k]: chosen[k] for k in sorted(chosen)}
    report = build_report(loaded={k: ex.origin[k] for k in chosen}, dropped=dropped, groups=groups,
                          missing=[], c4=c4)
    meta = _build_meta(ex, chosen, source=source, recognised=recognised, source_file=source_file,
                       arch=arch, parts=wanted, target=target, target_network=target_network,
                       d2_full_names=d2_full_names, report=report)
    return Conversion(state_dict, meta, table, {table[k]: ex.origin[k] for k in chosen}, dropped)


def _build_meta(ex: Extraction, chosen: dict, *, source, recognised, source_file, arch, parts, target,
                target_network, d2_full_names, report) -> dict:
    meta = {"source": source, "source_file": source_file, "recognised": recognised or "given by --from",
            "description": ex.layout.description, "arch": arch, "parts": list(parts),
            "network": "target" if target_network else "online", "pixel": dict(ex.layout.pixel),
            "target": target, "notes": list(ex.layout.notes), "report": report}
    if "fpn" in parts:
        out_channels, norm = E.infer_fpn_config(chosen)
        meta["fpn"] = {"out_channels": out_channels, "norm": norm}
    if "box_head" in parts:
        meta["box_head"] = E.infer_box_head_config(chosen)
    meta.update(ex.layout.extra_meta)
    if target != "torchvision":
        meta["config_hints"] = pixel_hints(ex.layout.pixel, target, bool(meta.get("stride_in_1x1")))
    if target == "detectron2":
        meta["d2_full_names"] = bool(d2_full_names)
    return meta


def _tv_names(chosen: dict) -> bool:
    try:
        for k in chosen:
            if k.startswith(E.BODY):
                T.tv_body_to_d2(k[len(E.BODY):])
    except T.KeyRuleError:
        return False
    return True


class PortablePickler(pickle.Pickler):
    """Pickles numpy arrays as ``numpy.ndarray(shape, dtype, bytearray)``.

    NumPy 2 pickles arrays through ``numpy._core.multiarray._reconstruct``, which NumPy 1.x
    (still common in detectron2 environments) cannot import; ``numpy.ndarray`` exists in both.
    """

    def reducer_override(self, obj):
        if type(obj) is np.ndarray:
            return np.ndarray, (obj.shape, obj.dtype.str, bytearray(obj.tobytes(order="C")))
        return NotImplemented


def write_output(conv: Conversion, path: str) -> None:
    """Write ``conv`` in its target's file format (atomically).

    torchvision: detection-init file; detectron2: pickle ``{"model": {name: ndarray},
    "__author__", "matching_heuristics", "soco_meta"}``; mmdet: ``{"state_dict", "meta"}``.
    """
    from transfer.detinit import save_detection_init

    target = conv.meta["target"]
    if target == "torchvision":
        save_detection_init(path, conv.state_dict, conv.meta)
    elif target == "detectron2":
        model = {k: v.detach().cpu().numpy() for k, v in conv.state_dict.items()}
        obj = {"model": model, "__author__": f"soco-toolkit ({conv.meta['source']})",
               "matching_heuristics": not conv.meta.get("d2_full_names", False),
               "soco_meta": conv.meta}
        with atomic_write(path, "wb") as f:
            PortablePickler(f, protocol=4).dump(obj)
    elif target == "mmdet":
        atomic_torch_save({"state_dict": {k: v.detach().cpu().contiguous()
                                          for k, v in conv.state_dict.items()},
                           "meta": conv.meta}, path)
    else:
        raise ConversionError(f"unknown target {target!r}")
