"""Proposal filter strategies of the original SoCo release, vectorised over flat arrays.

Every strategy keeps a selective-search rect ``(x, y, w, h)`` only if ``w >= 32`` and
``h >= 32`` (the SS w, h: one less than the pixel extent). Further conditions
(docs/method.md §1.3):

===================== ===================================================================
strategy              extra condition
===================== ===================================================================
``none``              --
``ratio{r}``          ``1/r <= w/h <= r``
``size{NN}``          ``NN/10 <= sqrt(w*h) / sqrt(W*H) <= 1.0``
``ratio{r}size{AABB}`` ``1/r <= w/h <= r`` and ``AA/10 <= sqrt(w*h)/sqrt(W*H) <= BB/10``
===================== ===================================================================

A trailing ``post`` (``ratio3size0308post``) names the output of the post step (docs/method.md §1.4):
images left without boxes are re-filtered with ``ratio{r}`` and, if still empty, ``none``.

Names are parsed exactly as the original did (``r = float(name[5])``,
``min = float(name[-4:-2]) / 10``, ``max = float(name[-2:]) / 10``; a ratio-only name
takes ``r`` from its last character, a size-only name ``min`` from its last two), but
only names of the grammar above are accepted: the original silently misread names such
as ``ratio2.5`` (r = 5), which here are an error.

Boxes in a proposal store are inclusive corners ``x1, y1, x2, y2`` with ``x2 = x + w - 1``,
so the SS width is recovered as ``w = x2 - x1 + 1``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

MIN_SIDE = 32  # the original's hard-coded minimum SS width and height
POST_FALLBACK_RATIO = 3.0  # the original post script hard-codes ratio3

_STRATEGY_RE = re.compile(r"^(none|ratio\d|size\d\d|ratio\dsize\d{4})(post)?$")


@dataclass(frozen=True)
class FilterStrategy:
    """A parsed filter strategy.

    Attributes:
        name: the full name, including a ``post`` suffix if given.
        ratio: maximum aspect ratio ``r`` (``1/r <= w/h <= r``) or None.
        size_min: minimum of ``sqrt(w*h) / sqrt(W*H)`` or None (no size condition).
        size_max: maximum of that ratio (1.0 for ``size{NN}``) or None.
        post: whether the post step follows (the name ends in ``post``).
    """

    name: str
    ratio: float | None = None
    size_min: float | None = None
    size_max: float | None = None
    post: bool = False

    @property
    def base_name(self) -> str:
        """The name without the ``post`` suffix."""
        return self.name[: -len("post")] if self.post else self.name

    @property
    def post_ratio(self) -> float:
        """Aspect ratio of the post step's first fallback (``ratio{r}``, else 3 as the original)."""
        return self.ratio if self.ratio is not None else POST_FALLBACK_RATIO


def parse_strategy(name: str) -> FilterStrategy:
    """Parses a strategy name the way the original ``filter_ss_proposals_json.py`` did.

    Args:
        name: e.g. ``"none"``, ``"ratio3"``, ``"size01"``, ``"ratio3size0308"``,
            ``"ratio3size0308post"``.

    Returns:
        The parsed :class:`FilterStrategy`.

    Raises:
        ValueError: the name is not of the grammar ``none | ratio<d> | size<dd> |
            ratio<d>size<dddd>`` with an optional ``post`` suffix.
    """
    match = _STRATEGY_RE.match(name)
    if match is None:
        raise ValueError(
            f"unknown filter strategy {name!r}; expected one of 'none', 'ratio<r>' (one digit), "
            "'size<NN>', 'ratio<r>size<AABB>' (e.g. ratio3size0308), optionally followed by 'post'"
        )
    base, post = match.group(1), match.group(2) is not None
    if base == "none":
        return FilterStrategy(name=name, post=post)
    if "ratio" in base and "size" in base:
        return FilterStrategy(name=name, ratio=float(base[5]), size_min=float(base[-4:-2]) / 10,
                              size_max=float(base[-2:]) / 10, post=post)
    if "ratio" in base:
        return FilterStrategy(name=name, ratio=float(base[-1]), post=post)
    return FilterStrategy(name=name, size_min=float(base[-2:]) / 10, size_max=1.0, post=post)


