"""Fine-tune and evaluate a detector (Mask/Faster R-CNN FPN or C4, RetinaNet, FCOS, SOLOv2).

    torchrun --nproc_per_node 8 transfer/finetune.py --config transfer/configs/mask_rcnn_R50_FPN_1x_soco.yaml \\
        --init output/soco_fpn_det.pth --output-dir output/ft_soco_fpn
    python transfer/finetune.py --config transfer/configs/demo_cpu.yaml            # one process
    python transfer/finetune.py --config ... --eval-only --weights output/ft/model_final.pth

Every option is declared once in :mod:`transfer.config`; recipes (``transfer/configs/*.yaml``)
set values, command-line flags override them, and the merged configuration is validated
before anything is loaded (``--print-config`` prints it and exits). See docs/finetune.md for
every option, the schedules and the init files.
"""
from __future__ import annotations

import sys

if __name__ == "__main__":  # check the configuration before importing torch: a bad value fails fast
    from socokit.config import parse_config_or_exit
    from transfer.config import FinetuneConfig
    parse_config_or_exit(FinetuneConfig, sys.argv[1:])

import os

import torch

from socokit import distributed as sdist
from socokit.checkpoint import latest_checkpoint, load_checkpoint
from socokit.config import build_parser as build_config_parser
from socokit.config import config_to_dict, parse_config_or_exit, save_config
from socokit.errors import CheckpointError, ConfigError, exit_on_user_error
from socokit.fileio import atomic_save_json, check_writable_dir
from socokit.log import setup_logging
from socokit.preemption import REQUEUE_EXIT_CODE, Preempted, watcher_from_args
from socokit.resume import ResumeError, check_schedule, restore_rank_rng
from socokit.retention import Retention
from socokit.training import TensorboardWriter, make_grad_scaler, resolve_amp, seed_everything
from transfer.categories import (CategoryMismatchError, label_to_category, match_categories, plain_categories,
                                 relabel_records)
from transfer.config import DetectorConfig, FinetuneConfig
from transfer.data import AnnotationError, build_test_loader, build_train_loader, load_split
from transfer.engine import TrainState, evaluate, train
from transfer.evaluation import DetectionEvaluator, EvaluationError
from transfer.models import apply_frozen_stages, build_detector, has_masks
from transfer.models.init_weights import SUPERVISED_PREFIX, apply_stride_in_1x1, initialise_detector
from transfer.solver import build_optimizer, resolve_schedule


#: The configuration class of this entry point (sections, options, validation).
CONFIG = FinetuneConfig


def build_parser():
    """The argparse parser of every option (from :class:`transfer.config.FinetuneConfig`)."""
    return build_config_parser(FinetuneConfig)


def resolve_pixel(model_cfg: DetectorConfig, meta: dict | None) -> dict:
    """The pixel convention: the init file's, unless the config contradicts it (then refuse).

    Raises:
        ConfigError: ``pixel_mean`` / ``pixel_std`` differ from the init file's convention.
    """
    from socokit.backbones import PIXEL_CONVENTION
    from transfer.models.transform import pixel_to_mean_std

    pixel = dict(meta["pixel"]) if meta and meta.get("pixel") else dict(PIXEL_CONVENTION)
    if model_cfg.pixel_mean is None and model_cfg.pixel_std is None:
        return pixel
    mean, std, _ = pixel_to_mean_std(pixel)
    want_mean = list(model_cfg.pixel_mean or mean)
    want_std = list(model_cfg.pixel_std or std)
    if meta and meta.get("pixel") and any(abs(a - b) > 1e-4 for a, b in zip(want_mean + want_std, mean + std)):
        raise ConfigError(f"pixel_mean: {want_mean} / pixel_std {want_std} contradict the init file's pixel "
                          f"convention {meta['pixel']}; drop them (the file's values are used)",
                          "pixel_mean", want_mean)
    return {"channels": pixel.get("channels", "RGB"), "range": 1.0, "mean": list(want_mean), "std": list(want_std)}


def summarise_keys(keys, depth: int = 3) -> str:
    """'rpn.head (6), roi_heads.box_predictor (4)': key counts per module prefix."""
    counts: dict = {}
    for k in keys:
        prefix = ".".join(k.split(".")[:depth - (1 if k.count(".") < depth else 0)])
        counts[prefix] = counts.get(prefix, 0) + 1
    return ", ".join(f"{p} ({n})" for p, n in counts.items())


