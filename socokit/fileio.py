"""Atomic writes and safe checkpoint loading.

Every artifact the toolkit writes goes through :func:`atomic_write`: a temporary file in the
destination folder, flushed and fsynced, then ``os.replace``-d over the target. A crash leaves
either the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
import zipfile


class CheckpointError(Exception):
    """A checkpoint file is missing, truncated, not a checkpoint, or unsafe to load."""


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb"):
    """Open a temporary file next to ``path``; on success rename it onto ``path``.

    Yields:
        A file object opened with ``mode`` ("wb" or "w").
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save_json(obj, path: str, indent: int = 2) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=indent, sort_keys=False)
        f.write("\n")


def atomic_torch_save(obj, path: str) -> None:
    import torch  # imported lazily: the proposal stage's CLIs start faster without torch

    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def safe_torch_load(path: str, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with errors that name the file.

    Raises:
        CheckpointError: the file is missing, empty, truncated, not a torch checkpoint, or
            holds objects that ``weights_only`` refuses (arbitrary pickled classes).
    """
    import torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: file is empty")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise CheckpointError(
                f"{path}: refused by weights_only loading (it holds objects other than tensors and "
                f"plain containers): {first}") from e
        raise CheckpointError(f"{path}: not a torch checkpoint (unpickling failed: {first})") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {msg}") from e


def check_writable_dir(path: str) -> str:
    """Create ``path`` if needed and check that files can be written in it.

    Raises:
        SystemExit: naming the folder, when it cannot be created or written.
    """
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SystemExit(f"error: output folder {path!r} is not writable: {e.strerror or e}") from e
    return path
