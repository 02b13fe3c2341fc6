"""End-to-end fine-tuning on tiny COCO-style data: train, checkpoint, resume, eval, 2-process DDP.

2 x 1 == 1 x 2: with RetinaNet (no random RoI sampling; each image's loss is normalised by its
own foreground count and the batch loss is the mean over images), norms without batch
statistics (FrozenBN body, GroupNorm FPN and head) and images of one size (no padding
differences), 2 processes x 1 image and 1 process x 2 images compute the same gradient up to
float summation order; the sampler gives both the same images and augmentations.
"""
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from demo.data import make_demo_data
from transfer.finetune import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("ftdata")
    return make_demo_data(str(root / "demo"), num_classes=1, images_per_class=1, coco_train=6, coco_val=4,
                          image_size=112, photos=False, progress=False)


def _argv(demo, out, *extra):
    return ["--train-images", demo["coco_train_images"], "--train-ann", demo["coco_train_json"],
            "--val-images", demo["coco_val_images"], "--val-ann", demo["coco_val_json"],
            "--backbone", "timm:test_resnet", "--norm", "bn", "--fpn-channels", "16", "--conv-dim", "16",
            "--fc-dim", "32", "--mask-dim", "16", "--min-sizes-train", "80", "96", "--max-size-train", "128",
            "--min-size-test", "96", "--max-size-test", "128", "--rpn-post-nms-top-n-train", "64",
            "--rpn-post-nms-top-n-test", "32", "--box-batch-size-per-image", "32",
            "--warmup-iters", "2", "--batch-size", "2", "--reference-batch", "2", "--base-lr", "0.01",
            "--num-workers", "0", "--device", "cpu", "--print-freq", "2", "--no-tensorboard",
            "--output-dir", str(out), *extra]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_train_checkpoint_resume_and_eval_only(demo, tmp_path):
    out = tmp_path / "a"
    metrics = main(_argv(demo, out, "--max-iter", "4", "--steps", "3", "--checkpoint-period", "2",
                         "--accum-steps", "1"))
    assert {"bbox", "segm"} <= set(metrics) and metrics["num_images"] == 4
    for name in ("metrics.json", "current.pth", "model_0000002.pth", "model_final.pth", "config.yaml", "log.txt"):
        assert (out / name).exists(), name
    final = _weights(out / "model_final.pth")
    assert torch.load(out / "model_final.pth", weights_only=True)["iteration"] == 4
    # An interrupted run: 2 loader workers, killed with SIGKILL as iteration 3 starts (newest
    # save: iteration 2), resumed with 1 worker. It ends bit for bit where the uninterrupted run
    # without workers ended: augmentation comes from the stream position, RoI sampling from the
    # restored RNG.
    resumed = tmp_path / "b"
    schedule = ("--max-iter", "4", "--steps", "3", "--checkpoint-period", "2")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "killed_run.py"), "finetune", "3",
                           *_argv(demo, resumed, *schedule, "--num-workers", "2")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert torch.load(resumed / "current.pth", weights_only=True)["iteration"] == 2
    with pytest.raises(SystemExit, match="max_iter=4, this run has max_iter=6"):
        main(_argv(demo, resumed, "--max-iter", "6", "--steps", "3"))  # another schedule: refused
    metrics_b = main(_argv(demo, resumed, *schedule, "--num-workers", "1"))
    again = _weights(resumed / "model_final.pth")
    assert final.keys() == again.keys()
    assert all(torch.equal(final[k], again[k]) for k in final), "resume diverged from the uninterrupted run"
    assert metrics_b["bbox"] == metrics["bbox"]
    # evaluation only, from the weights file
    only = main(_argv(demo, tmp_path / "c", "--eval-only", "--weights", str(out / "model_final.pth")))
    assert only["bbox"] == metrics["bbox"] and only["segm"] == metrics["segm"]
    # predictions drawn to PNG
    from transfer.visualize import main as visualize
    written = visualize(["--weights", str(out / "model_final.pth"), "--images", demo["coco_val_images"],
                         "--num", "1", "--score-thresh", "0.0", "--out", str(tmp_path / "vis")])
    assert len(written) == 1 and os.path.getsize(written[0]) > 0


