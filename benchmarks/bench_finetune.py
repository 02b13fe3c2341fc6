"""Training (and evaluation) images/s: our fine-tuning loop vs torchvision's reference recipe.

Same detector (Mask R-CNN R-FPN with the 4conv1fc head, built once per path, every path starting
from the same weights), same batch, same image size, same images, in one run:

* **reference**: a re-implementation of torchvision ``references/detection`` training: the
  dataset decodes every mask at the original resolution, converts the image to float in the
  worker, flips; the model's ``GeneralizedRCNNTransform`` resizes image and masks on the main
  process; plain Python loop with ``loss_dict`` sum, a loss reduction and ``.item()`` each step,
  ``zero_grad`` / ``backward`` / ``SGD.step`` (default implementation), optional autocast +
  GradScaler.
* **ours**: :mod:`transfer.engine` / :mod:`transfer.data`: resize and mask rasterisation at the
  final size in the workers on uint8, uint8 transfer and normalisation on the device,
  channels_last (CUDA), AMP (``--amp``), fused (CUDA) / foreach SGD, all-rank finite check;
  timed twice: with ``parity="torchvision"`` (torchvision's components, no aspect grouping, the
  model resizes test images) and with ``parity="detectron2"`` (the recipes' default: aligned
  RoIAlign, L1 losses, aspect-ratio grouping, test resize in the workers, aligned mask pasting).
  The last column is the cost of detectron2 parity, ``torchvision / detectron2 - 1``.

Each path runs ``--repeats`` times, interleaved, and the best rate is kept (the CPU is shared).
On a CPU shared with other jobs, ``--clock cpu --workers 0`` counts this process's CPU seconds
(data loading included) instead of wall-clock seconds.

CPU at small sizes by default; on a GPU: ``--device cuda --amp bf16 --size 800 --backbone resnet50``.

    python benchmarks/bench_finetune.py                       # CPU, R50-FPN at 160 px
    python benchmarks/bench_finetune.py --device cuda --amp bf16 --size 800 --batch 4 --iters 30
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from socokit.backbones import PIXEL_CONVENTION
from demo.data import make_demo_data
from socokit.training import autocast_context, make_grad_scaler
from transfer.data import build_test_loader, build_train_loader, load_split
from transfer.engine import TrainState, train_step
from transfer.evaluation import DetectionEvaluator, run_inference
from transfer.models import build_detector
from transfer.solver import Schedule, build_optimizer


class ReferenceCocoDataset(Dataset):
    """torchvision references/detection style: full-resolution masks, float image, flip."""

    def __init__(self, root: str, ann_file: str):
        self.root, self.coco = root, COCO(ann_file)
        self.ids = [i for i in sorted(self.coco.imgs) if any(not a["iscrowd"] for a in self.coco.imgToAnns[i])]
        self.cat_to_label = {c: i + 1 for i, c in enumerate(sorted(self.coco.cats))}

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, idx):
        info = self.coco.imgs[self.ids[idx]]
        image = Image.open(f"{self.root}/{info['file_name']}").convert("RGB")
        w, h = image.size
        anns = [a for a in self.coco.imgToAnns[info["id"]] if not a["iscrowd"]]
        boxes = torch.as_tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, w)
        boxes[:, 1::2].clamp_(0, h)
        masks = []
        for a in anns:
            rles = mask_utils.frPyObjects(a["segmentation"], h, w)
            m = mask_utils.decode(rles)
            masks.append(torch.as_tensor(m.any(axis=2) if m.ndim == 3 else m, dtype=torch.uint8))
        masks = torch.stack(masks) if masks else torch.zeros((0, h, w), dtype=torch.uint8)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        target = {"boxes": boxes[keep], "masks": masks[keep],
                  "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64)[keep]}
        img = TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True)
        if random.random() < 0.5:
            img = img.flip(-1)
            target["boxes"] = target["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor([w, 0, w, 0])
            target["masks"] = target["masks"].flip(-1)
        return img, target


# --heads narrow: the demo recipe's widths and RoI counts (transfer/configs/demo_cpu.yaml), for a
# CPU shared with other jobs; the full recipe heads cost ~100 GFLOP per step in the box head alone
NARROW_HEADS = dict(fpn_channels=32, conv_dim=32, fc_dim=128, mask_dim=32, rpn_post_nms_top_n_train=200,
                    rpn_post_nms_top_n_test=200, box_batch_size_per_image=64)


_WEIGHTS: dict = {}


def _model(args, device, ours: bool, parity: str = "torchvision"):
    """The detector of one path, with the same weights in every path.

    The weights are the ``parity="detectron2"`` initialisation, loaded into every path (the R-CNN
    state-dict keys do not depend on the parity mode): the number of proposals, foreground RoIs and
    detections, and so the cost of the mask branch, then depends on the code, not on the init.
    """
    def build(p):
        torch.manual_seed(0)
        return build_detector("maskrcnn_fpn", backbone=args.backbone, num_classes=11, norm="bn",
                              min_size=args.size, max_size=args.max_size,
                              channels_last=ours and device.type == "cuda", parity=p,
                              **(NARROW_HEADS if args.heads == "narrow" else {}))
    if "state" not in _WEIGHTS:
        _WEIGHTS["state"] = build("detectron2").state_dict()
    model = build(parity)
    model.load_state_dict(_WEIGHTS["state"])
    if not ours:
        model.transform = GeneralizedRCNNTransform(args.size, args.max_size, PIXEL_CONVENTION["mean"],
                                                   PIXEL_CONVENTION["std"])
    model.to(device, memory_format=torch.channels_last if ours and device.type == "cuda" else torch.preserve_format)
    return model.train()


def _now(args) -> float:
    """Wall-clock seconds, or this process's CPU seconds with ``--clock cpu`` (use --workers 0)."""
    return time.process_time() if args.clock == "cpu" else time.perf_counter()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_reference(args, data, device) -> float:
    model = _model(args, device, ours=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.002, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    loader = DataLoader(ReferenceCocoDataset(data["coco_train_images"], data["coco_train_json"]),
                        batch_size=args.batch, shuffle=True, num_workers=args.workers, drop_last=True,
                        collate_fn=lambda b: tuple(zip(*b)), persistent_workers=args.workers > 0,
                        generator=torch.Generator().manual_seed(0))
    it, n, start = 0, 0, None
    while True:
        for images, targets in loader:
            if it == args.warmup:
                _sync(device)
                start, n = _now(args), 0
            images = [img.to(device) for img in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            with autocast_context(device, args.amp):
                loss_dict = model(images, targets)
                losses = sum(loss for loss in loss_dict.values())
            loss_value = sum(v.detach() for v in loss_dict.values()).item()  # reduce_dict + .item()
            if not np.isfinite(loss_value):
                raise SystemExit(f"reference loss is {loss_value}")
            optimizer.zero_grad()
            if scaler is not None:
                scaler.scale(losses).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                losses.backward()
                optimizer.step()
            it += 1
            n += len(images)
            if it == args.warmup + args.iters:
                _sync(device)
                return n / (_now(args) - start)


def bench_ours(args, data, device, parity: str) -> float:
    model = _model(args, device, ours=True, parity=parity)
    records, _, _ = load_split(data["coco_train_images"], data["coco_train_json"])
    loader, _ = build_train_loader(records, data["coco_train_images"], batch_size=args.batch, seed=0, rank=0,
                                   world_size=1, start_iter=0, min_sizes=(args.size,), max_size=args.max_size,
                                   num_workers=args.workers, pin_memory=device.type == "cuda",
                                   group_aspect=parity == "detectron2")
    state = TrainState(optimizer=build_optimizer(model, 0.002), scaler=make_grad_scaler(device, args.amp),
                       schedule=Schedule(max_iter=10 ** 9, steps=(), warmup_iters=0, lr=0.002), amp=args.amp)
    data_iter = iter(loader)
    for _ in range(args.warmup):
        train_step(model, [next(data_iter)], state, device)
    _sync(device)
    start = _now(args)
    for _ in range(args.iters):
        train_step(model, [next(data_iter)], state, device)
    _sync(device)
    return args.iters * args.batch / (_now(args) - start)


def bench_eval(args, data, device, ours: bool, parity: str = "torchvision") -> float:
    model = _model(args, device, ours, parity).eval()
    records, categories, api = load_split(data["coco_val_images"], data["coco_val_json"])
    evaluator = DetectionEvaluator(api, [0] + [c["id"] for c in categories], with_masks=True)
    loader, _ = build_test_loader(records, data["coco_val_images"], rank=0, world_size=1, num_workers=args.workers,
                                  resize=(args.size, args.max_size) if parity == "detectron2" else None)
    start = _now(args)
    if not ours:  # reference: float images from the loader (lazy, so it is timed too)
        loader = (([img.float() / 255 for img in images], targets) for images, targets in loader)
    run_inference(model, loader, evaluator, device, lambda: autocast_context(device, args.amp))
    _sync(device)
    return len(records) / (_now(args) - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="mixed precision for both paths")
    p.add_argument("--backbone", default="resnet50", help="detector backbone (same for both paths)")
    p.add_argument("--size", type=int, default=160, help="training/test shorter side")
    p.add_argument("--max-size", type=int, default=213, help="cap on the longer side")
    p.add_argument("--batch", type=int, default=2, help="images per step")
    p.add_argument("--iters", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (both paths)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave)")
    p.add_argument("--images", type=int, default=24, help="synthetic COCO-style training images")
    p.add_argument("--measure", default="both", choices=("both", "train", "eval"), help="what to time")
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs per path; the best rate is kept")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="wall: images per wall-clock second; cpu: per CPU second of this process "
                        "(with --workers 0 it includes data loading; insensitive to other jobs on a shared CPU)")
    p.add_argument("--heads", default="full", choices=("full", "narrow"),
                   help="full: the recipes' head widths and RoI counts; narrow: the demo recipe's (busy CPUs)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_demo_data(f"{tmp}/demo", num_classes=1, images_per_class=1, coco_train=args.images,
                              coco_val=max(8, args.images // 4), image_size=(args.size * 3 // 4, args.size * 4 // 3),
                              photos=False, progress=False)
        if args.clock == "cpu" and (args.workers or device.type != "cpu"):
            raise SystemExit("--clock cpu needs --device cpu --workers 0 (loading must run in this process)")
        print(f"device {device}, amp {args.amp}, backbone {args.backbone}, {args.heads} heads, {args.clock} clock, "
              f"size {args.size}/{args.max_size}, "
              f"batch {args.batch}, {args.iters} timed steps after {args.warmup}, {args.workers} workers")
        if args.measure in ("both", "train"):
            rates = _interleaved(args.repeats, {
                "reference": lambda: bench_reference(args, data, device),
                "torchvision": lambda: bench_ours(args, data, device, "torchvision"),
                "detectron2": lambda: bench_ours(args, data, device, "detectron2")})
            _report("train", rates)
        if args.measure in ("both", "eval"):
            rates = _interleaved(args.repeats, {
                "reference": lambda: bench_eval(args, data, device, ours=False),
                "torchvision": lambda: bench_eval(args, data, device, ours=True),
                "detectron2": lambda: bench_eval(args, data, device, ours=True, parity="detectron2")})
            _report("eval ", rates)


def _interleaved(repeats: int, paths: dict) -> dict:
    """Best images/s of each path over ``repeats`` interleaved runs."""
    best = {name: 0.0 for name in paths}
    for _ in range(max(1, repeats)):
        for name, run in paths.items():
            best[name] = max(best[name], run())
    return best


def _report(what: str, r: dict) -> None:
    print(f"{what} images/s  reference {r['reference']:8.2f}   ours (torchvision parity) {r['torchvision']:8.2f}"
          f"   speed-up {r['torchvision'] / r['reference']:5.2f}x   ours (detectron2 parity) {r['detectron2']:8.2f}"
          f"   parity cost {100 * (r['torchvision'] / r['detectron2'] - 1):+5.1f} %")


if __name__ == "__main__":
    main()
