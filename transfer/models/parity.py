"""detectron2-parity components for torchvision's detection classes.

Every published row this toolkit is compared with (SoCo, PyContrast, MoCo, DenseCL) was
fine-tuned with detectron2 (FCOS: AdelaiDet, built on it). torchvision's detectors differ from
it in small ways that move AP; the parts here restore detectron2's behaviour while keeping
torchvision's classes, module names and state-dict keys:

* :class:`AlignedMultiScaleRoIAlign`: RoIAlign with ``aligned=True`` (detectron2
  ``ROIAlignV2``; torchvision's ``MultiScaleRoIAlign`` hard-codes ``aligned=False``).
* :class:`Detectron2AnchorGenerator`: anchors with exact (not integer-rounded) extents.
* :class:`Detectron2RPN`: box regression loss smooth-L1 with β = 0 (= L1), losses normalised by
  ``batch_size_per_image × images`` (detectron2 ``RPN.SMOOTH_L1_BETA 0.0``).
* :class:`Detectron2RoIHeads`: box regression L1 (``ROI_BOX_HEAD.SMOOTH_L1_BETA 0.0``), binary
  mask targets cut with aligned RoIAlign (detectron2 ``BitMasks.crop_and_resize``), and for
  C4 a single res5 pass whose foreground rows feed the mask head (detectron2
  ``Res5ROIHeads``).
* :func:`detectron2_init_`: predictor and new-layer initialisation of detectron2
  (``FastRCNNOutputLayers``: class logits N(0, 0.01), box deltas N(0, 0.001);
  ``MaskRCNNConvUpsampleHead``: mask logits N(0, 0.001); fc and FPN ``c2_xavier_fill``).
* :func:`paste_masks_aligned`: detectron2's ``paste_masks_in_image`` (bilinear sampling of the
  M×M mask at pixel centres).

References: Wu et al., detectron2 (https://github.com/facebookresearch/detectron2), v0.3
``config/defaults.py``, ``modeling/roi_heads``, ``modeling/proposal_generator``,
``layers/roi_align.py``, ``structures/masks.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _setup_scales

from transfer.config import PARITY_MODES  # the names live with the configuration

TORCHVISION_BETA = 1.0 / 9.0  # torchvision's smooth-L1 β in the RPN and the box head


def check_parity(parity: str) -> str:
    """Validate a parity mode name (``detectron2`` or ``torchvision``)."""
    if parity not in PARITY_MODES:
        raise ValueError(f"unknown parity mode {parity!r}: use one of {', '.join(PARITY_MODES)}")
    return parity


def box_regression_loss(pred: Tensor, target: Tensor, beta: float) -> Tensor:
    """Summed smooth-L1 (β > 0) or L1 (β = 0) loss, as detectron2's ``smooth_l1_loss``.

    Args:
        pred, target: Tensor[N, 4] of encoded box deltas.
        beta: transition point from L2 to L1 (0 = plain L1).

    Returns:
        0-dim Tensor, the sum over all elements.
    """
    if beta == 0:
        return F.l1_loss(pred, target, reduction="sum")
    return F.smooth_l1_loss(pred, target, beta=beta, reduction="sum")


class Detectron2AnchorGenerator(AnchorGenerator):
    """``AnchorGenerator`` with detectron2's anchor geometry.

    torchvision rounds the half-extents of every cell anchor to integers (a 32-pixel anchor of
    aspect ratio 0.5 becomes 46×22); detectron2's ``DefaultAnchorGenerator`` keeps
    w = sqrt(size² / ratio), h = ratio·w (45.25×22.63). Anchor centres are at
    ``stride·(i + offset)`` (detectron2 ``ANCHOR_GENERATOR.OFFSET``: 0.0 for the R-CNN RPN and
    RetinaNet; FCOS's locations ``stride·i + stride // 2`` are ``offset=0.5``).

    Args:
        sizes, aspect_ratios: as ``AnchorGenerator`` (one tuple per feature map).
        offset: fraction of the stride added to every anchor centre.
    """

    def __init__(self, sizes, aspect_ratios, offset: float = 0.0):
        super().__init__(sizes, aspect_ratios)
        self.offset = float(offset)

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")):
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(ratios)  # ratio = h / w
        ws = (scales[None, :] / h_ratios[:, None]).reshape(-1)
        hs = (scales[None, :] * h_ratios[:, None]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2  # [A, 4] xyxy around (0, 0)

    def grid_anchors(self, grid_sizes, strides):
        anchors = super().grid_anchors(grid_sizes, strides)
        if not self.offset:
            return anchors
        out = []
        for a, (sh, sw) in zip(anchors, strides):
            shift = torch.stack([sw, sh, sw, sh]).to(a) * self.offset
            out.append(a + shift)
        return out


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """``MultiScaleRoIAlign`` with ``aligned=True`` (detectron2 ``ROIAlignV2``).

    Same level assignment as torchvision / detectron2 (``floor(4 + log2(sqrt(area) / 224))``,
    clamped to the available levels), same feature names and output size; only the half-pixel
    shift differs: a box ``[x1, x2]`` samples the continuous feature coordinates
    ``x1·scale - 0.5 … x2·scale - 0.5``, so a box covering pixels 0..7 at stride 8 is exactly
    feature cell 0.

    Input/output as ``MultiScaleRoIAlign``: features dict of Tensor[N, C, H_l, W_l], boxes a list
    of Tensor[K_i, 4] (xyxy, input-image pixels), returns Tensor[sum K_i, C, out, out].
    """

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        feats = [x[k] for k in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(feats, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = _convert_to_roi_format(boxes)  # [R, 5]: batch index, x1, y1, x2, y2
        if len(feats) == 1:
            return roi_align(feats[0], rois, self.output_size, self.scales[0], self.sampling_ratio, aligned=True)
        levels = self.map_levels(boxes)
        out = feats[0].new_zeros((len(rois), feats[0].shape[1]) + tuple(self.output_size))
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(levels == level)[0]
            pooled = roi_align(feat, rois[idx], self.output_size, scale, self.sampling_ratio, aligned=True)
            out[idx] = pooled.to(out.dtype)
        return out


class Detectron2RPN(RegionProposalNetwork):
    """torchvision's RPN with detectron2's loss: L1 box regression (β = ``smooth_l1_beta``),
    both losses summed and divided by ``batch_size_per_image × images`` (256 × N).

    Build with :meth:`from_torchvision` so every other setting stays the given RPN's.
    """

    def __init__(self, *args, smooth_l1_beta: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.smooth_l1_beta = float(smooth_l1_beta)

    @classmethod
    def from_torchvision(cls, rpn: RegionProposalNetwork, smooth_l1_beta: float = 0.0) -> "Detectron2RPN":
        return cls(rpn.anchor_generator, rpn.head, rpn.proposal_matcher.high_threshold,
                   rpn.proposal_matcher.low_threshold, rpn.fg_bg_sampler.batch_size_per_image,
                   rpn.fg_bg_sampler.positive_fraction, dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n),
                   rpn.nms_thresh, rpn.score_thresh, smooth_l1_beta=smooth_l1_beta)

    def compute_loss(self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor],
                     regression_targets: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(objectness loss, box loss) over the sampled anchors of all images.

        Args:
            objectness: Tensor[sum A_i] or [sum A_i, 1] logits of all anchors of all images.
            pred_bbox_deltas: Tensor[sum A_i, 4].
            labels: per image Tensor[A_i] with 1 (object), 0 (background), -1 (ignored).
            regression_targets: per image Tensor[A_i, 4] encoded deltas.
        """
        pos, neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos, dim=0))[0]
        neg = torch.where(torch.cat(neg, dim=0))[0]
        sampled = torch.cat([pos, neg], dim=0)
        labels_all = torch.cat(labels, dim=0)
        targets = torch.cat(regression_targets, dim=0)
        normalizer = self.fg_bg_sampler.batch_size_per_image * len(labels)
        box_loss = box_regression_loss(pred_bbox_deltas[pos], targets[pos], self.smooth_l1_beta) / normalizer
        objectness_loss = F.binary_cross_entropy_with_logits(
            objectness.flatten()[sampled], labels_all[sampled], reduction="sum") / normalizer
        return objectness_loss, box_loss


