"""Generate selective-search proposals for a folder of images into a proposal store.

Examples::

    # one machine, 16 processes, then the released filter + post step
    python selective_search/generate_proposals.py --image-root data/imagenet/train \\
        --output proposals/train.proposals --workers 16 --filter ratio3size0308post

    # 64 shards on many machines (or torchrun: RANK / WORLD_SIZE), a shared work folder
    python selective_search/generate_proposals.py --image-root /data/imagenet/train \\
        --output /shared/train.proposals --num-shards 64 --shard-id 7 --workers 32
    python selective_search/generate_proposals.py --output /shared/train.proposals --merge

    # a SLURM job array: list the images once, then every task claims chunks; --steal lets
    # a finished task take a dead task's chunks, and the last one to finish merges
    python selective_search/generate_proposals.py --image-root /data/imagenet/train \
        --write-file-list /shared/train_files.txt
    python selective_search/generate_proposals.py --image-root /data/imagenet/train \
        --file-list /shared/train_files.txt --output /shared/train.proposals \
        --num-shards 64 --shard-id $SLURM_ARRAY_TASK_ID --workers 32 --steal

The image list is cut into chunks of ``--chunk-size`` images; each finished chunk is one
file written atomically in ``--work-dir`` (see :mod:`selective_search.sharding`), so a killed
run resumes where it stopped and the merged store is identical however the work was split.
Workers claim chunks with lock files, and the backend runs once on a synthetic image before any
real work, so a broken install stops at once instead of publishing an empty store. See
``docs/cluster.md`` for the SLURM job-array template.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # check the configuration before the heavy imports: a bad value fails fast
    from selective_search.config import ProposalConfig
    from socokit.config import parse_config_or_exit
    parse_config_or_exit(ProposalConfig, sys.argv[1:])

import collections
import concurrent.futures as cf
import json
import multiprocessing
import os
import shutil
import time
import warnings

import numpy as np
from tqdm import tqdm

from selective_search import backends, sharding
from selective_search.config import ProposalConfig
from socokit.config import build_parser as build_config_parser
from socokit.config import parse_config_or_exit
from socokit.errors import exit_on_user_error
from socokit.fileio import check_writable_dir
from socokit.images import IMAGE_EXTENSIONS, ImageError, find_images, load_rgb_array
from socokit.log import get_logger, setup_logging

_WORKER_CFG: dict = {}  # set once per process by _init_worker


#: The configuration class of this entry point (sections, options, validation).
CONFIG = ProposalConfig


def build_parser():
    """The argparse parser of every option (from :class:`selective_search.config.ProposalConfig`)."""
    return build_config_parser(ProposalConfig)


def _init_worker(cfg: dict) -> None:
    """Per-process setup: one thread per process (the parallelism is across images)."""
    import cv2

    cv2.setNumThreads(1)
    # the main process reports large images once, with the path (run_shard)
    warnings.simplefilter("ignore", backends.LargeImageWarning)
    _WORKER_CFG.clear()
    _WORKER_CFG.update(cfg)


def propose_one(relpath: str) -> tuple:
    """Loads one image and runs the backend; never raises for bad input.

    Returns:
        ``((h, w), boxes_xyxy int32 [K, 4], None)``, or ``(None, None, reason)`` when the
        image cannot be decoded or the search fails on it.
    """
    cfg = _WORKER_CFG
    path = os.path.join(cfg["image_root"], relpath)
    try:
        image = load_rgb_array(path)  # [H, W, 3] uint8, display orientation
    except ImageError as e:
        return None, None, e.reason
    except (OSError, MemoryError, ValueError) as e:
        return None, None, f"cannot load image ({type(e).__name__}: {e})"
    try:
        boxes_xyxy = backends.run_backend(image, backend=cfg["backend"], max_side=cfg["max_side"],
                                          **cfg["params"])
    except MemoryError:
        return None, None, f"out of memory in selective search ({image.shape[1]}x{image.shape[0]})"
    except Exception as e:  # a long run must survive any single image
        return None, None, f"selective search failed ({type(e).__name__}: {e})"
    boxes_xyxy = np.ascontiguousarray(np.asarray(boxes_xyxy, dtype=np.int32).reshape(-1, 4))
    return (int(image.shape[0]), int(image.shape[1])), boxes_xyxy, None


def ordered_results(relpaths: list[str], cfg: dict, workers: int):
    """Yields ``propose_one`` results in input order, using ``workers`` processes.

    A bounded window of in-flight tasks keeps memory flat for millions of images.
    """
    if workers <= 1:
        _init_worker(cfg)
        for p in relpaths:
            yield propose_one(p)
        return
    window = collections.deque()
    # spawn, not fork: a child forked after OpenCV started its thread pool in this process
    # deadlocks inside cv2 (seen with opencv 5 wheels), and fork under threads is unsafe anyway
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                initargs=(cfg,)) as pool:
        it = iter(relpaths)
        for p in it:
            window.append((p, pool.submit(propose_one, p)))
            if len(window) >= 4 * workers:
                break
        while window:
            p, fut = window.popleft()
            try:
                result = fut.result()
            except cf.process.BrokenProcessPool as e:
                raise SystemExit(f"error: a worker process died while processing {p} (out of "
                                 "memory?); finished chunks are kept, rerun to resume") from e
            nxt = next(it, None)
            if nxt is not None:
                window.append((nxt, pool.submit(propose_one, nxt)))
            yield result


def read_file_list(path: str) -> list[str]:
    """Relative image paths from a text file, one per line, in the file's order.

    Blank lines are skipped; a duplicate path or an absolute path is refused.
    """
    try:
        with open(path, encoding="utf-8") as f:
            relpaths = [line.rstrip("\r\n") for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: --file-list {path}: cannot read it ({e})") from e
    relpaths = [p for p in relpaths if p.strip()]
    if not relpaths:
        raise SystemExit(f"error: --file-list {path} lists no images")
    seen = set()
    for n, p in enumerate(relpaths, 1):
        if os.path.isabs(p):
            raise SystemExit(f"error: --file-list {path}: entry {n} ({p!r}) is absolute; list "
                             "paths relative to --image-root")
        if p in seen:
            raise SystemExit(f"error: --file-list {path}: {p!r} is listed twice (entry {n})")
        seen.add(p)
    return relpaths


def write_file_list(relpaths: list[str], path: str) -> None:
    """Write one relative path per line (atomically, umask permissions)."""
    from socokit.fileio import atomic_write

    with atomic_write(path, "w") as f:
        for p in relpaths:
            f.write(p + "\n")


def list_images(cfg: ProposalConfig) -> list[str]:
    """The relative image paths of the job: --file-list as given, or the sorted folder scan /
    COCO json."""
    if cfg.io.file_list:
        return read_file_list(cfg.io.file_list)
    if cfg.io.coco_json:
        try:
            with open(cfg.io.coco_json) as f:
                coco = json.load(f)
            names = {im["file_name"] for im in coco["images"]}
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise SystemExit(f"error: {cfg.io.coco_json}: not a readable COCO annotation file "
                             f"({type(e).__name__}: {e})") from e
        relpaths = sorted(n.replace(os.sep, "/") for n in names)
        if not relpaths:
            raise SystemExit(f"error: {cfg.io.coco_json} lists no images")
        return relpaths
    relpaths = find_images(cfg.io.image_root)
    if not relpaths:
        raise SystemExit(f"error: no images found under {cfg.io.image_root!r} "
                         f"(searched recursively for {', '.join(IMAGE_EXTENSIONS)})")
    return relpaths


def resolve_shard(cfg: ProposalConfig) -> tuple[int, int]:
    """(shard id, number of shards): the flags, else the launcher's RANK / WORLD_SIZE, else (0, 1)."""
    if cfg.shard.num_shards is None:
        from socokit.distributed import shard_from_env  # imports torch: only when needed

        return shard_from_env()
    return cfg.shard.shard_id, cfg.shard.num_shards


