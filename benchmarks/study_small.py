#!/usr/bin/env python
"""Small-scale study: scratch vs image-level (BYOL) vs object-level (SoCo_FPN) pretraining.

Everything runs on data from the embedded generator (:mod:`demo.data`), through the toolkit's own
command lines, one run at a time, so the study is a reproducible recipe a user can rerun::

    python benchmarks/study_small.py --out study_output                 # the pre-registered session scale
    python benchmarks/study_small.py --out study_gpu --preset gpu --prepare-only   # data + proposals (CPU)
    python benchmarks/study_small.py --out study_gpu --preset gpu --device cuda --workers 7 --jobs 9
                                                                        # then, on one GPU: < 10 minutes
    python benchmarks/study_small.py --out study_issue --preset issue   # the scale issue 14 asks for (GPU)
    python benchmarks/study_small.py --out /tmp/s --preset tiny         # plumbing check (CI test)

Steps (each skipped when its output exists, so an interrupted study resumes run by run):

1. data: an unlabeled ImageNet-style folder for pretraining; a labelled classification set for the
   probes (its own seeds, so no image is shared with pretraining); a COCO-style detection set with a
   ``train`` split, a ``select`` split (the only split used to choose hyperparameters) and a
   ``test`` split (the only split of the final table).
2. selective-search proposals on the unlabeled folder (``--backend soco``, ``ratio3size0308post``).
3. pretraining of every method with the same backbone, view size, batch and epochs (same images
   seen); one checkpoint per epoch.
4. probes of every saved checkpoint (and of the random initialisation): k-nearest-neighbour and
   linear-probe accuracy on the classification set and on ground-truth box crops of the detection
   set (object probe: ``train`` crops to fit, ``select`` crops to test), and the spread of the
   normalised embeddings (collapse detector).
5. conversion of the last checkpoint to a detection initialisation; fine-tuning of a Faster R-CNN
   FPN from scratch and from every initialisation with the same recipe over several seeds;
   COCO box AP on the evaluated split.
6. ``results.json`` and ``results.md`` (sizes, budgets, every run with its status, mean ± std);
   a call on the ``select`` split or with ``--init-parts`` writes ``results_select.md``,
   ``results_parts-backbone.md``, ``results_select_parts-backbone.md`` ... instead, so the main
   table is never replaced by a partial one.

A run that fails is recorded with its exit code and log and the study goes on; a later call retries
it. See docs/study_small.md for the protocol and the results.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHODS = ("scratch", "byol", "soco_fpn", "soco_fpn_assigned")
EVAL_SPLITS = ("select", "test")

# Sizes of each preset; every entry is also a flag (--unlabeled-per-class ...), which wins.
PRESETS = {
    # Fits in about 80 minutes of one contended CPU core (the session that wrote the study).
    "session": dict(num_classes=10, unlabeled_per_class=60, probe_per_class=20, det_train=150,
                    det_select=50, det_test=100, image_size=(96, 128), view_size=64,
                    pretrain_epochs=1, pretrain_batch=8, pretrain_base_lr=32.0, finetune_iters=60,
                    finetune_batch=4, finetune_lr=0.02, seeds=(0, 1, 2), probe_size=112, probe_every=1),
    # Sized for one GPU (H100/H200 class) and 16 CPU cores in under 10 minutes with --jobs 9: the
    # issue's detection sets and probes, 2,000 unlabeled scenes (the data must travel to the machine),
    # 40,000 images seen per method, 1,500 fine-tuning iterations of 8 images.
    "gpu": dict(num_classes=10, unlabeled_per_class=200, probe_per_class=50, det_train=600,
                det_select=100, det_test=200, image_size=(96, 128), view_size=64,
                pretrain_epochs=20, pretrain_batch=32, pretrain_base_lr=8.0, finetune_iters=1500,
                finetune_batch=8, finetune_lr=0.02, seeds=(0, 1, 2), probe_size=112, probe_every=5),
    # The scale issue 14 asks for: thousands of unlabeled scenes, a few hundred detection training
    # images, >= 100 evaluation images, long enough fine-tuning for scratch to leave the floor.
    "issue": dict(num_classes=10, unlabeled_per_class=400, probe_per_class=50, det_train=600,
                  det_select=100, det_test=200, image_size=(96, 128), view_size=64,
                  pretrain_epochs=30, pretrain_batch=32, pretrain_base_lr=8.0, finetune_iters=3000, finetune_batch=8,
                  finetune_lr=0.02, seeds=(0, 1, 2), probe_size=112, probe_every=5),
    # End-to-end plumbing check in a couple of minutes (the CPU test).
    "tiny": dict(num_classes=2, unlabeled_per_class=4, probe_per_class=3, det_train=4, det_select=2,
                 det_test=2, image_size=(64, 80), view_size=32, pretrain_epochs=1, pretrain_batch=4, pretrain_base_lr=32.0,
                 finetune_iters=2, finetune_batch=2, finetune_lr=0.02, seeds=(0, 1), probe_size=48, probe_every=1),
}


# --------------------------------------------------------------------------- runs
class Runner:
    """Runs one command per step, skipping steps whose ``done`` file exists; records every run."""

    def __init__(self, out: Path, report_only: bool = False):
        import threading

        self.out = out
        self.report_only = report_only
        self.runs_file = out / "runs.jsonl"
        self._lock = threading.Lock()

    def run(self, name: str, cmd: list[str], done: Path, env: dict | None = None) -> dict:
        """Run ``cmd`` (log in ``out/logs/<name>.log``) unless ``done`` exists.

        Returns:
            ``{"name", "status": "ok" | "failed" | "skipped", "rc", "wall_s", "cmd", "log"}``; failed
            runs are appended to ``runs.jsonl`` too, so the table can list them.
        """
        log = self.out / "logs" / f"{name}.log"
        rec = {"name": name, "cmd": " ".join(shlex.quote(str(c)) for c in cmd), "log": str(log)}
        if done.exists():
            stamp = self._last(name)
            print(f"[study] {name}: done before, skipped", flush=True)
            return {**(stamp or rec), "status": "ok", "skipped": True}
        if self.report_only:
            return {**rec, "status": "not run"}
        print(f"[study] {name}\n$ {rec['cmd']}", flush=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(log, "w") as fh:
            rc = subprocess.call([str(c) for c in cmd], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONPATH": _pythonpath(), **(env or {})})
        rec.update(status="ok" if rc == 0 and done.exists() else "failed", rc=rc,
                   wall_s=round(time.time() - t0, 1), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        with self._lock, open(self.runs_file, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if rec["status"] == "failed":
            tail = log.read_text(errors="replace").splitlines()[-5:]
            print(f"[study] {name} FAILED (exit code {rc}); last lines of {log}:\n  " + "\n  ".join(tail),
                  flush=True)
        return rec

    def _last(self, name: str) -> dict | None:
        found = None
        for rec in read_runs(self.runs_file):
            if rec["name"] == name and rec.get("status") == "ok":
                found = rec
        return found


def parallel(jobs: int, calls: list[tuple]) -> list:
    """Run ``fn(*args)`` for every ``(fn, *args)`` of ``calls``, at most ``jobs`` at a time; results in order."""
    if jobs <= 1:
        return [fn(*args) for fn, *args in calls]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda c: c[0](*c[1:]), calls))


def read_runs(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pythonpath() -> str:
    old = os.environ.get("PYTHONPATH")
    return str(ROOT) + (os.pathsep + old if old else "")


def py(*args) -> list[str]:
    return [sys.executable, *map(str, args)]


# --------------------------------------------------------------------------- data
def make_data(a, data: Path) -> dict:
    """Generate the study's data (deterministic, reused when complete). Returns the paths and counts."""
    from demo.data import make_coco_style, make_imagenet_style

    stamp = data / "study_data.json"
    sizes = {k: getattr(a, k) for k in ("num_classes", "unlabeled_per_class", "probe_per_class",
                                        "det_train", "det_select", "det_test", "data_seed")}
    sizes["image_size"] = list(a.image_size)
    if stamp.is_file() and json.loads(stamp.read_text()).get("sizes") == sizes:
        return json.loads(stamp.read_text())
    if stamp.is_file():
        raise SystemExit(f"error: {data} holds study data of other sizes ({stamp}); use another --out")
    t0 = time.time()
    size, seed = tuple(a.image_size), a.data_seed
    print(f"[study] generating data in {data}", flush=True)
    make_imagenet_style(data / "unlabeled", num_classes=a.num_classes, images_per_class=a.unlabeled_per_class,
                        image_size=size, seed=seed, progress=False)
    # Probe images use other seeds than the unlabeled folder: no image is seen by both.
    make_imagenet_style(data / "probe" / "train", num_classes=a.num_classes, images_per_class=a.probe_per_class,
                        image_size=size, seed=seed + 1000, progress=False)
    make_imagenet_style(data / "probe" / "test", num_classes=a.num_classes, images_per_class=a.probe_per_class,
                        image_size=size, seed=seed + 2000, progress=False)
    paths = make_coco_style(data / "coco", num_train=a.det_train, num_val=a.det_select + a.det_test,
                            image_size=size, seed=seed, progress=False)
    split_coco_json(Path(paths["coco_val_json"]), a.det_select, data / "coco" / "annotations")
    counts = {"unlabeled_images": a.num_classes * a.unlabeled_per_class,
              "probe_train_images": a.num_classes * a.probe_per_class,
              "probe_test_images": a.num_classes * a.probe_per_class}
    for split in ("train", "select", "test"):
        d = json.loads((data / "coco" / "annotations" / f"instances_{split}.json").read_text())
        counts[f"det_{split}_images"] = len(d["images"])
        counts[f"det_{split}_boxes"] = sum(1 for x in d["annotations"] if not x["iscrowd"])
    info = {"sizes": sizes, "counts": counts, "seconds": round(time.time() - t0, 1)}
    stamp.write_text(json.dumps(info, indent=2))
    return info


