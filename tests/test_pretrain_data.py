"""Tests of the SoCo pretraining data pipeline (pretrain/data)."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.config import PretrainDataConfig as D
from pretrain.data import AUGS, UnreadableImagesError, build_pretrain_dataset
from pretrain.data import box_views as bv
from pretrain.data.augment import cutout_in_boxes_
from pretrain.data.pipelines import SET_VIEWS, make_geometry, make_tensors
from pretrain.data.views import CropParams, sample_rrc_params, whole_image_params
from socokit.errors import ConfigError, InputPathError
from socokit.proposal_store import ProposalStore, write_store
from socokit.training import seed_worker

IMG_H, IMG_W = 120, 160
RECT_XYXY = (20, 30, 59, 79)  # bright rectangle, off-centre so that a wrong flip is visible


def _rect_image() -> Image.Image:
    arr = np.zeros((IMG_H, IMG_W, 3), dtype=np.uint8)
    x1, y1, x2, y2 = RECT_XYXY
    arr[y1:y2 + 1, x1:x2 + 1] = 255
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Image folder with 4 noisy photos-to-be, the rectangle image, an empty-proposal image and
    a corrupt file; plus a store for all of them."""
    root = tmp_path_factory.mktemp("pretrain_data")
    rng = np.random.default_rng(0)
    paths, sizes, boxes = [], [], []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(root / f"n{i}.jpg")
        x1, y1 = rng.integers(0, 100, 12), rng.integers(0, 70, 12)
        paths.append(f"n{i}.jpg")
        sizes.append((90, 120))
        boxes.append(np.stack([x1, y1, x1 + rng.integers(2, 40, 12), y1 + rng.integers(2, 30, 12)], 1))
    _rect_image().save(root / "rect.png")
    paths.append("rect.png"), sizes.append((IMG_H, IMG_W)), boxes.append(np.array([RECT_XYXY]))
    paths.append("n0.jpg"), sizes.append((90, 120)), boxes.append(np.zeros((0, 4), np.int32))
    (root / "bad.jpg").write_bytes(b"")
    paths.append("bad.jpg"), sizes.append((10, 10)), boxes.append(np.array([[0, 0, 5, 5]]))
    store = write_store(str(root / "train.proposals"), paths, sizes, boxes)
    return root, store


def _items_equal(a, b) -> bool:
    for key in ("views", "boxes", "corres"):
        if len(a[key]) != len(b[key]) or not all(torch.equal(x, y) for x, y in zip(a[key], b[key])):
            return False
    return a["index"] == b["index"]


# ----------------------------------------------------------------------------- shapes, API
EXPECTED = {  # arch: (view sizes, number of box sets, corres shapes)
    "SoCo_FPN": ([224, 224, 112], 4, [(16, 16)] * 2),
    "SoCo_FPN_Star": ([224, 224, 192, 112], 6, [(16, 16)] * 3),
    "SoCo_C4": ([224, 224], 2, [(4, 4)]),
    "BYOL": ([224, 224], 0, []),
}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_shapes_dtypes_and_collate(data_dir, arch):
    root, store = data_dir
    ds = build_pretrain_dataset(str(root), store, arch=arch)
    sizes, num_sets, corres_shapes = EXPECTED[arch]
    assert ds.view_sizes == sizes
    np.random.seed(0)
    item = ds[0]
    assert [tuple(v.shape) for v in item["views"]] == [(3, s, s) for s in sizes]
    assert all(v.dtype == torch.float32 for v in item["views"])
    assert len(item["boxes"]) == num_sets
    assert all(b.shape == (4, 5) and b.dtype == torch.float32 for b in item["boxes"])
    assert [tuple(c.shape) for c in item["corres"]] == corres_shapes
    assert all(c.dtype == torch.float32 for c in item["corres"])
    assert item["index"] == 0 and item["num_replaced"] == 0
    batch = next(iter(torch.utils.data.DataLoader(torch.utils.data.Subset(ds, [0, 1]), batch_size=2)))
    assert [tuple(v.shape) for v in batch["views"]] == [(2, 3, s, s) for s in sizes]
    assert [tuple(b.shape) for b in batch["boxes"]] == [(2, 4, 5)] * num_sets
    for pair in ds.view_pairs:  # pairs address existing views / box sets / matrices
        assert pair.view_a < len(sizes) and pair.view_b < len(sizes)
        if pair.corres is not None:
            assert ds.box_set_views[pair.boxes_a] == pair.view_a
            assert ds.box_set_views[pair.boxes_b] == pair.view_b


