"""Filter a proposal store with one of the original SoCo strategies (and the post step).

Example (the released setting, the store the pretraining recipes use)::

    python selective_search/filter_proposals.py proposals/train.proposals \\
        proposals/train_ratio3size0308post.proposals --strategy ratio3size0308 --post

Strategies (docs/method.md §1.3; w, h are the SS rect sides, W, H the image's):
every one keeps boxes with w >= 32 and h >= 32, then ``none`` adds nothing, ``ratio{r}``
keeps 1/r <= w/h <= r, ``size{NN}`` keeps NN/10 <= sqrt(wh)/sqrt(WH) <= 1, and
``ratio{r}size{AABB}`` both with AA/10 .. BB/10. ``--post`` (or a name ending in ``post``)
re-filters images left without boxes with ``ratio{r}`` (3 for a size-only strategy), then
``none``, from the unfiltered input boxes (docs/method.md §1.4).

Works block by block over the flat arrays, so RAM stays bounded for an unfiltered
ImageNet store of several GB; every image stays in the output (possibly with no boxes).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from tqdm import tqdm

from selective_search.filters import FilterStrategy, compact, filter_keep, parse_strategy
from socokit.config import HelpFormatter, add_print_config_argument, parse_args_or_print
from socokit.errors import exit_on_user_error
from socokit.fileio import check_writable_dir
from socokit.log import get_logger, setup_logging
from socokit.proposal_store import ProposalStore, StoreError, write_store_arrays

BLOCK_BOXES = 4_000_000  # boxes per vectorised block (~64 MB of int32 boxes)
MAX_LISTED_EMPTY = 1000  # images without boxes listed by path in meta.json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    add_print_config_argument(p)
    p.add_argument("input", help="unfiltered proposal store (from generate_proposals.py)")
    p.add_argument("output", help="filtered proposal store folder to write")
    p.add_argument("--strategy", default="ratio3size0308",
                   help="none | ratio<r> | size<NN> | ratio<r>size<AABB>, optionally + 'post'")
    p.add_argument("--post", action="store_true",
                   help="run the post step: images left without boxes fall back to ratio<r>, "
                        "then none (the output's strategy name gets the suffix 'post')")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output store")
    return p


def _image_blocks(offsets: np.ndarray, block_boxes: int) -> list[tuple[int, int]]:
    """Image ranges [a, b) of about ``block_boxes`` boxes each (at least one image)."""
    n = len(offsets) - 1
    bounds = [0]
    while bounds[-1] < n:
        a = bounds[-1]
        b = int(np.searchsorted(offsets, offsets[a] + block_boxes, side="right")) - 1
        bounds.append(min(max(b, a + 1), n))
    return list(zip(bounds[:-1], bounds[1:]))


def filter_arrays(store: ProposalStore, strategy: FilterStrategy,
                  block_boxes: int = BLOCK_BOXES) -> tuple[np.ndarray, np.ndarray, int]:
    """Filters every image of ``store`` block by block.

    Returns:
        ``(boxes int32 [M', 4], offsets int64 [N + 1], num_empty_before_post)``.
    """
    arrays = store.arrays()
    offsets = np.asarray(arrays["offsets"], dtype=np.int64)
    sizes = np.asarray(arrays["sizes"])
    kept_boxes, kept_counts, empty_before = [], [], 0
    blocks = _image_blocks(offsets, block_boxes)
    for a, b in tqdm(blocks, unit="block", desc=f"filter {strategy.name}", disable=len(blocks) < 2):
        block_boxes_xyxy = np.asarray(arrays["boxes"][offsets[a]:offsets[b]])  # [Mb, 4]
        keep, image_of_box, num_empty = filter_keep(block_boxes_xyxy, offsets[a:b + 1],
                                                    sizes[a:b], strategy)
        boxes_b, offsets_b = compact(block_boxes_xyxy, image_of_box, b - a, keep)
        kept_boxes.append(boxes_b)
        kept_counts.append(np.diff(offsets_b))
        empty_before += num_empty
    counts = np.concatenate(kept_counts) if kept_counts else np.zeros(0, np.int64)
    out_offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out_offsets[1:])
    boxes = np.concatenate(kept_boxes) if kept_boxes else np.zeros((0, 4), np.int32)
    return boxes, out_offsets, empty_before


def filter_store(input_path: str, output_path: str, strategy_name: str, post: bool = False,
                 log=None) -> ProposalStore:
    """Writes ``output_path``: ``input_path`` filtered with a strategy (+ post step).

    Args:
        input_path: an unfiltered store (``meta["filter"]`` is None).
        output_path: the store to write (atomically).
        strategy_name: e.g. ``"ratio3size0308"`` or ``"ratio3size0308post"``.
        post: add the post step (same as the ``post`` suffix).
        log: a logger (default: ``soco.selective_search``).

    Raises:
        SystemExit: unknown strategy, unreadable input, or a post step asked of an input
            that is already filtered (the post step needs the unfiltered boxes).
    """
    log = log or get_logger("soco.selective_search")
    name = strategy_name + "post" if post and not strategy_name.endswith("post") else strategy_name
    try:
        strategy = parse_strategy(name)
        store = ProposalStore.open(input_path)
    except (ValueError, StoreError) as e:
        raise SystemExit(f"error: {e}") from e
    if store.meta.get("filter"):
        msg = f"{input_path} is already filtered with {store.meta['filter']!r}"
        if strategy.post:
            raise SystemExit(f"error: {msg}; the post step needs the unfiltered store")
        log.warning(f"warning: {msg}; filtering it again")
    start = time.time()
    boxes, offsets, empty_before = filter_arrays(store, strategy)
    counts = np.diff(offsets)
    empty_idx = np.flatnonzero(counts == 0)
    meta = dict(store.meta, filter=strategy.name, filter_source=os.path.abspath(input_path),
                num_images_without_boxes_before_post=empty_before if strategy.post else None,
                images_without_boxes=[store.path(int(i)) for i in empty_idx[:MAX_LISTED_EMPTY]])
    for key in ("num_images", "num_boxes", "num_images_without_boxes", "created"):
        meta.pop(key, None)
    arrays = store.arrays()
    out = write_store_arrays(output_path, boxes=boxes, offsets=offsets, sizes=arrays["sizes"],
                             paths_bin=arrays["paths"], path_offsets=arrays["path_offsets"],
                             meta=meta)
    per_image = len(boxes) / max(len(store), 1)
    log.info(f"filter {strategy.name}: {len(store)} images, {store.num_boxes} -> {len(boxes)} "
             f"boxes ({per_image:.1f} per image) in {time.time() - start:.1f}s")
    if strategy.post:
        log.info(f"images without boxes: {empty_before} after {strategy.base_name}, "
                 f"{len(empty_idx)} after the post step")
    else:
        empty_in = int((store.num_boxes_per_image() == 0).sum())
        log.info(f"images without boxes: {len(empty_idx)} (was {empty_in} before filtering)")
    log.info(f"wrote {output_path}")
    return out


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args_or_print(build_parser(), argv)
    setup_logging(name="soco")
    if os.path.exists(args.output) and not args.overwrite:
        raise SystemExit(f"error: {args.output} already exists; pass --overwrite to replace it")
    if os.path.abspath(args.output) == os.path.abspath(args.input):
        raise SystemExit("error: the output store must differ from the input store")
    check_writable_dir(os.path.dirname(os.path.abspath(args.output)))
    filter_store(args.input, args.output, args.strategy, post=args.post)


if __name__ == "__main__":
    main()
