"""The configuration of detector fine-tuning: one validated dataclass per component.

Sections (each a :class:`socokit.config.Section`; field name = recipe key = ``--flag``):

* :class:`FinetuneDataConfig` -- annotation files, image folders, resizing, sampling;
* :class:`DetectorConfig` -- detector family, backbone, norms, widths, test-time settings;
* :class:`InitConfig` -- the initialisation (detection-init file, supervised weights, scratch);
* :class:`SolverConfig` -- schedule, batch, optimizer;
* :class:`FinetuneRunConfig` -- outputs, device, precision, evaluation, checkpoints, resume.

:class:`FinetuneConfig` groups them for ``transfer/finetune.py``. Defaults are detectron2's
(Mask R-CNN R50-FPN 1x at total batch 16); the recipes in ``transfer/configs`` set the SoCo
values (docs/finetune.md). This module imports no torch, so a bad recipe fails in about a
second.
"""
from __future__ import annotations

from dataclasses import dataclass

from socokit.config import (AMP_MODES, Config, Section, check_device, dist_timeout_option, keep_every_option,
                            keep_last_option, option, save_on_signal_option, section)
from socokit.retention import DEFAULTS as RETENTION_DEFAULTS
from socokit.errors import ConfigError
from transfer.categories import REMAP_CHOICES

#: Detector families of :func:`transfer.models.build_detector`.
DETECTORS = ("maskrcnn_fpn", "fasterrcnn_fpn", "maskrcnn_c4", "fasterrcnn_c4", "retinanet", "fcos", "solov2")
#: How closely the detectors follow detectron2 / AdelaiDet (:mod:`transfer.models.parity`).
PARITY_MODES = ("detectron2", "torchvision")
#: Norm layers and the model parts a norm policy names (:mod:`transfer.models.norms`).
NORMS = ("syncbn", "bn", "frozenbn", "gn", "none")
PARTS = ("backbone", "fpn", "box_head", "mask_head", "head")
#: Parts of a detection-init file (:mod:`transfer.models.init_weights`).
INIT_PARTS = ("backbone", "fpn", "box_head", "res5")
#: Schedule presets at total batch 16: name -> (max_iter, LR steps) (:mod:`transfer.solver`).
SCHEDULES = {"1x": (90_000, (60_000, 80_000)), "2x": (180_000, (120_000, 160_000)),
             "3x": (270_000, (210_000, 250_000)), "6x": (540_000, (480_000, 520_000))}


def parse_norm(spec: str):
    """``'syncbn'`` or ``'backbone=frozenbn,fpn=gn'`` -> the name, or a dict part -> name.

    Raises:
        ConfigError: an unknown norm or part, or a malformed ``part=name`` list.
    """
    if "=" not in spec:
        if spec not in NORMS:
            raise ConfigError(f"norm: {spec!r} is not allowed; choose from {', '.join(NORMS)} or per part "
                              "'part=name,...'", "norm", spec)
        return spec
    out = {}
    for item in spec.split(","):
        part, sep, name = (s.strip() for s in item.partition("="))
        if not sep or part not in PARTS or name not in NORMS:
            raise ConfigError(f"norm: {item.strip()!r} in {spec!r} is not 'part=name' with part in "
                              f"{', '.join(PARTS)} and name in {', '.join(NORMS)}", "norm", spec)
        out[part] = name
    return out


@dataclass
class FinetuneDataConfig(Section):
    """Annotation files, image folders and the training / test resizing."""

    dataset_kind: str = option("coco", "annotation format: COCO (pycocotools) or LVIS v1 (lvis package, "
                               "federated AP)", choices=("coco", "lvis"))
    train_images: str | None = option(None, "folder the training annotation's file names are relative to")
    train_ann: str | None = option(None, "training annotation json (COCO format or LVIS v1)")
    val_images: str | None = option(None, "folder of the evaluation images")
    val_ann: str | None = option(None, "evaluation annotation json")
    remap_categories: str = option("none", "when the categories of the weights (--weights, --resume, a "
                                   "detector --init) or of the val file differ from the dataset's by id or "
                                   "name: refuse (none) or match them by name (by-name)", choices=REMAP_CHOICES)
    filter_empty: bool = option(True, "drop training images without usable annotations (detectron2 default)")
    repeat_threshold: float = option(0.0, "LVIS repeat-factor sampling threshold t (0.001 in the LVIS recipe; "
                                     "0 = off)", ge=0.0, le=1.0)
    min_sizes_train: tuple[int, ...] = option((640, 672, 704, 736, 768, 800), "training shorter-side sizes, "
                                              "one drawn per image", ge=1)
    max_size_train: int = option(1333, "training cap on the longer side", ge=1)
    min_size_test: int = option(800, "test shorter side", ge=1)
    max_size_test: int = option(1333, "test cap on the longer side", ge=1)
    flip_prob: float = option(0.5, "horizontal flip probability (train)", ge=0.0, le=1.0)
    num_workers: int = option(4, "DataLoader workers per process", ge=0)
    eval_max_images: int = option(0, "evaluate on the first N images only (0 = all)", ge=0)