def test_view_pairs_and_options(data_dir):
    root, store = data_dir
    fpn = build_pretrain_dataset(str(root), store, arch="SoCo_FPN")
    assert fpn.view_pairs == [(0, 0, 1, 2, 0), (0, 1, 2, 3, 1)]
    assert fpn.box_set_views == [0, 0, 1, 2] and fpn.num_levels == 4
    star = build_pretrain_dataset(str(root), store, arch="SoCo_FPN_Star")
    assert star.view_pairs == [(0, 0, 1, 3, 0), (0, 1, 2, 4, 1), (0, 2, 3, 5, 2)]
    assert build_pretrain_dataset(str(root), store, arch="SoCo_C4").view_pairs == [(0, 0, 1, 1, 0)]
    assert build_pretrain_dataset(str(root), None, arch="BYOL").view_pairs == [(0, None, 1, None, None)]
    assert build_pretrain_dataset(str(root), str(store.path_), D(aug="ImageAsymBboxAwareMultiJitter1Cutout"),
                                  arch="SoCo_FPN").config.cutout_views == (1, 2)
    assert build_pretrain_dataset(str(root), store, arch="SoCo_C4").config.cutout_views == (1,)
    assert len(AUGS) == 5
    with pytest.raises(ConfigError, match="aug: 'ImageAsymBboxAwareMultiJitter1' does not fit arch 'SoCo_C4'"):
        build_pretrain_dataset(str(root), store, D(aug="ImageAsymBboxAwareMultiJitter1"), arch="SoCo_C4")
    with pytest.raises(ConfigError, match="arch: 'SoCo_R50' is not allowed; choose from SoCo_FPN, "):
        build_pretrain_dataset(str(root), store, arch="SoCo_R50")
    with pytest.raises(ConfigError, match="select_k: 5 is larger than padding_k 4"):
        D(select_k=5, padding_k=4)
    with pytest.raises(InputPathError, match="needs a proposal store"):
        build_pretrain_dataset(str(root), None, arch="SoCo_FPN")
    with pytest.raises(InputPathError, match="missing"):
        build_pretrain_dataset(str(root / "missing"), store)


# ----------------------------------------------------------------------------- geometry
def _box_in_view_px(box_norm, size):
    return [float(box_norm[0]) * size, float(box_norm[1]) * size, float(box_norm[2]) * size,
            float(box_norm[3]) * size]


