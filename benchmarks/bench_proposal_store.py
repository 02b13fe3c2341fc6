"""Benchmarks of the proposal pipeline: store vs JSON memory, and generation scaling.

(a) ``store``: a synthetic store of ``--num-images`` x ``--boxes-per-image`` boxes (default:
    ImageNet-1k train, 1,281,167 images x 30 boxes) is written with the store writer; then
    ``--loader-workers`` forked processes (as DataLoader workers) each open it and read
    ``--reads`` random items (path, size, boxes). The same data in the original release's JSON
    format (``{basename: [[x, y, w, h], ...]}``) is measured at ``--json-num-images`` images
    (a full-size dict needs ~6 KB per image, ~8 GB per process) in two ways: loaded by every
    worker (``json.load`` per process, as every rank did), and loaded once and shared with
    forked workers copy-on-write (as the original DataLoader workers; reference counting
    dirties the pages). Per-image figures are extrapolated linearly to ``--num-images``.
    Memory is read from ``/proc/<pid>/status`` (VmRSS, RssFile, RssAnon) and ``smaps_rollup``
    (Private_Dirty: memory only this process wrote, which can be neither shared nor dropped;
    memory-mapped store pages are clean page cache, counted in RssFile and shared by all
    processes); "growth" is private dirty after minus before opening + reading.
(b) ``scaling``: generation throughput of ``--workers 1`` vs ``--workers 2`` on 16 photos
    (scikit-image's bundled photographs resized to 500 x 375), with the CPU time used and the
    load average, so that a ratio below 2 on a busy machine can be told from overhead.

    python benchmarks/bench_proposal_store.py                      # both, full size
    python benchmarks/bench_proposal_store.py store --num-images 200000
    python benchmarks/bench_proposal_store.py scaling --backend soco
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time

import numpy as np

from socokit.proposal_store import ProposalStore, write_store_arrays, xyxy_inclusive_to_xywh


def mem_info(pid: str = "self") -> dict:
    """Memory of a process in MB: VmRSS, RssAnon, RssFile (/proc/PID/status) and
    PrivateDirty (/proc/PID/smaps_rollup Private_Dirty: pages only this process wrote, which
    cannot be shared or dropped; clean file-backed pages of a memory map are page cache)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) / 1024
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Private_Dirty:"):
                out["PrivateDirty"] = int(line.split()[1]) / 1024
    return out


def synthetic_arrays(num_images: int, boxes_per_image: int, seed: int = 0,
                     block: int = 100_000) -> dict:
    """ImageNet-like sizes, class-folder paths and random valid boxes (vectorised per block)."""
    rng = np.random.default_rng(seed)
    sizes = np.stack([rng.integers(200, 501, num_images), rng.integers(200, 501, num_images)],
                     axis=1).astype(np.int32)  # [N, 2] (H, W)
    boxes = np.empty((num_images * boxes_per_image, 4), np.int32)  # [M, 4]
    for a in range(0, num_images, block):
        hw = np.repeat(sizes[a:a + block], boxes_per_image, axis=0).astype(np.int64)  # [m, 2]
        m = len(hw)
        bw = (rng.random(m) * (hw[:, 1] - 32) + 32).astype(np.int64)
        bh = (rng.random(m) * (hw[:, 0] - 32) + 32).astype(np.int64)
        x1 = (rng.random(m) * (hw[:, 1] - bw + 1)).astype(np.int64)
        y1 = (rng.random(m) * (hw[:, 0] - bh + 1)).astype(np.int64)
        boxes[a * boxes_per_image:a * boxes_per_image + m] = np.stack(
            [x1, y1, x1 + bw - 1, y1 + bh - 1], axis=1)
    offsets = np.arange(num_images + 1, dtype=np.int64) * boxes_per_image
    names = [f"n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG" for i in range(num_images)]
    encoded = [n.encode() for n in names]
    path_offsets = np.zeros(num_images + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=path_offsets[1:])
    return {"boxes": boxes, "offsets": offsets, "sizes": sizes, "names": names,
            "paths_bin": np.frombuffer(b"".join(encoded), np.uint8), "path_offsets": path_offsets}


def _store_worker(path: str, reads: int, seed: int, queue) -> None:
    before = mem_info()
    t = time.perf_counter()
    store = ProposalStore.open(path)
    open_s = time.perf_counter() - t
    idx = np.random.default_rng(seed).integers(0, len(store), reads)
    t = time.perf_counter()
    total = 0
    for i in idx.tolist():
        total += len(store.boxes(i)) + store.size(i)[0] + len(store.path(i))
    queue.put({"open_s": open_s, "read_s": time.perf_counter() - t, "before": before,
               "after": mem_info(), "check": total})


