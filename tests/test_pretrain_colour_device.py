"""Colour augmentation on the device: same parameters, same pixels (stated tolerance), same
distributions; the data-waiting warning; the GPU check's CPU mode."""
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from pretrain.config import PretrainDataConfig
from pretrain.data import build_pretrain_dataset
from pretrain.data.augment import POST_1, POST_2, ColourParams
from pretrain.data.device_colour import apply_colour, apply_colour_uint8, pack_params
from pretrain.engine import DATA_WAIT_FRACTION, data_wait_advice, move_batch
from socokit.errors import ConfigError
from socokit.proposal_store import write_store

REPO = Path(__file__).resolve().parents[1]
#: blur is a true Gaussian on the device and PIL's three box blurs on the CPU
BLUR_MEAN_TOL, BLUR_MAX_TOL = 1.0, 12.0


def _image(seed, hw=(36, 44)):
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(low).resize(hw[::-1], Image.BICUBIC)).astype(np.int16)
    arr = np.clip(arr + rng.integers(-25, 26, arr.shape), 0, 255).astype(np.uint8)
    arr[:4, :4] = [255, 255, 255]  # saturated and grey corners
    arr[-4:, -4:] = 0
    return Image.fromarray(arr)


def _both(img, params, aug=POST_2):
    cpu = np.asarray(aug.apply(img, params), dtype=np.float32)
    t = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None]
    dev = apply_colour_uint8(t, pack_params(params)[None])[0].permute(1, 2, 0).numpy()
    return cpu, dev


@pytest.mark.parametrize("order", list(itertools.permutations(range(4)))[::5])
def test_jitter_grey_solarize_are_pixel_exact(order):
    """Without blur the device path gives PIL's pixels exactly, in any op order."""
    rng = np.random.default_rng(sum(order))
    for seed in range(6):
        factors = (rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), rng.uniform(0.8, 1.2),
                   rng.uniform(-0.1, 0.1))
        params = ColourParams(tuple(float(f) for f in factors), order, bool(seed % 3 == 0),
                              None, bool(seed % 2))
        cpu, dev = _both(_image(seed), params)
        np.testing.assert_array_equal(dev, cpu)


def test_hue_extremes_and_grey_images_exact():
    grey = Image.fromarray(np.full((8, 9, 3), 77, dtype=np.uint8))
    for hue in (-0.1, -0.0999, -0.004, 0.0, 0.004, 0.0999, 0.1):
        for img in (_image(1), grey):
            cpu, dev = _both(img, ColourParams((1.0, 1.0, 1.0, hue), (3, 0, 1, 2), False, None, False))
            np.testing.assert_array_equal(dev, cpu)


@pytest.mark.parametrize("radius", [0.1, 0.6, 1.3, 2.0])
def test_blur_within_the_stated_tolerance(radius):
    for seed in range(4):
        cpu, dev = _both(_image(seed), ColourParams(None, (0, 1, 2, 3), False, radius, False), POST_1)
        diff = np.abs(cpu - dev)
        assert diff.mean() <= BLUR_MEAN_TOL and diff.max() <= BLUR_MAX_TOL, (diff.mean(), diff.max())


def test_normalised_output_matches_to_tensor_normalize():
    img = _image(3)
    params = POST_1.draw(np.random.default_rng(0))
    from pretrain.data.augment import to_normalized_tensor

    cpu = to_normalized_tensor(POST_1.apply(img, params))
    dev = apply_colour(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None],
                       pack_params(params)[None])[0]
    assert (cpu - dev).abs().mean() <= BLUR_MEAN_TOL / 255 / 0.224  # blur only
    assert (cpu - dev).abs().max() <= BLUR_MAX_TOL / 255 / 0.224 + 1e-5


