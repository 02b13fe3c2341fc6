"""The proposal store: per-image boxes as flat, memory-mapped arrays (docs/selective_search.md).

Layout of a store folder (conventionally named ``*.proposals``)::

    meta.json          format, version, backend + params, filter, counts, unreadable images
    boxes.npy          int32 [M, 4]   x1, y1, x2, y2, inclusive pixel corners, original frame
    offsets.npy        int64 [N + 1]  boxes of image i are boxes[offsets[i]:offsets[i + 1]]
    sizes.npy          int32 [N, 2]   (height, width) of image i in display orientation
    paths.bin          uint8 [P]      UTF-8 relative paths, concatenated
    path_offsets.npy   int64 [N + 1]  path i is paths.bin[path_offsets[i]:path_offsets[i + 1]]

Box convention: the original release stores selective-search rects (x, y, w, h) with
w = max_x - min_x, and its training loader turns them into x2 = x + w - 1, y2 = y + h - 1.
The store keeps exactly those corners, so ``xyxy_inclusive_to_xywh`` gives back the original
JSON values bit for bit.

Opening is O(1) in the number of images: arrays are memory-mapped, so DataLoader workers share
the page cache instead of each holding a copy (the original's per-worker JSON dict).
"""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
from socokit.errors import StoreError  # noqa: F401  (re-exported)

from socokit.fileio import make_temp_dir

FORMAT = "soco-proposals"
VERSION = 1
_ARRAYS = ("boxes.npy", "offsets.npy", "sizes.npy", "path_offsets.npy")


def xywh_to_xyxy_inclusive(boxes_xywh) -> np.ndarray:
    """(x, y, w, h) → (x1, y1, x2 = x + w - 1, y2 = y + h - 1), int32 [K, 4]."""
    a = np.asarray(boxes_xywh, dtype=np.int64).reshape(-1, 4)
    out = a.copy()
    out[:, 2] = a[:, 0] + a[:, 2] - 1
    out[:, 3] = a[:, 1] + a[:, 3] - 1
    return out.astype(np.int32)


def xyxy_inclusive_to_xywh(boxes_xyxy) -> np.ndarray:
    """Inverse of :func:`xywh_to_xyxy_inclusive`, int32 [K, 4]."""
    a = np.asarray(boxes_xyxy, dtype=np.int64).reshape(-1, 4)
    out = a.copy()
    out[:, 2] = a[:, 2] - a[:, 0] + 1
    out[:, 3] = a[:, 3] - a[:, 1] + 1
    return out.astype(np.int32)