def _check_inputs(cfg: FinetuneConfig) -> None:
    if not cfg.data.val_ann or not cfg.data.val_images:
        raise SystemExit("error: --val-ann and --val-images are required (evaluation set)")
    if not cfg.run.eval_only and (not cfg.data.train_ann or not cfg.data.train_images):
        raise SystemExit("error: --train-ann and --train-images are required for training")


def build_model(cfg: FinetuneConfig, dist, num_classes: int, pixel: dict | None = None, stride_in_1x1: bool = False):
    """Detector with the init file loaded and stages frozen; returns (model, pixel, report).

    ``pixel`` and ``stride_in_1x1`` come from a fine-tuning checkpoint (resume / evaluation);
    without ``pixel`` the init file supplies both (``report["stride_in_1x1"]``: MSRA/Caffe2
    weights downsample in the bottleneck's 1x1 conv, and the model is built that way).

    Raises:
        socokit.errors.SocoError: an unreadable or unfitting init file, or pixel options that
            contradict it.
    """
    torch.manual_seed(cfg.run.seed)  # identical fresh weights on every rank
    model = build_detector(cfg.model.detector, num_classes=num_classes,
                           sync_ok=dist.device.type == "cuda" and dist.world_size > 1,
                           min_size=cfg.data.min_size_test, max_size=cfg.data.max_size_test,
                           **cfg.model.builder_kwargs())
    report, meta = {"loaded": 0, "parts": [], "new": []}, None
    if pixel is None:  # a fresh run: initialise from --init
        # SOLOv2 takes the backbone and FPN of any init file; its heads are new
        usable = ("backbone", "fpn") if cfg.model.detector == "solov2" else None
        report, meta = initialise_detector(model, cfg.init.init, cfg.init.init_parts,
                                           c4=cfg.model.detector.endswith("_c4"),
                                           usable=usable)
        pixel = resolve_pixel(cfg.model, meta)
        stride_in_1x1 = bool(meta and meta.get("stride_in_1x1"))
    report["stride_in_1x1"] = bool(stride_in_1x1)
    if stride_in_1x1:
        try:
            apply_stride_in_1x1(model)
        except ValueError as e:
            raise SystemExit(f"error: {cfg.init.init}: {e}") from e
    from transfer.models.transform import pixel_to_mean_std
    model.transform.image_mean, model.transform.image_std, model.transform.channels = pixel_to_mean_std(pixel)
    apply_frozen_stages(model, cfg.model.frozen_stages)
    return model, pixel, report


def _load_datasets(cfg: FinetuneConfig, dist, logger):
    """Validated train (None with --eval-only) and val annotation sets; reports logged and saved."""
    val = load_split(cfg.data.val_images, cfg.data.val_ann, cfg.data.dataset_kind)
    train = None if cfg.run.eval_only else load_split(cfg.data.train_images, cfg.data.train_ann, cfg.data.dataset_kind)
    for split, ds in (("train", train), ("val", val)):
        if ds is None:
            continue
        logger.info("annotations (%s) %s", split, ds.report.summary_line())
        if dist.is_main:
            atomic_save_json(ds.report.to_dict(), os.path.join(cfg.run.output_dir, f"annotations_{split}.json"))
    return train, val


def _read_checkpoint(path: str, what: str) -> dict:
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise SystemExit(f"error: {path}: not a fine-tuning checkpoint (no 'model' entry) for {what}")
    return ckpt


