"""Selective-search algorithm backends: exactness against slow references, box conventions."""
import functools
import operator
import sys
import types
import warnings

import numpy as np
import pytest
import skimage.data
from skimage.transform import resize

from selective_search import backends, soco_ss
from selective_search.ss_texture import lbp_rgb, lbp_rgb_skimage
from ss_oracle import oracle_regions, oracle_regions_from_labels
from socokit.proposal_store import xywh_to_xyxy_inclusive


def _photo(name, hw=(90, 120)):
    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return (resize(image[:, :, :3], hw, anti_aliasing=True) * 255).round().astype(np.uint8)


def _blocks(rng, hw=(60, 80)):
    """Random coloured rectangles over noise: many small, overlapping segments."""
    image = rng.integers(90, 110, size=hw + (3,), dtype=np.uint8)
    for _ in range(12):
        y, x = rng.integers(0, hw[0] - 10), rng.integers(0, hw[1] - 10)
        h, w = rng.integers(5, 30, size=2)
        image[y:y + h, x:x + w] = rng.integers(0, 256, size=3)
    return image


def _symmetric_labels(seed, h=40, w=40, k=5):
    """A 4-fold mirror-symmetric Voronoi label map: mirrored pairs tie exactly."""
    rng = np.random.default_rng(seed)
    seeds = rng.uniform(0, [h / 2, w / 2], size=(k, 2))
    yy, xx = np.mgrid[0:h // 2, 0:w // 2]
    quadrant = ((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2).argmin(-1)
    top = np.concatenate([quadrant, quadrant[:, ::-1] + k], axis=1)
    return np.concatenate([top, top[::-1] + 2 * k], axis=0)


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket"])
def test_soco_matches_oracle_on_photos(name):
    image = _photo(name)
    np.testing.assert_array_equal(soco_ss.soco_regions(image), oracle_regions(image))


@pytest.mark.parametrize("seed", [0, 1])
def test_soco_matches_oracle_on_synthetic(seed):
    image = _blocks(np.random.default_rng(seed))
    ours = soco_ss.soco_regions(image, scale=100, sigma=0.5, min_size=20)
    assert len(ours) > 20
    np.testing.assert_array_equal(ours, oracle_regions(image, 100, 0.5, 20))


def test_soco_matches_oracle_on_greyscale_like_input():
    image = _photo("camera", (80, 100))  # R = G = B
    assert (image[:, :, 0] == image[:, :, 2]).all()
    np.testing.assert_array_equal(soco_ss.soco_regions(image), oracle_regions(image))


@pytest.mark.parametrize("seed", [0, 3])
def test_ties_break_like_the_original(seed):
    labels = _symmetric_labels(seed)
    image = np.full(labels.shape + (3,), 100, dtype=np.uint8)
    table = soco_ss.region_table(image, labels)
    a, b = soco_ss.neighbour_pairs(table.bbox)
    sims = soco_ss.similarity(table.hist, table.size, table.bbox, a, b, labels.size)
    assert len(set(sims.tolist())) < len(sims)  # exact ties present
    expected = oracle_regions_from_labels(image, labels)
    # the case is sensitive to the tie rule: taking the first tie gives other regions
    first_tie = oracle_regions_from_labels(image, labels, tie_break="first")
    assert not np.array_equal(expected, first_tie)
    np.testing.assert_array_equal(soco_ss.soco_regions_from_labels(image, labels), expected)


def test_matches_the_selectivesearch_package(monkeypatch):
    """Against the real reference code: AlpacaDB's package, and SoCo's one-line change to it.

    Runs on every supported Python (checked on 3.11 and 3.12). The package adds histogram
    intersections with the built-in ``sum``; it is pinned to a plain left-to-right sum, the
    order of the Python 3.7 the original ran on, so a compensated ``sum`` (CPython >= 3.12 for
    exact floats) cannot shift a similarity tie.
    """
    import selectivesearch.selectivesearch as ss_module  # a declared dependency: never skipped

    monkeypatch.setattr(ss_module, "sum", lambda values: functools.reduce(operator.add, values, 0),
                        raising=False)
    image = _photo("coffee", (60, 90))

    def run_package():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LBP of float input
            _, regions = ss_module.selective_search(image, scale=300, sigma=0.9, min_size=100)
        return np.array([r["rect"] for r in regions], dtype=np.int64)

    np.testing.assert_array_equal(soco_ss.soco_regions(image, texture_hist_max=1.0), run_package())

    def soco_texture_hist(img):  # SoCo's copy: 10 bins over [0, 255] instead of [0, 1]
        return np.concatenate([np.histogram(img[:, c], 10, (0.0, 255.0))[0]
                               for c in range(3)]) / len(img)

    monkeypatch.setattr(ss_module, "_calc_texture_hist", soco_texture_hist)
    np.testing.assert_array_equal(soco_ss.soco_regions(image), run_package())


def test_lbp_matches_skimage(rng):
    images = [rng.integers(0, 256, (23, 31, 3), dtype=np.uint8),
              rng.integers(0, 3, (17, 12, 3), dtype=np.uint8),  # many exact ties with the centre
              rng.integers(0, 256, (1, 1, 3), dtype=np.uint8),
              rng.integers(0, 256, (2, 5, 3), dtype=np.uint8),
              _photo("astronaut", (64, 48))]
    for image in images:
        np.testing.assert_array_equal(lbp_rgb(image), lbp_rgb_skimage(image))


def test_constant_image_is_one_region():
    image = np.full((30, 40, 3), 77, dtype=np.uint8)
    np.testing.assert_array_equal(soco_ss.soco_regions(image), [[0, 0, 39, 29]])
    np.testing.assert_array_equal(backends.run_backend(image), [[0, 0, 38, 28]])


def test_soco_backend_box_convention():
    image = _photo("chelsea")
    rects = soco_ss.soco_regions(image)
    boxes_xyxy = backends.run_backend(image, "soco")
    assert boxes_xyxy.dtype == np.int32 and boxes_xyxy.shape == rects.shape
    np.testing.assert_array_equal(boxes_xyxy[:, :2], rects[:, :2])
    np.testing.assert_array_equal(boxes_xyxy[:, 2:], rects[:, :2] + rects[:, 2:] - 1)
    np.testing.assert_array_equal(boxes_xyxy, xywh_to_xyxy_inclusive(rects))
    # the last merged region spans the segments: w = extent - 1, so x2 = W - 2 at most
    assert boxes_xyxy[:, 2].max() <= image.shape[1] - 2


def test_map_boxes_to_original():
    boxes_xyxy = np.array([[0, 0, 9, 4], [5, 5, 4, 4], [49, 24, 49, 24], [10, 3, 20, 7]])
    mapped = backends.map_boxes_to_original(boxes_xyxy, (25, 50), (50, 100))
    np.testing.assert_array_equal(mapped, [[0, 0, 19, 9], [10, 10, 9, 9], [98, 48, 99, 49],
                                           [20, 6, 41, 15]])
    # non-integer factor: stays inside the image, widths scale
    mapped = backends.map_boxes_to_original(np.array([[0, 0, 29, 19]]), (20, 30), (67, 101))
    np.testing.assert_array_equal(mapped, [[0, 0, 100, 66]])


def test_max_side_searches_a_downscaled_copy():
    image = _photo("astronaut", (120, 160))
    boxes_xyxy = backends.run_backend(image, "soco", max_side=80)
    small = backends._downscale(image, 80)
    assert small.shape == (60, 80, 3)
    expected = backends.map_boxes_to_original(
        xywh_to_xyxy_inclusive(soco_ss.soco_regions(small)), (60, 80), (120, 160))
    np.testing.assert_array_equal(boxes_xyxy, expected)
    assert boxes_xyxy[:, :2].min() >= 0 and boxes_xyxy[:, 2].max() <= 159
    # max_side at or above the size changes nothing
    np.testing.assert_array_equal(backends.run_backend(image, "soco", max_side=160),
                                  backends.run_backend(image, "soco"))


@pytest.mark.parametrize("backend", ["opencv-fast", "opencv-single"])
@pytest.mark.parametrize("max_side", [None, 50])
def test_opencv_backends_return_boxes_inside_the_image(backend, max_side):
    image = _photo("coffee", (64, 96))
    boxes_xyxy = backends.run_backend(image, backend, max_side=max_side)
    assert boxes_xyxy.dtype == np.int32 and boxes_xyxy.ndim == 2 and len(boxes_xyxy) > 0
    assert (boxes_xyxy[:, :2] >= 0).all()
    assert (boxes_xyxy[:, 2] <= 95).all() and (boxes_xyxy[:, 3] <= 63).all()
    assert (boxes_xyxy[:, 2:] >= boxes_xyxy[:, :2]).all()  # OpenCV's w is the true extent
    if max_side is None:  # the whole-image region reaches the last pixel
        assert boxes_xyxy[:, 2].max() == 95 and boxes_xyxy[:, 3].max() == 63


def test_opencv_quality_runs():
    boxes_xyxy = backends.run_backend(_photo("coffee", (32, 48)), "opencv-quality")
    assert len(boxes_xyxy) > 0 and (boxes_xyxy[:, 2] <= 47).all()


def test_default_params_and_errors(monkeypatch):
    assert backends.default_params("soco") == {"scale": 300, "sigma": 0.9, "min_size": 100}
    assert set(backends.BACKENDS) == {"soco", "opencv-fast", "opencv-quality", "opencv-single"}
    params = backends.default_params("soco")
    params["scale"] = 1
    assert backends.default_params("soco")["scale"] == 300  # a fresh dict each time
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="unknown selective-search backend"):
        backends.run_backend(image, "felzenszwalb")
    with pytest.raises(ValueError, match="does not take"):
        backends.run_backend(image, "soco", k=3)
    with pytest.raises(ValueError, match="uint8 RGB"):
        backends.run_backend(image.astype(np.float32))
    with pytest.raises(ValueError, match="uint8 RGB"):
        backends.run_backend(image[:, :, 0])
    monkeypatch.setitem(sys.modules, "cv2", types.ModuleType("cv2"))
    with pytest.raises(RuntimeError, match="pip uninstall"):
        backends.run_backend(image, "opencv-fast")


def test_neighbour_pairs_blocks_and_order(rng):
    xy = rng.integers(0, 50, size=(60, 2))
    bbox = np.concatenate([xy, xy + rng.integers(0, 30, size=(60, 2))], axis=1)
    expected = [(a, b) for a in range(60) for b in range(a + 1, 60)
                if any(bbox[a, 0] < x < bbox[a, 2] and bbox[a, 1] < y < bbox[a, 3]
                       for x in (bbox[b, 0], bbox[b, 2]) for y in (bbox[b, 1], bbox[b, 3]))]
    assert len(expected) > 50
    for max_entries in (1 << 22, 7, 1):
        a, b = soco_ss.neighbour_pairs(bbox, max_entries=max_entries)
        assert list(zip(a.tolist(), b.tolist())) == expected


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (6, 1), (3, 4)])
def test_tiny_images(shape, rng):
    image = rng.integers(0, 256, size=shape + (3,), dtype=np.uint8)
    ours = soco_ss.soco_regions(image, min_size=1)
    np.testing.assert_array_equal(ours, oracle_regions(image, min_size=1))
    assert len(backends.run_backend(image, min_size=1)) == len(ours)
