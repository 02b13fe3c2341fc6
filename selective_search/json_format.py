"""Import / export the original SoCo release's proposal JSON.

The original format is one JSON object ``{"<basename without extension>": [[x, y, w, h], ...]}``
(docs/method.md §1.5), with the selective-search w = max_x - min_x; the store keeps
``x2 = x + w - 1``, so the conversion is exact both ways.

Examples::

    python selective_search/json_format.py export proposals/train_ratio3size0308post.proposals \\
        train_ratio3size0308post.json
    python selective_search/json_format.py import train_ratio3size0308post.json \\
        --image-root data/imagenet/train proposals/train_ratio3size0308post.proposals

Import matches images under ``--image-root`` to JSON keys by basename (without extension),
reads only image headers for the sizes (EXIF rotation applied), and reports images missing
from the JSON and keys without an image; neither is an error. Basenames must be unique.
"""

from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np
from tqdm import tqdm

from socokit.config import add_print_config_argument, parse_args_or_print
from socokit.errors import exit_on_user_error
from socokit.fileio import atomic_write, check_writable_dir
from socokit.images import ImageError, find_images, image_size
from socokit.log import get_logger, setup_logging
from socokit.proposal_store import (ProposalStore, StoreError, write_store_arrays,
                                    xywh_to_xyxy_inclusive, xyxy_inclusive_to_xywh)

_STRATEGY_IN_NAME = re.compile(r"_((?:none|ratio\d|size\d\d|ratio\dsize\d{4})(?:post)?)$")


def basename_key(relpath: str) -> str:
    """The original's key: the file name without folder and extension."""
    return os.path.splitext(os.path.basename(relpath))[0]


def export_json(store_path: str, json_path: str) -> int:
    """Writes a store as the original JSON (streamed, atomic).

    Returns:
        The number of images written.

    Raises:
        SystemExit: unreadable store, or two images share a basename (the format cannot
            hold both).
    """
    try:
        store = ProposalStore.open(store_path)
    except StoreError as e:
        raise SystemExit(f"error: {e}") from e
    keys = [basename_key(store.path(i)) for i in range(len(store))]
    if len(set(keys)) != len(keys):
        seen, dups = set(), []
        for k in keys:
            (dups.append(k) if k in seen else seen.add(k))
        raise SystemExit(f"error: {store_path}: {len(dups)} basenames occur more than once "
                         f"(e.g. {dups[:3]}); the original JSON format keys images by basename")
    arrays = store.arrays()
    offsets = np.asarray(arrays["offsets"]).tolist()
    block = 50_000  # images converted to (x, y, w, h) lists at once
    with atomic_write(json_path, "w") as f, tqdm(total=len(keys), unit="img", desc="export",
                                                 mininterval=1.0) as bar:
        f.write("{")
        for a in range(0, len(keys), block):
            b = min(a + block, len(keys))
            boxes_xywh = xyxy_inclusive_to_xywh(arrays["boxes"][offsets[a]:offsets[b]]).tolist()
            for i in range(a, b):
                rows = boxes_xywh[offsets[i] - offsets[a]:offsets[i + 1] - offsets[a]]
                f.write(("" if i == 0 else ", ") + json.dumps(keys[i]) + ": " + json.dumps(rows))
            bar.update(b - a)
        f.write("}")
    return len(keys)