def mask_targets(gt_masks: Tensor, boxes: Tensor, matched_idxs: Tensor, size: int, aligned: bool) -> Tensor:
    """Cut each RoI's ground-truth mask to ``size × size``.

    Args:
        gt_masks: uint8/bool Tensor[G, H, W] of one image.
        boxes: Tensor[K, 4] foreground RoIs (xyxy, pixels).
        matched_idxs: int Tensor[K], the ground truth of each RoI.
        size: mask head output resolution M.
        aligned: detectron2 (``BitMasks.crop_and_resize``: aligned RoIAlign, then ``>= 0.5``, so
            targets are 0/1) or torchvision (``aligned=False``, soft targets).

    Returns:
        float Tensor[K, M, M].
    """
    rois = torch.cat([matched_idxs[:, None].to(boxes), boxes], dim=1)
    cut = roi_align(gt_masks[:, None].to(boxes.dtype), rois, (size, size), 1.0,
                    sampling_ratio=0 if aligned else -1, aligned=aligned)[:, 0]
    return (cut >= 0.5).to(cut.dtype) if aligned else cut


class Detectron2RoIHeads(RoIHeads):
    """torchvision ``RoIHeads`` (box + optional mask branch) with detectron2's training rules.

    Args (besides ``RoIHeads``'s):
        box_reg_beta: smooth-L1 β of the box regression loss (0 = L1, detectron2; 1/9 torchvision).
        aligned_mask_targets: cut mask targets with aligned RoIAlign and binarise them
            (detectron2) instead of torchvision's unaligned soft targets.
        shared_res5: C4 head. ``box_head`` must offer ``features(pooled) -> Tensor[R, C, 7, 7]``;
            res5 runs once on all sampled RoIs, the box branch averages its output and the mask
            branch takes the foreground rows of the same output (detectron2 ``Res5ROIHeads``).
            At test time the mask branch pools the detections again (``mask_roi_pool`` +
            ``mask_head``), as detectron2 does.

    Losses: ``loss_classifier`` (cross entropy, mean over RoIs), ``loss_box_reg`` (summed over
    foreground RoIs, divided by the number of RoIs), ``loss_mask`` (binary cross entropy, mean).
    Build with :meth:`from_torchvision` to keep every sampling/test setting of given heads.
    """

    def __init__(self, *args, box_reg_beta: float = 0.0, aligned_mask_targets: bool = True,
                 shared_res5: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.box_reg_beta = float(box_reg_beta)
        self.aligned_mask_targets = aligned_mask_targets
        self.shared_res5 = shared_res5

    @classmethod
    def from_torchvision(cls, heads: RoIHeads, **options) -> "Detectron2RoIHeads":
        return cls(heads.box_roi_pool, heads.box_head, heads.box_predictor,
                   heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold,
                   heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction,
                   heads.box_coder.weights, heads.score_thresh, heads.nms_thresh, heads.detections_per_img,
                   mask_roi_pool=heads.mask_roi_pool, mask_head=heads.mask_head,
                   mask_predictor=heads.mask_predictor, **options)

    def _box_features(self, pooled: Tensor):
        """(box features Tensor[R, D], res5 output Tensor[R, C, 7, 7] or None)."""
        if self.shared_res5:
            trunk = self.box_head.features(pooled)
            return trunk.mean(dim=(2, 3)), trunk
        return self.box_head(pooled), None

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None):
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features, trunk = self._box_features(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        if self.training:
            return [], self._losses(class_logits, box_regression, labels, regression_targets, proposals,
                                    matched_idxs, trunk, features, image_shapes, targets)
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        result = [{"boxes": b, "labels": l, "scores": s} for b, l, s in zip(boxes, labels, scores)]
        if self.has_mask():
            mask_boxes = [r["boxes"] for r in result]
            mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_boxes, image_shapes)))
            for probs, r in zip(maskrcnn_inference(mask_logits, [r["labels"] for r in result]), result):
                r["masks"] = probs  # [K, 1, M, M]
        return result, {}

    def _losses(self, class_logits, box_regression, labels, regression_targets, proposals, matched_idxs,
                trunk, features, image_shapes, targets) -> dict:
        labels_all = torch.cat(labels, dim=0)
        targets_all = torch.cat(regression_targets, dim=0)
        fg = torch.where(labels_all > 0)[0]
        deltas = box_regression.reshape(len(labels_all), -1, 4)[fg, labels_all[fg]]
        losses = {"loss_classifier": F.cross_entropy(class_logits, labels_all),
                  "loss_box_reg": box_regression_loss(deltas, targets_all[fg], self.box_reg_beta) / labels_all.numel()}
        if not self.has_mask():
            return losses
        fg_per_image = [torch.where(lab > 0)[0] for lab in labels]
        mask_boxes = [p[i] for p, i in zip(proposals, fg_per_image)]
        mask_matched = [m[i] for m, i in zip(matched_idxs, fg_per_image)]
        if trunk is not None:
            mask_features = trunk[fg]  # the same res5 output as the box branch, foreground rows
        else:
            mask_features = self.mask_head(self.mask_roi_pool(features, mask_boxes, image_shapes))
        mask_logits = self.mask_predictor(mask_features)  # [F, K, M, M]
        size = mask_logits.shape[-1]
        cut = [mask_targets(t["masks"], b, m, size, self.aligned_mask_targets)
               for t, b, m in zip(targets, mask_boxes, mask_matched)]
        gt_labels = torch.cat([t["labels"][m] for t, m in zip(targets, mask_matched)], dim=0)
        mask_target = torch.cat(cut, dim=0)
        if mask_target.numel() == 0:
            losses["loss_mask"] = mask_logits.sum() * 0
        else:
            picked = mask_logits[torch.arange(len(gt_labels), device=gt_labels.device), gt_labels]
            losses["loss_mask"] = F.binary_cross_entropy_with_logits(picked, mask_target)
        return losses


