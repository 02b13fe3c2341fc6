"""Untrusted inputs end to end: every case either trains and evaluates or is refused up front.

Box-only annotations with Mask R-CNN, polygons of fewer than three points, zero detections,
renumbered categories (evaluation, resume, initialisation from a detector), an evaluation
failure after training, and images of extreme aspect ratio. Tiny timm backbone, 2 iterations.
"""
import json
import os

import pytest
import torch
from PIL import Image

from demo.data import make_demo_data
from transfer import evaluation
from transfer.finetune import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("ftin")
    return make_demo_data(str(root / "demo"), num_classes=1, images_per_class=1, coco_train=4, coco_val=3,
                          image_size=96, photos=False, progress=False)


def _argv(train_images, train_ann, val_images, val_ann, out, *extra):
    return ["--train-images", str(train_images), "--train-ann", str(train_ann), "--val-images", str(val_images),
            "--val-ann", str(val_ann), "--backbone", "timm:test_resnet", "--norm", "bn", "--fpn-channels", "16",
            "--conv-dim", "16", "--fc-dim", "32", "--mask-dim", "16", "--min-sizes-train", "64",
            "--max-size-train", "96", "--min-size-test", "64", "--max-size-test", "96",
            "--rpn-post-nms-top-n-train", "32", "--rpn-post-nms-top-n-test", "16",
            "--box-batch-size-per-image", "16", "--warmup-iters", "1", "--batch-size", "2",
            "--reference-batch", "2", "--base-lr", "0.01", "--num-workers", "0", "--device", "cpu",
            "--no-tensorboard", "--max-iter", "2", "--steps", "5", "--checkpoint-period", "0",
            "--score-thresh", "0.0", "--output-dir", str(out), *extra]


def _demo_argv(demo, out, *extra, train_ann=None, val_ann=None):
    return _argv(demo["coco_train_images"], train_ann or demo["coco_train_json"], demo["coco_val_images"],
                 val_ann or demo["coco_val_json"], out, *extra)


def _rewrite(src, dst, change):
    data = json.load(open(src))
    change(data)
    json.dump(data, open(dst, "w"))
    return str(dst)


def _box_only(data):
    for a in data["annotations"]:
        a.pop("segmentation", None)


def _short_polygons(data):
    for a in data["annotations"][::2]:
        if not a["iscrowd"]:
            a["segmentation"] = [[a["bbox"][0], a["bbox"][1]]]  # one point


def _renumber(data):
    """The same objects and names under rotated ids: category 1 is now another name."""
    ids = sorted(c["id"] for c in data["categories"])
    new_id = dict(zip(ids, ids[1:] + ids[:1]))
    for c in data["categories"]:
        c["id"] = new_id[c["id"]]
    for a in data["annotations"]:
        a["category_id"] = new_id[a["category_id"]]


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    """Mask R-CNN trained on a box-only file, evaluated on a file with one-point polygons."""
    tmp = tmp_path_factory.mktemp("trained")
    train_ann = _rewrite(demo["coco_train_json"], tmp / "box_only.json", _box_only)
    val_ann = _rewrite(demo["coco_val_json"], tmp / "short.json", _short_polygons)
    out = tmp / "run"
    metrics = main(_demo_argv(demo, out, train_ann=train_ann, val_ann=val_ann))
    return {"out": out, "metrics": metrics, "train_ann": train_ann, "val_ann": val_ann, "tmp": tmp}


def test_box_only_training_and_short_polygons_evaluate(trained):
    m = trained["metrics"]
    assert isinstance(m["bbox"]["AP"], float) and isinstance(m["segm"]["AP"], float)
    report = json.load(open(trained["out"] / "annotations_train.json"))
    assert not report["has_segmentation"] and report["counts"]["segmentation missing: the box is used as the mask"] > 0
    val_report = json.load(open(trained["out"] / "annotations_val.json"))
    assert val_report["counts"]["polygon with fewer than 3 points removed"] > 0
    assert (trained["out"] / "model_final.pth").exists()


def test_box_only_val_gives_box_metrics_and_no_mask_metrics(demo, trained):
    box_val = _rewrite(demo["coco_val_json"], trained["tmp"] / "box_val.json", _box_only)
    m = main(_demo_argv(demo, trained["tmp"] / "boxval", "--eval-only", "--weights",
                        str(trained["out"] / "model_final.pth"), val_ann=box_val))
    assert isinstance(m["bbox"]["AP"], float) and m["segm"] is None and "box-only" in m["segm_skipped"]
    saved = json.load(open(trained["tmp"] / "boxval" / "metrics.json"))
    assert saved["segm"] is None and saved["bbox"] == m["bbox"]