def split_coco_json(val_json: Path, n_select: int, ann_dir: Path) -> None:
    """Split a COCO annotation file by image order: first ``n_select`` images -> ``select``, rest -> ``test``."""
    d = json.loads(val_json.read_text())
    for name, images in (("select", d["images"][:n_select]), ("test", d["images"][n_select:])):
        ids = {im["id"] for im in images}
        part = {**d, "images": images, "annotations": [x for x in d["annotations"] if x["image_id"] in ids]}
        (ann_dir / f"instances_{name}.json").write_text(json.dumps(part))


# --------------------------------------------------------------------------- probes
def load_images(folder: Path, size: int):
    """All ``<class>/*.JPEG`` images of ``folder`` resized to ``size``² as float32[N, 3, S, S] in 0-1, labels[N]."""
    import numpy as np
    from PIL import Image

    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    xs, ys = [], []
    for c, name in enumerate(classes):
        for f in sorted((folder / name).glob("*.JPEG")):
            img = Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)
            xs.append(np.asarray(img, np.float32) / 255.0)
            ys.append(c)
    return _batch(xs, ys, size)


def _batch(xs: list, ys: list, size: int):
    """HWC float32 images in 0-1 and their labels -> float32[N, 3, size, size], int64[N] (N may be 0)."""
    import numpy as np
    import torch

    if not xs:
        return torch.zeros(0, 3, size, size), torch.zeros(0, dtype=torch.long)
    return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous(), torch.tensor(ys, dtype=torch.long)


