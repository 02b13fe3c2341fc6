"""BYOL's colour augmentations applied to a whole batch on the training device.

With ``PretrainDataConfig(colour_on_device=True)`` (``--colour-on-device``) the loader workers
only decode, crop, resize and flip: each view comes back as uint8 [3, S, S] together with its colour parameters,
drawn on the CPU side by :meth:`pretrain.data.augment.ColourAug.draw` with the sample's
generator (same draws, same order, same probabilities and ranges as the CPU path). The training
loop then calls :func:`apply_colour` on the device, which follows the PIL operations of the CPU
path (torchvision's ``ColorJitter`` on PIL images, PIL grayscale, ``ImageFilter.GaussianBlur``,
``ImageOps.solarize``) and normalises:

* brightness, contrast, saturation: PIL's ``Image.blend`` with the degenerate image (black; the
  rounded mean grey; the grey image), truncated and clipped to 0..255 after each op, in the
  drawn order, like the CPU path;
* hue: PIL's 8-bit HSV round trip (H, S quantised to 0..255, H shifted with wrap-around);
* grayscale: ITU-R 601-2 luma in PIL's fixed-point form;
* blur: a true Gaussian (radius = sigma, kernel ``2 * ceil(3 sigma) + 1``, edges repeated);
  PIL approximates it with three box blurs, so blurred pixels differ by a few levels;
* solarize: ``v >= 128 -> 255 - v``.

``tests/test_pretrain_data.py`` compares both paths for the same parameters on CPU tensors and
states the tolerance.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pretrain.data.augment import IMAGENET_MEAN, IMAGENET_STD, ColourParams

#: Layout of one row of the parameter tensor (float32 [N, PARAMS]).
PARAMS = 12
_J, _B, _C, _S, _H, _ORDER, _GRAY, _BLUR, _SOL = 0, 1, 2, 3, 4, 5, 9, 10, 11


def pack_params(params: ColourParams) -> torch.Tensor:
    """One view's :class:`ColourParams` as float32 [PARAMS] (see the module constants)."""
    row = torch.zeros(PARAMS, dtype=torch.float64)
    if params.jitter is not None:
        row[_J] = 1.0
        row[_B:_H + 1] = torch.tensor(params.jitter, dtype=torch.float64)
        row[_ORDER:_ORDER + 4] = torch.tensor(params.order, dtype=torch.float64)
    row[_GRAY] = float(params.grayscale)
    row[_BLUR] = 0.0 if params.blur_radius is None else params.blur_radius
    row[_SOL] = float(params.solarize)
    return row.to(torch.float32)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert("L")``: (R 19595 + G 38470 + B 7471 + 2^15) >> 16, as float [N, 1, H, W]."""
    xi = x.to(torch.int32)
    return ((xi[:, 0:1] * 19595 + xi[:, 1:2] * 38470 + xi[:, 2:3] * 7471 + 32768) >> 16).to(x.dtype)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ``Image.blend(degenerate, x, factor)`` on 0..255 values: truncate, clip."""
    factor = factor.to(torch.float32).view(-1, 1, 1, 1)
    out = degenerate + factor * (x - degenerate)
    return out.clamp_(0, 255).floor_()


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Round float64 values to float32 and back: where PIL's C code stores into a ``float``."""
    return x.to(torch.float32).to(torch.float64)