def _detector_init(cfg: FinetuneConfig) -> dict | None:
    """A fine-tuned detector checkpoint given as ``--init`` (all weights, categories compared)."""
    spec = cfg.init.init
    if spec in (None, "", "scratch") or spec.startswith(SUPERVISED_PREFIX) or not os.path.isfile(spec):
        return None
    try:  # memory-mapped: a detection-init file is not read twice just to see its format
        obj = torch.load(spec, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - initialise_detector reports the file with the detinit contract
        return None
    return obj if isinstance(obj, dict) and obj.get("format") == "soco-finetune" else None


def resolve_categories(cfg: FinetuneConfig, logger, train, val, weights: dict | None, weights_name: str):
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
        ref, ref_name = plain_categories(train.categories), cfg.data.train_ann
    mapped = {}
    for split, ds, ann in (("train", train, cfg.data.train_ann), ("val", val, cfg.data.val_ann)):
        if ds is None:
            continue
        mapped[split], message = match_categories(ref, ds.categories, remap=cfg.data.remap_categories,
                                                  ckpt_name=ref_name, data_name=ann)
        (logger.warning if "remapped" in message else logger.info)(message)
        relabel_records(ds.records, ds.categories, mapped[split])
    return mapped.get("train", mapped["val"]), label_to_category(mapped["val"])


def run(cfg: FinetuneConfig, dist, logger) -> dict | None:
    train, val = _load_datasets(cfg, dist, logger)
    resume = cfg.run.resume or (latest_checkpoint(cfg.run.output_dir) if cfg.run.auto_resume else None)
    source = (cfg.run.weights or resume) if cfg.run.eval_only else resume
    ckpt = _read_checkpoint(source, "evaluation" if cfg.run.eval_only else "resuming") if source else None
    if ckpt is None and cfg.run.eval_only:
        raise SystemExit("error: --eval-only needs --weights, --resume or a checkpoint in --output-dir")
    init_ckpt = None if ckpt is not None or cfg.run.eval_only else _detector_init(cfg)
    weights, weights_name = (ckpt, source) if ckpt is not None else (init_ckpt, cfg.init.init)
    categories, l2c = resolve_categories(cfg, logger, train, val, weights, weights_name)
    num_classes = len(categories) + 1
    model, pixel, report = build_model(cfg, dist, num_classes, pixel=weights.get("pixel") if weights else None,
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
                    cfg.init.init, report["loaded"], report["parts"], len(report["new"]),
                    (": " + summarise_keys(report["new"])) if report["loaded"] else "")
    device = dist.device
    try:
        amp = resolve_amp(cfg.run.amp, device)
    except ValueError as e:
        raise ConfigError(f"amp: {e}", "amp", cfg.run.amp) from None
    channels_last = cfg.model.channels_last if cfg.model.channels_last is not None else device.type == "cuda"
    model.transform.channels_last = channels_last
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    seed_everything(cfg.run.seed, dist.rank)
    test_loader, _ = build_test_loader(val.records, cfg.data.val_images, rank=dist.rank, world_size=dist.world_size,
                                       num_workers=cfg.data.num_workers, max_images=cfg.data.eval_max_images,
                                       pin_memory=device.type == "cuda",
                                       resize=(cfg.data.min_size_test, cfg.data.max_size_test)
                                       if cfg.model.parity == "detectron2" else None)
    masks = has_masks(cfg.model.detector)
    evaluator = DetectionEvaluator(
        api=val.api, label_to_category=l2c, with_masks=masks, kind=cfg.data.dataset_kind,
        max_dets=cfg.run.lvis_max_dets,
        segm_skipped=(f"{cfg.data.val_ann} has no segmentation (box-only): mask AP is undefined"
                      if masks and not val.report.has_segmentation else None))

    def eval_fn(iteration):
        try:
            return evaluate(model, test_loader, evaluator, device, amp, cfg.run.output_dir, iteration)
        except Exception as e:  # noqa: BLE001 - any evaluator failure is reported with its cause
            saved = source if cfg.run.eval_only else os.path.join(cfg.run.output_dir, "current.pth")
            logger.exception("evaluation at iteration %d failed", iteration)
            raise EvaluationError(
                f"evaluation at iteration {iteration} failed ({type(e).__name__}: {e}); the weights it "
                f"scored are saved in {saved}: rerun only the evaluation with --eval-only --weights {saved}") from e

    if cfg.run.eval_only:
        return eval_fn(int(ckpt.get("iteration", 0)))
    return run_training(cfg, dist, logger, model, ckpt, train.records, eval_fn, amp,
                        extra={"pixel": pixel, "stride_in_1x1": report["stride_in_1x1"],
                               "categories": categories, "detector": cfg.model.detector,
                               "backbone": cfg.model.backbone, "config": config_to_dict(cfg)})


#: schedule values a resumed fine-tuning run must share with its checkpoint.
SCHEDULE_KEYS = ("total_batch", "max_iter", "lr", "steps", "warmup_iters", "warmup_factor")


def run_training(cfg: FinetuneConfig, dist, logger, model, ckpt, train_records, eval_fn, amp: str,
                 extra) -> dict | None:
    device, solver = dist.device, cfg.solver
    total_batch = solver.batch_size * dist.world_size * solver.accum_steps
    sched = resolve_schedule(solver, total_batch)
    schedule = {"total_batch": total_batch, "max_iter": sched.max_iter, "lr": sched.lr, "steps": list(sched.steps),
                "warmup_iters": sched.warmup_iters, "warmup_factor": sched.warmup_factor}
    logger.info("total batch %d: lr %.5g, %d iterations, steps %s, warmup %d", total_batch, sched.lr,
                sched.max_iter, list(sched.steps), sched.warmup_iters)
    optimizer = build_optimizer(model, sched.lr, solver.momentum, solver.weight_decay, solver.weight_decay_norm,
                                weight_decay_bias=solver.weight_decay_bias)
    state = TrainState(optimizer=optimizer, scaler=make_grad_scaler(device, amp), schedule=sched,
                       accum_steps=solver.accum_steps, amp=amp, norm_eval=cfg.model.norm_eval,
                       clip_grad=solver.clip_grad, extra={**extra, "schedule": schedule})
    if ckpt is not None:  # the resume policy of socokit.resume
        try:
            check_schedule(ckpt.get("schedule"), {k: schedule[k] for k in SCHEDULE_KEYS}, cfg.run.resume or
                           latest_checkpoint(cfg.run.output_dir), "resume with the same total batch "
                           "(batch size x processes x accumulation), schedule and learning rate, or "
                           "start a new --output-dir")
        except ResumeError as e:
            raise SystemExit(f"error: {e}") from None
        optimizer.load_state_dict(ckpt["optimizer"])
        state.scaler.load_state_dict(ckpt["scaler"])
        state.iteration = int(ckpt["iteration"])
        restore_rank_rng(ckpt.get("rng"), rank=dist.rank, world_size=dist.world_size, seed=cfg.run.seed,
                         step=state.iteration, logger=logger)
    ddp = model
    if dist.distributed:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    loader_kwargs = dict(batch_size=cfg.solver.batch_size, rank=dist.rank, world_size=dist.world_size,
                         accum_steps=cfg.solver.accum_steps, min_sizes=cfg.data.min_sizes_train,
                         max_size=cfg.data.max_size_train, flip_prob=cfg.data.flip_prob,
                         with_masks=has_masks(cfg.model.detector), filter_empty=cfg.data.filter_empty,
                         repeat_threshold=cfg.data.repeat_threshold, pin_memory=device.type == "cuda",
                         group_aspect=cfg.model.parity == "detectron2")
    loader, dataset = build_train_loader(train_records, cfg.data.train_images, seed=cfg.run.seed,
                                         start_iter=state.iteration, num_workers=cfg.data.num_workers, **loader_kwargs)
    logger.info("training on %d images from iteration %d", len(dataset), state.iteration)

    def precise_bn_batches(iteration):
        pbn, _ = build_train_loader(train_records, cfg.data.train_images, seed=cfg.run.seed + 1 + iteration,
                                    start_iter=0, num_workers=0, **loader_kwargs)
        it = iter(pbn)
        return [next(it) for _ in range(cfg.run.precise_bn_iters)]

    tb = TensorboardWriter(cfg.run.output_dir, enabled=cfg.run.tensorboard)
    preemption = watcher_from_args(cfg.run, device).install()
    try:
        return train(ddp, model, loader, state, device, output_dir=cfg.run.output_dir, eval_fn=eval_fn,
                     eval_period=cfg.run.eval_period, checkpoint_period=cfg.run.checkpoint_period,
                     retention=Retention("model_", cfg.run.keep_last, cfg.run.keep_every),
                     preemption=preemption,
                     print_freq=cfg.run.print_freq, tb=tb,
                     precise_bn_batches=precise_bn_batches if cfg.run.precise_bn_iters > 0 else None)
    finally:
        preemption.restore()
        tb.close()


@exit_on_user_error
def main(argv=None) -> dict | None:
    """Entry point; returns the last evaluation metrics (the same on every rank)."""
    cfg = parse_config_or_exit(FinetuneConfig, argv)
    _check_inputs(cfg)
    dist = sdist.init_distributed(cfg.run.device, cfg.run.dist_timeout)
    try:
        if dist.is_main:
            check_writable_dir(cfg.run.output_dir)
        sdist.barrier()
        logger = setup_logging(cfg.run.output_dir, dist.rank, "soco")
        if dist.is_main:
            save_config(cfg, os.path.join(cfg.run.output_dir, "config.yaml"))
        try:
            return run(cfg, dist, logger)
        except (AnnotationError, CategoryMismatchError, EvaluationError) as e:
            raise SystemExit(f"error: {e}") from e
    except Preempted as e:
        logger.warning("%s", e)
        raise SystemExit(REQUEUE_EXIT_CODE) from None
    finally:
        sdist.cleanup_distributed()


if __name__ == "__main__":
    main()