def test_zero_detections(demo, trained):
    m = main(_demo_argv(demo, trained["tmp"] / "zero", "--eval-only", "--weights",
                        str(trained["out"] / "model_final.pth"), "--score-thresh", "1.01"))
    val = json.load(open(demo["coco_val_json"]))
    large = any(a["area"] > 96 ** 2 and not a["iscrowd"] for a in val["annotations"])
    for task in ("bbox", "segm"):
        assert m[task]["AP"] == m[task]["AP50"] == 0.0
        assert m[task]["APl"] == (0.0 if large else None)
    saved = json.load(open(trained["tmp"] / "zero" / "metrics.json"))
    assert saved["bbox"]["APl"] == m["bbox"]["APl"]


def test_categories_are_compared_with_the_weights(demo, trained):
    weights = str(trained["out"] / "model_final.pth")
    assert [c["name"] for c in torch.load(weights, weights_only=True)["categories"]][:2] == \
        [c["name"] for c in sorted(json.load(open(demo["coco_val_json"]))["categories"], key=lambda c: c["id"])][:2]
    renumbered = _rewrite(demo["coco_val_json"], trained["tmp"] / "renumbered_val.json", _renumber)
    with pytest.raises(SystemExit, match="id 1 is .* in the checkpoint but .* in the dataset.*by-name"):
        main(_demo_argv(demo, trained["tmp"] / "mis", "--eval-only", "--weights", weights, val_ann=renumbered))
    plain = main(_demo_argv(demo, trained["tmp"] / "plain", "--eval-only", "--weights", weights))
    remapped = main(_demo_argv(demo, trained["tmp"] / "remap", "--eval-only", "--weights", weights,
                               "--remap-categories", "by-name", val_ann=renumbered))
    assert remapped["bbox"] == plain["bbox"]  # the same detections, scored against the right classes
    renumbered_train = _rewrite(demo["coco_train_json"], trained["tmp"] / "renumbered_train.json", _renumber)
    with pytest.raises(SystemExit, match="categories of .*model_final.pth .* differ"):  # resume
        main(_demo_argv(demo, trained["tmp"] / "res", "--resume", weights, "--max-iter", "3",
                        train_ann=renumbered_train, val_ann=renumbered))
    with pytest.raises(SystemExit, match="differ"):  # initialisation from a detector
        main(_demo_argv(demo, trained["tmp"] / "init", "--init", weights, train_ann=renumbered_train,
                        val_ann=renumbered))
    init = main(_demo_argv(demo, trained["tmp"] / "init2", "--init", weights, "--max-iter", "1",
                           "--remap-categories", "by-name", train_ann=renumbered_train, val_ann=renumbered))
    assert "bbox" in init
    saved = torch.load(trained["tmp"] / "init2" / "model_final.pth", weights_only=True)["categories"]
    ids = {c["name"]: c["id"] for c in json.load(open(renumbered_train))["categories"]}
    assert all(ids[c["name"]] == c["id"] for c in saved)  # label order of the init, ids of the data


def test_evaluation_error_keeps_the_finished_run(demo, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("segmentation")
    monkeypatch.setattr(evaluation, "coco_metrics", broken)
    out = tmp_path / "err"
    with pytest.raises(SystemExit, match=r"evaluation at iteration 2 failed .*KeyError.*segmentation.*--eval-only"):
        main(_demo_argv(demo, out, "--max-iter", "2"))
    assert torch.load(out / "model_final.pth", weights_only=True)["iteration"] == 2
    # a periodic evaluation that fails: the weights it scored were saved before it started
    with pytest.raises(SystemExit, match=r"iteration 1 failed .* --eval-only --weights .*current.pth"):
        main(_demo_argv(demo, tmp_path / "period", "--max-iter", "3", "--eval-period", "1"))
    assert torch.load(tmp_path / "period" / "current.pth", weights_only=True)["iteration"] == 1
    monkeypatch.undo()
    m = main(_demo_argv(demo, tmp_path / "again", "--eval-only", "--weights", str(out / "model_final.pth")))
    assert isinstance(m["bbox"]["AP"], float)


def test_extreme_aspect_ratios_train_and_evaluate(tmp_path):
    sizes = [(3, 300), (300, 2), (1, 120), (40, 40)]  # (height, width)
    images, anns = [], []
    for i, (h, w) in enumerate(sizes, start=1):
        Image.new("RGB", (w, h), (i * 40, 90, 200)).save(tmp_path / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": h, "width": w})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, w / 2, h], "iscrowd": 0})
    ann_file = tmp_path / "strips.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns,
                                    "categories": [{"id": 1, "name": "strip"}]}))
    m = main(_argv(tmp_path, ann_file, tmp_path, ann_file, tmp_path / "out"))
    assert m["num_images"] == 4 and isinstance(m["bbox"]["AP"], float)
    assert os.path.exists(tmp_path / "out" / "model_final.pth")
