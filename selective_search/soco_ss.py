"""Selective search exactly as SoCo ran it, vectorised.

SoCo (hologerry/SoCo, ``selective_search/selective_search.py``) uses a lightly
modified copy of the AlpacaDB ``selectivesearch`` package: one strategy, a
Felzenszwalb over-segmentation, then greedy hierarchical grouping of
neighbouring regions by colour + texture + size + fill similarity. This module
reproduces its output *bit for bit* (same regions, same order, duplicates
kept), quirks included (see ``docs/selective_search_algorithm.md``):

* colour histogram: ``rgb2hsv`` of the float 0..255 image, 25 bins per channel
  over [0, 255]. H and S lie in [0, 1] and always fall in bin 0, so every
  region's H and S histograms are ``[1, 0, ..., 0]`` and the colour similarity
  is ``2 + Σ min(V bins)``; only the V histogram is stored here.
* texture histogram: LBP (P=8, R=1, "default") of each R, G, B channel, 10
  bins per channel over [0, 255] (the AlpacaDB package 0.4 bins over [0, 1]:
  ``texture_hist_max=1.0`` reproduces that package instead).
* neighbours: some corner of the later region's bbox strictly inside the
  earlier region's bbox (asymmetric, bbox-only).
* fill uses BB = (max_x - min_x) * (max_y - min_y), no +1; rect w = max_x - min_x.
* merging takes the highest similarity; among equal similarities the pair
  inserted last into the original's dict wins, because the original picks
  ``sorted(S.items(), key=value)[-1]`` and Python's sort is stable.

Floating-point sums are taken in the original's order (left to right, as
Python 3.7's ``sum`` did; ``sum`` of floats is compensated since Python 3.12) so
that similarities, and therefore ties, are identical to the original's.
"""
from __future__ import annotations

import functools
import heapq
from dataclasses import dataclass

import numba
import numpy as np

from selective_search.felzenszwalb import felzenszwalb
from selective_search.ss_texture import lbp_rgb

COLOUR_BINS = 25
TEXTURE_BINS = 10
SOCO_TEXTURE_HIST_MAX = 255.0
"""SoCo's texture histogram range is [0, 255]; AlpacaDB's package 0.4 uses [0, 1]."""


# Histogram rows: [start, bins..., zero padding]. Row 0 holds 2.0 (H and S
# always add 1 + 1 to the colour intersection, see the module docstring) and the
# 25 V bins; row 1 holds 0.0 and the 30 texture bins. Min-intersection and
# size-weighted merging keep the start values and zero padding exact, and one
# left-to-right ``np.add.accumulate`` along the last axis gives both the colour
# and the texture similarity in the original's summation order.
HIST_COLS = 1 + 3 * TEXTURE_BINS


@dataclass
class RegionTable:
    """Statistics of the initial regions, in the original's order.

    Attributes:
        bbox (ndarray[n, 4] int64): inclusive ``min_x, min_y, max_x, max_y``.
        size (ndarray[n] int64): pixel counts.
        hist (ndarray[n, 2, 31] float64): ``[2.0, V histogram / size, 0 ...]``
            and ``[0.0, R, G, B LBP histograms / size]``.
        labels (ndarray[n] int64): the Felzenszwalb label of each region.
    """

    bbox: np.ndarray
    size: np.ndarray
    hist: np.ndarray
    labels: np.ndarray


@functools.lru_cache(maxsize=8)
def histogram_bin_lut(bins: int, hist_max: float) -> np.ndarray:
    """Bin of each integer value 0..255 as ``np.histogram(v, bins, (0, hist_max))`` puts it.

    Returns:
        ndarray[256] int64: the bin index, or -1 where numpy drops the value
        (outside the range).
    """
    lut = np.full(256, -1, dtype=np.int64)
    for value in range(256):
        counts = np.histogram(np.array([value], dtype=np.float64), bins, (0.0, hist_max))[0]
        hit = np.flatnonzero(counts)
        if hit.size:
            lut[value] = hit[0]
    lut.setflags(write=False)
    return lut