@pytest.mark.parametrize("arch", ["SoCo_FPN", "SoCo_FPN_Star", "SoCo_C4"])
def test_box_lands_on_the_same_content_in_every_view(data_dir, arch):
    """A bright rectangle's proposal marks the bright pixels in every view after crop, resize, flip."""
    root, store = data_dir
    cfg = build_pretrain_dataset(str(root), store, D(jitter_prob=0.0), arch=arch).config
    img = _rect_image()
    # id 1 = whole image (always selected, so the rectangle keeps id 2), id 2 = the rectangle.
    proposals = np.array([[0, 0, IMG_W - 1, IMG_H - 1], RECT_XYXY])
    checked, flips = 0, set()
    for seed in range(25):
        sample = make_geometry(img, proposals, np.random.default_rng(seed), cfg)
        for set_index, view_index in enumerate(SET_VIEWS[cfg.layout]):
            view = np.asarray(sample.views[view_index].convert("L"), dtype=np.float64)
            size = view.shape[0]
            for row in sample.boxes[set_index]:
                if row[4] != 2:
                    continue
                x1, y1, x2, y2 = _box_in_view_px(row, size)
                if x2 - x1 < 4 or y2 - y1 < 4:
                    continue  # a sliver at the crop border
                inner = view[int(np.ceil(y1)) + 1:int(y2), int(np.ceil(x1)) + 1:int(x2)]
                assert inner.mean() > 200, (seed, set_index, row)
                bright = view > 128
                mx1, my1 = max(int(x1) - 2, 0), max(int(y1) - 2, 0)
                near = bright[my1:int(y2) + 4, mx1:int(x2) + 4].sum()
                assert near >= 0.98 * bright.sum(), (seed, set_index, row)
                checked += 1
                flips.add(sample.flipped[view_index])
    assert checked > 40 and flips == {False, True}


def test_empty_proposals_use_whole_image(data_dir):
    root, store = data_dir
    ds = build_pretrain_dataset(str(root), store, D(jitter_prob=0.0), arch="SoCo_FPN")
    np.random.seed(3)
    item = ds[5]  # n0.jpg with no proposals
    for boxes in item["boxes"]:
        assert torch.all(boxes[:, 4] == 1)
    assert torch.allclose(item["boxes"][0][0, [1, 3]], torch.tensor([0.0, 89 / 90]))
    assert item["corres"][0].sum() > 0


def test_inputs_not_mutated(data_dir):
    root, store = data_dir
    ds = build_pretrain_dataset(str(root), store, D(jitter_prob=1.0), arch="SoCo_FPN_Star")
    img = _rect_image()
    before_img = img.tobytes()
    proposals = np.array([[0, 0, IMG_W - 1, IMG_H - 1], RECT_XYXY, [5, 5, 30, 30]])
    before = proposals.copy()
    for seed in range(5):
        rng = np.random.default_rng(seed)
        make_tensors(make_geometry(img, proposals, rng, ds.config), rng, ds.config)
    assert img.tobytes() == before_img and np.array_equal(proposals, before)
    store_boxes = [store.boxes(i).copy() for i in range(len(store))]
    for i in range(5):
        ds[i]
    assert all(np.array_equal(store.boxes(i), b) for i, b in enumerate(store_boxes))


def test_jitter_only_on_v1_copies(data_dir):
    root, store = data_dir
    base = build_pretrain_dataset(str(root), store, D(jitter_prob=1.0), arch="SoCo_FPN").config
    cfg = dataclasses.replace(base, flip_prob=0.0)
    rng0 = np.random.default_rng(0)
    proposals = np.stack([rng0.integers(0, 80, 10), rng0.integers(0, 50, 10)], 1)
    proposals = np.concatenate([proposals, proposals + rng0.integers(10, 40, (10, 2))], 1)
    jittered = 0
    for seed in range(10):
        sample = make_geometry(Image.new("RGB", (IMG_W, IMG_H)), proposals, np.random.default_rng(seed), cfg)
        for set_index in (2, 3):  # V2 / V3 boxes are exact clipped proposals
            crop = sample.crops[1 if set_index == 2 else 2]
            px = sample.boxes[set_index].astype(np.float64)
            px[:, [0, 2]] *= crop.width
            px[:, [1, 3]] *= crop.height
            np.testing.assert_allclose(px[:, :4], np.round(px[:, :4]), atol=1e-3)
            for row in np.round(px):
                prop = proposals[int(row[4]) - 1]
                assert row[0] == max(prop[0], crop.left) - crop.left
                assert row[3] == min(prop[3], crop.top + crop.height - 1) - crop.top
        for set_index in (0, 1):  # V1 copies: not on the proposal corners
            px = sample.boxes[set_index].astype(np.float64) * np.array([IMG_W, IMG_H, IMG_W, IMG_H, 1])
            props = proposals[px[:, 4].astype(int) - 1]
            jittered += int(np.any(np.abs(px[:, :4] - props) > 1e-3))
    assert jittered >= 18


