"""Cluster-scale behaviour: retention, permissions, SLURM launch, signals, environment record."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from socokit import distributed as sdist
from socokit.checkpoint import CURRENT, load_checkpoint, save_checkpoint
from socokit.config import save_config
from socokit.env import environment
from socokit.fileio import atomic_save_json, atomic_torch_save
from socokit.log import setup_logging
from socokit.proposal_store import ProposalStoreWriter, write_store
from socokit.retention import Retention, prune_checkpoints, to_delete

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def _child_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


# ---------------------------------------------------------------------------- retention

@pytest.mark.parametrize("numbers, keep_last, keep_every, dropped", [
    (range(1, 11), 2, 0, [1, 2, 3, 4, 5, 6, 7, 8]),
    (range(1, 11), 2, 4, [1, 2, 3, 5, 6, 7]),
    (range(1, 11), 0, 4, []),                     # keep_last 0: pruning off
    ([50, 100, 150, 399, 400], 2, 50, []),
    ([5000, 10000, 15000, 20000], 1, 0, [5000, 10000, 15000]),
    ([3], 5, 0, []),
])
def test_retention_policy_hand_cases(numbers, keep_last, keep_every, dropped):
    assert to_delete(list(numbers), keep_last, keep_every) == dropped


def test_retention_defaults_keep_a_400_epoch_run_small():
    # 400 epochs saved every epoch with the pretraining defaults (keep last 2, every 50).
    from pretrain.train import build_parser

    args = build_parser().parse_args([])
    kept = 400 - len(to_delete(range(1, 401), args.keep_last, args.keep_every))
    assert kept == 9  # 50, 100, ..., 400 (8 files) and 399
    assert kept * 585 / 1024 < 10  # GB at ~585 MB per SoCo_FPN checkpoint


def test_retention_refuses_negative_counts():
    with pytest.raises(ValueError, match="keep-last"):
        Retention("ckpt_epoch_", keep_last=-1)


def test_prune_never_deletes_the_file_current_names(tmp_path):
    for e in range(1, 5):
        (tmp_path / f"ckpt_epoch_{e:04d}.pth").write_bytes(b"x" * e)
    os.link(tmp_path / "ckpt_epoch_0002.pth", tmp_path / CURRENT)  # a resumed run at epoch 2
    (tmp_path / "model_final.pth").write_bytes(b"final")
    deleted = prune_checkpoints(str(tmp_path), "ckpt_epoch_", keep_last=1, keep_every=0)
    assert sorted(os.path.basename(p) for p in deleted) == ["ckpt_epoch_0001.pth", "ckpt_epoch_0003.pth"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt_epoch_0002.pth", "ckpt_epoch_0004.pth",
                                            CURRENT, "model_final.pth"]


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from socokit import checkpoint, retention
    out, where = sys.argv[1], sys.argv[2]
    policy = retention.Retention("ckpt_epoch_", keep_last=1, stale=("ckpt_iter.pth",))
    for e in (1, 2, 3):
        checkpoint.save_checkpoint({"epoch": e}, out, f"ckpt_epoch_{e:04d}.pth", retention=policy)
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    if where == "before_current":   # the numbered file is written, current.pth not moved yet
        os.link = die
    elif where == "before_prune":   # current.pth moved, old files not pruned yet
        retention.Retention.apply = die
    elif where == "inside_save":    # half-way through writing the numbered file
        checkpoint.atomic_torch_save = die
    checkpoint.save_checkpoint({"epoch": 4}, out, "ckpt_epoch_0004.pth", retention=policy)
""")


@pytest.mark.parametrize("where, current_epoch", [("before_current", 3), ("before_prune", 4),
                                                   ("inside_save", 3)])
def test_kill_between_save_and_prune_leaves_current_valid(tmp_path, where, current_epoch):
    proc = subprocess.run([PY, "-c", _KILL_SCRIPT, str(tmp_path), where], env=_child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    current = tmp_path / CURRENT
    assert load_checkpoint(str(current))["epoch"] == current_epoch
    # the restarted run prunes again after its next save: current.pth's file survives
    Retention("ckpt_epoch_", keep_last=1).apply(str(tmp_path))
    named = tmp_path / f"ckpt_epoch_{current_epoch:04d}.pth"
    assert named.exists() and os.path.samefile(named, current)
    assert load_checkpoint(str(current))["epoch"] == current_epoch
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path)) or where == "inside_save"