def load_box_crops(images_dir: Path, ann_json: Path, size: int, min_side: float = 12.0):
    """Every non-crowd ground-truth box of a COCO-style split, cropped and resized: the object probe's data.

    Boxes are COCO ``[x, y, w, h]`` in pixels; the crop is the box itself (rounded outwards, clipped
    to the image) resized to ``size``² (bilinear, aspect not kept). Boxes whose shorter side is below
    ``min_side`` pixels are skipped.

    Returns:
        float32[N, 3, size, size] in 0-1 and int64 labels[N] (index of the category id in the sorted
        list of the file's category ids).
    """
    import numpy as np
    from PIL import Image

    d = json.loads(Path(ann_json).read_text())
    cat_index = {c: i for i, c in enumerate(sorted(c["id"] for c in d["categories"]))}
    files = {im["id"]: im["file_name"] for im in d["images"]}
    by_image: dict[int, list] = {}
    for ann in d["annotations"]:
        if not ann.get("iscrowd") and min(ann["bbox"][2:]) >= min_side:
            by_image.setdefault(ann["image_id"], []).append(ann)
    xs, ys = [], []
    for image_id in sorted(by_image):
        img = Image.open(Path(images_dir) / files[image_id]).convert("RGB")
        for ann in by_image[image_id]:
            x, y, w, h = ann["bbox"]
            box = (max(0, math.floor(x)), max(0, math.floor(y)), min(img.width, math.ceil(x + w)),
                   min(img.height, math.ceil(y + h)))
            crop = img.crop(box).resize((size, size), Image.BILINEAR)
            xs.append(np.asarray(crop, np.float32) / 255.0)
            ys.append(cat_index[ann["category_id"]])
    return _batch(xs, ys, size)


