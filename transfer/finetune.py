"""Fine-tune and evaluate a detector (Mask/Faster R-CNN FPN or C4, RetinaNet, FCOS, SOLOv2).

    torchrun --nproc_per_node 8 transfer/finetune.py --config transfer/configs/mask_rcnn_R50_FPN_1x_soco.yaml \\
        --init output/soco_fpn_det.pth --output-dir output/ft_soco_fpn
    python transfer/finetune.py --config transfer/configs/demo_cpu.yaml            # one process
    python transfer/finetune.py --config ... --eval-only --weights output/ft/model_final.pth

Recipes (``transfer/configs/*.yaml``) give the defaults; command-line flags override them.
See docs/finetune.md for every option, the schedules and the init files.
"""
from __future__ import annotations

import argparse
import os

import torch

from socokit import distributed as sdist
from socokit.checkpoint import latest_checkpoint, load_checkpoint
from socokit.config import add_config_argument, config_to_dict, parse_args_with_config, save_config
from socokit.fileio import CheckpointError, atomic_save_json, check_writable_dir
from socokit.log import setup_logging
from socokit.preemption import REQUEUE_EXIT_CODE, Preempted, add_preemption_args, watcher_from_args
from socokit.resume import ResumeError, check_schedule, restore_rank_rng
from socokit.retention import Retention, add_retention_args
from socokit.training import AMP_MODES, TensorboardWriter, make_grad_scaler, resolve_amp, seed_everything
from transfer.categories import (REMAP_CHOICES, CategoryMismatchError, label_to_category, match_categories,
                                  plain_categories, relabel_records)
from transfer.data import AnnotationError, build_test_loader, build_train_loader, load_split
from transfer.engine import TrainState, evaluate, train
from transfer.evaluation import DetectionEvaluator, EvaluationError
from transfer.models import DETECTORS, PARITY_MODES, apply_frozen_stages, build_detector, has_masks
from transfer.models.init_weights import SUPERVISED_PREFIX, apply_stride_in_1x1, initialise_detector
from transfer.models.norms import NORMS, PARTS
from transfer.models.solov2 import SOLOv2Config
from transfer.solver import SCHEDULES, build_optimizer, resolve_schedule


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_argument(p)
    _add_data_args(p.add_argument_group("data"))
    _add_model_args(p.add_argument_group("model"), p.add_argument_group("initialisation"))
    _add_solver_args(p.add_argument_group("schedule and optimizer"))
    _add_run_args(p.add_argument_group("run"))
    return p


def _add_data_args(d) -> None:
    d.add_argument("--dataset-kind", default="coco", choices=("coco", "lvis"),
                   help="annotation format: COCO, or LVIS v1 (federated AP with APr/APc/APf)")
    d.add_argument("--train-images", help="folder the training annotation's file names are relative to")
    d.add_argument("--train-ann", help="training annotation json (COCO format or LVIS v1)")
    d.add_argument("--val-images", help="folder of the evaluation images")
    d.add_argument("--val-ann", help="evaluation annotation json")
    d.add_argument("--remap-categories", default="none", choices=REMAP_CHOICES,
                   help="when the categories of the weights (--weights, --resume, a detector --init) or of "
                        "the val file differ from the dataset's by id or name: refuse (none) or match them "
                        "by name (by-name)")
    d.add_argument("--filter-empty", action=argparse.BooleanOptionalAction, default=True,
                   help="drop training images without usable annotations (detectron2 default)")
    d.add_argument("--repeat-threshold", type=float, default=0.0,
                   help="LVIS repeat-factor sampling threshold t (0.001 in the LVIS recipe; 0 = off)")
    d.add_argument("--min-sizes-train", type=int, nargs="+", default=[640, 672, 704, 736, 768, 800],
                   help="training shorter-side sizes, one drawn per image")
    d.add_argument("--max-size-train", type=int, default=1333, help="training cap on the longer side")
    d.add_argument("--min-size-test", type=int, default=800, help="test shorter side")
    d.add_argument("--max-size-test", type=int, default=1333, help="test cap on the longer side")
    d.add_argument("--flip-prob", type=float, default=0.5, help="horizontal flip probability (train)")
    d.add_argument("--num-workers", type=int, default=4, help="DataLoader workers per process")
    d.add_argument("--eval-max-images", type=int, default=0, help="evaluate on the first N images only (0 = all)")