# -------------------------------------------------------------------------- permissions

@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_artifacts_honour_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        save_checkpoint({"w": torch.zeros(2)}, str(tmp_path / "run"), "ckpt_epoch_0001.pth")
        atomic_torch_save({"w": torch.zeros(1)}, str(tmp_path / "init.pth"))
        atomic_save_json({"a": 1}, str(tmp_path / "metrics.json"))
        save_config({"lr": 0.1}, str(tmp_path / "config.yaml"))
        write_store(str(tmp_path / "a.proposals"), ["x.jpg"], [(4, 4)], [np.zeros((1, 4), np.int32)])
        with ProposalStoreWriter(str(tmp_path / "b.proposals")) as w:
            w.add("y.jpg", (4, 4), np.zeros((2, 4), np.int32))
    finally:
        os.umask(old)
    files = [tmp_path / "run" / "ckpt_epoch_0001.pth", tmp_path / "run" / CURRENT,
             tmp_path / "init.pth", tmp_path / "metrics.json", tmp_path / "config.yaml"]
    for store in ("a.proposals", "b.proposals"):
        assert stat.S_IMODE((tmp_path / store).stat().st_mode) == dir_mode, store
        files += list((tmp_path / store).iterdir())
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == file_mode, f


# ------------------------------------------------------------------------------- SLURM

@pytest.mark.parametrize("text, hosts", [
    ("node7", ["node7"]),
    ("gpu[001-003,007]", ["gpu001", "gpu002", "gpu003", "gpu007"]),
    ("a[8-10],b1", ["a8", "a9", "a10", "b1"]),
    ("login5,gpu[09-10]-ib", ["login5", "gpu09-ib", "gpu10-ib"]),
    ("r[1-2]-n[01-02]", ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]),
])
def test_expand_nodelist(text, hosts):
    assert sdist.expand_nodelist(text) == hosts


@pytest.mark.parametrize("bad", ["gpu[1-3", "gpu1-3]", "gpu[a-b]", "gpu[5-3]"])
def test_expand_nodelist_rejects(bad):
    with pytest.raises(sdist.LaunchError):
        sdist.expand_nodelist(bad)