class ProposalStore:
    """Read-only, memory-mapped view of a proposal store.

    Pickling sends only the folder path; each process maps the files itself, so passing a
    store to DataLoader workers costs nothing per image.
    """

    def __init__(self, path: str):
        self.path_ = os.fspath(path)
        self._open()

    @classmethod
    def open(cls, path: str) -> "ProposalStore":
        return cls(path)

    def _open(self) -> None:
        p = self.path_
        meta_file = os.path.join(p, "meta.json")
        if not os.path.isdir(p):
            raise StoreError(f"{p}: proposal store folder not found")
        if not os.path.isfile(meta_file):
            raise StoreError(f"{p}: not a proposal store (no meta.json)")
        try:
            with open(meta_file) as f:
                self.meta = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{meta_file}: unreadable metadata: {e}") from e
        if self.meta.get("format") != FORMAT:
            raise StoreError(f"{p}: meta.json format is {self.meta.get('format')!r}, expected {FORMAT!r}")
        if int(self.meta.get("version", 0)) > VERSION:
            raise StoreError(f"{p}: store version {self.meta['version']} is newer than this toolkit ({VERSION})")
        try:
            self._boxes = np.load(os.path.join(p, "boxes.npy"), mmap_mode="r")
            self._offsets = np.load(os.path.join(p, "offsets.npy"), mmap_mode="r")
            self._sizes = np.load(os.path.join(p, "sizes.npy"), mmap_mode="r")
            self._path_offsets = np.load(os.path.join(p, "path_offsets.npy"), mmap_mode="r")
            self._paths = np.memmap(os.path.join(p, "paths.bin"), dtype=np.uint8, mode="r") \
                if os.path.getsize(os.path.join(p, "paths.bin")) else np.zeros(0, np.uint8)
        except (OSError, ValueError) as e:
            raise StoreError(f"{p}: incomplete or corrupt proposal store: {e}") from e
        # Plain ndarray views of the maps: same pages, but indexing skips np.memmap's
        # per-access subclass overhead (about 3x faster per item).
        self._boxes, self._offsets, self._sizes, self._path_offsets, self._paths = (
            a.view(np.ndarray) for a in (self._boxes, self._offsets, self._sizes, self._path_offsets, self._paths))
        n = len(self._sizes)
        if len(self._offsets) != n + 1 or len(self._path_offsets) != n + 1 or \
                (n and int(self._offsets[-1]) != len(self._boxes)):
            raise StoreError(f"{p}: inconsistent array lengths (corrupt store)")
        self._index = None

    def __getstate__(self):
        return {"path_": self.path_}

    def __setstate__(self, state):
        self.path_ = state["path_"]
        self._open()

    def __len__(self) -> int:
        return len(self._sizes)

    @property
    def num_boxes(self) -> int:
        return len(self._boxes)

    def path(self, i: int) -> str:
        a, b = int(self._path_offsets[i]), int(self._path_offsets[i + 1])
        return bytes(self._paths[a:b]).decode("utf-8")

    def size(self, i: int) -> tuple[int, int]:
        h, w = self._sizes[i]
        return int(h), int(w)

    def boxes(self, i: int) -> np.ndarray:
        """Boxes of image ``i``: a fresh int32 [K, 4] array (x1, y1, x2, y2 inclusive)."""
        a, b = int(self._offsets[i]), int(self._offsets[i + 1])
        return np.array(self._boxes[a:b], dtype=np.int32)

    def num_boxes_per_image(self) -> np.ndarray:
        return np.diff(np.asarray(self._offsets))

    def arrays(self) -> dict:
        """The raw memory-mapped arrays (for vectorised tools such as filters)."""
        return {"boxes": self._boxes, "offsets": self._offsets, "sizes": self._sizes,
                "paths": self._paths, "path_offsets": self._path_offsets}

    def paths(self) -> list[str]:
        """All relative paths (materialises N strings: for tools, not data loaders)."""
        return [self.path(i) for i in range(len(self))]

    def find(self, relpath: str) -> int | None:
        """Index of ``relpath`` (builds a dict on first use: for tools, not data loaders)."""
        if self._index is None:
            self._index = {p: i for i, p in enumerate(self.paths())}
        return self._index.get(relpath)


def _replace_dir(tmp: str, path: str) -> None:
    """Move the finished folder ``tmp`` onto ``path``, replacing an old store if present."""
    old = None
    if os.path.lexists(path):
        if not os.path.isfile(os.path.join(path, "meta.json")) and os.listdir(path):
            raise StoreError(f"{path}: exists and is not a proposal store; refusing to replace it")
        old = path.rstrip("/") + f".old-{os.getpid()}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _finish_meta(meta: dict | None, n: int, m: int, empty: int) -> dict:
    out = dict(meta or {})
    out.update(format=FORMAT, version=VERSION, num_images=int(n), num_boxes=int(m),
               num_images_without_boxes=int(empty))
    out.setdefault("num_unreadable", len(out.get("unreadable", [])))
    out.setdefault("unreadable", [])
    out.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return out