def _add_model_args(m, i) -> None:
    m.add_argument("--detector", default="maskrcnn_fpn", choices=DETECTORS, help="detector family")
    m.add_argument("--parity", default="detectron2", choices=PARITY_MODES,
                   help="detectron2: behave as the detectron2/AdelaiDet runs behind the published rows "
                        "(aligned RoIAlign, L1 box losses, predictor init, aspect-ratio grouping, PIL test "
                        "resize, ...; docs/finetune.md); torchvision: torchvision's stock components")
    m.add_argument("--backbone", default="resnet50", help="torchvision ResNet name or timm:<name>")
    m.add_argument("--norm", default="syncbn",
                   help=f"norm for all parts ({'|'.join(NORMS)}) or per part, e.g. "
                        f"'backbone=frozenbn,fpn=gn' (parts: {', '.join(PARTS)}); syncbn becomes bn "
                        "without CUDA + several processes")
    m.add_argument("--frozen-stages", type=int, default=0,
                   help="freeze stem (1) and the first residual stages (2..5), detectron2 FREEZE_AT")
    m.add_argument("--norm-eval", action=argparse.BooleanOptionalAction, default=False,
                   help="keep BN layers in eval mode (running statistics) while training")
    m.add_argument("--extra-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="C4: one more norm after res5 (MoCo/SoCo Res5ROIHeadsExtraNorm)")
    for name, default, text in (("fpn-channels", 256, "FPN width"), ("conv-dim", 256, "box-head conv width"),
                                ("fc-dim", 1024, "box-head fc width"), ("mask-dim", 256, "mask-head width"),
                                ("detections-per-img", 100, "detections kept per image")):
        m.add_argument(f"--{name}", type=int, default=default, help=text)
    m.add_argument("--score-thresh", type=float, default=0.05, help="test score threshold")
    m.add_argument("--solov2", nargs="*", default=None, metavar="KEY=VALUE",
                   help="SOLOv2 options (AdelaiDet MODEL.SOLOV2 defaults; a mapping in a recipe), e.g. "
                        "score_thresh=0.1 nms_sigma=2 num_grids=40,36,24,16,12; see docs/finetune.md")
    for name in ("rpn-pre-nms-top-n-train", "rpn-pre-nms-top-n-test", "rpn-post-nms-top-n-train",
                 "rpn-post-nms-top-n-test", "box-batch-size-per-image"):
        m.add_argument(f"--{name}", type=int, default=None, help="R-CNN sampling override (default: recipe value)")
    m.add_argument("--pixel-mean", type=float, nargs=3, default=None,
                   help="normalisation mean in [0,1] units (default: the init file's, else ImageNet)")
    m.add_argument("--pixel-std", type=float, nargs=3, default=None, help="normalisation std in [0,1] units")
    m.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for CUDA)")
    i.add_argument("--init", default="scratch",
                   help="detection-init file (transfer/convert.py), torchvision-supervised:PATH, or scratch")
    i.add_argument("--init-parts", nargs="+", default=None, choices=("backbone", "fpn", "box_head", "res5"),
                   help="load only these parts of the init file (default: all it has)")


def _add_solver_args(s) -> None:
    s.add_argument("--schedule", default=None, choices=tuple(SCHEDULES), help="preset at total batch 16")
    s.add_argument("--max-iter", type=int, default=None, help="iterations at the reference batch")
    s.add_argument("--steps", type=int, nargs="*", default=None, help="LR drop iterations at the reference batch")
    s.add_argument("--batch-size", type=int, default=2, help="images per process per micro-step")
    s.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation micro-steps per iteration")
    s.add_argument("--reference-batch", type=int, default=16, help="total batch the LR and iterations refer to")
    s.add_argument("--scale-lr", action=argparse.BooleanOptionalAction, default=True,
                   help="linear scaling of LR and iteration counts to the actual total batch")
    s.add_argument("--base-lr", type=float, default=0.02, help="LR at the reference batch")
    s.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    s.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay (SoCo recipes: 2.5e-5)")
    s.add_argument("--weight-decay-norm", type=float, default=0.0, help="weight decay of norm layers")
    s.add_argument("--weight-decay-bias", type=float, default=None,
                   help="weight decay of conv/linear biases (default: --weight-decay; SoCo recipes: 1e-4, "
                        "what detectron2 <= v0.5 used when WEIGHT_DECAY was overridden)")
    s.add_argument("--warmup-iters", type=int, default=1000, help="linear warmup iterations (reference batch)")
    s.add_argument("--warmup-factor", type=float, default=0.001, help="LR factor at the start of warmup")
    s.add_argument("--clip-grad", type=float, default=0.0, help="clip the gradient norm (0 = off); try 1-10 if training diverges")


