#!/usr/bin/env python
"""End-to-end demo on the embedded data: every stage run as a user would run it.

    python scripts/run_demo.py [--out demo_output] [--data data/demo] [--baseline] [--force]

Stages: make the embedded data; selective search, filtering and drawing of proposals; a tiny
SoCo_FPN pretraining on the proposals; conversion of its checkpoint to a detection
initialisation; Mask R-CNN fine-tuning from it with COCO box/mask AP (``--baseline`` adds the
same fine-tuning from scratch for comparison). The demo checks the plumbing; it does not measure
pretraining (see docs/study_small.md for the small-scale study). Each stage is the toolkit's own command line
(printed before it runs), so the log doubles as a tutorial. A stage whose output already exists
is skipped, so an interrupted demo resumes where it stopped; ``--force`` redoes everything.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_stage(title: str, cmd: list[str], done: str, force: bool, timings: dict,
              env: dict | None = None) -> None:
    """Run ``cmd`` unless ``done`` exists; stop the demo with the stage's name on failure."""
    prefix = "".join(f"{k}={v} " for k, v in (env or {}).items())
    print(f"\n=== {title}\n$ {prefix}{' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    if os.path.exists(done) and not force:
        print(f"(skipped: {done} exists; --force redoes it)")
        timings[title] = None
        return
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})})
    timings[title] = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"demo stopped: stage '{title}' failed with exit code {proc.returncode}")


def py(*args: str) -> list[str]:
    return [sys.executable, *args]


# The CPU stages of pretraining and fine-tuning get one BLAS/OpenMP thread per process: the
# data-loader workers use the other core (two threads per process only fight on 2 cores).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def build_stages(a: argparse.Namespace) -> list[tuple]:
    """(title, command, file that exists once the stage is done[, extra environment])."""
    data, out = a.data, a.out
    raw = f"{out}/proposals/train.proposals"
    filtered = f"{out}/proposals/train_ratio3size0308post.proposals"
    pre = f"{out}/pretrain"
    init = f"{out}/convert/soco_tiny_det.pth"
    iters = []  # the recipe's schedule, or a shorter/longer one with the steps at the same fractions
    if a.finetune_iters:
        n = a.finetune_iters
        iters = ["--max-iter", str(n), "--steps", str(round(0.8 * n)), str(round(0.94 * n))]

    def finetune(init_arg: str, name: str) -> list[str]:
        return py("transfer/finetune.py", "--config", "transfer/configs/demo_cpu.yaml",
                  "--train-images", f"{data}/coco/train",
                  "--train-ann", f"{data}/coco/annotations/instances_train.json",
                  "--val-images", f"{data}/coco/val",
                  "--val-ann", f"{data}/coco/annotations/instances_val.json",
                  "--init", init_arg, "--output-dir", f"{out}/finetune/{name}", *iters)

    stages = [
        ("embedded data", py("-m", "demo.data", "--out", data), f"{data}/demo_data.json"),
        ("selective search (soco backend)",
         py("selective_search/generate_proposals.py", "--image-root", f"{data}/imagenet/train",
            "--output", raw, "--backend", "soco", "--workers", str(a.workers)), f"{raw}/meta.json"),
        ("filter ratio3size0308 + post step",
         py("selective_search/filter_proposals.py", raw, filtered, "--strategy", "ratio3size0308", "--post"),
         f"{filtered}/meta.json"),
        ("draw proposals",
         py("selective_search/visualize.py", filtered, "--image-root", f"{data}/imagenet/train",
            "--num", "16", "--out", f"{out}/proposals/grid.png"), f"{out}/proposals/grid.png"),
        ("selective search on real photos (soco, downscaled to 400 px)",
         py("selective_search/generate_proposals.py", "--image-root", f"{data}/photos",
            "--output", f"{out}/proposals/photos.proposals", "--backend", "soco",
            "--max-side", "400", "--workers", str(a.workers), "--filter", "ratio3size0308"),
         f"{out}/proposals/photos.proposals/meta.json"),
        ("SoCo pretraining (SoCo_FPN, tiny CPU recipe)",
         py("pretrain/train.py", "--config", "pretrain/configs/tiny_cpu.yaml",
            "--data", f"{data}/imagenet/train", "--proposals", filtered, "--output-dir", pre,
            "--epochs", str(a.pretrain_epochs), "--auto-resume"),
         f"{pre}/ckpt_epoch_{a.pretrain_epochs:04d}.pth", ONE_THREAD),
        ("convert the pretrained checkpoint to a detection initialisation",
         py("transfer/convert.py", f"{pre}/ckpt_epoch_{a.pretrain_epochs:04d}.pth", init), init),
        ("fine-tune Mask R-CNN on the embedded COCO-style set from the SoCo initialisation",
         finetune(init, "soco"), f"{out}/finetune/soco/metrics.json", ONE_THREAD),
    ]
    if a.baseline:
        stages.append(
            ("fine-tune the same detector from scratch (baseline)",
             finetune("scratch", "scratch"), f"{out}/finetune/scratch/metrics.json", ONE_THREAD))
    return stages


