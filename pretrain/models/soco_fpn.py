"""SoCo with a ResNet-FPN backbone and a 4conv-1fc box head (SoCo_FPN, SoCo_FPN*).

Wei et al., "Aligning Pretraining for Detection via Object-Level Contrastive
Learning", NeurIPS 2021 (https://arxiv.org/abs/2106.02637); behaviour of the
released code ``hologerry/SoCo`` as described in docs/method.md §3.

One iteration (SoCo_FPN, views V1 224², V2 224², V3 112²; box sets
``b1_12, b1_13`` of V1, ``b2`` of V2, ``b3`` of V3, each [N, L, 5])::

    for each view v:            P2..P5 = FPN(ResNet(V_v))                 # online and target
    for each box set s of v,
        for each level p:       roi = RoIAlign7(P_p, boxes_s)              # (N·L, 256, 7, 7), every box at every level
                                h   = box_head(roi)                        # (N·L, 1024)
                                q   = normalize(predictor(projector(h)))   # online
                                z   = normalize(projector_t(box_head_t(roi_t)))  # target, no grad
    concatenate the levels:     q_s, z_s : (N, P·L, 256), row p·L + i
    loss = l(1→2; C12) + l(2→1; C12ᵀ) + l(1→3; C13) + l(3→1; C13ᵀ)      # l in loss.py, min −8

The correspondence C (N, P·L, P·L) is 1 where box i of V1 assigned to level p
and box j of Vk assigned to level p' are the same proposal (cross-level matches
allowed); all other (box, level) outputs are computed and then masked out.

Execution modes (same math unless stated):
  * ``head_mode="faithful"``: head, projector and predictor are called
    once per (box set, level), as in the original, so BN statistics are taken
    over each call's N·L RoIs (16 calls per network for SoCo_FPN).
  * ``head_mode="batched"`` (default): the RoIs of all box sets and levels go through
    the head, projector and predictor in ONE call per network, with per-group
    BN statistics (:mod:`pretrain.models.grouped_bn`); outputs, loss, gradients
    and BN running statistics equal the faithful mode up to float rounding.
  * ``roi_levels="assigned"`` (changes the math, explicit option): each box is
    pooled only at the level(s) where it has a correspondence (rows/columns of
    C with a match), and one head call per network normalises over those RoIs
    only. Same loss formula, about 4x less head compute, different BN batch
    statistics than the original (docs/method.md §8 item 9).

SoCo_FPN* (``SoCo_FPN_Star``) adds V4 (V2 downsampled to 112²) with box sets
``b1_14`` / ``b4`` and V3 at 192²: six loss terms, minimum −12.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from pretrain.config import ROI_LEVEL_MODES  # noqa: F401  (re-exported)
from pretrain.models.base import HEAD_MODES, OnlineTargetModel, roi_align_norm, scale_boxes, upcast
from pretrain.models.grouped_bn import batch_norm_groups
from pretrain.models.loss import soco_pair_loss
from pretrain.models.mlp import MLP
from pretrain.topology import topology_of
from socokit.backbones import build_box_head, build_fpn_backbone

__all__ = ["SoCo_FPN", "SoCo_FPN_Star", "ROI_LEVEL_MODES"]


def default_init_(module: nn.Module) -> nn.Module:
    """PyTorch default init of every conv/linear/BN (the original head and MLPs, docs/method.md §3.4/3.5)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
            m.reset_parameters()
    return module


