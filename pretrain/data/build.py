"""``build_pretrain_dataset``: recipe names and options -> :class:`PretrainDataset`."""
from __future__ import annotations

import os
from typing import Sequence

from pretrain.data.dataset import (ARCH_LAYOUT, ARCHS, AUG_LAYOUT, AUGS, DEFAULT_AUG, PretrainDataset)
from pretrain.data.pipelines import PipelineConfig
from socokit.images import find_images
from socokit.proposal_store import ProposalStore

#: image3_size of the released FPN* script (V3 of FPN is image_size // 2).
STAR_IMAGE3_SIZE = 192


def _view_sizes(layout: str, image_size: int, image3_size: int | None, image4_size: int) -> tuple:
    if layout == "fpn":
        return (image_size, image_size, image3_size or image_size // 2)
    if layout == "fpn_star":
        return (image_size, image_size, image3_size or STAR_IMAGE3_SIZE, image4_size)
    return (image_size, image_size)


def _check_options(arch, aug, layout, view_sizes, crop_scale_min, select_k, padding_k, max_tries,
                   jitter_prob, cutout_prob, cutout_ratio, aware_range, aware_start, aware_end,
                   max_replace_tries):
    if AUG_LAYOUT[aug][0] != layout:
        ok = [a for a in AUGS if AUG_LAYOUT[a][0] == layout]
        raise ValueError(f"aug {aug!r} does not fit arch {arch!r} (use one of {ok})")
    if min(view_sizes) < 1:
        raise ValueError(f"view sizes must be positive, got {view_sizes}")
    if not 0.0 < crop_scale_min <= 1.0:
        raise ValueError(f"crop_scale_min must be in (0, 1], got {crop_scale_min}")
    if not 1 <= select_k <= padding_k:
        raise ValueError(f"need 1 <= select_k <= padding_k, got select_k={select_k}, padding_k={padding_k}")
    if max_tries < 1 or max_replace_tries < 1:
        raise ValueError("max_tries and max_replace_tries must be >= 1")
    if not (0.0 <= jitter_prob <= 1.0 and 0.0 <= cutout_prob <= 1.0):
        raise ValueError("jitter_prob and cutout_prob must be probabilities")
    if not 0.0 <= cutout_ratio[0] <= cutout_ratio[1]:
        raise ValueError(f"cutout_ratio must be (min, max) with 0 <= min <= max, got {cutout_ratio}")
    if not 0 <= aware_start < aware_end <= len(aware_range):
        raise ValueError(f"need 0 <= aware_start < aware_end <= len(aware_range) = {len(aware_range)}, "
                         f"got {aware_start}, {aware_end}")


def build_pretrain_dataset(image_root: str, proposals, arch: str = "SoCo_FPN", aug: str | None = None,
                           image_size: int = 224, image3_size: int | None = None, image4_size: int = 112,
                           crop_scale_min: float = 0.5, select_k: int = 4, padding_k: int = 4,
                           max_tries: int = 5, jitter_prob: float = 0.5, jitter_ratio: float = 0.1,
                           cutout_prob: float = 0.5, cutout_ratio: Sequence[float] = (0.1, 0.3),
                           aware_range: Sequence[float] = (48, 96, 192, 224, 0), aware_start: int = 0,
                           aware_end: int = 4, max_replace_tries: int = 10,
                           colour_on_device: bool = False) -> PretrainDataset:
    """Build the pretraining dataset of one recipe.

    Args:
        image_root: folder the store's relative image paths start from.
        proposals: a proposal store folder, a ``ProposalStore``, or None (BYOL only: every
            image under ``image_root``).
        arch: "SoCo_FPN" | "SoCo_FPN_Star" | "SoCo_C4" | "BYOL".
        aug: one of ``AUGS`` fitting ``arch``; None takes the released script's
            (FPN: ImageAsymBboxAwareMultiJitter1, FPN*: ...Multi3ResizeExtraJitter1,
            C4: ImageAsymBboxCutout, BYOL: BYOL).
        image_size: V1 / V2 size (and BYOL's two views).
        image3_size: V3 size; None = image_size // 2 (FPN) or 192 (FPN*).
        image4_size: V4 size (FPN* only).
        crop_scale_min: RRC scale range (crop_scale_min, 1); released: 0.5 FPN, 0.6 C4.
        select_k, padding_k: proposals drawn per pair (K) and padded box count (L), K <= L.
        max_tries: crop/selection attempts (see ``select_with_retries``).
        jitter_prob, jitter_ratio: V1 box jitter (FPN variants only).
        cutout_prob, cutout_ratio: in-box cutout (the ``*Cutout`` augs only).
        aware_range, aware_start, aware_end: FPN level assignment by resized box size.
        max_replace_tries: consecutive unreadable images tolerated for one sample.
        colour_on_device: return uint8 views and their colour parameters (``"colour_params"``,
            float32 [PARAMS] per view) instead of coloured, normalised float views; the
            training loop applies them on the device (:mod:`pretrain.data.device_colour`).
            Not with the ``*Cutout`` augs.

    Raises:
        ValueError: unknown or incompatible options.
        FileNotFoundError: ``image_root`` is not a folder.
        socokit.proposal_store.StoreError: unreadable proposal store.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    aug = DEFAULT_AUG[arch] if aug is None else aug
    if aug not in AUGS:
        raise ValueError(f"unknown aug {aug!r}; choose one of {AUGS}")
    layout = ARCH_LAYOUT[arch]
    view_sizes = _view_sizes(layout, image_size, image3_size, image4_size)
    cutout_ratio = tuple(float(r) for r in cutout_ratio)
    _check_options(arch, aug, layout, view_sizes, crop_scale_min, select_k, padding_k, max_tries,
                   jitter_prob, cutout_prob, cutout_ratio, aware_range, aware_start, aware_end,
                   max_replace_tries)
    if colour_on_device and AUG_LAYOUT[aug][1]:
        raise ValueError(f"colour_on_device does not support the cutout aug {aug!r} (the cutout "
                         "is drawn after the colour and applied to the normalised view)")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image folder {image_root!r} does not exist or is not a folder")
    store, paths = None, None
    if isinstance(proposals, ProposalStore):
        store = proposals
    elif proposals is not None:
        store = ProposalStore.open(proposals)
    elif layout == "byol":
        paths = find_images(image_root)
    else:
        raise ValueError(f"arch {arch!r} needs a proposal store")
    if (len(store) if store is not None else len(paths)) == 0:
        raise ValueError(f"no images in {proposals if store is not None else image_root!r}")
    config = PipelineConfig(
        layout=layout, view_sizes=view_sizes, crop_scale=(float(crop_scale_min), 1.0),
        select_k=select_k, padding_k=padding_k, max_tries=max_tries, jitter_prob=jitter_prob,
        jitter_ratio=jitter_ratio, cutout_views=AUG_LAYOUT[aug][1], cutout_prob=cutout_prob,
        cutout_ratio=cutout_ratio, aware_range=tuple(float(a) for a in aware_range),
        aware_start=aware_start, aware_end=aware_end, colour_on_device=bool(colour_on_device))
    return PretrainDataset(image_root, store, config, arch=arch, aug=aug,
                           max_replace_tries=max_replace_tries, paths=paths)
