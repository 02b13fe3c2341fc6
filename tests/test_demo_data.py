"""Tests of the embedded demo data generator (demo.data)."""
import contextlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from demo import data as demo_data
from demo.data import CATEGORIES, make_demo_data, mask_to_polygons, render_scene

TINY = dict(num_classes=3, images_per_class=2, coco_train=6, coco_val=3, image_size=(96, 128), seed=0)


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "data"
    return _quiet(make_demo_data, root, photos=True, progress=False, **TINY)


def _files(root):
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _coco(path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(path)


def test_layout(demo):
    root = Path(demo["root"])
    classes = sorted(p.name for p in Path(demo["imagenet_train"]).iterdir())
    assert classes == ["n00000000", "n00000001", "n00000002"]
    for wnid in classes:
        names = sorted(p.name for p in (Path(demo["imagenet_train"]) / wnid).iterdir())
        assert names == [f"{wnid}_0.JPEG", f"{wnid}_1.JPEG"]
    assert len(list(Path(demo["coco_train_images"]).glob("*.jpg"))) == 6
    assert len(list(Path(demo["coco_val_images"]).glob("*.jpg"))) == 3
    for key in ("coco_train_json", "coco_val_json", "stamp"):
        assert Path(demo[key]).is_file()
    stamp = json.loads(Path(demo["stamp"]).read_text())
    assert stamp["format"] == "soco-demo-data" and stamp["counts"]["imagenet_images"] == 6
    # the temporary build folder was renamed away, nothing else left next to the output
    assert [p.name for p in root.parent.iterdir()] == [root.name]
    with Image.open(next(Path(demo["imagenet_train"]).rglob("*.JPEG"))) as im:
        assert im.format == "JPEG" and im.mode == "RGB" and 96 <= min(im.size) <= max(im.size) <= 128


def test_photos_exported(demo):
    photos = {p.stem: p for p in Path(demo["photos"]).glob("*.png")}
    assert {"astronaut", "camera", "chelsea", "coffee", "coins", "rocket"} <= set(photos)
    with Image.open(photos["astronaut"]) as im:
        assert im.mode == "RGB" and im.size == (512, 512)
    with Image.open(photos["camera"]) as im:
        assert im.mode == "L"


def test_deterministic(demo, tmp_path):
    again = _quiet(make_demo_data, tmp_path / "again", photos=True, progress=False, **TINY)
    first, second = _files(demo["root"]), _files(again["root"])
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first), [k for k in first if first[k] != second[k]]
    other = _quiet(make_demo_data, tmp_path / "other", photos=False, progress=False, **{**TINY, "seed": 1})
    third = _files(other["root"])
    jpgs = [k for k in third if k.endswith((".jpg", ".JPEG"))]
    assert jpgs and all(third[k] != first[k] for k in jpgs)