def keep_mask(boxes_xyxy: np.ndarray, image_hw: np.ndarray, ratio: float | None = None,
              size_min: float | None = None, size_max: float | None = None) -> np.ndarray:
    """Which boxes a strategy keeps.

    The arithmetic is the original's in float64 (``w / h``, ``sqrt(w * h) / sqrt(W * H)``),
    so borderline boxes are decided identically.

    Args:
        boxes_xyxy: int array [M, 4], inclusive corners (store convention).
        image_hw: int array [M, 2], the (H, W) of each box's image, or [2] for all boxes.
        ratio: aspect-ratio bound ``r`` or None.
        size_min: lower bound of the square-root area ratio, or None for no size condition.
        size_max: upper bound of the square-root area ratio.

    Returns:
        bool array [M].
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.int64).reshape(-1, 4)
    w = (boxes[:, 2] - boxes[:, 0] + 1).astype(np.float64)  # SS w (extent - 1)
    h = (boxes[:, 3] - boxes[:, 1] + 1).astype(np.float64)
    keep = (w >= MIN_SIDE) & (h >= MIN_SIDE)
    if ratio is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            aspect = w / h
        keep &= (1.0 / ratio <= aspect) & (aspect <= ratio)
    if size_min is not None:
        hw = np.broadcast_to(np.asarray(image_hw, dtype=np.int64).reshape(-1, 2), (len(boxes), 2))
        img_sqrt = np.sqrt((hw[:, 0] * hw[:, 1]).astype(np.float64))
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.sqrt(w * h) / img_sqrt
        keep &= (size_min <= rel) & (rel <= size_max)
    return keep


def filter_flat(boxes_xyxy: np.ndarray, offsets: np.ndarray, sizes_hw: np.ndarray,
                strategy: FilterStrategy | str) -> tuple[np.ndarray, np.ndarray]:
    """Applies a strategy (and its post step if named) to every image of flat arrays.

    Args:
        boxes_xyxy: int32 [M, 4], the N images' boxes concatenated (inclusive corners).
        offsets: int64 [N + 1]; image i owns ``offsets[i + 1] - offsets[i]`` consecutive boxes
            (only the differences are used, so the offsets of a block of a larger store, with
            ``offsets[0] != 0``, may be passed with that block's boxes).
        sizes_hw: int [N, 2], (H, W) of every image.
        strategy: a :class:`FilterStrategy` or its name.

    Returns:
        ``(kept_boxes int32 [M', 4], kept_offsets int64 [N + 1])`` with ``kept_offsets[0] == 0``;
        the relative order of boxes in each image is preserved, duplicates are kept (as the
        original).
    """
    keep, image_of_box, _ = filter_keep(boxes_xyxy, offsets, sizes_hw, strategy)
    return compact(boxes_xyxy, image_of_box, len(offsets) - 1, keep)


def filter_keep(boxes_xyxy: np.ndarray, offsets: np.ndarray, sizes_hw: np.ndarray,
                strategy: FilterStrategy | str) -> tuple[np.ndarray, np.ndarray, int]:
    """The keep mask of a strategy over flat arrays (arguments as :func:`filter_flat`).

    Returns:
        ``(keep bool [M], image_of_box int64 [M], num_empty_before_post)``: the last is the
        number of images the base strategy leaves without boxes (before any post step).
    """
    if isinstance(strategy, str):
        strategy = parse_strategy(strategy)
    offsets = np.asarray(offsets, dtype=np.int64)
    counts = np.diff(offsets)
    num_images = len(counts)
    image_of_box = np.repeat(np.arange(num_images), counts)  # [M]
    box_hw = np.asarray(sizes_hw, dtype=np.int64).reshape(-1, 2)[image_of_box]  # [M, 2]
    keep = keep_mask(boxes_xyxy, box_hw, strategy.ratio, strategy.size_min, strategy.size_max)
    num_empty = int((np.bincount(image_of_box[keep], minlength=num_images) == 0).sum())
    if strategy.post and num_empty:
        keep = _post_fallback(boxes_xyxy, box_hw, image_of_box, num_images, keep,
                              strategy.post_ratio)
    return keep, image_of_box, num_empty


def _post_fallback(boxes_xyxy: np.ndarray, box_hw: np.ndarray, image_of_box: np.ndarray,
                   num_images: int, keep: np.ndarray, post_ratio: float) -> np.ndarray:
    """The post step (docs/method.md §1.4): images left empty take ``ratio{r}``, then ``none``."""
    for fallback_ratio in (post_ratio, None):
        empty = np.bincount(image_of_box[keep], minlength=num_images) == 0  # [N]
        box_in_empty = empty[image_of_box]  # [M]
        if not box_in_empty.any():
            break
        fallback = keep_mask(boxes_xyxy[box_in_empty], box_hw[box_in_empty], ratio=fallback_ratio)
        keep = keep.copy()
        keep[np.flatnonzero(box_in_empty)] = fallback
    return keep


def compact(boxes_xyxy: np.ndarray, image_of_box: np.ndarray, num_images: int,
            keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kept boxes int32 [M', 4] and their offsets int64 [N + 1] (starting at 0)."""
    kept_counts = np.bincount(image_of_box[keep], minlength=num_images)
    kept_offsets = np.zeros(num_images + 1, dtype=np.int64)
    np.cumsum(kept_counts, out=kept_offsets[1:])
    kept_boxes = np.ascontiguousarray(np.asarray(boxes_xyxy, dtype=np.int32).reshape(-1, 4)[keep])
    return kept_boxes, kept_offsets


def count_empty(offsets: np.ndarray) -> int:
    """Number of images without boxes, given offsets [N + 1]."""
    return int((np.diff(np.asarray(offsets)) == 0).sum())
