"""Sharded, resumable proposal generation: chunk files in a work folder and their merge.

The sorted image list is cut into fixed chunks of ``chunk_size`` images. Chunk ``k`` belongs
to shard ``k % num_shards``, so chunks do not depend on how many shards run: a job can be
restarted with a different shard count and still reuse every finished chunk. Each chunk is
one ``.npz`` file written atomically (temp file + rename): a killed process loses at most
the chunks it was working on, and a restart skips every chunk file that exists.

Work folder layout::

    manifest.json            {"job": image list digest, backend + params, chunk size (checked
                             on restart), "image_root": ..., "num_images": ..., "meta": ...}
    chunks/chunk_0000012.npz paths [n] str, sizes int32 [n, 2], counts int64 [n],
                             boxes int32 [sum(counts), 4], ok bool [n], reasons [n] str
    locks/chunk_0000012.lock {"host", "pid", "time"} of the worker processing chunk 12

Claiming: before processing chunk ``k`` a worker creates ``locks/chunk_k.lock`` with
``O_CREAT | O_EXCL`` (atomic on local file systems and on NFSv3+/Lustre/GPFS), refreshes its
mtime after every image, and deletes it once the chunk file is written. A lock is *stale* when
its mtime is older than the lock timeout, or when its owner ran on this host and that process
no longer exists; a stale lock is removed and the chunk claimed again. With ``--steal`` a
worker that has finished its own shard goes on with other shards' unclaimed or stale chunks,
so the chunks of a dead node are picked up without a manual rerun. Two workers that both break
the same stale lock at once may process one chunk twice: harmless, since a chunk's content is
a function of its images only and its file is written atomically.

The merge reads the chunks in order and publishes the store atomically, so the store is
byte-identical whether it was made in one go, sharded, or killed and restarted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import tempfile
import time
import zipfile

import numpy as np

from socokit.errors import WorkFolderError
from socokit.fileio import atomic_save_json, atomic_write
from socokit.proposal_store import ProposalStore, write_store_arrays

MANIFEST = "manifest.json"
CHUNK_DIR = "chunks"
LOCK_DIR = "locks"


def paths_digest(relpaths: list[str]) -> str:
    """SHA-256 of the ordered image list (detects a changed input folder on restart)."""
    h = hashlib.sha256()
    for p in relpaths:
        h.update(p.encode("utf-8") + b"\0")
    return h.hexdigest()


def num_chunks(num_images: int, chunk_size: int) -> int:
    return (num_images + chunk_size - 1) // chunk_size


def chunk_slice(k: int, num_images: int, chunk_size: int) -> slice:
    return slice(k * chunk_size, min((k + 1) * chunk_size, num_images))


def shard_chunks(total_chunks: int, shard_id: int, num_shards: int) -> list[int]:
    """Chunks of one shard: ``k % num_shards == shard_id`` (round robin balances load)."""
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard id {shard_id} outside 0..{num_shards - 1}")
    return list(range(shard_id, total_chunks, num_shards))


def chunk_path(work_dir: str, k: int) -> str:
    return os.path.join(work_dir, CHUNK_DIR, f"chunk_{k:07d}.npz")


def missing_chunks(work_dir: str, total_chunks: int) -> list[int]:
    """Chunk indices whose file does not exist yet."""
    folder = os.path.join(work_dir, CHUNK_DIR)
    present = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    return [k for k in range(total_chunks) if f"chunk_{k:07d}.npz" not in present]


def prepare_work_dir(work_dir: str, manifest: dict) -> None:
    """Writes the manifest, or checks that an existing one describes the same job.

    Only ``manifest["job"]`` (image list digest, backend, parameters, chunk size) is
    compared; other keys (the image root, which may be mounted elsewhere on each machine)
    are informative.

    Raises:
        WorkFolderError: the work folder belongs to a different job (other images, backend,
            parameters or chunk size); its chunks would mix two runs.
    """
    path = os.path.join(work_dir, MANIFEST)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise WorkFolderError(f"{path}: unreadable work-folder manifest ({e}); "
                                  "delete the work folder to start over") from e
        old_job, new_job = old.get("job", {}), manifest.get("job", {})
        diff = sorted(k for k in set(old_job) | set(new_job) if old_job.get(k) != new_job.get(k))
        if diff:
            raise WorkFolderError(
                f"work folder {work_dir} holds chunks of a different job (differs in: "
                f"{', '.join(diff)}); use another --work-dir or delete this one")
        return
    os.makedirs(os.path.join(work_dir, CHUNK_DIR), exist_ok=True)
    atomic_save_json(manifest, path)


def write_chunk(path: str, relpaths: list[str], results: list[tuple]) -> None:
    """Writes one chunk file atomically.

    Args:
        path: destination ``.npz``.
        relpaths: the chunk's n image paths, in order.
        results: n tuples ``(size_hw | None, boxes_xyxy int32 [K, 4] | None, reason | None)``;
            ``size_hw is None`` marks an unreadable image whose ``reason`` says why.
    """
    ok = np.array([r[0] is not None for r in results], dtype=bool)
    sizes = np.array([r[0] if r[0] is not None else (0, 0) for r in results],
                     dtype=np.int32).reshape(-1, 2)
    box_list = [np.asarray(r[1], dtype=np.int32).reshape(-1, 4) if r[0] is not None
                else np.zeros((0, 4), np.int32) for r in results]
    counts = np.array([len(b) for b in box_list], dtype=np.int64)
    boxes = np.concatenate(box_list) if box_list else np.zeros((0, 4), np.int32)
    reasons = np.array([r[2] or "" for r in results], dtype=str)
    with atomic_write(path, "wb") as f:
        np.savez(f, paths=np.array(relpaths, dtype=str), sizes=sizes, counts=counts,
                 boxes=boxes, ok=ok, reasons=reasons)


CHUNK_KEYS = ("paths", "sizes", "counts", "boxes", "ok", "reasons")


def read_chunk(path: str, keys: tuple[str, ...] = CHUNK_KEYS) -> dict:
    """Loads (some of) the arrays of a chunk file.

    Raises:
        WorkFolderError: the file is unreadable (delete it and rerun to regenerate it).
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in keys}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise WorkFolderError(f"chunk file {path} is unreadable ({e}); delete it and rerun "
                              "the generation to regenerate it") from e