def _add_run_args(r) -> None:
    r.add_argument("--output-dir", default="output/finetune", help="checkpoints, logs, metrics.json")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda")
    r.add_argument("--amp", default="none", choices=AMP_MODES,
                   help="mixed precision: none (float32, as the detectron2 reference runs), bf16, fp16 "
                        "(with a GradScaler) or auto (bf16 on CUDA if supported, else fp16; none on CPU)")
    r.add_argument("--seed", type=int, default=0, help="seed of the data stream and of the initialisation")
    r.add_argument("--eval-period", type=int, default=0, help="evaluate every N iterations (0 = only at the end)")
    r.add_argument("--checkpoint-period", type=int, default=5000, help="save every N iterations")
    add_retention_args(r, "iterations")
    sdist.add_launch_args(r)
    add_preemption_args(r)
    r.add_argument("--print-freq", type=int, default=20, help="log every N iterations")
    r.add_argument("--precise-bn-iters", type=int, default=0, help="recompute BN stats on N batches before eval (recipes: 200)")
    r.add_argument("--lvis-max-dets", type=int, default=300, help="LVIS detections per image for evaluation")
    r.add_argument("--auto-resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUTPUT_DIR/current.pth when it exists")
    r.add_argument("--resume", default=None, help="checkpoint to continue training from")
    r.add_argument("--weights", default=None, help="fine-tuned weights to evaluate (with --eval-only)")
    r.add_argument("--eval-only", action="store_true", help="only evaluate --weights / --resume / the latest checkpoint")
    r.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True, help="write TensorBoard logs")


def parse_norm(spec: str):
    """'syncbn' or 'backbone=frozenbn,fpn=gn' → str or dict."""
    if "=" not in spec:
        return spec
    out = {}
    for item in spec.split(","):
        part, _, name = item.partition("=")
        out[part.strip()] = name.strip()
    return out


def resolve_pixel(args, meta: dict | None) -> dict:
    """The pixel convention: the init file's, unless the config contradicts it (then refuse)."""
    from socokit.backbones import PIXEL_CONVENTION
    from transfer.models.transform import pixel_to_mean_std

    pixel = dict(meta["pixel"]) if meta and meta.get("pixel") else dict(PIXEL_CONVENTION)
    if args.pixel_mean is None and args.pixel_std is None:
        return pixel
    mean, std, _ = pixel_to_mean_std(pixel)
    want_mean = args.pixel_mean or mean
    want_std = args.pixel_std or std
    if meta and meta.get("pixel") and any(abs(a - b) > 1e-4 for a, b in zip(want_mean + want_std, mean + std)):
        raise SystemExit(f"error: --pixel-mean/--pixel-std {want_mean}/{want_std} contradict the init "
                         f"file's pixel convention {meta['pixel']}; drop them (the file's values are used)")
    return {"channels": pixel.get("channels", "RGB"), "range": 1.0, "mean": list(want_mean), "std": list(want_std)}


def summarise_keys(keys, depth: int = 3) -> str:
    """'rpn.head (6), roi_heads.box_predictor (4)': key counts per module prefix."""
    counts: dict = {}
    for k in keys:
        prefix = ".".join(k.split(".")[:depth - (1 if k.count(".") < depth else 0)])
        counts[prefix] = counts.get(prefix, 0) + 1
    return ", ".join(f"{p} ({n})" for p, n in counts.items())


def _check_args(args) -> None:
    if not args.val_ann or not args.val_images:
        raise SystemExit("error: --val-ann and --val-images are required (evaluation set)")
    if not args.eval_only and (not args.train_ann or not args.train_images):
        raise SystemExit("error: --train-ann and --train-images are required for training")
    if args.batch_size < 1 or args.accum_steps < 1:
        raise SystemExit("error: --batch-size and --accum-steps must be >= 1")
    if args.detector == "solov2":
        try:
            SOLOv2Config.from_options(args.solov2)
        except ValueError as e:
            raise SystemExit(f"error: --solov2: {e}") from e


