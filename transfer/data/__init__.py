"""Data loaders for fine-tuning: COCO-format / LVIS datasets, transforms, samplers."""
from __future__ import annotations

import os

import torch
from torch.utils.data import BatchSampler, DataLoader

from socokit.errors import InputPathError
from socokit.training import seed_worker
from transfer.data.annotations import AnnotationError, AnnotationReport
from transfer.data.coco import AnnotationSet, DetectionDataset, collate_detection, load_annotation_index
from transfer.data.samplers import (AspectRatioGroupedBatchSampler, InferenceSampler, InfiniteSampler,
                                    repeat_factors)
from transfer.data.transforms import DetectionTransform

__all__ = ["AnnotationError", "AnnotationReport", "AnnotationSet", "AspectRatioGroupedBatchSampler",
           "DetectionDataset", "DetectionTransform", "InferenceSampler", "InfiniteSampler",
           "build_test_loader", "build_train_loader", "load_annotation_index", "load_split"]


def load_split(image_root: str, ann_file: str, kind: str = "coco"):
    """The validated :class:`~transfer.data.coco.AnnotationSet` of one split (unpacks as
    records, categories, api), checking the image folder exists.

    Raises:
        AnnotationError: the annotation file is missing or cannot be repaired.
        socokit.errors.InputPathError: ``image_root`` is not a folder.
    """
    if not os.path.isdir(image_root):
        raise InputPathError(f"image folder {image_root!r} not found")
    return load_annotation_index(ann_file, kind, image_root=image_root)


def build_train_loader(records: list, image_root: str, *, batch_size: int, seed: int, rank: int,
                       world_size: int, start_iter: int, accum_steps: int = 1,
                       min_sizes=(640, 672, 704, 736, 768, 800), max_size: int = 1333,
                       flip_prob: float = 0.5, with_masks: bool = True, filter_empty: bool = True,
                       repeat_threshold: float = 0.0, num_workers: int = 2, pin_memory: bool = False,
                       group_aspect: bool = True):
    """Endless training loader (one batch of ``batch_size`` images per micro-step and rank).

    Args:
        start_iter: optimizer steps already done (resume); the stream continues where it was.
        accum_steps: micro-batches per optimizer step (the stream advances by all of them).
        repeat_threshold: LVIS repeat-factor threshold t (0 = uniform sampling).
        group_aspect: batch landscape and portrait images separately (detectron2's
            ``ASPECT_RATIO_GROUPING``, :class:`AspectRatioGroupedBatchSampler`).

    Returns:
        (DataLoader yielding (list of uint8 images, list of targets), dataset).
    """
    transform = DetectionTransform(True, min_sizes, max_size, flip_prob, with_masks)
    dataset = DetectionDataset(image_root, records, transform, filter_empty=filter_empty)
    if len(dataset) == 0:
        raise InputPathError(f"no training images with annotations under {image_root!r}")
    factors = repeat_factors(dataset.records, repeat_threshold) if repeat_threshold > 0 else None
    if group_aspect:
        stream = InfiniteSampler(len(dataset), seed=seed, rank=rank, world_size=world_size, rep_factors=factors)
        batches = AspectRatioGroupedBatchSampler(stream, [r.width > r.height for r in dataset.records],
                                                 batch_size, skip_batches=start_iter * accum_steps)
    else:
        stream = InfiniteSampler(len(dataset), seed=seed, rank=rank, world_size=world_size,
                                 start=start_iter * accum_steps * batch_size, rep_factors=factors)
        batches = BatchSampler(stream, batch_size, drop_last=True)
    loader = DataLoader(dataset, batch_sampler=batches,
                        num_workers=num_workers, collate_fn=collate_detection,
                        worker_init_fn=seed_worker, pin_memory=pin_memory,
                        persistent_workers=num_workers > 0,
                        prefetch_factor=4 if num_workers > 0 else None,
                        # own generator: creating the iterator must not draw from the global RNG
                        # (that stream drives RoI sampling and must survive a resume unchanged)
                        generator=torch.Generator().manual_seed(seed * 1000 + rank))
    return loader, dataset


def build_test_loader(records: list, image_root: str, *, rank: int, world_size: int,
                      batch_size: int = 1, num_workers: int = 2, max_images: int = 0,
                      pin_memory: bool = False, resize: tuple[int, int] | None = None):
    """Evaluation loader over this rank's contiguous shard.

    Args:
        resize: (shorter side, cap of the longer side): resize in the workers with the training
            resize (PIL bilinear on 8-bit; targets marked ``pre_resized``). None: original sizes,
            the model resizes.
    """
    if max_images > 0:
        records = records[:max_images]
    transform = DetectionTransform(False, with_masks=False) if resize is None else \
        DetectionTransform(False, (int(resize[0]),), int(resize[1]), with_masks=False, resize_test=True)
    dataset = DetectionDataset(image_root, records, transform)
    sampler = InferenceSampler(len(dataset), rank, world_size)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_detection, pin_memory=pin_memory,
                        generator=torch.Generator().manual_seed(rank))
    return loader, dataset
