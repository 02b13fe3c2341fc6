"""Single-core throughput of the selective-search backends on real photos.

Compares, on scikit-image's bundled photographs resized to 500x375 (an
ImageNet-like size), in one run and on one pinned core:

* the ``selectivesearch`` PyPI package (AlpacaDB), which SoCo copied;
* the literal oracle of ``tests/ss_oracle.py`` (slow; first image only);
* the original release's ``selective_search.py`` when ``--reference FILE`` points at it
  (a checkout of https://github.com/hologerry/SoCo; its code is loaded, never copied);
* our exact ``soco`` backend (``selective_search/soco_ss.py``), split into the compiled
  Felzenszwalb segmentation and the rest (LBP, region statistics, grouping);
* scikit-image's ``felzenszwalb`` alone (what the segmentation cost before);
* ``opencv-fast`` (OpenCV contrib, a different algorithm).

It checks that our regions equal the oracle's (and the reference's), and that with the
package's texture range (``texture_hist_max=1.0``) they equal the package's own output,
then prints per-image CPU seconds of this process (best of the repeats, methods interleaved
so that background load hits them alike), images/s and the speed-ups.

With ``--memory-sizes`` it also runs our backend once per size in a fresh process and prints
the peak resident memory of that process (what one ``generate_proposals`` worker needs).

Usage:
    python benchmarks/bench_selective_search.py [--repeats 3] [--oracle-images 1]
        [--reference /path/to/SoCo/selective_search/selective_search.py]
        [--memory-sizes 500x375,1000x750,2000x1500]
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
from skimage.segmentation import felzenszwalb as skimage_felzenszwalb  # noqa: E402
from skimage.transform import resize  # noqa: E402
from skimage.util import img_as_float  # noqa: E402

from selective_search import backends, soco_ss  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def pin_one_core() -> str:
    """Pin this process (and torch / OpenCV threads) to a single core."""
    note = "not pinned (no sched_setaffinity)"
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        note = f"pinned to core {core}"
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass
    import cv2
    cv2.setNumThreads(1)
    return note


def load_photo(name: str, height: int, width: int) -> np.ndarray:
    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = resize(image[:, :, :3], (height, width), anti_aliasing=True)
    return (image * 255).round().astype(np.uint8)


def run_package(image: np.ndarray) -> np.ndarray:
    import selectivesearch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package feeds float images to LBP
        _, regions = selectivesearch.selective_search(image, scale=300, sigma=0.9, min_size=100)
    return np.array([r["rect"] for r in regions], dtype=np.int64)


def load_reference(path: str):
    """The original release's ``selective_search`` function, loaded from its file."""
    spec = importlib.util.spec_from_file_location("soco_release_selective_search", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"error: --reference {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except (OSError, SyntaxError, ImportError) as err:
        raise SystemExit(f"error: --reference {path}: cannot load it ({err})") from None
    if not hasattr(module, "selective_search"):
        raise SystemExit(f"error: --reference {path}: no selective_search function in it")
    return module.selective_search


def run_reference(fn, image: np.ndarray) -> np.ndarray:
    """Rects of the original release, called as SoCo's proposal script called it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn(image, scale=300, sigma=0.9, min_size=100)
    return np.array([r["rect"] for r in out[1]], dtype=np.int64)  # (img, regions[, boxes])


def timed(fn, *args, **kwargs):
    """(CPU seconds of this process, result): other processes on the machine do not count."""
    start = time.process_time()
    out = fn(*args, **kwargs)
    return time.process_time() - start, out


def check_exactness(images: dict, oracle_images: int, reference=None) -> list[str]:
    """Regions of our backend vs the oracle, the package and the reference; report lines."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from ss_oracle import oracle_regions

    lines = []
    for k, (name, image) in enumerate(images.items()):
        ours = soco_ss.soco_regions(image)
        package_mode = soco_ss.soco_regions(image, texture_hist_max=1.0)
        same_pkg = np.array_equal(package_mode, run_package(image))
        same_fz = np.array_equal(soco_ss.segment(image),
                                 skimage_felzenszwalb(img_as_float(image), 300, 0.9, 100))
        line = (f"  {name:10s} {len(ours):4d} regions; felzenszwalb labels == scikit-image's: "
                f"{same_fz}; package-mode == selectivesearch: {same_pkg}")
        if reference is not None:
            line += f"; soco == reference: {np.array_equal(ours, run_reference(reference, image))}"
        if k < oracle_images:
            seconds, oracle = timed(oracle_regions, image)
            line += f"; soco == oracle: {np.array_equal(ours, oracle)} (oracle {seconds:.2f} s)"
        lines.append(line)
    return lines


def run_soco_split(image: np.ndarray) -> tuple[float, float]:
    """Our soco backend, timed in two parts: (Felzenszwalb CPU seconds, the rest)."""
    start = time.process_time()
    labels = soco_ss.segment(image)
    middle = time.process_time()
    soco_ss.soco_regions_from_labels(image, labels)
    return middle - start, time.process_time() - middle


def benchmark(images: dict, repeats: int, reference=None) -> dict:
    """Best-of-``repeats`` CPU seconds per image for each method, interleaved per repeat.

    The minimum is reported because background load only ever adds time.
    """
    methods = {"selectivesearch (PyPI)": run_package}
    if reference is not None:
        methods["original release"] = lambda im: run_reference(reference, im)
    methods.update({
        "soco (ours)": None,  # filled from run_soco_split
        "  felzenszwalb (ours)": run_soco_split,
        "  the rest (ours)": None,
        "skimage felzenszwalb": lambda im: skimage_felzenszwalb(img_as_float(im), 300, 0.9, 100),
        "opencv-fast": lambda im: backends.run_backend(im, "opencv-fast"),
    })
    times = {m: {n: [] for n in images} for m in methods}
    for _ in range(repeats):
        for name, image in images.items():
            for method, fn in methods.items():
                if fn is None:
                    continue
                seconds, out = timed(fn, image)
                if fn is run_soco_split:
                    times["soco (ours)"][name].append(sum(out))
                    times["  the rest (ours)"][name].append(out[1])
                    seconds = out[0]
                times[method][name].append(seconds)
    return {m: {n: min(ts) for n, ts in per.items()} for m, per in times.items()}


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(size: str) -> None:
    """Run our backend once on a photo of ``size``; print peak and baseline RSS (MiB) as JSON.

    The kernel's high-water mark is reset after the imports and the warm-up (Linux
    ``/proc/self/clear_refs``), so the peak is that of the search itself.
    """
    width, height = (int(v) for v in size.lower().split("x"))
    backends.run_backend(load_photo("astronaut", 40, 50), "soco")  # imports, compiled code
    image = load_photo("astronaut", height, width)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    baseline = _status_mib("VmRSS")
    start = time.process_time()
    boxes = backends.run_backend(image, "soco")
    seconds = time.process_time() - start
    print(json.dumps({"size": size, "pixels": width * height, "baseline_mib": baseline,
                      "peak_mib": _status_mib("VmHWM"), "seconds": seconds,
                      "boxes": len(boxes)}))


def memory_table(sizes: list[str]) -> list[str]:
    """Peak memory per worker against image size, one fresh process per size."""
    lines = [f"{'size':>11s}{'MPix':>7s}{'peak RSS MiB':>14s}{'above baseline':>16s}"
             f"{'bytes/pixel':>13s}{'CPU s':>8s}"]
    for size in sizes:
        out = subprocess.run([sys.executable, __file__, "--memory-child", size],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        extra = row["peak_mib"] - row["baseline_mib"]
        lines.append(f"{size:>11s}{row['pixels'] / 1e6:7.2f}{row['peak_mib']:14.0f}{extra:16.0f}"
                     f"{extra * 2**20 / row['pixels']:13.0f}{row['seconds']:8.2f}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per image and method (the fastest is reported)")
    parser.add_argument("--oracle-images", type=int, default=1,
                        help="how many images to also run through the slow oracle (0 skips it)")
    parser.add_argument("--size", default="500x375",
                        help="photo size WIDTHxHEIGHT after resizing")
    parser.add_argument("--photos", type=int, default=len(PHOTOS),
                        help=f"how many of {', '.join(PHOTOS)} to use")
    parser.add_argument("--reference", metavar="FILE", default=None,
                        help="the original release's selective_search/selective_search.py "
                             "(from a checkout of hologerry/SoCo): also time it and compare")
    parser.add_argument("--memory-sizes", default="",
                        help="comma-separated WIDTHxHEIGHT sizes for the peak-memory table, "
                             "e.g. 500x375,1000x750,2000x1500 (one fresh process each)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        return peak_memory_child(args.memory_child)
    width, height = (int(v) for v in args.size.lower().split("x"))
    reference = load_reference(args.reference) if args.reference else None

    pin_note = pin_one_core()
    images = {name: load_photo(name, height, width) for name in PHOTOS[:max(1, args.photos)]}
    print(f"# selective search, {len(images)} photos at {width}x{height}, {pin_note}, "
          f"CPU time of this process, best of {args.repeats} interleaved runs")
    soco_ss.soco_regions(images[next(iter(images))])  # load the compiled code first
    print("exactness:")
    for line in check_exactness(images, args.oracle_images, reference):
        print(line)

    best = benchmark(images, args.repeats, reference)
    header = "".join(f"{n:>11s}" for n in images)
    print(f"\n{'method':24s}{header}{'s/img':>9s}{'img/s':>8s}")
    totals = {}
    for method, per in best.items():
        totals[method] = sum(per.values()) / len(per)
        print(f"{method:24s}" + "".join(f"{per[n]:11.3f}" for n in images)
              + f"{totals[method]:9.3f}{1 / totals[method]:8.2f}")
    ours, package = totals["soco (ours)"], totals["selectivesearch (PyPI)"]
    fz, fz_skimage = totals["  felzenszwalb (ours)"], totals["skimage felzenszwalb"]
    per_image = ", ".join(
        f"{best['selectivesearch (PyPI)'][n] / best['soco (ours)'][n]:.2f}x" for n in images)
    print(f"\nspeed-up of soco (ours) over selectivesearch: {package / ours:.2f}x "
          f"(per-image: {per_image}; target >= 5x)")
    if reference is not None:
        print(f"speed-up of soco (ours) over the original release: "
              f"{totals['original release'] / ours:.2f}x")
    print(f"split of our time: felzenszwalb {fz:.3f} s/img ({fz / ours:.0%}), the rest (LBP, "
          f"region statistics, grouping) {ours - fz:.3f} s/img ({(ours - fz) / ours:.0%})")
    print(f"compiled felzenszwalb vs scikit-image's: {fz_skimage / fz:.2f}x "
          f"({fz_skimage:.3f} -> {fz:.3f} s/img, identical labels)")
    if args.memory_sizes:
        print("\npeak memory of one worker (soco backend, fresh process per size; baseline = "
              "the process after imports, a warm-up and loading the image):")
        for line in memory_table([v for v in args.memory_sizes.split(",") if v]):
            print("  " + line)


if __name__ == "__main__":
    main()