def summary(a: argparse.Namespace, timings: dict) -> None:
    print("\n=== summary")
    for name in ("train.proposals", "train_ratio3size0308post.proposals"):
        meta_file = os.path.join(ROOT, a.out, "proposals", name, "meta.json")
        if os.path.isfile(meta_file):
            with open(meta_file) as f:
                m = json.load(f)
            print(f"{name:40s} images {m['num_images']:5d}  boxes {m['num_boxes']:7d}  "
                  f"without boxes {m['num_images_without_boxes']:3d}  unreadable {m['num_unreadable']}")
    rows = []
    for name in ("soco", "scratch"):
        metrics_file = os.path.join(ROOT, a.out, "finetune", name, "metrics.json")
        if os.path.isfile(metrics_file):
            with open(metrics_file) as f:
                m = json.load(f)
            for task in ("bbox", "segm"):
                if task in m:
                    rows.append((f"{name} init, {m['iteration']} it.", task, m[task]))
    if rows:
        keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
        print(f"\nCOCO metrics on the demo val set (percent; {a.out}/finetune/*/metrics.json)")
        print(f"{'fine-tuned from':24s} {'task':5s} " + " ".join(f"{k:>6s}" for k in keys))
        for label, task, vals in rows:
            cells = " ".join(f"{vals[k]:6.2f}" if vals.get(k) is not None else f"{'n/a':>6s}" for k in keys)
            print(f"{label:24s} {task:5s} {cells}")
        print()
    width = max(len(k) for k in timings)
    for k, v in timings.items():
        print(f"{k:{width}s}  " + (f"{v:7.1f} s" if v is not None else "skipped (done before)"))
    print(f"{'total':{width}s}  {sum(v for v in timings.values() if v is not None):7.1f} s")
    print("\nThe demo checks that every stage runs; it does not measure pretraining. Its pretraining sees "
          "240 images (30 iterations), far too few to learn features, so the SoCo row is not expected to "
          "beat scratch. Whether pretraining helps at small budgets: docs/study_small.md "
          "(python benchmarks/study_small.py).")


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/demo", help="where the embedded dataset is generated")
    p.add_argument("--out", default="demo_output", help="folder for every artifact of the demo")
    p.add_argument("--workers", type=int, default=2, help="processes for selective search")
    p.add_argument("--pretrain-epochs", type=int, default=2, help="epochs of the tiny SoCo pretraining")
    p.add_argument("--finetune-iters", type=int, default=None,
                   help="fine-tuning iterations (default: the recipe's 500; LR steps at 80%% and 94%%)")
    p.add_argument("--baseline", action="store_true",
                   help="also fine-tune from scratch, to compare with the SoCo initialisation")
    p.add_argument("--force", action="store_true", help="redo stages whose outputs exist")
    return p


def main(argv=None) -> None:
    a = build_arg_parser().parse_args(argv)
    timings: dict[str, float | None] = {}
    for title, cmd, done, *env in build_stages(a):
        run_stage(title, cmd, os.path.join(ROOT, done), a.force, timings, *env)
    summary(a, timings)


if __name__ == "__main__":
    main()
