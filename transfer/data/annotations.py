"""Validate and normalise COCO-format (and LVIS v1) annotation files when they are loaded.

Everything that training and evaluation (pycocotools index, faster-coco-eval) read later is checked or
derived here, before the first iteration, so a malformed file never fails for the first time
inside the evaluator of a finished run. Each problem is handled one of three ways:

* **repaired** (the file's intent is clear): a missing / duplicate annotation id gets a new id,
  a missing ``area`` is computed (mask area, else box area), a missing ``iscrowd`` becomes 0,
  a missing ``bbox`` is derived from the segmentation, a box reaching past the image border is
  clipped, a missing segmentation becomes the box polygon, polygons with fewer than three
  points are removed, a flat polygon ``[x, y, ...]`` is wrapped into a list, a missing image
  size is read from the image file, LVIS ``neg_category_ids`` / ``not_exhaustive_category_ids``
  default to ``[]``;
* **dropped** (the annotation carries no usable object): boxes with zero or negative width or
  height, boxes entirely outside the image, annotations of an unknown image or category;
* **refused** (:class:`AnnotationError`, naming the file, the entry and the field): anything
  whose meaning cannot be recovered, e.g. a non-integer or duplicate category / image id, a
  bbox of the wrong shape, a polygon with an odd number of coordinates, an RLE whose size is
  not the image's.

The repairs and drops are counted in an :class:`AnnotationReport` (one summary line, and a JSON
file in the output folder). The accepted variants are listed in ``docs/finetune.md``.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field

from pycocotools import mask as mask_utils

from socokit.errors import AnnotationError
from socokit.images import ImageError, image_size

# Repair / drop kinds (the summary line and the JSON report use these texts).
ID_ASSIGNED = "annotation id missing or duplicate: new id assigned"
AREA_COMPUTED = "area missing or negative: computed"
CROWD_DEFAULTED = "iscrowd missing: set to 0"
BBOX_DERIVED = "bbox missing: derived from the segmentation"
BBOX_CLIPPED = "bbox past the image border: clipped"
SEGM_FROM_BOX = "segmentation missing: the box is used as the mask"
POLY_REMOVED = "polygon with fewer than 3 points removed"
POLY_WRAPPED = "flat polygon [x, y, ...] wrapped into a list"
SIZE_READ = "image height/width missing: read from the image file"
LVIS_DEFAULTED = "LVIS neg/not-exhaustive category ids missing: set to []"
DROP_DEGENERATE = "dropped: box with zero or negative width/height"
DROP_OUTSIDE = "dropped: box outside the image"
DROP_IMAGE = "dropped: unknown image_id"
DROP_CATEGORY = "dropped: unknown category_id"


@dataclass
class AnnotationReport:
    """What loading one annotation file repaired and dropped.

    Attributes:
        file: the annotation file.
        num_images, num_annotations, num_categories: after normalisation.
        counts: repair / drop kind → number of entries.
        examples: repair / drop kind → the first few annotation (or image) ids concerned.
        has_segmentation: whether any annotation carries a real (non-box) segmentation; a
            box-only file gives no mask metrics.
    """

    file: str
    num_images: int = 0
    num_annotations: int = 0
    num_categories: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    has_segmentation: bool = False

    def add(self, kind: str, ident) -> None:
        self.counts[kind] += 1
        ex = self.examples.setdefault(kind, [])
        if len(ex) < 5:
            ex.append(ident)

    def summary_line(self) -> str:
        """One line: sizes, then every repair and drop with its count."""
        head = (f"{self.file}: {self.num_images} images, {self.num_annotations} annotations, "
                f"{self.num_categories} categories")
        if not self.has_segmentation:
            head += " (box-only: no mask metrics)"
        if not self.counts:
            return head + "; no repairs"
        items = "; ".join(f"{n} x {kind} (e.g. {self.examples[kind][:3]})"
                          for kind, n in sorted(self.counts.items()))
        return f"{head}; {items}"

    def to_dict(self) -> dict:
        return {"file": self.file, "num_images": self.num_images,
                "num_annotations": self.num_annotations, "num_categories": self.num_categories,
                "has_segmentation": self.has_segmentation, "counts": dict(self.counts),
                "examples": {k: list(v) for k, v in self.examples.items()}}


# --------------------------------------------------------------------------- small checks
def _entry_id(entry, where: str) -> int:
    """Check that a category or image entry is an object with an integer ``id``; store and return it.

    Raises:
        AnnotationError: the entry is not a dict, has no ``id``, or the id is not an integer.
    """
    if not isinstance(entry, dict):
        raise AnnotationError(f"{where} must be an object, got {type(entry).__name__}")
    if "id" not in entry:
        raise AnnotationError(f"{where}: field 'id' missing")
    entry["id"] = _as_int(entry["id"], f"{where}.id")
    return entry["id"]


def _as_int(value, where: str) -> int:
    """An integer id (ints and integral floats; bools and strings are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AnnotationError(f"{where} must be an integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise AnnotationError(f"{where} must be an integer, got {value!r}")
        value = int(value)
    return value


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_NUMBER_TYPES = (int, float)


def _all_numbers(values: list) -> bool:
    """Every value an int or float and all finite (one pass: a sum with inf/nan is not finite)."""
    return all(type(v) in _NUMBER_TYPES for v in values) and math.isfinite(sum(values))


def _check_list(data: dict, key: str, path: str) -> list:
    value = data.get(key)
    if not isinstance(value, list):
        got = "missing" if key not in data else type(value).__name__
        raise AnnotationError(f"{path}: top-level field {key!r} must be a list ({got})")
    return value


# --------------------------------------------------------------------------- categories, images
def _validate_categories(data: dict, path: str, kind: str) -> dict:
    cats = _check_list(data, "categories", path)
    if not cats:
        raise AnnotationError(f"{path}: 'categories' is empty")
    by_id = {}
    for i, cat in enumerate(cats):
        where = f"{path}: categories[{i}]"
        cid = _entry_id(cat, where)
        if cid in by_id:
            raise AnnotationError(f"{where}: duplicate category id {cid}")
        name = cat.get("name")
        if not isinstance(name, str) or not name.strip():
            raise AnnotationError(f"{path}: category id {cid}: field 'name' missing or not a string ({name!r})")
        if kind == "lvis" and cat.get("frequency") not in ("r", "c", "f"):
            raise AnnotationError(f"{path}: category id {cid}: LVIS field 'frequency' must be 'r', 'c' "
                                  f"or 'f' (got {cat.get('frequency')!r})")
        by_id[cid] = cat
    return by_id


def _validate_images(data: dict, path: str, kind: str, image_root: str | None,
                     report: AnnotationReport) -> dict:
    images = _check_list(data, "images", path)
    by_id = {}
    for i, img in enumerate(images):
        where = f"{path}: images[{i}]"
        iid = _entry_id(img, where)
        where = f"{path}: image id {iid}"
        if iid in by_id:
            raise AnnotationError(f"{where}: duplicate image id")
        name = img.get("file_name") or (img.get("coco_url") if kind == "lvis" else None)
        if not isinstance(name, str) or not name:
            raise AnnotationError(f"{where}: field 'file_name' missing or empty")
        _validate_size(img, where, name, image_root, report)
        if kind == "lvis":
            for key in ("neg_category_ids", "not_exhaustive_category_ids"):
                if key not in img:
                    img[key] = []
                    report.add(LVIS_DEFAULTED, iid)
                elif not isinstance(img[key], list):
                    raise AnnotationError(f"{where}: field {key!r} must be a list")
        by_id[iid] = img
    return by_id


def _validate_size(img: dict, where: str, name: str, image_root: str | None, report) -> None:
    if img.get("height") is None or img.get("width") is None:
        size = None
        if image_root is not None:
            rel = name if "file_name" in img else "/".join(name.split("/")[-2:])
            try:
                size = image_size(os.path.join(image_root, rel))
            except ImageError:
                size = None
        if size is None:
            raise AnnotationError(f"{where}: fields 'height'/'width' missing and the image "
                                  f"{name!r} could not be read to find them")
        img["height"], img["width"] = size
        report.add(SIZE_READ, img["id"])
    for key in ("height", "width"):
        value = img[key] = _as_int(img[key], f"{where}.{key}")
        if value <= 0:
            raise AnnotationError(f"{where}: field {key!r} must be positive, got {value}")


# --------------------------------------------------------------------------- segmentation
def _validate_polygons(segm: list, where: str, ann_id, report) -> list:
    if segm and _all_numbers(segm):  # a flat [x0, y0, x1, y1, ...]
        segm = [segm]
        report.add(POLY_WRAPPED, ann_id)
    kept = []
    for j, poly in enumerate(segm):
        if not isinstance(poly, list) or not _all_numbers(poly):
            raise AnnotationError(f"{where}: field 'segmentation'[{j}] must be a list of finite "
                                  f"numbers (a polygon x0, y0, x1, y1, ...)")
        if len(poly) % 2:
            raise AnnotationError(f"{where}: field 'segmentation'[{j}] has an odd number of "
                                  f"coordinates ({len(poly)})")
        if len(poly) < 6:
            report.add(POLY_REMOVED, ann_id)
            continue
        kept.append(poly)
    return kept


def _validate_rle(segm: dict, where: str, hw: tuple[int, int]) -> dict:
    size, counts = segm.get("size"), segm.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_number(s) for s in size)):
        raise AnnotationError(f"{where}: RLE field 'segmentation.size' must be [height, width], got {size!r}")
    if [int(s) for s in size] != list(hw):
        raise AnnotationError(f"{where}: RLE field 'segmentation.size' {size} differs from the "
                              f"image's [height, width] {list(hw)}")
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise AnnotationError(f"{where}: RLE field 'segmentation.counts' must hold non-negative integers")
        if sum(counts) != hw[0] * hw[1]:
            raise AnnotationError(f"{where}: RLE field 'segmentation.counts' sums to {sum(counts)}, "
                                  f"not height x width = {hw[0] * hw[1]}")
    elif not isinstance(counts, str) or not counts:
        raise AnnotationError(f"{where}: RLE field 'segmentation.counts' must be a list of run "
                              f"lengths or a compressed string, got {type(counts).__name__}")
    return {"size": [int(s) for s in size], "counts": counts}


