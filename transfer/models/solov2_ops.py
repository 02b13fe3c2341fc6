"""SOLOv2 building blocks without parameters: grid assignment, dice loss, point NMS, Matrix NMS.

Reference: Wang et al., "SOLOv2: Dynamic and Fast Instance Segmentation", NeurIPS 2020
(https://arxiv.org/abs/2003.10152), and its AdelaiDet implementation
(https://github.com/aim-uofa/AdelaiDet, ``adet/modeling/solov2``), whose defaults these follow.
Coordinates are pixels of the padded input batch, x right, y down, pixel ``(i, j)`` at
``(x=j, y=i)`` (AdelaiDet's centre-of-mass convention).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import masks_to_boxes


def center_of_mass(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mass centres of binary masks.

    Args:
        masks: Tensor[N, H, W] (0/1, any dtype).

    Returns:
        (cx, cy): float Tensors[N] in pixel-index units (pixel ``(i, j)`` sits at ``x=j, y=i``);
        0 for empty masks.
    """
    m = masks.float()
    h, w = m.shape[-2:]
    area = m.sum((1, 2)).clamp(min=1e-6)
    cx = (m.sum(1) * torch.arange(w, dtype=torch.float32, device=m.device)).sum(1) / area
    cy = (m.sum(2) * torch.arange(h, dtype=torch.float32, device=m.device)).sum(1) / area
    return cx, cy


def _cell(coord: float, extent: float, num_grid: int) -> int:
    """Grid index of a coordinate: floor(coord / extent * S) (may fall outside 0..S-1)."""
    return math.floor(coord * num_grid / extent)


@torch.no_grad()
def assign_grid_cells(boxes_xyxy: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                      padded_hw: tuple[int, int], num_grids, scale_ranges, sigma: float = 0.2):
    """Which S x S grid cells of which level predict which instance (SOLO's target assignment).

    An instance goes to every level whose scale range ``[lo, hi]`` (inclusive) contains
    ``sqrt(w * h)`` of its box; instances with an empty mask are skipped. On a level with grid
    S, the positive cells are the cells covered by the centre region (the box scaled by
    ``sigma`` around the mask's mass centre, clipped to the grid), limited to the 3 x 3
    neighbourhood of the mass centre's cell. Cell indices are ``floor(c / extent * S)`` with
    ``extent`` the padded image side (AdelaiDet writes ``(c / extent) // (1 / S)``, which
    differs only for a coordinate exactly on a cell edge, by floating-point rounding). When
    cells of several instances overlap, the later instance's class wins the cell but every
    instance keeps its mask target on it (as in AdelaiDet).

    Args:
        boxes_xyxy: Tensor[N, 4], pixels of the padded image.
        labels: Tensor[N], classes 1..K.
        masks: Tensor[N, H', W'] binary masks at the image size (H' <= padded H, W' <= padded W;
            the image sits at the top-left of the padded batch).
        padded_hw: (H, W) of the padded batch.
        num_grids: S per level, e.g. (40, 36, 24, 16, 12).
        scale_ranges: ((lo, hi), ...) per level, in pixels of ``sqrt(w * h)``.
        sigma: centre-region scale.

    Returns:
        list over levels of dicts: ``labels`` Tensor[S * S] int64 (0 = background, else 1..K;
        row-major cell index ``i * S + j``, i = row), ``cells`` Tensor[P] int64 (positive cell
        of each target, repeated when instances share a cell) and ``instances`` Tensor[P]
        int64 (index into the N instances).
    """
    device = labels.device
    height, width = padded_hw
    sizes = ((boxes_xyxy[:, 2] - boxes_xyxy[:, 0]) * (boxes_xyxy[:, 3] - boxes_xyxy[:, 1])).clamp(min=0).sqrt()
    valid = masks.flatten(1).sum(1) > 0
    cx, cy = center_of_mass(masks)
    half_w = (0.5 * sigma * (boxes_xyxy[:, 2] - boxes_xyxy[:, 0])).tolist()
    half_h = (0.5 * sigma * (boxes_xyxy[:, 3] - boxes_xyxy[:, 1])).tolist()
    cx, cy, sizes, valid, label_list = cx.tolist(), cy.tolist(), sizes.tolist(), valid.tolist(), labels.tolist()
    out = []
    for num_grid, (lo, hi) in zip(num_grids, scale_ranges):
        cate = torch.zeros((num_grid, num_grid), dtype=torch.int64)
        cells, instances = [], []
        for n in range(len(label_list)):
            if not (valid[n] and lo <= sizes[n] <= hi):
                continue
            ci, cj = _cell(cy[n], height, num_grid), _cell(cx[n], width, num_grid)
            top = max(0, _cell(cy[n] - half_h[n], height, num_grid), ci - 1)
            bottom = min(num_grid - 1, _cell(cy[n] + half_h[n], height, num_grid), ci + 1)
            left = max(0, _cell(cx[n] - half_w[n], width, num_grid), cj - 1)
            right = min(num_grid - 1, _cell(cx[n] + half_w[n], width, num_grid), cj + 1)
            cate[top:bottom + 1, left:right + 1] = label_list[n]
            for i in range(top, bottom + 1):
                for j in range(left, right + 1):
                    cells.append(i * num_grid + j)
                    instances.append(n)
        out.append({"labels": cate.flatten().to(device),
                    "cells": torch.tensor(cells, dtype=torch.int64, device=device),
                    "instances": torch.tensor(instances, dtype=torch.int64, device=device)})
    return out