def test_jitter_boxes_bounds():
    rng = np.random.default_rng(0)
    boxes = bv.with_ids(np.array([[10, 20, 109, 69]] * 200))
    out = bv.jitter_boxes(rng, boxes, 1.0, 0.1)
    w, h = 100, 50
    assert np.all(np.abs(out[:, 0] - 10) <= 0.1 * w + 1e-9) and np.all(np.abs(out[:, 1] - 20) <= 0.1 * h + 1e-9)
    assert np.all(np.abs((out[:, 2] - out[:, 0] + 1) - w) <= 0.1 * w + 1e-9)
    assert np.array_equal(boxes[:, :4], np.array([[10, 20, 109, 69]] * 200))  # input untouched
    assert np.array_equal(bv.jitter_boxes(rng, boxes, 0.0, 0.1), boxes)
    half = bv.jitter_boxes(rng, boxes, 0.5, 0.1)
    assert 60 < np.sum(np.any(half != boxes, axis=1)) < 140


# ----------------------------------------------------------------------------- box ops
def test_select_clip_and_overlap_are_strict():
    crop = CropParams(top=10, left=20, height=30, width=40, img_h=100, img_w=100)  # x 20..59, y 10..39
    boxes = bv.with_ids(np.array([[0, 0, 20, 20],     # touches x=20 only -> no overlap
                                  [0, 0, 21, 11],     # 1 px overlap
                                  [50, 30, 90, 90],   # partly inside
                                  [60, 10, 70, 20]]))  # starts right of the crop
    assert bv.overlap_mask(boxes, crop.rect_xyxy).tolist() == [False, True, True, False]
    clipped = bv.clip_to_crop(boxes, crop)
    np.testing.assert_array_equal(clipped, [[0, 0, 1, 1, 2], [30, 20, 39, 29, 3]])
    np.testing.assert_array_equal(bv.clip_to_crop(boxes[[0, 3]], crop), [[0, 0, 39, 29, 1]])
    rng = np.random.default_rng(0)
    many = bv.with_ids(np.tile([[25, 15, 30, 20]], (10, 1)))
    picks = [bv.select_proposals(rng, many, crop.rect_xyxy, 4)[:, 4] for _ in range(50)]
    assert all(len(np.unique(p)) == 4 for p in picks)  # without replacement
    assert len(np.unique(np.concatenate(picks))) == 10  # uniform over all candidates
    assert len(bv.select_proposals(rng, many, None, 4)) == 0


def test_retries_sample_params_until_enough_common():
    rng = np.random.default_rng(0)
    v1 = whole_image_params(100, 100)
    proposals = bv.with_ids(np.array([[0, 0, 9, 9], [0, 0, 8, 8]]))
    calls = []
    crops = iter([CropParams(50, 50, 50, 50, 100, 100)] * 2 + [CropParams(0, 0, 50, 50, 100, 100)] * 2)

    def sampler():
        calls.append(1)
        return next(crops)
    params, sels = bv.select_with_retries(rng, proposals, v1, [sampler], k=4, padding_k=4, max_tries=5)
    assert len(calls) == 3 and params[0].top == 0 and len(sels[0]) == 2  # least_common 2 -> 1 -> 1
    empty = bv.select_with_retries(rng, proposals, v1, [lambda: CropParams(50, 50, 50, 50, 100, 100)],
                                   k=4, padding_k=4, max_tries=3)
    assert len(empty[1][0]) == 0  # last attempt used even if empty


