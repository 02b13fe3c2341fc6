"""detectron2 / AdelaiDet parity for the one-stage detectors (RetinaNet, FCOS).

FCOS follows AdelaiDet's ``FCOS`` (Tian et al. 2019, https://github.com/aim-uofa/AdelaiDet,
``adet/modeling/fcos``; the config behind DenseCL's FCOS row is ``configs/DenseCL/FCOS_R50_1x``
on ``Base-FCOS``), where torchvision's ``FCOS`` differs:

* locations at the centre of their stride cell, ``stride·i + stride // 2`` (torchvision: ``stride·i``);
* a learnable scalar per level multiplies the regression output before the ReLU (``USE_SCALE``);
* the GIoU loss of each positive is weighted by its centerness target and normalised by the sum
  of those targets; classification and centerness losses by the number of positives, both
  averaged over processes (torchvision: everything by the local positive count, unweighted);
* at test time a location is a candidate when its class probability passes the threshold (0.05),
  is ranked by probability × centerness, and scores ``sqrt(probability × centerness)``
  (torchvision thresholds the square root).

Unchanged because they already agree: GN towers, centerness on the regression branch, targets
normalised by the stride, centre sampling radius 1.5, size ranges 64/128/256/512, ambiguities
to the smallest box, focal loss α 0.25 γ 2, prior 0.01, NMS 0.6, 1000 candidates per level,
100 detections.

RetinaNet follows detectron2's ``RetinaNet``: focal and L1 losses summed over the batch and
divided by an exponential moving average of the number of positive anchors (momentum 0.9,
start 100) instead of torchvision's per-image normalisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.fcos import FCOS, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.ops import boxes as box_ops
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from socokit import distributed as sdist


def _mean_over_processes(value: Tensor) -> float:
    """The mean of a 0-dim tensor over all processes (its value without distributed)."""
    return sdist.all_reduce_mean(value.detach().to(torch.float64)).item()


class ScaledFCOSRegressionHead(FCOSRegressionHead):
    """FCOS regression branch with one learnable scale per level (AdelaiDet ``Scale``, init 1).

    Output as torchvision's: ``(Tensor[N, HWA, 4] = relu(scale_l · reg), Tensor[N, HWA, 1])``.
    Key added: ``scales`` (Tensor[L]).
    """

    def __init__(self, in_channels: int, num_anchors: int, num_levels: int = 5, **kwargs):
        super().__init__(in_channels, num_anchors, **kwargs)
        self.scales = nn.Parameter(torch.ones(num_levels))

    def forward(self, x: list[Tensor]) -> tuple[Tensor, Tensor]:
        regs, ctrs = [], []
        for level, features in enumerate(x):
            feat = self.conv(features)
            reg = F.relu(self.bbox_reg(feat) * self.scales[level])  # [N, 4A, H, W]
            ctr = self.bbox_ctrness(feat)  # [N, A, H, W]
            n, _, h, w = reg.shape
            regs.append(reg.view(n, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
            ctrs.append(ctr.view(n, -1, 1, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 1))
        return torch.cat(regs, dim=1), torch.cat(ctrs, dim=1)


class AdelaiFCOSHead(FCOSHead):
    """``FCOSHead`` with AdelaiDet's regression branch and loss normalisation (module docstring)."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_levels: int = 5):
        super().__init__(in_channels, num_anchors, num_classes)
        self.regression_head = ScaledFCOSRegressionHead(in_channels, num_anchors, num_levels)

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs) -> dict[str, Tensor]:
        """Losses from per-location matches (``-1`` = background).

        ``classification``: focal loss sum / mean positives per process; ``bbox_regression``:
        Σ ctrness_target · (1 − GIoU) / mean Σ ctrness_target; ``bbox_ctrness``: BCE sum / mean
        positives.
        """
        cls_logits = head_outputs["cls_logits"]  # [N, HWA, C]
        deltas = head_outputs["bbox_regression"]  # [N, HWA, 4]
        ctr_logits = head_outputs["bbox_ctrness"].squeeze(dim=2)  # [N, HWA]
        gt_classes, gt_boxes = [], []
        for t, idx in zip(targets, matched_idxs):
            if len(t["labels"]) == 0:
                classes = torch.full_like(idx, -1)
                boxes = t["boxes"].new_zeros((len(idx), 4))
            else:
                classes = t["labels"][idx.clip(min=0)].clone()
                boxes = t["boxes"][idx.clip(min=0)]
                classes[idx < 0] = -1
            gt_classes.append(classes)
            gt_boxes.append(boxes)
        gt_classes, gt_boxes, anchors = torch.stack(gt_classes), torch.stack(gt_boxes), torch.stack(anchors)
        fg = gt_classes >= 0
        num_pos = max(_mean_over_processes(fg.sum()), 1.0)
        onehot = torch.zeros_like(cls_logits)
        onehot[fg, gt_classes[fg]] = 1.0
        loss_cls = sigmoid_focal_loss(cls_logits, onehot, reduction="sum") / num_pos
        targets_enc = self.box_coder.encode(anchors[fg], gt_boxes[fg])  # [P, 4] ltrb / stride
        lr, tb = targets_enc[:, [0, 2]], targets_enc[:, [1, 3]]
        ctr_t = torch.sqrt((lr.min(dim=1).values / lr.max(dim=1).values)
                           * (tb.min(dim=1).values / tb.max(dim=1).values))  # [P]
        denorm = max(_mean_over_processes(ctr_t.sum()), 1e-6)
        pred_boxes = self.box_coder.decode(deltas[fg], anchors[fg])
        giou = generalized_box_iou_loss(pred_boxes, gt_boxes[fg], reduction="none")  # [P]
        loss_reg = (giou * ctr_t).sum() / denorm
        loss_ctr = F.binary_cross_entropy_with_logits(ctr_logits[fg], ctr_t, reduction="sum") / num_pos
        return {"classification": loss_cls, "bbox_regression": loss_reg, "bbox_ctrness": loss_ctr}


