"""One-command check of the GPU paths: throughput, memory, MFU, data waiting, CPU/GPU agreement.

Runs, on one device, and prints one table:

1. SoCo_FPN pretraining (ResNet-50, 224 px, bf16, batch 64, ~30 steps) with the real data
   pipeline (generated JPEGs + proposals, DataLoader workers), for ``head_mode`` faithful and
   batched: images/s, peak memory, MFU (FLOPs counted by ``torch.utils.flop_counter`` over one
   step) and the share of the step time spent waiting for the loader.
2. Mask R-CNN R50-FPN fine-tuning at 800x1333 (:mod:`transfer.engine`), ~30 iterations in fp32
   and bf16 (images/s, peak memory), then evaluation on 50 images (images/s).
3. One pretraining loss and one Mask R-CNN loss for the same batch and weights computed in
   float32 on the CPU and on the device (TF32 off); the relative difference must be within the
   stated tolerance (on a CPU-only run both sides run on the CPU: the row only shows the
   check works).

``--tiny`` shrinks everything (timm ResNet-18, 64-96 px, batch 2, 3 steps, CPU unless
``--device`` says otherwise) so that the whole script runs in the tests. On the CPU every row
runs in fp32 (bf16 convolutions are emulated there)::

    bash scripts/gpu_check.sh            # on a GPU machine, < 8 minutes on one H100/H200
    bash scripts/gpu_check.sh --tiny     # CPU smoke run (~1-2 min)
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # this folder's benchmarks; the checkout's packages

import bench_finetune  # noqa: E402  (same folder)
import bench_pretrain_data  # noqa: E402

from demo.data import make_demo_data  # noqa: E402
from pretrain.config import PretrainDataConfig  # noqa: E402
from pretrain.data import build_pretrain_dataset  # noqa: E402
from pretrain.engine import move_batch  # noqa: E402
from pretrain.models import build_model  # noqa: E402
from socokit.training import autocast_context  # noqa: E402
from transfer.models import build_detector  # noqa: E402

#: relative |CPU - device| / |CPU| allowed for the two float32 losses (TF32 off)
LOSS_RTOL = 1e-3


@dataclass
class Settings:
    device: torch.device
    tiny: bool
    backbone: str
    image_size: int
    batch: int
    steps: int
    warmup: int
    workers: int
    det_backbone: str
    det_size: int
    det_max_size: int
    det_batch: int
    det_iters: int
    eval_images: int
    peak_tflops: float


def make_settings(args) -> Settings:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny
                                          else "cpu"))
    if args.tiny:
        return Settings(device, True, "timm:resnet18", 64, 2, 3, 1, 0, "resnet18", 96, 128, 1, 2,
                        4, args.peak_tflops)
    return Settings(device, False, "resnet50", 224, args.batch, args.steps, 5, args.workers,
                    "resnet50", 800, 1333, args.det_batch, args.steps, 50, args.peak_tflops)


def _amp(s: Settings) -> str:
    """bf16 on CUDA; fp32 on the CPU, where bf16 convolutions are emulated and very slow."""
    return "bf16" if s.device.type == "cuda" else "none"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else math.nan


def pretrain_row(s: Settings, head_mode: str, root: str, store: str, amp: str) -> dict:
    """Pretraining steps fed by the real loader; time waiting for data is measured apart."""
    dataset = build_pretrain_dataset(root, store, PretrainDataConfig(image_size=s.image_size), arch="SoCo_FPN")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=s.batch, shuffle=True, num_workers=s.workers, drop_last=True,
        pin_memory=s.device.type == "cuda", persistent_workers=s.workers > 0,
        generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = build_model("SoCo_FPN", backbone=s.backbone, head_mode=head_mode).to(s.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(batch):
        views, boxes, corres, _ = move_batch(batch, s.device)
        model.update_target(0.99)
        with autocast_context(s.device, amp):
            loss = model(views, boxes, corres)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    from torch.utils.flop_counter import FlopCounterMode

    batches = iter(_forever(loader))
    for _ in range(s.warmup):
        step(next(batches))
    with FlopCounterMode(display=False) as counter:
        step(next(batches))
    flops = counter.get_total_flops()
    _sync(s.device)
    _reset_peak(s.device)
    wait = 0.0
    start = time.perf_counter()
    for _ in range(s.steps):
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        loss = step(batch)
        _sync(s.device)  # the next wait must not include this step's queued GPU work
    total = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise RuntimeError(f"pretraining loss is {loss.item()}")
    return {"what": f"pretrain SoCo_FPN {head_mode}", "setting":
            f"{s.backbone} {s.image_size}px {amp} b{s.batch} w{s.workers}",
            "images_s": s.batch * s.steps / total, "peak_mib": _peak_mib(s.device),
            "mfu": flops * s.steps / total / (s.peak_tflops * 1e12), "data_wait": wait / total}


def _forever(loader):
    while True:
        yield from loader


def detection_rows(s: Settings, data: dict) -> list[dict]:
    """Mask R-CNN R-FPN training (fp32, bf16) and evaluation, through the project's loop."""
    rows = []
    for amp in ("none", _amp(s)):
        if amp == "none" and rows:
            break  # no bf16 on this device: one fp32 row
        args = argparse.Namespace(backbone=s.det_backbone, size=s.det_size, max_size=s.det_max_size,
                                  batch=s.det_batch, iters=s.det_iters, warmup=2 if s.tiny else 5,
                                  workers=s.workers, amp=amp, clock="wall",
                                  heads="narrow" if s.tiny else "full")
        _reset_peak(s.device)
        images_s = bench_finetune.bench_ours(args, data, s.device, "detectron2")
        rows.append({"what": "Mask R-CNN R-FPN train", "setting":
                     f"{s.det_backbone} {s.det_size}x{s.det_max_size} {amp} b{s.det_batch}",
                     "images_s": images_s, "peak_mib": _peak_mib(s.device), "mfu": math.nan,
                     "data_wait": math.nan})
    args.amp = _amp(s)
    _reset_peak(s.device)
    images_s = bench_finetune.bench_eval(args, data, s.device, ours=True, parity="detectron2")
    rows.append({"what": "Mask R-CNN R-FPN eval", "setting":
                 f"{s.eval_images} images {s.det_size}x{s.det_max_size} {args.amp}",
                 "images_s": images_s, "peak_mib": _peak_mib(s.device), "mfu": math.nan,
                 "data_wait": math.nan})
    return rows


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-12)


