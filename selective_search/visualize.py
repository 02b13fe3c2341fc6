"""Draw the proposals of a few images of a store onto one PNG grid.

Example::

    python selective_search/visualize.py proposals/train_ratio3size0308post.proposals \\
        --image-root data/imagenet/train --num 16 --out grid.png
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np
from PIL import Image, ImageDraw

from socokit.config import HelpFormatter, add_print_config_argument, parse_args_or_print
from socokit.errors import exit_on_user_error
from socokit.fileio import atomic_write, check_writable_dir
from socokit.images import ImageError, load_rgb
from socokit.proposal_store import ProposalStore, StoreError

_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def choose_images(store: ProposalStore, num: int, seed: int | None) -> list[int]:
    """The first ``num`` images, or ``num`` random ones when ``seed`` is given."""
    n = len(store)
    if seed is None:
        return list(range(min(num, n)))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n, size=min(num, n), replace=False).tolist())


def draw_tile(image: Image.Image, boxes_xyxy: np.ndarray, tile: int, max_boxes: int,
              caption: str) -> Image.Image:
    """One grid cell: the image scaled to fit ``tile`` x ``tile`` with its boxes drawn.

    Args:
        image: RGB image in the store's frame (display orientation).
        boxes_xyxy: int [K, 4] inclusive corners in that frame.
        tile: cell side in pixels.
        max_boxes: draw at most this many boxes (the first ones).
        caption: text drawn at the top left.
    """
    scale = tile / max(image.width, image.height)
    thumb = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.BILINEAR)
    cell = Image.new("RGB", (tile, tile), (32, 32, 32))
    cell.paste(thumb, (0, 0))
    draw = ImageDraw.Draw(cell)
    for j, (x1, y1, x2, y2) in enumerate(np.asarray(boxes_xyxy)[:max_boxes].tolist()):
        # inclusive corners: the box covers pixels x1..x2, i.e. [x1, x2 + 1) in continuous units
        draw.rectangle([x1 * scale, y1 * scale, (x2 + 1) * scale - 1, (y2 + 1) * scale - 1],
                       outline=_PALETTE[j % len(_PALETTE)], width=2)
    draw.rectangle([0, 0, min(tile, 7 * len(caption) + 4), 12], fill=(0, 0, 0))
    draw.text((2, 0), caption, fill=(255, 255, 255))
    return cell


def render_grid(store_path: str, image_root: str, num: int = 16, tile: int = 256,
                max_boxes: int = 20, seed: int | None = None) -> Image.Image:
    """A grid image of ``num`` store images with their boxes (unreadable files are grey tiles)."""
    try:
        store = ProposalStore.open(store_path)
    except StoreError as e:
        raise SystemExit(f"error: {e}") from e
    indices = choose_images(store, num, seed)
    if not indices:
        raise SystemExit(f"error: {store_path} holds no images")
    cols = math.ceil(math.sqrt(len(indices)))
    rows = math.ceil(len(indices) / cols)
    grid = Image.new("RGB", (cols * tile, rows * tile), (0, 0, 0))
    for n, i in enumerate(indices):
        relpath, boxes_xyxy = store.path(i), store.boxes(i)
        try:
            image = load_rgb(os.path.join(image_root, relpath))
        except ImageError as e:
            image, boxes_xyxy = Image.new("RGB", (tile, tile), (96, 96, 96)), boxes_xyxy[:0]
            relpath = f"{relpath} ({e.reason})"
        caption = f"{os.path.basename(relpath)}: {len(store.boxes(i))} boxes"
        grid.paste(draw_tile(image, boxes_xyxy, tile, max_boxes, caption),
                   ((n % cols) * tile, (n // cols) * tile))
    return grid


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    add_print_config_argument(p)
    p.add_argument("store", help="proposal store folder")
    p.add_argument("--image-root", default=None,
                   help="image folder the store's paths are relative to (default: meta image_root)")
    p.add_argument("--num", type=int, default=16, help="number of images in the grid")
    p.add_argument("--tile", type=int, default=256, help="grid cell side in pixels")
    p.add_argument("--max-boxes", type=int, default=20,
                   help="boxes drawn per image (the first ones)")
    p.add_argument("--seed", type=int, default=None,
                   help="pick random images with this seed (default: the first --num images)")
    p.add_argument("--out", default="proposals_grid.png", help="PNG file to write")
    return p


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args_or_print(build_parser(), argv)
    if args.num < 1 or args.tile < 16:
        raise SystemExit("error: --num must be >= 1 and --tile >= 16")
    check_writable_dir(os.path.dirname(os.path.abspath(args.out)))
    image_root = args.image_root
    if image_root is None:
        try:
            image_root = ProposalStore.open(args.store).meta.get("image_root")
        except StoreError as e:
            raise SystemExit(f"error: {e}") from e
        if not image_root:
            raise SystemExit(f"error: {args.store} records no image_root; pass --image-root")
    grid = render_grid(args.store, image_root, args.num, args.tile, args.max_boxes, args.seed)
    with atomic_write(args.out, "wb") as f:
        grid.save(f, format="PNG")
    print(f"wrote {args.out} ({grid.width}x{grid.height} pixels)")


if __name__ == "__main__":
    main()
