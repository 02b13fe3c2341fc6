"""Unit tests of the shared infrastructure in socokit."""
import argparse
import os
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from socokit import checkpoint, fileio, images, proposal_store as ps, resume, training
from socokit.errors import InputPathError, LaunchError
from socokit.distributed import shard_from_env


# ---------------------------------------------------------------- images
def _save(img, path, **kw):
    img.save(path, **kw)
    return str(path)


def test_load_rgb_converts_every_mode(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    cases = {
        "rgb.png": Image.fromarray(rgb),
        "gray.png": Image.fromarray(rgb[..., 0], "L"),
        "g16.png": Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)),
    }
    for name, img in cases.items():
        out = images.load_rgb_array(_save(img, tmp_path / name))
        assert out.shape == (20, 30, 3) and out.dtype == np.uint8, name
    np.testing.assert_array_equal(images.load_rgb_array(str(tmp_path / "rgb.png")), rgb)
    gray = images.load_rgb_array(str(tmp_path / "gray.png"))
    np.testing.assert_array_equal(gray, np.repeat(rgb[..., :1], 3, axis=2))  # grey copied to R, G, B
    g16 = images.load_rgb_array(str(tmp_path / "g16.png"))
    np.testing.assert_array_equal(g16, np.repeat(rgb[..., :1], 3, axis=2))  # 16-bit scaled back to 8-bit


def _over_white(colour, alpha):
    """Hand reference: straight alpha composited over an opaque white background."""
    return np.round(np.asarray(colour, np.float64) * alpha / 255.0 + 255.0 * (1.0 - alpha / 255.0))


def test_load_rgb_composites_transparency_over_white(tmp_path):
    colours = np.array([[200, 100, 50], [200, 100, 50], [200, 100, 50], [10, 20, 30]], np.uint8)
    alphas = np.array([0, 255, 128, 64], np.uint8)
    rgba = np.dstack([colours[None], alphas[None, :, None]])  # 1 x 4 pixels
    out = images.load_rgb_array(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png"))[0]
    expected = np.stack([_over_white(c, a) for c, a in zip(colours, alphas)])
    assert out[0].tolist() == [255, 255, 255] and out[1].tolist() == [200, 100, 50]
    np.testing.assert_allclose(out, expected, atol=1)  # PIL rounds the blend in integers
    la = np.dstack([np.array([[90, 90, 240]], np.uint8), np.array([[255, 0, 100]], np.uint8)])
    out = images.load_rgb_array(_save(Image.fromarray(la, "LA"), tmp_path / "la.png"))[0]
    np.testing.assert_allclose(out, np.stack([_over_white([g] * 3, a) for g, a in ((90, 255), (90, 0), (240, 100))]),
                               atol=1)


def test_load_rgb_palette_and_cmyk_match_hand_references(tmp_path):
    palette = [(255, 0, 0), (0, 128, 255), (17, 34, 51), (250, 250, 0)]
    indices = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8)
    pal = Image.fromarray(indices, "P")
    pal.putpalette([c for colour in palette for c in colour])
    out = images.load_rgb_array(_save(pal, tmp_path / "pal.png"))
    np.testing.assert_array_equal(out, np.array(palette, np.uint8)[indices])  # index -> palette colour
    # With a transparent palette entry (index 2), those pixels become the white background.
    out = images.load_rgb_array(_save(pal, tmp_path / "pal_t.png", transparency=2))
    expected = np.array(palette, np.uint8)[indices]
    expected[indices == 2] = 255
    np.testing.assert_array_equal(out, expected)
    # CMYK -> RGB: R = 255 - C, G = 255 - M, B = 255 - Y without black ink, and 255 - K for pure
    # black ink (where the additive and multiplicative textbook formulas agree). TIFF is lossless.
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [100, 50, 0, 0], [0, 0, 0, 255], [0, 0, 0, 55]]], np.uint8)
    out = images.load_rgb_array(_save(Image.fromarray(cmyk, "CMYK"), tmp_path / "cmyk.tif"))
    assert out[0].tolist() == [[255, 255, 255], [0, 255, 255], [155, 205, 255], [0, 0, 0], [200, 200, 200]]


