"""The configuration of proposal generation (``selective_search/generate_proposals.py``).

Sections (each a :class:`socokit.config.Section`; field name = recipe key = ``--flag``):

* :class:`ProposalIOConfig` -- the images and the store to write;
* :class:`SearchConfig` -- the selective-search backend and its parameters;
* :class:`ShardConfig` -- processes, shards, chunks (the unit of resume) and the merge;
* :class:`PostFilterConfig` -- the optional filtered store written after the merge.

Defaults reproduce the original release (``soco`` backend, full resolution). See
docs/selective_search.md.
"""
from __future__ import annotations

from dataclasses import dataclass

from selective_search.filters import parse_strategy
from socokit.config import Config, Section, option, section
from socokit.errors import ConfigError

BACKENDS = ("soco", "opencv-fast", "opencv-quality", "opencv-single")
#: The parameters each backend runs with when none are given.
BACKEND_DEFAULTS = {
    "soco": {"scale": 300, "sigma": 0.9, "min_size": 100},
    # OpenCV's own defaults for each preset.
    "opencv-fast": {"base_k": 150, "inc_k": 150, "sigma": 0.8},
    "opencv-quality": {"base_k": 150, "inc_k": 150, "sigma": 0.8},
    "opencv-single": {"k": 200, "sigma": 0.8},
}
#: Backend parameters that have a flag (each applies to some backends only).
BACKEND_FLAGS = ("scale", "sigma", "min_size", "base_k", "inc_k", "k")


@dataclass
class ProposalIOConfig(Section):
    """The images to search and the proposal store to write."""

    image_root: str | None = option(None, "image folder, searched recursively (ImageNet train/ layout or any "
                                    "tree); store paths are relative to it. Required unless --merge")
    coco_json: str | None = option(None, "take the image list from this COCO annotation file "
                                   "('images[*].file_name', relative to --image-root) instead of a folder scan")
    file_list: str | None = option(None, "take the image list from this text file (one path relative to "
                                   "--image-root per line, e.g. written by --write-file-list) instead of walking the "
                                   "folder: array jobs then never re-walk a 1.28 M-image tree")
    write_file_list: str | None = option(None, "only list the images of --image-root (or --coco-json) into FILE, "
                                         "one per line, and exit", metavar="FILE")
    output: str | None = option(None, "proposal store folder to create (conventionally NAME.proposals); "
                                "required unless --write-file-list")
    overwrite: bool = option(False, "replace an existing store at --output", negatable=False)


@dataclass
class SearchConfig(Section):
    """The selective-search backend and its parameters (None: the backend's default)."""

    backend: str = option("soco", "'soco' reproduces the original release (quirks included); 'opencv-*' are "
                          "OpenCV ximgproc strategies (different, faster boxes)", choices=tuple(sorted(BACKENDS)))
    scale: float | None = option(None, "soco: Felzenszwalb scale (default: 300 as the release)", gt=0.0)
    sigma: float | None = option(None, "Felzenszwalb Gaussian sigma (default: the backend's, 0.9 for soco, 0.8 "
                                 "for opencv-*)", ge=0.0)
    min_size: int | None = option(None, "soco: Felzenszwalb minimum segment size in pixels (default: 100)", ge=0)
    base_k: int | None = option(None, "opencv-fast/-quality: first Felzenszwalb k (default: OpenCV's 150)", ge=1)
    inc_k: int | None = option(None, "opencv-fast/-quality: k increment between strategies (default: 150)", ge=1)
    k: int | None = option(None, "opencv-single: Felzenszwalb k (default: OpenCV's 200)", ge=1)
    max_side: int | None = option(None, "downscale images whose longer side exceeds this before the search "
                                  "(boxes are mapped back to the original frame); off = full resolution as the "
                                  "original", ge=1)

    def check(self) -> None:
        takes = BACKEND_DEFAULTS[self.backend]
        for name in BACKEND_FLAGS:
            if getattr(self, name) is not None and name not in takes:
                flags = ", ".join(takes)
                raise ConfigError(f"{name}: backend {self.backend!r} has no parameter {name} (it takes: {flags})",
                                  name, getattr(self, name))

    def backend_params(self) -> dict:
        """The backend's defaults updated with the parameters given."""
        params = dict(BACKEND_DEFAULTS[self.backend])
        params.update({n: getattr(self, n) for n in BACKEND_FLAGS if getattr(self, n) is not None})
        return params


