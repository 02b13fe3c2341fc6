#!/usr/bin/env python
"""End-to-end demo on the embedded data: every stage run as a user would run it.

    python scripts/run_demo.py [--out demo_output] [--data data/demo] [--force]

Each stage is the toolkit's own command line (printed before it runs), so the log doubles as
a tutorial. A stage whose output already exists is skipped, so an interrupted demo resumes
where it stopped; ``--force`` redoes everything.
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


def run_stage(title: str, cmd: list[str], done: str, force: bool, timings: dict) -> None:
    """Run ``cmd`` unless ``done`` exists; stop the demo with the stage's name on failure."""
    print(f"\n=== {title}\n$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    if os.path.exists(done) and not force:
        print(f"(skipped: {done} exists; --force redoes it)")
        timings[title] = 0.0
        return
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT)
    timings[title] = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"demo stopped: stage '{title}' failed with exit code {proc.returncode}")


def py(*args: str) -> list[str]:
    return [sys.executable, *args]


def build_stages(a: argparse.Namespace) -> list[tuple[str, list[str], str]]:
    data, out = a.data, a.out
    raw = f"{out}/proposals/train.proposals"
    filtered = f"{out}/proposals/train_ratio3size0308post.proposals"
    return [
        ("embedded data", py("-m", "socokit.demo_data", "--out", data), f"{data}/demo_data.json"),
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
    ]


def summary(a: argparse.Namespace, timings: dict) -> None:
    print("\n=== summary")
    for name in ("train.proposals", "train_ratio3size0308post.proposals"):
        meta_file = os.path.join(ROOT, a.out, "proposals", name, "meta.json")
        if os.path.isfile(meta_file):
            with open(meta_file) as f:
                m = json.load(f)
            print(f"{name:40s} images {m['num_images']:5d}  boxes {m['num_boxes']:7d}  "
                  f"without boxes {m['num_images_without_boxes']:3d}  unreadable {m['num_unreadable']}")
    width = max(len(k) for k in timings)
    for k, v in timings.items():
        print(f"{k:{width}s}  {v:7.1f} s")
    print(f"{'total':{width}s}  {sum(timings.values()):7.1f} s")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/demo", help="where the embedded dataset is generated")
    p.add_argument("--out", default="demo_output", help="folder for every artifact of the demo")
    p.add_argument("--workers", type=int, default=2, help="processes for selective search")
    p.add_argument("--force", action="store_true", help="redo stages whose outputs exist")
    a = p.parse_args(argv)
    timings: dict[str, float] = {}
    for title, cmd, done in build_stages(a):
        run_stage(title, cmd, os.path.join(ROOT, done), a.force, timings)
    summary(a, timings)


if __name__ == "__main__":
    main()