def filtered_output_path(output: str, strategy: str) -> str:
    base = output.rstrip("/")
    stem = base[: -len(".proposals")] if base.endswith(".proposals") else base
    return f"{stem}_{strategy}.proposals"


def check_outputs(cfg: ProposalConfig) -> None:
    """Fails before any work if an output exists (without --overwrite) or is not writable."""
    outs = [cfg.io.output] + ([cfg.post.filter_output] if cfg.post.filter else [])
    for out in outs:
        if os.path.exists(out) and not cfg.io.overwrite:
            raise SystemExit(f"error: {out} already exists; pass --overwrite to replace it")
        check_writable_dir(os.path.dirname(os.path.abspath(out)))
    if not cfg.shard.merge:  # a merge only reads the work folder (and deletes it at the end)
        check_writable_dir(cfg.shard.work_dir)


def synthetic_image(height: int = 96, width: int = 128) -> np.ndarray:
    """A uint8 RGB test image [H, W, 3]: four flat coloured blocks plus mild noise."""
    rng = np.random.default_rng(0)
    image = np.zeros((height, width, 3), np.uint8)
    colours = [(200, 40, 40), (40, 180, 60), (50, 60, 210), (230, 220, 90)]
    for n, colour in enumerate(colours):
        y, x = divmod(n, 2)
        image[y * height // 2:(y + 1) * height // 2, x * width // 2:(x + 1) * width // 2] = colour
    return np.clip(image + rng.integers(0, 12, image.shape), 0, 255).astype(np.uint8)


def self_test_backend(cfg: dict) -> int:
    """Run the backend once on :func:`synthetic_image` before any real work.

    Returns:
        the number of boxes found.

    Raises:
        SystemExit: the backend fails (e.g. ``cv2.ximgproc`` missing, with the fix) or finds
            no box at all on an image with four obvious regions.
    """
    try:
        with warnings.catch_warnings():  # advice about real images (size) does not apply here
            warnings.simplefilter("ignore")
            boxes = backends.run_backend(synthetic_image(), backend=cfg["backend"],
                                         max_side=cfg["max_side"], **cfg["params"])
    except Exception as e:  # any failure here would repeat on every image
        raise SystemExit(f"error: backend {cfg['backend']!r} fails its start-up self-test on a "
                         f"synthetic image: {e}") from None
    if len(boxes) == 0:
        raise SystemExit(f"error: backend {cfg['backend']!r} finds no box on a synthetic image "
                         "with four coloured regions; check its parameters")
    return len(boxes)


#: Below this many images a chunk's failure fraction is judged over the whole run so far.
MIN_IMAGES_FOR_FRACTION = 10


def check_failures(chunk_results: list, chunk_paths: list[str], stats: dict, limit: float,
                   k: int) -> None:
    """Stop when more than ``limit`` of chunk ``k``'s images failed (see --max-fail-fraction).

    Raises:
        SystemExit: naming the count, the most common reason and an example path.
    """
    failed = [(p, r[2]) for p, r in zip(chunk_paths, chunk_results) if r[0] is None]
    n, bad = len(chunk_results), len(failed)
    if n < MIN_IMAGES_FOR_FRACTION:
        n, bad = stats["images"], len(stats["unreadable"])
        if n < MIN_IMAGES_FOR_FRACTION:
            return
    if bad / n <= limit or not failed:
        return
    reasons = collections.Counter(reason for _, reason in failed)
    reason, count = reasons.most_common(1)[0]
    example = next(p for p, r in failed if r == reason)
    raise SystemExit(
        f"error: {bad} of {n} images failed (more than --max-fail-fraction {limit}) in chunk {k}; "
        f"most common cause ({count}x): {reason} (e.g. {example}). Nothing of this chunk was "
        "written; fix the cause and rerun to resume")


def run_shard(relpaths: list[str], cfg: dict, chunk_size: int, work_dir: str, shard_id: int,
              num_shards: int, workers: int, log, *, steal: bool = False,
              lock_timeout: float = 900.0, max_fail_fraction: float = 1.0,
              poll_s: float = 5.0) -> dict:
    """Processes this shard's unfinished chunks (and, with ``steal``, any other free ones).

    Each chunk is claimed with a lock file first (:func:`selective_search.sharding.try_claim`),
    so concurrent or restarted workers never do the same chunk twice while its owner lives.
    Returns counts for the summary.
    """
    total_chunks = sharding.num_chunks(len(relpaths), chunk_size)
    mine = sharding.shard_chunks(total_chunks, shard_id, num_shards)
    order = sharding.claim_order(total_chunks, shard_id, num_shards, steal)
    todo_set = set(sharding.missing_chunks(work_dir, total_chunks))
    todo = [k for k in order if k in todo_set]
    todo_images = sum(len(relpaths[sharding.chunk_slice(k, len(relpaths), chunk_size)]) for k in todo)
    log.info(f"shard {shard_id}/{num_shards}: {len(mine)} chunks, "
             f"{len(mine) - len([k for k in mine if k in todo_set])} already done, "
             f"{todo_images} images {'at most ' if steal else ''}to process with {workers} worker(s)"
             + (" (then helping other shards)" if steal else ""))
    stats = {"images": 0, "boxes": 0, "without_boxes": 0, "unreadable": [], "held_by_others": 0}
    claimed = collections.deque()
    warned_large = cfg["backend"] != "soco"

    def waiting(pending):
        log.info(f"waiting for {len(pending)} chunk(s) held by other live workers")

    def claimed_paths():
        for k in sharding.claim_chunks(work_dir, todo, lock_timeout, poll_s=poll_s, wait=steal,
                                       on_wait=waiting):
            claimed.append(k)
            yield from relpaths[sharding.chunk_slice(k, len(relpaths), chunk_size)]

    results_iter = ordered_results(claimed_paths(), cfg, workers)
    try:
        with tqdm(total=todo_images, unit="img", desc=f"shard {shard_id}", smoothing=0.05,
                  dynamic_ncols=True) as bar:
            for first in results_iter:
                k = claimed[0]
                chunk_paths = relpaths[sharding.chunk_slice(k, len(relpaths), chunk_size)]
                results = [first]
                sharding.touch_lock(work_dir, k)
                bar.update(1)
                for _ in range(len(chunk_paths) - 1):
                    results.append(next(results_iter))
                    sharding.touch_lock(work_dir, k)
                    bar.update(1)
                check_failures(results, chunk_paths, stats, max_fail_fraction, k)
                for relpath, res in zip(chunk_paths, results):
                    stats["images"] += 1
                    if res[0] is None:
                        stats["unreadable"].append({"path": relpath, "reason": res[2]})
                    else:
                        stats["boxes"] += len(res[1])
                        stats["without_boxes"] += len(res[1]) == 0
                        if not warned_large:
                            advice = backends.pixel_budget_advice(*res[0], cfg["max_side"], workers)
                            if advice is not None:
                                log.warning(f"{relpath}: {advice} (reported once per run)")
                                warned_large = True
                sharding.write_chunk(sharding.chunk_path(work_dir, k), chunk_paths, results)
                sharding.release(work_dir, claimed.popleft())
                bar.set_postfix(boxes=stats["boxes"], unreadable=len(stats["unreadable"]))
    finally:
        results_iter.close()
        for k in claimed:  # claimed but not finished (error or interrupt): free them at once
            sharding.release(work_dir, k)
    left = [k for k in mine if not os.path.exists(sharding.chunk_path(work_dir, k))]
    stats["held_by_others"] = len(left)
    if left:
        log.info(f"{len(left)} of this shard's chunks are held by other live workers")
    return stats


def log_summary(log, title: str, images: int, boxes: int, without_boxes: int,
                unreadable: list[dict]) -> None:
    log.info(f"{title}: {images} images, {boxes} boxes ({boxes / max(images, 1):.1f} per image), "
             f"{without_boxes} images without boxes, {len(unreadable)} unreadable images")
    for item in unreadable[:20]:
        log.info(f"  unreadable: {item['path']}: {item['reason']}")
    if len(unreadable) > 20:
        log.info(f"  ... and {len(unreadable) - 20} more (listed in the store's meta.json)")


def merge_and_finish(cfg: ProposalConfig, log) -> None:
    """Merges all chunks into --output, then optionally filters; removes the work folder."""
    manifest_path = os.path.join(cfg.shard.work_dir, sharding.MANIFEST)
    if not os.path.isfile(manifest_path):
        raise SystemExit(f"error: {cfg.shard.work_dir} has no {sharding.MANIFEST}: nothing to merge "
                         "(wrong --work-dir?)")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        total = sharding.num_chunks(manifest["job"]["num_images"], manifest["job"]["chunk_size"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {manifest_path}: unreadable work-folder manifest ({e})") from e
    meta = dict(manifest["meta"], created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    store = sharding.merge_chunks(cfg.shard.work_dir, total, cfg.io.output, meta)
    m = store.meta
    log_summary(log, f"store {cfg.io.output}", m["num_images"] + m["num_unreadable"],
                m["num_boxes"], m["num_images_without_boxes"], m["unreadable"])
    if not cfg.shard.keep_work_dir:
        shutil.rmtree(cfg.shard.work_dir, ignore_errors=True)
    if cfg.post.filter:
        from selective_search.filter_proposals import filter_store

        filter_store(cfg.io.output, cfg.post.filter_output, cfg.post.filter, log=log)


@exit_on_user_error
def main(argv=None) -> None:
    cfg = parse_config_or_exit(ProposalConfig, argv)
    if cfg.io.write_file_list:
        if not cfg.io.image_root:
            raise SystemExit("error: --write-file-list needs --image-root")
        relpaths = list_images(cfg)
        write_file_list(relpaths, cfg.io.write_file_list)
        print(f"wrote {len(relpaths)} image paths to {cfg.io.write_file_list}")
        return
    if not cfg.io.output:
        raise SystemExit("error: --output is required (unless --write-file-list)")
    cfg.shard.work_dir = cfg.shard.work_dir or cfg.io.output.rstrip("/") + ".work"
    if cfg.post.filter:
        cfg.post.filter_output = cfg.post.filter_output or filtered_output_path(cfg.io.output, cfg.post.filter)
    shard_id, num_shards = resolve_shard(cfg)
    setup_logging(rank=shard_id if num_shards > 1 else 0, name="soco")
    log = get_logger("soco.selective_search")
    check_outputs(cfg)
    if cfg.shard.merge:
        merge_and_finish(cfg, log)
        return
    if not cfg.io.image_root:
        raise SystemExit("error: --image-root is required (unless --merge)")
    params = cfg.search.backend_params()
    relpaths = list_images(cfg)
    image_root = os.path.abspath(cfg.io.image_root)
    job = {"num_images": len(relpaths), "paths_sha256": sharding.paths_digest(relpaths),
           "backend": cfg.search.backend, "backend_params": params, "max_side": cfg.search.max_side,
           "chunk_size": cfg.shard.chunk_size}
    meta = {"backend": cfg.search.backend, "backend_params": params, "max_side": cfg.search.max_side,
            "filter": None, "image_root": image_root, "coco_json": cfg.io.coco_json}
    sharding.prepare_work_dir(cfg.shard.work_dir, {"job": job, "image_root": image_root, "meta": meta})
    worker_cfg = {"image_root": image_root, "backend": cfg.search.backend, "max_side": cfg.search.max_side,
                  "params": params}
    log.info(f"backend self-test: {self_test_backend(worker_cfg)} boxes on a synthetic image")
    start = time.time()
    stats = run_shard(relpaths, worker_cfg, cfg.shard.chunk_size, cfg.shard.work_dir, shard_id, num_shards,
                      cfg.shard.workers, log, steal=cfg.shard.steal, lock_timeout=cfg.shard.lock_timeout,
                      max_fail_fraction=cfg.shard.max_fail_fraction)
    elapsed = time.time() - start
    log_summary(log, f"shard {shard_id}/{num_shards} done in {elapsed:.1f}s "
                f"({stats['images'] / max(elapsed, 1e-9):.2f} images/s)", stats["images"],
                stats["boxes"], stats["without_boxes"], stats["unreadable"])
    if cfg.shard.no_merge or (shard_id != 0 and num_shards > 1 and not cfg.shard.steal):
        return
    total = sharding.num_chunks(len(relpaths), cfg.shard.chunk_size)
    deadline = time.time() + cfg.shard.wait_for_shards
    missing = sharding.missing_chunks(cfg.shard.work_dir, total)
    while missing and time.time() < deadline:
        time.sleep(min(10.0, max(0.1, deadline - time.time())))
        missing = sharding.missing_chunks(cfg.shard.work_dir, total)
    if missing:
        log.info(f"{len(missing)} of {total} chunks belong to shards that have not finished; "
                 f"when they have, run: {os.path.basename(__file__)} --output {cfg.io.output} "
                 f"--work-dir {cfg.shard.work_dir} --merge")
        return
    if cfg.shard.steal and not _take_merge_lock(cfg.shard.work_dir):
        log.info("another worker is merging (or has merged) the chunks")
        return
    merge_and_finish(cfg, log)


def _take_merge_lock(work_dir: str) -> bool:
    """One of several stealing workers merges: the one that creates ``merge.lock`` first."""
    try:
        os.close(os.open(os.path.join(work_dir, "merge.lock"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except (FileExistsError, FileNotFoundError):  # taken, or merged and removed already
        return False
    return True


if __name__ == "__main__":
    main()
