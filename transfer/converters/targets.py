"""Key tables from canonical (torchvision detection) names to detectron2 and MMDetection names.

Every rule has an inverse, so a file written in any target format can be read back; the
:func:`key_table` built for a conversion is checked to be injective and to invert exactly.

torchvision → detectron2 (docs/checkpoint_formats.md §8(a), docs/method.md §6.1–6.2), bare names as the
original SoCo/MoCo converters wrote them (``matching_heuristics`` suffix matching):

======================================  ==========================================
``backbone.body.conv1.weight``          ``stem.conv1.weight``
``backbone.body.bn1.X``                 ``stem.conv1.norm.X``
``backbone.body.layer{s}.{b}.conv{k}.*`` ``res{s+1}.{b}.conv{k}.*``
``backbone.body.layer{s}.{b}.bn{k}.X``   ``res{s+1}.{b}.conv{k}.norm.X``
``….downsample.0.weight`` / ``.1.X``     ``….shortcut.weight`` / ``.shortcut.norm.X``
``backbone.fpn.inner_blocks.{i}.0.*``    ``fpn_lateral{i+2}.*`` (``.1.X`` → ``.norm.X``)
``backbone.fpn.layer_blocks.{i}.0.*``    ``fpn_output{i+2}.*`` (``.1.X`` → ``.norm.X``)
``roi_heads.box_head.{k-1}.0.weight``    ``box_head.conv{k}.weight`` (``.1.X`` → ``.norm.X``)
``roi_heads.box_head.{n+1}.*`` (fc)      ``box_head.fc1.*``
======================================  ==========================================

Full detectron2 names add ``backbone.bottom_up.`` (body of FPN models), ``backbone.`` (FPN;
C4 stem/res2–4), ``roi_heads.`` (box head) and put a C4 res5 at ``roi_heads.res5.``.

MMDetection: body ``backbone.<torchvision name>``, C4 res5 ``roi_head.shared_head.layer4.*``,
FPN ``neck.lateral_convs.{i}.conv/bn`` and ``neck.fpn_convs.{i}.conv/bn``, head
``roi_head.bbox_head.shared_convs.{k-1}.conv/bn`` and ``roi_head.bbox_head.shared_fcs.0``.
"""
from __future__ import annotations

import re

from transfer.converters.expected import BODY, FPN, HEAD, LAYER4

TARGETS = ("torchvision", "detectron2", "mmdet")


class KeyRuleError(ValueError):
    """A key has no rule in a table (message names it)."""


# --------------------------------------------------------------------------- ResNet body
def tv_body_to_d2(name: str) -> str:
    """torchvision ResNet name (``layer1.0.bn1.weight``) → detectron2 (``res2.0.conv1.norm.weight``)."""
    m = re.match(r"^conv1\.(.+)$", name)
    if m:
        return f"stem.conv1.{m[1]}"
    m = re.match(r"^bn1\.(.+)$", name)
    if m:
        return f"stem.conv1.norm.{m[1]}"
    m = re.match(r"^layer(\d)\.(\d+)\.(conv|bn)(\d)\.(.+)$", name)
    if m:
        norm = ".norm" if m[3] == "bn" else ""
        return f"res{int(m[1]) + 1}.{m[2]}.conv{m[4]}{norm}.{m[5]}"
    m = re.match(r"^layer(\d)\.(\d+)\.downsample\.([01])\.(.+)$", name)
    if m:
        norm = ".norm" if m[3] == "1" else ""
        return f"res{int(m[1]) + 1}.{m[2]}.shortcut{norm}.{m[4]}"
    raise KeyRuleError(f"no detectron2 name for ResNet key {name!r} (not a torchvision ResNet name)")


def d2_body_to_tv(name: str) -> str:
    """Inverse of :func:`tv_body_to_d2`."""
    m = re.match(r"^stem\.conv1\.norm\.(.+)$", name)
    if m:
        return f"bn1.{m[1]}"
    m = re.match(r"^stem\.conv1\.(.+)$", name)
    if m:
        return f"conv1.{m[1]}"
    m = re.match(r"^res(\d)\.(\d+)\.conv(\d)(\.norm)?\.(.+)$", name)
    if m:
        return f"layer{int(m[1]) - 1}.{m[2]}.{'bn' if m[4] else 'conv'}{m[3]}.{m[5]}"
    m = re.match(r"^res(\d)\.(\d+)\.shortcut(\.norm)?\.(.+)$", name)
    if m:
        return f"layer{int(m[1]) - 1}.{m[2]}.downsample.{1 if m[3] else 0}.{m[4]}"
    raise KeyRuleError(f"no torchvision name for detectron2 ResNet key {name!r}")