def test_coco_annotations_are_valid(demo):
    for split in ("train", "val"):
        coco = _coco(demo[f"coco_{split}_json"])
        cats = coco.loadCats(coco.getCatIds())
        assert [c["name"] for c in cats] == [n for n, _ in CATEGORIES]
        assert all(c["supercategory"] for c in cats)
        for img in coco.dataset["images"]:
            path = Path(demo[f"coco_{split}_images"]) / img["file_name"]
            with Image.open(path) as im:
                assert im.size == (img["width"], img["height"])
            assert len(coco.getAnnIds(imgIds=img["id"], iscrowd=False)) >= 2
        for ann in coco.dataset["annotations"]:
            m = coco.annToMask(ann)
            assert m.sum() == ann["area"] > 0  # polygons / RLE reproduce the visible mask exactly
            ys, xs = np.nonzero(m)
            x, y, w, h = ann["bbox"]
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            if ann["iscrowd"]:
                assert isinstance(ann["segmentation"]["counts"], str)
            else:
                assert all(len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"])


def test_ground_truth_as_detections_gives_perfect_ap(demo):
    coco = _coco(demo["coco_train_json"])
    gts = [a for a in coco.dataset["annotations"] if not a["iscrowd"]]
    box_dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                 "score": 1.0} for a in gts]
    segm_dets = []
    for a in gts:
        rle = coco.annToRLE(a)
        segm_dets.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
                          "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    for iou_type, dets in (("bbox", box_dets), ("segm", segm_dets)):
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = COCOeval(coco, coco.loadRes(dets), iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        assert evaluator.stats[0] == pytest.approx(1.0), iou_type  # AP@[.5:.95]
        assert evaluator.stats[1] == pytest.approx(1.0), iou_type  # AP50


def test_scenes_have_crowds_occlusion_and_clutter():
    found_crowd = found_occluded = False
    for k in range(30):
        rng = demo_data._image_rng(7, 2, k)
        img, objects = render_scene(rng, 128, 128)
        assert img.shape == (128, 128, 3) and img.dtype == np.uint8
        assert img.std() > 20  # not a flat background
        masks = [o["mask"] for o in objects]
        assert not np.any(np.sum(masks, axis=0) > 1)  # visible masks never overlap
        found_crowd |= any(o["crowd"] for o in objects)
        found_occluded |= any(o["mask"].sum() < 0.95 * _filled_area(o["mask"]) for o in objects)
    assert found_crowd and found_occluded


def _filled_area(mask):
    """Area of the mask with its holes filled (cut by an occluder = holes or dents)."""
    from scipy import ndimage
    return ndimage.binary_fill_holes(mask).sum()


def test_mask_to_polygons_exact_with_holes():
    mask = np.zeros((40, 50), bool)
    mask[5:35, 5:45] = True
    mask[10:20, 10:20] = False  # two holes
    mask[22:30, 25:40] = False
    mask[0, 0] = True  # an isolated pixel at the border
    mask[36:39, 46] = True  # a 1-pixel-wide stroke
    polygons = mask_to_polygons(mask)
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, 40, 50))
    assert np.array_equal(mask_utils.decode(rle).astype(bool), mask)
    rng = np.random.default_rng(0)
    for _ in range(50):  # noise: diagonal-only contacts, islands inside holes, border pixels
        noise = rng.uniform(size=(16, 16)) < 0.45
        rle = mask_utils.merge(mask_utils.frPyObjects(mask_to_polygons(noise), 16, 16))
        assert np.array_equal(mask_utils.decode(rle).astype(bool), noise)


def test_reuse_and_refuse(tmp_path):
    small = dict(TINY, num_classes=1, images_per_class=1, coco_train=2, coco_val=1)
    paths = _quiet(make_demo_data, tmp_path / "d", photos=False, progress=False, **small)
    stamp = Path(paths["stamp"])
    before = stamp.stat().st_mtime_ns
    _quiet(make_demo_data, tmp_path / "d", photos=False, progress=False, **small)
    assert stamp.stat().st_mtime_ns == before  # reused, not rewritten
    changed = _quiet(make_demo_data, tmp_path / "d", photos=False, progress=False, **{**small, "coco_val": 2})
    assert len(json.loads(Path(changed["coco_val_json"]).read_text())["images"]) == 2
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="mine"):
        make_demo_data(tmp_path / "mine", photos=False, progress=False, **small)
    assert (tmp_path / "mine" / "keep.txt").read_text() == "user data"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        demo_data.main(["--help"])
    assert exc.value.code == 0
    paths = demo_data.main(["--out", str(tmp_path / "cli"), "--num-classes", "1", "--images-per-class", "1",
                            "--coco-train", "2", "--coco-val", "1", "--image-size", "64", "80",
                            "--no-photos", "--seed", "3"])
    out = capsys.readouterr().out
    assert "coco_train_images" in out and Path(paths["coco_val_json"]).is_file()
    assert re.fullmatch(r"n00000000_0\.JPEG", os.listdir(Path(paths["imagenet_train"]) / "n00000000")[0])
    with pytest.raises(SystemExit, match="image-size"):
        demo_data.main(["--out", str(tmp_path / "bad"), "--image-size", "4", "8"])