def backbone_features(init_file: Path | None, arch: str, xs, seed: int = 0, recalibrate=None,
                      device: str = "cpu") -> list:
    """Global-average-pooled last-stage features of a backbone, one float32[N, C] per batch of ``xs``.

    ``init_file`` is a detection-init file (``transfer/convert.py``); its ``backbone.body.*`` keys
    are loaded strictly. ``None`` gives the random initialisation fine-tuning from scratch starts
    from (seeded). The backbone runs in eval mode, as in linear evaluation. With ``recalibrate``
    (float32[M, 3, S, S] images in 0-1) the BatchNorm running statistics are first re-estimated on
    those images (cumulative average over one pass in train mode, no gradients), so the probe
    measures the weights rather than statistics gathered at another view size. The backbone runs on
    ``device``; the features come back on the CPU.
    """
    import torch

    from socokit.backbones import PIXEL_CONVENTION, build_fpn_backbone
    from transfer.detinit import load_detection_init

    torch.manual_seed(seed)
    body = build_fpn_backbone(arch, out_channels=32).body
    pixel = PIXEL_CONVENTION
    if init_file is not None:
        state, meta = load_detection_init(str(init_file))
        prefix = "backbone.body."
        body.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
        pixel = meta.get("pixel", pixel)
    body.to(device)
    mean = torch.tensor(pixel["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(pixel["std"], device=device).view(1, 3, 1, 1)
    with torch.no_grad():
        if recalibrate is not None:
            bns = [m for m in body.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative moving average over the pass
            body.train()
            for i in range(0, len(recalibrate), 32):
                body((recalibrate[i:i + 32].to(device) - mean) / std)
        body.eval()
        outs = []
        for x in xs:
            feats = []
            for i in range(0, len(x), 32):
                f = body((x[i:i + 32].to(device) - mean) / std)
                last = f[-1] if isinstance(f, (list, tuple)) else list(f.values())[-1]
                feats.append(last.mean(dim=(2, 3)).float().cpu())
            outs.append(torch.cat(feats))
    return outs


def knn_accuracy(train_f, train_y, test_f, test_y, k: int = 10) -> float:
    """Cosine k-NN accuracy with similarity-weighted votes (ties: lower class index)."""
    import torch
    import torch.nn.functional as F

    k = min(k, len(train_f))
    sim = F.normalize(test_f, dim=1) @ F.normalize(train_f, dim=1).T
    w, idx = sim.topk(k, dim=1)
    votes = torch.zeros(len(test_f), int(train_y.max()) + 1)
    votes.scatter_add_(1, train_y[idx], w.clamp_min(0) + 1e-6)
    return float((votes.argmax(1) == test_y).float().mean())


def linear_probe_accuracy(train_f, train_y, test_f, test_y, weight_decay: float = 1e-3) -> float:
    """Multinomial logistic regression (L-BFGS, standardised features) on frozen features; test accuracy."""
    import torch
    import torch.nn.functional as F

    mu, sd = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    xtr, xte = (train_f - mu) / sd, (test_f - mu) / sd
    ncls = int(train_y.max()) + 1
    lin = torch.nn.Linear(xtr.shape[1], ncls)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(xtr), train_y) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((lin(xte).argmax(1) == test_y).float().mean())


def embedding_spread(f) -> float:
    """sqrt(C) x mean per-dimension std of the L2-normalised features: ~0 means collapse."""
    import torch.nn.functional as F

    z = F.normalize(f, dim=1)
    return float(z.std(0).mean() * math.sqrt(z.shape[1]))


def probe(init_file: Path | None, arch: str, probe_data, seed: int = 0, device: str = "cpu") -> dict:
    """kNN / linear-probe accuracy and embedding spread of a backbone, with the checkpoint's BatchNorm
    statistics (``knn``, ``linear``, ``emb_spread``) and with statistics re-estimated on the probe's
    training images (``*_bn``). The backbone runs on ``device``, the classifiers on the CPU."""
    (xtr, ytr), (xte, yte) = probe_data
    out = {}
    for suffix, recal in (("", None), ("_bn", xtr)):
        ftr, fte = backbone_features(init_file, arch, [xtr, xte], seed, recalibrate=recal, device=device)
        out.update({f"knn{suffix}": round(knn_accuracy(ftr, ytr, fte, yte), 4),
                    f"linear{suffix}": round(linear_probe_accuracy(ftr, ytr, fte, yte), 4),
                    f"emb_spread{suffix}": round(embedding_spread(fte), 4)})
    return out


def weight_drift(ckpt: Path) -> dict:
    """How far pretraining moved the online backbone from its initialisation.

    The initial weights are rebuilt exactly as ``pretrain/train.py`` builds them (same recipe,
    ``seed_everything(seed)`` before ``build_model``), then compared with the checkpoint's
    ``online_backbone.body.*``.

    Returns:
        ``conv_median`` / ``conv_max``: median / max over conv weights of ``||w - w0|| / ||w0||``;
        ``bn_weight_median``: median over BatchNorm weights (gamma) of ``||g - g0|| / sqrt(numel)``
        (absolute, since zero-initialised gammas have no norm to divide by).
    """
    import torch

    from pretrain.models import build_model
    from socokit.training import seed_everything

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    cfg = state["config"]
    seed_everything(cfg.get("seed", 0))
    kwargs = {"mlp_hidden_dim": cfg["mlp_hidden_dim"], "out_dim": cfg["out_dim"]}
    if cfg["arch"].startswith("SoCo_FPN"):
        kwargs.update(fpn_channels=cfg["fpn_channels"], conv_dim=cfg["conv_dim"], fc_dim=cfg["fc_dim"])
    init = build_model(cfg["arch"], backbone=cfg["backbone"], head_mode=cfg["head_mode"],
                       roi_levels=cfg["roi_levels"], **kwargs).state_dict()
    conv, gamma = [], []
    for k, w in state["model"].items():
        if not k.startswith("online_backbone.body.") or k not in init or not w.is_floating_point():
            continue
        w0 = init[k].float()
        if w.ndim == 4:
            conv.append(float((w.float() - w0).norm() / w0.norm().clamp_min(1e-12)))
        elif k.endswith(".weight") and w.ndim == 1:
            gamma.append(float((w.float() - w0).norm() / math.sqrt(w.numel())))
    conv.sort()
    gamma.sort()
    return {"conv_median": round(conv[len(conv) // 2], 5), "conv_max": round(conv[-1], 5),
            "bn_weight_median": round(gamma[len(gamma) // 2], 5)}


# --------------------------------------------------------------------------- the study
def pretrain_cmd(a, method: str, data: Path, proposals: Path, out: Path) -> list[str]:
    """SoCo_FPN / BYOL pretraining with the tiny CPU recipe's widths at the study's sizes."""
    view = a.view_size
    cmd = py("pretrain/train.py", "--config", "pretrain/configs/tiny_cpu.yaml", "--data", data / "unlabeled",
             "--output-dir", out, "--epochs", a.pretrain_epochs, "--batch-size", a.pretrain_batch,
             "--image-size", view, "--warmup-epoch", max(1, round(a.pretrain_epochs / 10)),
             "--save-freq", a.probe_every, "--keep-last", 0, "--num-workers", a.workers, "--device", a.device, "--seed", a.pretrain_seed,
             "--base-lr", a.pretrain_base_lr, "--print-freq", 20, "--auto-resume")
    if method == "byol":
        cmd += ["--arch", "BYOL", "--aug", "BYOL", "--crop", "0.08"]
    else:
        # FPN level thresholds scaled with the view size (224-px recipe: 48, 96, 192, 224).
        aware = [round(view * t / 224) for t in (48, 96, 192)] + [view, 0]
        cmd += ["--arch", "SoCo_FPN", "--proposals", proposals, "--aware-range", *aware]
        if method == "soco_fpn_assigned":
            cmd += ["--roi-levels", "assigned"]
    return cmd


def finetune_cmd(a, init: str, data: Path, split: str, seed: int, out: Path, lr: float) -> list[str]:
    """Faster R-CNN FPN (tiny widths of transfer/configs/demo_cpu.yaml) at the study's image sizes."""
    lo, hi = a.image_size
    n = a.finetune_iters
    coco = data / "coco"
    return py("transfer/finetune.py", "--config", "transfer/configs/demo_cpu.yaml",
              "--detector", "fasterrcnn_fpn", "--init", init, "--seed", seed, "--device", a.device,
              "--train-images", coco / "train", "--train-ann", coco / "annotations" / "instances_train.json",
              "--val-images", coco / "val", "--val-ann", coco / "annotations" / f"instances_{split}.json",
              "--min-sizes-train", lo, (lo + hi) // 2, hi, "--max-size-train", round(hi * 4 / 3),
              "--min-size-test", (lo + hi) // 2, "--max-size-test", round(hi * 4 / 3),
              "--max-iter", n, "--steps", round(0.8 * n), round(0.94 * n),
              "--warmup-iters", max(1, n // 10), "--batch-size", a.finetune_batch,
              "--reference-batch", a.finetune_batch, "--base-lr", lr, "--num-workers", min(a.workers, 1),
              "--checkpoint-period", max(n, 1), "--print-freq", 20, "--output-dir", out, "--no-auto-resume",
              *(["--init-parts", *a.init_parts] if a.init_parts and init != "scratch" else []))


def _parts_suffix(a) -> str:
    """``_parts-backbone-fpn`` for ``--init-parts backbone fpn``; empty without the flag."""
    return f"_parts-{'-'.join(a.init_parts)}" if a.init_parts else ""


def finetune_tag(a, method: str, lr: float, seed: int) -> str:
    """Name of one fine-tuning run: ``<method>_lr<lr>[_parts-<parts>]_seed<seed>``."""
    return f"{method}_lr{lr:g}{_parts_suffix(a) if method != 'scratch' else ''}_seed{seed}"


def run_study(a) -> dict:
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(out, report_only=a.report_only)
    data = out / "data"
    info = make_data(a, data)
    env = {"OMP_NUM_THREADS": str(a.threads)}
    raw = out / "proposals" / "train.proposals"
    proposals = out / "proposals" / "train_ratio3size0308post.proposals"
    pretrained = [m for m in a.methods if m != "scratch"]
    if any(m.startswith("soco") for m in pretrained):
        runner.run("proposals", py("selective_search/generate_proposals.py", "--image-root", data / "unlabeled",
                                   "--output", raw, "--backend", "soco", "--workers", a.workers,
                                   "--filter", "ratio3size0308post"), proposals / "meta.json", env)
    if a.prepare_only:
        print(f"[study] data and proposals ready in {out}; copy that folder to the machine of the runs and "
              f"call the same command there without --prepare-only", flush=True)
        return {"preset": a.preset, "sizes": info["sizes"], "counts": info["counts"], "prepared": str(out)}
    probe_data = object_data = None
    results = {"preset": a.preset, "sizes": info["sizes"], "counts": info["counts"], "budget": {
        "view_size": a.view_size, "pretrain_epochs": a.pretrain_epochs, "pretrain_batch": a.pretrain_batch,
        "images_seen": a.pretrain_epochs * info["counts"]["unlabeled_images"], "finetune_iters": a.finetune_iters,
        "finetune_batch": a.finetune_batch, "finetune_lr": a.finetune_lr, "pretrain_lr": a.finetune_lr_pretrained,
        "pretrain_base_lr": a.pretrain_base_lr, "probe_every": a.probe_every, "device": a.device,
        "pretrain_peak_lr": a.pretrain_base_lr * a.pretrain_batch / 256,
        "seeds": list(a.seeds), "eval_split": a.eval_split, "init_parts": list(a.init_parts or []), "detector": "fasterrcnn_fpn", "backbone": a.arch},
        "pretrain": {}, "finetune": []}
    probes_file = out / "probes.json"
    probes = json.loads(probes_file.read_text()) if probes_file.is_file() else {}

    def refresh() -> None:
        """Take the entries another study process has written to probes.json since we read it."""
        if probes_file.is_file():
            probes.update({k: v for k, v in json.loads(probes_file.read_text()).items() if k not in probes})

    def get_probe(key: str, init_file: Path | None) -> dict:
        """Image probe (classification set) and object probe (ground-truth box crops) of one backbone."""
        nonlocal probe_data, object_data
        if not {"knn_bn", "obj_knn_bn"} <= probes.get(key, {}).keys():
            refresh()
        entry = dict(probes.get(key, {}))
        if not {"knn_bn", "obj_knn_bn"} <= entry.keys():
            import torch
            torch.set_num_threads(a.threads)
        if "knn_bn" not in entry:
            if probe_data is None:
                probe_data = (load_images(data / "probe" / "train", a.probe_size),
                              load_images(data / "probe" / "test", a.probe_size))
            entry.update(probe(init_file, a.arch, probe_data, device=a.device))
            save_probe(key, entry)
        if "obj_knn_bn" not in entry:
            if object_data is None:
                coco = data / "coco"
                object_data = (load_box_crops(coco / "train", coco / "annotations" / "instances_train.json",
                                              a.object_probe_size),
                               load_box_crops(coco / "val", coco / "annotations" / "instances_select.json",
                                              a.object_probe_size))
            (xtr, ytr), (xte, _) = object_data
            if len(xte) and len(ytr.unique()) > 1:
                entry.update({f"obj_{k}": v for k, v in probe(init_file, a.arch, object_data, device=a.device).items()})
            else:  # too few boxes (tiny sets): recorded as not measurable
                entry.update({f"obj_{k}": None for k in ("knn", "linear", "emb_spread", "knn_bn", "linear_bn",
                                                          "emb_spread_bn")})
            save_probe(key, entry)
            print(f"[study] probe {key}: {entry}", flush=True)
        return probes[key]

    def save_probe(key: str, value: dict) -> None:
        """Merge one entry into probes.json under a lock (several study processes may share ``--out``)."""
        import fcntl

        with open(out / ".probes.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            on_disk = json.loads(probes_file.read_text()) if probes_file.is_file() else {}
            probes.update({k: v for k, v in on_disk.items() if k not in probes or k == key})
            probes[key] = value
            probes_file.write_text(json.dumps(probes, indent=2))

    results["pretrain"]["scratch"] = {"probe": [{"epoch": 0, **get_probe("random_init", None)}]}
    inits = {"scratch": "scratch"}
    tags = {m: f"{m}_lr{a.pretrain_base_lr:g}" for m in pretrained}
    pre_dirs = {m: out / "pretrain" / tags[m] for m in pretrained}
    pre_recs = parallel(a.jobs, [
        (runner.run, f"pretrain_{tags[m]}", pretrain_cmd(a, m, data, proposals, pre_dirs[m]),
         pre_dirs[m] / f"ckpt_epoch_{a.pretrain_epochs:04d}.pth", env) for m in pretrained])
    # every saved epoch (each --probe-every epochs and the last) becomes a detection init, in parallel
    saved = {m: [e for e in range(1, a.pretrain_epochs + 1)
                 if (pre_dirs[m] / f"ckpt_epoch_{e:04d}.pth").is_file()] for m in pretrained}
    conv = parallel(a.jobs, [
        (runner.run, f"convert_{tags[m]}_epoch{e}",
         py("transfer/convert.py", pre_dirs[m] / f"ckpt_epoch_{e:04d}.pth", out / "init" / f"{tags[m]}_epoch{e:04d}.pth"),
         out / "init" / f"{tags[m]}_epoch{e:04d}.pth", env) for m in pretrained for e in saved[m]])
    conv = iter(conv)
    for m, rec in zip(pretrained, pre_recs):
        tag, pre = tags[m], pre_dirs[m]
        entry = {"status": rec["status"], "wall_s": pretrain_wall(pre) or rec.get("wall_s"),
                 "probe": [{"epoch": 0, **probes["random_init"]}]}
        results["pretrain"][m] = entry
        for e in saved[m]:
            ckpt = pre / f"ckpt_epoch_{e:04d}.pth"
            det = out / "init" / f"{tag}_epoch{e:04d}.pth"
            r = next(conv)
            if a.report_only and f"{tag}_epoch{e}" not in probes:
                continue
            if r["status"] == "ok":
                entry["probe"].append({"epoch": e, **get_probe(f"{tag}_epoch{e}", det)})
                key = f"drift_{tag}_epoch{e}"
                if key not in probes:
                    refresh()
                if key not in probes and not a.report_only:
                    save_probe(key, weight_drift(ckpt))
                entry["probe"][-1]["drift"] = probes.get(key)
        det = out / "init" / f"{tag}_epoch{a.pretrain_epochs:04d}.pth"
        if det.is_file():
            inits[m] = str(det)
        entry["loss"] = pretrain_losses(pre)
    jobs, rows = [], []
    for seed in a.seeds:  # seed-major: a partial study still has every method at the first seeds
        for m in a.methods:
            if m not in inits:
                rows.append({"method": m, "seed": seed, "status": "not run (no init)"})
                continue
            lr = a.finetune_lr if m == "scratch" or a.finetune_lr_pretrained is None else a.finetune_lr_pretrained
            tag = finetune_tag(a, m, lr, seed)
            ft = out / "finetune" / a.eval_split / tag
            row = {"method": m, "seed": seed, "lr": lr, "dir": ft,
                   "init_parts": None if m == "scratch" else list(a.init_parts or ["all"])}
            rows.append(row)
            jobs.append((runner.run, f"finetune_{a.eval_split}_{tag}",
                         finetune_cmd(a, inits[m], data, a.eval_split, seed, ft, lr), ft / "metrics.json", env))
    recs = iter(parallel(a.jobs, jobs))
    for row in rows:
        if "dir" not in row:
            continue
        ft = row.pop("dir")
        rec = next(recs)
        row.update(status=rec["status"], wall_s=rec.get("wall_s"), log=rec.get("log"))
        if rec["status"] == "ok":
            metrics = json.loads((ft / "metrics.json").read_text())
            row.update({k: metrics["bbox"][k] for k in ("AP", "AP50", "AP75")})
            row["iteration"] = metrics["iteration"]
            row["loss_first"], row["loss_last"] = finetune_losses(ft)
    results["finetune"] = rows
    results["summary"] = summarise(results["finetune"], a.methods)
    results["failed_runs"] = [r for r in read_runs(runner.runs_file) if r["status"] != "ok"]
    results["probes"] = probes
    from socokit.fileio import atomic_save_json
    name = results_name(a)
    atomic_save_json(results, str(out / f"{name}.json"))
    (out / f"{name}.md").write_text(markdown_table(results))
    print((out / f"{name}.md").read_text())
    print(f"[study] table: {out / (name + '.md')} (and {name}.json)", flush=True)
    return results


def results_name(a) -> str:
    """``results`` for the main table (``test`` split, whole init files), else a name of its own."""
    return "results" + (f"_{a.eval_split}" if a.eval_split != "test" else "") + _parts_suffix(a)


def pretrain_losses(pre: Path) -> list[dict]:
    """Epoch-mean pretraining losses read from the run's ``log.txt`` (empty when absent)."""
    import re

    f = pre / "log.txt"
    if not f.is_file():
        return []
    found = re.findall(r"epoch (\d+) done: \d+ iterations, mean loss (-?[\d.]+(?:e-?\d+)?)", f.read_text())
    return [{"epoch": int(e), "loss": float(v)} for e, v in found]


def pretrain_wall(pre: Path) -> float | None:
    """Seconds from a pretraining run's first log line to its last checkpoint save (``log.txt``
    timestamps, so a run started by another process is timed too; a resumed run includes its pause);
    None when unknown."""
    import re
    from datetime import datetime

    f = pre / "log.txt"
    if not f.is_file():
        return None
    stamps = re.findall(r"^\[(\d\d/\d\d \d\d:\d\d:\d\d) [^\]]*\] (.*)$", f.read_text(), re.M)
    saves = [t for t, msg in stamps if msg.startswith("saved ckpt_epoch_")]
    if not stamps or not saves:
        return None
    t0, t1 = (datetime.strptime(t, "%m/%d %H:%M:%S") for t in (stamps[0][0], saves[-1]))
    return (t1 - t0).total_seconds()


def finetune_losses(ft: Path) -> tuple[float | None, float | None]:
    """Total training loss (window average) at the first and the last logged iteration of a fine-tuning
    run, read from its ``log.txt``: the start point of an initialisation and where it ended."""
    import re

    f = ft / "log.txt"
    found = re.findall(r"train \[\d+/\d+\].*?\sloss (-?[\d.]+(?:e-?\d+)?) \((-?[\d.]+(?:e-?\d+)?)\)",
                       f.read_text()) if f.is_file() else []
    if not found:
        return None, None
    return float(found[0][0]), float(found[-1][0])


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def summarise(rows: list[dict], methods) -> dict:
    """Per method: mean ± sample std of AP / AP50 over the seeds that finished, and how many did."""
    out = {}
    for m in methods:
        done = [r for r in rows if r["method"] == m and r.get("status") == "ok"]
        entry = {"seeds_ok": len(done), "seeds_total": sum(r["method"] == m for r in rows)}
        for k in ("AP", "AP50"):
            if done:
                mean, std = _mean_std([r[k] for r in done])
                entry[k] = {"mean": round(mean, 2), "std": round(std, 2)}
        out[m] = entry
    return out


def _label(method: str, budget: dict) -> str:
    """Row name: the method, with the loaded init parts when the call restricted them."""
    parts = budget.get("init_parts")
    return f"{method} ({' + '.join(parts)} only)" if parts and method != "scratch" else method


def markdown_table(res: dict) -> str:
    b, c = res["budget"], res["counts"]
    lines = [f"Preset `{res['preset']}`: {c['unlabeled_images']} unlabeled scenes, probe {c['probe_train_images']} / "
             f"{c['probe_test_images']} images, detection train {c['det_train_images']} / select "
             f"{c['det_select_images']} / test {c['det_test_images']} images (sizes {res['sizes']['image_size']} px).",
             f"Pretraining: {b['backbone']}, {b['view_size']}-px views, batch {b['pretrain_batch']}, LARS peak LR "
             f"{b['pretrain_peak_lr']:g} (base {b['pretrain_base_lr']:g}), "
             f"{b['pretrain_epochs']} epoch{'s' if b['pretrain_epochs'] != 1 else ''} = {b['images_seen']} "
             "images seen per method. Fine-tuning: "
             f"{b['detector']}, {b['finetune_iters']} iterations of {b['finetune_batch']} images, LR {b['finetune_lr']}"
             + (f" (pretrained inits: {b['pretrain_lr']})" if b["pretrain_lr"] is not None else "")
             + (f", pretrained inits load only {' + '.join(b['init_parts'])}" if b.get("init_parts") else "")
             + f", seeds {b['seeds']}; box AP (percent) on the `{b['eval_split']}` split.", "",
             "| init | pretraining wall (s) | kNN acc* | linear acc* | embedding spread* | object kNN / linear* | "
             "box AP | AP50 | seeds ok |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, s in res["summary"].items():
        pre = res["pretrain"].get(m, {})
        label = _label(m, b)
        last = pre.get("probe", [{}])[-1] if pre.get("probe") else {}
        ap = f"{s['AP']['mean']:.2f} ± {s['AP']['std']:.2f}" if "AP" in s else "n/a"
        ap50 = f"{s['AP50']['mean']:.2f} ± {s['AP50']['std']:.2f}" if "AP50" in s else "n/a"
        wall = pre.get("wall_s")
        lines.append(f"| {label} | {wall if wall is not None else '-'} | {last.get('knn_bn', 'n/a')} | "
                     f"{last.get('linear_bn', 'n/a')} | {last.get('emb_spread_bn', 'n/a')} | "
                     f"{last.get('obj_knn_bn', 'n/a')} / {last.get('obj_linear_bn', 'n/a')} | {ap} | {ap50} | "
                     f"{s['seeds_ok']}/{s['seeds_total']} |")
    lines += ["", "\\* probes of the last checkpoint with BatchNorm statistics re-estimated on the probe's training "
              "images; chance is 1 / number of classes. Object probe: ground-truth box crops of the detection "
              "`train` split (probe training) and `select` split (probe test).", "",
              "Probes over pretraining (epoch 0 = the random initialisation):", "",
              "| init | epoch | kNN acc | linear acc | embedding spread | kNN, BN re-estimated | linear, BN "
              "re-estimated | object kNN / linear | object kNN / linear, BN re-estimated | conv drift median / max "
              "| BN gamma drift |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, pre in res["pretrain"].items():
        for p in pre.get("probe", []):
            d = p.get("drift")
            drift = f"{d['conv_median']:.4f} / {d['conv_max']:.4f} | {d['bn_weight_median']:.4f}" if d else "- | -"
            lines.append(f"| {m} | {p['epoch']} | {p['knn']} | {p['linear']} | {p['emb_spread']} | "
                         f"{p.get('knn_bn', '-')} | {p.get('linear_bn', '-')} | {p.get('obj_knn', '-')} / "
                         f"{p.get('obj_linear', '-')} | {p.get('obj_knn_bn', '-')} / {p.get('obj_linear_bn', '-')} | "
                         f"{drift} |")
    lines += ["", "Every fine-tuning run (loss: the logged training loss at the first and last print):", "",
              "| init | seed | LR | status | AP | AP50 | AP75 | loss first → last | wall (s) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in res["finetune"]:
        cells = [f"{r[k]:.2f}" if isinstance(r.get(k), (int, float)) else "-" for k in ("AP", "AP50", "AP75")]
        loss = (f"{r['loss_first']:.3f} → {r['loss_last']:.3f}" if r.get("loss_first") is not None else "-")
        lines.append(f"| {_label(r['method'], b)} | {r['seed']} | {r.get('lr', '-')} | {r['status']} | {' | '.join(cells)} | "
                     f"{loss} | {r.get('wall_s', '-')} |")
    if res["failed_runs"]:
        lines += ["", "Failed runs (each retried by the next call):", ""]
        lines += [f"- {r['name']}: exit code {r['rc']} after {r['wall_s']} s, log {r['log']}" for r in res["failed_runs"]]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="study_output", help="folder of every artifact, results.json and results.md")
    p.add_argument("--preset", choices=sorted(PRESETS), default="session",
                   help="sizes and budgets (docs/study_small.md section 2; PRESETS at the top of this file); "
                        "the flags below override single entries")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["scratch", "byol", "soco_fpn"],
                   help="initialisations to compare (soco_fpn_assigned: SoCo_FPN pretrained with "
                        "--roi-levels assigned, each proposal pooled from its FPN level only)")
    p.add_argument("--eval-split", choices=EVAL_SPLITS, default="test",
                   help="detection split to evaluate: 'select' only for choosing hyperparameters, "
                        "'test' for the reported table")
    g = p.add_argument_group("sizes (default: the preset's)")
    sizes = {"num_classes": "shape classes of the generated scenes",
             "unlabeled_per_class": "unlabeled pretraining scenes per class",
             "probe_per_class": "probe classification images per class (train and test each)",
             "det_train": "detection images to fine-tune on", "det_select": "detection images of the 'select' "
             "split (choosing hyperparameters)", "det_test": "detection images of the 'test' split (the table)",
             "view_size": "pretraining view side (pixels)", "pretrain_epochs": "pretraining epochs",
             "pretrain_batch": "pretraining batch", "finetune_iters": "fine-tuning iterations",
             "finetune_batch": "fine-tuning batch (images per iteration)",
             "probe_size": "side (pixels) the probe images are resized to"}
    for key, text in sizes.items():
        g.add_argument("--" + key.replace("_", "-"), type=int, default=None, help=text)
    g.add_argument("--object-probe-size", type=int, default=64,
                   help="side (pixels) of the ground-truth box crops of the object probe")
    g.add_argument("--probe-every", type=int, default=None,
                   help="checkpoint (and probe) every N pretraining epochs, and the last")
    g.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="range of the generated images' height and width (pixels)")
    g.add_argument("--finetune-lr", type=float, default=None, help="fine-tuning base LR (scratch, and all inits "
                   "unless --finetune-lr-pretrained)")
    g.add_argument("--finetune-lr-pretrained", type=float, default=None,
                   help="fine-tuning base LR for the pretrained inits (default: --finetune-lr)")
    g.add_argument("--pretrain-base-lr", type=float, default=None,
                   help="pretraining LR per 256 images (peak LR = this x batch / 256); see docs/study_small.md "
                        "for why the small-batch presets raise it")
    from transfer.config import INIT_PARTS  # res5 is a C4 part; the study fine-tunes FPN detectors

    g.add_argument("--init-parts", nargs="+", default=None, choices=[p for p in INIT_PARTS if p != "res5"],
                   help="parts of the pretrained init files that fine-tuning loads (transfer/finetune.py "
                        "--init-parts; default: all they hold). A SoCo_FPN file holds the backbone, the FPN and "
                        "the box head trained by the pretext task, a BYOL file the backbone only; loading the "
                        "backbone alone starts FPN and head as scratch does (docs/study_small.md, D3). The runs "
                        "get their own folders and table (results_parts-....md)")
    g.add_argument("--seeds", type=int, nargs="*", default=None,
                   help="fine-tuning seeds (none: pretraining and probes only)")
    r = p.add_argument_group("runtime")
    r.add_argument("--arch", default="timm:resnet18", help="backbone of every method")
    r.add_argument("--data-seed", type=int, default=0, help="seed of the generated data")
    r.add_argument("--pretrain-seed", type=int, default=0, help="seed of every pretraining run")
    r.add_argument("--device", default="cpu", help="cpu or cuda")
    r.add_argument("--workers", type=int, default=1, help="data-loader / selective-search processes")
    r.add_argument("--threads", type=int, default=1, help="OMP/torch threads per process")
    r.add_argument("--prepare-only", action="store_true",
                   help="make the data and the proposals, then stop (e.g. on a CPU machine, before copying --out "
                        "to a GPU machine)")
    r.add_argument("--report-only", action="store_true",
                   help="run nothing: write the table of the runs finished so far (the others: 'not run')")
    r.add_argument("--jobs", type=int, default=1,
                   help="runs at a time (pretraining of the methods; fine-tuning runs)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    a = build_parser().parse_args(argv)
    for key, value in PRESETS[a.preset].items():
        if getattr(a, key, None) is None:
            setattr(a, key, value)
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.device.startswith("cuda") and not (a.prepare_only or a.report_only):
        import torch

        if not torch.cuda.is_available():  # fail now, not after the data and the proposals
            raise SystemExit(f"error: --device {a.device}: CUDA is not available on this machine "
                             f"(use --device cpu, or --prepare-only to make the data here)")
    return run_study(a)


if __name__ == "__main__":
    main()