def test_bad_inputs_are_reported(demo, tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        main(_argv(demo, tmp_path / "x", "--max-iter", "1", "--train-ann", str(tmp_path / "missing.json")))
    with pytest.raises(SystemExit, match="needs --weights"):
        main(_argv(demo, tmp_path / "y", "--eval-only"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="bad.pth"):
        main(_argv(demo, tmp_path / "z", "--max-iter", "1", "--init", str(bad)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _finetune_two_processes(demo, out, common):
    """transfer/finetune.py on 2 CPU processes (torchrun, gloo), 1 image each."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), os.path.join(REPO, "transfer", "finetune.py"),
           *_argv(demo, out, *common, "--batch-size", "1")]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_processes_match_one(demo, tmp_path):
    # torchvision's RetinaNet normalises each image's loss by its own positives (detectron2's
    # moving average over each process's batch would differ between 2 x 1 and 1 x 2)
    common = ["--detector", "retinanet", "--parity", "torchvision", "--norm", "backbone=frozenbn,fpn=gn,head=gn",
              "--min-sizes-train", "96", "--max-iter", "2", "--steps", "5", "--reference-batch", "2",
              "--checkpoint-period", "0"]
    single = main(_argv(demo, tmp_path / "one", *common, "--batch-size", "2"))
    _finetune_two_processes(demo, tmp_path / "two", common)
    one, two = _weights(tmp_path / "one" / "model_final.pth"), _weights(tmp_path / "two" / "model_final.pth")
    assert max((one[k].float() - two[k].float()).abs().max().item() for k in one) < 1e-5
    import json
    dist_metrics = json.load(open(tmp_path / "two" / "metrics.json"))
    assert dist_metrics["num_images"] == single["num_images"] == 4
    for task in ("bbox",):
        for key, value in single[task].items():
            assert dist_metrics[task][key] == pytest.approx(value, abs=1e-3)
    # the distributed gather gives exactly what one process computes on the same weights
    again = main(_argv(demo, tmp_path / "three", *common, "--eval-only", "--weights",
                       str(tmp_path / "two" / "model_final.pth")))
    assert again["bbox"] == dist_metrics["bbox"]


def test_solov2_two_processes_match_one(demo, tmp_path):
    """SOLOv2: 2 processes x 1 image == 1 process x 2 images. Its loss normalisers (positive masks,
    positive cells) are summed over processes, so the split does not change the gradient."""
    common = ["--detector", "solov2", "--norm", "backbone=frozenbn,fpn=gn,head=gn", "--min-sizes-train", "96",
              "--solov2", "instance_channels=16", "num_kernels=16", "mask_channels=16", "num_grids=12,10,8,6,4",
              "--max-iter", "2", "--steps", "5", "--warmup-iters", "1", "--reference-batch", "2",
              "--checkpoint-period", "1"]
    single = main(_argv(demo, tmp_path / "one", *common, "--batch-size", "2"))
    assert {"bbox", "segm"} <= set(single) and single["num_images"] == 4
    _finetune_two_processes(demo, tmp_path / "two", common)
    one, two = _weights(tmp_path / "one" / "model_final.pth"), _weights(tmp_path / "two" / "model_final.pth")
    step1 = _weights(tmp_path / "one" / "model_0000001.pth")
    assert any(not torch.equal(one[k], step1[k]) for k in one if k.startswith("ins_head."))  # it trains
    assert max((one[k].float() - two[k].float()).abs().max().item() for k in one) < 1e-5


def test_schedule_scaling_and_nan_stop():
    from socokit.training import NonFiniteLossError, make_grad_scaler
    from transfer.engine import TrainState, train_step
    from transfer.config import SolverConfig
    from transfer.solver import Schedule, build_optimizer, lr_at, resolve_schedule

    s = resolve_schedule(SolverConfig(schedule="1x"), total_batch=32)
    assert s.max_iter == 45_000 and s.steps == (30_000, 40_000) and s.warmup_iters == 500
    assert s.lr == pytest.approx(0.04) and s.factor == 0.5
    assert resolve_schedule(SolverConfig(schedule="6x"), total_batch=16).steps == (480_000, 520_000)
    explicit = resolve_schedule(SolverConfig(schedule="1x", max_iter=100, steps=(50,), scale_lr=False), 32)
    assert (explicit.max_iter, explicit.steps, explicit.lr) == (100, (50,), 0.02)
    assert lr_at(0, 0.02, (60, 80), 10) == pytest.approx(0.02 * 0.001)
    assert lr_at(10, 0.02, (60, 80), 10) == pytest.approx(0.02)
    assert lr_at(85, 0.02, (60, 80), 10) == pytest.approx(0.0002)

    class Diverged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, images, targets):
            return {"loss": self.w * float("nan")}

    model = Diverged()
    state = TrainState(optimizer=build_optimizer(model, 0.1), scaler=make_grad_scaler("cpu", "none"),
                       schedule=Schedule(max_iter=10, steps=(), warmup_iters=0, lr=0.1))
    batch = ([torch.zeros(3, 4, 4, dtype=torch.uint8)], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}])
    with pytest.raises(NonFiniteLossError, match="step 0"):
        train_step(model, [batch], state, torch.device("cpu"))
    assert model.w.item() == 1.0  # stopped before the optimizer step


def test_every_recipe_parses_and_scripts_exist():
    import glob
    from socokit.config import parse_config
    from transfer.config import FinetuneConfig
    recipes = sorted(glob.glob(os.path.join(REPO, "transfer", "configs", "*.yaml")))
    assert len(recipes) >= 10
    for path in recipes:
        cfg = parse_config(FinetuneConfig, ["--config", path])
        assert cfg.solver.max_iter_and_steps()[0] >= 500, path
        assert cfg.data.val_ann and cfg.data.train_ann, path
    scripts = sorted(set(glob.glob(os.path.join(REPO, "scripts", "finetune_*.sh")))
                     - {os.path.join(REPO, "scripts", "finetune_demo_cpu.sh")})  # needs data/demo
    assert len(scripts) >= 6
    for script in scripts:
        # PYTHON=echo prints the launch command instead of running it
        env = {**os.environ, "PYTHON": "echo", "NPROC": "2", "VARIANT": "moco"}
        out = subprocess.run(["bash", script, "some_init.pth", "--max-iter", "5"], env=env,
                             capture_output=True, text=True)
        assert out.returncode == 0, (script, out.stderr)
        words = out.stdout.split()
        config = words[words.index("--config") + 1]
        assert os.path.isfile(os.path.join(REPO, config)), (script, config)
        assert words[-2:] == ["--max-iter", "5"], (script, words)
        if "6x_scratch" not in script:
            assert words[words.index("--init") + 1] == "some_init.pth", script
        assert words[:4] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"], words
    missing = subprocess.run(["bash", os.path.join(REPO, "scripts", "finetune_mask_rcnn_R50_FPN_1x.sh")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "usage" in missing.stderr