class ProposalStoreWriter:
    """Streaming writer: ``add`` images one by one, ``close`` publishes the store atomically.

    Boxes and paths stream to temporary files; only per-image offsets and sizes stay in RAM
    (16 bytes per image). Nothing appears at ``path`` until :meth:`close` succeeds.
    """

    def __init__(self, path: str, meta: dict | None = None):
        self.path = os.path.abspath(os.fspath(path))
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        self.meta = dict(meta or {})
        self._tmp = make_temp_dir(prefix="." + os.path.basename(self.path) + ".tmp-", dir=parent)
        self._boxes_raw = open(os.path.join(self._tmp, "boxes.raw"), "wb")
        self._paths_f = open(os.path.join(self._tmp, "paths.bin"), "wb")
        self._offsets = [0]
        self._path_offsets = [0]
        self._sizes = []
        self._empty = 0
        self._closed = False

    def add(self, relpath: str, size_hw, boxes_xyxy) -> None:
        b = np.ascontiguousarray(np.asarray(boxes_xyxy, dtype=np.int32).reshape(-1, 4))
        self._boxes_raw.write(b.tobytes())
        enc = relpath.encode("utf-8")
        self._paths_f.write(enc)
        self._offsets.append(self._offsets[-1] + len(b))
        self._path_offsets.append(self._path_offsets[-1] + len(enc))
        self._sizes.append((int(size_hw[0]), int(size_hw[1])))
        self._empty += len(b) == 0

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def abort(self) -> None:
        """Discard everything written so far."""
        if not self._closed:
            self._boxes_raw.close()
            self._paths_f.close()
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._closed = True

    def close(self) -> "ProposalStore":
        if self._closed:
            raise StoreError("writer already closed")
        try:
            self._boxes_raw.close()
            self._paths_f.close()
            t = self._tmp
            m = self._offsets[-1]
            raw = os.path.join(t, "boxes.raw")
            out = np.lib.format.open_memmap(os.path.join(t, "boxes.npy"), mode="w+", dtype=np.int32, shape=(m, 4))
            if m:
                out[:] = np.fromfile(raw, dtype=np.int32).reshape(m, 4)
            out.flush()
            del out
            os.unlink(raw)
            np.save(os.path.join(t, "offsets.npy"), np.asarray(self._offsets, dtype=np.int64))
            np.save(os.path.join(t, "path_offsets.npy"), np.asarray(self._path_offsets, dtype=np.int64))
            np.save(os.path.join(t, "sizes.npy"), np.asarray(self._sizes, dtype=np.int32).reshape(-1, 2))
            meta = _finish_meta(self.meta, len(self._sizes), m, self._empty)
            with open(os.path.join(t, "meta.json"), "w") as f:
                json.dump(meta, f, indent=2)
            _replace_dir(t, self.path)
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._closed = True
            raise
        self._closed = True
        return ProposalStore(self.path)


def write_store(path: str, paths, sizes, boxes_list, meta: dict | None = None) -> ProposalStore:
    """Write a whole store at once (atomic: temp folder + rename).

    Args:
        path: destination folder.
        paths: N relative image paths.
        sizes: N (height, width) pairs.
        boxes_list: N arrays [K_i, 4] of x1, y1, x2, y2 inclusive corners.
        meta: extra metadata (backend, filter, unreadable, image_root ...); counts are filled in.
    """
    if not (len(paths) == len(sizes) == len(boxes_list)):
        raise ValueError("paths, sizes and boxes_list must have the same length")
    with ProposalStoreWriter(path, meta) as w:
        for p, s, b in zip(paths, sizes, boxes_list):
            w.add(p, s, b)
    return ProposalStore(path)


def write_store_arrays(path: str, *, boxes: np.ndarray, offsets: np.ndarray, sizes: np.ndarray,
                       paths_bin: np.ndarray, path_offsets: np.ndarray, meta: dict | None = None) -> ProposalStore:
    """Write a store from flat arrays (vectorised tools: filters, merges, benchmarks)."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = make_temp_dir(prefix="." + os.path.basename(path) + ".tmp-", dir=parent)
    try:
        boxes = np.ascontiguousarray(boxes, dtype=np.int32).reshape(-1, 4)
        offsets = np.asarray(offsets, dtype=np.int64)
        np.save(os.path.join(tmp, "boxes.npy"), boxes)
        np.save(os.path.join(tmp, "offsets.npy"), offsets)
        np.save(os.path.join(tmp, "sizes.npy"), np.asarray(sizes, dtype=np.int32).reshape(-1, 2))
        np.save(os.path.join(tmp, "path_offsets.npy"), np.asarray(path_offsets, dtype=np.int64))
        np.asarray(paths_bin, dtype=np.uint8).tofile(os.path.join(tmp, "paths.bin"))
        n = len(offsets) - 1
        empty = int((np.diff(offsets) == 0).sum())
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(_finish_meta(meta, n, len(boxes), empty), f, indent=2)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ProposalStore(path)