class _ObjectReader:
    """Decodes the ``(key, value)`` pairs of a top-level JSON object from a sliding buffer."""

    def __init__(self, f, read_size: int, error: str):
        self.f, self.read_size, self.error = f, read_size, error
        self.decoder = json.JSONDecoder()
        self.buf, self.pos, self.eof = "", 0, False

    def _more(self) -> bool:
        chunk = "" if self.eof else self.f.read(self.read_size)
        self.eof = self.eof or not chunk
        self.buf, self.pos = self.buf[self.pos:] + chunk, 0
        return bool(chunk)

    def _skip_space(self) -> None:
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf) or not self._more():
                return

    def _peek(self, chars: str) -> str:
        """Skips whitespace; returns the next character, which must be one of ``chars``."""
        self._skip_space()
        if self.pos >= len(self.buf) or self.buf[self.pos] not in chars:
            raise SystemExit(f"{self.error} (expected one of {chars!r})")
        return self.buf[self.pos]

    def _value(self):
        self._skip_space()  # raw_decode does not skip leading whitespace
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof:  # a number may go on in the next chunk
                    self.pos = end
                    return obj
            except json.JSONDecodeError as e:
                if self.eof:
                    raise SystemExit(f"{self.error} ({e})") from e
            self._more()

    def items(self):
        self._peek("{")
        self.pos += 1
        if self._peek('"}') == "}":
            return
        while True:
            key = self._value()
            self._peek(":")
            self.pos += 1
            yield key, self._value()
            if self._peek(",}") == "}":
                return
            self.pos += 1
            self._peek('"')


def iter_json_object(json_path: str, read_size: int = 1 << 24):
    """Yields the ``(key, value)`` pairs of a top-level JSON object one at a time.

    The original ImageNet file holds ~77 M boxes; ``json.load`` would build ~15 GB of Python
    lists, so entries are decoded one by one from a sliding text buffer instead.

    Raises:
        SystemExit: unreadable file, or not a JSON object.
    """
    error = f"error: {json_path}: not a readable JSON object {{basename: [[x, y, w, h], ...]}}"
    try:
        with open(json_path, encoding="utf-8") as f:
            yield from _ObjectReader(f, read_size, error).items()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"{error} ({e})") from e


def _boxes_of(json_path: str, key: str, value) -> np.ndarray:
    try:
        boxes_xywh = np.asarray(value, dtype=np.int64)
        if boxes_xywh.size == 0:
            return np.zeros((0, 4), np.int32)
        if boxes_xywh.ndim != 2 or boxes_xywh.shape[1] != 4:
            raise ValueError(f"shape {boxes_xywh.shape}")
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {json_path}: entry {key!r} is not a list of [x, y, w, h] "
                         f"integer boxes ({e})") from e
    return xywh_to_xyxy_inclusive(boxes_xywh)


def _match_images(keys, image_root: str) -> tuple[list[str], list[str], list[str]]:
    """Images under ``image_root`` whose basename is a key, images without a key, keys
    without an image.

    Raises:
        SystemExit: a key matches several images (basenames must be unique).
    """
    relpaths = find_images(image_root)
    by_key: dict[str, list[str]] = {}
    for p in relpaths:
        by_key.setdefault(basename_key(p), []).append(p)
    dups = [k for k in keys if len(by_key.get(k, ())) > 1]
    if dups:
        raise SystemExit(f"error: {len(dups)} JSON keys match several images under {image_root} "
                         f"(e.g. {dups[0]!r}: {by_key[dups[0]][:2]}); basenames must be unique")
    matched = [p for p in relpaths if basename_key(p) in keys]
    missing_in_json = [p for p in relpaths if basename_key(p) not in keys]
    keys_without_image = sorted(k for k in keys if k not in by_key)
    return matched, missing_in_json, keys_without_image


