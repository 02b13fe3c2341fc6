"""The detectors' input transform: normalisation (+ single-scale resize at test time).

``DetectorInputTransform`` is torchvision's ``GeneralizedRCNNTransform`` with three changes:

* images may arrive as uint8 ``[3, H, W]`` (4x less host→device traffic); they are converted
  to float and normalised in one step on the model's device;
* in training, images arrive already resized and flipped by the DataLoader workers
  (:mod:`transfer.data.transforms`), so the model does not resize them again;
* the pixel convention comes from the weights (``mean``/``std`` in [0, 1] units, channel order
  RGB or BGR), so the stem always sees what it was trained on.

At evaluation the model resizes to ``min_size[-1]`` / ``max_size`` and maps boxes and masks
back to the original image, exactly as torchvision does.
"""
from __future__ import annotations

import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform


def pixel_to_mean_std(pixel: dict) -> tuple[list[float], list[float], str]:
    """(mean, std) in [0, 1] units and the channel order, from a PIXEL_CONVENTION-like dict."""
    scale = float(pixel.get("range", 1.0))
    mean = [float(m) / scale for m in pixel["mean"]]
    std = [float(s) / scale for s in pixel["std"]]
    channels = str(pixel.get("channels", "RGB")).upper()
    if channels not in ("RGB", "BGR"):
        raise ValueError(f"unsupported pixel channel order {channels!r} (RGB or BGR)")
    return mean, std, channels


class DetectorInputTransform(GeneralizedRCNNTransform):
    """Normalise (uint8 or float input), resize only at test time, batch with padding.

    Args:
        min_size: test-time shorter side (the last entry is used; training sizes are drawn
            by the data pipeline). ``resize_in_model=True`` restores torchvision's behaviour
            of drawing the training size inside the model.
        max_size: cap on the longer side.
        image_mean, image_std: per-channel normalisation in [0, 1] units, in the order of
            ``channels``.
        channels: "RGB" (input order) or "BGR" (channels reversed before normalising).
        channels_last: return the padded batch in channels_last memory format.
    """

    def __init__(self, min_size, max_size, image_mean, image_std, channels: str = "RGB",
                 resize_in_model: bool = False, channels_last: bool = False, size_divisible: int = 32):
        super().__init__(min_size, max_size, list(image_mean), list(image_std), size_divisible=size_divisible)
        self.channels = channels
        self.resize_in_model = resize_in_model
        self.channels_last = channels_last

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        if not image.is_floating_point():
            image = image.float().mul_(1.0 / 255.0)
        if self.channels == "BGR":
            image = image.flip(0)
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        return (image - mean[:, None, None]) / std[:, None, None]

    def resize(self, image, target=None):
        if self.training and not self.resize_in_model:
            return image, target
        h, w = image.shape[-2:]
        scale = min(float(self.min_size[-1]) / min(h, w), float(self.max_size) / max(h, w))
        if self.training or (int(h * scale) >= 1 and int(w * scale) >= 1):
            return super().resize(image, target)
        # Extreme aspect ratios (e.g. 2 x 600): torchvision's scale factor would give a side of
        # 0 pixels; keep at least one (the predictions are mapped back by the actual sizes).
        size = (max(1, int(h * scale)), max(1, int(w * scale)))
        image = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        return image, target

    def batch_images(self, images, size_divisible: int = 32):
        batched = super().batch_images(images, size_divisible)
        if self.channels_last:
            batched = batched.contiguous(memory_format=torch.channels_last)
        return batched