def pretrain_loss_agreement(s: Settings, root: str, store: str) -> dict:
    """The same batch and weights in float32: CPU vs the device."""
    dataset = build_pretrain_dataset(root, store, PretrainDataConfig(image_size=s.image_size), arch="SoCo_FPN")
    batch = torch.utils.data.default_collate([dataset[i] for i in range(min(4, len(dataset)))])
    torch.manual_seed(0)
    model = build_model("SoCo_FPN", backbone=s.backbone)
    losses = []
    for device in (torch.device("cpu"), s.device):
        m = copy.deepcopy(model).to(device)
        views, boxes, corres, _ = move_batch(batch, device)
        with torch.no_grad():
            loss = m(views, boxes, corres)["loss"]
        losses.append(float(loss))
    return {"what": f"pretrain loss, CPU vs {s.device.type} (fp32)", "values": losses,
            "rel_diff": _relative(*losses)}


def detection_loss_agreement(s: Settings, data: dict) -> dict:
    """Mask R-CNN training loss for one batch; the samplers keep every anchor and proposal,
    so no random subset differs between the devices."""
    from transfer.data import build_train_loader, load_split
    from transfer.engine import to_device

    records, _, _ = load_split(data["coco_train_images"], data["coco_train_json"])
    loader, _ = build_train_loader(records, data["coco_train_images"], batch_size=2, seed=0,
                                   rank=0, world_size=1, start_iter=0, min_sizes=(s.det_size,),
                                   max_size=s.det_max_size, num_workers=0, pin_memory=False)
    images, targets = next(iter(loader))
    torch.manual_seed(0)
    # torchvision parity: its losses are averaged over the sampled anchors/proposals, which
    # stays meaningful when every one is kept (detectron2's divide by the nominal batch size)
    model = build_detector("maskrcnn_fpn", backbone=s.det_backbone, num_classes=11, norm="bn",
                           min_size=s.det_size, max_size=s.det_max_size,
                           parity="torchvision").train()
    for sampler in (model.rpn.fg_bg_sampler, model.roi_heads.fg_bg_sampler):
        sampler.batch_size_per_image = 10**9  # keep all: the subset does not depend on the RNG
    losses = []
    for device in (torch.device("cpu"), s.device):
        m = copy.deepcopy(model).to(device)
        with torch.no_grad():
            loss_dict = m(*to_device(images, targets, device))
        losses.append(float(sum(loss_dict.values())))
    return {"what": f"Mask R-CNN loss, CPU vs {s.device.type} (fp32)", "values": losses,
            "rel_diff": _relative(*losses)}


