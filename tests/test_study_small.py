"""The small-scale study (benchmarks/study_small.py): its measures against hand-made answers, and one
tiny end-to-end run that writes its table and resumes without redoing anything."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study_small", ROOT / "benchmarks" / "study_small.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_knn_votes_by_similarity(study):
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    train_y = torch.tensor([0, 0, 1, 1])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.2, 1.0]])
    assert study.knn_accuracy(train, train_y, test, torch.tensor([0, 1, 1]), k=1) == 1.0
    assert study.knn_accuracy(train, train_y, test, torch.tensor([1, 1, 0]), k=3) == pytest.approx(1 / 3)


def test_linear_probe_separates_separable_classes(study):
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0]])
    y = torch.arange(3).repeat(20)
    x = centres[y] + 0.3 * torch.randn(60, 3, generator=g)
    assert study.linear_probe_accuracy(x[:30], y[:30], x[30:], y[30:]) == 1.0
    # labels unrelated to the features: a linear probe cannot beat a guess by much on 30 points
    shuffled = y[torch.randperm(60, generator=g)]
    assert study.linear_probe_accuracy(x[:30], shuffled[:30], x[30:], shuffled[30:]) < 0.7


def test_embedding_spread_detects_collapse(study):
    collapsed = torch.ones(50, 8) + 1e-6 * torch.randn(50, 8)
    assert study.embedding_spread(collapsed) < 1e-3
    # one-hot rows over 4 dims, each dim hot in a quarter of the rows: std sqrt(3)/4 per dim (sample std)
    onehot = torch.eye(4).repeat(25, 1)
    expected = math.sqrt(0.25 * 0.75 * 100 / 99) * 2
    assert study.embedding_spread(onehot) == pytest.approx(expected, rel=1e-5)


def test_summary_mean_and_sample_std(study):
    rows = [{"method": "a", "seed": s, "status": "ok", "AP": ap, "AP50": 2 * ap} for s, ap in enumerate((1.0, 2.0, 4.0))]
    rows.append({"method": "a", "seed": 3, "status": "failed"})
    out = study.summarise(rows, ["a", "b"])
    assert out["a"]["AP"] == {"mean": round(7 / 3, 2), "std": round(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2
                                                                                 + (4 - 7 / 3) ** 2) / 2), 2)}
    assert out["a"]["seeds_ok"] == 3 and out["a"]["seeds_total"] == 4
    assert out["b"] == {"seeds_ok": 0, "seeds_total": 0}


def test_split_coco_json_keeps_each_image_once(study, tmp_path):
    d = {"images": [{"id": i} for i in range(5)], "categories": [{"id": 1}],
         "annotations": [{"id": 10 + i, "image_id": i % 5} for i in range(8)]}
    (tmp_path / "val.json").write_text(json.dumps(d))
    study.split_coco_json(tmp_path / "val.json", 2, tmp_path)
    sel = json.loads((tmp_path / "instances_select.json").read_text())
    test = json.loads((tmp_path / "instances_test.json").read_text())
    assert [im["id"] for im in sel["images"]] == [0, 1] and [im["id"] for im in test["images"]] == [2, 3, 4]
    assert sorted(a["id"] for a in sel["annotations"]) == [10, 11, 15, 16]
    assert sorted(a["id"] for a in test["annotations"]) == [12, 13, 14, 17]


# Five subprocesses (proposals, pretraining, conversion, two fine-tunings): about a minute on two free
# cores, but many times that on a machine shared by several test runs, hence the longer timeout.
@pytest.mark.timeout(1800)
def test_tiny_study_end_to_end_and_resume(study, tmp_path):
    out = tmp_path / "study"
    args = ["--out", str(out), "--preset", "tiny", "--methods", "scratch", "soco_fpn", "--seeds", "0"]
    res = study.main(args)
    assert res["counts"]["unlabeled_images"] == 8 and res["counts"]["det_test_images"] == 2
    rows = {r["method"]: r for r in res["finetune"]}
    assert rows["scratch"]["status"] == "ok" and rows["soco_fpn"]["status"] == "ok", res["finetune"]
    assert rows["scratch"]["init_parts"] is None and rows["soco_fpn"]["init_parts"] == ["all"]
    assert [p["epoch"] for p in res["pretrain"]["soco_fpn"]["probe"]] == [0, 1]
    assert all("obj_knn_bn" in p for p in res["pretrain"]["soco_fpn"]["probe"])  # the object probe ran too
    # the rebuilt initial weights match the run's: 2 warmup iterations move convolutions by far less
    # than an unrelated random initialisation would (relative distance about 1.4)
    drift = res["pretrain"]["soco_fpn"]["probe"][1]["drift"]
    assert 0 < drift["conv_median"] <= drift["conv_max"] < 0.1
    table = (out / "results.md").read_text()
    assert "| scratch |" in table and "| soco_fpn |" in table and "Every fine-tuning run" in table
    assert json.loads((out / "results.json").read_text())["summary"]["soco_fpn"]["seeds_ok"] == 1
    n_runs = len((out / "runs.jsonl").read_text().splitlines())
    again = study.main(args)  # resumes: every step is done, nothing runs again
    assert len((out / "runs.jsonl").read_text().splitlines()) == n_runs
    assert again["summary"] == res["summary"]


def test_report_only_runs_nothing_and_lists_every_run(study, tmp_path):
    out = tmp_path / "report"
    res = study.main(["--out", str(out), "--preset", "tiny", "--methods", "scratch", "byol", "--seeds", "0", "1",
                      "--report-only"])
    assert not (out / "runs.jsonl").exists()  # no command was started
    assert [(r["method"], r["seed"], r["status"]) for r in res["finetune"]] == [
        ("scratch", 0, "not run"), ("byol", 0, "not run (no init)"), ("scratch", 1, "not run"),
        ("byol", 1, "not run (no init)")]
    assert res["summary"]["scratch"] == {"seeds_ok": 0, "seeds_total": 2}
    assert "| scratch | 1 | 0.02 | not run |" in (out / "results.md").read_text()
    # a call on another split / with --init-parts keeps the main table and writes its own, rows labelled
    res = study.main(["--out", str(out), "--preset", "tiny", "--methods", "scratch", "byol", "--seeds", "0",
                      "--eval-split", "select", "--init-parts", "backbone", "--report-only"])
    assert [(r["method"], r.get("init_parts")) for r in res["finetune"]] == [("scratch", None), ("byol", None)]
    table = (out / "results_select_parts-backbone.md").read_text()
    assert "| scratch | 0 | 0.02 | not run |" in table and "| byol (backbone only) | 0 | - | not run (no init) |" in table
    assert "on the `select` split" in table and "pretrained inits load only backbone" in table
    assert "| scratch | 1 | 0.02 | not run |" in (out / "results.md").read_text()


def test_prepare_only_makes_data_and_proposals_and_nothing_else(study, tmp_path):
    out = tmp_path / "prep"
    res = study.main(["--out", str(out), "--preset", "tiny", "--methods", "scratch", "soco_fpn", "--prepare-only"])
    assert res["counts"]["unlabeled_images"] == 8 and res["prepared"] == str(out)
    assert (out / "proposals" / "train_ratio3size0308post.proposals" / "meta.json").is_file()
    assert (out / "data" / "coco" / "annotations" / "instances_test.json").is_file()
    assert not (out / "pretrain").exists() and not (out / "probes.json").exists()
    assert [r["name"] for r in study.read_runs(out / "runs.jsonl")] == ["proposals"]


def test_probes_on_disk_are_used_not_recomputed(study, tmp_path):
    """probes.json entries already on disk (e.g. written by another study process) are taken as they are."""
    out = tmp_path / "shared"
    out.mkdir()
    written = {"knn": 0.5, "linear": 0.25, "emb_spread": 0.1, "knn_bn": 0.75, "linear_bn": 0.5, "emb_spread_bn": 0.2}
    written.update({f"obj_{k}": v / 2 for k, v in written.items()})
    (out / "probes.json").write_text(json.dumps({"random_init": written}))
    res = study.main(["--out", str(out), "--preset", "tiny", "--methods", "scratch", "--seeds", "--report-only"])
    assert res["pretrain"]["scratch"]["probe"] == [{"epoch": 0, **written}]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cuda_without_cuda_fails_before_any_work(study, tmp_path):
    with pytest.raises(SystemExit, match="CUDA is not available"):
        study.main(["--out", str(tmp_path / "s"), "--preset", "tiny", "--device", "cuda"])
    assert not (tmp_path / "s").exists()


def test_box_crops_cut_each_box_and_map_categories(study, tmp_path):
    """Hand-made image: a red box at x 10-18, y 5-16 and a blue one at x 24-35, y 14-27 (inclusive pixels)."""
    import numpy as np
    from PIL import Image

    img = np.zeros((30, 40, 3), np.uint8)
    img[5:17, 10:19] = (255, 0, 0)
    img[14:28, 24:36] = (0, 0, 255)
    Image.fromarray(img).save(tmp_path / "a.png")
    ann = {"images": [{"id": 1, "file_name": "a.png", "height": 30, "width": 40}],
           "categories": [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}],
           "annotations": [
               {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 5, 9, 12], "iscrowd": 0},     # red
               {"id": 2, "image_id": 1, "category_id": 7, "bbox": [24, 14, 12, 14], "iscrowd": 0},   # blue
               {"id": 3, "image_id": 1, "category_id": 7, "bbox": [0, 0, 30, 5], "iscrowd": 0},      # 5 px: skipped
               {"id": 4, "image_id": 1, "category_id": 3, "bbox": [0, 0, 40, 30], "iscrowd": 1}]}    # crowd: skipped
    (tmp_path / "a.json").write_text(json.dumps(ann))
    x, y = study.load_box_crops(tmp_path, tmp_path / "a.json", size=16, min_side=8)
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [0, 1]  # category 3 -> 0, 7 -> 1
    assert torch.allclose(x[0], torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 16, 16))
    assert torch.allclose(x[1], torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 16, 16))
    empty_x, empty_y = study.load_box_crops(tmp_path, tmp_path / "a.json", size=16, min_side=20)
    assert empty_x.shape == (0, 3, 16, 16) and empty_y.shape == (0,)


def test_init_parts_reach_pretrained_runs_only_and_name_their_folders(study, tmp_path):
    a = study.parse_args(["--out", str(tmp_path), "--preset", "tiny", "--init-parts", "backbone", "fpn"])
    data = tmp_path / "data"
    soco = study.finetune_cmd(a, "init/soco.pth", data, "select", 1, tmp_path / "ft", 0.02)
    assert soco[soco.index("--init-parts"):][:3] == ["--init-parts", "backbone", "fpn"]
    assert "--init-parts" not in study.finetune_cmd(a, "scratch", data, "select", 1, tmp_path / "ft", 0.02)
    assert study.finetune_tag(a, "soco_fpn", 0.02, 1) == "soco_fpn_lr0.02_parts-backbone-fpn_seed1"
    assert study.finetune_tag(a, "scratch", 0.02, 1) == "scratch_lr0.02_seed1"
    plain = study.parse_args(["--out", str(tmp_path), "--preset", "tiny"])
    assert "--init-parts" not in study.finetune_cmd(plain, "init/soco.pth", data, "select", 1, tmp_path / "ft", 0.02)
    assert study.finetune_tag(plain, "soco_fpn", 0.02, 1) == "soco_fpn_lr0.02_seed1"
    with pytest.raises(SystemExit):
        study.parse_args(["--out", str(tmp_path), "--init-parts", "res5"])
