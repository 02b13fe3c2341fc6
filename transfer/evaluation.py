"""COCO and LVIS box / mask AP (``faster-coco-eval``), distributed over ranks.

Every rank turns its detections into COCO result dicts (``bbox`` as ``[x, y, w, h]`` in the
original image frame, masks as compressed RLE of ``prob > 0.5``); the lists are gathered in rank
order on rank 0, which runs the official evaluation and broadcasts the numbers. With the
contiguous shards of :class:`transfer.data.samplers.InferenceSampler` the gathered list is the
one a single process would make, so distributed and single-process metrics are identical.

Metrics are in percent (detectron2's convention and the README tables): ``AP, AP50, AP75,
APs, APm, APl`` per task (``bbox``, ``segm``), plus ``APr, APc, APf`` for LVIS. A value that
the evaluator reports as undefined (no ground truth in that area range) is ``None``.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from pycocotools import mask as mask_utils

from socokit import distributed as sdist
from socokit.errors import EvaluationError
from socokit.log import get_logger
from transfer.data.annotations import gt_area_presence
from transfer.models.transform import original_sizes

logger = get_logger("soco.finetune")


COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_KEYS = COCO_KEYS + ("APr", "APc", "APf")


def detections_to_results(image_id: int, output: dict, label_to_category: list,
                          with_masks: bool) -> list[dict]:
    """One image's detector output → COCO result dicts.

    Args:
        image_id: the annotation file's image id.
        output: ``boxes`` Tensor[N, 4] (xyxy, original frame), ``scores`` [N], ``labels`` [N]
            (contiguous 1..K), optional ``masks`` Tensor[N, 1, H, W] of probabilities.
        label_to_category: ``label_to_category[label]`` = category id (index 0 unused).
        with_masks: also encode masks.
    """
    boxes_xyxy = output["boxes"].detach().float().cpu()
    if len(boxes_xyxy) == 0:
        return []
    boxes_xywh = boxes_xyxy.clone()
    boxes_xywh[:, 2:] -= boxes_xywh[:, :2]
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    rles = None
    if with_masks and "masks" in output:
        binary = (output["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)  # [N, H, W]
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")
    results = []
    for i, (box, score, label) in enumerate(zip(boxes_xywh.tolist(), scores, labels)):
        res = {"image_id": int(image_id), "category_id": int(label_to_category[label]),
               "bbox": [round(v, 3) for v in box], "score": float(score)}
        if rles is not None:
            res["segmentation"] = rles[i]
        results.append(res)
    return results


def _clean(value: float) -> float | None:
    return None if (value is None or value < 0 or math.isnan(value)) else float(value) * 100.0


def _fast_ground_truth(api):
    """``faster_coco_eval.COCO`` over the ground-truth dict of ``api`` (built once per api)."""
    fast = getattr(api, "_soco_fast_gt", None)
    if fast is None:
        from faster_coco_eval import COCO as FastCOCO

        fast = FastCOCO(api.dataset)
        api._soco_fast_gt = fast
    return fast


def _fast_eval(api, results: list[dict], iou_type: str, image_ids: list[int], lvis: bool,
               max_dets: int = 300):
    """Run ``faster_coco_eval.COCOeval_faster`` (``lvis_style`` for LVIS); returns it summarised.

    It reproduces pycocotools' ``COCOeval`` and the ``lvis`` package's ``LVISEval`` (federated
    negatives, not-exhaustive categories, r/c/f buckets) to the last digit on the sets measured
    in docs/cluster.md, several times faster.
    """
    from faster_coco_eval import COCOeval_faster

    gt = _fast_ground_truth(api)
    # fresh dicts: loadRes and the LVIS mode write into them (ids, areas, "drop" marks), and the
    # caller's list is scored again for the next task; for masks the area and box then come
    # from the mask, as in both references
    drop = ("bbox",) if iou_type == "segm" else ()
    results = [{k: v for k, v in r.items() if k not in drop} for r in results]
    if lvis:  # LVISResults keeps the top max_dets detections of each image, by score
        results = top_detections_per_image(results, max_dets)
    lines = []
    ev = COCOeval_faster(gt, gt.loadRes(results), iou_type, lvis_style=lvis,
                         print_function=lines.append)
    ev.params.imgIds = sorted(image_ids)
    if lvis:
        ev.params.maxDets = [max_dets]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    logger.info("%s %s evaluation:\n%s", "LVIS" if lvis else "COCO", iou_type,
                "\n".join(str(x) for x in lines if str(x).lstrip().startswith("Average")))
    return ev


def top_detections_per_image(results: list[dict], max_dets: int) -> list[dict]:
    """The ``max_dets`` highest-scoring results of each image (ties keep their order), as
    ``lvis.LVISResults`` selects them."""
    by_image: dict = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    out = []
    for anns in by_image.values():
        out.extend(sorted(anns, key=lambda a: a["score"], reverse=True)[:max_dets])
    return out


def coco_metrics(coco_gt, results: list[dict], iou_type: str, image_ids: list[int]) -> dict:
    """COCO AP of ``results`` restricted to ``image_ids`` (percent), pycocotools' definition."""
    if not results:
        logger.warning("no %s detections: AP is 0 where the images have ground truth", iou_type)
        return empty_metrics(coco_gt, image_ids, "coco")
    ev = _fast_eval(coco_gt, results, iou_type, image_ids, lvis=False)
    return {k: _clean(v) for k, v in zip(COCO_KEYS, ev.stats[:6])}