def build_model(args, dist, num_classes: int, pixel: dict | None = None, stride_in_1x1: bool = False):
    """Detector with the init file loaded and stages frozen; returns (model, pixel, report).

    ``pixel`` and ``stride_in_1x1`` come from a fine-tuning checkpoint (resume / evaluation);
    without ``pixel`` the init file supplies both (``report["stride_in_1x1"]``: MSRA/Caffe2
    weights downsample in the bottleneck's 1x1 conv, and the model is built that way).
    """
    torch.manual_seed(args.seed)  # identical fresh weights on every rank
    model = build_detector(
        args.detector, backbone=args.backbone, num_classes=num_classes, norm=parse_norm(args.norm),
        sync_ok=dist.device.type == "cuda" and dist.world_size > 1, min_size=args.min_size_test,
        max_size=args.max_size_test, extra_norm=args.extra_norm, fpn_channels=args.fpn_channels,
        conv_dim=args.conv_dim, fc_dim=args.fc_dim, mask_dim=args.mask_dim,
        box_score_thresh=args.score_thresh, detections_per_img=args.detections_per_img,
        rpn_pre_nms_top_n_train=args.rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test=args.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=args.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=args.rpn_post_nms_top_n_test,
        box_batch_size_per_image=args.box_batch_size_per_image, solov2=args.solov2, parity=args.parity)
    report, meta = {"loaded": 0, "parts": [], "new": []}, None
    if pixel is None:  # a fresh run: initialise from --init
        # SOLOv2 takes the backbone and FPN of any init file; its heads are new
        usable = ("backbone", "fpn") if args.detector == "solov2" else None
        report, meta = initialise_detector(model, args.init, args.init_parts, c4=args.detector.endswith("_c4"),
                                           usable=usable)
        pixel = resolve_pixel(args, meta)
        stride_in_1x1 = bool(meta and meta.get("stride_in_1x1"))
    report["stride_in_1x1"] = bool(stride_in_1x1)
    if stride_in_1x1:
        try:
            apply_stride_in_1x1(model)
        except ValueError as e:
            raise SystemExit(f"error: {args.init}: {e}") from e
    from transfer.models.transform import pixel_to_mean_std
    model.transform.image_mean, model.transform.image_std, model.transform.channels = pixel_to_mean_std(pixel)
    apply_frozen_stages(model, args.frozen_stages)
    return model, pixel, report


def _load_datasets(args, dist, logger):
    """Validated train (None with --eval-only) and val annotation sets; reports logged and saved."""
    val = load_split(args.val_images, args.val_ann, args.dataset_kind)
    train = None if args.eval_only else load_split(args.train_images, args.train_ann, args.dataset_kind)
    for split, ds in (("train", train), ("val", val)):
        if ds is None:
            continue
        logger.info("annotations (%s) %s", split, ds.report.summary_line())
        if dist.is_main:
            atomic_save_json(ds.report.to_dict(), os.path.join(args.output_dir, f"annotations_{split}.json"))
    return train, val


def _read_checkpoint(path: str, what: str) -> dict:
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise SystemExit(f"error: {path}: not a fine-tuning checkpoint (no 'model' entry) for {what}")
    return ckpt


