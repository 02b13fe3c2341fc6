"""The compiled Felzenszwalb segmentation gives scikit-image's labels, label for label."""
import numpy as np
import pytest
import skimage.data
from skimage.segmentation import felzenszwalb as skimage_felzenszwalb
from skimage.transform import resize
from skimage.util import img_as_float

from selective_search.felzenszwalb import felzenszwalb

SOCO = dict(scale=300, sigma=0.9, min_size=100)
SKIMAGE_DEFAULTS = dict(scale=1, sigma=0.8, min_size=20)
FINE = dict(scale=20, sigma=0.5, min_size=5)  # many small segments: many ties and merges

# Every photograph bundled with scikit-image that loads without a download.
BUNDLED = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins",
           "colorwheel", "grass", "gravel", "hubble_deep_field", "immunohistochemistry",
           "logo", "microaneurysms", "moon", "page", "retina", "rocket",
           "text")


def _bundled(name, max_side=160):
    image = getattr(skimage.data, name)()
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    factor = max_side / max(image.shape[:2])
    if factor < 1:  # keep the test fast; the full-size check is separate
        shape = (max(1, round(image.shape[0] * factor)), max(1, round(image.shape[1] * factor)))
        image = (resize(image, shape, anti_aliasing=True) * 255).round().astype(np.uint8)
    return image


def _assert_same(image, **params):
    expected = skimage_felzenszwalb(image, **params)
    got = felzenszwalb(image, **params)
    assert got.dtype == np.int64 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    return got


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_photographs(name):
    image = _bundled(name)
    for params in (SOCO, SKIMAGE_DEFAULTS, FINE):
        # as SoCo calls it (float 0..1 RGB) and as given (uint8, grey 2-D for grey photos)
        _assert_same(img_as_float(image), **params)
    labels = _assert_same(image, **FINE)
    assert labels.max() > 3  # a real segmentation, not one region


def test_full_size_photograph():
    labels = _assert_same(img_as_float(skimage.data.astronaut()), **SOCO)  # 512 x 512
    assert labels.max() > 50


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_noise(seed):
    rng = np.random.default_rng(seed)
    _assert_same(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8), **SOCO)
    _assert_same(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8), **FINE)
    # few grey levels: a great many exactly equal edge weights, the tie order decides
    _assert_same(rng.integers(0, 3, (64, 64, 3), dtype=np.uint8) * 60, **FINE)
    _assert_same(rng.random((40, 50, 3)), **SKIMAGE_DEFAULTS)
    _assert_same(rng.random((40, 50)), **SKIMAGE_DEFAULTS)  # one channel


def test_images_of_the_selective_search_tests():
    rng = np.random.default_rng(0)
    blocks = rng.integers(90, 110, size=(60, 80, 3), dtype=np.uint8)
    for _ in range(12):
        y, x = rng.integers(0, 50), rng.integers(0, 70)
        h, w = rng.integers(5, 30, size=2)
        blocks[y:y + h, x:x + w] = rng.integers(0, 256, size=3)
    _assert_same(img_as_float(blocks), scale=100, sigma=0.5, min_size=20)
    _assert_same(img_as_float(blocks), **SOCO)
    for shape in [(1, 1, 3), (1, 7, 3), (7, 1, 3), (2, 2, 3), (3, 200, 3), (200, 3, 3)]:
        _assert_same(img_as_float(rng.integers(0, 256, shape, dtype=np.uint8)), **SOCO)
        _assert_same(img_as_float(rng.integers(0, 256, shape, dtype=np.uint8)), **FINE)
    constant = np.full((30, 40, 3), 77, dtype=np.uint8)
    np.testing.assert_array_equal(felzenszwalb(img_as_float(constant), **SOCO), 0)


def test_labels_by_first_appearance():
    """A hand-made case: two flat halves with a hard edge give labels 0 (left) and 1 (right)."""
    image = np.zeros((6, 10, 3), dtype=np.uint8)
    image[:, 5:] = 255
    labels = felzenszwalb(image, scale=1, sigma=0.0, min_size=1)
    np.testing.assert_array_equal(labels, np.repeat([[0] * 5 + [1] * 5], 6, axis=0))


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="expected an image"):
        felzenszwalb(np.zeros((2, 3, 4, 5)))
