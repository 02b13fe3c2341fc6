"""The configuration of SoCo / BYOL pretraining: one validated dataclass per component.

Sections (each a :class:`socokit.config.Section`; field name = recipe key = ``--flag``):

* :class:`PretrainDataConfig` -- views, proposal selection, augmentation, loading;
* :class:`PretrainModelConfig` -- method (arch), backbone, head widths, head execution;
* :class:`PretrainOptimConfig` -- optimiser and schedules;
* :class:`PretrainRunConfig` -- inputs, outputs, device, precision, checkpoints, logging.

:class:`PretrainConfig` groups them for ``pretrain/train.py``. Defaults are the published
ImageNet runs (the original ``tools/SoCo_*.sh`` scripts; see docs/pretrain.md), except
``head_mode: batched``, which computes the same result as the original's per-call head
(docs/pretrain_models.md) faster.
"""
from __future__ import annotations

from dataclasses import dataclass

from pretrain.topology import TOPOLOGIES
from socokit.config import (AMP_MODES, Config, Section, check_device, dist_timeout_option, keep_every_option,
                            keep_last_option, option, save_on_signal_option, section)
from socokit.retention import DEFAULTS as RETENTION_DEFAULTS
from socokit.errors import ConfigError

ARCHS = tuple(TOPOLOGIES)
AUGS = ("ImageAsymBboxAwareMultiJitter1", "ImageAsymBboxAwareMultiJitter1Cutout",
        "ImageAsymBboxAwareMulti3ResizeExtraJitter1", "ImageAsymBboxCutout", "BYOL")
#: The aug of the released scripts for each arch (FPN: the 400-epoch recipe).
DEFAULT_AUG = {"SoCo_FPN": "ImageAsymBboxAwareMultiJitter1",
               "SoCo_FPN_Star": "ImageAsymBboxAwareMulti3ResizeExtraJitter1",
               "SoCo_C4": "ImageAsymBboxCutout", "BYOL": "BYOL"}
#: aug -> (layout, views that get the in-box cutout)
AUG_LAYOUT = {"ImageAsymBboxAwareMultiJitter1": ("fpn", ()),
              "ImageAsymBboxAwareMultiJitter1Cutout": ("fpn", (1, 2)),
              "ImageAsymBboxAwareMulti3ResizeExtraJitter1": ("fpn_star", ()),
              "ImageAsymBboxCutout": ("c4", (1,)),
              "BYOL": ("byol", ())}
ARCH_LAYOUT = {arch: t.layout for arch, t in TOPOLOGIES.items()}
#: How the RoI heads and MLPs run (see docs/pretrain_models.md): one call per network with
#: per-group BatchNorm statistics, or one call per (view, box set, level) as the original.
HEAD_MODES = ("batched", "faithful")
#: FPN RoI pooling: every box at every level (original) or only at its assigned levels.
ROI_LEVEL_MODES = ("all", "assigned")
OPTIMIZERS = ("lars", "sgd")


def check_warmup_epochs(optim) -> None:
    """``warmup_epoch <= epochs`` of an optimisation section, else :class:`ConfigError`."""
    if optim.warmup_epoch > optim.epochs:
        raise ConfigError(f"warmup_epoch: {optim.warmup_epoch} is longer than the {optim.epochs} epochs",
                          "warmup_epoch", optim.warmup_epoch)