def _json_worker(json_path: str | None, shared: dict | None, reads: int, seed: int, queue) -> None:
    before = mem_info()
    t = time.perf_counter()
    if shared is None:
        with open(json_path) as f:
            data = json.load(f)
    else:
        data = shared  # inherited through fork, copy-on-write
    open_s = time.perf_counter() - t
    keys = list(data)
    idx = np.random.default_rng(seed).integers(0, len(keys), reads)
    t = time.perf_counter()
    total = 0
    for i in idx.tolist():  # the original loader turned each entry into an array per item
        total += len(np.asarray(data[keys[i]], dtype=np.int64).reshape(-1, 4))
    queue.put({"open_s": open_s, "read_s": time.perf_counter() - t, "before": before,
               "after": mem_info(), "check": total})


def run_workers(target, args_list: list[tuple]) -> list[dict]:
    """Runs one forked process per args tuple concurrently; returns their reports."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, queue)) for a in args_list]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return results


def _row(name: str, results: list[dict], disk_mb: float, scale: float = 1.0) -> str:
    """One table row; with ``scale`` != 1 only the size-proportional columns are shown."""
    mean = lambda key: np.mean([r["after"][key] for r in results])  # noqa: E731
    growth = np.mean([r["after"]["PrivateDirty"] - r["before"]["PrivateDirty"] for r in results])
    open_s = np.mean([r["open_s"] for r in results])
    if scale != 1.0:
        return (f"| {name} | {disk_mb * scale:,.0f} | {open_s * scale:.2f} | - | - | - | - | - | "
                f"{growth * scale:,.0f} |")
    return (f"| {name} | {disk_mb:,.0f} | {open_s:.4f} | "
            f"{np.mean([r['read_s'] for r in results]):.2f} | {mean('VmRSS'):,.0f} | "
            f"{mean('RssFile'):,.0f} | {mean('RssAnon'):,.0f} | {mean('PrivateDirty'):,.0f} | "
            f"{growth:,.0f} |")


def bench_store(args) -> None:
    tmp = tempfile.mkdtemp(prefix="bench_store_", dir=args.tmp_dir)
    try:
        t = time.perf_counter()
        a = synthetic_arrays(args.num_images, args.boxes_per_image)
        make_s = time.perf_counter() - t
        t = time.perf_counter()
        path = os.path.join(tmp, "synthetic.proposals")
        write_store_arrays(path, boxes=a["boxes"], offsets=a["offsets"], sizes=a["sizes"],
                           paths_bin=a["paths_bin"], path_offsets=a["path_offsets"],
                           meta={"backend": "synthetic", "filter": None})
        write_s = time.perf_counter() - t
        disk_mb = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 2**20
        print(f"synthetic store: {args.num_images:,} images x {args.boxes_per_image} boxes; "
              f"arrays made in {make_s:.1f}s, written in {write_s:.1f}s, {disk_mb:,.0f} MB on disk")
        del a  # workers fork from a lean parent
        gc.collect()
        w, reads = args.loader_workers, args.reads
        store_res = run_workers(_store_worker, [(path, reads, s) for s in range(w)])
        n_json = min(args.json_num_images, args.num_images)
        t = time.perf_counter()
        store = ProposalStore.open(path)
        off = np.asarray(store.arrays()["offsets"][:n_json + 1]).tolist()
        xywh = xyxy_inclusive_to_xywh(store.arrays()["boxes"][:off[-1]]).tolist()
        json_path = os.path.join(tmp, "proposals.json")
        with open(json_path, "w") as f:
            json.dump({os.path.splitext(os.path.basename(store.path(i)))[0]: xywh[off[i]:off[i + 1]]
                       for i in range(n_json)}, f)
        del xywh, store
        gc.collect()
        json_mb = os.path.getsize(json_path) / 2**20
        print(f"JSON of the first {n_json:,} images: {json_mb:,.0f} MB, made in "
              f"{time.perf_counter() - t:.1f}s")
        json_res = run_workers(_json_worker, [(json_path, None, reads, s) for s in range(w)])
        parent_before = mem_info()["PrivateDirty"]
        with open(json_path) as f:
            shared = json.load(f)  # the parent holds the dict; forked workers share it (COW)
        parent_dict_mb = mem_info()["PrivateDirty"] - parent_before
        cow_res = run_workers(_json_worker, [(None, shared, reads, s) for s in range(w)])
        scale = args.num_images / n_json
        print(f"\n{w} loader processes, each opening the data and reading {reads:,} random items "
              f"(mean per process; MB; open in s)\n")
        print("| data | disk MB | open s | read s | RSS | RssFile | RssAnon | private dirty | "
              "private dirty growth |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(_row(f"store, {args.num_images:,} images (memory-mapped)", store_res, disk_mb))
        print(_row(f"JSON per worker, {n_json:,} images (measured)", json_res, json_mb))
        print(_row(f"JSON per worker, extrapolated to {args.num_images:,} "
                   f"(disk, open, growth x{scale:.1f})", json_res, json_mb, scale))
        print(_row(f"JSON dict shared by fork (COW), {n_json:,} images (measured)", cow_res,
                   json_mb))
        print(f"\nthe {n_json:,}-image dict costs the parent {parent_dict_mb:,.0f} MB private "
              "dirty "
              f"(x{scale:.1f} = {parent_dict_mb * scale:,.0f} MB at {args.num_images:,} images)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _photos(folder: str, num: int) -> list[str]:
    """``num`` photos (scikit-image's bundled ones, cycled) resized to 500 x 375 JPEGs."""
    from PIL import Image

    from demo.data import export_skimage_photos

    src = export_skimage_photos(os.path.join(folder, "src"))
    if not src:
        raise SystemExit("error: scikit-image ships no bundled photographs here")
    out = os.path.join(folder, "photos")
    os.makedirs(out, exist_ok=True)
    names = []
    for k in range(num):
        with Image.open(src[k % len(src)]) as im:
            img = im.convert("RGB").resize((500, 375), Image.BILINEAR)
            if k >= len(src):  # cycled photos differ: mirror them
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            name = f"photo_{k:02d}.jpg"
            img.save(os.path.join(out, name), quality=90)
            names.append(name)
    return [os.path.join(out, n) for n in names]


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def bench_scaling(args) -> None:
    from selective_search import backends
    from selective_search.generate_proposals import run_shard
    from socokit.log import setup_logging

    log = setup_logging(name="soco")
    tmp = tempfile.mkdtemp(prefix="bench_scaling_", dir=args.tmp_dir)
    try:
        files = _photos(tmp, args.num_photos)
        relpaths = sorted(os.path.basename(f) for f in files)
        cfg = {"image_root": os.path.dirname(files[0]), "backend": args.backend,
               "max_side": None, "params": backends.default_params(args.backend)}
        times = {1: [], 2: []}
        for rep in range(args.repeats):  # interleaved, so that both see the same machine load
            for workers in (1, 2):
                work = os.path.join(tmp, f"work{workers}_{rep}")
                os.makedirs(os.path.join(work, "chunks"))
                load_before = os.getloadavg()[0]
                cpu_before = _cpu_seconds()
                t = time.perf_counter()
                stats = run_shard(relpaths, cfg, 4, work, 0, 1, workers, log)
                wall = time.perf_counter() - t
                times[workers].append(wall)
                cpu = _cpu_seconds() - cpu_before
                print(f"--workers {workers}: {len(relpaths)} images, {stats['boxes']} boxes in "
                      f"{wall:.2f}s = {len(relpaths) / wall:.2f} images/s; CPU "
                      f"{cpu / len(relpaths):.2f} s/image; CPU busy {cpu / wall:.2f} of "
                      f"{workers} process(es); load average {load_before:.1f} -> "
                      f"{os.getloadavg()[0]:.1f}")
        best1, best2 = min(times[1]), min(times[2])
        print(f"\nscaling {args.backend} on {len(relpaths)} photos 500x375, {os.cpu_count()} CPUs, "
              f"best of {args.repeats}: --workers 2 is {best1 / best2:.2f}x --workers 1 "
              "(target >= 1.8x)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("which", nargs="?", default="all", choices=["all", "store", "scaling"],
                   help="which benchmark to run")
    p.add_argument("--num-images", type=int, default=1_281_167,
                   help="images in the synthetic store")
    p.add_argument("--boxes-per-image", type=int, default=30, help="boxes per synthetic image")
    p.add_argument("--json-num-images", type=int, default=100_000,
                   help="images in the JSON comparison (each process holds ~6 KB per image)")
    p.add_argument("--loader-workers", type=int, default=4, help="loader processes")
    p.add_argument("--reads", type=int, default=100_000, help="random items read per process")
    p.add_argument("--backend", default="soco", help="selective-search backend for the scaling run")
    p.add_argument("--num-photos", type=int, default=16, help="photos in the scaling run")
    p.add_argument("--repeats", type=int, default=1,
                   help="scaling runs per worker count (interleaved; the best is compared)")
    p.add_argument("--tmp-dir", default=None, help="scratch folder (default: the system's)")
    args = p.parse_args(argv)
    if args.which in ("all", "store"):
        bench_store(args)
    if args.which in ("all", "scaling"):
        bench_scaling(args)


if __name__ == "__main__":
    main()
