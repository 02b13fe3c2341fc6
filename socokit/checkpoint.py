"""Checkpoint files shared by pretraining and fine-tuning.

A checkpoint is a plain dict of tensors and builtins (loadable with ``weights_only=True``),
written atomically. ``current.pth`` always holds the newest complete save, so ``--auto-resume``
never meets a half-written file.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from socokit.env import environment
from socokit.retention import Retention
from socokit.fileio import atomic_torch_save, safe_torch_load

CURRENT = "current.pth"


def save_checkpoint(state: dict, output_dir: str, name: str | None = None,
                    retention: Retention | None = None) -> str:
    """Write ``state`` to ``output_dir/name`` (if given) and to ``output_dir/current.pth``.

    Both writes are atomic. The named file is written first, so ``current.pth`` only ever
    moves forward to a save that is complete on disk. The environment record of
    :func:`socokit.env.environment` is stored under ``"env"`` unless ``state`` has one.
    Returns the path of ``current.pth``.

    With ``retention`` (a :class:`socokit.retention.Retention`), old numbered checkpoints are
    pruned after ``current.pth`` has moved; the file ``current.pth`` is is never deleted.
    """
    if "env" not in state:
        state = {**state, "env": environment()}
    os.makedirs(output_dir, exist_ok=True)
    current = os.path.join(output_dir, CURRENT)
    if name and name != CURRENT:
        named = os.path.join(output_dir, name)
        atomic_torch_save(state, named)
        tmp = current + f".link-{os.getpid()}"
        try:  # a hard link costs no second write; fall back to a copy where links fail
            if os.path.lexists(tmp):
                os.unlink(tmp)
            os.link(named, tmp)
            os.replace(tmp, current)
        except OSError:
            atomic_torch_save(state, current)
    else:
        atomic_torch_save(state, current)
    if retention is not None:
        retention.apply(output_dir)
    return current


def latest_checkpoint(output_dir: str) -> str | None:
    """``output_dir/current.pth`` if it exists, else None."""
    path = os.path.join(output_dir, CURRENT)
    return path if os.path.isfile(path) else None


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint with ``weights_only=True`` (raises CheckpointError naming the file)."""
    return safe_torch_load(path, map_location="cpu")


def capture_rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states as tensors and builtins."""
    np_state = np.random.get_state()
    state = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": {"key": np_state[0], "state": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state` (missing parts are left alone)."""
    if not state:
        return
    if "python" in state:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["key"], n["state"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