def empty_metrics(api, image_ids: list[int], kind: str = "coco") -> dict:
    """The metrics of zero detections, as the evaluators define them.

    With no detections AP is 0 for every bucket that has ground truth among ``image_ids`` and
    undefined (``None``) for a bucket without any (e.g. ``APl`` on a set without large objects),
    which is what COCOeval / LVISEval report when run on one detection that matches nothing.
    """
    present = gt_area_presence(api, image_ids, kind)
    bucket = {"AP": "all", "AP50": "all", "AP75": "all", "APs": "small", "APm": "medium",
              "APl": "large", "APr": "r", "APc": "c", "APf": "f"}
    keys = LVIS_KEYS if kind == "lvis" else COCO_KEYS
    return {k: 0.0 if present[bucket[k]] else None for k in keys}


def lvis_metrics(lvis_gt, results: list[dict], iou_type: str, image_ids: list[int],
                 max_dets: int = 300) -> dict:
    """Federated LVIS AP restricted to ``image_ids`` (percent), the ``lvis`` package's definition
    (top ``max_dets`` detections per image)."""
    if not results:
        logger.warning("no %s detections: AP is 0 where the images have ground truth", iou_type)
        return empty_metrics(lvis_gt, image_ids, "lvis")
    d = _fast_eval(lvis_gt, results, iou_type, image_ids, lvis=True, max_dets=max_dets).stats_as_dict
    values = {"AP": d["AP_all"], "AP50": d["AP_50"], "AP75": d["AP_75"], "APs": d["AP_small"],
              "APm": d["AP_medium"], "APl": d["AP_large"], "APr": d["APr"], "APc": d["APc"],
              "APf": d["APf"]}
    return {k: _clean(values[k]) for k in LVIS_KEYS}