def _to_rle(segm, hw):
    h, w = hw
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, h, w)
    return {"size": segm["size"], "counts": segm["counts"].encode("ascii")}


def box_polygon(x: float, y: float, w: float, h: float) -> list:
    """The polygon of an ``[x, y, w, h]`` box (used as the mask of box-only annotations)."""
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


# --------------------------------------------------------------------------- annotations
def _validate_bbox(ann: dict, where: str, segm, hw, report) -> list | None:
    """The (clipped) ``[x, y, w, h]`` box, or None when the annotation is dropped."""
    ann_id = ann["id"]
    bbox = ann.get("bbox")
    if bbox is None:
        if segm is None:
            raise AnnotationError(f"{where}: field 'bbox' missing and no segmentation to derive it from")
        bbox = [float(v) for v in mask_utils.toBbox(_to_rle(segm, hw))]
        report.add(BBOX_DERIVED, ann_id)
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and _all_numbers(bbox)):
        raise AnnotationError(f"{where}: field 'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    if not (w > 0 and h > 0):
        report.add(DROP_DEGENERATE, ann_id)
        return None
    H, W = hw
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(W)), min(y + h, float(H))
    if not (x2 > x1 and y2 > y1):
        report.add(DROP_OUTSIDE, ann_id)
        return None
    if (x1, y1, x2, y2) != (x, y, x + w, y + h):
        report.add(BBOX_CLIPPED, ann_id)
    return [x1, y1, x2 - x1, y2 - y1]