def c2_xavier_fill_(module: nn.Module) -> None:
    """detectron2 / Caffe2 ``XavierFill``: Kaiming-uniform with a = 1, bias 0."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def detectron2_init_(model: nn.Module) -> nn.Module:
    """Re-initialise the freshly built layers whose detectron2 init differs from torchvision's.

    * box predictor (``FastRCNNOutputLayers``): class logits N(0, 0.01²), box deltas
      N(0, 0.001²), biases 0 (torchvision: ``nn.Linear``'s default);
    * mask logits (``MaskRCNNConvUpsampleHead.predictor``): N(0, 0.001²), bias 0 (torchvision:
      Kaiming-normal fan-out);
    * box-head fc layers and FPN convs (lateral, output, P6/P7): ``c2_xavier_fill``.

    Call before loading an initialisation file (which overwrites the parts it holds).
    """
    heads = getattr(model, "roi_heads", None)
    if heads is not None:
        nn.init.normal_(heads.box_predictor.cls_score.weight, std=0.01)
        nn.init.normal_(heads.box_predictor.bbox_pred.weight, std=0.001)
        for layer in (heads.box_predictor.cls_score, heads.box_predictor.bbox_pred):
            nn.init.zeros_(layer.bias)
        for m in heads.box_head.modules():
            if isinstance(m, nn.Linear):
                c2_xavier_fill_(m)
        if heads.mask_predictor is not None:
            logits = heads.mask_predictor.mask_fcn_logits
            nn.init.normal_(logits.weight, std=0.001)
            nn.init.zeros_(logits.bias)
    fpn = getattr(model.backbone, "fpn", None)
    if fpn is not None:
        for m in fpn.modules():
            if isinstance(m, nn.Conv2d):
                c2_xavier_fill_(m)
    return model


def paste_masks_aligned(masks: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Paste M×M mask probabilities into the image (detectron2 ``paste_masks_in_image``).

    Pixel (y, x) samples the mask bilinearly at the continuous mask coordinate of its centre,
    ``(x + 0.5 - x1) / (x2 - x1) · M`` (``grid_sample``, ``align_corners=False``, zero padding,
    so values fade to 0 within half a mask cell outside the box). torchvision instead resizes the
    mask to the integer box size plus a 1-pixel border and pastes it.

    Args:
        masks: Tensor[N, 1, M, M] probabilities in [0, 1].
        boxes: Tensor[N, 4] xyxy in pixels of the output image.
        image_size: (H, W) of the output image.

    Returns:
        Tensor[N, 1, H, W] probabilities (dtype of ``masks``).
    """
    h, w = int(image_size[0]), int(image_size[1])
    out = masks.new_zeros((masks.shape[0], 1, h, w))
    for i, (mask, box) in enumerate(zip(masks, boxes.to(torch.float32).tolist())):
        x0, y0, x1, y1 = box
        # only the box region (+1 pixel) can be non-zero (detectron2's skip_empty path)
        left, top = max(int(x0) - 1, 0), max(int(y0) - 1, 0)
        right, bottom = min(int(x1) + 2, w), min(int(y1) + 2, h)
        if right <= left or bottom <= top:
            continue
        ys = torch.arange(top, bottom, device=masks.device, dtype=torch.float32) + 0.5
        xs = torch.arange(left, right, device=masks.device, dtype=torch.float32) + 0.5
        gy = (ys - y0) / max(y1 - y0, 1e-6) * 2 - 1
        gx = (xs - x0) / max(x1 - x0, 1e-6) * 2 - 1
        grid = torch.stack([gx[None, :].expand(len(ys), -1), gy[:, None].expand(-1, len(xs))], dim=2)
        pasted = F.grid_sample(mask[None].to(torch.float32), grid[None], mode="bilinear",
                               padding_mode="zeros", align_corners=False)  # [1, 1, h', w']
        out[i, :, top:bottom, left:right] = pasted[0].to(out.dtype)
    return out