@dataclass
class ShardConfig(Section):
    """Processes on this machine, shards across machines, chunks and the merge."""

    workers: int = option(1, "processes on this machine", ge=1)
    num_shards: int | None = option(None, "total shards (default: torchrun's WORLD_SIZE, else 1)", ge=1)
    shard_id: int | None = option(None, "this process's shard in 0..num-shards-1 (default: torchrun's RANK, "
                                  "else 0)", ge=0)
    work_dir: str | None = option(None, "folder for chunk files, shared by all shards (default: OUTPUT.work)")
    chunk_size: int = option(256, "images per chunk file: the unit of resume (a kill loses at most the chunks "
                             "in progress)", ge=1)
    steal: bool = option(False, "after this shard's chunks, also process other shards' chunks that no live worker "
                         "holds (a dead worker's locks go stale), and wait until every chunk is done; the worker "
                         "that sees the last chunk merges", negatable=False)
    lock_timeout: float = option(900.0, "seconds without progress after which another host's chunk lock is stale "
                                 "(a dead process on this host is detected at once)", gt=0.0)
    max_fail_fraction: float = option(0.5, "stop when more than this fraction of a chunk's images fail (counted over "
                                      "the run while fewer than 10 images were seen): a broken install or image "
                                      "root, not bad images; the failing chunk is not written", ge=0.0, le=1.0)
    merge: bool = option(False, "only merge the finished chunks of --work-dir into --output", negatable=False)
    no_merge: bool = option(False, "never merge automatically (by default shard 0 merges once all chunks "
                            "exist)", negatable=False)
    wait_for_shards: float = option(0.0, "seconds shard 0 waits for other shards' chunks before merging", ge=0.0)
    keep_work_dir: bool = option(False, "keep the chunk files after a successful merge", negatable=False)

    def check(self) -> None:
        if (self.num_shards is None) != (self.shard_id is None):
            key = "num_shards" if self.num_shards is not None else "shard_id"
            raise ConfigError(f"{key}: give both --num-shards and --shard-id, or neither", key, getattr(self, key))
        if self.num_shards is not None and self.shard_id >= self.num_shards:
            raise ConfigError(f"shard_id: {self.shard_id} is outside 0..{self.num_shards - 1} (num_shards "
                              f"{self.num_shards})", "shard_id", self.shard_id)


@dataclass
class PostFilterConfig(Section):
    """The filtered store written after the merge (same as ``filter_proposals.py``)."""

    filter: str | None = option(None, "after the merge, also write a filtered store, e.g. ratio3size0308post (the "
                                "released setting: filter + post step)", metavar="STRATEGY")
    filter_output: str | None = option(None, "filtered store folder (default: OUTPUT with _STRATEGY before "
                                       ".proposals)")

    def check(self) -> None:
        if self.filter is not None:
            try:
                parse_strategy(self.filter)
            except ValueError as e:
                raise ConfigError(f"filter: {e}", "filter", self.filter) from None


@dataclass
class ProposalConfig(Config):
    """Everything ``selective_search/generate_proposals.py`` runs on."""

    description = "Generate selective-search proposals for a folder of images into a proposal store."
    io: ProposalIOConfig = section(ProposalIOConfig, "input / output")
    search: SearchConfig = section(SearchConfig, "selective search")
    shard: ShardConfig = section(ShardConfig, "parallelism, sharding, resume")
    post: PostFilterConfig = section(PostFilterConfig, "optional filtering (same as filter_proposals.py)")