def segment(image: np.ndarray, scale: float = 300, sigma: float = 0.9,
            min_size: int = 100) -> np.ndarray:
    """Felzenszwalb over-segmentation as the original calls it.

    Uses the compiled :func:`selective_search.felzenszwalb.felzenszwalb`, whose labels equal
    ``skimage.segmentation.felzenszwalb``'s (tested label for label).

    Args:
        image (ndarray[H, W, 3] uint8): RGB image.

    Returns:
        ndarray[H, W] int64: labels.
    """
    return felzenszwalb(image, scale=scale, sigma=sigma, min_size=min_size)


@numba.njit(cache=True, nogil=True)
def _region_counts(image, labels, lbp, v_column, t_column, num_labels):
    """One raster pass: first/last raster index, x range, size and histogram counts per label.

    ``v_column[v]`` is the colour-row column of brightness v, ``t_column[c, code]`` the
    texture-row column of LBP ``code`` in channel c (0 collects values numpy would drop).
    """
    height, width = labels.shape
    first = np.full(num_labels, height * width, dtype=np.int64)
    last = np.full(num_labels, -1, dtype=np.int64)
    min_x = np.full(num_labels, width, dtype=np.int64)
    max_x = np.full(num_labels, -1, dtype=np.int64)
    size = np.zeros(num_labels, dtype=np.int64)
    counts = np.zeros((num_labels, 2, HIST_COLS), dtype=np.float64)
    for y in range(height):
        for x in range(width):
            label = labels[y, x]
            p = y * width + x
            if first[label] > p:
                first[label] = p
            last[label] = p
            if min_x[label] > x:
                min_x[label] = x
            if max_x[label] < x:
                max_x[label] = x
            size[label] += 1
            value = max(image[y, x, 0], image[y, x, 1], image[y, x, 2])
            counts[label, 0, v_column[value]] += 1.0
            for c in range(3):
                counts[label, 1, t_column[c, lbp[c, y, x]]] += 1.0
    return first, last, min_x, max_x, size, counts


