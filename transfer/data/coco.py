"""COCO-format (and LVIS v1) detection datasets.

Any COCO-format annotation file works: ``images`` (id, file_name, height, width),
``annotations`` (image_id, category_id, bbox ``[x, y, w, h]``, optional segmentation as
polygons or RLE, iscrowd) and ``categories``. Category ids are mapped to contiguous labels
``1..K`` (0 is the background of the R-CNN heads); ``label_to_category`` maps back for
evaluation. LVIS v1 files are indexed like COCO files (their federated fields are kept for the
evaluation); their images are named by the
last two parts of ``coco_url`` (``train2017/000000391895.jpg``) under the image root.
Every file is validated and normalised first (:mod:`transfer.data.annotations`).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from socokit.images import ImageError, load_rgb
from socokit.log import get_logger
from transfer.data.annotations import AnnotationReport, build_api, read_json, validate_dataset
from transfer.data.transforms import DetectionTransform

logger = get_logger("soco.finetune")


@dataclass
class ImageRecord:
    """One image of the index: where it is and its usable annotations."""

    image_id: int
    file_name: str
    height: int
    width: int
    anns: list = field(default_factory=list)  # dicts: boxes_xyxy, label, segmentation


def _ann_to_entry(ann: dict, cat_to_label: dict) -> dict | None:
    """Validated COCO annotation → training entry, or None for crowd / ignored regions."""
    if ann["iscrowd"] or ann.get("ignore", 0):
        return None
    x, y, w, h = ann["bbox"]
    return {"boxes_xyxy": [x, y, x + w, y + h], "label": cat_to_label[ann["category_id"]],
            "segmentation": ann["segmentation"]}


def _lvis_file_name(img: dict) -> str:
    if "file_name" in img:
        return img["file_name"]
    return "/".join(img["coco_url"].split("/")[-2:])


@dataclass
class AnnotationSet:
    """One loaded split. Unpacks as ``records, categories, api = ...`` (the first three fields).

    Attributes:
        records: ImageRecord list in image-id order.
        categories: category dicts sorted by id (label ``i + 1`` is ``categories[i]``).
        api: pycocotools ``COCO`` index over the normalised annotations (COCO or LVIS v1).
        report: what validation repaired and dropped.
    """

    records: list
    categories: list
    api: object
    report: AnnotationReport

    def __iter__(self):
        return iter((self.records, self.categories, self.api))


def load_annotation_index(ann_file: str, kind: str = "coco", image_root: str | None = None) -> AnnotationSet:
    """Read, validate and normalise an annotation file into records.

    Validation (:func:`transfer.data.annotations.validate_dataset`) runs first, so the
    evaluator later sees the same normalised annotations as training.

    Args:
        ann_file: COCO-format or LVIS v1 json.
        kind: "coco" or "lvis" (LVIS v1: file names from ``coco_url``, federated evaluation).
        image_root: image folder, used only to read image sizes missing from the file.

    Returns:
        :class:`AnnotationSet` (unpacks as records, categories, api).

    Raises:
        AnnotationError: the file is missing, not JSON, or holds a problem that cannot be
            repaired (the message names the file, the entry and the field).
    """
    data, report = validate_dataset(read_json(ann_file), ann_file, kind, image_root)
    api = build_api(data, kind)
    imgs, cats = api.imgs, api.cats
    anns_by_img = api.imgToAnns
    categories = [cats[c] for c in sorted(cats)]
    cat_to_label = {c["id"]: i + 1 for i, c in enumerate(categories)}
    records = []
    for image_id in sorted(imgs):
        img = imgs[image_id]
        entries = [_ann_to_entry(a, cat_to_label) for a in anns_by_img.get(image_id, [])]
        records.append(ImageRecord(image_id, _lvis_file_name(img), int(img["height"]),
                                   int(img["width"]), [e for e in entries if e is not None]))
    return AnnotationSet(records, categories, api, report)


class DetectionDataset(Dataset):
    """Images + instance targets for torchvision detectors.

    ``__getitem__`` accepts an index or ``(index, aug_seed)``; the seed makes the random
    resize/flip a function of the sample's position in the training stream (reproducible across
    workers, world sizes and resumes). Unreadable images are counted: in training another image
    is used instead, in evaluation the sample comes back with ``target["unreadable"] = True`` and
    no pixels, so the evaluator can skip and report it.

    Args:
        image_root: folder the ``file_name`` entries are relative to.
        records: from :func:`load_annotation_index`.
        transform: a :class:`DetectionTransform`.
        filter_empty: drop images without usable annotations (training default, as detectron2).
    """

    def __init__(self, image_root: str, records: list, transform: DetectionTransform,
                 filter_empty: bool = False):
        self.image_root = image_root
        self.records = [r for r in records if r.anns] if filter_empty else list(records)
        self.transform = transform
        self.num_unreadable = 0

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, rec: ImageRecord):
        path = os.path.join(self.image_root, rec.file_name)
        image = load_rgb(path)
        if image.size != (rec.width, rec.height):
            raise ImageError(path, f"size {image.size} differs from the annotation's "
                                   f"{(rec.width, rec.height)}")
        return image

    def __getitem__(self, item):
        index, aug_seed = item if isinstance(item, tuple) else (item, index_seed(item))
        for attempt in range(10):
            rec = self.records[(index + attempt) % len(self.records)]
            try:
                image = self._load(rec)
            except ImageError as e:
                self.num_unreadable += 1
                logger.warning("skipping unreadable image %s (%s)", e.path, e.reason)
                if not self.transform.train:
                    return _unreadable_sample(rec)
                continue
            img, target = self.transform(image, rec.anns, random.Random(aug_seed))
            target["image_id"] = rec.image_id
            target["orig_size"] = (rec.height, rec.width)
            return img, target
        raise RuntimeError(f"10 consecutive unreadable images under {self.image_root!r}")


def index_seed(index: int) -> int:
    return (index * 2654435761 + 12345) % (2 ** 31)


def _unreadable_sample(rec: ImageRecord):
    return torch.zeros((3, 1, 1), dtype=torch.uint8), {
        "image_id": rec.image_id, "orig_size": (rec.height, rec.width), "unreadable": True,
        "boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}


def collate_detection(batch):
    """List of (image, target) → (list of images, list of targets) (sizes differ per image)."""
    images, targets = zip(*batch)
    return list(images), list(targets)