def _c_round(x: torch.Tensor) -> torch.Tensor:
    """C ``round`` (halves away from zero) for non-negative values."""
    return torch.floor(x + 0.5)


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """PIL's 8-bit HSV round trip with H shifted by ``shift`` (wrapping), as PIL computes it.

    Follows Pillow's ``rgb2hsv_row`` / ``hsv2rgb`` (libImaging/Convert.c) step by step in
    float64, rounding to float32 wherever the C code stores into a ``float``, so a hue step
    of one (about 6 v / 255 levels in one channel) is not lost to a different rounding.
    """
    x = x.to(torch.float64)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc > minc
    cr = torch.where(chroma, maxc - minc, torch.ones_like(maxc))
    sat = _f32(cr / torch.where(maxc > 0, maxc, torch.ones_like(maxc)))
    rc, gc, bc = _f32((maxc - r) / cr), _f32((maxc - g) / cr), _f32((maxc - b) / cr)
    h = torch.where(r == maxc, _f32(bc - gc),
                    torch.where(g == maxc, _f32(2.0 + rc - bc), _f32(4.0 + gc - rc)))
    h = _f32(torch.fmod(h / 6.0 + 1.0, 1.0))
    h8 = torch.where(chroma, torch.trunc(h * 255.0).clamp(0, 255), torch.zeros_like(h))
    s8 = torch.where(chroma, torch.trunc(sat * 255.0).clamp(0, 255), torch.zeros_like(h))
    h8 = torch.remainder(h8 + shift.to(torch.float64).view(-1, 1, 1), 256.0)
    i = torch.floor(_f32(h8) * 6.0 / 255.0)
    f = _f32(_f32(h8) * 6.0 / 255.0 - i)
    fs = _f32(s8 / 255.0)
    v = maxc
    p = _c_round(v * (1.0 - fs)).clamp(0, 255)
    q = _c_round(v * (1.0 - _f32(fs * f))).clamp(0, 255)
    t = _c_round(v * (1.0 - fs * (1.0 - f))).clamp(0, 255)
    idx = torch.remainder(i, 6).long().unsqueeze(0)
    out = torch.stack([torch.stack(c).gather(0, idx)[0] for c in
                       ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))], dim=1)
    grey = (s8 == 0).unsqueeze(1)
    return torch.where(grey, v.unsqueeze(1).expand_as(out), out).to(torch.float32)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [1, 3, H, W] values, edge pixels repeated (as PIL), rounded to integers."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    coords = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    out = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"),
                   kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"),
                   kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return out.round_().clamp_(0, 255)


def apply_colour_uint8(views: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """The colour pipeline on 0..255 values; returns float32 [N, 3, H, W] integers 0..255.

    Args:
        views: uint8 (or float) [N, 3, H, W] RGB views, any device.
        params: float32 [N, PARAMS] rows from :func:`pack_params`.
    """
    x = views.to(torch.float32)
    params = params.to(x.device, torch.float32)
    n = x.shape[0]
    jitter = params[:, _J] > 0
    if bool(jitter.any()):
        order = params[:, _ORDER:_ORDER + 4].long()
        for position in range(4):
            for op in range(4):
                sel = jitter & (order[:, position] == op)
                if not bool(sel.any()):
                    continue
                xs, factor = x[sel], params[sel, _B + op]
                if op == 0:  # brightness: blend with black
                    xs = _blend(torch.zeros_like(xs), xs, factor)
                elif op == 1:  # contrast: blend with the rounded mean grey
                    mean = _luma(xs).mean(dim=(1, 2, 3), dtype=torch.float64)
                    grey = torch.floor(mean + 0.5).to(xs.dtype).view(-1, 1, 1, 1)
                    xs = _blend(grey.expand_as(xs), xs, factor)
                elif op == 2:  # saturation: blend with the grey image
                    xs = _blend(_luma(xs).expand_as(xs), xs, factor)
                else:  # hue, PIL's uint8 shift: int32(h * 255) as uint8
                    shift = torch.remainder(torch.trunc(factor.double() * 255.0), 256.0)
                    xs = _hue(xs, shift.to(xs.dtype))
                x[sel] = xs
    gray = params[:, _GRAY] > 0
    if bool(gray.any()):
        x[gray] = _luma(x[gray]).expand(-1, 3, -1, -1)
    for k in torch.nonzero(params[:, _BLUR] > 0).flatten().tolist():
        x[k:k + 1] = _gaussian_blur(x[k:k + 1], float(params[k, _BLUR]))
    sol = (params[:, _SOL] > 0).view(n, 1, 1, 1)
    return torch.where(sol & (x >= 128), 255.0 - x, x)


def apply_colour(views: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Colour augmentation + ImageNet normalisation of a batch of uint8 views.

    Args:
        views: uint8 [N, 3, H, W] RGB views (on the training device).
        params: float32 [N, PARAMS] colour parameters (see :func:`pack_params`).

    Returns:
        float32 [N, 3, H, W]: ``(x / 255 - mean) / std``, as the CPU path's ToTensor+Normalize.
    """
    x = apply_colour_uint8(views, params)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std