def test_padding_uses_only_common_ids():
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids_a = rng.choice(np.arange(1, 9), size=rng.integers(1, 5), replace=False)
        ids_b = rng.choice(np.arange(1, 9), size=rng.integers(1, 5), replace=False)
        a = np.concatenate([rng.random((len(ids_a), 4)), ids_a[:, None]], 1)
        b = np.concatenate([rng.random((len(ids_b), 4)), ids_b[:, None]], 1)
        common = bv.common_ids(a, b)
        padded = bv.pad_boxes(rng, a, common, 4)
        assert padded.shape == (4, 5) and np.array_equal(padded[:len(a)], a)
        tail = padded[len(a):, 4]
        if len(common):
            assert np.all(np.isin(tail, common))
        else:
            assert np.all(np.isin(tail, ids_a))
    with pytest.raises(ValueError):
        bv.pad_boxes(rng, np.zeros((5, 5)), np.array([0.0]), 4)


def test_level_assignment_thresholds():
    crop = whole_image_params(224, 224)  # scale 1: resized box = crop-local box
    sides = [48, 49, 96, 97, 192, 193, 224]
    boxes = np.array([[0, 0, s - 1, s - 1, i + 1] for i, s in enumerate(sides)], dtype=np.float64)
    vec = bv.assign_levels(boxes, crop, 224, (48, 96, 192, 224, 0), 0, 4, -1.0).reshape(4, len(sides))
    levels = [int(np.nonzero(vec[:, i] == i + 1)[0][0]) for i in range(len(sides))]
    assert levels == [0, 1, 1, 2, 2, 3, 3]
    assert np.all((vec == -1) | (vec > 0)) and np.sum(vec > 0) == len(sides)
    # resized size: corners truncated after scaling, then +1: 96 px in a 448 crop -> 48 -> 49 -> P3
    big = whole_image_params(448, 448)
    vec = bv.assign_levels(np.array([[0, 0, 96, 96, 7.0]]), big, 224, (48, 96, 192, 224, 0), 0, 4, -2.0)
    assert vec.tolist() == [-2.0, 7.0, -2.0, -2.0]
    too_big = bv.assign_levels(np.array([[0, 0, 299, 299, 1.0]]), whole_image_params(300, 300), 300,
                               (48, 96, 192, 224, 0), 0, 4, -3.0)
    assert too_big.tolist() == [-3.0] * 4
    p3_p5 = bv.assign_levels(boxes[:1], crop, 224, (48, 96, 192, 224, 0), 1, 4, -1.0)
    assert p3_p5.tolist() == [1.0, -1.0, -1.0]  # aware_start=1: 48 px goes to the first level used