def _validate_annotation(ann, where: str, img: dict, report, kind: str = "coco") -> bool:
    """Normalise ``ann`` in place; False when it is dropped."""
    hw = (img["height"], img["width"])
    ann_id = ann["id"]
    crowd = ann.get("iscrowd")
    if crowd is None:
        ann["iscrowd"] = 0
        if kind != "lvis":  # LVIS has no crowd regions and no such field: nothing was repaired
            report.add(CROWD_DEFAULTED, ann_id)
    elif isinstance(crowd, (bool, int, float)) and crowd in (0, 1):
        ann["iscrowd"] = int(crowd)
    else:
        raise AnnotationError(f"{where}: field 'iscrowd' must be 0 or 1, got {crowd!r}")
    segm = ann.get("segmentation")
    if isinstance(segm, list) and segm:
        segm = _validate_polygons(segm, where, ann_id, report) or None
    elif isinstance(segm, dict):
        segm = _validate_rle(segm, where, hw)
    elif segm in (None, [], {}):
        segm = None
    else:
        raise AnnotationError(f"{where}: field 'segmentation' must be polygons, an RLE object or "
                              f"absent, got {type(segm).__name__}")
    bbox = _validate_bbox(ann, where, segm, hw, report)
    if bbox is None:
        return False
    ann["bbox"] = bbox
    if segm is None:
        segm = box_polygon(*bbox)
        report.add(SEGM_FROM_BOX, ann_id)
    else:
        report.has_segmentation = True
    ann["segmentation"] = segm
    area = ann.get("area")
    if area is not None and not _is_number(area):
        raise AnnotationError(f"{where}: field 'area' must be a number, got {area!r}")
    if area is None or area < 0:
        ann["area"] = float(mask_utils.area(_to_rle(segm, hw)))
        report.add(AREA_COMPUTED, ann_id)
    return True


