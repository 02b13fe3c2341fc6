"""Pretraining loop: resume, checkpoints, recipes, bad-data stop, linear evaluation (CPU)."""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pretrain import linear_eval
from pretrain import train as pretrain_train
from pretrain.config import PretrainConfig
from socokit.checkpoint import load_checkpoint
from socokit.config import parse_config
from socokit.proposal_store import write_store

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "pretrain" / "configs"
RECIPES = ["SoCo_FPN_100ep", "SoCo_FPN_400ep", "SoCo_FPN_Star_400ep", "SoCo_C4_100ep",
           "SoCo_C4_400ep", "BYOL_100ep"]

# A model small enough for a few CPU steps per test (same code paths as the recipes).
TINY = ["--backbone", "timm:test_resnet", "--image-size", "64", "--fpn-channels", "16",
        "--conv-dim", "16", "--fc-dim", "32", "--mlp-hidden-dim", "32", "--out-dim", "16",
        "--head-mode", "batched", "--num-workers", "0", "--device", "cpu", "--amp", "none",
        "--no-tensorboard", "--print-freq", "1"]


def make_tiny_store(root: Path, n: int = 8, size: int = 64, seed: int = 0, bad: int = 0):
    """``n`` random-noise JPEGs (plus ``bad`` zero-byte ones) and a proposal store for them."""
    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    paths, sizes, boxes = [], [], []
    for i in range(n + bad):
        h, w = size, size + 8 * (i % 3)
        rel = f"img{i:03d}.jpg"
        if i < n:
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / rel)
        else:
            (images / rel).write_bytes(b"")
        x1, y1 = rng.integers(0, w // 2, 6), rng.integers(0, h // 2, 6)
        x2 = np.minimum(x1 + rng.integers(8, w // 2, 6), w - 1)
        y2 = np.minimum(y1 + rng.integers(8, h // 2, 6), h - 1)
        paths.append(rel)
        sizes.append((h, w))
        boxes.append(np.stack([x1, y1, x2, y2], 1).astype(np.int32))
    store = root / "tiny.proposals"
    write_store(str(store), paths, sizes, boxes, {"backend": "test", "image_root": str(images)})
    return str(images), str(store)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("pretrain_data"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI box is shared; many threads on tiny tensors only spin
    yield
    torch.set_num_threads(before)


def _run(data, out, *extra):
    images, store = data
    pretrain_train.main(["--data", images, "--proposals", store, "--output-dir", str(out),
                         "--batch-size", "2", "--epochs", "2", "--warmup-epoch", "1", *TINY, *extra])


def _records(out) -> dict:
    with open(Path(out) / "metrics.jsonl") as f:
        return {r["step"]: r for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """An uninterrupted run of 5 steps (4 per epoch) and its output folder."""
    out = tmp_path_factory.mktemp("run_a")
    _run(tiny_data, out, "--stop-at-step", "5")
    return out


def test_resume_reproduces_the_next_steps(tiny_data, trained, tmp_path):
    # Stop mid-epoch, resume in a fresh run: the following steps (one mid-epoch, one in the
    # next epoch) have the same loss, LR and EMA momentum as the uninterrupted run.
    _run(tiny_data, tmp_path, "--stop-at-step", "3", "--save-every-iters", "2")
    assert "saved ckpt_iter.pth (iter, step 2)" in (tmp_path / "log.txt").read_text()
    assert load_checkpoint(str(tmp_path / "current.pth"))["step"] == 3
    _run(tiny_data, tmp_path, "--stop-at-step", "5")
    full, resumed = _records(trained), _records(tmp_path)
    for step in (3, 4):
        for key in ("loss", "lr", "momentum"):
            assert resumed[step][key] == full[step][key], (step, key)
    assert resumed[4]["momentum"] > resumed[3]["momentum"] > 0.99  # EMA counter was restored
    a = load_checkpoint(str(trained / "current.pth"))["model"]
    b = load_checkpoint(str(tmp_path / "current.pth"))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit


def _model_state(out) -> dict:
    return load_checkpoint(str(Path(out) / "current.pth"))["model"]


def test_sigkill_mid_epoch_with_workers_resumes_bitwise(tiny_data, tmp_path):
    # The reference runs 8 steps (2 epochs of 4) in this process without loader workers. The
    # other run uses 2 workers, checkpoints every 3 steps and is killed with SIGKILL as it
    # starts step 7 (mid epoch 2; newest checkpoint: step 6, also mid-epoch); it then resumes
    # with 1 worker. Per-sample randomness from (seed, epoch, index) makes every sample, and so
    # the final weights, identical bit for bit.
    images, store = tiny_data
    _run(tiny_data, tmp_path / "full")
    argv = ["--data", images, "--proposals", store, "--output-dir", str(tmp_path / "killed"),
            "--batch-size", "2", "--epochs", "2", "--warmup-epoch", "1", *TINY,
            "--num-workers", "2", "--save-every-iters", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "killed_run.py"), "pretrain", "7", *argv],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load_checkpoint(str(tmp_path / "killed" / "current.pth"))["step"] == 6
    _run(tiny_data, tmp_path / "killed", "--num-workers", "1")
    assert "resumed from" in (tmp_path / "killed" / "log.txt").read_text()
    full, resumed = _model_state(tmp_path / "full"), _model_state(tmp_path / "killed")
    assert load_checkpoint(str(tmp_path / "killed" / "current.pth"))["step"] == 8
    assert full.keys() == resumed.keys()
    differ = [k for k in full if not torch.equal(full[k], resumed[k])]
    assert not differ, differ[:5]


def test_checkpoint_contract(trained):
    ckpt = load_checkpoint(str(trained / "current.pth"))  # weights_only=True
    assert ckpt["format"] == "soco-pretrain" and ckpt["version"] == 1
    assert (ckpt["arch"], ckpt["backbone"]) == ("SoCo_FPN", "timm:test_resnet")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 5)
    assert ckpt["schedule"]["iters_per_epoch"] == 4 and ckpt["schedule"]["total_iters"] == 8
    assert ckpt["config"]["batch_size"] == 2 and ckpt["config"]["aware_range"] == [48, 96, 192, 224, 0]
    assert ckpt["pixel"]["channels"] == "RGB" and len(ckpt["rng"]) == 1
    keys = ckpt["model"].keys()
    for prefix in ("online_backbone.body.", "online_backbone.fpn.", "online_box_head.",
                   "online_projector.", "online_predictor.", "target_backbone.", "target_box_head.",
                   "target_projector."):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert not any(k.startswith("module.") for k in keys)
    assert ckpt["optimizer"]["state"] and ckpt["scaler"] == {}
    saved = yaml.safe_load((trained / "config.yaml").read_text())
    assert saved == ckpt["config"]
    assert (trained / "ckpt_epoch_0001.pth").is_file() and (trained / "ckpt_iter.pth").is_file()


def test_resume_refuses_a_different_schedule(tiny_data, trained, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    os.link(trained / "current.pth", out / "current.pth")
    with pytest.raises(SystemExit, match="iters_per_epoch"):
        _run(tiny_data, out, "--batch-size", "4")


def test_too_many_bad_images_stop_the_run(tmp_path):
    images, store = make_tiny_store(tmp_path / "data", n=6, bad=2)
    with pytest.raises(SystemExit, match="max-bad-fraction"):
        _run((images, store), tmp_path / "out", "--batch-size", "4")
    failure = json.loads((tmp_path / "out" / "failure.json").read_text())
    assert failure["error"] == "too many bad images"
    assert not (tmp_path / "out" / "current.pth").exists()


def test_tiny_cpu_recipe_runs(tiny_data, tmp_path):
    images, store = tiny_data
    pretrain_train.main(["--config", str(CONFIGS / "tiny_cpu.yaml"), "--data", images,
                         "--proposals", store, "--output-dir", str(tmp_path), "--num-workers", "1",
                         "--stop-at-step", "1", "--print-freq", "1"])
    ckpt = load_checkpoint(str(tmp_path / "current.pth"))
    assert ckpt["backbone"] == "timm:resnet18" and ckpt["step"] == 1
    assert ckpt["config"]["aug"] == "ImageAsymBboxAwareMultiJitter1Cutout"
    record = _records(tmp_path)[0]
    assert np.isfinite(record["loss"]) and record["lr"] == pytest.approx(32.0 * 8 / 256 / 100)  # peak 1.0, warmup from 1/100
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("arch", ["SoCo_FPN_Star", "SoCo_C4", "BYOL"])
def test_other_archs_train_a_step_with_bf16_and_channels_last(tiny_data, tmp_path, arch):
    images, store = tiny_data
    proposals = [] if arch == "BYOL" else ["--proposals", store]  # BYOL needs no proposals
    pretrain_train.main(["--arch", arch, "--data", images, *proposals, "--output-dir", str(tmp_path),
                         "--batch-size", "2", "--epochs", "1", "--warmup-epoch", "0", *TINY,
                         "--amp", "bf16", "--channels-last", "--stop-at-step", "1"])
    ckpt = load_checkpoint(str(tmp_path / "current.pth"))
    assert ckpt["arch"] == arch and ckpt["schedule"]["amp"] == "bf16"
    assert np.isfinite(_records(tmp_path)[0]["loss"])


def _check_tiny_cpu(args):
    """The tiny recipe is SoCo_FPN_100ep's algorithm at demo scale (its header says so)."""
    assert (args.arch, args.backbone, args.image_size, args.device, args.amp) == (
        "SoCo_FPN", "timm:resnet18", 64, "cpu", "none")
    assert (args.batch_size, args.epochs, args.warmup_epoch, args.num_workers) == (8, 2, 1, 2)
    assert (args.fpn_channels, args.conv_dim, args.fc_dim, args.mlp_hidden_dim, args.out_dim) == (32, 32, 128, 256, 64)
    # FPN level thresholds of the 224-pixel recipes scaled to 64-pixel views, rounded up.
    assert args.aware_range == [math.ceil(t * 64 / 224) for t in (48, 96, 192, 224)] + [0] == [14, 28, 55, 64, 0]
    reference = argparse.Namespace(
        **parse_config(PretrainConfig, ["--config", str(CONFIGS / "SoCo_FPN_100ep.yaml")]).to_dict())
    # base LR raised so that LARS moves the convolutions at batch 8: peak LR 32 x 8 / 256 = 1.0 (study D1)
    assert args.base_lr * args.batch_size / 256 == 1.0
    for key in ("aug", "optimizer", "weight_decay", "contrast_momentum", "crop", "jitter_prob",
                "cutout_prob", "warmup_multiplier", "eta_min", "select_k", "padding_k", "momentum"):
        assert getattr(args, key) == getattr(reference, key), key


@pytest.mark.parametrize("recipe", RECIPES + ["tiny_cpu"])
def test_recipes_parse(recipe):
    cfg = parse_config(PretrainConfig, ["--config", str(CONFIGS / f"{recipe}.yaml")])
    flat = cfg.to_dict()
    assert flat["head_mode"] == "batched" and flat["roi_levels"] == "all"
    if recipe == "tiny_cpu":
        _check_tiny_cpu(argparse.Namespace(**flat))
        return
    assert (flat["base_lr"], flat["batch_size"], flat["optimizer"], flat["weight_decay"]) == (1.0, 128, "lars", 1e-5)
    assert (flat["warmup_epoch"], flat["contrast_momentum"], flat["backbone"]) == (10, 0.99, "resnet50")
    assert flat["epochs"] == int(recipe.split("_")[-1][:-2])
    expected = {"SoCo_FPN_100ep": ("SoCo_FPN", 0.5, 1, "ImageAsymBboxAwareMultiJitter1Cutout"),
                "SoCo_FPN_400ep": ("SoCo_FPN", 0.5, 1, "ImageAsymBboxAwareMultiJitter1"),
                "SoCo_FPN_Star_400ep": ("SoCo_FPN_Star", 0.5, 1, "ImageAsymBboxAwareMulti3ResizeExtraJitter1"),
                "SoCo_C4_100ep": ("SoCo_C4", 0.6, 10, "ImageAsymBboxCutout"),
                "SoCo_C4_400ep": ("SoCo_C4", 0.6, 10, "ImageAsymBboxCutout"),
                "BYOL_100ep": ("BYOL", 0.08, 1, "BYOL")}[recipe]
    assert (flat["arch"], flat["crop"], flat["save_freq"], flat["aug"]) == expected
    if recipe == "SoCo_FPN_Star_400ep":
        assert (flat["image3_size"], flat["image4_size"]) == (192, 112)


@pytest.mark.parametrize("recipe", RECIPES + ["pretrain_tiny_cpu"])
def test_recipe_script_without_data_explains_and_exits_2(recipe, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATA", "PROPOSALS")}
    if recipe == "pretrain_tiny_cpu":
        env.update(DATA=str(tmp_path / "none"), PROPOSALS=str(tmp_path / "none.proposals"))
    proc = subprocess.run(["bash", str(REPO / "scripts" / f"{recipe}.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "DATA" in proc.stderr
    if recipe != "BYOL_100ep":
        assert "selective_search/generate_proposals.py" in proc.stderr
        assert "--strategy ratio3size0308 --post" in proc.stderr


def _labelled_folder(root: Path, classes=("a", "b"), per_class: int = 4, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                arr = np.full((40, 48, 3), 60 + 120 * c, np.uint8) + rng.integers(0, 40, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / name / f"{i}.png")
    (root / "val" / "a" / "broken.png").write_bytes(b"not an image")
    return str(root)


@pytest.mark.parametrize("bn_train", [False, True])
def test_linear_eval_freezes_the_backbone(trained, tmp_path, bn_train):
    data = _labelled_folder(tmp_path / "folder")
    ckpt_path = str(trained / "current.pth")
    argv = ["--pretrained", ckpt_path, "--data", data, "--output-dir", str(tmp_path / "lin"),
            "--epochs", "2", "--warmup-epoch", "1", "--batch-size", "4", "--image-size", "32",
            "--val-resize", "36", "--num-workers", "0", "--device", "cpu", "--print-freq", "1"]
    final = linear_eval.main(argv + (["--bn-train"] if bn_train else []))
    metrics = json.loads((tmp_path / "lin" / "metrics.json").read_text())
    assert metrics["final"] == final and len(metrics["history"]) == 2
    assert 0.0 <= final["top1"] <= final["top5"] <= 100.0
    assert (final["num_images"], final["unreadable"]) == (8, 1)
    # The frozen backbone keeps its BN in eval mode (running statistics untouched) unless the
    # original's train-mode behaviour is asked for with --bn-train.
    ckpt = load_checkpoint(ckpt_path)
    probe = linear_eval.load_frozen_backbone(ckpt, ckpt_path, bn_train=bn_train)
    probe.train()
    probe(torch.randn(2, 3, 32, 32))
    moved = [k for k, v in probe.body.state_dict().items() if "running_mean" in k and
             not torch.equal(v, ckpt["model"]["online_backbone.body." + k])]
    assert bool(moved) == bn_train
    assert not any(p.requires_grad for p in probe.parameters())
    assert (tmp_path / "lin" / "current.pth").is_file()


def test_linear_eval_resume_is_exact_with_workers(trained, tmp_path):
    # Epoch 1's checkpoint as the newest save of an interrupted run; resumed with 2 loader workers
    # it ends with the linear layer of the uninterrupted run without workers, bit for bit.
    data = _labelled_folder(tmp_path / "folder")
    common = ["--pretrained", str(trained / "current.pth"), "--data", data, "--epochs", "2",
              "--warmup-epoch", "1", "--batch-size", "4", "--image-size", "32", "--val-resize", "36",
              "--device", "cpu", "--print-freq", "1", "--save-freq", "1"]
    linear_eval.main(common + ["--output-dir", str(tmp_path / "full"), "--num-workers", "0"])
    (tmp_path / "resumed").mkdir()
    os.link(tmp_path / "full" / "linear_epoch_0001.pth", tmp_path / "resumed" / "current.pth")
    linear_eval.main(common + ["--output-dir", str(tmp_path / "resumed"), "--num-workers", "2"])
    full = load_checkpoint(str(tmp_path / "full" / "current.pth"))
    resumed = load_checkpoint(str(tmp_path / "resumed" / "current.pth"))
    assert resumed["epoch"] == full["epoch"] == 2
    assert all(torch.equal(full["fc"][k], resumed["fc"][k]) for k in full["fc"])
    assert resumed["history"] == full["history"]
    with pytest.raises(SystemExit, match="iters_per_epoch=2, this run has iters_per_epoch=4"):
        linear_eval.main(common + ["--output-dir", str(tmp_path / "resumed"), "--batch-size", "2",
                                   "--num-workers", "0"])
