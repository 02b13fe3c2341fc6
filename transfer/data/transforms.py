"""Detection transforms that move boxes and masks together with the image.

Training: resize the shorter side to a size drawn from ``min_sizes`` (capped so the longer side
stays <= ``max_size``), then a horizontal flip with probability ``flip_prob``. The resize runs in
the DataLoader workers on 8-bit images (PIL bilinear), and instance masks are rasterised once at
the final size (polygons are scaled and flipped as coordinates; RLE masks are decoded and
resized with nearest neighbour). The model's own transform then only normalises (see
``transfer.models.transform.DetectorInputTransform``).

Evaluation: with ``resize_test`` the image is resized the same way (PIL bilinear on 8-bit, the
single test size, no flip; detectron2's ``ResizeShortestEdge`` at test time) and the model maps
its predictions back to the original frame; without it the image is left at its size and the
model resizes it (torchvision's behaviour).

Boxes are continuous ``boxes_xyxy`` in pixels (x2 = x + w of a COCO ``[x, y, w, h]`` box).
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils


def scaled_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """(new_h, new_w) with the shorter side ``short`` unless the longer one would pass ``max_size``.

    Follows detectron2's ``ResizeShortestEdge.get_output_shape``: the shorter side becomes
    ``short``, both sides shrink together when the longer one passes ``max_size``, and each side
    is rounded half up (``int(x + 0.5)``).
    """
    scale = short / min(h, w)
    new_h, new_w = (short, scale * w) if h < w else (scale * h, short)
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    # at least one pixel per side, for extreme aspect ratios (a 2 x 600 strip)
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


def segm_to_mask(segm, orig_hw: tuple[int, int], out_hw: tuple[int, int], flip: bool) -> np.ndarray:
    """Rasterise one COCO segmentation at the output size.

    Args:
        segm: polygon list ``[[x0, y0, x1, y1, ...], ...]``, uncompressed RLE
            (``counts`` a list) or compressed RLE, all in the original image frame.
        orig_hw: (H, W) of the original image.
        out_hw: (H', W') of the transformed image.
        flip: whether the transformed image is mirrored left-right.

    Returns:
        uint8 array [H', W'] with values 0/1.
    """
    (h, w), (oh, ow) = orig_hw, out_hw
    if isinstance(segm, list):
        sx, sy = ow / w, oh / h
        polys = []
        for poly in segm:
            p = np.asarray(poly, dtype=np.float64).reshape(-1, 2).copy()
            if len(p) < 3:
                continue
            p[:, 0] *= sx
            p[:, 1] *= sy
            if flip:
                p[:, 0] = ow - p[:, 0]
            polys.append(p.reshape(-1).tolist())
        if not polys:
            return np.zeros((oh, ow), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, oh, ow))
        return mask_utils.decode(rle).astype(np.uint8)
    rle = segm
    if isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, h, w)
    m = mask_utils.decode(rle).astype(np.uint8)
    if (oh, ow) != (h, w):
        t = torch.from_numpy(m)[None, None].float()
        m = F.interpolate(t, size=(oh, ow), mode="nearest")[0, 0].to(torch.uint8).numpy()
    if flip:
        m = m[:, ::-1]
    return np.ascontiguousarray(m)


class DetectionTransform:
    """Resize (train only), flip (train only) and tensor conversion of one sample.

    Args:
        train: training (random size + flip) or evaluation (image left at its size).
        min_sizes: shorter-side sizes drawn uniformly per image in training
            (detectron2 ``MIN_SIZE_TRAIN`` with sampling "choice").
        max_size: cap on the longer side.
        flip_prob: probability of a horizontal flip in training.
        with_masks: rasterise instance masks into ``target["masks"]``.
        resize_test: evaluation only: resize to ``min_sizes[-1]`` / ``max_size`` here (PIL, as in
            training) and mark the target ``pre_resized``; otherwise leave the image as it is.
    """

    def __init__(self, train: bool, min_sizes=(640, 672, 704, 736, 768, 800), max_size: int = 1333,
                 flip_prob: float = 0.5, with_masks: bool = True, resize_test: bool = False):
        self.train = train
        self.resize_test = resize_test
        self.min_sizes = tuple(int(s) for s in min_sizes)
        self.max_size = int(max_size)
        self.flip_prob = float(flip_prob)
        self.with_masks = with_masks

    def __call__(self, image: Image.Image, anns: list[dict], rng: random.Random):
        """Transform one image and its (non-crowd) annotations.

        Args:
            image: RGB PIL image in the original frame.
            anns: dicts with ``boxes_xyxy`` (4 floats), ``label`` (int) and optional
                ``segmentation``.
            rng: the random stream of this worker (size and flip draws).

        Returns:
            (image uint8 Tensor[3, H', W'], target dict with ``boxes`` float32 [N, 4],
            ``labels`` int64 [N] and, with masks, ``masks`` uint8 [N, H', W']).
        """
        w, h = image.size
        oh, ow, flip = h, w, False
        if self.train or self.resize_test:
            short = rng.choice(self.min_sizes) if self.train else self.min_sizes[-1]
            oh, ow = scaled_size(h, w, short, self.max_size)
            flip = self.train and rng.random() < self.flip_prob
            if (oh, ow) != (h, w):
                image = image.resize((ow, oh), Image.BILINEAR)
            if flip:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(image, dtype=np.uint8)
        img = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()  # [3, H', W']
        boxes_xyxy = torch.tensor([a["boxes_xyxy"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes_xyxy[:, 0::2] *= ow / w
        boxes_xyxy[:, 1::2] *= oh / h
        if flip:
            boxes_xyxy = torch.stack([ow - boxes_xyxy[:, 2], boxes_xyxy[:, 1],
                                      ow - boxes_xyxy[:, 0], boxes_xyxy[:, 3]], dim=1)
        boxes_xyxy[:, 0::2] = boxes_xyxy[:, 0::2].clamp(0, ow)
        boxes_xyxy[:, 1::2] = boxes_xyxy[:, 1::2].clamp(0, oh)
        # Degenerate boxes (zero width/height after clipping and scaling) are dropped:
        # torchvision's detectors reject them.
        keep = ((boxes_xyxy[:, 2] - boxes_xyxy[:, 0]) > 1e-2) & ((boxes_xyxy[:, 3] - boxes_xyxy[:, 1]) > 1e-2)
        target = {
            "boxes": boxes_xyxy[keep],
            "labels": torch.tensor([a["label"] for a in anns], dtype=torch.int64).reshape(-1)[keep],
        }
        if self.resize_test and not self.train:
            target["pre_resized"] = True
        if self.with_masks:
            kept = [a for a, k in zip(anns, keep.tolist()) if k]
            masks = [segm_to_mask(a["segmentation"], (h, w), (oh, ow), flip) for a in kept]
            target["masks"] = (torch.from_numpy(np.stack(masks)) if masks
                               else torch.zeros((0, oh, ow), dtype=torch.uint8))
        return img, target
