"""Throughput of the pretraining data pipeline per core, against a fixed yardstick.

The yardstick is a plain two-view pipeline built from the original release's torchvision
transforms, unchanged: decode, then per view ``RandomResizedCrop(224, scale=(0.5, 1))``,
``RandomHorizontalFlip``, and the release's post_1 / post_2 compositions (``ColorJitter(0.4,
0.4, 0.2, 0.1)`` p 0.8, ``RandomGrayscale`` p 0.2, PIL Gaussian blur p 1.0 / 0.1, solarize
p 0 / 0.2, ``ToTensor``, ``Normalize``). Our pipelines are measured against it in the same run:
SoCo_FPN (three views with boxes), also with ``colour_on_device`` (the loader part: decode,
crops, resizes, flips, boxes and the drawn colour parameters; the colour itself then runs on
the GPU), BYOL and the other recipes.

Generates ``--images`` JPEGs of about 500x375 (smooth noise + rectangles, so JPEG decoding
costs what a photo costs) with ``--boxes`` random proposals each, then measures samples/s of
``ds[i]`` (decode included) in this single process with one torch thread, i.e. per core.
Time is this process's CPU time (``time.process_time``), which other processes on a shared
machine do not inflate; wall time is printed too. Rounds alternate between pipelines and the
median round counts.

    python benchmarks/bench_pretrain_data.py --images 48 --rounds 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms

from pretrain.config import PretrainDataConfig
from pretrain.data import build_pretrain_dataset
from socokit.proposal_store import write_store

YARDSTICK = "yardstick: release transforms, 2 views"
PIPELINES = {  # key: (printed name, build kwargs)
    "byol": ("BYOL (2 views 224, image-only)", dict(arch="BYOL")),
    "fpn": ("SoCo_FPN (224/224/112 + boxes)", dict(arch="SoCo_FPN")),
    "fpn_device": ("SoCo_FPN, colour on device (loader)",
                   dict(arch="SoCo_FPN", cfg=PretrainDataConfig(colour_on_device=True))),
    "fpn_cutout": ("SoCo_FPN + cutout",
                   dict(arch="SoCo_FPN", cfg=PretrainDataConfig(aug="ImageAsymBboxAwareMultiJitter1Cutout"))),
    "fpn_star": ("SoCo_FPN_Star (224/224/192/112)", dict(arch="SoCo_FPN_Star")),
    "c4": ("SoCo_C4 (224/224 + boxes, cutout)", dict(arch="SoCo_C4", cfg=PretrainDataConfig(crop=0.6))),
}
BASELINE, MAIN, DEVICE = PIPELINES["byol"][0], PIPELINES["fpn"][0], PIPELINES["fpn_device"][0]


class _ReleaseBlur:
    """The release's Gaussian blur: PIL GaussianBlur with radius ~ U(0.1, 2.0) (NumPy's stream)."""

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=np.random.uniform(0.1, 2.0)))


class ReleaseTwoViewDataset(Dataset):
    """The yardstick: the original release's torchvision transforms, two 224 views per image."""

    def __init__(self, root: str, paths: list[str]):
        self.paths = [os.path.join(root, p) for p in paths]
        normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
        jitter = transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8)
        self.crop = transforms.Compose([transforms.RandomResizedCrop(224, scale=(0.5, 1.0)),
                                        transforms.RandomHorizontalFlip()])
        self.post_1 = transforms.Compose([jitter, transforms.RandomGrayscale(p=0.2),
                                          transforms.RandomApply([_ReleaseBlur()], p=1.0),
                                          transforms.ToTensor(), normalize])
        self.post_2 = transforms.Compose([jitter, transforms.RandomGrayscale(p=0.2),
                                          transforms.RandomApply([_ReleaseBlur()], p=0.1),
                                          transforms.RandomApply([ImageOps.solarize], p=0.2),
                                          transforms.ToTensor(), normalize])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        img = Image.open(self.paths[index]).convert("RGB")
        return self.post_1(self.crop(img)), self.post_2(self.crop(img))