@dataclass
class DetectorConfig(Section):
    """The detector (:func:`transfer.models.build_detector`) and its test-time settings."""

    detector: str = option("maskrcnn_fpn", "detector family", choices=DETECTORS)
    parity: str = option("detectron2", "detectron2: behave as the detectron2/AdelaiDet runs behind the published "
                         "rows (aligned RoIAlign, L1 box losses, predictor init, aspect-ratio grouping, PIL test "
                         "resize, ...; docs/finetune.md); torchvision: torchvision's stock components",
                         choices=PARITY_MODES)
    backbone: str = option("resnet50", "torchvision ResNet name or timm:<name>")
    norm: str = option("syncbn", f"norm for all parts ({'|'.join(NORMS)}) or per part, e.g. "
                       f"'backbone=frozenbn,fpn=gn' (parts: {', '.join(PARTS)}); syncbn becomes bn without "
                       "CUDA + several processes")
    frozen_stages: int = option(0, "freeze stem (1) and the first residual stages (2..5), detectron2 FREEZE_AT",
                                ge=0, le=5)
    norm_eval: bool = option(False, "keep BN layers in eval mode (running statistics) while training")
    extra_norm: bool = option(True, "C4: one more norm after res5 (MoCo/SoCo Res5ROIHeadsExtraNorm)")
    fpn_channels: int = option(256, "FPN width", ge=1)
    conv_dim: int = option(256, "box-head conv width", ge=1)
    fc_dim: int = option(1024, "box-head fc width", ge=1)
    mask_dim: int = option(256, "mask-head width", ge=1)
    detections_per_img: int = option(100, "detections kept per image", ge=1)
    score_thresh: float = option(0.05, "test score threshold (above 1: no detections)", ge=0.0)
    solov2: dict | None = option(None, "SOLOv2 options (AdelaiDet MODEL.SOLOV2 defaults; a mapping in a recipe), "
                                 "e.g. score_thresh=0.1 nms_sigma=2 num_grids=40,36,24,16,12; see docs/finetune.md")
    rpn_pre_nms_top_n_train: int | None = option(None, "R-CNN sampling override (default: recipe value)", ge=1)
    rpn_pre_nms_top_n_test: int | None = option(None, "R-CNN sampling override (default: recipe value)", ge=1)
    rpn_post_nms_top_n_train: int | None = option(None, "R-CNN sampling override (default: recipe value)", ge=1)
    rpn_post_nms_top_n_test: int | None = option(None, "R-CNN sampling override (default: recipe value)", ge=1)
    box_batch_size_per_image: int | None = option(None, "R-CNN sampling override (default: recipe value)", ge=1)
    pixel_mean: tuple[float, float, float] | None = option(None, "normalisation mean in [0,1] units (default: "
                                                           "the init file's, else ImageNet)")
    pixel_std: tuple[float, float, float] | None = option(None, "normalisation std in [0,1] units", gt=0.0)
    channels_last: bool | None = option(None, "channels_last memory format (default: on for CUDA)")

    def check(self) -> None:
        parse_norm(self.norm)
        if self.detector == "solov2" and self.solov2:
            from transfer.models.solov2 import SOLOv2Config  # imports torch: only when there is one

            try:
                SOLOv2Config.from_options(self.solov2)
            except ValueError as e:
                raise ConfigError(f"solov2: {e}", "solov2", self.solov2) from None

    def builder_kwargs(self) -> dict:
        """Keyword arguments of :func:`transfer.models.build_detector` besides ``num_classes`` and
        ``sync_ok`` and the test-time sizes of the data section (the one place that maps the
        configuration to the builder)."""
        return dict(backbone=self.backbone, norm=parse_norm(self.norm), extra_norm=self.extra_norm,
                    fpn_channels=self.fpn_channels, conv_dim=self.conv_dim, fc_dim=self.fc_dim,
                    mask_dim=self.mask_dim, box_score_thresh=self.score_thresh,
                    detections_per_img=self.detections_per_img,
                    rpn_pre_nms_top_n_train=self.rpn_pre_nms_top_n_train,
                    rpn_pre_nms_top_n_test=self.rpn_pre_nms_top_n_test,
                    rpn_post_nms_top_n_train=self.rpn_post_nms_top_n_train,
                    rpn_post_nms_top_n_test=self.rpn_post_nms_top_n_test,
                    box_batch_size_per_image=self.box_batch_size_per_image, solov2=self.solov2,
                    parity=self.parity)


@dataclass
class InitConfig(Section):
    """Where the detector's initial weights come from (:mod:`transfer.models.init_weights`)."""

    init: str = option("scratch", "detection-init file (transfer/convert.py), torchvision-supervised:PATH, or "
                       "scratch")
    init_parts: tuple[str, ...] | None = option(None, "load only these parts of the init file (default: all "
                                                "it has)", choices=INIT_PARTS)


