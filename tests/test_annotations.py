"""Annotation files are validated and normalised at load time: every repair, drop and refusal.

Each test writes a small COCO dict by hand, changes one field, and checks the normalised value
(against a value worked out by hand), the report's count, or the refusal message (file,
annotation id, field).
"""
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from transfer.data import AnnotationError, load_annotation_index
from transfer.data import annotations as A
from transfer.evaluation import DetectionEvaluator, coco_metrics


def base() -> dict:
    """Two 100 x 200 (h x w) images, two categories, four clean annotations."""
    return {
        "images": [{"id": 1, "file_name": "a.png", "height": 100, "width": 200},
                   {"id": 2, "file_name": "b.png", "height": 100, "width": 200}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 30], "area": 600.0, "iscrowd": 0,
             "segmentation": [[10, 10, 30, 10, 30, 40, 10, 40]]},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [50, 20, 10, 10], "area": 100.0, "iscrowd": 0,
             "segmentation": [[50, 20, 60, 20, 60, 30, 50, 30]]},
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [0, 0, 40, 40], "area": 1600.0, "iscrowd": 0,
             "segmentation": [[0, 0, 40, 0, 40, 40, 0, 40]]},
            {"id": 4, "image_id": 2, "category_id": 7, "bbox": [100, 50, 20, 20], "area": 400.0, "iscrowd": 0,
             "segmentation": [[100, 50, 120, 50, 120, 70, 100, 70]]},
        ]}


def validate(data, **kw):
    return A.validate_dataset(data, "x.json", **kw)


def ann(data, ann_id):
    return next(a for a in data["annotations"] if a["id"] == ann_id)


def test_clean_file_is_unchanged():
    data, report = validate(base())
    assert data == base() and not report.counts and report.has_segmentation
    assert report.summary_line() == "x.json: 2 images, 4 annotations, 2 categories; no repairs"


# --------------------------------------------------------------------------- repairs
@pytest.mark.parametrize("value", [None, "missing"])
def test_missing_segmentation_becomes_the_box_polygon(value):
    d = base()
    if value is None:
        d["annotations"][0]["segmentation"] = None
    else:
        del d["annotations"][0]["segmentation"]
    data, report = validate(d)
    assert ann(data, 1)["segmentation"] == [[10.0, 10.0, 30.0, 10.0, 30.0, 40.0, 10.0, 40.0]]
    assert report.counts[A.SEGM_FROM_BOX] == 1 and report.has_segmentation


def test_box_only_file_has_no_segmentation():
    d = base()
    for a in d["annotations"]:
        del a["segmentation"]
    data, report = validate(d)
    assert not report.has_segmentation and report.counts[A.SEGM_FROM_BOX] == 4
    assert "box-only" in report.summary_line()


@pytest.mark.parametrize("polys, kept", [
    ([[5, 5]], None),                                                     # one point
    ([[5, 5, 9, 9]], None),                                               # two points
    ([[5, 5, 9, 9], [10, 10, 30, 10, 30, 40]], [[10, 10, 30, 10, 30, 40]]),  # one good polygon left
])
def test_polygons_with_fewer_than_three_points(polys, kept):
    d = base()
    d["annotations"][0]["segmentation"] = polys
    data, report = validate(d)
    assert report.counts[A.POLY_REMOVED] == sum(len(p) < 6 for p in polys)
    if kept is None:  # nothing left: the box is the mask, and evaluation can rasterise it
        assert ann(data, 1)["segmentation"] == A.box_polygon(10.0, 10.0, 20.0, 30.0)
        assert report.counts[A.SEGM_FROM_BOX] == 1
    else:
        assert ann(data, 1)["segmentation"] == [[float(v) for v in kept[0]]]


def test_flat_polygon_is_wrapped():
    d = base()
    d["annotations"][0]["segmentation"] = [10, 10, 30, 10, 30, 40, 10, 40]
    data, report = validate(d)
    assert ann(data, 1)["segmentation"] == [[10.0, 10.0, 30.0, 10.0, 30.0, 40.0, 10.0, 40.0]]
    assert report.counts[A.POLY_WRAPPED] == 1