def test_correspondence_hand_built():
    L = 4
    # V1 ids [3, 5, 3, 3] all at P3; V2 ids [3, 5, 5, 5] all at P3 -> 3 + 3 matches.
    vec1 = np.full((4, L), -1.0)
    vec1[1] = [3, 5, 3, 3]
    vec2 = np.full((4, L), -2.0)
    vec2[1] = [3, 5, 5, 5]
    c = bv.correspondence(vec1.reshape(-1), vec2.reshape(-1))
    assert c.shape == (16, 16) and c.dtype == np.float32 and c.sum() == 6
    assert c[1 * L + 0, 1 * L + 0] == 1 and c[1 * L + 1, 1 * L + 2] == 1 and c[0, 0] == 0
    # cross level: id 9 at P4 (level 2) in V1, at P3 (level 1) in V3
    vec3 = np.full((4, L), -3.0)
    vec3[1, 2] = 9
    vec1b = np.full((4, L), -1.0)
    vec1b[2, 0] = 9
    c13 = bv.correspondence(vec1b.reshape(-1), vec3.reshape(-1))
    assert c13.sum() == 1 and c13[2 * L + 0, 1 * L + 2] == 1
    # unused entries never match across views
    assert bv.correspondence(np.full(16, -1.0), np.full(16, -2.0)).sum() == 0
    # C4: plain id equality
    np.testing.assert_array_equal(bv.correspondence(np.array([1, 2, 2, 4.0]), np.array([2, 1, 1, 3.0])),
                                  [[0, 1, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])


def test_normalise_and_flip():
    crop = CropParams(0, 0, 50, 100, 50, 100)
    norm = bv.normalise(np.array([[0, 0, 99, 49, 3.0]]), crop)
    np.testing.assert_allclose(norm, [[0, 0, 0.99, 0.98, 3]], rtol=1e-6)
    np.testing.assert_allclose(bv.hflip_norm(norm), [[0.01, 0, 1.0, 0.98, 3]], rtol=1e-6)


def test_rrc_params_follow_torchvision_ranges():
    rng = np.random.default_rng(0)
    for _ in range(300):
        p = sample_rrc_params(rng, 375, 500, (0.5, 1.0))
        assert 0 <= p.top and p.top + p.height <= 375 and 0 <= p.left and p.left + p.width <= 500
        assert 0.5 * 375 * 500 * 0.97 <= p.height * p.width
    tall = sample_rrc_params(rng, 1000, 10, (0.5, 1.0))  # all tries fail -> centre crop at ratio 3/4
    assert (tall.width, tall.height, tall.top) == (10, 13, (1000 - 13) // 2)


# ----------------------------------------------------------------------------- cutout
def test_cutout_lands_on_the_box_content(data_dir):
    """Cutout holes sit on the rectangle's pixels in flipped and unflipped views (post-flip boxes)."""
    root, store = data_dir
    ds = build_pretrain_dataset(str(root), store, D(jitter_prob=0.0, cutout_prob=1.0,
                                                      aug="ImageAsymBboxAwareMultiJitter1Cutout"),
                                arch="SoCo_FPN")
    cfg = ds.config
    hits, flips = 0, set()
    for seed in range(30):
        rng = np.random.default_rng(seed)
        sample = make_geometry(_rect_image(), np.array([RECT_XYXY]), rng, cfg)
        views = make_tensors(sample, rng, cfg, colour=False)
        for view_index, set_index in ((1, 2), (2, 3)):
            box = sample.boxes[set_index][0]
            bright = np.asarray(sample.views[view_index].convert("L")) > 128
            if box[2] - box[0] > 0.9 or bright.sum() < 36:
                continue  # whole-view fallback, or too little of the rectangle visible
            zero = (views[view_index] == 0).all(0).numpy()
            assert zero.any()
            ys, xs = np.nonzero(zero)
            bys, bxs = np.nonzero(bright)
            margin = int(round(np.sqrt(0.3 * bright.sum()))) // 2 + 3
            assert bxs.min() - margin <= xs.min() and xs.max() <= bxs.max() + margin, (seed, view_index)
            assert bys.min() - margin <= ys.min() and ys.max() <= bys.max() + margin, (seed, view_index)
            hits += 1
            flips.add(sample.flipped[view_index])
        assert not (views[0] == 0).all(0).any()  # never on V1
    assert hits >= 10 and flips == {False, True}


def test_cutout_unit():
    rng = np.random.default_rng(0)
    view = torch.ones(3, 64, 64)
    cutout_in_boxes_(view, np.array([[0.5, 0.25, 0.75, 0.5, 1]]), rng, prob=0.0)
    assert torch.all(view == 1)
    cutout_in_boxes_(view, np.array([[0.5, 0.25, 0.75, 0.5, 1]]), rng, prob=1.0, ratio=(0.2, 0.2))
    ys, xs = np.nonzero((view == 0).all(0).numpy())
    side = int(round(np.sqrt(0.2 * 17 * 17)))  # box 32..48 x 16..32 in pixels
    assert xs.max() - xs.min() + 1 in (side, side + 1) and 32 <= (xs.max() + xs.min()) / 2 <= 48


# ----------------------------------------------------------------------------- robustness, RNG
def test_determinism_with_same_seed(data_dir):
    root, store = data_dir
    ds = build_pretrain_dataset(str(root), store, D(aug="ImageAsymBboxAwareMultiJitter1Cutout"), arch="SoCo_FPN")
    np.random.seed(7)
    a = ds[1]
    np.random.seed(7)
    b = ds[1]
    np.random.seed(8)
    c = ds[1]
    assert _items_equal(a, b) and not _items_equal(a, c)


def test_dataloader_workers_reproducible_and_distinct(data_dir, tmp_path):
    root, _ = data_dir
    # the same image 4 times: identical worker streams would give identical items
    store = write_store(str(tmp_path / "same.proposals"), ["n1.jpg"] * 4, [(90, 120)] * 4,
                        [np.array([[0, 0, 50, 40], [30, 20, 100, 80], [5, 5, 20, 20]])] * 4)
    ds = build_pretrain_dataset(str(root), store, arch="SoCo_FPN")

    def run():
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, worker_init_fn=seed_worker)
        return list(loader)
    first, second = run(), run()
    assert all(_items_equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0]["views"][1], first[1]["views"][1])  # worker 0 vs worker 1