def test_drawn_parameters_follow_the_recipe():
    """Probabilities and ranges of every parameter (binomial 5-sigma bounds, KS and chi2 tests)."""
    n = 4000
    for aug, blur_p, sol_p in ((POST_1, 1.0, 0.0), (POST_2, 0.1, 0.2)):
        rng = np.random.default_rng(7)
        draws = [aug.draw(rng) for _ in range(n)]

        def rate(values, p):
            values = np.asarray(values, dtype=float)
            assert abs(values.mean() - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12

        rate([d.jitter is not None for d in draws], 0.8)
        rate([d.grayscale for d in draws], 0.2)
        rate([d.blur_radius is not None for d in draws], blur_p)
        rate([d.solarize for d in draws], sol_p)
        jit = np.array([d.jitter for d in draws if d.jitter is not None])
        for k, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
            assert lo <= jit[:, k].min() and jit[:, k].max() <= hi
            assert stats.kstest(jit[:, k], stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3
        orders = [d.order for d in draws if d.jitter is not None]
        counts = np.array([orders.count(p) for p in itertools.permutations(range(4))])
        assert stats.chisquare(counts).pvalue > 1e-3
        radii = np.array([d.blur_radius for d in draws if d.blur_radius is not None])
        assert stats.kstest(radii, stats.uniform(0.1, 1.9).cdf).pvalue > 1e-3


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("colour_device")
    rng = np.random.default_rng(0)
    paths, sizes, boxes = [], [], []
    for i in range(3):
        _image(i, (60, 80)).save(root / f"im{i}.jpg", quality=95)
        paths.append(f"im{i}.jpg")
        sizes.append((60, 80))
        x1, y1 = rng.integers(0, 30, 8), rng.integers(0, 20, 8)
        boxes.append(np.stack([x1, y1, x1 + rng.integers(10, 45, 8), y1 + rng.integers(10, 35, 8)], 1))
    write_store(str(root / "s.proposals"), paths, sizes, boxes)
    return str(root), str(root / "s.proposals")


def test_dataset_on_device_gives_the_same_sample(small_store):
    """Same seed: identical boxes and correspondences, uint8 views whose device colour equals
    the CPU path's views within the blur tolerance."""
    root, store = small_store
    cpu_ds = build_pretrain_dataset(root, store, PretrainDataConfig(image_size=64), arch="SoCo_FPN")
    dev_ds = build_pretrain_dataset(root, store, PretrainDataConfig(image_size=64, colour_on_device=True),
                                    arch="SoCo_FPN")
    for index in range(3):
        np.random.seed(index)
        a = cpu_ds[index]
        np.random.seed(index)
        b = dev_ds[index]
        assert all(v.dtype == torch.uint8 for v in b["views"])
        for x, y in zip(a["boxes"] + a["corres"], b["boxes"] + b["corres"]):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        batch = torch.utils.data.default_collate([b])
        views, _, _, _ = move_batch(batch, torch.device("cpu"))
        for x, y in zip(a["views"], views):
            diff = (x - y[0]).abs() * 255 * 0.229
            assert diff.mean() <= BLUR_MEAN_TOL and diff.max() <= BLUR_MAX_TOL * 1.1


def test_on_device_refuses_cutout(small_store):
    with pytest.raises(ConfigError, match="colour_on_device: not with the cutout aug 'ImageAsymBboxCutout'"):
        build_pretrain_dataset(*small_store, PretrainDataConfig(colour_on_device=True), arch="SoCo_C4")


def test_data_wait_advice():
    assert data_wait_advice(DATA_WAIT_FRACTION * 10, 10.0, 50) is None  # exactly at the limit
    text = data_wait_advice(6.0, 10.0, 50, num_workers=4)
    assert "60% of the time over the last 50 steps" in text
    assert "--num-workers (now 4)" in text and "--colour-on-device" in text
    assert data_wait_advice(0.0, 0.0, 0) is None


@pytest.mark.timeout(1200)  # ~1-2 CPU minutes; 8 wall minutes measured on a loaded 2-core machine
def test_gpu_check_tiny_runs_and_prints_one_table():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny"],
                         capture_output=True, text=True, cwd=REPO, timeout=1100)
    assert out.returncode == 0, out.stderr[-3000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 2 + 2 + 2  # header, rule, 2 pretraining, train + eval, 2 checks
    assert "pretrain SoCo_FPN faithful" in table[2] and "pretrain SoCo_FPN batched" in table[3]
    assert sum(" ok " in line for line in table) == 2


def test_gpu_check_reports_a_failed_measurement_and_runs_the_rest(monkeypatch, capsys):
    """A measurement that raises is named in the output, the others still run, the exit code is 1."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    ran = []

    def fake_pretrain_row(s, head_mode, root, store, amp):
        ran.append(head_mode)
        if head_mode == "faithful":
            raise RuntimeError("boom")
        return {"what": f"pretrain SoCo_FPN {head_mode}", "setting": "x", "images_s": 1.0,
                "peak_mib": float("nan"), "mfu": 0.5, "data_wait": 0.1}

    def fake_check(*args):
        ran.append("check")
        return {"what": "a check", "values": [1.0, 1.0], "rel_diff": 0.0}

    monkeypatch.setattr(gpu_check, "pretrain_row", fake_pretrain_row)
    monkeypatch.setattr(gpu_check.bench_pretrain_data, "make_images", lambda *a: "store")
    monkeypatch.setattr(gpu_check, "make_demo_data", lambda *a, **k: {})
    monkeypatch.setattr(gpu_check, "detection_rows", lambda s, data: ran.append("det") or [])
    monkeypatch.setattr(gpu_check, "pretrain_loss_agreement", fake_check)
    monkeypatch.setattr(gpu_check, "detection_loss_agreement", fake_check)
    assert gpu_check.main(["--tiny", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert ran == ["faithful", "batched", "det", "check", "check"]
    assert "FAILED: pretrain SoCo_FPN faithful: RuntimeError: boom" in out
    assert "pretrain SoCo_FPN batched" in out and "50.0%" in out