def test_load_rgb_applies_exif_rotation(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    path = _save(img, tmp_path / "rot.jpg", exif=exif.tobytes())
    assert images.load_rgb_array(path).shape == (40, 20, 3)
    assert images.image_size(path) == (40, 20)


@pytest.mark.parametrize("content,reason", [
    (b"", "empty"), (b"this is not an image", "not an image"),
])
def test_load_rgb_rejects_bad_files(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(images.ImageError) as e:
        images.load_rgb(str(path))
    assert reason in e.value.reason and str(path) in str(e.value)


def test_load_rgb_rejects_truncated_jpeg(tmp_path):
    arr = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    good = _save(Image.fromarray(arr), tmp_path / "good.jpg", quality=90)
    data = open(good, "rb").read()
    bad = tmp_path / "trunc.jpg"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(images.ImageError):
        images.load_rgb(str(bad))


def test_find_images_recursive_sorted(tmp_path):
    for p in ["b/x.JPEG", "a/y.png", "a/.hidden.png", "a/z.txt", "top.jpg"]:
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_bytes(b"x")
    assert images.find_images(str(tmp_path)) == ["a/y.png", "b/x.JPEG", "top.jpg"]
    with pytest.raises(InputPathError, match="missing"):
        images.find_images(str(tmp_path / "missing"))


# ---------------------------------------------------------------- proposal store
def test_store_round_trip_and_pickle(tmp_path):
    paths = ["c1/a.JPEG", "c1/b.JPEG", "c2/é.JPEG"]
    sizes = [(10, 20), (30, 40), (5, 6)]
    boxes = [np.array([[0, 0, 9, 9], [1, 2, 3, 4]]), np.zeros((0, 4)), np.array([[2, 2, 4, 4]])]
    store = ps.write_store(str(tmp_path / "s.proposals"), paths, sizes, boxes, {"backend": "soco"})
    assert len(store) == 3 and store.num_boxes == 3
    assert store.meta["num_images_without_boxes"] == 1 and store.meta["backend"] == "soco"
    for i in range(3):
        assert store.path(i) == paths[i] and store.size(i) == sizes[i]
        np.testing.assert_array_equal(store.boxes(i), np.asarray(boxes[i]).reshape(-1, 4))
    clone = pickle.loads(pickle.dumps(store))
    assert clone.path(2) == paths[2] and clone.find("c1/b.JPEG") == 1
    assert len(pickle.dumps(store)) < 500  # only the path travels to workers


def test_store_writer_abort_leaves_nothing(tmp_path):
    target = tmp_path / "s.proposals"
    with pytest.raises(RuntimeError):
        with ps.ProposalStoreWriter(str(target), {}) as w:
            w.add("a.jpg", (4, 4), [[0, 0, 1, 1]])
            raise RuntimeError("boom")
    assert not target.exists() and os.listdir(tmp_path) == []


def test_store_rejects_non_store(tmp_path):
    with pytest.raises(ps.StoreError):
        ps.ProposalStore.open(str(tmp_path))


def test_xywh_conversion_round_trip():
    xywh = np.array([[3, 4, 10, 20], [0, 0, 31, 32]])
    xyxy = ps.xywh_to_xyxy_inclusive(xywh)
    np.testing.assert_array_equal(xyxy, [[3, 4, 12, 23], [0, 0, 30, 31]])
    np.testing.assert_array_equal(ps.xyxy_inclusive_to_xywh(xyxy), xywh)


# ---------------------------------------------------------------- fileio / checkpoint
def test_atomic_write_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "f.json"
    fileio.atomic_save_json({"a": 1}, str(path))
    with pytest.raises(ValueError):
        with fileio.atomic_write(str(path), "w") as f:
            f.write("partial")
            raise ValueError
    assert path.read_text().strip().startswith("{") and len(os.listdir(tmp_path)) == 1


def test_safe_torch_load_errors(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    fileio.atomic_torch_save({"w": torch.ones(3)}, str(tmp_path / "ok.pth"))
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    torch.save({"ns": argparse.Namespace(a=1)}, str(tmp_path / "unsafe.pth"))
    for name in ["missing.pth", "empty.pth", "junk.pth", "trunc.pth", "unsafe.pth"]:
        with pytest.raises(fileio.CheckpointError, match=name):
            fileio.safe_torch_load(str(tmp_path / name))
    assert torch.equal(fileio.safe_torch_load(str(tmp_path / "ok.pth"))["w"], torch.ones(3))


def test_checkpoint_current_and_rng_round_trip(tmp_path):
    training.seed_everything(3)
    state = checkpoint.capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.save_checkpoint({"rng": state, "epoch": 1}, str(tmp_path), "ckpt_0001.pth")
    checkpoint.save_checkpoint({"rng": state, "epoch": 2}, str(tmp_path), "ckpt_0002.pth")
    loaded = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(str(tmp_path)))
    assert loaded["epoch"] == 2
    checkpoint.restore_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# ---------------------------------------------------------------- resume policy / precision
def test_sample_seed_depends_only_on_seed_epoch_index():
    assert resume.sample_seed(0, 1, 5) == resume.sample_seed(0, 1, 5)
    seeds = {resume.sample_seed(s, e, i) for s in (0, 1) for e in (0, 1, 2) for i in range(50)}
    assert len(seeds) == 2 * 3 * 50  # no collisions between neighbouring seeds, epochs, indices
    assert all(0 <= x < 2**63 for x in seeds)
    key = resume.SampleKey(7, 3, 2)
    assert key.seed_value() == resume.sample_seed(3, 2, 7)
    assert key.rng().integers(0, 2**31, 4).tolist() == key.rng().integers(0, 2**31, 4).tolist()


def test_resumable_sampler_keys_start_and_world_size():
    data = list(range(12))
    one = resume.ResumableDistributedSampler(data, num_replicas=1, rank=0, seed=5)
    one.set_epoch(3)
    order = [k.index for k in one]
    assert sorted(order) == data and all(k.seed == 5 and k.epoch == 3 for k in one)
    # Two ranks split the same global order (rank r takes positions r, r + 2, ...): after k
    # items per rank, together they have seen the first 2k images of the one-process order.
    ranks = [resume.ResumableDistributedSampler(data, num_replicas=2, rank=r, seed=5) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(3)
    seen = [[k.index for k in s] for s in ranks]
    assert sorted(seen[0][:2] + seen[1][:2]) == sorted(order[:4])
    ranks[0].set_start(2)  # a mid-epoch resume skips what this rank already trained on
    assert [k.index for k in ranks[0]] == seen[0][2:] and len(ranks[0]) == 4
    ranks[0].set_epoch(4)
    assert len(ranks[0]) == 6 and [k.index for k in ranks[0]] != seen[0]
    with pytest.raises(ValueError, match="outside"):
        ranks[0].set_start(7)


def test_check_schedule_names_file_key_and_values():
    resume.check_schedule({"total_iters": 8, "peak_lr": 0.1 + 0.2, "steps": [3]},
                          {"total_iters": 8, "peak_lr": 0.3, "steps": (3,)}, "a.pth")  # float / tuple tolerant
    with pytest.raises(resume.ResumeError, match=r"a\.pth was trained with total_iters=8, this run has total_iters=16"):
        resume.check_schedule({"total_iters": 8}, {"total_iters": 16}, "a.pth")
    with pytest.raises(resume.ResumeError, match=r"peak_lr=\(not recorded\)"):
        resume.check_schedule(None, {"peak_lr": 0.3}, "old.pth")


def test_restore_rank_rng_same_and_different_world_size():
    training.seed_everything(11, rank=1)
    states = [checkpoint.capture_rng_state(), checkpoint.capture_rng_state()]
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    training.seed_everything(99)
    assert resume.restore_rank_rng(states, rank=1, world_size=2, seed=0, step=10)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    # Another world size: the per-rank states cannot be mapped, every rank reseeds with seed + step + rank.
    assert not resume.restore_rank_rng(states, rank=2, world_size=3, seed=4, step=10)
    got = torch.rand(3)
    torch.manual_seed(4 + 10 + 2)
    assert torch.equal(got, torch.rand(3))
    assert resume.restore_rank_rng(states[0], rank=0, world_size=1, seed=0, step=0)  # a single dict: one process


def test_resolve_amp_one_policy(monkeypatch):
    assert training.resolve_amp("auto", torch.device("cpu")) == "none"
    assert training.resolve_amp("bf16", "cpu") == "bf16" and training.resolve_amp("none", "cpu") == "none"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert training.resolve_amp("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert training.resolve_amp("auto", "cuda:1") == "fp16" and training.resolve_amp("fp16", "cuda") == "fp16"
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        training.resolve_amp("fp16", "cpu")
    with pytest.raises(ValueError, match="amp must be one of"):
        training.resolve_amp("fp32", "cpu")


def test_check_finite_raises_with_report():
    training.check_finite(torch.tensor(1.0), step=3, lr=0.1, dist=False)
    with pytest.raises(training.NonFiniteLossError, match="step 7.*lr=0.5"):
        training.check_finite(torch.tensor(float("nan")), step=7, lr=0.5, scale=1024.0, dist=False)


# ---------------------------------------------------------------- distributed
def test_shard_from_env(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert shard_from_env() == (1, 3)
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(LaunchError, match="rank 5 is outside a world of 3"):
        shard_from_env()
