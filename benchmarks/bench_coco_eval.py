"""faster-coco-eval against pycocotools (COCO) and lvis (LVIS): same AP? how much faster?

Builds synthetic ground truth and detections of realistic size (default 5,000 images, about 7
objects and 100 detections per image, 80 categories; LVIS: 300 categories with r/c/f
frequencies, negative and not-exhaustive category lists), scores them with the reference
evaluator and with ``faster_coco_eval`` (``COCOeval_faster``, ``lvis_style=True`` for LVIS),
and prints the largest AP difference and the ratio of the CPU times (``time.process_time``, so
that a shared machine does not distort it) measured in the same run.

    python benchmarks/bench_coco_eval.py                       # COCO bbox, 5000 images
    python benchmarks/bench_coco_eval.py --kind lvis --images 1000
    python benchmarks/bench_coco_eval.py --iou-type segm --images 500

The toolkit scores with faster-coco-eval (docs/cluster.md#evaluation). The LVIS reference
needs the ``lvis`` package, no longer a dependency: ``pip install lvis`` (it pulls in plain
``opencv-python``, which hides ``cv2.ximgproc``: use a separate environment).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import tempfile
import time

import numpy as np

COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_KEYS = COCO_KEYS + ("APr", "APc", "APf")


def synthetic_set(images: int, categories: int, dets_per_image: int, seed: int, lvis: bool,
                  with_masks: bool):
    """(gt_dict, detections): COCO-format ground truth and result dicts, boxes xywh pixels."""
    rng = np.random.default_rng(seed)
    cats = [{"id": c + 1, "name": f"c{c + 1}"} for c in range(categories)]
    if lvis:
        for c in cats:
            c["frequency"] = "rcf"[int(rng.choice(3, p=[0.25, 0.35, 0.40]))]
            c["image_count"] = 1
    gt_images, anns, dets = [], [], []
    ann_id = 1
    for image_id in range(1, images + 1):
        h, w = 480, 640
        k = int(rng.integers(1, 15))
        present = rng.choice(categories, size=min(k, 5), replace=False) + 1
        img = {"id": image_id, "height": h, "width": w, "file_name": f"{image_id:08d}.jpg"}
        boxes = []
        for _ in range(k):
            side = float(np.exp(rng.uniform(np.log(8), np.log(400))))  # small..large
            bw, bh = side * rng.uniform(0.5, 1.5), side * rng.uniform(0.5, 1.5)
            x, y = rng.uniform(0, max(w - bw, 1)), rng.uniform(0, max(h - bh, 1))
            bw, bh = min(bw, w - x), min(bh, h - y)
            cat = int(rng.choice(present))
            box = [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)]
            ann = {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": box,
                   "area": box[2] * box[3], "iscrowd": int(not lvis and rng.random() < 0.02)}
            if with_masks:
                x0, y0, x1, y1 = box[0], box[1], box[0] + box[2], box[1] + box[3]
                ann["segmentation"] = [[x0, y0, x1, y0, x1, y1, x0, y1]]
            anns.append(ann)
            ann_id += 1
            boxes.append((box, cat))
        if lvis:
            absent = np.setdiff1d(np.arange(1, categories + 1), present)
            img["neg_category_ids"] = sorted(int(c) for c in rng.choice(absent, 5, replace=False))
            img["not_exhaustive_category_ids"] = sorted(int(c) for c in present if rng.random() < 0.2)
            img["coco_url"] = f"http://x/val/{image_id:08d}.jpg"
        gt_images.append(img)
        # detections: jittered true boxes (sometimes wrong class) + false positives
        for box, cat in boxes:
            if rng.random() < 0.85:
                j = rng.normal(0, 0.08, 4) * [box[2], box[3], box[2], box[3]]
                b = [max(box[0] + j[0], 0), max(box[1] + j[1], 0), max(box[2] + j[2], 1), max(box[3] + j[3], 1)]
                c = cat if rng.random() < 0.9 else int(rng.integers(1, categories + 1))
                dets.append((image_id, c, b, float(rng.uniform(0.3, 1.0))))
        pool = list(present) + (img.get("neg_category_ids", []) if lvis else [])
        for _ in range(dets_per_image - len(boxes)):
            side = float(np.exp(rng.uniform(np.log(8), np.log(400))))
            b = [rng.uniform(0, w - 8), rng.uniform(0, h - 8), side, side * rng.uniform(0.5, 1.5)]
            c = int(rng.choice(pool)) if rng.random() < 0.7 else int(rng.integers(1, categories + 1))
            dets.append((image_id, c, b, float(rng.uniform(0.0, 0.7))))
    gt = {"images": gt_images, "annotations": anns, "categories": cats,
          "info": {}, "licenses": []}
    results = []
    for image_id, c, b, s in dets:
        r = {"image_id": image_id, "category_id": c, "bbox": [round(v, 2) for v in b], "score": s}
        if with_masks:
            x0, y0, x1, y1 = b[0], b[1], b[0] + b[2], b[1] + b[3]
            r["segmentation"] = _rect_rle(x0, y0, x1, y1, 480, 640)
        results.append(r)
    return gt, results


def _rect_rle(x0, y0, x1, y1, h, w):
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects([[x0, y0, x1, y0, x1, y1, x0, y1]], h, w)
    rle = mask_utils.merge(rle)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def reference_coco(gt, results, iou_type):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        api = COCO()
        api.dataset = copy.deepcopy(gt)
        api.createIndex()
        start = time.process_time()
        ev = COCOeval(api, api.loadRes(copy.deepcopy(results)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        seconds = time.process_time() - start
    return dict(zip(COCO_KEYS, ev.stats[:6])), seconds


def reference_lvis(gt, results, iou_type):
    from lvis import LVIS, LVISEval, LVISResults

    added = "float" not in np.__dict__
    if added:
        np.float = float  # lvis 0.5.3 uses np.float (removed in NumPy 1.24)
    logging.getLogger().setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "lvis_gt.json")
            with open(path, "w") as f:
                json.dump(gt, f)
            api = LVIS(path)
        start = time.process_time()
        dt = LVISResults(api, copy.deepcopy(results), max_dets=300)
        ev = LVISEval(api, dt, iou_type)
        with contextlib.redirect_stdout(io.StringIO()):
            ev.run()
        seconds = time.process_time() - start
    finally:
        if added:
            del np.float
    return {k: v for k, v in ev.get_results().items() if k in LVIS_KEYS}, seconds


def faster(gt, results, iou_type, lvis):
    from faster_coco_eval import COCO, COCOeval_faster

    api = COCO(copy.deepcopy(gt))
    start = time.process_time()
    dt = api.loadRes(copy.deepcopy(results))
    ev = COCOeval_faster(api, dt, iou_type, lvis_style=lvis, print_function=lambda *a: None)
    if lvis:
        ev.params.maxDets = [300]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    seconds = time.process_time() - start
    d = ev.stats_as_dict
    out = {"AP": d["AP_all"], "AP50": d["AP_50"], "AP75": d["AP_75"], "APs": d["AP_small"],
           "APm": d["AP_medium"], "APl": d["AP_large"]}
    if lvis:
        out.update(APr=d["APr"], APc=d["APc"], APf=d["APf"])
    return out, seconds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=("coco", "lvis"), default="coco")
    p.add_argument("--iou-type", choices=("bbox", "segm"), default="bbox")
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--dets", type=int, default=100, help="detections per image")
    p.add_argument("--categories", type=int, default=None, help="80 (coco) / 300 (lvis)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    lvis = args.kind == "lvis"
    cats = args.categories or (300 if lvis else 80)
    gt, results = synthetic_set(args.images, cats, args.dets, args.seed, lvis, args.iou_type == "segm")
    print(f"{args.kind} {args.iou_type}: {args.images} images, {len(gt['annotations'])} objects, "
          f"{len(results)} detections, {cats} categories")
    ref, t_ref = (reference_lvis if lvis else reference_coco)(gt, results, args.iou_type)
    new, t_new = faster(gt, results, args.iou_type, lvis)
    worst = max(abs(ref[k] - new[k]) for k in ref)
    for k in ref:
        print(f"  {k:5s} reference {ref[k]:.6f}  faster-coco-eval {new[k]:.6f}  diff {abs(ref[k] - new[k]):.2e}")
    print(f"max |AP difference| {worst:.2e} (fraction units; 1e-4 = 0.01 AP points)")
    print(f"CPU time (this process; the machine may be shared): reference {t_ref:.2f} s, "
          f"faster-coco-eval {t_new:.2f} s, speed-up {t_ref / t_new:.1f}x")


if __name__ == "__main__":
    main()