@dataclass
class PretrainDataConfig(Section):
    """Views, proposal selection, augmentation and loading (``build_pretrain_dataset``)."""

    aug: str | None = option(None, "view pipeline (original names); default: the one the arch's released "
                             "script used", choices=AUGS)
    image_size: int = option(224, "V1/V2 size (V3 = half of it for FPN)", ge=1)
    image3_size: int | None = option(None, "V3 size of SoCo_FPN_Star (192)", ge=1)
    image4_size: int = option(112, "V4 size of SoCo_FPN_Star", ge=1)
    crop: float = option(0.5, "min area fraction of the random crops (0.5 FPN, 0.6 C4)", gt=0.0, le=1.0)
    select_k: int = option(4, "proposals drawn per image (K)", ge=1)
    padding_k: int = option(4, "box rows per view after padding (L)", ge=1)
    max_tries: int = option(5, "crop re-draws when too few proposals overlap", ge=1)
    jitter_prob: float = option(0.5, "probability of jittering a V1 box", ge=0.0, le=1.0)
    jitter_ratio: float = option(0.1, "box jitter amplitude (fraction of w/h)", ge=0.0)
    cutout_prob: float = option(0.5, "per-box cutout probability (…Cutout augs)", ge=0.0, le=1.0)
    cutout_ratio_min: float = option(0.1, "min cutout area / box area", ge=0.0, le=1.0)
    cutout_ratio_max: float = option(0.3, "max cutout area / box area", ge=0.0, le=1.0)
    aware_range: tuple[int, ...] = option((48, 96, 192, 224, 0), "box-size thresholds (pixels) of the FPN "
                                          "levels P2..P5 (a list)", ge=0)
    aware_start: int = option(0, "first FPN level used", ge=0)
    aware_end: int = option(4, "one past the last FPN level used", ge=1)
    max_replace_tries: int = option(10, "how many other images to try when an image cannot be read", ge=1)
    max_bad_fraction: float = option(0.01, "stop when more than this fraction of an epoch's images was "
                                     "unreadable", ge=0.0, le=1.0)
    num_workers: int = option(4, "DataLoader workers per process", ge=0)
    colour_on_device: bool = option(False, "loader workers only decode, crop, resize and flip; the colour "
                                    "augmentations (drawn per sample on the CPU) run on the batch on the device",
                                    negatable=False)

    def check(self) -> None:
        if self.select_k > self.padding_k:
            raise ConfigError(f"select_k: {self.select_k} is larger than padding_k {self.padding_k}; "
                              "need select_k <= padding_k", "select_k", self.select_k)
        if self.cutout_ratio_min > self.cutout_ratio_max:
            raise ConfigError(f"cutout_ratio_min: {self.cutout_ratio_min} is larger than cutout_ratio_max "
                              f"{self.cutout_ratio_max}", "cutout_ratio_min", self.cutout_ratio_min)
        if not self.aware_start < self.aware_end <= len(self.aware_range):
            raise ConfigError(f"aware_end: {self.aware_end} does not fit aware_start {self.aware_start} and "
                              f"the {len(self.aware_range)} aware_range entries; need aware_start < aware_end "
                              "<= len(aware_range)", "aware_end", self.aware_end)

    def aug_for(self, arch: str) -> str:
        """The view pipeline of ``arch``: ``aug`` when set (it must fit), else the released one.

        Raises:
            ConfigError: ``arch`` is unknown, ``aug`` belongs to another layout, or
                ``colour_on_device`` with a cutout aug.
        """
        if arch not in ARCHS:
            raise ConfigError(f"arch: {arch!r} is not allowed; choose from {', '.join(ARCHS)}", "arch", arch)
        aug = DEFAULT_AUG[arch] if self.aug is None else self.aug
        if AUG_LAYOUT[aug][0] != ARCH_LAYOUT[arch]:
            ok = [a for a in AUGS if AUG_LAYOUT[a][0] == ARCH_LAYOUT[arch]]
            raise ConfigError(f"aug: {aug!r} does not fit arch {arch!r}; choose from {', '.join(ok)}", "aug", aug)
        if self.colour_on_device and AUG_LAYOUT[aug][1]:
            raise ConfigError(f"colour_on_device: not with the cutout aug {aug!r} (the cutout is drawn after the "
                              "colour and applied to the normalised view)", "colour_on_device", True)
        return aug