def downsample_masks(masks: torch.Tensor, padded_hw: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    """Binary masks at the image size → padded → ``out_hw`` (bilinear, then >= 0.5).

    The image sits at the top-left of the padded batch. AdelaiDet rescales the unpadded mask by
    1/4 with OpenCV's bilinear resize and rounds; bilinear sampling with ``align_corners=False``
    and a 0.5 threshold does the same on the padded mask (whose sides are multiples of 32).

    Args:
        masks: Tensor[N, H', W'] (0/1).
        padded_hw: (H, W) of the padded batch.
        out_hw: mask-feature size, ``(H / 4, W / 4)``.

    Returns:
        float Tensor[N, *out_hw] of 0/1.
    """
    n, h, w = masks.shape
    padded = masks.new_zeros((n, *padded_hw), dtype=torch.float32)
    padded[:, :h, :w] = masks.float()
    if n == 0:
        return padded.new_zeros((0, *out_hw))
    small = F.interpolate(padded[:, None], size=out_hw, mode="bilinear", align_corners=False)[:, 0]
    return (small >= 0.5).float()


def dice_loss(probs: torch.Tensor, targets: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Per-instance dice loss ``1 - 2 sum(p t) / (sum(p^2) + eps + sum(t^2) + eps)``.

    The SOLO papers' D(p, q) with squared terms; ``eps`` = 0.001 added to both sums as in
    AdelaiDet.

    Args:
        probs: Tensor[P, ...] mask probabilities (after sigmoid).
        targets: Tensor[P, ...] binary targets.

    Returns:
        Tensor[P].
    """
    p = probs.flatten(1).float()
    t = targets.flatten(1).float()
    return 1 - 2 * (p * t).sum(1) / ((p * p).sum(1) + eps + (t * t).sum(1) + eps)


def point_nms(heat: torch.Tensor) -> torch.Tensor:
    """Keep category scores that are the maximum of their 2 x 2 window (SOLO's point NMS).

    Args:
        heat: Tensor[B, K, S, S] of probabilities.

    Returns:
        Tensor[B, K, S, S]: ``heat`` where a cell is not smaller than its left, top and
        top-left neighbours (the 2 x 2 window ending at it), 0 elsewhere.
    """
    hmax = F.max_pool2d(heat, kernel_size=2, stride=1, padding=1)[:, :, :-1, :-1]
    return heat * (hmax == heat)


def matrix_nms(masks: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor,
               kernel: str = "gaussian", sigma: float = 2.0) -> torch.Tensor:
    """Matrix NMS (SOLOv2, Sec. 3.3): decay every score by its same-class overlaps, in parallel.

    For masks sorted by decreasing score, the decay of mask j is
    ``min(1, min_{i<j, same class} f(iou_ij) / f(iou_max_i))``, where ``iou_max_i`` is the
    largest IoU of mask i with a higher-scored same-class mask (0 if none) and
    ``f(x) = exp(-sigma x^2)`` (gaussian) or ``1 - x`` (linear). The outer ``min(1, .)``
    matches AdelaiDet's matrix formulation, whose first row never decays.

    Args:
        masks: Tensor[N, H, W] binary masks, sorted by decreasing ``scores``.
        labels: Tensor[N] class of each mask.
        scores: Tensor[N] sorted in decreasing order.
        kernel: "gaussian" or "linear".
        sigma: Gaussian kernel width (2.0 in SOLOv2).

    Returns:
        Tensor[N]: the decayed scores.

    Raises:
        ValueError: unknown ``kernel``.
    """
    if kernel not in ("gaussian", "linear"):
        raise ValueError(f"unknown Matrix NMS kernel {kernel!r} (gaussian or linear)")
    n = len(scores)
    if n == 0:
        return scores
    flat = masks.flatten(1).float()
    inter = flat @ flat.T                                              # [N, N]
    area = flat.sum(1)
    iou = (inter / (area[:, None] + area[None, :] - inter).clamp(min=1e-6)).triu(diagonal=1)
    same = (labels[:, None] == labels[None, :]).float().triu(diagonal=1)
    iou = iou * same                                                   # iou[i, j], i above j
    iou_max = iou.max(0).values                                        # [N] compensation of i
    if kernel == "gaussian":
        ratio = torch.exp(-sigma * (iou ** 2 - iou_max[:, None] ** 2))
    else:
        ratio = (1 - iou) / (1 - iou_max[:, None]).clamp(min=1e-6)
    ratio = torch.where(same.bool(), ratio, torch.ones_like(ratio))    # only higher, same-class i
    decay = ratio.min(0).values.clamp(max=1.0)
    return scores * decay


def mask_boxes_xyxy(binary: torch.Tensor) -> torch.Tensor:
    """Tight boxes of binary masks, ``[x_min, y_min, x_max + 1, y_max + 1]`` (detectron2's
    ``BitMasks.get_bounding_boxes``: the box covers the pixels); zeros for empty masks.

    Args:
        binary: Tensor[N, H, W] bool.

    Returns:
        float Tensor[N, 4].
    """
    boxes = torch.zeros((len(binary), 4), dtype=torch.float32, device=binary.device)
    nonempty = binary.flatten(1).any(1)
    if nonempty.any():
        boxes[nonempty] = masks_to_boxes(binary[nonempty]).float() + boxes.new_tensor([0, 0, 1, 1])
    return boxes
