"""The pretraining dataset: images + proposal store -> multi-view, box-aware samples.

Randomness: one ``numpy.random.Generator`` per sample drives everything in it (crops,
selection, jitter, padding, flips, colour, cutout, replacement of unreadable images). In training
the sampler (``socokit.resume.ResumableDistributedSampler``) hands ``__getitem__`` a
``SampleKey(index, seed, epoch)`` and the generator is seeded from those three numbers, so a
sample does not depend on the number of loader workers, the world size or where a run was
interrupted (exact resume). A plain integer index draws the generator's seed from NumPy's global
stream instead (tests, visualisation). torch's global RNG is not used here.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from pretrain.config import ARCH_LAYOUT, ARCHS, AUG_LAYOUT, AUGS, DEFAULT_AUG  # noqa: F401  (re-exported)
from pretrain.data.pipelines import PipelineConfig, make_geometry, make_tensors, make_uint8_views
from pretrain.topology import LAYOUT_TOPOLOGY
from socokit.errors import UnreadableImagesError  # noqa: F401  (re-exported)
from socokit.images import ImageError, load_rgb
from socokit.log import get_logger
from socokit.proposal_store import ProposalStore
from socokit.resume import SampleKey

_log = get_logger("pretrain.data")


class ViewPair(NamedTuple):
    """One pair of views the loss uses (symmetrically).

    ``view_*`` index ``item["views"]``, ``boxes_*`` index ``item["boxes"]`` and ``corres``
    indexes ``item["corres"]``: its rows index box set ``boxes_a`` (level-major for FPN) and its
    columns box set ``boxes_b``. For BYOL ``boxes_a``, ``boxes_b`` and ``corres`` are None.
    """

    view_a: int
    boxes_a: int | None
    view_b: int
    boxes_b: int | None
    corres: int | None


def view_pairs_for(layout: str) -> list[ViewPair]:
    """The :class:`ViewPair` list of a layout (see ``pretrain.data`` docstring)."""
    return [ViewPair(*pair) for pair in LAYOUT_TOPOLOGY[layout].view_pairs()]


class PretrainDataset(Dataset):
    """Multi-view samples for SoCo / BYOL pretraining (build it with ``build_pretrain_dataset``).

    Attributes:
        arch, aug: the recipe names.
        config: the :class:`~pretrain.data.pipelines.PipelineConfig`.
        view_sizes: output size of each view.
        box_set_views: for each box set, the view it belongs to.
        view_pairs: list of :class:`ViewPair`.
        num_levels: P, the FPN levels in a correspondence vector (1 for C4, 0 for BYOL).
        colour_aug: set to False to skip the colour pipelines (tests, visualisation).
    """

    def __init__(self, image_root: str, store: ProposalStore | None, config: PipelineConfig, *,
                 arch: str, aug: str, max_replace_tries: int = 10, paths: list[str] | None = None):
        self.image_root = os.fspath(image_root)
        self.store = store
        self._paths = paths
        self.config = config
        self.arch, self.aug = arch, aug
        self.max_replace_tries = max_replace_tries
        self.view_sizes = list(config.view_sizes)
        self.box_set_views = list(LAYOUT_TOPOLOGY[config.layout].set_views)
        self.view_pairs = view_pairs_for(config.layout)
        self.num_levels = {"c4": 1, "byol": 0}.get(config.layout, config.num_levels)
        self.colour_aug = True
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.store) if self.store is not None else len(self._paths)

    def image_path(self, index: int) -> str:
        rel = self.store.path(index) if self.store is not None else self._paths[index]
        return os.path.join(self.image_root, rel)

    def load(self, index: int):
        """(PIL RGB image, int [K, 4] proposals in the loaded image's frame). Raises ImageError."""
        path = self.image_path(index)
        img = load_rgb(path)
        if self.store is None:
            return img, np.zeros((0, 4), dtype=np.int64)
        boxes = self.store.boxes(index).astype(np.int64)
        store_h, store_w = self.store.size(index)
        if (store_h, store_w) != (img.height, img.width):
            # The store was built from a different rendition of the file: rescale the boxes.
            self._warn_once(path, f"size {img.height}x{img.width} differs from the proposal store's "
                                  f"{store_h}x{store_w}; proposals rescaled")
            scale = np.array([img.width / store_w, img.height / store_h] * 2)
            boxes = np.floor(boxes * scale).astype(np.int64)
        return img, boxes

    def _warn_once(self, path: str, reason: str) -> None:
        if path not in self._warned:
            self._warned.add(path)
            _log.warning("%s: %s", path, reason)

    def sample(self, img, proposals_xyxy: np.ndarray, rng: np.random.Generator) -> dict:
        """Views, boxes and correspondences of one image (no loading, no replacement)."""
        geometry = make_geometry(img, proposals_xyxy, rng, self.config)
        item = {"boxes": [torch.from_numpy(b) for b in geometry.boxes],
                "corres": [torch.from_numpy(c) for c in geometry.corres]}
        if self.config.colour_on_device:
            item["views"], item["colour_params"] = make_uint8_views(geometry, rng, self.colour_aug)
        else:
            item["views"] = make_tensors(geometry, rng, self.config, colour=self.colour_aug)
        return item

    def __getitem__(self, key) -> dict:
        """Sample ``key``: a :class:`socokit.resume.SampleKey` (training: randomness from
        ``(seed, epoch, index)``) or a plain index (randomness from NumPy's global stream)."""
        if isinstance(key, SampleKey):
            rng, index = key.rng(), key.index
        else:
            rng = np.random.default_rng(np.random.randint(0, 2**32, size=4, dtype=np.uint64))
            index = key
        current, failures, reasons = int(index), 0, []
        while True:
            try:
                img, proposals = self.load(current)
                break
            except ImageError as e:
                self._warn_once(e.path, f"unreadable image, replaced by another sample ({e.reason})")
                failures += 1
                reasons.append(f"{e.path}: {e.reason}")
                if failures >= self.max_replace_tries:
                    raise UnreadableImagesError(
                        f"{failures} consecutive unreadable images while loading sample {index} "
                        f"(image root {self.image_root!r}); last: {reasons[-3:]}") from e
                current = int(rng.integers(0, len(self)))
        item = self.sample(img, proposals, rng)
        item["index"] = current
        item["num_replaced"] = failures
        return item
