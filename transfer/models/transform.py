"""The detectors' input transform: normalisation (+ single-scale resize at test time).

``DetectorInputTransform`` is torchvision's ``GeneralizedRCNNTransform`` with three changes:

* images may arrive as uint8 ``[3, H, W]`` (4x less host→device traffic); they are converted
  to float and normalised in one step on the model's device;
* in training, images arrive already resized and flipped by the DataLoader workers
  (:mod:`transfer.data.transforms`), so the model does not resize them again;
* the pixel convention comes from the weights (``mean``/``std`` in [0, 1] units, channel order
  RGB or BGR), so the stem always sees what it was trained on.

At evaluation the model maps boxes and masks back to the original image. The evaluation loader
normally hands it images already resized with PIL in its workers (detectron2's
``ResizeShortestEdge``, the same code path as training; see :func:`original_sizes`); images
given without original sizes are resized by the model (torchvision's bilinear resize on
normalised floats). With ``parity="detectron2"`` masks are pasted with detectron2's aligned
sampling (:func:`transfer.models.parity.paste_masks_aligned`), otherwise with torchvision's.
"""
from __future__ import annotations

import contextlib

import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

from transfer.models.parity import check_parity, paste_masks_aligned


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
        parity: ``detectron2`` (aligned mask pasting) or ``torchvision``.
    """

    def __init__(self, min_size, max_size, image_mean, image_std, channels: str = "RGB",
                 resize_in_model: bool = False, channels_last: bool = False, size_divisible: int = 32,
                 parity: str = "detectron2"):
        super().__init__(min_size, max_size, list(image_mean), list(image_std), size_divisible=size_divisible)
        self.channels = channels
        self.resize_in_model = resize_in_model
        self.channels_last = channels_last
        self.parity = check_parity(parity)
        self.given_original_sizes = None  # set by original_sizes(): inputs are pre-resized

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
        if not self.training and self.given_original_sizes is not None:
            return image, target  # resized by the data pipeline
        h, w = image.shape[-2:]
        scale = min(float(self.min_size[-1]) / min(h, w), float(self.max_size) / max(h, w))
        if self.training or (int(h * scale) >= 1 and int(w * scale) >= 1):
            return super().resize(image, target)
        # Extreme aspect ratios (e.g. 2 x 600): torchvision's scale factor would give a side of
        # 0 pixels; keep at least one (the predictions are mapped back by the actual sizes).
        size = (max(1, int(h * scale)), max(1, int(w * scale)))
        image = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        """Boxes (and masks, pasted) in the original frame: ``given_original_sizes`` if set."""
        if self.training:
            return result
        sizes = self.given_original_sizes or original_image_sizes
        for pred, im_s, o_im_s in zip(result, image_shapes, sizes):
            pred["boxes"] = resize_boxes(pred["boxes"], im_s, o_im_s)
            if "masks" in pred:
                paste = paste_masks_aligned if self.parity == "detectron2" else paste_masks_in_image
                pred["masks"] = paste(pred["masks"], pred["boxes"], o_im_s)
        return result

    def batch_images(self, images, size_divisible: int = 32):
        batched = super().batch_images(images, size_divisible)
        if self.channels_last:
            batched = batched.contiguous(memory_format=torch.channels_last)
        return batched


@contextlib.contextmanager
def original_sizes(model, sizes):
    """Run ``model`` on images the data pipeline already resized; map outputs to ``sizes``.

    Args:
        model: a detector from :func:`transfer.models.build_detector` (not DDP-wrapped).
        sizes: list of (H, W) of the original images, one per image of the next call.
    """
    transform = model.transform
    transform.given_original_sizes = [tuple(int(v) for v in s) for s in sizes]
    try:
        yield model
    finally:
        transform.given_original_sizes = None