def merge_chunks(work_dir: str, total_chunks: int, out_path: str, meta: dict) -> ProposalStore:
    """Builds the final store from every chunk (atomic publish; O(chunk) RAM for boxes).

    Unreadable images are left out of the store and listed in ``meta["unreadable"]``.
    Boxes are copied into a temporary memory-mapped file first, so RAM stays flat even for
    a raw (unfiltered) ImageNet store of several GB.

    Raises:
        WorkFolderError: chunks are missing (their shards have not finished) or unreadable.
    """
    missing = missing_chunks(work_dir, total_chunks)
    if missing:
        raise WorkFolderError(f"cannot merge: {len(missing)} of {total_chunks} chunks are not "
                              f"finished yet (first missing: {chunk_path(work_dir, missing[0])}); "
                              "run the remaining shards first")
    counts_list, sizes_list, paths, unreadable = [], [], [], []
    for k in range(total_chunks):  # pass 1: everything but the boxes
        c = read_chunk(chunk_path(work_dir, k), ("paths", "sizes", "counts", "ok", "reasons"))
        ok = c["ok"]
        counts_list.append(c["counts"][ok])
        sizes_list.append(c["sizes"][ok])
        paths.extend(c["paths"][ok].tolist())
        unreadable.extend({"path": p, "reason": r}
                          for p, r in zip(c["paths"][~ok].tolist(), c["reasons"][~ok].tolist()))
    counts = np.concatenate(counts_list) if counts_list else np.zeros(0, np.int64)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    encoded = [p.encode("utf-8") for p in paths]
    path_offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=path_offsets[1:])
    paths_bin = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    fd, tmp_boxes = tempfile.mkstemp(prefix=".merge-boxes.", suffix=".npy", dir=work_dir)
    os.close(fd)
    try:
        boxes = np.lib.format.open_memmap(tmp_boxes, mode="w+", dtype=np.int32,
                                          shape=(int(offsets[-1]), 4))
        pos = 0
        for k in range(total_chunks):  # pass 2: boxes of readable images, in order
            c = read_chunk(chunk_path(work_dir, k), ("counts", "boxes", "ok"))
            keep = np.repeat(c["ok"], c["counts"])
            chunk_boxes = c["boxes"][keep]
            boxes[pos:pos + len(chunk_boxes)] = chunk_boxes
            pos += len(chunk_boxes)
        boxes.flush()
        meta = dict(meta, unreadable=unreadable, num_unreadable=len(unreadable))
        sizes = np.concatenate(sizes_list) if sizes_list else np.zeros((0, 2), np.int32)
        store = write_store_arrays(out_path, boxes=boxes, offsets=offsets, sizes=sizes,
                                   paths_bin=paths_bin, path_offsets=path_offsets, meta=meta)
        del boxes
    finally:
        os.unlink(tmp_boxes)
    return store


