"""The software and hardware a run used, as a plain dict: ``python -m socokit.env`` prints it.

Every log the toolkit's entry points write starts with this record (see
:func:`socokit.log.setup_logging`) and every checkpoint stores it under ``"env"`` (see
:func:`socokit.checkpoint.save_checkpoint`), so a result can be traced to the torch / CUDA /
cuDNN / NCCL versions, the GPU model, the toolkit's git commit and the package versions that
produced it. The record holds only str, int, float, bool, None, lists and dicts: it survives
``torch.load(..., weights_only=True)`` and ``json.dumps``.

Usage::

    python -m socokit.env            # human-readable
    python -m socokit.env --json     # one JSON object
"""
from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys

#: Distributions whose versions are recorded (absent ones are recorded as None).
PACKAGES = ("torch", "torchvision", "timm", "numpy", "pillow", "opencv-contrib-python-headless",
            "opencv-contrib-python", "opencv-python", "opencv-python-headless", "pycocotools",
            "lvis", "faster-coco-eval", "scikit-image", "selectivesearch", "pyyaml", "tensorboard",
            "tqdm")

#: Scheduler variables worth keeping with a result (job id, array index, nodes).
SLURM_KEYS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NODELIST",
              "SLURM_NNODES", "SLURM_NTASKS", "SLURM_RESTART_COUNT")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _package_versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


@functools.lru_cache(maxsize=1)
def git_state(root: str = REPO_ROOT) -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the toolkit's checkout.

    None when the toolkit is not a git checkout (an installed wheel) or git is missing.
    ``dirty`` counts modified tracked files only (untracked outputs do not make it dirty).
    """
    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def _opencv() -> dict:
    try:
        import cv2
    except ImportError as e:
        return {"version": None, "ximgproc": False, "error": str(e)}
    return {"version": cv2.__version__, "ximgproc": hasattr(cv2, "ximgproc")}


def _torch(torch) -> dict:
    out = {"version": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": bool(torch.cuda.is_available()), "cudnn": None, "nccl": None,
           "gpus": [], "num_threads": torch.get_num_threads()}
    if torch.backends.cudnn.is_available():
        out["cudnn"] = torch.backends.cudnn.version()
    try:
        nccl = torch.cuda.nccl.version()
        out["nccl"] = ".".join(str(v) for v in nccl) if isinstance(nccl, tuple) else str(nccl)
    except (AttributeError, RuntimeError, TypeError):
        pass
    if out["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            out["gpus"].append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                                "capability": f"{props.major}.{props.minor}"})
    return out


def _plain(value):
    """Builtin types only (``torch.__version__`` is a str subclass that ``weights_only`` refuses)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def environment(with_torch: bool | None = None) -> dict:
    """The environment record (plain builtins only).

    Args:
        with_torch: include torch / CUDA / cuDNN / NCCL / GPU details. None: only if torch is
            already imported (the proposal tools start faster without it).

    Returns:
        ``{"python", "platform", "hostname", "cpu_count", "toolkit": {"commit", "dirty"},
        "packages": {name: version or None}, "opencv": {...}, "torch": {...} or None,
        "slurm": {...}}``.
    """
    if with_torch is None:
        with_torch = "torch" in sys.modules
    record = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "toolkit": dict(git_state()),
        "packages": _package_versions(),
        "opencv": _opencv(),
        "torch": None,
        "slurm": {k: os.environ[k] for k in SLURM_KEYS if k in os.environ},
    }
    if with_torch:
        import torch

        record["torch"] = _torch(torch)
    return _plain(record)


def format_environment(record: dict) -> str:
    """Multi-line, human-readable form of :func:`environment`'s record."""
    t = record.get("torch") or {}
    lines = [
        f"python {record['python']} on {record['platform']} ({record['hostname']}, "
        f"{record['cpu_count']} CPUs)",
        f"toolkit commit {record['toolkit']['commit']}"
        + (" (modified)" if record["toolkit"].get("dirty") else ""),
    ]
    if t:
        gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in t.get("gpus", [])) or "none"
        lines.append(f"torch {t['version']}, CUDA {t['cuda']}, cuDNN {t['cudnn']}, NCCL {t['nccl']}, "
                     f"GPUs: {gpus}")
    cv = record.get("opencv", {})
    lines.append(f"opencv {cv.get('version')} (ximgproc {'yes' if cv.get('ximgproc') else 'NO'})")
    lines.append("packages: " + ", ".join(f"{k} {v}" for k, v in record["packages"].items() if v))
    if record.get("slurm"):
        lines.append("slurm: " + ", ".join(f"{k}={v}" for k, v in record["slurm"].items()))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Print the environment record that logs and "
                                     "checkpoints store.")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    record = environment(with_torch=True)
    print(json.dumps(record, indent=2) if args.json else format_environment(record))


if __name__ == "__main__":
    main()
