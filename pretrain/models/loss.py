"""SoCo correspondence-weighted regression loss and the BYOL loss (docs/method.md §3.7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.models.base import upcast

__all__ = ["soco_pair_loss", "byol_pair_loss"]


def soco_pair_loss(online_pred: torch.Tensor, target_proj: torch.Tensor,
                   corres: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """One directed SoCo loss term ``l(a -> b; C)``.

    ``l = -2 * mean_n [ sum(C_n * sim_n) / (sum(C_n) + eps) ]`` with
    ``sim_n = p_a[n] @ z_b[n]^T`` (cosines of L2-normalised vectors). This is
    BYOL's ``2 - 2 cos`` without the constant, averaged over the matched
    (box, box) pairs of each image (duplicated boxes count with their
    multiplicity), then over the local batch. An image without any match
    contributes 0 but still counts in the mean, as in the original.

    Args:
        online_pred (Tensor[N, M, D]): L2-normalised online predictions of view a.
        target_proj (Tensor[N, K, D]): L2-normalised target projections of view b.
        corres (Tensor[N, M, K]): correspondence weights (0/1) between a's and
            b's rows.
        eps: added to the number of matches.

    Returns:
        Tensor[]: the loss term (minimum -2). Computed in float32.
    """
    if online_pred.dim() != 3 or target_proj.dim() != 3 or corres.dim() != 3:
        raise ValueError("online_pred, target_proj and corres must be 3-D")
    pred = upcast(online_pred)
    targ = upcast(target_proj)
    corres = corres.to(pred.dtype)
    sim = torch.bmm(pred, targ.transpose(1, 2))  # N, M, K
    per_image = (sim * corres).sum(dim=(1, 2)) / (corres.sum(dim=(1, 2)) + eps)  # N
    return -2.0 * per_image.mean()


def byol_pair_loss(online_pred: torch.Tensor, target_proj: torch.Tensor) -> torch.Tensor:
    """BYOL term in the same convention as SoCo: ``-2 * mean_n cos(p_n, z_n)``.

    BYOL's ``2 - 2 cos`` without the constant, so that BYOL and SoCo losses are
    on the same scale (minimum -2 per term). Inputs need not be normalised.

    Args:
        online_pred (Tensor[N, D]): online predictions of view a.
        target_proj (Tensor[N, D]): target projections of view b.

    Returns:
        Tensor[]: the loss term, float32.
    """
    pred = F.normalize(upcast(online_pred), dim=1)
    targ = F.normalize(upcast(target_proj), dim=1)
    return -2.0 * (pred * targ).sum(dim=1).mean()