@dataclass
class PretrainModelConfig(Section):
    """The pretraining model (``pretrain.models.build_model``)."""

    arch: str = option("SoCo_FPN", "pretraining method", choices=ARCHS)
    backbone: str = option("resnet50", "torchvision ResNet name or timm:<name> (e.g. timm:resnet18 for CPU "
                           "demos)")
    head_mode: str = option("batched", "batched: one head/MLP call per network with per-group BN statistics "
                            "(same result, faster); faithful: one call per (view, box set, level) as the "
                            "original", choices=HEAD_MODES)
    roi_levels: str = option("all", "FPN only. all: pool every box at every level and mask (original); "
                             "assigned: pool only matched levels (about 4x less head work, changes BN stats)",
                             choices=ROI_LEVEL_MODES)
    fpn_channels: int = option(256, "FPN only: FPN width", ge=1)
    conv_dim: int = option(256, "FPN only: box-head conv width", ge=1)
    fc_dim: int = option(1024, "FPN only: box-head fc width", ge=1)
    mlp_hidden_dim: int = option(4096, "projector/predictor hidden width", ge=1)
    out_dim: int = option(256, "projector/predictor output width", ge=1)
    sync_bn: bool = option(True, "SyncBatchNorm across processes on CUDA (the original); ignored on CPU")

    def check(self) -> None:
        if self.roi_levels != "all" and not self.arch.startswith("SoCo_FPN"):
            raise ConfigError(f"roi_levels: {self.roi_levels!r} applies to SoCo_FPN / SoCo_FPN_Star only, "
                              f"not {self.arch}; use all", "roi_levels", self.roi_levels)

    def model_kwargs(self) -> dict:
        """Keyword arguments of ``pretrain.models.build_model`` (the widths that apply to ``arch``)."""
        kwargs = {"backbone": self.backbone, "head_mode": self.head_mode, "roi_levels": self.roi_levels,
                  "mlp_hidden_dim": self.mlp_hidden_dim, "out_dim": self.out_dim}
        if self.arch.startswith("SoCo_FPN"):
            kwargs.update(fpn_channels=self.fpn_channels, conv_dim=self.conv_dim, fc_dim=self.fc_dim)
        return kwargs


@dataclass
class PretrainOptimConfig(Section):
    """Optimiser, learning-rate and EMA-momentum schedules."""

    optimizer: str = option("lars", "LARS (original) or SGD", choices=OPTIMIZERS)
    base_lr: float = option(1.0, "LR for a total batch of 256; the peak LR is base_lr * batch_size * "
                            "world_size / 256. Lower it if the loss diverges", gt=0.0)
    batch_size: int = option(128, "images per process per iteration", ge=1)
    epochs: int = option(100, "training epochs", ge=1)
    warmup_epoch: int = option(10, "linear warmup epochs", ge=0)
    warmup_multiplier: float = option(100.0, "warmup starts at peak_lr / warmup_multiplier", ge=1.0)
    eta_min: float = option(1e-6, "final LR of the cosine", ge=0.0)
    weight_decay: float = option(1e-5, "decay of conv/linear weights", ge=0.0)
    momentum: float = option(0.9, "SGD momentum", ge=0.0, lt=1.0)
    trust_coef: float = option(1e-3, "LARS trust coefficient eta", gt=0.0)
    lars_eps: float = option(1e-8, "LARS epsilon", ge=0.0)
    contrast_momentum: float = option(0.99, "initial EMA momentum tau0 of the target (cosine to 1)",
                                      ge=0.0, le=1.0)

    def check(self) -> None:
        check_warmup_epochs(self)


@dataclass
class PretrainRunConfig(Section):
    """Inputs, outputs, device, precision, checkpoints and logging."""

    data: str | None = option(None, "image root the proposal store's relative paths refer to (e.g. "
                              "ImageNet train/)")
    proposals: str | None = option(None, "proposal store folder NAME.proposals/ made by selective_search/"
                                   "generate_proposals.py + filter_proposals.py --post")
    output_dir: str = option("output/pretrain", "checkpoints, logs, TensorBoard")
    device: str = option("auto", "auto, cpu, cuda or cuda:N", validate=check_device)
    amp: str = option("auto", "mixed precision; auto = bf16 on CUDA if supported (else fp16), none on CPU",
                      choices=AMP_MODES)
    channels_last: bool = option(False, "channels-last memory format (faster convs on recent GPUs)")
    seed: int = option(0, "base seed (rank r uses seed + r)", ge=0)
    auto_resume: bool = option(True, "continue from OUTPUT_DIR/current.pth if present")
    resume: str | None = option(None, "continue from this checkpoint instead")
    save_freq: int = option(1, "checkpoint every N epochs (and at the end)", ge=1)
    save_every_iters: int = option(0, "also checkpoint every N iterations inside an epoch (0: off)", ge=0)
    keep_last: int = keep_last_option(RETENTION_DEFAULTS["epochs"][0])
    keep_every: int = keep_every_option(RETENTION_DEFAULTS["epochs"][1], "epoch")
    dist_timeout: float | None = dist_timeout_option()
    save_on_signal: bool = save_on_signal_option()
    stop_at_step: int = option(0, "stop with a checkpoint after this many iterations; the schedule is "
                               "unchanged, so a later --auto-resume run continues (0: run to the end)", ge=0)
    print_freq: int = option(100, "log every N iterations", ge=1)
    tensorboard: bool = option(True, "write TensorBoard scalars to OUTPUT_DIR/tb")


