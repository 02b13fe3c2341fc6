"""Two-process (torchrun, gloo, CPU) tests of the pretraining loop.

* DDP gradients equal those of one process on the concatenated batch. BatchNorm makes a
  sample's output depend on the other samples of its process's batch, and SyncBatchNorm (which
  would make the statistics global) only runs on CUDA, so this test puts every BN layer in eval
  mode (running statistics): then each image's loss term is independent of the others and the
  equality is exact up to float rounding. What is tested is everything else: DDP wrapping
  (broadcast of rank 0's weights, gradient averaging), the per-process loss mean, the EMA
  update and the LARS step of ``pretrain.engine.train_step``.
* A NaN loss on one rank stops both ranks at the same step, reports step/loss/LR, exits
  non-zero and leaves the last good checkpoint as ``current.pth``.

Run as a script (``python tests/test_pretrain_ddp.py OUT IMAGES STORE`` under torchrun) it is
the worker of both tests.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "timm:test_resnet", "--image-size", "64", "--fpn-channels", "16",
        "--conv-dim", "16", "--fc-dim", "32", "--mlp-hidden-dim", "32", "--out-dim", "16",
        "--head-mode", "batched", "--num-workers", "0", "--device", "cpu", "--amp", "none",
        "--no-tensorboard", "--print-freq", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, env_extra=None, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- worker
def _grads_after_one_step(model, model_without_ddp, batch):
    """Run one engine step; return {name: grad} and {name: updated parameter}."""
    import torch
    from pretrain.engine import LoopSettings, train_step
    from pretrain.optim import build_optimizer
    from socokit.training import make_grad_scaler

    optimizer = build_optimizer(model_without_ddp, lr=0.1, weight_decay=1e-5)
    settings = LoopSettings(device=torch.device("cpu"))
    out = train_step(model, model_without_ddp, optimizer, make_grad_scaler("cpu", "none"), batch,
                     step=0, lr=0.1, tau=0.99, settings=settings)
    named = dict(model_without_ddp.named_parameters())
    grads = {k: p.grad.detach().clone() for k, p in named.items() if p.grad is not None}
    params = {k: p.detach().clone() for k, p in named.items()}
    return out["loss"], grads, params


def _eval_bn(model):
    from torch.nn.modules.batchnorm import _BatchNorm
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.eval()


def grad_worker(out_dir: str, images: str, store: str) -> None:
    import numpy as np
    import torch
    from torch.utils.data import default_collate

    from pretrain import train as pretrain_train
    from pretrain.config import PretrainConfig
    from pretrain.data import build_pretrain_dataset
    from socokit.config import parse_config
    from socokit import distributed as sdist
    from socokit.log import setup_logging

    torch.set_num_threads(1)
    cfg = parse_config(PretrainConfig, ["--data", images, "--proposals", store, *TINY])
    logger = setup_logging(None, int(os.environ["RANK"]))
    dataset = build_pretrain_dataset(images, store, cfg.data, arch=cfg.model.arch)
    np.random.seed(0)
    items = [dataset[i] for i in range(4)]  # identical on both ranks
    # Reference first, before the process group exists: one process, the whole batch of 4.
    world1 = sdist.DistInfo(0, 1, 0, torch.device("cpu"), False)
    ref = pretrain_train.build_training_model(cfg, world1, logger)
    _eval_bn(ref)
    ref_loss, ref_grads, ref_params = _grads_after_one_step(ref, ref, default_collate(items))
    # Two processes, two images each, through the same wrapping code as train.py.
    info = sdist.init_distributed("cpu")
    model = pretrain_train.build_training_model(cfg, info, logger)
    _eval_bn(model)
    ddp = pretrain_train.wrap_ddp(model, info)
    half = default_collate(items[2 * info.rank: 2 * info.rank + 2])
    loss, grads, params = _grads_after_one_step(ddp, model, half)
    if info.rank == 0:
        worst = {"loss": abs(loss - ref_loss), "num_grads": len(grads), "ref_num_grads": len(ref_grads)}
        worst["grad"] = max(float((grads[k] - ref_grads[k]).abs().max()
                                  / ref_grads[k].abs().max().clamp_min(1e-12)) for k in ref_grads)
        worst["param"] = max(float((params[k] - ref_params[k]).abs().max()) for k in ref_params)
        worst["grad_scale"] = max(float(g.abs().max()) for g in ref_grads.values())
        Path(out_dir, "result.json").write_text(json.dumps(worst))


def nan_worker(out_dir: str, images: str, store: str) -> None:
    """train.py in the existing process group; rank 1's loss becomes NaN at step 3.

    8 images / (2 ranks x 2) = 2 iterations per epoch, so epoch 1 ends with a checkpoint at
    step 2. ``main`` raises SystemExit (non-zero exit) on every rank.
    """
    from pretrain import train as pretrain_train
    from pretrain.models import SoCo_FPN

    # Rank 1's local loss becomes NaN at its 4th forward (global step 3); rank 0's stays finite.
    forward, calls = SoCo_FPN.forward, []

    def nan_at_step_3(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 4 and int(os.environ["RANK"]) == 1:
            out = dict(out, loss=out["loss"] * float("nan"))
        return out

    SoCo_FPN.forward = nan_at_step_3
    pretrain_train.main(["--data", images, "--proposals", store, "--output-dir", out_dir,
                         "--batch-size", "2", "--epochs", "3", "--warmup-epoch", "1",
                         "--save-freq", "1", *TINY])


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from test_pretrain_train import make_tiny_store
    return make_tiny_store(tmp_path_factory.mktemp("ddp_data"), n=8)


@pytest.fixture(scope="module")
def two_process_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_out")
    proc = _torchrun([str(Path(__file__).resolve()), str(out), *tiny_data])
    return out, proc


def test_ddp_gradients_equal_single_process_on_concatenated_batch(two_process_run):
    out, proc = two_process_run
    assert (out / "result.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["num_grads"] == result["ref_num_grads"] > 10
    assert result["loss"] < 1e-5
    assert result["grad"] < 2e-5, result  # relative to each tensor's largest gradient
    assert result["param"] < 1e-6, result


def test_nan_on_one_rank_stops_every_rank_and_keeps_the_last_checkpoint(two_process_run):
    from socokit.checkpoint import load_checkpoint

    out, proc = two_process_run
    out = out / "nan_run"
    assert proc.returncode != 0
    logs = [(out / "log.txt").read_text(), (out / "log.rank1.txt").read_text()]
    for log in logs:  # both ranks stopped at step 3, with the report
        assert "non-finite loss at step 3" in log and "lr=" in log, log[-2000:]
        assert "[4/6]" not in log
    assert proc.stderr.count("error: non-finite loss at step 3") == 2  # each rank exits with it
    failure = json.loads((out / "failure.json").read_text())
    assert failure["error"] == "non-finite loss" and "step 3" in failure["message"]
    ckpt = load_checkpoint(str(out / "current.pth"))
    assert (ckpt["step"], ckpt["epoch"]) == (2, 1) and len(ckpt["rng"]) == 2
    assert sorted(p.name for p in out.glob("ckpt_*.pth")) == ["ckpt_epoch_0001.pth"]


def test_resume_with_another_world_size_and_the_same_total_batch(two_process_run, tiny_data, tmp_path):
    """The documented rule (docs/resume.md): 2 processes x 2 images continue as 1 process x 4.

    The schedule is the same, so the checkpoint is accepted; the two per-rank RNG states cannot
    be mapped onto one rank, so the run reseeds and says so; it then trains to the end.
    """
    from pretrain import train as pretrain_train
    from socokit.checkpoint import load_checkpoint

    out, _ = two_process_run
    images, store = tiny_data
    os.link(out / "nan_run" / "current.pth", tmp_path / "current.pth")  # step 2 of 6, 2 ranks
    pretrain_train.main(["--data", images, "--proposals", store, "--output-dir", str(tmp_path),
                         "--batch-size", "4", "--epochs", "3", "--warmup-epoch", "1", *TINY])
    log = (tmp_path / "log.txt").read_text()
    assert "resumed from" in log and "at step 2" in log
    assert "RNG states of 2 process(es), this run has 1" in log
    ckpt = load_checkpoint(str(tmp_path / "current.pth"))
    assert (ckpt["step"], ckpt["epoch"], len(ckpt["rng"])) == (6, 3, 1)
    assert ckpt["schedule"]["world_size"] == 1 and ckpt["schedule"]["total_batch"] == 4
    with pytest.raises(SystemExit, match="peak_lr"):  # another learning rate is refused
        pretrain_train.main(["--data", images, "--proposals", store, "--output-dir", str(tmp_path),
                             "--batch-size", "4", "--epochs", "3", "--warmup-epoch", "1", "--base-lr", "2.0",
                             *TINY])


if __name__ == "__main__":  # one torchrun launch serves both tests (start-up is the cost)
    grad_worker(*sys.argv[1:4])
    nan_worker(str(Path(sys.argv[1]) / "nan_run"), *sys.argv[2:4])