def _detector_init(args) -> dict | None:
    """A fine-tuned detector checkpoint given as ``--init`` (all weights, categories compared)."""
    spec = args.init
    if spec in (None, "", "scratch") or spec.startswith(SUPERVISED_PREFIX) or not os.path.isfile(spec):
        return None
    try:  # memory-mapped: a detection-init file is not read twice just to see its format
        obj = torch.load(spec, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - initialise_detector reports the file with the detinit contract
        return None
    return obj if isinstance(obj, dict) and obj.get("format") == "soco-finetune" else None


def resolve_categories(args, logger, train, val, weights: dict | None, weights_name: str):
    """Match the datasets' categories to the weights' (or the training set's) label order.

    Relabels the records of ``train`` / ``val`` in place and returns (model categories with the
    training set's ids, or the val set's for --eval-only; label → val category id list).

    Raises:
        CategoryMismatchError: the categories differ (and --remap-categories by-name cannot fix it).
    """
    if weights is not None:
        saved = weights.get("categories")
        if not saved:
            raise CategoryMismatchError(f"{weights_name}: the checkpoint records no categories, so "
                                        "they cannot be compared with the dataset's")
        ref, ref_name = plain_categories(saved), weights_name
    else:
        ref, ref_name = plain_categories(train.categories), args.train_ann
    mapped = {}
    for split, ds, ann in (("train", train, args.train_ann), ("val", val, args.val_ann)):
        if ds is None:
            continue
        mapped[split], message = match_categories(ref, ds.categories, remap=args.remap_categories,
                                                  ckpt_name=ref_name, data_name=ann)
        (logger.warning if "remapped" in message else logger.info)(message)
        relabel_records(ds.records, ds.categories, mapped[split])
    return mapped.get("train", mapped["val"]), label_to_category(mapped["val"])


def run(args, dist, logger) -> dict | None:
    train, val = _load_datasets(args, dist, logger)
    resume = args.resume or (latest_checkpoint(args.output_dir) if args.auto_resume else None)
    source = (args.weights or resume) if args.eval_only else resume
    ckpt = _read_checkpoint(source, "evaluation" if args.eval_only else "resuming") if source else None
    if ckpt is None and args.eval_only:
        raise SystemExit("error: --eval-only needs --weights, --resume or a checkpoint in --output-dir")
    init_ckpt = None if ckpt is not None or args.eval_only else _detector_init(args)
    weights, weights_name = (ckpt, source) if ckpt is not None else (init_ckpt, args.init)
    categories, l2c = resolve_categories(args, logger, train, val, weights, weights_name)
    num_classes = len(categories) + 1
    model, pixel, report = build_model(args, dist, num_classes, pixel=weights.get("pixel") if weights else None,
                                       stride_in_1x1=bool(weights and weights.get("stride_in_1x1")))
    if weights is not None:
        try:
            model.load_state_dict(weights["model"], strict=True)
        except RuntimeError as e:
            raise SystemExit(f"error: {weights_name}: weights do not fit this detector: {str(e)[:800]}") from e
        logger.info("loaded %s (iteration %s)%s", weights_name, weights.get("iteration"),
                    " as the initialisation (fresh optimizer, iteration 0)" if init_ckpt is not None else "")
    else:
        logger.info("init %s: %d tensors loaded for parts %s; %d detector tensors newly initialised%s",
                    args.init, report["loaded"], report["parts"], len(report["new"]),
                    (": " + summarise_keys(report["new"])) if report["loaded"] else "")
    device = dist.device
    try:
        amp = resolve_amp(args.amp, device)
    except ValueError as e:
        raise SystemExit(f"error: --amp: {e}") from None
    channels_last = args.channels_last if args.channels_last is not None else device.type == "cuda"
    model.transform.channels_last = channels_last
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    seed_everything(args.seed, dist.rank)
    test_loader, _ = build_test_loader(val.records, args.val_images, rank=dist.rank, world_size=dist.world_size,
                                       num_workers=args.num_workers, max_images=args.eval_max_images,
                                       pin_memory=device.type == "cuda",
                                       resize=(args.min_size_test, args.max_size_test)
                                       if args.parity == "detectron2" else None)
    masks = has_masks(args.detector)
    evaluator = DetectionEvaluator(
        api=val.api, label_to_category=l2c, with_masks=masks, kind=args.dataset_kind,
        max_dets=args.lvis_max_dets,
        segm_skipped=(f"{args.val_ann} has no segmentation (box-only): mask AP is undefined"
                      if masks and not val.report.has_segmentation else None))

    def eval_fn(iteration):
        try:
            return evaluate(model, test_loader, evaluator, device, amp, args.output_dir, iteration)
        except Exception as e:  # noqa: BLE001 - any evaluator failure is reported with its cause
            saved = source if args.eval_only else os.path.join(args.output_dir, "current.pth")
            logger.exception("evaluation at iteration %d failed", iteration)
            raise EvaluationError(
                f"evaluation at iteration {iteration} failed ({type(e).__name__}: {e}); the weights it "
                f"scored are saved in {saved}: rerun only the evaluation with --eval-only --weights {saved}") from e

    if args.eval_only:
        return eval_fn(int(ckpt.get("iteration", 0)))
    return run_training(args, dist, logger, model, ckpt, train.records, eval_fn, amp,
                        extra={"pixel": pixel, "stride_in_1x1": report["stride_in_1x1"],
                               "categories": categories, "detector": args.detector,
                               "backbone": args.backbone, "config": config_to_dict(args)})


#: schedule values a resumed fine-tuning run must share with its checkpoint.
SCHEDULE_KEYS = ("total_batch", "max_iter", "lr", "steps", "warmup_iters", "warmup_factor")


def run_training(args, dist, logger, model, ckpt, train_records, eval_fn, amp: str, extra) -> dict | None:
    device = dist.device
    total_batch = args.batch_size * dist.world_size * args.accum_steps
    sched = resolve_schedule(args.schedule, args.max_iter, args.steps, args.warmup_iters, args.base_lr,
                             total_batch, args.reference_batch, args.scale_lr)
    schedule = {"total_batch": total_batch, "max_iter": sched["max_iter"], "lr": sched["lr"],
                "steps": list(sched["steps"]), "warmup_iters": sched["warmup_iters"],
                "warmup_factor": args.warmup_factor}
    logger.info("total batch %d: lr %.5g, %d iterations, steps %s, warmup %d", total_batch, sched["lr"],
                sched["max_iter"], list(sched["steps"]), sched["warmup_iters"])
    optimizer = build_optimizer(model, sched["lr"], args.momentum, args.weight_decay, args.weight_decay_norm,
                                weight_decay_bias=args.weight_decay_bias)
    state = TrainState(optimizer, make_grad_scaler(device, amp), sched["max_iter"], sched["lr"],
                       sched["steps"], sched["warmup_iters"], args.warmup_factor, args.accum_steps,
                       amp, args.norm_eval, args.clip_grad, extra={**extra, "schedule": schedule})
    if ckpt is not None:  # the resume policy of socokit.resume
        try:
            check_schedule(ckpt.get("schedule"), {k: schedule[k] for k in SCHEDULE_KEYS}, args.resume or
                           latest_checkpoint(args.output_dir), "resume with the same total batch "
                           "(batch size x processes x accumulation), schedule and learning rate, or "
                           "start a new --output-dir")
        except ResumeError as e:
            raise SystemExit(f"error: {e}") from None
        optimizer.load_state_dict(ckpt["optimizer"])
        state.scaler.load_state_dict(ckpt["scaler"])
        state.iteration = int(ckpt["iteration"])
        restore_rank_rng(ckpt.get("rng"), rank=dist.rank, world_size=dist.world_size, seed=args.seed,
                         step=state.iteration, logger=logger)
    ddp = model
    if dist.distributed:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    loader_kwargs = dict(batch_size=args.batch_size, rank=dist.rank, world_size=dist.world_size,
                         accum_steps=args.accum_steps, min_sizes=args.min_sizes_train,
                         max_size=args.max_size_train, flip_prob=args.flip_prob,
                         with_masks=has_masks(args.detector), filter_empty=args.filter_empty,
                         repeat_threshold=args.repeat_threshold, pin_memory=device.type == "cuda",
                         group_aspect=args.parity == "detectron2")
    loader, dataset = build_train_loader(train_records, args.train_images, seed=args.seed,
                                         start_iter=state.iteration, num_workers=args.num_workers, **loader_kwargs)
    logger.info("training on %d images from iteration %d", len(dataset), state.iteration)

    def precise_bn_batches(iteration):
        pbn, _ = build_train_loader(train_records, args.train_images, seed=args.seed + 1 + iteration,
                                    start_iter=0, num_workers=0, **loader_kwargs)
        it = iter(pbn)
        return [next(it) for _ in range(args.precise_bn_iters)]

    tb = TensorboardWriter(args.output_dir, enabled=args.tensorboard)
    preemption = watcher_from_args(args, device).install()
    try:
        return train(ddp, model, loader, state, device, output_dir=args.output_dir, eval_fn=eval_fn,
                     eval_period=args.eval_period, checkpoint_period=args.checkpoint_period,
                     retention=Retention("model_", args.keep_last, args.keep_every),
                     preemption=preemption,
                     print_freq=args.print_freq, tb=tb,
                     precise_bn_batches=precise_bn_batches if args.precise_bn_iters > 0 else None)
    finally:
        preemption.restore()
        tb.close()


def main(argv=None) -> dict | None:
    """Entry point; returns the last evaluation metrics (the same on every rank)."""
    args = parse_args_with_config(build_parser(), argv)
    _check_args(args)
    try:
        dist = sdist.init_distributed(args.device, args.dist_timeout)
    except sdist.LaunchError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        if dist.is_main:
            check_writable_dir(args.output_dir)
        sdist.barrier()
        logger = setup_logging(args.output_dir, dist.rank, "soco")
        if dist.is_main:
            save_config(args, os.path.join(args.output_dir, "config.yaml"))
        try:
            return run(args, dist, logger)
        except (AnnotationError, CategoryMismatchError, EvaluationError) as e:
            raise SystemExit(f"error: {e}") from e
    except Preempted as e:
        logger.warning("%s", e)
        raise SystemExit(REQUEUE_EXIT_CODE) from None
    finally:
        sdist.cleanup_distributed()


if __name__ == "__main__":
    main()