# --------------------------------------------------------------------------- FPN and head
def _fpn_to_d2(rest: str) -> str:
    m = re.match(r"^(inner|layer)_blocks\.(\d+)\.([01])\.(.+)$", rest)
    if not m:
        raise KeyRuleError(f"no detectron2 name for FPN key {FPN + rest!r}")
    kind = "lateral" if m[1] == "inner" else "output"
    norm = ".norm" if m[3] == "1" else ""
    return f"fpn_{kind}{int(m[2]) + 2}{norm}.{m[4]}"


def _d2_to_fpn(name: str) -> str:
    m = re.match(r"^fpn_(lateral|output)(\d)(\.norm)?\.(.+)$", name)
    if not m:
        raise KeyRuleError(f"no torchvision name for detectron2 FPN key {name!r}")
    kind = "inner" if m[1] == "lateral" else "layer"
    return f"{FPN}{kind}_blocks.{int(m[2]) - 2}.{1 if m[3] else 0}.{m[4]}"


def _head_to_d2(rest: str, num_convs: int) -> str:
    m = re.match(r"^(\d+)\.([01])\.(.+)$", rest)
    if m and int(m[1]) < num_convs:
        return f"box_head.conv{int(m[1]) + 1}{'.norm' if m[2] == '1' else ''}.{m[3]}"
    m = re.match(r"^(\d+)\.(weight|bias)$", rest)
    if m and int(m[1]) == num_convs + 1:
        return f"box_head.fc1.{m[2]}"
    raise KeyRuleError(f"no detectron2 name for box-head key {HEAD + rest!r}")


def _d2_to_head(name: str, num_convs: int) -> str:
    m = re.match(r"^box_head\.conv(\d+)(\.norm)?\.(.+)$", name)
    if m:
        return f"{HEAD}{int(m[1]) - 1}.{1 if m[2] else 0}.{m[3]}"
    m = re.match(r"^box_head\.fc1\.(weight|bias)$", name)
    if m:
        return f"{HEAD}{num_convs + 1}.{m[1]}"
    raise KeyRuleError(f"no torchvision name for detectron2 box-head key {name!r}")


def _fpn_to_mmdet(rest: str) -> str:
    m = re.match(r"^(inner|layer)_blocks\.(\d+)\.([01])\.(.+)$", rest)
    if not m:
        raise KeyRuleError(f"no MMDetection name for FPN key {FPN + rest!r}")
    kind = "lateral_convs" if m[1] == "inner" else "fpn_convs"
    return f"neck.{kind}.{m[2]}.{'bn' if m[3] == '1' else 'conv'}.{m[4]}"


def _mmdet_to_fpn(name: str) -> str:
    m = re.match(r"^neck\.(lateral|fpn)_convs\.(\d+)\.(conv|bn)\.(.+)$", name)
    if not m:
        raise KeyRuleError(f"no torchvision name for MMDetection neck key {name!r}")
    kind = "inner" if m[1] == "lateral" else "layer"
    return f"{FPN}{kind}_blocks.{m[2]}.{1 if m[3] == 'bn' else 0}.{m[4]}"


def _head_to_mmdet(rest: str, num_convs: int) -> str:
    m = re.match(r"^(\d+)\.([01])\.(.+)$", rest)
    if m and int(m[1]) < num_convs:
        return f"roi_head.bbox_head.shared_convs.{m[1]}.{'bn' if m[2] == '1' else 'conv'}.{m[3]}"
    m = re.match(r"^(\d+)\.(weight|bias)$", rest)
    if m and int(m[1]) == num_convs + 1:
        return f"roi_head.bbox_head.shared_fcs.0.{m[2]}"
    raise KeyRuleError(f"no MMDetection name for box-head key {HEAD + rest!r}")


def _mmdet_to_head(name: str, num_convs: int) -> str:
    m = re.match(r"^roi_head\.bbox_head\.shared_convs\.(\d+)\.(conv|bn)\.(.+)$", name)
    if m:
        return f"{HEAD}{m[1]}.{1 if m[2] == 'bn' else 0}.{m[3]}"
    m = re.match(r"^roi_head\.bbox_head\.shared_fcs\.0\.(weight|bias)$", name)
    if m:
        return f"{HEAD}{num_convs + 1}.{m[1]}"
    raise KeyRuleError(f"no torchvision name for MMDetection bbox-head key {name!r}")


