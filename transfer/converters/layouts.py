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

SOURCES = ("soco", "byol", "moco", "mocov3", "swav", "densecl", "pycontrast", "mmselfsup", "sololearn",
           "dino", "vissl", "caffe2", "torchvision", "timm", "detinit", "detectron2", "mmdet")

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
PREPROCESSOR = "input normalisation buffers (recorded in pixel)"
OPTIMIZER = "optimizer state"
TRAINING = "training state"

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
        container: top-level entry holding the state dict (a tuple for a nested path such as
            VISSL's), None for a flat state dict.
        rules: ordered key table.
        parts: parts this source provides (``backbone``, ``fpn``, ``box_head``, ``res5``).
        pixel: pixel convention the weights expect.
        arch: backbone architecture when the file names it, else None (inferred from shapes).
        aliases: (dropped prefix, kept prefix) pairs whose tensors must be equal.
        notes: extra lines for the report.
        top_level: reasons for dropping other top-level entries that hold weights.
        drop_suffixes: (suffix, reason) pairs dropping keys by their end (Caffe2 ``*_momentum``).
        finish: called with (tensors, origin) after the key table, to add tensors the format
            implies but does not store (Caffe2 BN running statistics).
        extra_meta: recorded in the output's meta (e.g. ``stride_in_1x1``).
    """
    source: str
    description: str
    container: str | tuple[str, ...] | None
    rules: list[Rule]
    parts: tuple[str, ...] = ("backbone",)
    pixel: dict = field(default_factory=lambda: dict(PIXEL_CONVENTION))
    arch: str | None = None
    aliases: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    top_level: dict[str, str] = field(default_factory=dict)
    drop_suffixes: list[tuple[str, str]] = field(default_factory=list)
    finish: Callable[[dict, dict], None] | None = None
    extra_meta: dict = field(default_factory=dict)


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


# --------------------------------------------------------------------------- more third-party formats
#: mmselfsup / mmpretrain 1.x momentum copies (``ExponentialMovingAverage`` wraps ``module``).
_MM_MOMENTUM = ("target_net.", "encoder_k.", "momentum_encoder.", "teacher.")


def mmselfsup_layout(obj: dict, target: bool) -> Layout:
    """mmselfsup 1.x / mmpretrain (mmengine ``{meta, state_dict, ...}``): ``backbone.*`` + heads.

    Algorithms keep the online backbone at ``backbone.*`` (torchvision ResNet names), the
    projector at ``neck.*``, predictors / prototypes at ``head.*``, and the momentum network as
    an ``ExponentialMovingAverage`` (``target_net.module.0.*`` for BYOL, ``encoder_k.module.0.*``
    for MoCo v2 and DenseCL, ``momentum_encoder.module.0.*`` for MoCo v3), with a ``steps``
    counter. 1.0 release candidates stored MoCo as ``encoder_q.0`` (= ``backbone``) / ``encoder_k.0``.
    See docs/convert.md.
    """
    keys = strip_wrapper(_inner(obj))[0].keys()
    momentum = [p for p in _MM_MOMENTUM if any(k.startswith(p) for k in keys)]
    if target:
        if not momentum:
            raise ValueError("--target-network: this mmselfsup/mmpretrain checkpoint has no momentum encoder")
        pre = momentum[0]
        body = pre + "module.0." if any(k.startswith(pre + "module.0.") for k in keys) else pre + "0."
        rules = [Rule(body, BODY), Rule(pre, reason=PROJECTOR + " / EMA counter"),
                 Rule("backbone.", reason=ONLINE), Rule("encoder_q.", reason=ONLINE)]
    else:
        rules = [Rule("backbone.fc.", reason=FC), Rule("backbone.", BODY),
                 Rule("encoder_q.0.", reason=DUPLICATE), Rule("encoder_q.", reason=PROJECTOR)]
        rules += [Rule(p, reason=MOMENTUM) for p in momentum]
    rules += [Rule("neck.", reason=PROJECTOR), Rule("head.", reason=PREDICTOR + " / head"),
              Rule("queue", reason=QUEUE), Rule("data_preprocessor.", reason=PREPROCESSOR)]
    aliases = [] if target else [("encoder_q.0.", "backbone.")]
    return Layout("mmselfsup", "mmselfsup 1.x / mmpretrain checkpoint (backbone/neck/head"
                  + (f", momentum {momentum[0].rstrip('.')}" if momentum else "") + ")",
                  _container(obj), rules, aliases=aliases,
                  top_level={"message_hub": TRAINING, "param_schedulers": TRAINING,
                             "ema_state_dict": MOMENTUM})


def sololearn_layout(obj: dict, target: bool) -> Layout:
    """solo-learn (PyTorch Lightning): ``state_dict`` with ``backbone.*`` (early versions
    ``encoder.*``), ``classifier.*`` and the method's heads; momentum methods add
    ``momentum_backbone.*`` and ``momentum_*`` heads. See docs/convert.md.
    """
    keys = strip_wrapper(_inner(obj))[0].keys()
    on = "encoder." if any(k.startswith("encoder.") for k in keys) else "backbone."
    off = "momentum_encoder." if on == "encoder." else "momentum_backbone."
    if target and not any(k.startswith(off) for k in keys):
        raise ValueError("--target-network: this solo-learn checkpoint has no momentum backbone "
                         "(only BYOL, MoCo, DINO, ... keep one)")
    keep, other, other_reason = _branches(target, on, off)
    rules = [Rule(keep + "fc.", reason=FC), Rule(keep, BODY), Rule(other, reason=other_reason),
             Rule("momentum_classifier.", reason=FC), Rule("classifier.", reason=FC),
             Rule("momentum_projector.", reason=MOMENTUM), Rule("projector.", reason=PROJECTOR),
             Rule("predictor.", reason=PREDICTOR), Rule("momentum_prototypes", reason=MOMENTUM),
             Rule("prototypes", reason=PROTOTYPES), Rule("momentum_head.", reason=MOMENTUM),
             Rule("head.", reason=PROJECTOR), Rule("queue", reason=QUEUE),
             Rule("local_memory", reason=QUEUE)]
    return Layout("sololearn", f"solo-learn checkpoint ({on.rstrip('.')}"
                  + (f" / {off.rstrip('.')})" if any(k.startswith(off) for k in keys) else ")"),
                  _container(obj), rules)


def dino_layout(obj: dict, target: bool) -> Layout:
    """DINO full checkpoint: ``student`` / ``teacher`` (``module.backbone.*``, ``module.head.*``).

    The online network is the student; ``--target-network`` exports the teacher, which is
    what DINO's own evaluation and its backbone-only release use.
    """
    container, other = ("teacher", "student") if target else ("student", "teacher")
    if not isinstance(obj.get(container), dict):
        raise ValueError(f"DINO checkpoint without a {container!r} dict")
    rules = [Rule("backbone.fc.", reason=FC), Rule("backbone.", BODY), Rule("head.", reason=PROJECTOR)]
    notes = [] if target else ["DINO evaluates the teacher (its backbone-only release is the teacher); "
                               "pass --target-network to export it"]
    return Layout("dino", f"DINO full checkpoint ({container}: backbone + DINO head)", container, rules,
                  top_level={other: ONLINE if target else MOMENTUM, "dino_loss": TRAINING}, notes=notes)


VISSL_TRUNK = ("classy_state_dict", "base_model", "model", "trunk")


def vissl_layout(obj: dict, target: bool) -> Layout:
    """VISSL: the trunk at ``classy_state_dict.base_model.model.trunk`` (``_feature_blocks.*``)."""
    _no_target(target, "vissl")
    return Layout("vissl", "VISSL checkpoint (classy_state_dict → base_model → model → trunk)",
                  VISSL_TRUNK, [Rule("_feature_blocks.fc.", reason=FC), Rule("_feature_blocks.", BODY)],
                  top_level={"heads": PROJECTOR, "loss": QUEUE + " / loss state", "meters": TRAINING})


#: Caffe2 / Detectron MSRA ResNet input: BGR, 0-255, mean subtracted, no std division.
CAFFE2_PIXEL = {"channels": "BGR", "range": 255.0, "mean": [103.530, 116.280, 123.675], "std": [1.0, 1.0, 1.0]}
_C2_BLOCK = {"2a": ("conv1", "bn1"), "2b": ("conv2", "bn2"), "2c": ("conv3", "bn3"),
             "1": ("downsample.0", "downsample.1")}


def caffe2_name(blob: str) -> str:
    """Caffe2 MSRA ResNet blob name → torchvision ResNet name (``res2_0_branch2a_w`` → ``layer1.0.conv1.weight``).

    Raises:
        ValueError: not a ResNet blob name.
    """
    import re

    if blob == "conv1_w":
        return "conv1.weight"
    m = re.match(r"^res_conv1_bn_([sb])$", blob)
    if m:
        return "bn1." + ("weight" if m[1] == "s" else "bias")
    m = re.match(r"^res(\d)_(\d+)_branch(2[abc]|1)_(w|bn_s|bn_b)$", blob)
    if not m:
        raise ValueError(f"{blob!r} is not a Caffe2 ResNet blob")
    conv, bn = _C2_BLOCK[m[3]]
    prefix = f"layer{int(m[1]) - 1}.{m[2]}."
    return prefix + {"w": conv + ".weight", "bn_s": bn + ".weight", "bn_b": bn + ".bias"}[m[4]]


def _caffe2_bn_statistics(tensors: dict, origin: dict) -> None:
    """Caffe2's frozen BN is an affine ``s * x + b``: add running_mean 0, running_var 1 - eps.

    With eps = 1e-5 (torchvision and detectron2 BN), ``(x - 0) / sqrt(1 - eps + eps) * s + b``
    is exactly the affine transform; the counter ``num_batches_tracked`` is 0.
    """
    import torch

    for name in [n for n in tensors if n.endswith(".weight") and (".bn" in n or "downsample.1" in n
                                                                  or n == BODY + "bn1.weight")]:
        base = name[:-len("weight")]
        w = tensors[name]
        for suffix, value in (("running_mean", torch.zeros_like(w)), ("running_var", torch.full_like(w, 1 - 1e-5)),
                              ("num_batches_tracked", torch.tensor(0, dtype=torch.long))):
            tensors[base + suffix] = value
            origin[base + suffix] = origin[name] + f" (implied: {suffix})"


def caffe2_layout(obj: dict, target: bool) -> Layout:
    """Caffe2 / Detectron MSRA ImageNet ResNet (``R-50.pkl``): blob names, BGR input, std 1,
    stride in the first 1x1 convolution of each bottleneck (``stride_in_1x1``). See docs/convert.md.
    """
    _no_target(target, "caffe2")
    return Layout("caffe2", "Caffe2/Detectron MSRA ResNet blobs (BGR, std 1, stride in the 1x1 conv)",
                  "blobs" if isinstance(obj.get("blobs"), dict) else None,
                  [Rule("pred_", reason=FC), Rule("fc1000_", reason=FC),
                   Rule("", BODY, rename=caffe2_name)],
                  pixel=dict(CAFFE2_PIXEL),
                  notes=["BN blobs are frozen affine (scale, bias): running statistics 0 / 1 - eps added",
                         "MSRA ResNets put the stride in the 1x1 conv (stride_in_1x1 recorded; the fine-tuning "
                         "model follows it)"],
                  drop_suffixes=[("_momentum", OPTIMIZER + " (Caffe2 momentum blob)")],
                  finish=_caffe2_bn_statistics, extra_meta={"stride_in_1x1": True})


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
    "torchvision": torchvision_layout, "mmselfsup": mmselfsup_layout, "sololearn": sololearn_layout,
    "dino": dino_layout, "vissl": vissl_layout, "caffe2": caffe2_layout,
    "timm": lambda obj, target: torchvision_layout(obj, target, "timm"),
}
