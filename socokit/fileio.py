"""Atomic writes and safe checkpoint loading.

Every artifact the toolkit writes goes through :func:`atomic_write`: a temporary file in the
destination folder, flushed and fsynced, then ``os.replace``-d over the target. A crash leaves
either the old file or the new one, never half of one.

Permissions: ``tempfile.mkstemp`` / ``mkdtemp`` create ``0600`` files and ``0700`` folders
whatever the umask, which on shared storage hides checkpoints and proposal stores from
colleagues and from containers running as other users. Every temporary file or folder that
becomes an artifact is therefore re-moded to what ``open()`` / ``os.makedirs`` would have
given it: ``0666 & ~umask`` for files, ``0777 & ~umask`` for folders (:func:`file_mode`,
:func:`make_temp_dir`).
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
import zipfile

from socokit.errors import CheckpointError, OutputPathError  # noqa: F401  (CheckpointError re-exported)


def current_umask() -> int:
    """The process umask, read without changing it where the kernel reports it (Linux >= 4.7).

    Falls back to setting and restoring it (not atomic with respect to other threads, but
    the toolkit only calls it from its main thread).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode a plain ``open(path, "w")`` would give a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Mode ``os.makedirs`` would give a new folder: ``0o777 & ~umask``."""
    return 0o777 & ~current_umask()


def make_temp_dir(prefix: str, dir: str) -> str:
    """``tempfile.mkdtemp`` whose folder gets the umask's mode (not ``0700``) at once.

    Use it for folders that are renamed into place as artifacts (proposal stores).
    """
    tmp = tempfile.mkdtemp(prefix=prefix, dir=dir)
    os.chmod(tmp, dir_mode())
    return tmp


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb"):
    """Open a temporary file next to ``path``; on success rename it onto ``path``.

    The file ends up with mode ``0o666 & ~umask``, as if created by ``open``.

    Yields:
        A file object opened with ``mode`` ("wb" or "w").
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, file_mode())  # mkstemp's 0600 would ignore the umask
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
        OutputPathError: naming the folder, when it cannot be created or written.
    """
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputPathError(f"output folder {path!r} is not writable: {e.strerror or e}") from e
    return path
