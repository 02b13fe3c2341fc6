"""Projector / predictor MLP of SoCo and BYOL (docs/method.md §3.5)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

__all__ = ["MLP"]


class MLP(nn.Sequential):
    """``Linear(in, hidden) -> BatchNorm1d(hidden) -> ReLU -> Linear(hidden, out)``.

    PyTorch default init, as in the original ``mlps.py``. The original applied
    the BN to an ``(N, C, 1)`` view because torch 1.6's SyncBatchNorm needed
    3-D input; torch 2.x's SyncBatchNorm accepts ``(N, C)``, so no reshape is
    needed and ``nn.SyncBatchNorm.convert_sync_batchnorm`` works unchanged.

    Being an ``nn.Sequential`` of leaf modules, it can be run with per-group
    batch statistics by :func:`pretrain.models.grouped_bn.grouped_forward`.

    Args:
        in_dim: input features (1024 after the FPN box head, 2048 after res5
            or a global-pooled ResNet-50, 256 for the predictor).
        hidden_dim: hidden width (4096).
        out_dim: output width (256).

    Shape:
        input ``(B, in_dim)`` -> output ``(B, out_dim)``.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256):
        super().__init__(OrderedDict([
            ("linear1", nn.Linear(in_dim, hidden_dim)),
            ("bn1", nn.BatchNorm1d(hidden_dim)),
            ("relu1", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(hidden_dim, out_dim)),
        ]))