# ------------------------------------------------------------------------------ claiming

def lock_path(work_dir: str, k: int) -> str:
    return os.path.join(work_dir, LOCK_DIR, f"chunk_{k:07d}.lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def lock_is_stale(path: str, timeout_s: float) -> bool:
    """True if the lock's owner is gone (same host, dead pid) or silent for ``timeout_s``."""
    try:
        age = time.time() - os.stat(path).st_mtime
        with open(path) as f:
            owner = json.load(f)
    except FileNotFoundError:
        return False  # released meanwhile: not ours to break
    except (OSError, ValueError):
        owner = {}  # half-written by a worker killed while creating it: judge by age
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        if not _pid_alive(owner["pid"]):
            return True
    return age > timeout_s


def try_claim(work_dir: str, k: int, timeout_s: float) -> bool:
    """Create chunk ``k``'s lock exclusively (breaking a stale one); True if we hold it."""
    path = lock_path(work_dir, k)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            if not lock_is_stale(path, timeout_s):
                return False
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            continue
        except OSError as e:  # a read-only or full work folder is a user error, not a race
            if e.errno in (errno.EROFS, errno.ENOSPC, errno.EACCES):
                raise SystemExit(f"error: cannot create lock {path}: {e.strerror}") from e
            raise
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}, f)
        return True
    return False


def touch_lock(work_dir: str, k: int) -> None:
    """Heartbeat: refresh the mtime of a lock we hold."""
    try:
        os.utime(lock_path(work_dir, k))
    except FileNotFoundError:
        pass


def release(work_dir: str, k: int) -> None:
    try:
        os.unlink(lock_path(work_dir, k))
    except FileNotFoundError:
        pass


def claim_order(total_chunks: int, shard_id: int, num_shards: int, steal: bool) -> list[int]:
    """This shard's chunks first; with ``steal`` then every other chunk, starting after ours
    (so idle workers spread over the remaining shards instead of all piling onto shard 0)."""
    mine = shard_chunks(total_chunks, shard_id, num_shards)
    if not steal:
        return mine
    others = [k for s in range(1, num_shards) for k in
              shard_chunks(total_chunks, (shard_id + s) % num_shards, num_shards)]
    return mine + others


def claim_chunks(work_dir: str, order: list[int], timeout_s: float, poll_s: float = 5.0,
                 wait: bool = False, on_wait=None):
    """Yield the chunks of ``order`` this process claims, skipping finished ones.

    Chunks locked by a live worker are skipped and revisited; with ``wait`` the generator
    polls every ``poll_s`` seconds until each of them is finished or its lock goes stale
    (then claims it), otherwise it stops once only such chunks are left. The caller must
    write the chunk file and :func:`release` the lock after each yielded chunk.
    """
    pending = list(order)
    while pending:
        present = set(os.listdir(os.path.join(work_dir, CHUNK_DIR))) \
            if os.path.isdir(os.path.join(work_dir, CHUNK_DIR)) else set()
        held = []
        for k in pending:
            if f"chunk_{k:07d}.npz" in present:
                continue
            if try_claim(work_dir, k, timeout_s):
                if os.path.exists(chunk_path(work_dir, k)):  # finished while we looked
                    release(work_dir, k)
                    continue
                yield k
            else:
                held.append(k)
        pending = held
        if pending:
            if not wait:
                return
            if on_wait is not None:
                on_wait(pending)
            time.sleep(poll_s)