def import_json(json_path: str, image_root: str, store_path: str, filter_name: str | None = None,
                log=None) -> ProposalStore:
    """Builds a store from an original-format JSON and the images it describes.

    Args:
        json_path: ``{basename: [[x, y, w, h], ...]}``.
        image_root: folder with the images (searched recursively); store paths are relative.
        store_path: the store to write (atomically).
        filter_name: the strategy the JSON was filtered with (meta ``filter``); default: taken
            from a file name ending in ``_<strategy>.json`` (``train_ratio3size0308post.json``).
        log: a logger.

    Raises:
        SystemExit: bad JSON, no image matches a key, duplicate basenames among matched images.
    """
    log = log or get_logger("soco.selective_search")
    boxes_of_key: dict[str, np.ndarray] = {}
    for key, value in tqdm(iter_json_object(json_path), unit="entry", desc="read json",
                           mininterval=1.0):
        boxes_of_key[key] = _boxes_of(json_path, key, value)
    matched, missing_in_json, keys_without_image = _match_images(boxes_of_key, image_root)
    if not matched:
        raise SystemExit(f"error: none of the {len(boxes_of_key)} keys of {json_path} matches an "
                         f"image basename under {image_root} (wrong --image-root?)")
    paths, sizes, box_list, unreadable = [], [], [], []
    for p in tqdm(matched, unit="img", desc="import", mininterval=1.0):
        try:
            hw = image_size(os.path.join(image_root, p))  # header only, display orientation
        except ImageError as e:
            unreadable.append({"path": p, "reason": e.reason})
            continue
        paths.append(p)
        sizes.append(hw)
        box_list.append(boxes_of_key[basename_key(p)])
    if filter_name is None:
        m = _STRATEGY_IN_NAME.search(os.path.splitext(os.path.basename(json_path))[0])
        filter_name = m.group(1) if m else None
    encoded = [p.encode("utf-8") for p in paths]
    path_offsets = np.zeros(len(paths) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=path_offsets[1:])
    offsets = np.zeros(len(paths) + 1, np.int64)
    np.cumsum([len(b) for b in box_list], out=offsets[1:])
    meta = {"backend": "imported-json", "backend_params": {"source": os.path.abspath(json_path)},
            "filter": filter_name, "image_root": os.path.abspath(image_root),
            "unreadable": unreadable, "num_unreadable": len(unreadable),
            "num_images_missing_from_json": len(missing_in_json),
            "num_json_keys_without_image": len(keys_without_image)}
    store = write_store_arrays(
        store_path, boxes=np.concatenate(box_list) if box_list else np.zeros((0, 4), np.int32),
        offsets=offsets, sizes=np.asarray(sizes, np.int32).reshape(-1, 2),
        paths_bin=np.frombuffer(b"".join(encoded), np.uint8), path_offsets=path_offsets, meta=meta)
    log.info(f"imported {len(paths)} images, {store.num_boxes} boxes from {json_path} "
             f"(filter: {filter_name})")
    for label, items in (("images under the root missing from the JSON", missing_in_json),
                         ("JSON keys without an image", keys_without_image),
                         ("unreadable images", [u["path"] for u in unreadable])):
        if items:
            log.info(f"{len(items)} {label}, e.g. {', '.join(items[:5])}")
    return store


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_print_config_argument(p)
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="proposal store -> original JSON")
    ex.add_argument("store", help="proposal store folder")
    ex.add_argument("json", help="JSON file to write")
    im = sub.add_parser("import", help="original JSON -> proposal store")
    im.add_argument("json", help="original-format proposal JSON")
    im.add_argument("store", help="proposal store folder to write")
    im.add_argument("--image-root", required=True,
                    help="folder with the images the JSON describes (searched recursively)")
    im.add_argument("--filter-name", default=None,
                    help="strategy the JSON was filtered with, recorded as meta 'filter' "
                         "(default: parsed from a file name like train_ratio3size0308post.json)")
    for sp in (ex, im):
        sp.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args_or_print(build_parser(), argv)
    log = setup_logging(name="soco")
    out = args.json if args.command == "export" else args.store
    if os.path.exists(out) and not args.overwrite:
        raise SystemExit(f"error: {out} already exists; pass --overwrite to replace it")
    check_writable_dir(os.path.dirname(os.path.abspath(out)))
    if args.command == "export":
        n = export_json(args.store, args.json)
        log.info(f"wrote {n} images to {args.json}")
    else:
        if not os.path.isfile(args.json):
            raise SystemExit(f"error: {args.json}: no such file")
        import_json(args.json, args.image_root, args.store, filter_name=args.filter_name, log=log)


if __name__ == "__main__":
    main()