@dataclass
class PretrainConfig(Config):
    """Everything ``pretrain/train.py`` runs on."""

    description = "SoCo / BYOL pretraining (torchrun or plain python). See docs/pretrain.md."
    data: PretrainDataConfig = section(PretrainDataConfig, "data")
    model: PretrainModelConfig = section(PretrainModelConfig, "model")
    optim: PretrainOptimConfig = section(PretrainOptimConfig, "optimisation")
    run: PretrainRunConfig = section(PretrainRunConfig, "runtime")

    def check(self) -> None:
        self.data.aug_for(self.model.arch)


@dataclass
class LinearDataConfig(Section):
    """The labelled image folder and its two pipelines (train: random crop + flip; val: centre crop)."""

    data: str | None = option(None, "folder with train/<class>/ and val/<class>/ images (required)")
    image_size: int = option(224, "train crop and val centre crop size", ge=1)
    val_resize: int = option(256, "val: shorter side resized to this", ge=1)
    crop_scale_min: float = option(0.08, "RandomResizedCrop min area", gt=0.0, le=1.0)
    num_workers: int = option(8, "DataLoader workers per process", ge=0)


@dataclass
class LinearOptimConfig(Section):
    """SGD on the linear layer (the original protocol: lr 30 per 256 images, 100 epochs)."""

    epochs: int = option(100, "training epochs", ge=1)
    warmup_epoch: int = option(5, "linear warmup epochs", ge=0)
    warmup_multiplier: float = option(100.0, "warmup starts at lr / this", ge=1.0)
    base_lr: float = option(30.0, "LR per 256 images (scaled linearly)", gt=0.0)
    eta_min: float = option(1e-6, "final LR of the cosine", ge=0.0)
    momentum: float = option(0.9, "SGD momentum", ge=0.0, lt=1.0)
    weight_decay: float = option(0.0, "weight decay of the linear layer", ge=0.0)
    batch_size: int = option(32, "images per process (8 x 32 = 256)", ge=1)

    def check(self) -> None:
        check_warmup_epochs(self)


@dataclass
class LinearRunConfig(Section):
    """The checkpoint to evaluate, outputs, device and precision."""

    pretrained: str | None = option(None, "soco-pretrain checkpoint (its online backbone; required)")
    output_dir: str = option("output/linear", "checkpoints, metrics.json, logs")
    bn_train: bool = option(False, "keep the frozen backbone's BN in train mode (the original's behaviour: "
                            "batch statistics, running stats drift)", negatable=False)
    amp: str = option("auto", "autocast for the frozen backbone; auto = bf16 on CUDA, none on CPU",
                      choices=AMP_MODES)
    device: str = option("auto", "auto, cpu, cuda or cuda:N", validate=check_device)
    seed: int = option(0, "base seed (rank r uses seed + r)", ge=0)
    auto_resume: bool = option(True, "continue from OUTPUT_DIR/current.pth if present")
    save_freq: int = option(10, "checkpoint every N epochs (and at the end)", ge=1)
    keep_last: int = keep_last_option(RETENTION_DEFAULTS["epochs"][0])
    keep_every: int = keep_every_option(RETENTION_DEFAULTS["epochs"][1], "epoch")
    dist_timeout: float | None = dist_timeout_option()
    print_freq: int = option(100, "log every N iterations", ge=1)


@dataclass
class LinearEvalConfig(Config):
    """Everything ``pretrain/linear_eval.py`` runs on."""

    description = "Linear evaluation of a soco-pretrain checkpoint. See docs/pretrain.md."
    data: LinearDataConfig = section(LinearDataConfig, "data")
    optim: LinearOptimConfig = section(LinearOptimConfig, "optimisation")
    run: LinearRunConfig = section(LinearRunConfig, "runtime")
