"""Per-source key tables: which keys of a checkpoint are kept (and as what) or dropped (and why).

A :class:`Layout` names the top-level entry holding the state dict and an ordered list of
:class:`Rule`\\ s; the first rule whose prefix matches a key decides. Keys are matched after a
DDP ``module.`` / ``torch.compile`` ``_orig_mod.`` wrapper prefix carried by *every* key has been
removed (the report keeps the original names). A key no rule matches is an error.

Canonical prefixes are torchvision detection names (see :mod:`transfer.converters.expected`).
References for every layout: ``docs/checkpoint_formats.md`` §1–§7 and, for our own files, the
pretraining-checkpoint layout in ``docs/pretrain.md``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from socokit.backbones import PIXEL_CONVENTION
from transfer.converters.expected import BODY, FPN, HEAD, LAYER4

SOURCES = ("soco", "byol", "moco", "mocov3", "swav", "densecl", "pycontrast", "torchvision",
           "timm", "detinit", "detectron2", "mmdet")

# Reason categories for dropped keys.
PROJECTOR = "projector"
PREDICTOR = "predictor"
MOMENTUM = "momentum/target encoder"
ONLINE = "online network (--target-network exports the target)"
QUEUE = "queue / memory bank"
FC = "fc classifier"
PROTOTYPES = "prototypes"
DUPLICATE = "duplicate alias"
DETECTOR = "detector part not transferable (rpn/predictor/mask)"

#: SwAV normalises with std 0.228 for R (docs/checkpoint_formats.md §3).
SWAV_PIXEL = dict(PIXEL_CONVENTION, std=[0.228, 0.224, 0.225])


@dataclass(frozen=True)
class Rule:
    """One row of a key table.

    Attributes:
        prefix: matched against the key (``""`` matches everything, so it goes last).
        keep: canonical prefix that replaces ``prefix`` when the key is kept; None = drop.
        reason: reason category when dropped.
        rename: maps the remainder after ``prefix`` (keep rules only); may raise ValueError,
            which makes the key unexplained.
    """
    prefix: str
    keep: str | None = None
    reason: str = ""
    rename: Callable[[str], str] | None = None


@dataclass
class Layout:
    """How to read one checkpoint layout.

    Attributes:
        source: the ``--from`` name.
        description: what was recognised (printed).
        container: top-level entry holding the state dict, None for a flat state dict.
        rules: ordered key table.
        parts: parts this source provides (``backbone``, ``fpn``, ``box_head``, ``res5``).
        pixel: pixel convention the weights expect.
        arch: backbone architecture when the file names it, else None (inferred from shapes).
        aliases: (dropped prefix, kept prefix) pairs whose tensors must be equal.
        notes: extra lines for the report.
        top_level: reasons for dropping other top-level entries that hold weights.
    """
    source: str
    description: str
    container: str | None
    rules: list[Rule]
    parts: tuple[str, ...] = ("backbone",)
    pixel: dict = field(default_factory=lambda: dict(PIXEL_CONVENTION))
    arch: str | None = None
    aliases: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    top_level: dict[str, str] = field(default_factory=dict)


def _branches(target: bool, online: str, momentum: str) -> tuple[str, str, str]:
    """(exported prefix, other prefix, reason for the other) for --target-network."""
    if target:
        return momentum, online, ONLINE
    return online, momentum, MOMENTUM


# --------------------------------------------------------------------------- our pretraining
def soco_layout(obj: dict, target: bool) -> Layout:
    """``format: soco-pretrain`` checkpoints (SoCo_FPN, SoCo_FPN_Star, SoCo_C4, BYOL)."""
    arch = obj.get("arch")
    if obj.get("version") != 1:
        raise ValueError(f"unsupported soco-pretrain version {obj.get('version')!r} (this toolkit reads 1)")
    on, off, off_reason = _branches(target, "online_", "target_")
    rules = [Rule(on + "backbone.body.", BODY)]
    if arch in ("SoCo_FPN", "SoCo_FPN_Star"):
        rules += [Rule(on + "backbone.fpn.", FPN), Rule(on + "box_head.", HEAD)]
        parts = ("backbone", "fpn", "box_head")
    elif arch == "SoCo_C4":
        rules += [Rule(on + "box_head.res5.", LAYER4)]
        parts = ("backbone", "res5")
    elif arch == "BYOL":
        parts = ("backbone",)
    else:
        raise ValueError(f"unknown soco-pretrain arch {arch!r} (expected SoCo_FPN, SoCo_FPN_Star, "
                         "SoCo_C4 or BYOL)")
    rules += [Rule(on + "projector.", reason=PROJECTOR), Rule(on + "predictor.", reason=PREDICTOR),
              Rule(off, reason=off_reason), Rule("queue", reason=QUEUE)]
    backbone = obj.get("backbone") or None
    branch = "target (EMA)" if target else "online"
    return Layout("soco", f"SoCo pretraining checkpoint, arch {arch}, backbone {backbone}, "
                  f"epoch {obj.get('epoch')}, {branch} network", "model", rules, parts,
                  pixel=dict(obj.get("pixel") or PIXEL_CONVENTION), arch=backbone)


# --------------------------------------------------------------------------- third-party SSL
def moco_layout(obj: dict, target: bool) -> Layout:
    """MoCo v1/v2 (``encoder_q`` / ``encoder_k`` / ``queue``), DDP or not."""
    on, off, off_reason = _branches(target, "encoder_q.", "encoder_k.")
    rules = [Rule(on + "fc.", reason=PROJECTOR), Rule(on, BODY), Rule(off, reason=off_reason),
             Rule("queue", reason=QUEUE)]
    return Layout("moco", "MoCo v1/v2 checkpoint (encoder_q/encoder_k/queue)", _container(obj), rules)


def mocov3_layout(obj: dict, target: bool) -> Layout:
    """MoCo v3 ResNet (``base_encoder`` / ``momentum_encoder`` / ``predictor``)."""
    on, off, off_reason = _branches(target, "base_encoder.", "momentum_encoder.")
    rules = [Rule(on + "fc.", reason=PROJECTOR), Rule(on, BODY), Rule(off, reason=off_reason),
             Rule("predictor.", reason=PREDICTOR)]
    return Layout("mocov3", "MoCo v3 ResNet checkpoint (base_encoder/momentum_encoder)",
                  _container(obj), rules)


def swav_layout(obj: dict, target: bool) -> Layout:
    """SwAV / DeepCluster-v2 / SeLa-v2 (flat or ``state_dict``; projection head + prototypes)."""
    _no_target(target, "swav")
    rules = [Rule("projection_head.", reason=PROJECTOR), Rule("prototypes", reason=PROTOTYPES),
             Rule("fc.", reason=FC), Rule("", BODY)]
    return Layout("swav", "SwAV-style checkpoint (backbone + projection_head + prototypes)",
                  _container(obj), rules, pixel=dict(SWAV_PIXEL),
                  notes=["SwAV normalised with std [0.228, 0.224, 0.225] (recorded in pixel)"])


def densecl_layout(obj: dict, target: bool) -> Layout:
    """DenseCL / OpenSelfSup: released backbone-only file or the mmcv training checkpoint."""
    sd = strip_wrapper(_inner(obj))[0]
    if not any(k.startswith(("encoder_q.", "backbone.")) for k in sd):
        _no_target(target, "densecl (backbone-only release)")
        return Layout("densecl", "DenseCL released backbone (state_dict + author)", _container(obj),
                      [Rule("fc.", reason=FC), Rule("", BODY)])
    if target:
        rules = [Rule("encoder_k.0.", BODY), Rule("encoder_k.1.", reason=PROJECTOR),
                 Rule("encoder_q.", reason=ONLINE), Rule("backbone.", reason=ONLINE)]
        aliases = []
    else:
        rules = [Rule("backbone.", BODY), Rule("encoder_q.0.", reason=DUPLICATE),
                 Rule("encoder_q.1.", reason=PROJECTOR), Rule("encoder_k.", reason=MOMENTUM)]
        aliases = [("encoder_q.0.", "backbone.")]
    rules += [Rule("queue", reason=QUEUE), Rule("head.", reason=PROJECTOR)]
    return Layout("densecl", "DenseCL/OpenSelfSup training checkpoint (encoder_q.0 = backbone)",
                  _container(obj), rules, aliases=aliases)


def pycontrast_layout(obj: dict, target: bool) -> Layout:
    """PyContrast (InsDis, PIRL, MoCo, InfoMin): ``model`` (DDP) and optional ``model_ema``."""
    if target and "model_ema" not in obj:
        raise ValueError("--target-network: this PyContrast checkpoint has no model_ema")
    rules = [Rule("encoder.fc.", reason=FC), Rule("encoder.", BODY),
             Rule("head_jig.", reason=PROJECTOR + " (jigsaw)"), Rule("head.", reason=PROJECTOR)]
    container = "model_ema" if target else "model"
    return Layout("pycontrast", f"PyContrast checkpoint ({container}: encoder + head)", container, rules,
                  top_level={"model": ONLINE} if target else {})


def byol_layout(obj: dict, target: bool) -> Layout:
    """Generic BYOL-style online/target checkpoints (OpenSelfSup, solo-learn, sthalles, ...)."""
    if "online_network_state_dict" in obj:  # sthalles/PyTorch-BYOL: positional encoder names
        container = "target_network_state_dict" if target else "online_network_state_dict"
        rules = [Rule("encoder.", BODY, rename=_positional_resnet),
                 Rule("projetion.", reason=PROJECTOR), Rule("projection.", reason=PROJECTOR)]
        return Layout("byol", f"PyTorch-BYOL checkpoint ({container}, positional encoder names)",
                      container, rules)
    keys = strip_wrapper(_inner(obj))[0].keys()
    if any(k.startswith("online_net.") for k in keys):  # OpenSelfSup BYOL
        on, off, off_reason = _branches(target, "online_net.", "target_net.")
        rules = [Rule(on + "0.", BODY), Rule(on + "1.", reason=PROJECTOR), Rule(off, reason=off_reason),
                 Rule("backbone.", reason=ONLINE if target else DUPLICATE), Rule("head.", reason=PREDICTOR)]
        aliases = [] if target else [("backbone.", "online_net.0.")]
        return Layout("byol", "OpenSelfSup BYOL checkpoint (online_net/target_net)", _container(obj),
                      rules, aliases=aliases)
    if any(k.startswith("online_network.") for k in keys):
        on, off, off_reason = _branches(target, "online_network.", "target_network.")
        rules = [Rule(on + "encoder.fc.", reason=FC), Rule(on + "encoder.", BODY),
                 Rule(on + "predictor.", reason=PREDICTOR), Rule(on, reason=PROJECTOR),
                 Rule(off, reason=off_reason), Rule("predictor.", reason=PREDICTOR)]
        return Layout("byol", "BYOL checkpoint (online_network.encoder/target_network)",
                      _container(obj), rules)
    if any(k.startswith("online_encoder.") for k in keys):
        on, off, off_reason = _branches(target, "online_encoder.", "target_encoder.")
        rules = [Rule(on + "fc.", reason=FC), Rule(on, BODY), Rule(off, reason=off_reason),
                 Rule("online_projector.", reason=PROJECTOR),
                 Rule("target_projector.", reason=MOMENTUM), Rule("online_predictor.", reason=PREDICTOR),
                 Rule("predictor.", reason=PREDICTOR)]
        return Layout("byol", "BYOL checkpoint (online_encoder/target_encoder)", _container(obj), rules)
    # solo-learn: backbone / momentum_backbone / projector / momentum_projector / predictor.
    on, off, off_reason = _branches(target, "backbone.", "momentum_backbone.")
    rules = [Rule(on + "fc.", reason=FC), Rule(on, BODY), Rule(off, reason=off_reason),
             Rule("momentum_projector.", reason=MOMENTUM), Rule("projector.", reason=PROJECTOR),
             Rule("predictor.", reason=PREDICTOR), Rule("classifier.", reason=FC)]
    return Layout("byol", "solo-learn BYOL checkpoint (backbone/momentum_backbone)", _container(obj), rules)


def torchvision_layout(obj: dict, target: bool, source: str = "torchvision") -> Layout:
    """torchvision / timm ResNet classification state dicts (timm: also ``state_dict(_ema)``)."""
    container = _container(obj)
    if source == "timm" and target:
        if "state_dict_ema" not in obj:
            raise ValueError("--target-network: this timm checkpoint has no state_dict_ema")
        container = "state_dict_ema"
    elif target:
        _no_target(target, source)
    return Layout(source, f"{source} ResNet state dict" + (f" ({container})" if container else ""),
                  container, [Rule("fc.", reason=FC), Rule("", BODY)],
                  top_level={"state_dict": ONLINE} if container == "state_dict_ema" else {})


# --------------------------------------------------------------------------- helpers
_POSITIONAL = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def _positional_resnet(rest: str) -> str:
    """``Sequential(*resnet.children())[:-1]`` names (``4.0.conv1.weight``) → torchvision names."""
    idx, _, tail = rest.partition(".")
    if idx not in _POSITIONAL:
        raise ValueError(f"positional index {idx} is not a ResNet module with weights")
    return f"{_POSITIONAL[idx]}.{tail}"


WRAPPERS = ("module.", "_orig_mod.")


def strip_wrapper(sd: dict) -> tuple[dict, str]:
    """Remove DDP / torch.compile prefixes carried by every key.

    Returns:
        (the dict with stripped keys, the removed prefix — ``""`` when none).
    """
    removed = ""
    stripped = True
    while sd and stripped:
        stripped = False
        for w in WRAPPERS:
            if all(isinstance(k, str) and k.startswith(w) for k in sd):
                sd = {k[len(w):]: v for k, v in sd.items()}
                removed += w
                stripped = True
                break
    return sd, removed


def _no_target(target: bool, source: str) -> None:
    if target:
        raise ValueError(f"--target-network: a {source} checkpoint has no target/momentum network")


def _container(obj: dict) -> str | None:
    for name in ("state_dict", "model"):
        if isinstance(obj.get(name), dict):
            return name
    return None


def _inner(obj: dict) -> dict:
    name = _container(obj)
    return obj[name] if name else obj


LAYOUTS: dict[str, Callable[..., Layout]] = {
    "soco": soco_layout, "moco": moco_layout, "mocov3": mocov3_layout, "swav": swav_layout,
    "densecl": densecl_layout, "pycontrast": pycontrast_layout, "byol": byol_layout,
    "torchvision": torchvision_layout,
    "timm": lambda obj, target: torchvision_layout(obj, target, "timm"),
}
