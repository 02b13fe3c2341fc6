"""``build_pretrain_dataset``: arch + data configuration -> :class:`PretrainDataset`."""
from __future__ import annotations

import os

from pretrain.config import PretrainDataConfig
from pretrain.data.dataset import ARCH_LAYOUT, AUG_LAYOUT, PretrainDataset
from pretrain.data.pipelines import PipelineConfig
from socokit.errors import InputPathError, StoreError
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


def build_pretrain_dataset(image_root: str, proposals, cfg: PretrainDataConfig | None = None, *,
                           arch: str = "SoCo_FPN") -> PretrainDataset:
    """Build the pretraining dataset of one recipe.

    Args:
        image_root: folder the store's relative image paths start from.
        proposals: a proposal store folder, a ``ProposalStore``, or None (BYOL only: every
            image under ``image_root``).
        cfg: the data options (:class:`pretrain.config.PretrainDataConfig`; default: the
            released values). ``cfg.aug`` None takes the released script's pipeline of
            ``arch`` (FPN: ImageAsymBboxAwareMultiJitter1, FPN*: ...Multi3ResizeExtraJitter1,
            C4: ImageAsymBboxCutout, BYOL: BYOL).
        arch: "SoCo_FPN" | "SoCo_FPN_Star" | "SoCo_C4" | "BYOL": the layout of views and box
            sets.

    With ``cfg.colour_on_device`` the samples hold uint8 views and their colour parameters
    (``"colour_params"``, float32 [PARAMS] per view) instead of coloured, normalised float
    views; the training loop applies them on the device (:mod:`pretrain.data.device_colour`).

    Raises:
        socokit.errors.ConfigError: unknown ``arch``, an ``aug`` of another layout, or
            ``colour_on_device`` with a cutout aug.
        socokit.errors.InputPathError: ``image_root`` is not a folder, or a non-BYOL arch
            without proposals.
        socokit.errors.StoreError: unreadable or empty proposal store.
    """
    cfg = PretrainDataConfig() if cfg is None else cfg
    aug = cfg.aug_for(arch)
    layout = ARCH_LAYOUT[arch]
    if not os.path.isdir(image_root):
        raise InputPathError(f"image folder {image_root!r} does not exist or is not a folder")
    store, paths = None, None
    if isinstance(proposals, ProposalStore):
        store = proposals
    elif proposals is not None:
        store = ProposalStore.open(proposals)
    elif layout == "byol":
        paths = find_images(image_root)
    else:
        raise InputPathError(f"arch {arch!r} needs a proposal store")
    if store is not None and len(store) == 0:
        raise StoreError(f"proposal store {getattr(store, 'path_', proposals)!r} holds no images")
    if paths is not None and not paths:
        raise InputPathError(f"no images under {image_root!r}")
    config = PipelineConfig(
        layout=layout, view_sizes=_view_sizes(layout, cfg.image_size, cfg.image3_size, cfg.image4_size),
        crop_scale=(cfg.crop, 1.0), select_k=cfg.select_k, padding_k=cfg.padding_k,
        max_tries=cfg.max_tries, jitter_prob=cfg.jitter_prob, jitter_ratio=cfg.jitter_ratio,
        cutout_views=AUG_LAYOUT[aug][1], cutout_prob=cfg.cutout_prob,
        cutout_ratio=(cfg.cutout_ratio_min, cfg.cutout_ratio_max),
        aware_range=tuple(float(a) for a in cfg.aware_range), aware_start=cfg.aware_start,
        aware_end=cfg.aware_end, colour_on_device=cfg.colour_on_device)
    return PretrainDataset(image_root, store, config, arch=arch, aug=aug,
                           max_replace_tries=cfg.max_replace_tries, paths=paths)
