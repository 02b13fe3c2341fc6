"""Crop parameters of the SoCo views: whole-image V1, random-resized crops, and resizing.

Crop parameters follow the original release (docs/method.md §2.2): ``(top, left, height, width,
img_h, img_w)``; the crop rectangle is the inclusive pixel range
``[left, left + width - 1] x [top, top + height - 1]`` of the original image.

All randomness comes from an explicit ``numpy.random.Generator`` so that one per-sample
generator (seeded from the worker's NumPy stream, see :mod:`pretrain.data.dataset`) makes a
sample reproducible.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from PIL import Image

RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)


class CropParams(NamedTuple):
    """A crop of an ``img_h`` x ``img_w`` image: rows ``top..top+height-1``, cols ``left..left+width-1``."""

    top: int
    left: int
    height: int
    width: int
    img_h: int
    img_w: int

    @property
    def rect_xyxy(self) -> tuple[int, int, int, int]:
        """The crop as inclusive pixel corners ``(x1, y1, x2, y2)`` in the original image."""
        return (self.left, self.top, self.left + self.width - 1, self.top + self.height - 1)


def whole_image_params(img_h: int, img_w: int) -> CropParams:
    """V1's parameters: the whole image, ``(0, 0, H, W, H, W)``."""
    return CropParams(0, 0, img_h, img_w, img_h, img_w)


def sample_rrc_params(rng: np.random.Generator, img_h: int, img_w: int,
                      scale: tuple[float, float] = (0.5, 1.0),
                      ratio: tuple[float, float] = RRC_RATIO) -> CropParams:
    """Random-resized-crop parameters with torchvision's algorithm (``RandomResizedCrop.get_params``).

    Up to 10 tries of an area fraction ~ U(scale) and a log-uniform aspect ratio in ``ratio``;
    ``w = round(sqrt(a * r))``, ``h = round(sqrt(a / r))``; accepted when ``0 < w <= W`` and
    ``0 < h <= H`` with a uniform top-left corner; otherwise a centre crop clamped to ``ratio``.

    Args:
        rng: the sample's generator.
        img_h, img_w: original image size.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio (w / h).
    """
    area = img_h * img_w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= img_w and 0 < h <= img_h:
            top = int(rng.integers(0, img_h - h + 1))
            left = int(rng.integers(0, img_w - w + 1))
            return CropParams(top, left, h, w, img_h, img_w)
    in_ratio = img_w / img_h
    if in_ratio < min(ratio):
        w, h = img_w, int(round(img_w / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = img_h, int(round(img_h * max(ratio)))
    else:
        w, h = img_w, img_h
    return CropParams((img_h - h) // 2, (img_w - w) // 2, h, w, img_h, img_w)


def intersect_crops(a: CropParams, b: CropParams) -> tuple[int, int, int, int] | None:
    """Intersection of two crop rectangles as inclusive ``(x1, y1, x2, y2)``, or None.

    Uses the original's strict open-interval test (``x1a < x2b and x1b < x2a`` and likewise
    for y), so rectangles that share only an edge do not intersect.
    """
    ax1, ay1, ax2, ay2 = a.rect_xyxy
    bx1, by1, bx2, by2 = b.rect_xyxy
    if ax1 < bx2 and bx1 < ax2 and ay1 < by2 and by1 < ay2:
        return (max(ax1, bx1), max(ay1, by1), min(ax2, bx2), min(ay2, by2))
    return None


def crop_resize(img: Image.Image, params: CropParams, size: int) -> Image.Image:
    """Crop ``params`` out of ``img`` and resize it to ``size`` x ``size`` (PIL bilinear).

    Identical to torchvision's ``F.resized_crop`` on PIL images. The whole-image case skips
    the crop copy. ``img`` is not modified.
    """
    if params.top == 0 and params.left == 0 and params.height == img.height and params.width == img.width:
        return img.resize((size, size), Image.BILINEAR)
    box = (params.left, params.top, params.left + params.width, params.top + params.height)
    return img.crop(box).resize((size, size), Image.BILINEAR)