def _cell(value, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec) + suffix


def print_table(s: Settings, rows: list[dict], checks: list[dict], seconds: float) -> None:
    """One markdown table: throughput rows, then the two agreement checks."""
    name = torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else "CPU"
    print(f"\n# gpu_check on {s.device} ({name}), torch {torch.__version__}, "
          f"{'tiny mode' if s.tiny else 'full mode'}, {seconds:.0f} s; MFU against "
          f"{s.peak_tflops:g} TFLOP/s")
    header = ("what", "setting", "images/s", "peak MiB", "MFU", "data wait")
    table = [header]
    for r in rows:
        table.append((r["what"], r["setting"], _cell(r["images_s"], ".1f"),
                      _cell(r["peak_mib"], ".0f"), _cell(r["mfu"] * 100, ".1f", "%"),
                      _cell(r["data_wait"] * 100, ".1f", "%")))
    for c in checks:
        verdict = "ok" if c["rel_diff"] <= LOSS_RTOL else "FAILED"
        table.append((c["what"], f"{c['values'][0]:.6f} vs {c['values'][1]:.6f}",
                      f"rel. diff {c['rel_diff']:.1e}", f"tol {LOSS_RTOL:g}", verdict, ""))
    widths = [max(len(row[k]) for row in table) for k in range(len(header))]
    for i, row in enumerate(table):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="small models, sizes and step counts (CPU smoke run for the tests)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--batch", type=int, default=64, help="pretraining batch")
    parser.add_argument("--det-batch", type=int, default=4, help="Mask R-CNN batch")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="DataLoader workers")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak of the device for MFU (H100/H200 SXM: 989)")
    args = parser.parse_args(argv)
    s = make_settings(args)
    if s.device.type == "cuda":
        if not torch.cuda.is_available():
            print("error: --device cuda but CUDA is not available", file=sys.stderr)
            return 2
        torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    rows, checks, errors = [], [], []

    def attempt(what: str, fn, *fn_args):
        """Run one measurement; a failure is reported in the table and the next one still runs."""
        print(f"{what} ...", flush=True)
        try:
            return fn(*fn_args)
        except Exception as err:  # noqa: BLE001 - the table names the failure; the exit code is 1
            import traceback

            traceback.print_exc()
            errors.append({"what": what, "error": f"{type(err).__name__}: {err}"})
            return None

    with tempfile.TemporaryDirectory() as tmp:
        n_images = max(2 * s.batch, 8) if s.tiny else 4 * s.batch
        store = bench_pretrain_data.make_images(tmp, n_images, 60)
        for head_mode in ("faithful", "batched"):
            row = attempt(f"pretrain SoCo_FPN {head_mode}", pretrain_row, s, head_mode, tmp, store, _amp(s))
            rows += [row] if row else []
        side = (s.det_size * 3 // 4, s.det_size) if s.tiny else (600, 800)
        data = make_demo_data(f"{tmp}/coco", num_classes=1, images_per_class=1,
                              coco_train=max(8, 4 * s.det_batch), coco_val=s.eval_images,
                              image_size=side, photos=False, progress=False)
        rows += attempt("Mask R-CNN training and evaluation", detection_rows, s, data) or []
        if s.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        for what, fn, fn_args in (("pretrain loss, CPU vs device", pretrain_loss_agreement, (s, tmp, store)),
                                  ("Mask R-CNN loss, CPU vs device", detection_loss_agreement, (s, data))):
            check = attempt(what, fn, *fn_args)
            checks += [check] if check else []
    print_table(s, rows, checks, time.perf_counter() - start)
    for e in errors:
        print(f"FAILED: {e['what']}: {e['error']}")
    return 0 if not errors and all(c["rel_diff"] <= LOSS_RTOL for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