def make_images(root: str, num_images: int, num_boxes: int, seed: int = 0):
    """Write JPEGs and a proposal store; returns the store folder."""
    rng = np.random.default_rng(seed)
    paths, sizes, boxes = [], [], []
    for i in range(num_images):
        h, w = (375, 500) if i % 2 == 0 else (500, 375)
        low = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
        arr = np.asarray(img).copy()
        for _ in range(6):
            x1, y1 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            arr[y1:y1 + int(rng.integers(20, 150)), x1:x1 + int(rng.integers(20, 150))] = rng.integers(0, 256, 3)
        arr = np.clip(arr.astype(np.int16) + rng.integers(-12, 13, arr.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(root, f"img{i:04d}.jpg"), quality=90)
        side = np.sqrt(h * w) * rng.uniform(0.08, 0.8, num_boxes)
        aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3), num_boxes))
        bw = np.clip(side * np.sqrt(aspect), 2, w - 1).astype(int)
        bh = np.clip(side / np.sqrt(aspect), 2, h - 1).astype(int)
        x1 = (rng.random(num_boxes) * (w - bw)).astype(int)
        y1 = (rng.random(num_boxes) * (h - bh)).astype(int)
        paths.append(f"img{i:04d}.jpg")
        sizes.append((h, w))
        boxes.append(np.stack([x1, y1, x1 + bw - 1, y1 + bh - 1], 1))
    store = os.path.join(root, "bench.proposals")
    write_store(store, paths, sizes, boxes)
    return store


def time_round(ds, num_images: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per sample over one pass of the dataset."""
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(num_images):
        ds[i]
    return (time.process_time() - cpu) / num_images, (time.perf_counter() - wall) / num_images


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="number of generated images per round")
    parser.add_argument("--boxes", type=int, default=60, help="proposals per image (SS ~60 incl. duplicates)")
    parser.add_argument("--rounds", type=int, default=5, help="timed passes per pipeline (median reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data and of the samples")
    parser.add_argument("--pipelines", default=",".join(PIPELINES),
                        help=f"comma-separated subset of {','.join(PIPELINES)} (byol and fpn are always run)")
    args = parser.parse_args(argv)
    keys = ["byol", "fpn", "fpn_device"] + [k for k in args.pipelines.split(",")
                                            if k not in ("byol", "fpn", "fpn_device")]
    unknown = [k for k in keys if k not in PIPELINES]
    if unknown:
        raise SystemExit(f"error: unknown pipelines {unknown}; choose from {list(PIPELINES)}")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        store = make_images(root, args.images, args.boxes, args.seed)
        datasets = {YARDSTICK: ReleaseTwoViewDataset(root, [f"img{i:04d}.jpg" for i in range(args.images)])}
        datasets.update({PIPELINES[k][0]: build_pretrain_dataset(root, store, **PIPELINES[k][1])
                         for k in keys})
        np.random.seed(args.seed)
        for ds in datasets.values():  # warm-up: page cache, lazy imports
            time_round(ds, min(8, args.images))
        cpu = {name: [] for name in datasets}
        wall = {name: [] for name in datasets}
        for _ in range(args.rounds):
            for name, ds in datasets.items():
                c, w = time_round(ds, args.images)
                cpu[name].append(c)
                wall[name].append(w)
    median = {name: statistics.median(t) for name, t in cpu.items()}
    print(f"pretrain data pipeline, single process, 1 torch thread, {args.images} JPEGs ~500x375, "
          f"{args.boxes} proposals/image, median of {args.rounds} rounds (CPU time of this process)")
    print(f"{'pipeline':40s} {'ms/sample':>10s} {'samples/s':>10s} {'vs yardstick':>13s} {'wall ms':>8s}")
    for name, sec in median.items():
        print(f"{name:40s} {sec * 1e3:10.2f} {1 / sec:10.1f} {median[YARDSTICK] / sec:12.2f}x "
              f"{statistics.median(wall[name]) * 1e3:8.2f}")
    print(f"SoCo_FPN samples/s per core vs the yardstick: {median[YARDSTICK] / median[MAIN]:.2f}x; "
          f"with colour on device (loader part): {median[YARDSTICK] / median[DEVICE]:.2f}x "
          f"(target >= 1.6x)")
    print(f"cost ratio SoCo_FPN / BYOL: {median[MAIN] / median[BASELINE]:.2f}x")


if __name__ == "__main__":
    main()