class DetectionEvaluator:
    """Collects detections on every rank; :meth:`evaluate` gathers and scores on rank 0.

    Args:
        api: pycocotools ``COCO`` over the (COCO or LVIS v1) ground truth.
        label_to_category: contiguous label → category id (index 0 unused).
        with_masks: evaluate ``segm`` as well as ``bbox``.
        kind: "coco" or "lvis".
        max_dets: LVIS detections per image (300 in the LVIS protocol).
        segm_skipped: reason why mask AP is not computed although the detector predicts masks
            (a box-only annotation file): ``segm`` is then ``None`` and the reason is recorded
            under ``segm_skipped``.
    """

    def __init__(self, api, label_to_category: list, with_masks: bool, kind: str = "coco",
                 max_dets: int = 300, segm_skipped: str | None = None):
        self.api, self.label_to_category = api, list(label_to_category)
        self.with_masks, self.kind, self.max_dets = with_masks and not segm_skipped, kind, max_dets
        self.segm_skipped = segm_skipped
        self.reset()

    def reset(self) -> None:
        self.results: list[dict] = []
        self.image_ids: list[int] = []
        self.num_unreadable = 0

    def process(self, targets: list[dict], outputs: list[dict]) -> None:
        """Add one batch (targets give ``image_id``; unreadable images are counted, not scored)."""
        for target, output in zip(targets, outputs):
            if target.get("unreadable"):
                self.num_unreadable += 1
                continue
            self.image_ids.append(int(target["image_id"]))
            self.results.extend(detections_to_results(target["image_id"], output,
                                                      self.label_to_category, self.with_masks))

    def evaluate(self) -> dict:
        """Gather over ranks and score. Every rank returns the same dict.

        Returns:
            ``{"bbox": {...}, "segm": {...}, "num_images": n, "num_unreadable": u}``.
        """
        # only rank 0 scores: gather there, not to every rank (all_gather_object)
        gathered = sdist.gather_object((self.results, self.image_ids, self.num_unreadable))
        metrics, error = None, None
        if sdist.is_main_process():
            try:
                metrics = self._score(gathered)
            except Exception as e:  # noqa: BLE001 - sent to every rank, which all raise it
                logger.exception("scoring failed")
                error = f"{type(e).__name__}: {e}"
        metrics, error = sdist.broadcast_object((metrics, error))
        if error is not None:
            raise EvaluationError(f"scoring the detections failed: {error}")
        return metrics

    def _score(self, gathered) -> dict:
        """Rank 0: score the gathered (results, image ids, unreadable count) of every rank."""
        results = [r for part in gathered for r in part[0]]
        image_ids = [i for part in gathered for i in part[1]]
        unreadable = sum(part[2] for part in gathered)
        metrics = {"num_images": len(image_ids), "num_unreadable": unreadable}
        score = lvis_metrics if self.kind == "lvis" else coco_metrics
        extra = {"max_dets": self.max_dets} if self.kind == "lvis" else {}
        for iou_type in (("bbox", "segm") if self.with_masks else ("bbox",)):
            metrics[iou_type] = score(self.api, results, iou_type, image_ids, **extra)
        if self.segm_skipped:
            metrics["segm"], metrics["segm_skipped"] = None, self.segm_skipped
        return metrics


@torch.no_grad()
def run_inference(model, loader, evaluator: DetectionEvaluator, device, amp_context, progress=None) -> dict:
    """Run ``model`` (eval mode) over ``loader`` and return ``evaluator.evaluate()``."""
    was_training = model.training
    model.eval()
    evaluator.reset()
    for images, targets in loader:
        keep = [i for i, t in enumerate(targets) if not t.get("unreadable")]
        outputs = [None] * len(targets)
        if keep:
            # images resized by the loader: the model maps its outputs to the original sizes
            resized = all(targets[i].get("pre_resized") for i in keep)
            sizes = original_sizes(model, [targets[i]["orig_size"] for i in keep]) if resized \
                else contextlib.nullcontext()
            with amp_context(), sizes:
                preds = model([images[i].to(device, non_blocking=True) for i in keep])
            for i, p in zip(keep, preds):
                outputs[i] = {k: v.float() if v.is_floating_point() else v for k, v in p.items()}
        evaluator.process(targets, [o if o is not None else {} for o in outputs])
        if progress is not None:
            progress.update(len(targets))
    model.train(was_training)
    return evaluator.evaluate()
