"""Per-sample view pipelines: SoCo FPN / FPN* (docs/method.md §2.4), SoCo C4 (§2.5) and image-level BYOL.

A sample is built in two stages:

1. :func:`make_geometry` -- crop parameters, proposal selection with retries (parameters only),
   box sets per view (jitter, clip, pad), level assignment and correspondence, normalisation,
   then one crop+resize per view and the independent flips. Returns PIL views (pre-colour) and
   the final normalised, flipped boxes: :class:`GeometricSample`.
2. :func:`make_tensors` -- colour (post_1 for V1, post_2 for the others), ToTensor+Normalize,
   and the in-box cutout on the configured views.

Box sets and pairs per layout are defined in :mod:`pretrain.topology` (the models read the same
definition): ``fpn`` sets [b1_12, b1_13, b2, b3], ``fpn_star`` [b1_12, b1_13, b1_14, b2, b3, b4],
``c4`` [b1, b2] with a plain L x L correspondence, ``byol`` no boxes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from pretrain.data import box_views as bv
from pretrain.data.augment import (NO_COLOUR, POST_1, POST_2, cutout_in_boxes_,
                                   to_normalized_tensor)
from pretrain.data.device_colour import pack_params
from pretrain.data.views import crop_resize, sample_rrc_params, whole_image_params
from pretrain.topology import LAYOUT_TOPOLOGY

LAYOUTS = tuple(LAYOUT_TOPOLOGY)

#: box-set index -> view index, and (set_a, set_b) pairs, per layout: read from
#: ``pretrain.topology``, the single definition the models read too.
SET_VIEWS = {layout: t.set_views for layout, t in LAYOUT_TOPOLOGY.items()}
SET_PAIRS = {layout: t.pairs for layout, t in LAYOUT_TOPOLOGY.items()}


@dataclass(frozen=True)
class PipelineConfig:
    """Everything a sample depends on besides the image, its proposals and the generator."""

    layout: str = "fpn"
    view_sizes: tuple[int, ...] = (224, 224, 112)
    crop_scale: tuple[float, float] = (0.5, 1.0)
    select_k: int = 4
    padding_k: int = 4
    max_tries: int = 5
    jitter_prob: float = 0.5
    jitter_ratio: float = 0.1
    flip_prob: float = 0.5
    cutout_views: tuple[int, ...] = ()
    cutout_prob: float = 0.5
    cutout_ratio: tuple[float, float] = (0.1, 0.3)
    aware_range: tuple[float, ...] = (48, 96, 192, 224, 0)
    aware_start: int = 0
    aware_end: int = 4
    colour_on_device: bool = False

    @property
    def num_levels(self) -> int:
        return self.aware_end - self.aware_start


@dataclass
class GeometricSample:
    """Views before colour, with their final boxes.

    Attributes:
        views: PIL RGB images, flipped, sizes ``cfg.view_sizes``.
        boxes: float32 [L, 5] normalised (and flipped with their view) box sets.
        corres: float32 correspondence matrices, one per pair.
        crops: crop parameters of each view in the original image (V4: V2's crop).
        flipped: whether each view was flipped.
    """

    views: list = field(default_factory=list)
    boxes: list = field(default_factory=list)
    corres: list = field(default_factory=list)
    crops: list = field(default_factory=list)
    flipped: list = field(default_factory=list)


def _proposals_with_ids(proposals_xyxy: np.ndarray, img_h: int, img_w: int) -> np.ndarray:
    boxes = np.asarray(proposals_xyxy).reshape(-1, 4)
    if len(boxes) == 0:  # no proposals: the whole image is the single proposal
        boxes = np.array([[0, 0, img_w - 1, img_h - 1]])
    return bv.with_ids(boxes)


def _pair_sets(rng, selected, v1, vk, cfg, jitter):
    """The padded (V1, Vk) box sets of one pair, crop-local pixels, float [L, 5] each."""
    v1_src = bv.jitter_boxes(rng, selected, cfg.jitter_prob, cfg.jitter_ratio) if jitter else selected
    boxes_1 = bv.clip_to_crop(v1_src, v1)
    boxes_k = bv.clip_to_crop(selected, vk)
    ids = bv.common_ids(boxes_1, boxes_k)
    return bv.pad_boxes(rng, boxes_1, ids, cfg.padding_k), bv.pad_boxes(rng, boxes_k, ids, cfg.padding_k)


def _box_sets(rng, proposals, v1, img_h, img_w, cfg):
    """Crops of the views 2.. and the crop-local box sets (in SET_VIEWS order)."""
    num_other = 1 if cfg.layout == "c4" else 2

    def sample():
        return sample_rrc_params(rng, img_h, img_w, cfg.crop_scale)

    crops, selections = bv.select_with_retries(
        rng, proposals, v1, [sample] * num_other,
        k=cfg.select_k, padding_k=cfg.padding_k, max_tries=cfg.max_tries)
    jitter = cfg.layout != "c4"
    pairs = [_pair_sets(rng, sel, v1, crop, cfg, jitter) for sel, crop in zip(selections, crops)]
    if cfg.layout == "c4":
        return crops, [pairs[0][0], pairs[0][1]]
    (b1_12, b2), (b1_13, b3) = pairs
    if cfg.layout == "fpn":
        return crops, [b1_12, b1_13, b2, b3]
    # FPN*: V4 is V2's crop resized smaller, with copies of V2's (and V1's pair-12) boxes.
    return crops + [crops[0]], [b1_12, b1_13, b1_12.copy(), b2, b3, b2.copy()]


def _correspondences(sets, crops, cfg):
    views = SET_VIEWS[cfg.layout]
    if cfg.layout == "c4":
        return [bv.correspondence(sets[a][:, 4], sets[b][:, 4]) for a, b in SET_PAIRS["c4"]]
    vecs = [bv.assign_levels(boxes, crops[v], cfg.view_sizes[v], cfg.aware_range, cfg.aware_start,
                             cfg.aware_end, bv.UNUSED_LEVEL_VALUES[v])
            for boxes, v in zip(sets, views)]
    return [bv.correspondence(vecs[a], vecs[b]) for a, b in SET_PAIRS[cfg.layout]]


def _render_views(img, crops, cfg):
    """One crop + resize per view; FPN*'s V4 is V2's image resized (before V2's flip/colour)."""
    num_cropped = 3 if cfg.layout == "fpn_star" else len(crops)
    views = [crop_resize(img, crop, size) for crop, size in zip(crops[:num_cropped], cfg.view_sizes)]
    if cfg.layout == "fpn_star":
        views.append(views[1].resize((cfg.view_sizes[3], cfg.view_sizes[3]), Image.BILINEAR))
    return views


def make_geometry(img: Image.Image, proposals_xyxy: np.ndarray, rng: np.random.Generator,
                  cfg: PipelineConfig) -> GeometricSample:
    """Stage 1 of a sample: views (PIL, flipped, pre-colour) and their final box sets.

    Args:
        img: PIL RGB image (not modified).
        proposals_xyxy: int [N, 4] inclusive corners in ``img``'s frame (not modified); an
            empty array means "no proposals" and uses the whole image.
        rng: the sample's generator.
        cfg: pipeline configuration.
    """
    img_h, img_w = img.height, img.width
    v1 = whole_image_params(img_h, img_w)
    if cfg.layout == "byol":
        crops = [sample_rrc_params(rng, img_h, img_w, cfg.crop_scale) for _ in range(2)]
        sets, corres = [], []
    else:
        proposals = _proposals_with_ids(proposals_xyxy, img_h, img_w)
        other_crops, sets = _box_sets(rng, proposals, v1, img_h, img_w, cfg)
        crops = [v1] + other_crops
        corres = _correspondences(sets, crops, cfg)
    set_views = SET_VIEWS[cfg.layout]
    boxes = [bv.normalise(b, crops[v]) for b, v in zip(sets, set_views)]
    views = _render_views(img, crops, cfg)
    flipped = [bool(rng.random() < cfg.flip_prob) for _ in views]
    for v, flip in enumerate(flipped):
        if flip:
            views[v] = views[v].transpose(Image.FLIP_LEFT_RIGHT)
    boxes = [bv.hflip_norm(b) if flipped[v] else b for b, v in zip(boxes, set_views)]
    return GeometricSample(views=views, boxes=boxes, corres=corres, crops=crops, flipped=flipped)


def own_box_set(layout: str, view: int) -> int:
    """Index of the box set that belongs to ``view`` (views >= 1 have exactly one)."""
    return SET_VIEWS[layout].index(view)


def make_tensors(sample: GeometricSample, rng: np.random.Generator, cfg: PipelineConfig,
                 colour: bool = True) -> list[torch.Tensor]:
    """Stage 2: colour, ToTensor+Normalize, cutout. Returns float32 [3, S_v, S_v] per view.

    With ``cfg.colour_on_device`` see :func:`make_uint8_views` instead.

    Args:
        colour: False skips the colour pipelines (for tests and visualisation).
    """
    tensors = []
    for v, view in enumerate(sample.views):
        if colour:
            view = (POST_1 if v == 0 else POST_2)(view, rng)
        tensors.append(to_normalized_tensor(view))
    for v in cfg.cutout_views:
        cutout_in_boxes_(tensors[v], sample.boxes[own_box_set(cfg.layout, v)], rng,
                         cfg.cutout_prob, cfg.cutout_ratio)
    return tensors



def make_uint8_views(sample: GeometricSample, rng: np.random.Generator,
                     colour: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Stage 2 for colour on the device: uint8 views and their drawn colour parameters.

    The parameters are drawn with the same generator calls, in the same order, as
    :func:`make_tensors` would make (post_1 for V1, post_2 for the others), so the
    distribution of every parameter is unchanged; :func:`pretrain.data.device_colour.apply_colour`
    applies them to the batch. No cutout (its boxes are drawn after the colour).

    Returns:
        (uint8 [3, S_v, S_v] per view, float32 [PARAMS] per view); with ``colour=False`` the
        parameters are the identity (nothing applied).
    """
    views, params = [], []
    for v, view in enumerate(sample.views):
        drawn = (POST_1 if v == 0 else POST_2).draw(rng) if colour else NO_COLOUR
        views.append(torch.from_numpy(np.asarray(view, dtype=np.uint8).copy()).permute(2, 0, 1)
                     .contiguous())
        params.append(pack_params(drawn))
    return views, params
