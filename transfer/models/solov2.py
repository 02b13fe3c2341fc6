"""SOLOv2 instance segmentation on the ResNet-FPN (P2–P6) of the R-CNN detectors.

Wang et al., "SOLOv2: Dynamic and Fast Instance Segmentation", NeurIPS 2020
(https://arxiv.org/abs/2003.10152). Defaults are those of AdelaiDet's ``SOLOv2_R50_1x``
(``adet/config/defaults.py`` ``MODEL.SOLOV2``, ``configs/SOLOv2/Base-SOLOv2.yaml`` and DenseCL's
``configs/DenseCL/SOLOv2_R50_1x.yaml``, https://github.com/aim-uofa/AdelaiDet).

* Instance branch (``ins_head``), shared over 5 levels: P2 (halved), P3, P4, P5, P6 (resized to
  P5), i.e. strides (8, 8, 16, 32, 32), each resized to an S x S grid, S = (40, 36, 24, 16, 12).
  Category tower and kernel tower: 4 x (3x3 conv 512, GN, ReLU); the kernel tower's input has
  2 CoordConv channels. Outputs: K class logits and E = 256 dynamic 1x1 kernel weights per cell.
* Mask-feature branch (``mask_head``): P2–P5 brought to 1/4 scale (3x3 conv 128 + GN + ReLU,
  x2 bilinear upsampling per level; CoordConv channels on P5), summed, 1x1 conv to E = 256,
  GN, ReLU.
* Mask of cell c: ``sigmoid(kernel_c · F)`` at 1/4 scale. Losses: dice (weight 3) on the
  positive cells' masks, sigmoid focal loss (alpha 0.25, gamma 2) on the categories.
* Inference: score > 0.1 after point NMS, masks > 0.5 with more pixels than the level's
  stride, score x mask-ness, top 500, Matrix NMS (Gaussian, sigma 2), score >= 0.05, top 100.

State-dict keys: ``backbone.body.*`` / ``backbone.fpn.*`` (those of the Mask R-CNN FPN detector,
so detection-init files load unchanged), ``ins_head.*``, ``mask_head.*`` (AdelaiDet's names).

Deviation (documented in docs/finetune.md): the loss normalisers (number of positive masks for
the dice mean, positive cells + 1 for the focal sum) count the whole global batch, summed over
processes, where AdelaiDet counts each GPU's 2 images. One process is exactly AdelaiDet; with
DDP the gradient no longer depends on how the batch is split over processes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from socokit import distributed as sdist
from transfer.models.norms import group_norm, norm_layer
from transfer.models.rcnn import build_fpn_neck
from transfer.models.solov2_ops import (assign_grid_cells, dice_loss, downsample_masks, mask_boxes_xyxy,
                                        matrix_nms, point_nms)


@dataclass(frozen=True)
class SOLOv2Config:
    """SOLOv2 hyper-parameters (AdelaiDet ``MODEL.SOLOV2.*`` defaults).

    Attributes:
        num_grids: S per level (``NUM_GRIDS``).
        instance_strides: stride of each instance level, pixels (``FPN_INSTANCE_STRIDES``);
            used to drop masks with at most ``stride`` pixels at 1/4 scale.
        scale_ranges: ((lo, hi), ...) of ``sqrt(box area)`` per level, pixels, inclusive.
        sigma: centre-region scale of the positive cells.
        instance_channels: width of the category and kernel towers.
        num_instance_convs: convs per tower.
        num_kernels: E, dynamic-kernel length = mask-feature channels (``NUM_KERNELS`` =
            ``NUM_MASKS``; 1x1 kernels).
        mask_channels: width of the mask-feature branch before its last 1x1 conv.
        prior_prob: initial foreground probability of the category logits.
        score_thresh: category score threshold at test time (``SCORE_THR``).
        mask_thresh: mask probability threshold (``MASK_THR``).
        nms_pre: candidates kept before Matrix NMS (``NMS_PRE``).
        update_thresh: score threshold after Matrix NMS (``UPDATE_THR``).
        nms_kernel: "gaussian" or "linear"; nms_sigma: Gaussian width.
        focal_alpha, focal_gamma, focal_weight: category focal loss.
        dice_weight: weight of the dice mask loss.
    """

    num_grids: tuple = (40, 36, 24, 16, 12)
    instance_strides: tuple = (8, 8, 16, 32, 32)
    scale_ranges: tuple = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
    sigma: float = 0.2
    instance_channels: int = 512
    num_instance_convs: int = 4
    num_kernels: int = 256
    mask_channels: int = 128
    prior_prob: float = 0.01
    score_thresh: float = 0.1
    mask_thresh: float = 0.5
    nms_pre: int = 500
    update_thresh: float = 0.05
    nms_kernel: str = "gaussian"
    nms_sigma: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    focal_weight: float = 1.0
    dice_weight: float = 3.0

    def __post_init__(self):
        n = len(self.num_grids)
        if n != 5 or len(self.instance_strides) != n or len(self.scale_ranges) != n:
            raise ValueError("SOLOv2 needs 5 levels: num_grids, instance_strides and scale_ranges of length 5")
        if any(len(r) != 2 or r[0] > r[1] for r in self.scale_ranges):
            raise ValueError(f"scale_ranges must be (lo, hi) pairs with lo <= hi, got {self.scale_ranges}")
        if self.nms_kernel not in ("gaussian", "linear"):
            raise ValueError(f"nms_kernel must be gaussian or linear, got {self.nms_kernel!r}")
        if min(self.num_grids) < 1 or self.instance_channels < 1 or self.num_kernels < 1:
            raise ValueError("num_grids, instance_channels and num_kernels must be positive")

    @classmethod
    def from_options(cls, options=None) -> "SOLOv2Config":
        """Build from a dict (YAML recipe) or ``KEY=VALUE`` strings (command line).

        Tuples are comma-separated on the command line (``num_grids=40,36,24,16,12``), scale
        ranges as ``lo:hi`` pairs (``scale_ranges=1:96,48:192,96:384,192:768,384:2048``).

        Raises:
            ValueError: unknown key or a value of the wrong form.
        """
        if options is None or isinstance(options, cls):
            return options or cls()
        if isinstance(options, (list, tuple)):
            pairs = {}
            for item in options:
                key, sep, value = str(item).partition("=")
                if not sep:
                    raise ValueError(f"SOLOv2 option {item!r} is not KEY=VALUE")
                pairs[key.strip().replace("-", "_")] = value.strip()
            options = pairs
        types = {f.name: f.default for f in fields(cls)}
        values = {}
        for key, value in dict(options).items():
            if key not in types:
                raise ValueError(f"unknown SOLOv2 option {key!r} (use {', '.join(types)})")
            try:
                values[key] = _coerce(key, value, types[key])
            except (TypeError, ValueError) as e:
                raise ValueError(f"SOLOv2 option {key}={value!r}: {e}") from e
        return cls(**values)


def _coerce(key: str, value, default):
    if key == "scale_ranges":
        if isinstance(value, str):
            value = [p.split(":") for p in value.split(",")]
        return tuple((float(lo), float(hi)) for lo, hi in value)
    if isinstance(default, tuple):
        items = value.split(",") if isinstance(value, str) else value
        return tuple(int(v) for v in items)
    return type(default)(value)


def coord_features(x: torch.Tensor) -> torch.Tensor:
    """Append CoordConv channels: x then y, each linearly from -1 to 1. [B, C, H, W] → [B, C+2, H, W]."""
    b, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype),
                            torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype), indexing="ij")
    return torch.cat([x, xs.expand(b, 1, h, w), ys.expand(b, 1, h, w)], dim=1)


def _conv_norm_relu(cin: int, cout: int, norm, kernel_size: int = 3) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=norm is None)]
    if norm is not None:
        layers.append(norm(cout))
    return nn.Sequential(*layers, nn.ReLU(inplace=True))


class SOLOv2InstanceHead(nn.Module):
    """Category and kernel prediction on S x S grids (shared over the 5 levels)."""

    def __init__(self, in_channels: int, num_classes: int, cfg: SOLOv2Config, norm=None):
        super().__init__()
        self.num_grids = cfg.num_grids
        width, depth = cfg.instance_channels, cfg.num_instance_convs
        # flattened Sequentials (conv, [norm], relu) × depth: AdelaiDet's key layout
        self.cate_tower = nn.Sequential(*[m for i in range(depth) for m in
                                          _conv_norm_relu(in_channels if i == 0 else width, width, norm)])
        self.kernel_tower = nn.Sequential(*[m for i in range(depth) for m in
                                            _conv_norm_relu(in_channels + 2 if i == 0 else width, width, norm)])
        self.cate_pred = nn.Conv2d(width, num_classes, 3, padding=1)
        self.kernel_pred = nn.Conv2d(width, cfg.num_kernels, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cate_pred.bias, -math.log((1 - cfg.prior_prob) / cfg.prior_prob))

    def forward(self, feats: list[torch.Tensor]):
        """feats: P2..P6. Returns (cate logits [B, K, S, S] per level, kernels [B, E, S, S] per level)."""
        p2, p3, p4, p5, p6 = feats
        levels = (F.interpolate(p2, size=p3.shape[-2:], mode="bilinear", align_corners=False),
                  p3, p4, p5, F.interpolate(p6, size=p5.shape[-2:], mode="bilinear", align_corners=False))
        cates, kernels = [], []
        for feat, grid in zip(levels, self.num_grids):
            x = F.interpolate(coord_features(feat), size=(grid, grid), mode="bilinear", align_corners=False)
            kernels.append(self.kernel_pred(self.kernel_tower(x)))
            cates.append(self.cate_pred(self.cate_tower(x[:, :-2])))
        return cates, kernels


class SOLOv2MaskHead(nn.Module):
    """Unified mask features at 1/4 scale from P2–P5 (CoordConv channels on P5)."""

    def __init__(self, in_channels: int, cfg: SOLOv2Config, norm=None):
        super().__init__()
        width = cfg.mask_channels
        self.convs_all_levels = nn.ModuleList()
        for level in range(4):
            seq = nn.Sequential()
            for j in range(max(level, 1)):
                cin = (in_channels + (2 if level == 3 else 0)) if j == 0 else width
                seq.add_module(f"conv{j}", _conv_norm_relu(cin, width, norm))
                if level > 0:
                    seq.add_module(f"upsample{j}", nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.convs_all_levels.append(seq)
        # AdelaiDet puts GroupNorm on this 1x1 conv whatever the head norm is
        self.conv_pred = nn.Sequential(nn.Conv2d(width, cfg.num_kernels, 1, bias=False),
                                       group_norm(cfg.num_kernels), nn.ReLU(inplace=True))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """feats: P2..P5 → Tensor[B, E, H/4, W/4]."""
        out = self.convs_all_levels[0](feats[0])
        for level in range(1, 4):
            x = coord_features(feats[level]) if level == 3 else feats[level]
            out = out + self.convs_all_levels[level](x)
        return self.conv_pred(out)


class SOLOv2(nn.Module):
    """SOLOv2 with torchvision's detector interface.

    ``model(images, targets)`` in training returns ``{"loss_ins", "loss_cate"}``; in eval
    ``model(images)`` returns per image ``boxes`` (Tensor[N, 4], xyxy of the masks, original
    frame), ``scores`` [N], ``labels`` [N] (1..K), ``masks`` (Tensor[N, 1, H, W] probabilities in
    the original frame; > ``mask_thresh`` is the instance).

    Args:
        backbone: module mapping a batch to an OrderedDict of P2..P6 with ``out_channels``.
        num_classes: classes including the background (K + 1; index 0 is never predicted).
        transform: the input transform (normalise, test-time resize, pad to 32).
        cfg: :class:`SOLOv2Config`.
        head_norm: norm factory of the heads' convs (GroupNorm in the recipe) or None.
        detections_per_img: instances kept per image (``MAX_PER_IMG``).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, transform: nn.Module | None = None,
                 cfg: SOLOv2Config | None = None, head_norm=None, detections_per_img: int = 100):
        super().__init__()
        self.cfg = cfg or SOLOv2Config()
        self.backbone = backbone
        self.transform = transform
        self.num_classes = num_classes - 1
        self.detections_per_img = detections_per_img
        self.ins_head = SOLOv2InstanceHead(backbone.out_channels, self.num_classes, self.cfg, head_norm)
        self.mask_head = SOLOv2MaskHead(backbone.out_channels, self.cfg, head_norm)

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        if self.training and targets is None:
            raise ValueError("SOLOv2 needs targets (boxes, labels, masks) in training mode")
        # images the evaluation loader resized come with their original sizes (transform.py)
        original_hw = getattr(self.transform, "given_original_sizes", None) or [tuple(img.shape[-2:]) for img in images]
        image_list, targets = self.transform(images, targets)
        feats = list(self.backbone(image_list.tensors).values())        # P2..P6
        cates, kernels = self.ins_head(feats)
        mask_feats = self.mask_head(feats[:4])                          # [B, E, H/4, W/4]
        padded_hw = tuple(image_list.tensors.shape[-2:])
        if self.training:
            return self.losses(cates, kernels, mask_feats, targets, padded_hw)
        return self.postprocess(cates, kernels, mask_feats, image_list.image_sizes, original_hw)

    def _flatten(self, cates, kernels):
        """[B, K, S, S] / [B, E, S, S] per level → [B, L, K] and [B, L, E], L = sum S^2."""
        b = cates[0].shape[0]
        cate = torch.cat([c.permute(0, 2, 3, 1).reshape(b, -1, self.num_classes) for c in cates], 1)
        kern = torch.cat([k.permute(0, 2, 3, 1).reshape(b, -1, k.shape[1]) for k in kernels], 1)
        return cate, kern

    def losses(self, cates, kernels, mask_feats, targets, padded_hw) -> dict:
        """Focal loss on every cell's classes and dice loss on the positive cells' masks."""
        cfg = self.cfg
        cate, kern = self._flatten(cates, kernels)
        offsets = [0]
        for s in cfg.num_grids:
            offsets.append(offsets[-1] + s * s)
        feat_hw = tuple(mask_feats.shape[-2:])
        cate_labels, dice_terms = [], []
        for b, target in enumerate(targets):
            if "masks" not in target:
                raise ValueError("SOLOv2 training needs instance masks in the targets")
            levels = assign_grid_cells(target["boxes"], target["labels"], target["masks"], padded_hw,
                                       cfg.num_grids, cfg.scale_ranges, cfg.sigma)
            cate_labels.append(torch.cat([lv["labels"] for lv in levels]))
            cells = torch.cat([lv["cells"] + off for lv, off in zip(levels, offsets)])
            if len(cells) == 0:
                continue
            inst = torch.cat([lv["instances"] for lv in levels])
            small = downsample_masks(target["masks"], padded_hw, feat_hw)   # [N, h, w]
            logits = kern[b, cells] @ mask_feats[b].flatten(1)             # [P, h*w]
            dice_terms.append(dice_loss(logits.float().sigmoid(), small[inst].flatten(1)))
        labels = torch.stack(cate_labels)                                   # [B, L], 0 = background
        onehot = torch.zeros_like(cate, dtype=torch.float32)
        pos = labels > 0
        onehot[pos, labels[pos] - 1] = 1.0
        dice = torch.cat(dice_terms) if dice_terms else cate.new_zeros(0, dtype=torch.float32)
        # normalisers over the global batch (see the module docstring), per process
        local = torch.stack([torch.tensor(float(len(dice)), device=cate.device), pos.sum().float()])
        counts = sdist.all_reduce_sum(local) / sdist.get_world_size()      # no host sync
        num_masks, num_cells = counts[0], counts[1] + 1.0 / sdist.get_world_size()
        # zero-weighted terms keep every parameter in the graph (DDP) when nothing is positive
        keep_graph = 0.0 * (kern.sum() + mask_feats.sum())
        loss_ins = dice.sum() / num_masks.clamp(min=1e-6)                  # 0 / eps = 0 without masks
        loss_cate = sigmoid_focal_loss(cate.float(), onehot, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma,
                                       reduction="sum") / num_cells
        return {"loss_ins": cfg.dice_weight * loss_ins + keep_graph, "loss_cate": cfg.focal_weight * loss_cate}

    @torch.no_grad()
    def postprocess(self, cates, kernels, mask_feats, image_sizes, original_hw) -> list[dict]:
        cate, kern = self._flatten([point_nms(c.sigmoid()) for c in cates], kernels)
        strides = torch.cat([cate.new_full((s * s,), float(st))
                             for s, st in zip(self.cfg.num_grids, self.cfg.instance_strides)])
        return [self._single(cate[b], kern[b], mask_feats[b], strides, image_sizes[b], original_hw[b])
                for b in range(len(image_sizes))]

    def _single(self, scores, kernels, feats, strides, image_hw, original_hw) -> dict:
        """One image: scores [L, K], kernels [L, E], feats [E, h, w] → detections dict."""
        cfg = self.cfg
        cell, cls = (scores > cfg.score_thresh).nonzero(as_tuple=True)
        score = scores[cell, cls]
        # masks once per distinct cell (a cell may pass the threshold for several classes);
        # entries (cell, class) index them through ``mask_of``
        uniq, mask_of = torch.unique(cell, return_inverse=True)
        h, w = feats.shape[-2:]
        probs = (kernels[uniq] @ feats.flatten(1)).float().sigmoid().view(-1, h, w)   # [U, h, w]
        binary = probs > cfg.mask_thresh
        area = binary.flatten(1).sum(1).float()
        maskness = (probs * binary).flatten(1).sum(1) / area.clamp(min=1)
        keep = area[mask_of] > strides[cell]           # more pixels than the level's stride
        score, cls, mask_of = score[keep] * maskness[mask_of[keep]], cls[keep], mask_of[keep]
        order = score.argsort(descending=True)[:cfg.nms_pre]
        score, cls, mask_of = score[order], cls[order], mask_of[order]
        score = matrix_nms(binary[mask_of], cls, score, cfg.nms_kernel, cfg.nms_sigma)
        keep = score >= cfg.update_thresh
        score, cls, mask_of = score[keep], cls[keep], mask_of[keep]
        order = score.argsort(descending=True)[:self.detections_per_img]
        score, cls, probs = score[order], cls[order], probs[mask_of[order]]
        if len(probs) == 0:
            return {"boxes": feats.new_zeros((0, 4), dtype=torch.float32), "scores": score.float(),
                    "labels": cls + 1, "masks": feats.new_zeros((0, 1, *original_hw), dtype=torch.float32)}
        # 1/4 scale → padded input → crop the image → original frame
        probs = F.interpolate(probs[:, None], size=(4 * h, 4 * w), mode="bilinear", align_corners=False)
        probs = F.interpolate(probs[:, :, :image_hw[0], :image_hw[1]], size=tuple(original_hw),
                              mode="bilinear", align_corners=False)
        boxes = mask_boxes_xyxy(probs[:, 0] > cfg.mask_thresh)
        return {"boxes": boxes, "scores": score.float(), "labels": cls + 1, "masks": probs}


def build_solov2(*, arch: str, num_classes: int, norms: dict, fpn_channels: int = 256,
                 detections_per_img: int = 100, solov2=None, **_) -> SOLOv2:
    """SOLOv2 on the ResNet-FPN (P2–P6) of :func:`transfer.models.rcnn.build_fpn_neck`.

    Args:
        arch: backbone name (torchvision ResNet or ``timm:<name>``).
        num_classes: including the background (K + 1).
        norms: part → norm name; ``backbone`` and ``fpn`` as for Mask R-CNN, ``head`` for both
            SOLOv2 heads (GroupNorm in the recipe).
        fpn_channels: FPN width (256).
        detections_per_img: instances kept per image (100).
        solov2: :class:`SOLOv2Config`, a dict or ``KEY=VALUE`` strings (see
            :meth:`SOLOv2Config.from_options`); None = the AdelaiDet defaults.

    The input transform is attached by :func:`transfer.models.build_detector`.
    """
    cfg = SOLOv2Config.from_options(solov2)
    backbone = build_fpn_neck(arch, norms, fpn_channels)
    return SOLOv2(backbone, num_classes, cfg=cfg, head_norm=norm_layer(norms["head"]),
                  detections_per_img=detections_per_img)
