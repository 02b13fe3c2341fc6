"""Slow, literal implementation of SoCo's selective search (docs/method.md §1.1).

Written for readability, not speed: per-pixel loops for the boxes, a boolean
mask per region for the histograms, numpy.histogram, a dict of similarities
and a full sort of it before every merge. The fast implementation in
``selective_search/soco_ss.py`` must return exactly the same rects.
"""
from __future__ import annotations

import numpy as np
import skimage.color
import skimage.feature
from skimage.segmentation import felzenszwalb
from skimage.util import img_as_float


def oracle_labels(image, scale=300, sigma=0.9, min_size=100):
    """Felzenszwalb labels of the uint8 RGB image, as docs/method.md §1.1 describes it."""
    return felzenszwalb(img_as_float(image), scale=scale, sigma=sigma, min_size=min_size)


def _initial_regions(image, labels, texture_hist_max):
    """Regions keyed by label, in order of first appearance in a raster scan."""
    height, width = labels.shape
    regions = {}
    for y in range(height):
        for x in range(width):
            label = int(labels[y, x])
            if label not in regions:
                regions[label] = {"min_x": x, "min_y": y, "max_x": x, "max_y": y}
            r = regions[label]
            r["min_x"], r["max_x"] = min(r["min_x"], x), max(r["max_x"], x)
            r["min_y"], r["max_y"] = min(r["min_y"], y), max(r["max_y"], y)

    rgb = image.astype(np.float64)  # 0..255, the original's 4-channel float array
    hsv = skimage.color.rgb2hsv(rgb)  # no rescaling of float input: H, S in [0, 1]
    lbp = np.stack([skimage.feature.local_binary_pattern(image[:, :, c], 8, 1.0)
                    for c in range(3)], axis=-1)
    for label, r in regions.items():
        mask = labels == label
        r["size"] = int(mask.sum())
        r["hist_c"] = np.concatenate([
            np.histogram(hsv[:, :, c][mask], 25, (0.0, 255.0))[0] for c in range(3)]) / r["size"]
        r["hist_t"] = np.concatenate([
            np.histogram(lbp[:, :, c][mask], 10, (0.0, texture_hist_max))[0]
            for c in range(3)]) / r["size"]
    return regions


def _corner_inside(a, b):
    """True if a corner of b's bbox lies strictly inside a's bbox."""
    def inside(x, y):
        return a["min_x"] < x < a["max_x"] and a["min_y"] < y < a["max_y"]
    return (inside(b["min_x"], b["min_y"]) or inside(b["max_x"], b["max_y"])
            or inside(b["min_x"], b["max_y"]) or inside(b["max_x"], b["min_y"]))


def _intersection(h1, h2):
    """Σ min(a, b), added left to right as Python 3.7's ``sum`` (the original's) does.

    Python 3.12 made ``sum`` of floats compensated, so it is spelled out here.
    """
    total = 0
    for a, b in zip(h1, h2):
        total = total + min(a, b)
    return total


def _similarity(r1, r2, imsize):
    colour = _intersection(r1["hist_c"], r2["hist_c"])
    texture = _intersection(r1["hist_t"], r2["hist_t"])
    size = 1.0 - (r1["size"] + r2["size"]) / imsize
    bb = ((max(r1["max_x"], r2["max_x"]) - min(r1["min_x"], r2["min_x"]))
          * (max(r1["max_y"], r2["max_y"]) - min(r1["min_y"], r2["min_y"])))
    fill = 1.0 - (bb - r1["size"] - r2["size"]) / imsize
    return colour + texture + size + fill


def _merge(r1, r2):
    size = r1["size"] + r2["size"]
    return {
        "min_x": min(r1["min_x"], r2["min_x"]), "min_y": min(r1["min_y"], r2["min_y"]),
        "max_x": max(r1["max_x"], r2["max_x"]), "max_y": max(r1["max_y"], r2["max_y"]),
        "size": size,
        "hist_c": (r1["hist_c"] * r1["size"] + r2["hist_c"] * r2["size"]) / size,
        "hist_t": (r1["hist_t"] * r1["size"] + r2["hist_t"] * r2["size"]) / size,
    }


def oracle_regions_from_labels(image, labels, texture_hist_max=255.0, tie_break="last"):
    """Rects (x, y, w = max_x - min_x, h = max_y - min_y) of all regions, int64 [N, 4].

    ``tie_break="first"`` picks the first of equal maxima instead of the last
    (not the original's behaviour; tests use it to show that ties matter).
    """
    imsize = labels.shape[0] * labels.shape[1]
    regions = _initial_regions(image, labels, texture_hist_max)

    items = list(regions.items())
    sims = {}
    for k, (label_a, a) in enumerate(items):
        for label_b, b in items[k + 1:]:
            if _corner_inside(a, b):
                sims[(label_a, label_b)] = _similarity(a, b, imsize)

    while sims:
        if tie_break == "last":  # the original: stable sort, take the last
            i, j = sorted(sims.items(), key=lambda item: item[1])[-1][0]
        else:
            i, j = max(sims.items(), key=lambda item: item[1])[0]
        t = max(regions) + 1
        regions[t] = _merge(regions[i], regions[j])
        stale = [key for key in sims if i in key or j in key]
        for key in stale:
            del sims[key]
        for key in stale:
            if key != (i, j):
                other = key[1] if key[0] in (i, j) else key[0]
                sims[(t, other)] = _similarity(regions[t], regions[other], imsize)

    return np.array([[r["min_x"], r["min_y"], r["max_x"] - r["min_x"], r["max_y"] - r["min_y"]]
                     for r in regions.values()], dtype=np.int64).reshape(-1, 4)


def oracle_regions(image, scale=300, sigma=0.9, min_size=100, texture_hist_max=255.0):
    """The whole selective search on a uint8 RGB image."""
    labels = oracle_labels(image, scale, sigma, min_size)
    return oracle_regions_from_labels(image, labels, texture_hist_max)