def test_launch_env_srun_torchrun_and_batch_step():
    srun = {"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "gpu[011-012,020]", "SLURM_JOB_ID": "4242"}
    env = sdist.launch_env(srun)
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port,
            env.launcher) == (5, 8, 1, "gpu011", "24242", "srun")
    # the step's own task count and node list win over the job's
    env = sdist.launch_env({**srun, "SLURM_STEP_NUM_TASKS": "6", "SLURM_STEP_NODELIST": "gpu020"})
    assert (env.world_size, env.master_addr) == (6, "gpu020")
    # torchrun's variables win over srun's (srun torchrun ...)
    env = sdist.launch_env({**srun, "RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3",
                            "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert (env.rank, env.world_size, env.launcher) == (3, 16, "torchrun")
    # the batch script itself (no step id): a single process
    batch = {k: v for k, v in srun.items() if k != "SLURM_STEP_ID"}
    assert sdist.launch_env(batch).world_size == 1
    with pytest.raises(sdist.LaunchError, match="outside"):
        sdist.launch_env({**srun, "SLURM_PROCID": "8"})


_SRUN_CHILD = textwrap.dedent("""
    import torch, torch.distributed as dist
    from socokit import distributed as sdist
    info = sdist.init_distributed("cpu", timeout_minutes=2)
    t = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(t)
    got = sdist.gather_object({"rank": info.rank})
    assert got == ([{"rank": 0}, {"rank": 1}] if info.rank == 0 else None), got
    print(info.rank, info.world_size, info.local_rank, int(t.item()), flush=True)
    sdist.cleanup_distributed()
""")


def test_plain_srun_launch_forms_a_process_group(tmp_path):
    # (and gather_object delivers to rank 0 only) two tasks as `srun --ntasks 2 python ...` would start them on node "localhost"
    procs = []
    for rank in range(2):
        env = _child_env(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_ID="0",
                         SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost",
                         SLURM_JOB_ID=str(31000 + os.getpid() % 1000))
        procs.append(subprocess.Popen([PY, "-c", _SRUN_CHILD], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert sorted(o.split() for o, _ in outs) == [["0", "2", "0", "3"], ["1", "2", "1", "3"]]


# ------------------------------------------------------------------- environment record

def test_environment_record_in_checkpoint_and_log(tmp_path):
    record = environment(with_torch=True)
    json.dumps(record)  # plain builtins only
    assert record["torch"]["version"] == torch.__version__
    assert record["packages"]["numpy"] == np.__version__
    save_checkpoint({"w": torch.ones(1)}, str(tmp_path), "ckpt_epoch_0001.pth")
    ckpt = load_checkpoint(str(tmp_path / CURRENT))  # weights_only=True
    assert ckpt["env"]["torch"]["version"] == torch.__version__
    assert ckpt["env"]["toolkit"] == record["toolkit"]
    setup_logging(str(tmp_path), 0, name="soco.envtest")
    first = (tmp_path / "log.txt").read_text().splitlines()[0]
    assert json.loads(first.split("environment: ", 1)[1])["python"] == record["python"]


def test_env_module_prints_json():
    proc = subprocess.run([PY, "-m", "socokit.env", "--json"], env=_child_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["torch"]["version"] == torch.__version__ and "cudnn" in record["torch"]


# --------------------------------------------------------------------------- signals

TINY = ["--backbone", "timm:test_resnet", "--image-size", "64", "--fpn-channels", "16",
        "--conv-dim", "16", "--fc-dim", "32", "--mlp-hidden-dim", "32", "--out-dim", "16",
        "--head-mode", "batched", "--num-workers", "0", "--device", "cpu", "--amp", "none",
        "--no-tensorboard", "--print-freq", "1", "--batch-size", "2", "--epochs", "2",
        "--warmup-epoch", "1"]


def _pretrain_cmd(data, out):
    images, store = data
    return [PY, str(REPO / "pretrain" / "train.py"), "--data", images, "--proposals", store,
            "--output-dir", str(out), *TINY]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from test_pretrain_train import make_tiny_store

    return make_tiny_store(tmp_path_factory.mktemp("cluster_data"))


def test_signal_saves_exits_for_requeue_and_resumes_exactly(tiny_data, tmp_path):
    from socokit.preemption import REQUEUE_EXIT_CODE

    full, cut = tmp_path / "full", tmp_path / "cut"
    ref = subprocess.Popen(_pretrain_cmd(tiny_data, full), env=_child_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(_pretrain_cmd(tiny_data, cut), env=_child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (cut / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # as `scancel --signal=USR1` / `--signal=USR1@T` would
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, err
    saved = load_checkpoint(str(cut / CURRENT))["step"]
    assert 1 <= saved < 8  # 2 epochs x 4 iterations
    assert "received SIGUSR1" in (cut / "log.txt").read_text()
    restart = subprocess.run(_pretrain_cmd(tiny_data, cut), env=_child_env(), capture_output=True,
                             text=True, timeout=600)
    assert restart.returncode == 0, restart.stderr
    assert ref.wait(timeout=600) == 0, ref.stderr.read()
    a, b = load_checkpoint(str(full / CURRENT)), load_checkpoint(str(cut / CURRENT))
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6, msg=k)


# ---------------------------------------------------------------- proposals at scale

SS_BACKEND = "opencv-fast"
STORE_ARRAYS = ("boxes.npy", "offsets.npy", "sizes.npy", "paths.bin", "path_offsets.npy")


def _gen(*args):
    from selective_search import generate_proposals

    generate_proposals.main(["--backend", SS_BACKEND, *map(str, args)])


def _assert_same_store(a, b):
    """Byte-for-byte equal arrays, and equal metadata up to the creation time."""
    for name in STORE_ARRAYS:
        assert (Path(a) / name).read_bytes() == (Path(b) / name).read_bytes(), name
    ma, mb = (json.loads((Path(p) / "meta.json").read_text()) for p in (a, b))
    ma.pop("created"), mb.pop("created")
    assert ma == mb


@pytest.fixture(scope="module")
def ss_images(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("ss_cluster") / "train"
    rng = np.random.default_rng(1)
    for c in range(3):
        (root / f"n{c:08d}").mkdir(parents=True)
        for i in range(4):
            img = np.zeros((60, 80, 3), np.uint8)
            for _ in range(4):  # a few flat rectangles: real regions to find
                x, y = rng.integers(0, 60), rng.integers(0, 40)
                img[y:y + 20, x:x + 20] = rng.integers(0, 255, 3)
            Image.fromarray(img).save(root / f"n{c:08d}" / f"img_{i}.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def ss_single(ss_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("ss_cluster_single") / "all.proposals"
    _gen("--image-root", ss_images, "--output", out, "--chunk-size", 5)
    return out


def test_file_list_written_once_gives_the_same_store(ss_images, ss_single, tmp_path):
    from socokit.images import find_images

    listing = tmp_path / "files.txt"
    _gen("--image-root", ss_images, "--write-file-list", listing)
    assert listing.read_text().splitlines() == find_images(str(ss_images))
    out = tmp_path / "listed.proposals"
    _gen("--image-root", ss_images, "--file-list", listing, "--output", out, "--chunk-size", 5)
    _assert_same_store(ss_single, out)


@pytest.mark.parametrize("content, message", [("a.jpg\nb.jpg\na.jpg\n", "listed twice"),
                                              ("/abs/a.jpg\n", "absolute"), ("\n\n", "no images")])
def test_file_list_refuses_bad_lists(ss_images, tmp_path, content, message):
    (tmp_path / "l.txt").write_text(content)
    with pytest.raises(SystemExit, match=message):
        _gen("--image-root", ss_images, "--file-list", tmp_path / "l.txt", "--output",
             tmp_path / "x.proposals")


_SLOW_GEN = ("import sys, time\n"
             "from selective_search import generate_proposals as g\n"
             "fast = g.propose_one\n"
             "g.propose_one = lambda p: (time.sleep(0.3), fast(p))[1]\n"
             "g.main(sys.argv[1:])\n")


def test_a_killed_workers_chunks_are_taken_over(ss_images, ss_single, tmp_path):
    out, work = tmp_path / "claimed.proposals", tmp_path / "claimed.work"
    common = ["--backend", SS_BACKEND, "--image-root", str(ss_images), "--output", str(out),
              "--work-dir", str(work), "--chunk-size", "2", "--num-shards", "2", "--steal"]
    procs = [subprocess.Popen([PY, "-c", _SLOW_GEN, *common, "--shard-id", str(s)], cwd=REPO,
                              env=_child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for s in (0, 1)]
    survivor, victim = procs
    locks = work / "locks"
    deadline = time.time() + 300
    held = None
    while held is None and time.time() < deadline and victim.poll() is None:
        for f in (os.listdir(locks) if locks.is_dir() else []):
            try:
                if json.loads((locks / f).read_text())["pid"] == victim.pid:
                    held = f
            except (OSError, ValueError, KeyError):
                pass
        time.sleep(0.02)
    assert held is not None, "the second worker never claimed a chunk"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert (locks / held).exists()  # its lock is left behind, as after a node failure
    _, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, err
    assert out.is_dir() and not work.exists()  # the survivor merged and cleaned up
    _assert_same_store(ss_single, out)


def test_hidden_ximgproc_fails_at_start_with_the_fix(ss_images, tmp_path, monkeypatch):
    import cv2

    monkeypatch.delattr(cv2, "ximgproc")  # as when a plain opencv-python shadows contrib
    out = tmp_path / "none.proposals"
    with pytest.raises(SystemExit, match=r"self-test.*cv2\.ximgproc is missing.*lvis.*"
                                         r"pip install opencv-contrib-python-headless"):
        _gen("--image-root", ss_images, "--output", out)
    assert not out.exists()
    assert not list((tmp_path / "none.proposals.work" / "chunks").glob("*.npz"))


def test_a_chunk_of_mostly_failing_images_stops_the_run(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(12):
        if i < 4:
            Image.fromarray(np.full((40, 40, 3), 30 * i, np.uint8)).save(root / f"{i:02d}.jpg")
        else:
            (root / f"{i:02d}.jpg").write_bytes(b"not an image")
    out = tmp_path / "bad.proposals"
    with pytest.raises(SystemExit, match=r"8 of 12 images failed .*chunk 0.*most common cause \(8x\)"):
        _gen("--image-root", root, "--output", out, "--chunk-size", 12)
    assert not list((tmp_path / "bad.proposals.work" / "chunks").glob("*.npz"))
    assert not list((tmp_path / "bad.proposals.work" / "locks").glob("*.lock"))
    _gen("--image-root", root, "--output", out, "--chunk-size", 12, "--max-fail-fraction", "1")
    from socokit.proposal_store import ProposalStore

    assert len(ProposalStore.open(str(out))) == 4


# ------------------------------------------------------------------ sbatch templates

_STUBS = {
    # srun: drop its own options, run the command (one task is enough to check the command)
    "srun": 'while [[ "$1" == --* ]]; do shift; done; exec "$@"\n',
    # torchrun: check the c10d rendezvous flags, then run the script with the stub python
    "torchrun": 'echo "$@" > "$STUB_LOG/torchrun.txt"\n'
                'while [[ "$1" != *.py ]]; do shift; done; exec python "$@"\n',
    # python: record the command; with STUB_WAIT, run until a signal arrives, then exit 75 as
    # the training entry points do after saving
    "python": 'printf "%s\\n" "$@" > "$STUB_LOG/python.txt"\n'
              'if [ -n "${STUB_WAIT:-}" ]; then\n'
              '  trap \'echo TERM > "$STUB_LOG/signal.txt"; kill %1; exit 75\' TERM\n'
              '  trap \'echo USR1 > "$STUB_LOG/signal.txt"; kill %1; exit 75\' USR1\n'
              '  sleep 60 >/dev/null 2>&1 & wait\nfi\nexit "${STUB_RC:-0}"\n',
    "scontrol": 'echo "$@" >> "$STUB_LOG/scontrol.txt"\n',
}


def _template_env(tmp_path, **extra):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in _STUBS.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    env = _child_env(PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_LOG=str(log),
                     SOCO_ROOT=str(REPO), SLURM_JOB_ID="777", SLURM_NNODES="2",
                     SLURM_ARRAY_TASK_ID="5", SLURM_ARRAY_TASK_MIN="0",
                     SLURM_ARRAY_TASK_COUNT="64", SLURM_CPUS_PER_TASK="32", DATA="/d/train",
                     PROPOSALS="/d/train.proposals", INIT="/d/init.pth", COCO="/d/coco",
                     IMAGES="/d/train", LIST="/d/files.txt", OUT=str(tmp_path / "out"), **extra)
    return env, log


def _parse_entry(script: str, argv: list[str]):
    """The entry point's validated configuration, flattened (attribute per option)."""
    import argparse

    from socokit.config import parse_config

    if script.endswith("pretrain/train.py"):
        from pretrain.config import PretrainConfig as config
    elif script.endswith("transfer/finetune.py"):
        from transfer.config import FinetuneConfig as config
    else:
        assert script.endswith("selective_search/generate_proposals.py"), script
        from selective_search.config import ProposalConfig as config
    return argparse.Namespace(**parse_config(config, argv).to_dict())


@pytest.mark.parametrize("template", ["pretrain_torchrun", "pretrain_srun", "finetune_torchrun",
                                      "proposals_array"])
@pytest.mark.parametrize("rc", [0, 75])
def test_sbatch_templates_run_valid_commands_and_requeue(tmp_path, monkeypatch, template, rc):
    env, log = _template_env(tmp_path, STUB_RC=str(rc))
    proc = subprocess.run(["bash", str(REPO / "scripts" / "slurm" / f"{template}.sbatch")],
                          env=env, capture_output=True, text=True, timeout=60)
    argv = (log / "python.txt").read_text().splitlines()
    monkeypatch.chdir(REPO)  # recipes are named relative to the repository, as in the templates
    args = _parse_entry(argv[0], argv[1:])
    requeued = (log / "scontrol.txt").read_text().split() if (log / "scontrol.txt").exists() else []
    if template == "proposals_array":
        assert proc.returncode == rc, proc.stderr
        assert (args.shard_id, args.num_shards, args.steal, args.file_list) == (5, 64, True, "/d/files.txt")
        return
    assert (args.dist_timeout, args.save_on_signal) == (60, True)
    if template.endswith("torchrun"):
        rendezvous = (log / "torchrun.txt").read_text().split()
        assert rendezvous[rendezvous.index("--rdzv-backend") + 1] == "c10d"
        assert rendezvous[rendezvous.index("--rdzv-id") + 1] == "777"
        assert rendezvous[rendezvous.index("--nnodes") + 1] == "2"
    if rc == 75:  # the run saved after a signal: the job is requeued and the script succeeds
        assert proc.returncode == 0 and requeued == ["requeue", "777"], proc.stdout + proc.stderr
    else:
        assert proc.returncode == 0 and requeued == [], proc.stderr


@pytest.mark.parametrize("template, forwarded", [("pretrain_torchrun", "TERM"), ("pretrain_srun", "USR1"),
                                                 ("finetune_torchrun", "TERM")])
def test_sbatch_template_forwards_the_warning_signal_and_requeues(tmp_path, template, forwarded):
    # `#SBATCH --signal=B:USR1@300`: SLURM signals the batch shell, which must pass it on to
    # the step (srun forwards it to the tasks) and requeue once the run has saved and exited
    env, log = _template_env(tmp_path, STUB_WAIT="1")
    proc = subprocess.Popen(["bash", str(REPO / "scripts" / "slurm" / f"{template}.sbatch")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (log / "python.txt").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # let the stub install its traps
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert (log / "signal.txt").read_text().strip() == forwarded, out + err
    assert (log / "scontrol.txt").read_text().split() == ["requeue", "777"]
    assert proc.returncode == 0, out + err


class _Quadratic(torch.nn.Module):
    """A detector stand-in: ``model(images, targets)`` returns a loss dict."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, images, targets):
        x = torch.stack([img.mean(dim=(1, 2)) for img in images])  # [N, 3]
        return {"loss_quad": ((x * self.w).sum(1) - 1.0).pow(2).mean()}


def _finetune_run(out, signal_at=None, start=None):
    from socokit.preemption import PreemptionWatcher
    from transfer.engine import TrainState, train
    from transfer.solver import Schedule

    torch.manual_seed(0)
    model = _Quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = TrainState(optimizer=opt, scaler=torch.amp.GradScaler("cpu", enabled=False),
                       schedule=Schedule(max_iter=6, steps=(4,), warmup_iters=0, lr=0.1))
    if start is not None:
        model.load_state_dict(start["model"])
        opt.load_state_dict(start["optimizer"])
        state.iteration = start["iteration"]

    def batches():
        g = torch.Generator().manual_seed(1)
        for i in range(100):
            if i == signal_at:
                os.kill(os.getpid(), signal.SIGUSR1)  # arrives while this batch trains
            yield [torch.rand(3, 4, 4, generator=g)], [{"labels": torch.tensor([1])}]

    data = batches()
    for _ in range(state.iteration):  # the stream position of a resumed run
        next(data)
    with PreemptionWatcher(("SIGUSR1",)) as watcher:
        train(model, model, data, state, torch.device("cpu"), output_dir=str(out),
              checkpoint_period=0, print_freq=100, retention=Retention("model_", 1, 0),
              preemption=watcher)
    return model


def test_finetune_loop_saves_on_signal_and_resumes_exactly(tmp_path):
    from socokit.preemption import Preempted

    reference = _finetune_run(tmp_path / "full")
    with pytest.raises(Preempted, match="SIGUSR1.*iteration 3"):
        _finetune_run(tmp_path / "cut", signal_at=2)
    ckpt = load_checkpoint(str(tmp_path / "cut" / CURRENT))
    assert ckpt["iteration"] == 3 and (tmp_path / "cut" / "model_0000003.pth").exists()
    resumed = _finetune_run(tmp_path / "cut", start=ckpt)
    assert torch.equal(resumed.w, reference.w)
    assert sorted(os.listdir(tmp_path / "cut")) == [CURRENT, "model_0000003.pth", "model_final.pth"]


def test_cluster_doc_shows_the_templates_verbatim():
    doc = (REPO / "docs" / "cluster.md").read_text()
    templates = sorted((REPO / "scripts" / "slurm").glob("*.sbatch"))
    assert len(templates) == 4
    for t in templates:
        assert t.read_text().rstrip("\n") in doc, f"docs/cluster.md is out of date for {t.name}"


# ------------------------------------------------------------------------ evaluation

def _federated_set():
    """Category 1 is annotated in image 1, declared absent (negative) in image 2 and not
    mentioned in image 3; category 2 is annotated in image 3."""
    box = {"bbox": [10.0, 10.0, 40.0, 40.0], "area": 1600.0, "iscrowd": 0,
           "segmentation": [[10, 10, 50, 10, 50, 50, 10, 50]]}
    images = [{"id": i, "height": 100, "width": 100, "coco_url": f"http://x/val2017/{i:012d}.jpg",
               "neg_category_ids": [1] if i == 2 else [], "not_exhaustive_category_ids": []}
              for i in (1, 2, 3)]
    anns = [dict(box, id=1, image_id=1, category_id=1), dict(box, id=2, image_id=3, category_id=2)]
    cats = [{"id": 1, "name": "a", "frequency": "f"}, {"id": 2, "name": "b", "frequency": "c"}]
    dets = [{"image_id": 1, "category_id": 1, "bbox": [10.0, 10.0, 40.0, 40.0], "score": 0.5},
            {"image_id": 2, "category_id": 1, "bbox": [10.0, 10.0, 40.0, 40.0], "score": 0.9},
            {"image_id": 3, "category_id": 1, "bbox": [60.0, 60.0, 30.0, 30.0], "score": 0.95},
            {"image_id": 3, "category_id": 2, "bbox": [10.0, 10.0, 40.0, 40.0], "score": 0.7}]
    return {"images": images, "annotations": anns, "categories": cats}, dets


def test_lvis_and_coco_scoring_of_a_hand_computed_federated_set():
    from transfer.data.annotations import build_api, validate_dataset
    from transfer.evaluation import coco_metrics, lvis_metrics

    data, dets = _federated_set()
    data, _ = validate_dataset(data, "federated.json", kind="lvis")
    api = build_api(data, "lvis")
    # LVIS: the image-3 detection of category 1 is not scored (1 is neither present nor
    # negative there); category 1 ranks FP (0.9) then TP (0.5): precision 1/2 at recall 1;
    # category 2: one TP. Mean over categories: (0.5 + 1) / 2.
    lvis = lvis_metrics(api, dets, "bbox", [1, 2, 3])
    assert lvis["AP"] == pytest.approx(75.0, abs=1e-4)
    assert lvis["APf"] == pytest.approx(50.0, abs=1e-4) and lvis["APc"] == pytest.approx(100.0, abs=1e-4)
    assert lvis["APr"] is None and lvis["APs"] is None and lvis["APl"] is None
    # COCO rules score every detection: category 1 ranks FP, FP, TP: precision 1/3 at recall 1
    coco = coco_metrics(build_api(data, "coco"), dets, "bbox", [1, 2, 3])
    assert coco["AP"] == pytest.approx(100 * (1 / 3 + 1) / 2, abs=1e-4)
