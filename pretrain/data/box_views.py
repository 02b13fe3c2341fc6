"""Box geometry of SoCo views: proposal selection, jitter, clipping, padding, FPN-level
assignment, correspondence, normalisation and flipping (docs/method.md §2.4 steps 1-8).

Box rows are ``[x1, y1, x2, y2, id]`` (float64 inside this module, ids 1..n over the image's
proposal list). Pixel boxes use inclusive corners; ``boxes_norm`` are divided by the crop size
(so a full-width box ends at (w-1)/w, as in the original). Every function returns new arrays
and never modifies its inputs.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from pretrain.data.views import CropParams, intersect_crops

#: Value in a level-assignment vector for "no box of this view at this (level, slot)",
#: per view index 0..3 (V1..V4): -1, -2, -3, -4. Distinct values never match each other.
UNUSED_LEVEL_VALUES = (-1.0, -2.0, -3.0, -4.0)


def with_ids(boxes_xyxy: np.ndarray) -> np.ndarray:
    """Append ids 1..N: int [N, 4] inclusive corners -> float64 [N, 5]."""
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    ids = np.arange(1, len(boxes) + 1, dtype=np.float64)[:, None]
    return np.concatenate([boxes, ids], axis=1)


def overlap_mask(boxes: np.ndarray, rect_xyxy: Sequence[float]) -> np.ndarray:
    """Strict open-interval overlap of each box with an inclusive rectangle: bool [N].

    ``px1 < bx2 and bx1 < px2 and py1 < by2 and by1 < py2``; a 1-px overlap counts, a shared
    edge does not.
    """
    px1, py1, px2, py2 = rect_xyxy
    return (px1 < boxes[:, 2]) & (boxes[:, 0] < px2) & (py1 < boxes[:, 3]) & (boxes[:, 1] < py2)


def select_proposals(rng: np.random.Generator, proposals: np.ndarray,
                     region_xyxy: Sequence[float] | None, k: int) -> np.ndarray:
    """Proposals overlapping ``region``; K of them uniformly without replacement if more than K.

    Args:
        proposals: float [N, 5] boxes with ids.
        region_xyxy: inclusive region, or None (no overlap: nothing selected).
        k: ``select_k``.

    Returns:
        float [n, 5], n <= k (0 when nothing overlaps).
    """
    if region_xyxy is None:
        return proposals[:0].copy()
    candidates = proposals[overlap_mask(proposals, region_xyxy)]
    if len(candidates) > k:
        candidates = candidates[rng.choice(len(candidates), size=k, replace=False)]
    return candidates.copy()


def select_with_retries(rng: np.random.Generator, proposals: np.ndarray, v1: CropParams,
                        samplers: Sequence[Callable[[], CropParams]], *, k: int, padding_k: int,
                        max_tries: int) -> tuple[list[CropParams], list[np.ndarray]]:
    """Sample the other views' crops and select proposals for each pair (1, v), with retries.

    Each attempt samples one crop per ``samplers`` entry and selects proposals overlapping
    V1 ∩ Vv. It stops when every pair has at least ``least_common`` boxes; otherwise
    ``least_common`` is halved (floor, min 1), starting from ``max(padding_k // 2, 1)``. After
    ``max_tries`` attempts the last sample is used even if a selection is empty. Only crop
    *parameters* are sampled here; images are cropped once afterwards.

    Returns:
        (crop params per sampler, selected proposals per pair, each float [n, 5]).
    """
    least_common = max(padding_k // 2, 1)
    params, selections = [], []
    for _ in range(max(max_tries, 1)):
        params = [sample() for sample in samplers]
        selections = [select_proposals(rng, proposals, intersect_crops(v1, p), k) for p in params]
        if all(len(s) >= least_common for s in selections):
            break
        least_common = max(least_common // 2, 1)
    return params, selections


def jitter_boxes(rng: np.random.Generator, boxes: np.ndarray, prob: float, ratio: float) -> np.ndarray:
    """Jitter each box with probability ``prob`` (V1 copies only).

    With u ~ U(-ratio, ratio)^4, w = x2 - x1 + 1, h = y2 - y1 + 1:
    ``x1' = x1 + u0 w``, ``y1' = y1 + u1 h``, ``x2' = x1' + w (1 + u2) - 1``,
    ``y2' = y1' + h (1 + u3) - 1`` (float).

    Args:
        boxes: float [n, 5].

    Returns:
        float [n, 5], a new array (ids unchanged).
    """
    out = np.array(boxes, dtype=np.float64, copy=True)
    if len(out) == 0 or prob <= 0:
        return out
    apply = rng.random(len(out)) < prob
    u = rng.uniform(-ratio, ratio, size=(len(out), 4))
    w = out[:, 2] - out[:, 0] + 1
    h = out[:, 3] - out[:, 1] + 1
    x1 = out[:, 0] + u[:, 0] * w
    y1 = out[:, 1] + u[:, 1] * h
    jittered = np.stack([x1, y1, x1 + w * (1 + u[:, 2]) - 1, y1 + h * (1 + u[:, 3]) - 1], axis=1)
    out[apply, :4] = jittered[apply]
    return out


def clip_to_crop(boxes: np.ndarray, params: CropParams) -> np.ndarray:
    """Clip boxes to the crop rectangle and shift them to crop-local pixels.

    Boxes that do not overlap the crop (strict test) are dropped; if none remain the result is
    the whole view ``[[0, 0, w - 1, h - 1, 1]]``. There is no minimum visible size.

    Returns:
        float [m, 5] crop-local boxes, m >= 1.
    """
    rect = params.rect_xyxy
    kept = boxes[overlap_mask(boxes, rect)] if len(boxes) else boxes.reshape(0, 5)
    if len(kept) == 0:
        return np.array([[0.0, 0.0, params.width - 1.0, params.height - 1.0, 1.0]])
    out = np.empty((len(kept), 5), dtype=np.float64)
    out[:, 0] = np.maximum(kept[:, 0], rect[0]) - params.left
    out[:, 1] = np.maximum(kept[:, 1], rect[1]) - params.top
    out[:, 2] = np.minimum(kept[:, 2], rect[2]) - params.left
    out[:, 3] = np.minimum(kept[:, 3], rect[3]) - params.top
    out[:, 4] = kept[:, 4]
    return out


def common_ids(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Ids present in both box sets (sorted, unique)."""
    return np.intersect1d(boxes_a[:, 4], boxes_b[:, 4])


def pad_boxes(rng: np.random.Generator, boxes: np.ndarray, ids: np.ndarray, length: int) -> np.ndarray:
    """Pad to ``length`` rows with rows of ``boxes`` whose id is in ``ids``, drawn with replacement.

    No jitter is added to the padding rows. If no row has a common id (the original crashes
    there) the padding is drawn from all rows; such rows then match nothing in the other view.

    Args:
        boxes: float [n, 5], n <= length.
        ids: the pair's common ids.

    Returns:
        float [length, 5].
    """
    n = len(boxes)
    if n > length:
        raise ValueError(f"{n} boxes exceed padding_k={length}")
    if n == length:
        return boxes.copy()
    pool = boxes[np.isin(boxes[:, 4], ids)]
    if len(pool) == 0:
        pool = boxes
    extra = pool[rng.integers(0, len(pool), size=length - n)]
    return np.concatenate([boxes, extra], axis=0)


def resized_box_sizes(boxes_local: np.ndarray, params: CropParams, out_size: int) -> np.ndarray:
    """sqrt(area) of each crop-local box after resizing the crop to ``out_size`` (int-truncated corners)."""
    sx = boxes_local[:, [0, 2]] / params.width * out_size
    sy = boxes_local[:, [1, 3]] / params.height * out_size
    sx, sy = sx.astype(np.int64), sy.astype(np.int64)  # truncation toward zero, as the original
    w = sx[:, 1] - sx[:, 0] + 1
    h = sy[:, 1] - sy[:, 0] + 1
    return np.sqrt(np.maximum(w * h, 0).astype(np.float64))


def assign_levels(boxes_local: np.ndarray, params: CropParams, out_size: int,
                  aware_range: Sequence[float], aware_start: int, aware_end: int,
                  unused_value: float) -> np.ndarray:
    """Level-major id vector of one box set: float64 [P * L], P = aware_end - aware_start.

    A box of resized size s goes to the first level j in [aware_start, aware_end) with
    ``s <= aware_range[j]`` (defaults: <=48 P2, <=96 P3, <=192 P4, <=224 P5); entry
    ``(j - aware_start) * L + i`` holds its id, every other entry ``unused_value``.
    """
    num_levels = aware_end - aware_start
    length = len(boxes_local)
    sizes = resized_box_sizes(boxes_local, params, out_size)
    vec = np.full((num_levels, length), unused_value, dtype=np.float64)
    assigned = np.zeros(length, dtype=bool)
    for level in range(num_levels):
        hit = ~assigned & (sizes <= aware_range[aware_start + level])
        vec[level, hit] = boxes_local[hit, 4]
        assigned |= hit
    return vec.reshape(-1)


def correspondence(ids_a: np.ndarray, ids_b: np.ndarray) -> np.ndarray:
    """``c[a, b] = 1.0 if ids_a[a] == ids_b[b] else 0.0`` as float32 [len(a), len(b)].

    Works for plain id columns (C4) and for level-major vectors (FPN, cross-level matches
    included; unused entries of different views never match). Duplicates give multiplicities.
    """
    return (np.asarray(ids_a)[:, None] == np.asarray(ids_b)[None, :]).astype(np.float32)


def normalise(boxes_local: np.ndarray, params: CropParams) -> np.ndarray:
    """``[x1/w, y1/h, x2/w, y2/h, id]`` with w, h the crop size: float32 [L, 5]."""
    out = np.array(boxes_local, dtype=np.float64, copy=True)
    out[:, [0, 2]] /= params.width
    out[:, [1, 3]] /= params.height
    return out.astype(np.float32)


def hflip_norm(boxes_norm: np.ndarray) -> np.ndarray:
    """Horizontal flip of normalised boxes as the original: ``x1' = 1 - x2``, ``x2' = 1 - x1``."""
    out = np.array(boxes_norm, copy=True)
    out[:, 0] = 1.0 - boxes_norm[:, 2]
    out[:, 2] = 1.0 - boxes_norm[:, 0]
    return out