@pytest.mark.parametrize("compressed", [False, True])
def test_rle_list_and_string_are_accepted(compressed):
    m = np.zeros((100, 200), dtype=np.uint8)
    m[10:40, 10:30] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    if compressed:
        rle = {"size": [100, 200], "counts": rle["counts"].decode("ascii")}
    else:  # uncompressed: column-major run lengths starting with zeros
        flat = m.flatten(order="F")
        change = np.flatnonzero(np.diff(flat)) + 1
        runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
        rle = {"size": [100, 200], "counts": runs}
        assert sum(runs) == 20000
    d = base()
    d["annotations"][0].update(segmentation=rle, iscrowd=1)
    del d["annotations"][0]["area"]
    data, report = validate(d)
    assert ann(data, 1)["area"] == 600.0 and report.counts[A.AREA_COMPUTED] == 1


def test_area_is_computed_from_mask_else_box():
    d = base()
    del d["annotations"][0]["area"]      # polygon 20 x 30
    d["annotations"][1]["area"] = -1.0   # negative: recomputed
    del d["annotations"][2]["segmentation"]
    d["annotations"][2]["area"] = None   # no mask: box area
    data, report = validate(d)
    assert ann(data, 1)["area"] == 600.0 and ann(data, 2)["area"] == 100.0 and ann(data, 3)["area"] == 1600.0
    assert report.counts[A.AREA_COMPUTED] == 3


def test_ids_crowd_and_bbox_repairs():
    d = base()
    del d["annotations"][0]["id"]
    d["annotations"][1]["id"] = 3                   # duplicate of the third
    del d["annotations"][2]["iscrowd"]
    d["annotations"][3]["iscrowd"] = True
    del d["annotations"][3]["bbox"]                 # derived from its polygon
    data, report = validate(d)
    ids = [a["id"] for a in data["annotations"]]
    assert sorted(ids) == [3, 4, 5, 6] and len(set(ids)) == 4
    assert report.counts[A.ID_ASSIGNED] == 2 and report.counts[A.CROWD_DEFAULTED] == 1
    assert data["annotations"][2]["iscrowd"] == 0 and data["annotations"][3]["iscrowd"] == 1
    assert data["annotations"][3]["bbox"] == [100.0, 50.0, 20.0, 20.0] and report.counts[A.BBOX_DERIVED] == 1


def test_boxes_clipped_and_dropped():
    d = base()
    d["annotations"][0]["bbox"] = [-5, 90, 20, 30]     # clipped to [0, 90, 15, 10]
    d["annotations"][1]["bbox"] = [50, 20, 0, 10]      # zero width
    d["annotations"][2]["bbox"] = [300, 10, 5, 5]      # outside the 200-wide image
    d["annotations"][3]["bbox"] = [100, 50, -3, 20]    # negative width
    data, report = validate(d)
    assert [a["id"] for a in data["annotations"]] == [1]
    assert data["annotations"][0]["bbox"] == [0.0, 90.0, 15.0, 10.0]
    assert report.counts[A.BBOX_CLIPPED] == 1 and report.counts[A.DROP_DEGENERATE] == 2
    assert report.counts[A.DROP_OUTSIDE] == 1


def test_unknown_image_and_category_are_dropped():
    d = base()
    d["annotations"][0]["image_id"] = 99
    d["annotations"][1]["category_id"] = 5
    data, report = validate(d)
    assert [a["id"] for a in data["annotations"]] == [3, 4]
    assert report.counts[A.DROP_IMAGE] == 1 and report.counts[A.DROP_CATEGORY] == 1
    assert report.examples[A.DROP_IMAGE] == [1]


def test_integral_floats_are_ints_and_missing_size_is_read(tmp_path):
    d = base()
    d["images"][0]["id"] = 1.0
    d["annotations"][0]["image_id"] = 1.0
    d["categories"][0]["id"] = 3.0
    del d["images"][1]["height"]
    Image.new("RGB", (200, 100)).save(tmp_path / "b.png")
    data, report = validate(d, image_root=str(tmp_path))
    assert data["images"][1]["height"] == 100 and report.counts[A.SIZE_READ] == 1
    assert isinstance(data["images"][0]["id"], int) and isinstance(data["categories"][0]["id"], int)


