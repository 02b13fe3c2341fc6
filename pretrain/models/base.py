"""Online/target bookkeeping shared by every pretraining model (BYOL style)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.ops import roi_align

from pretrain.config import HEAD_MODES  # noqa: F401  (re-exported)
from pretrain.models.ema import copy_to_target, ema_update_

__all__ = ["OnlineTargetModel", "roi_align_norm", "scale_boxes", "upcast", "HEAD_MODES"]


class OnlineTargetModel(nn.Module):
    """Base class: an online network and an EMA target copy without predictor.

    Subclasses create ``online_<part>`` modules, list the part names in
    ``EMA_PARTS`` (e.g. ``("backbone", "box_head", "projector")``) and call
    :meth:`_init_target`, which deep-copies each ``online_<part>`` into
    ``target_<part>`` (parameters and buffers), freezes it, and keeps it in
    train mode (the target always normalises with batch statistics, docs/method.md §3.6).

    The EMA is applied by the training loop, not inside ``forward``:
    ``model.update_target(tau_k)`` at the start of iteration k. The original
    updated the target inside ``forward``, after the online branch and before
    the target branch. Both see the same online parameters (the online
    forward does not change parameters; the optimiser step happened at the end
    of iteration k-1), so the target used by iteration k is identical. Doing it
    outside ``forward`` keeps ``forward`` free of side effects on parameters,
    lets the schedule be indexed by the global step (exact on resume), and works
    unchanged under DDP, where the training loop calls it on the unwrapped model.
    """

    EMA_PARTS: tuple[str, ...] = ()

    def _init_target(self) -> None:
        for part in self.EMA_PARTS:
            setattr(self, f"target_{part}", copy.deepcopy(getattr(self, f"online_{part}")))
        copy_to_target(self._ema_pairs())
        self.train(self.training)

    def _ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(getattr(self, f"online_{p}"), getattr(self, f"target_{p}")) for p in self.EMA_PARTS]

    def target_modules(self) -> list[nn.Module]:
        return [getattr(self, f"target_{p}") for p in self.EMA_PARTS]

    def online_modules(self) -> list[nn.Module]:
        return [m for name, m in self.named_children() if name.startswith("online_")]

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """EMA of the online parameters into the target: ``θt ← τ·θt + (1 − τ)·θo``.

        Args:
            momentum: τ of this iteration (see :func:`pretrain.schedules.momentum_schedule`).
        """
        ema_update_(self._ema_pairs(), momentum)

    def train(self, mode: bool = True) -> "OnlineTargetModel":
        super().train(mode)
        if all(hasattr(self, f"target_{p}") for p in self.EMA_PARTS):  # False during __init__
            for m in self.target_modules():
                m.train(True)  # the target always normalises with batch statistics
        return self


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32 for the numerically sensitive parts (RoIAlign, normalisation, loss, BN
    statistics) under AMP; float64 stays float64, so the models also run exactly in double."""
    return x if x.dtype == torch.float64 else x.float()


def scale_boxes(boxes_norm: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """``[..., >=4]`` normalised x1, y1, x2, y2 -> float32 ``[..., 4]`` times (W, H, W, H).

    Python-scalar products, so no host-to-device copy on CUDA.
    """
    b = upcast(boxes_norm[..., :4])
    return torch.stack([b[..., 0] * width, b[..., 1] * height, b[..., 2] * width, b[..., 3] * height], dim=-1)


def roi_align_norm(features: torch.Tensor, boxes_norm: list[torch.Tensor], output_size: int,
                   sampling_ratio: int = -1, aligned: bool = True) -> torch.Tensor:
    """RoIAlign of normalised boxes on one feature map, as in the original.

    Boxes are scaled by the feature map's width/height (spatial_scale 1), and
    the feature map is cast to float32 first (under AMP the original cast it to
    the boxes' dtype). Several box sets of the same view are pooled in one
    call; RoIAlign treats every RoI independently, so this equals one call per set.

    Args:
        features (Tensor[N, C, H, W]): one feature level of one view.
        boxes_norm (list of Tensor[N, L_s, >=4]): box sets, ``x1, y1, x2, y2``
            in [0, 1] of the view (extra columns such as the box id are ignored).
        output_size: pooled size (7 for the FPN head, 14 for C4).
        sampling_ratio: RoIAlign sampling ratio (-1: adaptive).
        aligned: half-pixel offset (True in every SoCo script).

    Returns:
        Tensor[sum_s N*L_s, C, R, R] float32, set-major then image-major
        (row ``offset_s + n * L_s + i`` is box i of image n in set s).
    """
    feats = upcast(features)
    h, w = feats.shape[-2:]
    rois = []
    for boxes in boxes_norm:
        n, l = boxes.shape[:2]
        coords = scale_boxes(boxes, w, h)  # N, L, 4 in feature pixels
        batch_idx = torch.arange(n, device=boxes.device, dtype=coords.dtype).view(n, 1, 1).expand(n, l, 1)
        rois.append(torch.cat([batch_idx, coords], dim=2).reshape(n * l, 5))
    return roi_align(feats, torch.cat(rois), output_size=(output_size, output_size), spatial_scale=1.0,
                     sampling_ratio=sampling_ratio, aligned=aligned)