def test_unreadable_image_replaced_and_counted(data_dir, tmp_path, caplog):
    root, store = data_dir
    ds = build_pretrain_dataset(str(root), store, arch="SoCo_C4")
    bad = len(store) - 1
    with caplog.at_level(logging.WARNING, logger="soco"):
        np.random.seed(0)
        item = ds[bad]
        np.random.seed(1)
        ds[bad]
    assert item["num_replaced"] >= 1 and item["index"] != bad
    assert item["views"][0].shape == (3, 224, 224)
    assert sum("bad.jpg" in r.getMessage() for r in caplog.records) == 1  # once per file
    all_bad = write_store(str(tmp_path / "bad.proposals"), ["bad.jpg", "missing.jpg"], [(10, 10)] * 2,
                          [np.zeros((0, 4))] * 2)
    ds_bad = build_pretrain_dataset(str(root), ProposalStore.open(all_bad.path_), D(max_replace_tries=3),
                                    arch="SoCo_FPN")
    with pytest.raises(UnreadableImagesError, match="3 consecutive unreadable"):
        ds_bad[0]


def test_store_size_mismatch_rescales_boxes(data_dir, tmp_path):
    root, _ = data_dir
    store = write_store(str(tmp_path / "half.proposals"), ["rect.png"], [(IMG_H // 2, IMG_W // 2)],
                        [np.array([[10, 15, 29, 39]])])  # RECT_XYXY in a half-size rendition
    ds = build_pretrain_dataset(str(root), store, arch="SoCo_FPN")
    _, boxes = ds.load(0)
    np.testing.assert_array_equal(boxes, [[20, 30, 58, 78]])


# ----------------------------------------------------------------------------- colour
def test_normalisation_matches_torchvision():
    import torchvision.transforms.functional as F
    from pretrain.data.augment import to_normalized_tensor
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    ref = F.normalize(F.to_tensor(img), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    torch.testing.assert_close(to_normalized_tensor(img), ref, atol=1e-5, rtol=0)


def test_colour_pipelines():
    from PIL import ImageOps

    from pretrain.data.augment import POST_1, POST_2, ColourAug
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    before = img.tobytes()
    gray = [np.ptp(np.asarray(POST_2(img, rng), dtype=int), axis=2).max() == 0 for _ in range(400)]
    assert 0.13 < np.mean(gray) < 0.27  # RandomGrayscale p 0.2
    assert img.tobytes() == before
    only_solarize = ColourAug(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=1.0)
    assert only_solarize(img, rng).tobytes() == ImageOps.solarize(img, 128).tobytes()
    assert POST_1.blur_prob == 1.0 and POST_1.solarize_prob == 0.0
    assert (POST_2.blur_prob, POST_2.solarize_prob, POST_2.jitter_prob) == (0.1, 0.2, 0.8)