# --------------------------------------------------------------------------- refusals
REFUSALS = {
    # name: (change, words the message must hold)
    "top-level lists missing": (lambda d: d.clear() or d.update(x=1), "'categories' must be a list (missing)"),
    "annotations not a list": (lambda d: d.__setitem__("annotations", {}), "'annotations' must be a list (dict)"),
    "no categories": (lambda d: d.__setitem__("categories", []), "'categories' is empty"),
    "category id string": (lambda d: d["categories"][0].__setitem__("id", "3"), "categories[0].id must be an integer"),
    "category id duplicate": (lambda d: d["categories"][1].__setitem__("id", 3), "duplicate category id 3"),
    "category name missing": (lambda d: d["categories"][1].pop("name"), "category id 7: field 'name'"),
    "image id missing": (lambda d: d["images"][0].pop("id"), "images[0]: field 'id' missing"),
    "image id duplicate": (lambda d: d["images"][1].__setitem__("id", 1), "image id 1: duplicate"),
    "image file_name missing": (lambda d: d["images"][0].pop("file_name"), "image id 1: field 'file_name'"),
    "image width zero": (lambda d: d["images"][0].__setitem__("width", 0), "image id 1: field 'width' must be positive"),
    "image height missing, no file": (lambda d: d["images"][0].pop("height"), "image id 1: fields 'height'/'width' missing"),
    "annotation not an object": (lambda d: d["annotations"].append([1, 2]), "annotations[4] must be an object"),
    "annotation id fractional": (lambda d: d["annotations"][0].__setitem__("id", 1.5), "annotations[0].id must be an integer"),
    "image_id missing": (lambda d: d["annotations"][1].pop("image_id"), "annotation id 2: field 'image_id' missing"),
    "category_id string": (lambda d: d["annotations"][1].__setitem__("category_id", "dog"),
                           "annotation id 2.category_id must be an integer"),
    "bbox wrong length": (lambda d: d["annotations"][2].__setitem__("bbox", [1, 2, 3]), "annotation id 3: field 'bbox'"),
    "bbox nan": (lambda d: d["annotations"][2].__setitem__("bbox", [1, 2, float("nan"), 3]), "annotation id 3: field 'bbox'"),
    "bbox and segmentation missing": (lambda d: [d["annotations"][2].pop(k) for k in ("bbox", "segmentation")],
                                      "annotation id 3: field 'bbox' missing and no segmentation"),
    "iscrowd 2": (lambda d: d["annotations"][0].__setitem__("iscrowd", 2), "annotation id 1: field 'iscrowd'"),
    "area string": (lambda d: d["annotations"][0].__setitem__("area", "big"), "annotation id 1: field 'area'"),
    "segmentation string": (lambda d: d["annotations"][0].__setitem__("segmentation", "poly"),
                            "annotation id 1: field 'segmentation' must be"),
    "polygon odd": (lambda d: d["annotations"][0].__setitem__("segmentation", [[1, 2, 3, 4, 5, 6, 7]]),
                    "annotation id 1: field 'segmentation'[0] has an odd number"),
    "polygon text": (lambda d: d["annotations"][0].__setitem__("segmentation", [[1, 2, "a", 4, 5, 6]]),
                     "annotation id 1: field 'segmentation'[0] must be a list of finite numbers"),
    "rle size wrong": (lambda d: d["annotations"][0].__setitem__("segmentation", {"size": [10, 10], "counts": [100]}),
                       "annotation id 1: RLE field 'segmentation.size' [10, 10] differs"),
    "rle counts sum": (lambda d: d["annotations"][0].__setitem__("segmentation", {"size": [100, 200], "counts": [5, 5]}),
                       "annotation id 1: RLE field 'segmentation.counts' sums to 10"),
    "rle counts type": (lambda d: d["annotations"][0].__setitem__("segmentation", {"size": [100, 200], "counts": 7}),
                        "annotation id 1: RLE field 'segmentation.counts' must be"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refusals_name_file_entry_and_field(name):
    change, words = REFUSALS[name]
    d = base()
    change(d)
    with pytest.raises(AnnotationError) as e:
        validate(d)
    assert str(e.value).startswith("x.json") and words in str(e.value), str(e.value)


def test_top_level_must_be_an_object():
    with pytest.raises(AnnotationError, match="x.json: top level must be a JSON object, got list"):
        validate([])


def test_lvis_fields():
    d = base()
    for c, f in zip(d["categories"], "rf"):
        c["frequency"] = f
    for a in d["annotations"]:
        del a["iscrowd"]  # not an LVIS field: set to 0, not reported as a repair
    data, report = validate(copy.deepcopy(d), kind="lvis")
    assert data["images"][0]["neg_category_ids"] == [] and report.counts[A.LVIS_DEFAULTED] == 4
    assert all(a["iscrowd"] == 0 for a in data["annotations"]) and A.CROWD_DEFAULTED not in report.counts
    del d["categories"][0]["frequency"]
    with pytest.raises(AnnotationError, match="category id 3: LVIS field 'frequency'"):
        validate(d, kind="lvis")


def test_load_annotation_index_uses_the_normalised_file(tmp_path):
    d = base()
    del d["annotations"][0]["segmentation"]
    d["annotations"][1]["segmentation"] = [[50, 20]]
    d["annotations"][2]["bbox"] = [0, 0, 0, 40]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(d))
    records, categories, api = load_annotation_index(str(path))
    assert [c["id"] for c in categories] == [3, 7]
    assert [len(r.anns) for r in records] == [2, 1]
    assert records[0].anns[1]["segmentation"] == A.box_polygon(50.0, 20.0, 10.0, 10.0)
    assert sorted(api.anns) == [1, 2, 4] and api.anns[1]["area"] == 600.0
    with pytest.raises(AnnotationError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        load_annotation_index(str(tmp_path / "bad.json"))


# --------------------------------------------------------------------------- evaluation cases
def _api(d):
    data, _ = validate(d)
    return A.build_api(data)


def test_box_only_and_short_polygons_evaluate_masks(tmp_path):
    """The two crash cases of pycocotools: missing segmentation, polygon of < 3 points."""
    d = base()
    del d["annotations"][0]["segmentation"]
    d["annotations"][1]["segmentation"] = [[50, 20, 60, 20]]
    api = _api(d)
    label_of = {3: 1, 7: 2}
    targets, outputs = [], []
    for iid in (1, 2):
        anns = api.imgToAnns[iid]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns])
        masks = torch.from_numpy(np.stack([api.annToMask(a) for a in anns])).float()[:, None]
        targets.append({"image_id": iid})
        outputs.append({"boxes": boxes, "scores": torch.ones(len(anns)), "masks": masks,
                        "labels": torch.tensor([label_of[a["category_id"]] for a in anns])})
    ev = DetectionEvaluator(api, [0, 3, 7], with_masks=True)
    ev.process(targets, outputs)
    metrics = ev.evaluate()
    assert metrics["bbox"]["AP"] == pytest.approx(100.0) and metrics["segm"]["AP"] == pytest.approx(100.0)
    skipped = DetectionEvaluator(api, [0, 3, 7], with_masks=True, segm_skipped="box-only")
    skipped.process(targets, outputs)
    m = skipped.evaluate()
    assert m["segm"] is None and m["segm_skipped"] == "box-only" and m["bbox"]["AP"] == pytest.approx(100.0)