class SoCo_FPN(OnlineTargetModel):
    """SoCo_FPN: object-level BYOL on FPN RoI features (three views, four loss terms).

    Args:
        backbone: ``"resnet50"`` (default) or ``"timm:<name>"``; FPN input
            channels follow it.
        head_mode: ``"faithful"`` or ``"batched"`` (see module docstring).
        roi_levels: ``"all"`` (original) or ``"assigned"`` (see module docstring).
        fpn_channels: FPN width (256).
        pooler_resolution: RoIAlign output size (7).
        conv_dim: channels of the head's four 3×3 convs (256).
        fc_dim: box-head output (1024).
        mlp_hidden_dim: projector/predictor hidden width (4096).
        out_dim: projection size (256).
        sampling_ratio: RoIAlign sampling ratio (-1).
        aligned: RoIAlign ``aligned`` (True).

    Forward:
        views (list of Tensor[N, 3, S_v, S_v]): ``[V1, V2, V3]``.
        boxes (list of Tensor[N, L, 5]): ``[b1_12, b1_13, b2, b3]``, normalised
            x1, y1, x2, y2 and id.
        corres (list of Tensor[N, P·L, P·L]): ``[C12, C13]``.

    Returns:
        dict: ``"loss"`` (scalar with grad) and detached diagnostics
        ``"loss_<a><b>"`` per directed term and ``"matches"`` (mean matched
        pairs per image and pair).
    """

    ARCH = "SoCo_FPN"
    TOPOLOGY = topology_of(ARCH)  # shared with the data pipeline
    NUM_VIEWS = TOPOLOGY.num_views  # 3
    SET_VIEWS = TOPOLOGY.set_views  # view index of each box set: b1_12, b1_13, b2, b3
    PAIRS = TOPOLOGY.pairs  # (V1 set, Vk set) of corres[k]
    PAIR_VIEWS = TOPOLOGY.pair_names
    NUM_LEVELS = 4  # P2..P5
    EMA_PARTS = ("backbone", "box_head", "projector")

    def __init__(self, backbone: str = "resnet50", head_mode: str = "batched", roi_levels: str = "all",
                 fpn_channels: int = 256, pooler_resolution: int = 7, conv_dim: int = 256, fc_dim: int = 1024,
                 mlp_hidden_dim: int = 4096, out_dim: int = 256, sampling_ratio: int = -1,
                 aligned: bool = True):
        super().__init__()
        if head_mode not in HEAD_MODES:
            raise ValueError(f"head_mode must be one of {HEAD_MODES}, got {head_mode!r}")
        if roi_levels not in ROI_LEVEL_MODES:
            raise ValueError(f"roi_levels must be one of {ROI_LEVEL_MODES}, got {roi_levels!r}")
        self.backbone_name = backbone
        self.head_mode = head_mode
        self.roi_levels = roi_levels
        self.pooler_resolution = pooler_resolution
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        # Body: He fan-out + zero-init residual; FPN: Kaiming fan-out (inside socokit).
        self.online_backbone = build_fpn_backbone(backbone, norm_layer=nn.BatchNorm2d, out_channels=fpn_channels)
        self.online_box_head = default_init_(build_box_head(nn.BatchNorm2d, fpn_channels, pooler_resolution,
                                                            conv_dim=conv_dim, fc_dim=fc_dim))
        self.online_projector = MLP(fc_dim, mlp_hidden_dim, out_dim)
        self.online_predictor = MLP(out_dim, mlp_hidden_dim, out_dim)
        self._init_target()

    # ------------------------------------------------------------------ forward
    def forward(self, views: list[torch.Tensor], boxes: list[torch.Tensor],
                corres: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        self._check_inputs(views, boxes, corres)
        online_q = self._embed(views, boxes, corres, online=True)  # per set: N, P·L, D
        with torch.no_grad():
            target_z = self._embed(views, boxes, corres, online=False)
        return self._loss(online_q, target_z, corres)

    def _loss(self, online_q, target_z, corres) -> dict[str, torch.Tensor]:
        out, total = {}, 0.0
        for (a, b), c, name in zip(self.PAIRS, corres, self.PAIR_VIEWS):
            c = upcast(c)
            l_ab = soco_pair_loss(online_q[a], target_z[b], c)  # V1 predicts Vk
            l_ba = soco_pair_loss(online_q[b], target_z[a], c.transpose(1, 2))  # Vk predicts V1
            total = total + l_ab + l_ba
            out[f"loss_{name}"] = l_ab.detach()
            out[f"loss_{name[::-1]}"] = l_ba.detach()
        out["matches"] = torch.stack([c.float().sum(dim=(1, 2)).mean() for c in corres]).mean().detach()
        out["loss"] = total
        return out

    def _check_inputs(self, views, boxes, corres) -> None:
        if len(views) != self.NUM_VIEWS or len(boxes) != len(self.SET_VIEWS) or len(corres) != len(self.PAIRS):
            raise ValueError(f"{self.ARCH} expects {self.NUM_VIEWS} views, {len(self.SET_VIEWS)} box sets and "
                             f"{len(self.PAIRS)} correspondences, got {len(views)}, {len(boxes)}, {len(corres)}")
        n, l = boxes[0].shape[:2]
        for b in boxes:
            if b.dim() != 3 or b.shape[0] != n or b.shape[1] != l or b.shape[2] < 4:
                raise ValueError(f"every box set must be [N={n}, L={l}, 5], got {tuple(b.shape)}")
        pl = self.NUM_LEVELS * l
        for c in corres:
            if tuple(c.shape) != (n, pl, pl):
                raise ValueError(f"correspondence must be [N, P*L, P*L] = {(n, pl, pl)}, got {tuple(c.shape)}")

    # --------------------------------------------------------------- embedding
    def _branch(self, online: bool):
        if online:
            return self.online_backbone, [self.online_box_head, self.online_projector, self.online_predictor]
        return self.target_backbone, [self.target_box_head, self.target_projector]

    def _pyramids(self, backbone: nn.Module, views: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Backbone + FPN once per view (as in the original): [view][level] -> (N, 256, H_p, W_p)."""
        return [list(backbone(v).values())[: self.NUM_LEVELS] for v in views]

    def _pool_all(self, pyramids, boxes) -> dict[tuple[int, int], torch.Tensor]:
        """Every box set at every level: {(set, level): (N·L, C, R, R)}; one RoIAlign per (view, level)."""
        pooled = {}
        for v, levels in enumerate(pyramids):
            sets = [s for s, sv in enumerate(self.SET_VIEWS) if sv == v]
            for p, feat in enumerate(levels):
                rois = roi_align_norm(feat, [boxes[s] for s in sets], self.pooler_resolution,
                                      self.sampling_ratio, self.aligned)
                for s, chunk in zip(sets, rois.split([boxes[s].shape[0] * boxes[s].shape[1] for s in sets])):
                    pooled[(s, p)] = chunk
        return pooled

    @staticmethod
    def _project(x: torch.Tensor, heads: list[nn.Module]) -> torch.Tensor:
        for module in heads:  # box head -> projector (-> predictor)
            x = module(x)
        return F.normalize(upcast(x), dim=1)

    def _embed(self, views, boxes, corres, online: bool) -> list[torch.Tensor]:
        backbone, heads = self._branch(online)
        pyramids = self._pyramids(backbone, views)
        if self.roi_levels == "assigned":
            return self._embed_assigned(pyramids, boxes, corres, heads)
        pooled = self._pool_all(pyramids, boxes)
        n, l = boxes[0].shape[:2]
        num_sets, num_levels = len(self.SET_VIEWS), self.NUM_LEVELS
        order = [(s, p) for s in range(num_sets) for p in range(num_levels)]  # the original's call order
        if self.head_mode == "faithful":
            outs = [self._project(pooled[key], heads) for key in order]  # one call per (set, level)
            emb = torch.stack(outs)  # S·P, N·L, D
        else:
            with batch_norm_groups(heads, len(order)):
                emb = self._project(torch.cat([pooled[key] for key in order]), heads)  # S·P·N·L, D
        emb = emb.view(num_sets, num_levels, n, l, -1).permute(0, 2, 1, 3, 4)  # S, N, P, L, D
        return list(emb.reshape(num_sets, n, num_levels * l, -1).unbind(0))  # per set: N, P·L, D

    def _active_masks(self, corres, n: int, l: int) -> list[torch.Tensor]:
        """Per box set, (N, P, L) bool: the (level, box) entries that have a correspondence."""
        masks = [None] * len(self.SET_VIEWS)
        for (a, b), c in zip(self.PAIRS, corres):
            masks[a] = (c.sum(dim=2) > 0).view(n, self.NUM_LEVELS, l)
            masks[b] = (c.sum(dim=1) > 0).view(n, self.NUM_LEVELS, l)
        return masks

    def _embed_assigned(self, pyramids, boxes, corres, heads) -> list[torch.Tensor]:
        """roi_levels="assigned": pool only matched (level, box) entries, one head call per network."""
        n, l = boxes[0].shape[:2]
        num_sets, num_levels = len(self.SET_VIEWS), self.NUM_LEVELS
        masks = self._active_masks(corres, n, l)
        pooled, flat_index = [], []
        for s, v in enumerate(self.SET_VIEWS):
            for p in range(num_levels):
                img, box = masks[s][:, p, :].nonzero(as_tuple=True)  # active boxes at this level
                if img.numel() == 0:
                    continue
                feat = upcast(pyramids[v][p])
                h, w = feat.shape[-2:]
                coords = scale_boxes(boxes[s][img, box], w, h)
                rois = torch.cat([img.to(coords.dtype)[:, None], coords], dim=1)
                pooled.append(roi_align(feat, rois, (self.pooler_resolution, self.pooler_resolution),
                                        1.0, self.sampling_ratio, self.aligned))
                flat_index.append(((s * n + img) * num_levels + p) * l + box)  # into (S, N, P, L)
        if sum(x.shape[0] for x in pooled) < 2:
            # BN needs >= 2 RoIs. Zero embeddings (zero loss) that still touch every
            # parameter, so DDP without find_unused_parameters gets (zero) gradients.
            dim = self.online_projector.linear2.out_features
            anchor = sum(p.sum() for m in heads for p in m.parameters()) + upcast(pyramids[0][0]).sum()
            zeros = upcast(pyramids[0][0].new_zeros(num_sets, n, num_levels * l, dim)) + 0.0 * anchor
            return list(zeros.unbind(0))
        emb = self._project(torch.cat(pooled), heads)  # one call: BN over all matched RoIs
        index = torch.cat(flat_index)
        full = emb.new_zeros(num_sets * n * num_levels * l, emb.shape[1]).index_copy(0, index, emb)
        return list(full.view(num_sets, n, num_levels * l, -1).unbind(0))


class SoCo_FPN_Star(SoCo_FPN):
    """SoCo_FPN* (docs/method.md §2.3, §3.7): four views, six loss terms (minimum −12).

    Forward:
        views: ``[V1 224², V2 224², V3 192², V4 112²]`` (V4 = V2's crop at 112²).
        boxes: ``[b1_12, b1_13, b1_14, b2, b3, b4]``.
        corres: ``[C12, C13, C14]``.
    """

    ARCH = "SoCo_FPN_Star"
    TOPOLOGY = topology_of(ARCH)
    NUM_VIEWS = TOPOLOGY.num_views  # 4
    SET_VIEWS = TOPOLOGY.set_views  # b1_12, b1_13, b1_14, b2, b3, b4
    PAIRS = TOPOLOGY.pairs
    PAIR_VIEWS = TOPOLOGY.pair_names
