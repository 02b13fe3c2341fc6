"""Local binary patterns (P=8, R=1, "default") of an RGB image, vectorised.

The selective search of SoCo computes ``skimage.feature.local_binary_pattern(
channel, 8, 1.0)`` on each of R, G, B. scikit-image evaluates the 8 circle
points by bilinear interpolation (constant 0 outside the image) one pixel at a
time. :func:`lbp_rgb` performs the same double-precision operations in the
same order, compiled with numba, so its codes are identical (``tests`` check this
against scikit-image), faster, and without scikit-image's warning about float input.
"""
from __future__ import annotations

import numba
import numpy as np
from skimage.feature import local_binary_pattern

_P = 8
_R = 1.0


def _circle_offsets() -> tuple[np.ndarray, np.ndarray]:
    """Row and column offsets of the 8 sampling points, as scikit-image computes them."""
    angles = 2 * np.pi * np.arange(_P, dtype=np.double) / _P
    return np.round(-_R * np.sin(angles), 5), np.round(_R * np.cos(angles), 5)


def _axis_weights(length: int, offset: float) -> tuple[int, int, np.ndarray]:
    """Integer floor/ceil shifts and fractional weights along one axis.

    skimage evaluates ``pos = k + offset``, ``lo = floor(pos)``, ``hi = ceil(pos)``
    and ``d = pos - lo`` for every pixel index k. For |k| < 2**50 the floor and
    ceil are ``k + floor(offset)`` and ``k + ceil(offset)``; the fractional part
    d still depends on k through rounding, so it is returned per index.

    Returns:
        (lo_shift, hi_shift, d (ndarray[length] float64))
    """
    k = np.arange(length, dtype=np.float64)
    lo = int(np.floor(offset))
    hi = int(np.ceil(offset))
    d = (k + offset) - (k + lo)
    return lo, hi, d


@numba.njit(cache=True, nogil=True)
def _lbp_codes(image, r_lo, r_hi, dr, c_lo, c_hi, dc):
    """uint8 [C, H, W] codes; per point i: integer shifts and fractional weights per index."""
    height, width, channels = image.shape
    codes = np.zeros((channels, height, width), dtype=np.uint8)
    padded = np.zeros((height + 2, width + 2), dtype=np.float64)  # constant 0 border
    for channel in range(channels):
        for y in range(height):
            for x in range(width):
                padded[y + 1, x + 1] = image[y, x, channel]
        for y in range(height):
            for x in range(width):
                center = padded[y + 1, x + 1]
                code = 0
                for i in range(8):
                    top = padded[1 + y + r_lo[i], 1 + x + c_lo[i]]
                    bottom = padded[1 + y + r_hi[i], 1 + x + c_lo[i]]
                    if c_lo[i] != c_hi[i]:
                        # skimage: (1 - dc) * P[row, minc] + dc * P[row, maxc]
                        w = dc[i, x]
                        top = (1 - w) * top + w * padded[1 + y + r_lo[i], 1 + x + c_hi[i]]
                        bottom = (1 - w) * bottom + w * padded[1 + y + r_hi[i], 1 + x + c_hi[i]]
                    value = top
                    if r_lo[i] != r_hi[i]:
                        value = (1 - dr[i, y]) * top + dr[i, y] * bottom
                    # skimage tests value - center >= 0, for finite doubles value >= center
                    if value >= center:
                        code |= 1 << i
                codes[channel, y, x] = code
    return codes


def lbp_rgb(image: np.ndarray, channels_first: bool = False) -> np.ndarray:
    """LBP codes of each channel, identical to scikit-image's.

    Each of the 8 circle points is interpolated bilinearly from its four grid neighbours
    with scikit-image's weights and operation order (horizontal first, then vertical; on a
    grid row or column the weights are exactly 1 and 0 and the step is skipped), compiled,
    one pixel at a time, without temporary images.

    Args:
        image (ndarray[H, W, C] uint8): image (C = 3 for RGB).
        channels_first: return [C, H, W] (contiguous) instead of an [H, W, C] view.

    Returns:
        ndarray[H, W, C] (or [C, H, W]) uint8: codes 0..255.
    """
    height, width, _ = image.shape
    rows_off, cols_off = _circle_offsets()
    rows = [_axis_weights(height, rows_off[i]) for i in range(_P)]
    cols = [_axis_weights(width, cols_off[i]) for i in range(_P)]
    codes = _lbp_codes(
        np.require(image, np.uint8, ['C', 'W']),  # one compiled specialisation
        np.array([r[0] for r in rows], dtype=np.int64), np.array([r[1] for r in rows], dtype=np.int64),
        np.stack([r[2] for r in rows]) if height else np.zeros((_P, 0)),
        np.array([c[0] for c in cols], dtype=np.int64), np.array([c[1] for c in cols], dtype=np.int64),
        np.stack([c[2] for c in cols]) if width else np.zeros((_P, 0)))
    return codes if channels_first else codes.transpose(1, 2, 0)


def lbp_rgb_skimage(image: np.ndarray) -> np.ndarray:
    """Reference: scikit-image's ``local_binary_pattern`` per channel, [H, W, C] uint8."""
    return np.stack([local_binary_pattern(image[:, :, c], _P, _R).astype(np.uint8)
                     for c in range(image.shape[2])], axis=-1)