def test_zero_detections_match_cocoeval_of_a_non_matching_detection():
    """No detections: AP/AP50/APs/APm 0.0, APl None on a set without large objects."""
    api = _api(base())  # areas 600, 100 (small), 1600, 400: nothing above 96^2 = 9216 px
    metrics = coco_metrics(api, [], "bbox", [1, 2])
    assert metrics == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": 0.0, "APl": None}
    # reference: pycocotools on one detection that matches nothing gives the same buckets
    dets = [{"image_id": 1, "category_id": 3, "bbox": [190.0, 90.0, 5.0, 5.0], "score": 0.1}]
    ev = COCOeval(api, api.loadRes(dets), "bbox")
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate(), ev.accumulate(), ev.summarize()
    ref = [None if v < 0 else 100 * v for v in ev.stats[:6]]
    assert list(metrics.values()) == ref
    d = base()  # one large (100 x 100 = 10000 px) object: APl becomes 0
    d["annotations"][3]["bbox"] = [100, 0, 100, 100]
    d["annotations"][3]["area"] = 10000.0
    assert coco_metrics(_api(d), [], "bbox", [1, 2])["APl"] == 0.0
    assert coco_metrics(_api(d), [], "bbox", [1])["APl"] is None  # restricted to image 1


def test_lvis_zero_detections_match_lvis_eval_of_a_non_matching_detection():
    from transfer.evaluation import lvis_metrics
    d = base()
    for c, f in zip(d["categories"], "rf"):
        c["frequency"] = f
    data, _ = validate(d, kind="lvis")
    api = A.build_api(data, "lvis")
    metrics = lvis_metrics(api, [], "bbox", [1, 2])
    # reference: the federated evaluation of one detection that matches nothing (LVISEval's
    # and faster-coco-eval's lvis_style agree): 0 where ground truth exists, undefined where
    # none does (no large object, no "c" category)
    dets = [{"image_id": 1, "category_id": 3, "bbox": [190.0, 90.0, 5.0, 5.0], "score": 0.1}]
    ref = lvis_metrics(api, dets, "bbox", [1, 2])
    assert metrics == ref == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": 0.0,
                              "APl": None, "APr": 0.0, "APc": None, "APf": 0.0}
