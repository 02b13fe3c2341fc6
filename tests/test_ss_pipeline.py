"""Selective-search pipeline: filters, post step, generation (sharding, resume), JSON, grid."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from selective_search import filters, json_format, visualize
from selective_search.filter_proposals import filter_store
from socokit.proposal_store import ProposalStore, write_store, xywh_to_xyxy_inclusive

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_BACKEND = "opencv-fast"


# ----------------------------------------------------------------- reference (the original)
def _ref_filter(rects_xywh, image_hw, strategy: str):
    """Hand-written port of the original filters.py + filter_ss_proposals_json.py branches."""
    ih, iw = image_hw
    img_sqrt = math.sqrt(iw * ih)
    out = []
    for x, y, w, h in rects_xywh:
        if not (w >= 32 and h >= 32):
            continue
        if strategy == "none":
            ok = True
        elif "ratio" in strategy and "size" in strategy:
            r, lo, hi = float(strategy[5]), float(strategy[-4:-2]) / 10, float(strategy[-2:]) / 10
            ok = (1.0 / r) <= (w / h) <= r and lo <= math.sqrt(w * h) / img_sqrt <= hi
        elif "ratio" in strategy:
            r = float(strategy[-1])
            ok = (1.0 / r) <= (w / h) <= r
        else:
            lo = float(strategy[-2:]) / 10
            ok = lo <= math.sqrt(w * h) / img_sqrt <= 1.0
        if ok:
            out.append((x, y, w, h))
    return out


def _ref_post(rects_xywh, image_hw, strategy: str):
    kept = _ref_filter(rects_xywh, image_hw, strategy)
    if kept:
        return kept
    return _ref_filter(rects_xywh, image_hw, "ratio3") or _ref_filter(rects_xywh, image_hw, "none")


def _random_images(rng, n_images=60):
    sizes, rects = [], []
    for i in range(n_images):
        h, w = int(rng.integers(40, 400)), int(rng.integers(40, 400))
        k = int(rng.integers(0, 25)) if i % 7 else 0  # some images have no boxes at all
        x = rng.integers(0, w, k)
        y = rng.integers(0, h, k)
        bw = rng.integers(1, w + 1, k)
        bh = rng.integers(1, h + 1, k)
        sizes.append((h, w))
        rects.append([tuple(int(v) for v in r) for r in zip(x, y, bw, bh)])
    return sizes, rects


def _flat(rects):
    boxes = [xywh_to_xyxy_inclusive(np.array(r, dtype=np.int64).reshape(-1, 4)) for r in rects]
    offsets = np.zeros(len(rects) + 1, np.int64)
    np.cumsum([len(b) for b in boxes], out=offsets[1:])
    return np.concatenate(boxes), offsets


# ------------------------------------------------------------------------------ name parsing
@pytest.mark.parametrize("name,ratio,lo,hi,post", [
    ("none", None, None, None, False),
    ("ratio3", 3.0, None, None, False),
    ("ratio2", 2.0, None, None, False),
    ("size01", None, 0.1, 1.0, False),
    ("ratio3size0308", 3.0, 0.3, 0.8, False),
    ("ratio2size0510", 2.0, 0.5, 1.0, False),
    ("ratio3size0308post", 3.0, 0.3, 0.8, True),
    ("size03post", None, 0.3, 1.0, True),
])
def test_parse_strategy(name, ratio, lo, hi, post):
    s = filters.parse_strategy(name)
    assert (s.ratio, s.size_min, s.size_max, s.post) == (ratio, lo, hi, post)
    assert s.name == name and s.base_name == name.removesuffix("post")


@pytest.mark.parametrize("bad", ["", "ratio", "ratio2.5", "ratio10", "size1", "size0308",
                                 "ratio3size038", "foo", "postnone", "Ratio3"])
def test_parse_strategy_rejects(bad):
    with pytest.raises(ValueError, match="unknown filter strategy"):
        filters.parse_strategy(bad)


# ------------------------------------------------------------------------------ filters
def test_boundaries_hand_built():
    # image 200 x 200: sqrt(W*H) = 200; rects are SS (x, y, w, h)
    rects = [(0, 0, 31, 64), (0, 0, 32, 32), (0, 0, 96, 32), (0, 0, 97, 32), (0, 0, 60, 60),
             (0, 0, 59, 60), (0, 0, 160, 160), (0, 0, 161, 160), (5, 7, 64, 192), (5, 7, 64, 193)]
    boxes, offsets = _flat([rects])
    hw = np.array([[200, 200]])
    expect = {
        "none": [1, 2, 3, 4, 5, 6, 7, 8, 9],
        "ratio3": [1, 2, 4, 5, 6, 7, 8],
        "size03": [4, 6, 7, 8, 9],
        "ratio3size0308": [4, 6, 8],
    }
    for name, idx in expect.items():
        kept, kept_off = filters.filter_flat(boxes, offsets, hw, name)
        np.testing.assert_array_equal(kept, boxes[idx], err_msg=name)
        assert kept.dtype == np.int32 and kept_off.tolist() == [0, len(idx)]
    # store boxes are inclusive: SS w = x2 - x1 + 1, so x2 = x + w - 1
    assert boxes[1].tolist() == [0, 0, 31, 31]


@pytest.mark.parametrize("name", ["none", "ratio2", "ratio3", "ratio4", "size01", "size05",
                                  "ratio3size0308", "ratio2size0110"])
def test_filters_match_reference(rng, name):
    sizes, rects = _random_images(rng)
    boxes, offsets = _flat(rects)
    kept, kept_off = filters.filter_flat(boxes, offsets, np.array(sizes), name)
    for i, (hw, r) in enumerate(zip(sizes, rects)):
        expect = _ref_filter(r, hw, name)
        got = kept[kept_off[i]:kept_off[i + 1]]
        np.testing.assert_array_equal(got, xywh_to_xyxy_inclusive(np.array(expect).reshape(-1, 4)))


def test_post_step_matches_reference(rng):
    sizes, rects = _random_images(rng, 80)
    # hand-built cases: A passes the base filter, B only ratio3, C only none, D nothing
    sizes += [(200, 200)] * 4
    rects += [[(0, 0, 60, 60), (0, 0, 40, 40)], [(0, 0, 40, 40), (0, 0, 100, 20)],
              [(0, 0, 40, 160), (0, 0, 10, 10)], [(0, 0, 31, 31)]]
    boxes, offsets = _flat(rects)
    strategy = filters.parse_strategy("ratio3size0308post")
    keep, _, empty_before = filters.filter_keep(boxes, offsets, np.array(sizes), strategy)
    kept, kept_off = filters.filter_flat(boxes, offsets, np.array(sizes), strategy)
    for i, (hw, r) in enumerate(zip(sizes, rects)):
        expect = _ref_post(r, hw, "ratio3size0308")
        np.testing.assert_array_equal(kept[kept_off[i]:kept_off[i + 1]],
                                      xywh_to_xyxy_inclusive(np.array(expect).reshape(-1, 4)))
    assert empty_before == sum(not _ref_filter(r, hw, "ratio3size0308")
                               for hw, r in zip(sizes, rects))
    tail = [kept[kept_off[i]:kept_off[i + 1]].tolist() for i in range(len(rects) - 4, len(rects))]
    assert tail == [[[0, 0, 59, 59]], [[0, 0, 39, 39]], [[0, 0, 39, 159]], []]


def test_filter_store_post_meta(tmp_path):
    sizes = [(200, 200)] * 3
    rects = [[(0, 0, 60, 60)], [(0, 0, 40, 40)], [(0, 0, 20, 20)]]
    boxes = [xywh_to_xyxy_inclusive(np.array(r)) for r in rects]
    src = tmp_path / "raw.proposals"
    write_store(str(src), ["a.jpg", "b.jpg", "c.jpg"], sizes, boxes,
                {"backend": "soco", "filter": None})
    out = filter_store(str(src), str(tmp_path / "f.proposals"), "ratio3size0308", post=True)
    assert out.meta["filter"] == "ratio3size0308post"
    assert out.meta["num_images_without_boxes_before_post"] == 2
    assert out.meta["num_images_without_boxes"] == 1
    assert out.meta["images_without_boxes"] == ["c.jpg"]
    assert [len(out.boxes(i)) for i in range(3)] == [1, 1, 0]
    # the post step needs unfiltered boxes: refusing a filtered input
    with pytest.raises(SystemExit, match="already filtered"):
        filter_store(str(tmp_path / "f.proposals"), str(tmp_path / "g.proposals"), "ratio3post")


def test_filter_cli(tmp_path, capsys):
    from selective_search import filter_proposals

    src = tmp_path / "raw.proposals"
    write_store(str(src), ["a.jpg", "b.jpg"], [(200, 200)] * 2,
                [xywh_to_xyxy_inclusive(np.array([[0, 0, 60, 60], [0, 0, 200, 40]])),
                 xywh_to_xyxy_inclusive(np.array([[0, 0, 20, 20]]))], {"filter": None})
    out = tmp_path / "out.proposals"
    filter_proposals.main([str(src), str(out), "--strategy", "ratio3size0308", "--post"])
    assert "images without boxes: 1 after ratio3size0308, 1 after the post step" in \
        capsys.readouterr().out
    assert ProposalStore.open(str(out)).boxes(0).tolist() == [[0, 0, 59, 59]]
    with pytest.raises(SystemExit, match="already exists"):
        filter_proposals.main([str(src), str(out)])
    with pytest.raises(SystemExit, match="unknown filter strategy"):
        filter_proposals.main([str(src), str(tmp_path / "x"), "--strategy", "ratio3size38"])
    with pytest.raises(SystemExit, match="not found"):
        filter_proposals.main([str(tmp_path / "nope"), str(tmp_path / "y")])


def test_filter_blocks_equal_single_pass(rng, tmp_path):
    from selective_search.filter_proposals import filter_arrays

    sizes, rects = _random_images(rng, 50)
    boxes, offsets = _flat(rects)
    store = write_store(str(tmp_path / "r.proposals"), [f"{i}.jpg" for i in range(50)], sizes,
                        [boxes[offsets[i]:offsets[i + 1]] for i in range(50)], {"filter": None})
    strategy = filters.parse_strategy("ratio3size0308post")
    whole = filters.filter_flat(boxes, offsets, np.array(sizes), strategy)
    blocked = filter_arrays(store, strategy, block_boxes=7)
    np.testing.assert_array_equal(blocked[0], whole[0])
    np.testing.assert_array_equal(blocked[1], whole[1])


# ------------------------------------------------------------------------------ generation
ARRAY_FILES = ("boxes.npy", "offsets.npy", "sizes.npy", "paths.bin", "path_offsets.npy")


def _same_arrays(a: str, b: str) -> None:
    for name in ARRAY_FILES:
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name


def _gen(*args):
    from selective_search import generate_proposals

    generate_proposals.main(["--backend", TEST_BACKEND, *map(str, args)])


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    from demo.data import make_imagenet_style

    root = tmp_path_factory.mktemp("ss_images") / "train"
    make_imagenet_style(root, num_classes=3, images_per_class=4, image_size=(60, 80), seed=0,
                        progress=False)
    return str(root)


@pytest.fixture(scope="module")
def single_store(image_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ss_single") / "all.proposals"
    _gen("--image-root", image_root, "--output", out, "--chunk-size", 5)
    return str(out)


def test_generate_summary_and_meta(single_store, image_root):
    store = ProposalStore.open(single_store)
    m = store.meta
    assert len(store) == 12 and m["num_images"] == 12 and m["num_unreadable"] == 0
    assert m["backend"] == TEST_BACKEND and m["filter"] is None
    assert m["num_boxes"] == store.num_boxes == int(store.num_boxes_per_image().sum()) > 0
    assert m["image_root"] == os.path.abspath(image_root)
    assert store.path(0) == "n00000000/n00000000_0.JPEG"
    for i in range(len(store)):
        h, w = store.size(i)
        b = store.boxes(i)
        assert (b[:, 0] >= 0).all() and (b[:, 2] < w).all() and (b[:, 3] < h).all()
    assert not os.path.exists(single_store + ".work")  # removed after a successful merge


def test_generate_sharded_equals_single(single_store, image_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sharded.proposals"
    _gen("--image-root", image_root, "--output", out, "--chunk-size", 2, "--num-shards", 2,
         "--shard-id", 1)
    assert not out.exists()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    _gen("--image-root", image_root, "--output", out, "--chunk-size", 2)  # shard 0 merges
    _same_arrays(single_store, str(out))
    text = capsys.readouterr().out
    store = ProposalStore.open(str(out))
    assert f"12 images, {store.num_boxes} boxes" in text


def test_merge_flag_and_filter_option(single_store, image_root, tmp_path):
    out = tmp_path / "m.proposals"
    for shard in (0, 1, 2):
        _gen("--image-root", image_root, "--output", out, "--chunk-size", 4, "--num-shards", 3,
             "--shard-id", shard, "--no-merge")
        if shard == 1:
            with pytest.raises(SystemExit, match="1 of 3 chunks are not finished"):
                _gen("--output", out, "--merge")
    assert not out.exists()
    _gen("--output", out, "--merge", "--filter", "ratio3size0308post", "--keep-work-dir")
    _same_arrays(single_store, str(out))
    filtered = ProposalStore.open(str(tmp_path / "m_ratio3size0308post.proposals"))
    assert filtered.meta["filter"] == "ratio3size0308post" and len(filtered) == 12
    with pytest.raises(SystemExit, match="already exists"):
        _gen("--output", out, "--merge")


def test_work_dir_of_other_job_is_refused(image_root, tmp_path):
    work = tmp_path / "work"
    _gen("--image-root", image_root, "--output", tmp_path / "a.proposals", "--work-dir", work,
         "--num-shards", 4, "--shard-id", 3, "--chunk-size", 2)
    with pytest.raises(SystemExit, match="different job.*chunk_size"):
        _gen("--image-root", image_root, "--output", tmp_path / "a.proposals", "--work-dir", work,
             "--chunk-size", 3)


def test_kill_and_resume_identical(single_store, image_root, tmp_path):
    out = tmp_path / "resumed.proposals"
    work = tmp_path / "resumed.work"
    argv = ["--backend", TEST_BACKEND, "--image-root", image_root, "--output", str(out),
            "--work-dir", str(work), "--chunk-size", "1"]
    # a slowed-down run (0.15 s per image), so that the kill lands mid-run
    script = ("import sys, time\n"
              "from selective_search import generate_proposals as g\n"
              "fast = g.propose_one\n"
              "g.propose_one = lambda p: (time.sleep(0.15), fast(p))[1]\n"
              "g.main(sys.argv[1:])\n")
    proc = subprocess.Popen([sys.executable, "-c", script, *argv], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    chunks = work / "chunks"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if chunks.is_dir() and len([f for f in os.listdir(chunks) if f.endswith(".npz")]) >= 2:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(f for f in os.listdir(chunks) if f.endswith(".npz"))
    assert 2 <= len(done) < 12, done
    assert not out.exists()
    _gen("--image-root", image_root, "--output", out, "--work-dir", work, "--chunk-size", 1)
    _same_arrays(single_store, str(out))


def test_coco_json_input_lists_missing_files(image_root, tmp_path):
    names = ["n00000001/n00000001_2.JPEG", "n00000000/n00000000_1.JPEG", "missing/nothing.jpg"]
    coco = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names)], "annotations": []}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    out = tmp_path / "coco.proposals"
    _gen("--image-root", image_root, "--coco-json", tmp_path / "instances.json", "--output", out)
    store = ProposalStore.open(str(out))
    assert store.paths() == sorted(names[:2])
    assert [u["path"] for u in store.meta["unreadable"]] == ["missing/nothing.jpg"]
    # the same job from a YAML recipe (flag spellings as keys); the command line overrides
    from selective_search import generate_proposals

    (tmp_path / "recipe.yaml").write_text(
        f"image-root: {image_root}\ncoco_json: {tmp_path / 'instances.json'}\n"
        f"backend: {TEST_BACKEND}\nchunk-size: 1\nmax_side: 10\n")
    generate_proposals.main(["--config", str(tmp_path / "recipe.yaml"), "--output",
                             str(tmp_path / "yaml.proposals"), "--max-side", "40"])
    m = ProposalStore.open(str(tmp_path / "yaml.proposals")).meta
    assert (m["backend"], m["max_side"], len(m["unreadable"])) == (TEST_BACKEND, 40, 1)


# ------------------------------------------------------------------------------ JSON, grid
def test_json_round_trip(single_store, image_root, tmp_path):
    js = tmp_path / "train_ratio3size0308post.json"
    json_format.main(["export", single_store, str(js)])
    data = json.loads(js.read_text())
    store = ProposalStore.open(single_store)
    assert sorted(data) == sorted(json_format.basename_key(p) for p in store.paths())
    first = data[json_format.basename_key(store.path(0))]
    b = store.boxes(0)
    assert first[0] == [int(b[0, 0]), int(b[0, 1]), int(b[0, 2] - b[0, 0] + 1),
                        int(b[0, 3] - b[0, 1] + 1)]
    back = tmp_path / "back.proposals"
    json_format.main(["import", str(js), str(back), "--image-root", image_root])
    _same_arrays(single_store, str(back))
    assert ProposalStore.open(str(back)).meta["filter"] == "ratio3size0308post"
    # a key without image and an image missing from the JSON are reported, not errors
    data["n09999999_1"] = [[0, 0, 40, 40]]
    del data[json_format.basename_key(store.path(0))]
    js.write_text(json.dumps(data))
    partial = json_format.import_json(str(js), image_root, str(tmp_path / "p.proposals"))
    assert len(partial) == 11 and partial.meta["num_images_missing_from_json"] == 1
    assert partial.meta["num_json_keys_without_image"] == 1


@pytest.mark.parametrize("indent", [None, 2])
def test_streaming_json_reader_matches_json_load(rng, tmp_path, indent):
    data = {f"img_{i}\u00e9": rng.integers(0, 500, (int(rng.integers(0, 6)), 4)).tolist()
            for i in range(40)}
    (tmp_path / "d.json").write_text(json.dumps(data, indent=indent), encoding="utf-8")
    for read_size in (1, 7, 1 << 20):  # chunk boundaries everywhere
        got = dict(json_format.iter_json_object(str(tmp_path / "d.json"), read_size))
        assert got == data
    (tmp_path / "e.json").write_text(" { } ")
    assert list(json_format.iter_json_object(str(tmp_path / "e.json"))) == []
    for bad in ('{"a": [[1, 2, 3, 4]], ', '{"a": [[1, 2, 3, 4]] "b": []}', '{"a" [[1]]}', "[]"):
        (tmp_path / "b.json").write_text(bad)
        with pytest.raises(SystemExit, match="not a readable JSON object"):
            list(json_format.iter_json_object(str(tmp_path / "b.json"), 5))


def test_json_import_bad_json(image_root, tmp_path):
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(SystemExit, match="not a readable JSON"):
        json_format.import_json(str(tmp_path / "bad.json"), image_root, str(tmp_path / "o"))
    (tmp_path / "shape.json").write_text(json.dumps({"n00000000_0": [[1, 2, 3]]}))
    with pytest.raises(SystemExit, match="n00000000_0"):
        json_format.import_json(str(tmp_path / "shape.json"), image_root, str(tmp_path / "o"))
    (tmp_path / "other.json").write_text(json.dumps({"not_here": []}))
    with pytest.raises(SystemExit, match="none of the 1 keys"):
        json_format.import_json(str(tmp_path / "other.json"), image_root, str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_visualize_writes_png(single_store, image_root, tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    visualize.main([single_store, "--image-root", image_root, "--num", "5", "--tile", "64",
                    "--out", str(out)])
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (3 * 64, 2 * 64)
        assert np.asarray(im.convert("RGB")).std() > 0


def test_default_soco_backend_workers_and_shards_agree(image_root, tmp_path):
    from selective_search import generate_proposals

    names = ["n00000000/n00000000_0.JPEG", "n00000001/n00000001_1.JPEG",
             "n00000002/n00000002_2.JPEG", "n00000002/n00000002_3.JPEG"]
    coco = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names)]}
    (tmp_path / "four.json").write_text(json.dumps(coco))
    common = ["--image-root", image_root, "--coco-json", str(tmp_path / "four.json"),
              "--chunk-size", "1"]
    generate_proposals.main([*common, "--output", str(tmp_path / "one.proposals")])
    for shard in ("1", "0"):
        generate_proposals.main([*common, "--output", str(tmp_path / "two.proposals"),
                                 "--workers", "2", "--num-shards", "2", "--shard-id", shard])
    _same_arrays(str(tmp_path / "one.proposals"), str(tmp_path / "two.proposals"))
    store = ProposalStore.open(str(tmp_path / "one.proposals"))
    assert store.meta["backend"] == "soco" and store.meta["backend_params"]["scale"] == 300
    assert len(store) == 4 and store.num_boxes > 0