def _validate_annotations(data: dict, path: str, images: dict, cats: dict, report, kind: str) -> list:
    anns = _check_list(data, "annotations", path)
    seen: set = set()
    pending = []  # annotations whose id must be (re)assigned after all valid ids are known
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict):
            raise AnnotationError(f"{path}: annotations[{i}] must be an object, got {type(ann).__name__}")
        if ann.get("id") is None:
            pending.append(ann)
            continue
        ann["id"] = _as_int(ann["id"], f"{path}: annotations[{i}].id")
        if ann["id"] in seen or ann["id"] <= 0:  # pycocotools' loadRes numbers results from 1
            pending.append(ann)
        else:
            seen.add(ann["id"])
    next_id = max(seen, default=0) + 1
    for ann in pending:
        ann["id"] = next_id
        report.add(ID_ASSIGNED, next_id)
        next_id += 1
    kept = []
    for ann in anns:
        where = f"{path}: annotation id {ann['id']}"
        for key in ("image_id", "category_id"):
            if key not in ann:
                raise AnnotationError(f"{where}: field {key!r} missing")
            ann[key] = _as_int(ann[key], f"{where}.{key}")
        if ann["image_id"] not in images:
            report.add(DROP_IMAGE, ann["id"])
            continue
        if ann["category_id"] not in cats:
            report.add(DROP_CATEGORY, ann["id"])
            continue
        if _validate_annotation(ann, where, images[ann["image_id"]], report, kind):
            kept.append(ann)
    return kept


def validate_dataset(data, path: str, kind: str = "coco", image_root: str | None = None):
    """Validate and normalise a loaded COCO / LVIS annotation dict (in place).

    Args:
        data: the parsed JSON.
        path: the file name (for messages).
        kind: ``"coco"`` or ``"lvis"`` (LVIS also needs category ``frequency`` and per-image
            ``neg_category_ids`` / ``not_exhaustive_category_ids``).
        image_root: folder of the images, used to read missing image sizes.

    Returns:
        (the normalised dict, :class:`AnnotationReport`).

    Raises:
        AnnotationError: a problem that cannot be repaired (file, entry and field named).
    """
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    report = AnnotationReport(path)
    cats = _validate_categories(data, path, kind)
    images = _validate_images(data, path, kind, image_root, report)
    data["annotations"] = _validate_annotations(data, path, images, cats, report, kind)
    report.num_images, report.num_annotations = len(images), len(data["annotations"])
    report.num_categories = len(cats)
    return data, report


def read_json(path: str):
    """Parse an annotation file (errors name the file)."""
    if not os.path.isfile(path):
        raise AnnotationError(f"annotation file {path!r} not found")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: not valid JSON ({e})") from e


def build_api(data: dict, kind: str = "coco"):
    """A pycocotools ``COCO`` index over an already validated dict (COCO or LVIS v1: the LVIS
    fields stay in ``api.dataset`` for the federated evaluation)."""
    from pycocotools.coco import COCO

    api = COCO()
    api.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        api.createIndex()
    return api


def gt_area_presence(api, image_ids, kind: str = "coco") -> dict:
    """Which evaluation buckets have ground truth among ``image_ids`` (non-crowd, non-ignored).

    Returns:
        ``{"all", "small", "medium", "large"}`` (+ ``"r", "c", "f"`` for LVIS) → bool, with the
        area ranges of COCO / LVIS evaluation (``[0, 32²]``, ``[32², 96²]``, ``[96², 1e10]``, bounds
        inclusive as they test them).
    """
    ranges = {"all": (0, 1e10), "small": (0, 32 ** 2), "medium": (32 ** 2, 96 ** 2), "large": (96 ** 2, 1e10)}
    present = dict.fromkeys(list(ranges) + (["r", "c", "f"] if kind == "lvis" else []), False)
    by_image = api.imgToAnns
    for iid in set(image_ids):
        for ann in by_image.get(iid, []):
            if ann.get("iscrowd", 0) or ann.get("ignore", 0):
                continue
            for name, (lo, hi) in ranges.items():
                if lo <= ann["area"] <= hi:
                    present[name] = True
            if kind == "lvis":
                present[api.cats[ann["category_id"]]["frequency"]] = True
    return present


__all__ = ["AnnotationError", "AnnotationReport", "box_polygon", "build_api", "gt_area_presence",
           "read_json", "validate_dataset"]
