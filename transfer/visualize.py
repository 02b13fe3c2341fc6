"""Draw a fine-tuned detector's predictions on images and save them as PNG files.

    python transfer/visualize.py --weights output/ft/demo_cpu/model_final.pth \\
        --images data/demo/coco/val --num 8 --out output/ft/demo_cpu/vis

The detector is rebuilt from the configuration stored in the checkpoint (detector, backbone,
widths, categories, pixel convention). Boxes are drawn with the category name and score;
Mask R-CNN masks are blended in the box colour.
"""
from __future__ import annotations

import argparse
import colorsys
import dataclasses
import os

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from socokit import distributed as sdist
from socokit.checkpoint import load_checkpoint
from socokit.config import add_print_config_argument, config_from_dict, parse_args_or_print
from socokit.errors import exit_on_user_error
from socokit.fileio import CheckpointError, check_writable_dir
from socokit.images import ImageError, find_images, load_rgb
from transfer.config import FinetuneConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_print_config_argument(p)
    p.add_argument("--weights", required=True, help="fine-tuning checkpoint (model_final.pth / current.pth)")
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--num", type=int, default=8, help="number of images to draw (the first N, sorted)")
    p.add_argument("--score-thresh", type=float, default=0.5, help="draw detections scoring at least this")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    return p


def colour(i: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: Image.Image, output: dict, names: list[str], score_thresh: float) -> Image.Image:
    """Overlay boxes (xyxy), labels, scores and masks (``[N, 1, H, W]`` probabilities)."""
    canvas = np.asarray(image, dtype=np.float32).copy()
    keep = (output["scores"] >= score_thresh).nonzero().flatten().tolist()
    if "masks" in output:
        for i in keep:
            m = (output["masks"][i, 0] > 0.5).cpu().numpy()
            canvas[m] = 0.5 * canvas[m] + 0.5 * np.array(colour(int(output["labels"][i])), dtype=np.float32)
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for i in keep:
        x1, y1, x2, y2 = output["boxes"][i].tolist()
        label = int(output["labels"][i])
        c = colour(label)
        draw.rectangle([x1, y1, x2, y2], outline=c, width=2)
        name = names[label] if label < len(names) else str(label)
        draw.text((x1 + 2, max(0, y1 - 11)), f"{name} {float(output['scores'][i]):.2f}", fill=c)
    return out


def load_detector(path: str, device: torch.device):
    """Rebuild the detector of a fine-tuning checkpoint; returns (model in eval mode, class names)."""
    from transfer.finetune import build_model

    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from e
    if not isinstance(ckpt, dict) or "config" not in ckpt or "categories" not in ckpt:
        raise SystemExit(f"error: {path}: not a fine-tuning checkpoint of transfer/finetune.py")
    cfg = config_from_dict(FinetuneConfig, ckpt["config"], recipe=f"{path} (stored configuration)",
                           ignore_unknown=True)
    if "syncbn" in cfg.model.norm:  # inference: no process group
        cfg.model = dataclasses.replace(cfg.model, norm=cfg.model.norm.replace("syncbn", "bn"))
    dist = sdist.DistInfo(0, 1, 0, device, False)
    model, _, _ = build_model(cfg, dist, len(ckpt["categories"]) + 1, pixel=ckpt["pixel"],
                              stride_in_1x1=bool(ckpt.get("stride_in_1x1")))
    model.load_state_dict(ckpt["model"], strict=True)
    names = ["background"] + [c["name"] for c in ckpt["categories"]]
    return model.to(device).eval(), names


@exit_on_user_error
@torch.no_grad()
def main(argv=None) -> list[str]:
    args = parse_args_or_print(build_parser(), argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model, names = load_detector(args.weights, device)
    files = find_images(args.images)[: args.num]
    if not files:
        raise SystemExit(f"error: no images under {args.images!r}")
    check_writable_dir(args.out)
    written = []
    for rel in tqdm(files, desc="drawing"):
        try:
            image = load_rgb(os.path.join(args.images, rel))
        except ImageError as e:
            print(f"skipping {e.path}: {e.reason}")
            continue
        tensor = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).to(device)
        output = {k: v.cpu() for k, v in model([tensor])[0].items()}
        path = os.path.join(args.out, os.path.splitext(rel.replace("/", "_"))[0] + ".png")
        draw_detections(image, output, names, args.score_thresh).save(path)
        written.append(path)
    print(f"wrote {len(written)} images to {args.out}")
    return written


if __name__ == "__main__":
    main()