def region_table(image: np.ndarray, labels: np.ndarray,
                 texture_hist_max: float = SOCO_TEXTURE_HIST_MAX) -> RegionTable:
    """Per-region bbox, size and histograms, ordered by first raster appearance.

    One compiled pass over the pixels (no per-region masks, no per-pixel index arrays).

    Args:
        image (ndarray[H, W, 3] uint8): RGB image.
        labels (ndarray[H, W] int): non-negative region labels.
        texture_hist_max: upper end of the texture histogram range.
    """
    width = labels.shape[1]
    # compiled code is specialised per array layout: one contiguous, writable kind only
    image = np.require(image, np.uint8, ['C', 'W'])
    labels = np.require(labels, np.int64, ['C', 'W'])
    num_labels = int(labels.max()) + 1
    v_column = 1 + histogram_bin_lut(COLOUR_BINS, 255.0)  # V of 0..255 never leaves the range
    t_lut = histogram_bin_lut(TEXTURE_BINS, float(texture_hist_max))
    t_column = np.stack([np.where(t_lut >= 0, 1 + c * TEXTURE_BINS + t_lut, 0) for c in range(3)])
    lbp = lbp_rgb(image, channels_first=True)  # [3, H, W] uint8
    first, last, min_x, max_x, size, counts = _region_counts(
        image, labels, lbp, v_column, t_column, num_labels)
    del lbp

    present = np.flatnonzero(size > 0)
    order = present[np.argsort(first[present], kind="stable")]
    size = size[order]
    # The original divides the float64 counts by the pixel count.
    hist = counts[order] / size[:, None, None]
    hist[:, 0, 0] = 2.0
    hist[:, 1, 0] = 0.0
    bbox = np.stack([min_x, first // width, max_x, last // width], axis=1)[order]
    return RegionTable(bbox=bbox, size=size, hist=hist, labels=order)


def neighbour_pairs(bbox: np.ndarray, max_entries: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """Neighbouring pairs (a, b), a before b, in the original's loop order.

    b is a neighbour of a when one of b's bbox corners lies strictly inside
    a's bbox (the original tests only this direction).

    Args:
        bbox (ndarray[n, 4]): ``min_x, min_y, max_x, max_y`` in region order.
        max_entries: size of the boolean blocks compared at once (memory bound).

    Returns:
        (ndarray[P] int64, ndarray[P] int64): indices of a and b, row-major
        over (a, b), which is the original's nested-loop order.
    """
    n = len(bbox)
    # Blocks of rows keep the boolean matrices small for images with tens of
    # thousands of segments; blocks come out in row-major order.
    block = max(1, max_entries // max(n, 1))
    a_parts, b_parts = [], []
    for start in range(0, n, block):
        stop = min(n, start + block)
        a_min_x, a_min_y, a_max_x, a_max_y = (bbox[start:stop, k, None] for k in range(4))
        b_min_x, b_min_y, b_max_x, b_max_y = (bbox[None, start:, k] for k in range(4))
        # corner test = (some x of b inside a) and (some y of b inside a)
        x_in = (((a_min_x < b_min_x) & (b_min_x < a_max_x))
                | ((a_min_x < b_max_x) & (b_max_x < a_max_x)))
        y_in = (((a_min_y < b_min_y) & (b_min_y < a_max_y))
                | ((a_min_y < b_max_y) & (b_max_y < a_max_y)))
        rows, cols = np.nonzero(np.triu(x_in & y_in, k=1))  # b after a
        a_parts.append(rows + start)
        b_parts.append(cols + start)
    if not a_parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return (np.concatenate(a_parts).astype(np.int64), np.concatenate(b_parts).astype(np.int64))


def similarity(hist, size, bbox, a, b, imsize: int) -> np.ndarray:
    """The original's ``_calc_sim`` for pairs (a[k], b[k]), float64 [P].

    Colour and texture intersections are summed left to right like Python's
    ``sum`` in the original (numpy's ``sum`` is pairwise and may differ in the
    last bit, which would change ties).

    Args:
        hist (ndarray[R, 2, 31]), size (ndarray[R]), bbox (ndarray[R, 4]):
            region statistics (see :class:`RegionTable`).
        a, b (ndarray[P] int or int): region indices (broadcast).
    """
    sums = np.add.accumulate(np.minimum(hist[a], hist[b]), axis=-1)[..., -1]
    size_a, size_b = size[a], size[b]
    box_a, box_b = bbox[a], bbox[b]
    bb_w = np.maximum(box_a[..., 2], box_b[..., 2]) - np.minimum(box_a[..., 0], box_b[..., 0])
    bb_h = np.maximum(box_a[..., 3], box_b[..., 3]) - np.minimum(box_a[..., 1], box_b[..., 1])
    s_size = 1.0 - (size_a + size_b) / imsize
    s_fill = 1.0 - (bb_w * bb_h - size_a - size_b) / imsize
    return sums[..., 0] + sums[..., 1] + s_size + s_fill


def hierarchical_grouping(table: RegionTable, imsize: int) -> np.ndarray:
    """Greedy merging; returns the bbox of every region (initial, then merged).

    The original keeps similarities in a dict and merges the pair of
    ``sorted(S.items(), key=value)[-1]``: the highest value, and among equal
    values the pair inserted last. Pair ids here are insertion times, so a
    heap of ``(-similarity, -pair_id)`` pops exactly that pair. After a merge
    the original deletes the pairs of i and j (in dict order) and inserts
    ``(t, n)`` for each other endpoint n in that order (a repeated n keeps its
    first position); the same happens here.

    Args:
        table: initial regions.
        imsize: H * W.

    Returns:
        ndarray[R, 4] int64: ``min_x, min_y, max_x, max_y`` of all regions.
    """
    n = len(table.size)
    cap = n + max(n - 1, 0)
    bbox = np.empty((cap, 4), np.int64)
    size = np.empty(cap, np.int64)
    hist = np.empty((cap, 2, HIST_COLS))
    bbox[:n], size[:n], hist[:n] = table.bbox, table.size, table.hist

    a_idx, b_idx = neighbour_pairs(table.bbox)
    pair_a, pair_b = a_idx.tolist(), b_idx.tolist()
    alive = bytearray(b"\x01") * len(pair_a)
    pairs_of = [[] for _ in range(cap)]
    for pid, (a, b) in enumerate(zip(pair_a, pair_b)):
        pairs_of[a].append(pid)
        pairs_of[b].append(pid)
    sims = similarity(hist, size, bbox, a_idx, b_idx, imsize).tolist()
    heap = [(-s, -pid) for pid, s in enumerate(sims)]
    heapq.heapify(heap)

    t = n
    while heap:
        pid = -heapq.heappop(heap)[1]
        if not alive[pid]:
            continue
        i, j = pair_a[pid], pair_b[pid]
        size_i, size_j = int(size[i]), int(size[j])
        size[t] = size_i + size_j
        bbox[t, :2] = np.minimum(bbox[i, :2], bbox[j, :2])
        bbox[t, 2:] = np.maximum(bbox[i, 2:], bbox[j, 2:])
        hist[t] = (hist[i] * size_i + hist[j] * size_j) / (size_i + size_j)

        others: dict[int, None] = {}  # ordered set of former neighbours
        for p in sorted({p for p in pairs_of[i] + pairs_of[j] if alive[p]}):
            alive[p] = 0
            if p != pid:
                others.setdefault(pair_b[p] if pair_a[p] in (i, j) else pair_a[p])
        if others:
            nbrs = np.fromiter(others, dtype=np.int64, count=len(others))
            new_sims = similarity(hist, size, bbox, t, nbrs, imsize).tolist()
            first_pid = len(pair_a)
            pair_a.extend([t] * len(nbrs))
            pair_b.extend(others)
            alive.extend(b"\x01" * len(nbrs))
            pairs_of[t].extend(range(first_pid, first_pid + len(nbrs)))
            for new_pid, (other, s) in enumerate(zip(others, new_sims), start=first_pid):
                pairs_of[other].append(new_pid)
                heapq.heappush(heap, (-s, -new_pid))
        t += 1
    return bbox[:t]


def soco_regions_from_labels(image: np.ndarray, labels: np.ndarray,
                             texture_hist_max: float = SOCO_TEXTURE_HIST_MAX) -> np.ndarray:
    """Selective search on a given label map (the part after Felzenszwalb).

    Returns:
        ndarray[R, 4] int64: rects ``(x, y, w, h)`` with w = max_x - min_x.
    """
    height, width = labels.shape
    table = region_table(image, labels, texture_hist_max)
    bbox = hierarchical_grouping(table, height * width)
    return np.stack([bbox[:, 0], bbox[:, 1], bbox[:, 2] - bbox[:, 0], bbox[:, 3] - bbox[:, 1]], 1)


def soco_regions(image: np.ndarray, scale: float = 300, sigma: float = 0.9, min_size: int = 100,
                 texture_hist_max: float = SOCO_TEXTURE_HIST_MAX) -> np.ndarray:
    """SoCo's selective search on a full-resolution RGB image.

    Args:
        image (ndarray[H, W, 3] uint8): RGB image.
        scale, sigma, min_size: Felzenszwalb parameters (SoCo: 300, 0.9, 100).
        texture_hist_max: 255.0 for SoCo; 1.0 reproduces the AlpacaDB package 0.4.

    Returns:
        ndarray[R, 4] int64: rects ``(x, y, w, h)`` (w = max_x - min_x, the
        original's convention) of the initial regions in first raster
        appearance order, then of the merged regions in creation order.
        Duplicates are kept.
    """
    image = _check_image(image)
    labels = segment(image, scale=scale, sigma=sigma, min_size=min_size)
    return soco_regions_from_labels(image, labels, texture_hist_max)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
    return np.require(image, requirements=['C', 'W'])  # see region_table
