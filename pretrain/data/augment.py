"""Photometric augmentations of the SoCo/BYOL views (docs/method.md §2.3, §2.4 step 9).

* :data:`POST_1` / :data:`POST_2`: BYOL's asymmetric colour pipelines on PIL images
  (ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8 in torchvision's random op order, grayscale p 0.2,
  PIL Gaussian blur with radius ~ U(0.1, 2.0) p 1.0 / 0.1, solarize(128) p 0 / 0.2).
  The ops are torchvision's functional ops; only the random parameters are drawn from the
  sample's ``numpy.random.Generator`` instead of torch's global generator, so one generator
  drives the whole sample.
* :func:`to_normalized_tensor`: ToTensor + ImageNet Normalize.
* :func:`cutout_in_boxes_`: the in-box cutout done as the original intended (docs/method.md §8 item 2):
  boxes are the *post-flip* normalised boxes scaled to the view's own size, sampling is on
  integers, so the hole lands inside the box that the model pools.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (x / 255 - mean) / std == x * _SCALE - _SHIFT: one multiply and one subtract per pixel.
_SCALE = 1.0 / (255.0 * torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1))
_SHIFT = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1) / torch.tensor(
    IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)


@dataclass(frozen=True)
class ColourParams:
    """The random draws of one :class:`ColourAug` call.

    Attributes:
        jitter: (brightness, contrast, saturation, hue) factors, or None when the jitter is
            not applied.
        order: the order of the four jitter ops (0 brightness, 1 contrast, 2 saturation, 3 hue).
        grayscale: whether the view is turned grey.
        blur_radius: PIL Gaussian blur radius (sigma, pixels), or None.
        solarize: whether the view is solarized.
    """

    jitter: tuple[float, float, float, float] | None
    order: tuple[int, int, int, int]
    grayscale: bool
    blur_radius: float | None
    solarize: bool


@dataclass(frozen=True)
class ColourAug:
    """One BYOL colour pipeline; call it with a PIL RGB image and a generator."""

    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0
    solarize_threshold: int = 128

    def draw(self, rng: np.random.Generator) -> ColourParams:
        """The random parameters of one call, drawn in the order the pipeline applies them.

        torchvision ``ColorJitter``: uniform factors, then a random order of the four ops.
        """
        jitter, order = None, (0, 1, 2, 3)
        if rng.random() < self.jitter_prob:
            jitter = (
                float(rng.uniform(max(0.0, 1 - self.brightness), 1 + self.brightness)),
                float(rng.uniform(max(0.0, 1 - self.contrast), 1 + self.contrast)),
                float(rng.uniform(max(0.0, 1 - self.saturation), 1 + self.saturation)),
                float(rng.uniform(-self.hue, self.hue)),
            )
            order = tuple(int(k) for k in rng.permutation(4))
        grayscale = bool(rng.random() < self.grayscale_prob)
        blur = float(rng.uniform(*self.blur_sigma)) if rng.random() < self.blur_prob else None
        solarize = bool(rng.random() < self.solarize_prob)
        return ColourParams(jitter, order, grayscale, blur, solarize)

    def apply(self, img: Image.Image, params: ColourParams) -> Image.Image:
        """Apply drawn parameters with torchvision's / PIL's ops; returns a new PIL image."""
        if params.jitter is not None:
            ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
            for op_index in params.order:
                img = ops[op_index](img, params.jitter[op_index])
        if params.grayscale:
            img = img.convert("L").convert("RGB")
        if params.blur_radius is not None:
            img = img.filter(ImageFilter.GaussianBlur(radius=params.blur_radius))
        if params.solarize:
            img = ImageOps.solarize(img, threshold=self.solarize_threshold)
        return img

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Draw and apply; returns a new PIL image (the input is not modified)."""
        return self.apply(img, self.draw(rng))


#: Parameters that change nothing (colour switched off).
NO_COLOUR = ColourParams(None, (0, 1, 2, 3), False, None, False)

#: V1's pipeline ("post_1"): blur always, no solarize.
POST_1 = ColourAug(blur_prob=1.0, solarize_prob=0.0)
#: V2/V3/V4's pipeline ("post_2"): blur p 0.1, solarize p 0.2.
POST_2 = ColourAug(blur_prob=0.1, solarize_prob=0.2)


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float32 [3, H, W], (x / 255 - mean) / std (ToTensor + Normalize)."""
    arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous().to(torch.float32)
    return t.mul_(_SCALE).sub_(_SHIFT)


def cutout_in_boxes_(view: torch.Tensor, boxes_norm: np.ndarray, rng: np.random.Generator,
                     prob: float = 0.5, ratio: tuple[float, float] = (0.1, 0.3)) -> torch.Tensor:
    """Zero a square inside each box with probability ``prob`` (in place; returns ``view``).

    For every row (duplicates included): the box is scaled to view pixels
    (``floor(x * S)``, clipped to the view), area = U(ratio) x (x2 - x1 + 1)(y2 - y1 + 1),
    side s = round(sqrt(area)), centre (cx, cy) a uniform integer inside the box, and the
    region ``[cy - s//2, cy + s//2] x [cx - s//2, cx + s//2]`` (inclusive, clipped) is set to 0,
    which after normalisation is the mean colour.

    Args:
        view: float [3, H, W] normalised view (modified in place).
        boxes_norm: float [L, 5] post-flip normalised boxes of this view.
    """
    height, width = view.shape[-2:]
    for box in np.asarray(boxes_norm, dtype=np.float64):
        if rng.random() >= prob:
            continue
        x1 = min(max(int(math.floor(box[0] * width)), 0), width - 1)
        y1 = min(max(int(math.floor(box[1] * height)), 0), height - 1)
        x2 = min(max(int(math.floor(box[2] * width)), x1), width - 1)
        y2 = min(max(int(math.floor(box[3] * height)), y1), height - 1)
        area = rng.uniform(ratio[0], ratio[1]) * (x2 - x1 + 1) * (y2 - y1 + 1)
        half = int(round(math.sqrt(area))) // 2
        cx = int(rng.integers(x1, x2 + 1))
        cy = int(rng.integers(y1, y2 + 1))
        view[:, max(cy - half, 0):min(cy + half, height - 1) + 1,
             max(cx - half, 0):min(cx + half, width - 1) + 1] = 0.0
    return view
