"""Selective-search backends behind one call, returning proposal-store boxes.

Backends:

* ``soco``: SoCo's own selective search (the AlpacaDB ``selectivesearch``
  variant), reproduced exactly by :mod:`selective_search.soco_ss`. Default;
  use it to match the published models.
* ``opencv-fast`` / ``opencv-quality`` / ``opencv-single``: OpenCV contrib's
  ``cv2.ximgproc.segmentation`` selective search with its "fast", "quality"
  or single-strategy preset. Different boxes from SoCo's (many more, several
  colour spaces); an explicit alternative, not a reproduction.

All backends return int32 boxes ``x1, y1, x2, y2`` with inclusive pixel
corners in the original image frame (the proposal-store convention). For
``soco`` they are the original's rects ``(x, y, w = max_x - min_x, h)``
mapped to ``x2 = x + w - 1`` exactly as SoCo's training loader did (so a
one-pixel-wide region gives ``x2 = x1 - 1``); for OpenCV, whose w is the true
pixel extent, ``x2 = x + w - 1`` is the last pixel.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import warnings

import numpy as np

from selective_search.config import BACKEND_DEFAULTS, BACKENDS
from selective_search.soco_ss import SOCO_TEXTURE_HIST_MAX, soco_regions
from socokit.proposal_store import xywh_to_xyxy_inclusive

# The names and default parameters live with the configuration (no heavy imports there).
_DEFAULT_PARAMS = BACKEND_DEFAULTS

CONTRIB_HINT = (
    "cv2.ximgproc is missing: a plain opencv-python wheel (pulled in, for example, by "
    "installing the `lvis` package) is shadowing opencv-contrib. Fix: `pip uninstall -y "
    "opencv-python opencv-python-headless opencv-contrib-python-headless` and then "
    "`pip install opencv-contrib-python-headless` (scripts/install.sh does this).")


PIXEL_BUDGET = 4_000_000
"""Pixels above which the ``soco`` backend warns (a 2000x2000 image; ImageNet's are ~0.2 MP)."""
SOCO_BYTES_PER_PIXEL = 112
"""Peak memory of the ``soco`` backend per pixel above a worker's baseline, measured with
``benchmarks/bench_selective_search.py --memory-sizes`` (368 before the compiled Felzenszwalb)."""
SOCO_SECONDS_PER_MEGAPIXEL = 4.0
"""Rough CPU seconds of the ``soco`` backend per megapixel at 12 MP (46 s measured on a loaded
machine; the grouping grows faster than linearly with the number of segments)."""


class LargeImageWarning(UserWarning):
    """An image above :data:`PIXEL_BUDGET` goes through full-resolution selective search."""


def pixel_budget_advice(height: int, width: int, max_side: int | None = None,
                        workers: int = 1, budget: int | None = None) -> str | None:
    """The warning text for a ``soco`` search of an ``height`` x ``width`` image, or None.

    Args:
        height, width: the image size in pixels (before ``max_side``).
        max_side: the downscaling that will be applied (None: full resolution).
        workers: processes running searches at once (multiplies the memory).
        budget: pixels allowed without a warning (default :data:`PIXEL_BUDGET`).
    """
    if max_side is not None and max(height, width) > max_side:
        factor = max_side / max(height, width)
        height, width = max(1, round(height * factor)), max(1, round(width * factor))
    budget = PIXEL_BUDGET if budget is None else budget
    pixels = height * width
    if pixels <= budget:
        return None
    gib = pixels * SOCO_BYTES_PER_PIXEL / 2**30
    per_workers = f", about {gib * workers:.1f} GiB for {workers} workers" if workers > 1 else ""
    suggestion = 1000 if max_side is None or max_side > 1000 else max(1, max_side // 2)
    return (f"image {width}x{height} ({pixels / 1e6:.1f} MP) is above the selective-search "
            f"pixel budget of {budget / 1e6:.0f} MP: expect about {gib:.1f} GiB of memory per "
            f"worker{per_workers} and ~{pixels / 1e6 * SOCO_SECONDS_PER_MEGAPIXEL:.0f} s per "
            f"image. Pass --max-side {suggestion} to search a downscaled copy (boxes are mapped "
            f"back to full resolution; SoCo's ImageNet images are ~500x375), or use fewer "
            f"--workers.")


def default_params(backend: str) -> dict:
    """The parameters a backend runs with when none are given (a fresh dict)."""
    _check_backend(backend)
    return dict(_DEFAULT_PARAMS[backend])


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown selective-search backend {backend!r}; choose from {BACKENDS}")


def _check_params(backend: str, params: dict) -> dict:
    unknown = sorted(set(params) - set(_DEFAULT_PARAMS[backend]))
    if unknown:
        raise ValueError(f"backend {backend!r} does not take {unknown}; "
                         f"its parameters are {sorted(_DEFAULT_PARAMS[backend])}")
    return {**_DEFAULT_PARAMS[backend], **params}


def _opencv_segmentation():
    try:
        import cv2
        return cv2.ximgproc.segmentation
    except (ImportError, AttributeError) as err:
        raise RuntimeError(CONTRIB_HINT) from err


@functools.lru_cache(maxsize=1)
def _libc_srand():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).srand
    except (OSError, AttributeError, TypeError):
        return None


def _reset_c_rand() -> None:
    """Seed the C library's ``rand()``: OpenCV's selective search ranks regions with it.

    Without this the order of its boxes depends on which images the process handled before,
    so a sharded or resumed run would not reproduce a single run (``cv2.setRNGSeed`` does
    not reach it).
    """
    srand = _libc_srand()
    if srand is not None:
        srand(0)


def opencv_regions(image: np.ndarray, backend: str = "opencv-fast", **params) -> np.ndarray:
    """OpenCV contrib selective search.

    Args:
        image (ndarray[H, W, 3] uint8): RGB image.
        backend: ``opencv-fast``, ``opencv-quality`` or ``opencv-single``.
        **params: ``base_k``, ``inc_k``, ``sigma`` (fast, quality) or ``k``,
            ``sigma`` (single).

    Returns:
        ndarray[N, 4] int64: rects ``(x, y, w, h)``, w the true pixel extent.
    """
    params = _check_params(backend, params)
    segmentation = _opencv_segmentation()
    search = segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(np.ascontiguousarray(image[:, :, ::-1]))  # OpenCV wants BGR
    if backend == "opencv-fast":
        search.switchToSelectiveSearchFast(int(params["base_k"]), int(params["inc_k"]),
                                           float(params["sigma"]))
    elif backend == "opencv-quality":
        search.switchToSelectiveSearchQuality(int(params["base_k"]), int(params["inc_k"]),
                                              float(params["sigma"]))
    else:
        search.switchToSingleStrategy(int(params["k"]), float(params["sigma"]))
    _reset_c_rand()
    rects = search.process()
    return np.asarray(rects, dtype=np.int64).reshape(-1, 4)


def _downscale(image: np.ndarray, max_side: int) -> np.ndarray:
    import cv2

    height, width = image.shape[:2]
    factor = max_side / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def map_boxes_to_original(boxes_xyxy: np.ndarray, small_hw: tuple[int, int],
                          orig_hw: tuple[int, int]) -> np.ndarray:
    """Map inclusive-corner boxes from a resized copy back to the original.

    Pixel column x1 covers [x1, x1 + 1) in the small image, i.e.
    [x1 * sx, (x1 + 1) * sx) in the original; x1 → round(x1 * sx) and
    x2 → round((x2 + 1) * sx) - 1, so widths scale and a box with
    x2 = x1 - 1 (SoCo's zero-width rect) stays so. Results are clipped to the
    image (x1 to [0, W - 1], x2 to [-1, W - 1]).

    Args:
        boxes_xyxy (ndarray[N, 4] int): boxes in the small image.
        small_hw, orig_hw: (H, W) of the small and the original image.

    Returns:
        ndarray[N, 4] int32.
    """
    (small_h, small_w), (orig_h, orig_w) = small_hw, orig_hw
    scale = np.array([orig_w / small_w, orig_h / small_h] * 2)
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    boxes[:, 2:] += 1
    mapped = np.rint(boxes * scale).astype(np.int64)
    mapped[:, 2:] -= 1
    low = np.array([0, 0, -1, -1])
    high = np.array([orig_w - 1, orig_h - 1, orig_w - 1, orig_h - 1])
    return np.clip(mapped, low, high).astype(np.int32)


def run_backend(image: np.ndarray, backend: str = "soco", max_side: int | None = None,
                **params) -> np.ndarray:
    """Selective search on one image.

    Args:
        image (ndarray[H, W, 3] uint8): RGB image at original resolution.
        backend: one of :data:`BACKENDS`.
        max_side: if set and max(H, W) > max_side, search a copy resized
            (area interpolation) so that its longer side is max_side, and map
            the boxes back to original pixels. SoCo searched the full
            resolution (None); downscaling changes the boxes.
        **params: backend parameters (see :func:`default_params`).

    Returns:
        ndarray[N, 4] int32: ``boxes_xyxy`` with inclusive corners in the
        original frame. For ``soco``: every region in the original's order,
        duplicates kept.

    Warns:
        LargeImageWarning: ``soco`` on more than :data:`PIXEL_BUDGET` pixels (after
        ``max_side``): memory and time grow with the pixels, see :func:`pixel_budget_advice`.
    """
    _check_backend(backend)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be a positive integer, got {max_side}")
    orig_hw = image.shape[:2]
    work = image
    if max_side is not None and max(orig_hw) > max_side:
        work = _downscale(image, max_side)
    if backend == "soco":
        params = _check_params(backend, params)
        advice = pixel_budget_advice(*work.shape[:2])
        if advice is not None:
            warnings.warn(advice, LargeImageWarning, stacklevel=2)
        rects = soco_regions(work, scale=float(params["scale"]), sigma=float(params["sigma"]),
                             min_size=int(params["min_size"]),
                             texture_hist_max=SOCO_TEXTURE_HIST_MAX)
    else:
        rects = opencv_regions(work, backend, **params)
    boxes_xyxy = xywh_to_xyxy_inclusive(rects)
    if work is not image:
        boxes_xyxy = map_boxes_to_original(boxes_xyxy, work.shape[:2], orig_hw)
    return boxes_xyxy