# --------------------------------------------------------------------------- whole names
def to_target(name: str, target: str, *, c4: bool, num_convs: int = 4,
              d2_full_names: bool = False) -> str:
    """Canonical name → target name.

    Args:
        name: canonical name (``backbone.body.*``, ``backbone.fpn.*``, ``roi_heads.box_head.*``).
        target: one of :data:`TARGETS`.
        c4: the export is a C4 model (``layer4`` becomes the res5 head).
        num_convs: convolutions of the box head (its fc is Sequential index ``num_convs + 1``).
        d2_full_names: detectron2 full model names instead of bare suffix-matched names.
    """
    if name.startswith(BODY):
        rest = name[len(BODY):]
        in_res5 = c4 and name.startswith(LAYER4)
        if target == "torchvision":
            return "roi_heads.box_head.res5." + name[len(LAYER4):] if in_res5 else name
        if target == "mmdet":
            return "roi_head.shared_head." + rest if in_res5 else "backbone." + rest
        d2 = tv_body_to_d2(rest)
        if not d2_full_names:
            return d2
        if c4:
            return "roi_heads." + d2 if in_res5 else "backbone." + d2
        return "backbone.bottom_up." + d2
    if name.startswith(FPN):
        rest = name[len(FPN):]
        if target == "torchvision":
            return name
        if target == "mmdet":
            return _fpn_to_mmdet(rest)
        return ("backbone." if d2_full_names else "") + _fpn_to_d2(rest)
    if name.startswith(HEAD):
        rest = name[len(HEAD):]
        if target == "torchvision":
            return name
        if target == "mmdet":
            return _head_to_mmdet(rest, num_convs)
        return ("roi_heads." if d2_full_names else "") + _head_to_d2(rest, num_convs)
    raise KeyRuleError(f"{name!r} is not a canonical backbone/FPN/box-head name")


def from_target(name: str, target: str, *, num_convs: int = 4) -> str:
    """Target name → canonical name (accepts bare and full detectron2 names, C4 and FPN).

    Raises:
        KeyRuleError: no rule matches (message names the key).
    """
    if target == "torchvision":
        if name.startswith("roi_heads.box_head.res5."):
            return LAYER4 + name[len("roi_heads.box_head.res5."):]
        if name.startswith((BODY, FPN, HEAD)):
            return name
        raise KeyRuleError(f"{name!r} is not a torchvision backbone/FPN/box-head name")
    if target == "mmdet":
        if name.startswith("roi_head.shared_head.layer4."):
            return BODY + name[len("roi_head.shared_head."):]
        if name.startswith("backbone."):
            return BODY + name[len("backbone."):]
        if name.startswith("neck."):
            return _mmdet_to_fpn(name)
        if name.startswith("roi_head.bbox_head."):
            return _mmdet_to_head(name, num_convs)
        raise KeyRuleError(f"{name!r} is not an MMDetection backbone/neck/bbox-head name")
    for prefix in ("backbone.bottom_up.", "backbone.", "roi_heads."):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if name.startswith("fpn_"):
        return _d2_to_fpn(name)
    if name.startswith("box_head."):
        return _d2_to_head(name, num_convs)
    return BODY + d2_body_to_tv(name)


def key_table(canonical_names, target: str, *, c4: bool, num_convs: int = 4,
              d2_full_names: bool = False) -> dict[str, str]:
    """The explicit canonical → target table for a conversion, checked injective and invertible.

    Raises:
        KeyRuleError: a name has no rule, two names collide, or a rule does not invert.
    """
    table = {n: to_target(n, target, c4=c4, num_convs=num_convs, d2_full_names=d2_full_names)
             for n in canonical_names}
    if len(set(table.values())) != len(table):
        seen: dict[str, str] = {}
        dup = [(seen.setdefault(v, k), k) for k, v in table.items() if seen.get(v, k) != k]
        raise KeyRuleError(f"{target} key table is not injective: {dup[:5]}")
    for canon, tgt in table.items():
        back = from_target(tgt, target, num_convs=num_convs)
        if back != canon:
            raise KeyRuleError(f"{target} rule for {canon!r} -> {tgt!r} inverts to {back!r}")
    return table