@dataclass
class SolverConfig(Section):
    """Schedule (at the reference batch), batch and SGD (:mod:`transfer.solver`)."""

    schedule: str | None = option(None, "preset at total batch 16", choices=tuple(SCHEDULES))
    max_iter: int | None = option(None, "iterations at the reference batch", ge=1)
    steps: tuple[int, ...] | None = option(None, "LR drop iterations at the reference batch", ge=1, nargs="*")
    batch_size: int = option(2, "images per process per micro-step", ge=1)
    accum_steps: int = option(1, "gradient accumulation micro-steps per iteration", ge=1)
    reference_batch: int = option(16, "total batch the LR and iterations refer to", ge=1)
    scale_lr: bool = option(True, "linear scaling of LR and iteration counts to the actual total batch")
    base_lr: float = option(0.02, "LR at the reference batch", gt=0.0)
    momentum: float = option(0.9, "SGD momentum", ge=0.0, lt=1.0)
    weight_decay: float = option(1e-4, "weight decay (SoCo recipes: 2.5e-5)", ge=0.0)
    weight_decay_norm: float = option(0.0, "weight decay of norm layers", ge=0.0)
    weight_decay_bias: float | None = option(None, "weight decay of conv/linear biases (default: --weight-decay; "
                                             "SoCo recipes: 1e-4, what detectron2 <= v0.5 used when WEIGHT_DECAY "
                                             "was overridden)", ge=0.0)
    warmup_iters: int = option(1000, "linear warmup iterations (reference batch)", ge=0)
    warmup_factor: float = option(0.001, "LR factor at the start of warmup", ge=0.0, le=1.0)
    clip_grad: float = option(0.0, "clip the gradient norm (0 = off); try 1-10 if training diverges", ge=0.0)

    def check(self) -> None:
        steps = list(self.steps or ())
        # Steps at or past max_iter are allowed (no drop happens); a repeated step drops twice.
        if steps != sorted(steps):
            raise ConfigError(f"steps: {steps} must be in increasing order", "steps", steps)

    def max_iter_and_steps(self) -> tuple[int | None, tuple[int, ...]]:
        """(max_iter, steps) at the reference batch: the explicit values over the preset's."""
        preset_iter, preset_steps = SCHEDULES[self.schedule] if self.schedule else (None, ())
        return self.max_iter or preset_iter, tuple(self.steps) if self.steps else tuple(preset_steps)


@dataclass
class FinetuneRunConfig(Section):
    """Outputs, device, precision, evaluation, checkpoints and resume."""

    output_dir: str = option("output/finetune", "checkpoints, logs, metrics.json")
    device: str = option("auto", "auto, cpu, cuda or cuda:N", validate=check_device)
    amp: str = option("none", "mixed precision: none (float32, as the detectron2 reference runs), bf16, fp16 "
                      "(with a GradScaler) or auto (bf16 on CUDA if supported, else fp16; none on CPU)",
                      choices=AMP_MODES)
    seed: int = option(0, "seed of the data stream and of the initialisation", ge=0)
    eval_period: int = option(0, "evaluate every N iterations (0 = only at the end)", ge=0)
    checkpoint_period: int = option(5000, "save every N iterations", ge=0)
    keep_last: int = keep_last_option(RETENTION_DEFAULTS["iterations"][0])
    keep_every: int = keep_every_option(RETENTION_DEFAULTS["iterations"][1], "iteration")
    dist_timeout: float | None = dist_timeout_option()
    save_on_signal: bool = save_on_signal_option()
    print_freq: int = option(20, "log every N iterations", ge=1)
    precise_bn_iters: int = option(0, "recompute BN stats on N batches before eval (recipes: 200)", ge=0)
    lvis_max_dets: int = option(300, "LVIS detections per image for evaluation", ge=1)
    auto_resume: bool = option(True, "continue from OUTPUT_DIR/current.pth when it exists")
    resume: str | None = option(None, "checkpoint to continue training from")
    weights: str | None = option(None, "fine-tuned weights to evaluate (with --eval-only)")
    eval_only: bool = option(False, "only evaluate --weights / --resume / the latest checkpoint", negatable=False)
    tensorboard: bool = option(True, "write TensorBoard logs")


@dataclass
class FinetuneConfig(Config):
    """Everything ``transfer/finetune.py`` runs on."""

    description = ("Fine-tune and evaluate a detector (Mask/Faster R-CNN FPN or C4, RetinaNet, FCOS, SOLOv2) from a "
                   "SoCo, supervised or scratch initialisation. See docs/finetune.md.")
    data: FinetuneDataConfig = section(FinetuneDataConfig, "data")
    model: DetectorConfig = section(DetectorConfig, "model")
    init: InitConfig = section(InitConfig, "initialisation")
    solver: SolverConfig = section(SolverConfig, "schedule and optimizer")
    run: FinetuneRunConfig = section(FinetuneRunConfig, "run")

    def check(self) -> None:
        if not self.run.eval_only and self.solver.max_iter_and_steps()[0] is None:
            raise ConfigError("schedule: none given; set schedule (1x, 2x, 3x, 6x) or max_iter", "schedule", None)