class AdelaiFCOS(FCOS):
    """torchvision ``FCOS`` with AdelaiDet's test-time candidate rule (module docstring)."""

    def postprocess_detections(self, head_outputs, anchors, image_shapes) -> list[dict[str, Tensor]]:
        detections = []
        for index, image_shape in enumerate(image_shapes):
            boxes_all, scores_all, labels_all = [], [], []
            for reg, logits, ctr, level_anchors in zip(
                    [r[index] for r in head_outputs["bbox_regression"]], [c[index] for c in head_outputs["cls_logits"]],
                    [b[index] for b in head_outputs["bbox_ctrness"]], anchors[index]):
                num_classes = logits.shape[-1]
                prob = torch.sigmoid(logits)  # [HWA, C]
                ranked = (prob * torch.sigmoid(ctr)).flatten()
                candidates = torch.where(prob.flatten() > self.score_thresh)[0]
                k = det_utils._topk_min(candidates, self.topk_candidates, 0)
                top, order = ranked[candidates].topk(k)
                chosen = candidates[order]
                loc = torch.div(chosen, num_classes, rounding_mode="floor")
                boxes = box_ops.clip_boxes_to_image(self.box_coder.decode(reg[loc], level_anchors[loc]), image_shape)
                boxes_all.append(boxes)
                scores_all.append(torch.sqrt(top))
                labels_all.append(chosen % num_classes)
            boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return detections


class Detectron2RetinaNet(RetinaNet):
    """torchvision ``RetinaNet`` with detectron2's loss normalisation (module docstring).

    ``loss_normalizer`` (a buffer, so it is checkpointed and resumes exactly) holds the moving
    average of positive anchors per step on this process. Under DDP (``broadcast_buffers``) every
    process starts each step from rank 0's value; detectron2 keeps one per process (its DDP does
    not broadcast buffers). Both are moving averages of the same quantity.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("loss_normalizer", torch.tensor(100.0, dtype=torch.float64))

    def compute_loss(self, targets, head_outputs, anchors) -> dict[str, Tensor]:
        matched_idxs = []
        for a, t in zip(anchors, targets):
            if t["boxes"].numel() == 0:
                matched_idxs.append(torch.full((a.size(0),), -1, dtype=torch.int64, device=a.device))
            else:
                matched_idxs.append(self.proposal_matcher(box_ops.box_iou(t["boxes"], a)))
        cls_logits = head_outputs["cls_logits"]  # [N, HWA, C]
        deltas = head_outputs["bbox_regression"]  # [N, HWA, 4]
        loss_cls = cls_logits.new_zeros(())
        loss_reg = cls_logits.new_zeros(())
        num_pos = 0
        for t, a, idx, logits, d in zip(targets, anchors, matched_idxs, cls_logits, deltas):
            fg = idx >= 0
            valid = idx != self.proposal_matcher.BETWEEN_THRESHOLDS
            onehot = torch.zeros_like(logits)
            if fg.any():
                onehot[fg, t["labels"][idx[fg]]] = 1.0
                target = self.box_coder.encode_single(t["boxes"][idx[fg]], a[fg])
                loss_reg = loss_reg + F.l1_loss(d[fg], target, reduction="sum")
            loss_cls = loss_cls + sigmoid_focal_loss(logits[valid], onehot[valid], reduction="sum")
            num_pos += int(fg.sum().item())
        if self.training:
            self.loss_normalizer.mul_(0.9).add_(0.1 * max(num_pos, 1))
        norm = float(self.loss_normalizer)
        return {"classification": loss_cls / norm, "bbox_regression": loss_reg / norm}
