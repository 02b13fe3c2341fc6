"""Proposal generation on bad input: every case is converted or counted, never a crash."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from socokit.proposal_store import ProposalStore

BACKEND = "opencv-fast"


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A blocky colour image (selective search finds regions in it)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, h // 16), max(1, w // 16), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.NEAREST))


def _jpeg_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad") / "images"
    (root / "sub").mkdir(parents=True)
    rgb = _photo(64, 96)
    Image.fromarray(rgb).save(root / "good.jpg", quality=90)
    (root / "zero.jpg").write_bytes(b"")
    good = _jpeg_bytes(rgb)
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (root / "sub" / "text.jpeg").write_text("this is not an image\n")
    Image.fromarray(rgb[:, :, 0], "L").save(root / "gray.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg")
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    pal = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(root / "palette.png", transparency=0)
    Image.fromarray(rgb[:, :, 1].astype(np.uint16) * 257).save(root / "sixteen.png")  # I;16
    # stored 96 wide x 64 high, EXIF orientation 6 (rotate 90 degrees): displayed 64 x 96
    exif = Image.Exif()
    exif[0x0112] = 6
    (root / "sub" / "exif_rot.jpg").write_bytes(_jpeg_bytes(rgb, exif=exif.tobytes()))
    Image.fromarray(_photo(20, 12)).save(root / "tiny.png")
    Image.fromarray(_photo(1, 1)).save(root / "one_pixel.png")
    return str(root)


UNREADABLE = {"zero.jpg", "truncated.jpg", "corrupt.png", "sub/text.jpeg"}
READABLE = {"good.jpg": (64, 96), "gray.png": (64, 96), "cmyk.jpg": (64, 96), "rgba.png": (64, 96),
            "palette.png": (64, 96), "sixteen.png": (64, 96), "sub/exif_rot.jpg": (96, 64),
            "tiny.png": (20, 12), "one_pixel.png": (1, 1)}


def _gen(*args):
    from selective_search import generate_proposals

    generate_proposals.main(["--backend", BACKEND, *map(str, args)])


@pytest.fixture(scope="module")
def bad_store(bad_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_out") / "bad.proposals"
    _gen("--image-root", bad_root, "--output", out, "--chunk-size", 4, "--workers", 2)
    return ProposalStore.open(str(out))


def test_bad_files_are_counted_not_fatal(bad_store):
    m = bad_store.meta
    assert {u["path"] for u in m["unreadable"]} == UNREADABLE
    assert m["num_unreadable"] == len(UNREADABLE)
    reasons = {u["path"]: u["reason"] for u in m["unreadable"]}
    assert "empty" in reasons["zero.jpg"] and "truncated" in reasons["truncated.jpg"]
    assert "not an image" in reasons["sub/text.jpeg"]
    assert set(bad_store.paths()) == set(READABLE)
    assert m["num_images"] == len(READABLE)


def test_converted_modes_and_exif_frame(bad_store):
    for i in range(len(bad_store)):
        relpath = bad_store.path(i)
        h, w = bad_store.size(i)
        assert (h, w) == READABLE[relpath], relpath
        boxes = bad_store.boxes(i)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] < w).all() and (boxes[:, 3] < h).all(), relpath
    rot = bad_store.boxes(bad_store.find("sub/exif_rot.jpg"))
    assert len(rot) > 0 and rot[:, 3].max() > 64  # boxes live in the rotated (displayed) frame
    assert len(bad_store.boxes(bad_store.find("gray.png"))) > 0
    assert len(bad_store.boxes(bad_store.find("cmyk.jpg"))) > 0


def test_summary_lists_unreadable(bad_root, tmp_path, capsys):
    _gen("--image-root", bad_root, "--output", tmp_path / "s.proposals")
    out = capsys.readouterr().out
    assert f"{len(READABLE) + len(UNREADABLE)} images" in out
    assert f"{len(UNREADABLE)} unreadable images" in out
    assert "unreadable: zero.jpg: file is empty" in out


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "nested").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(SystemExit, match="no images found under"):
        _gen("--image-root", tmp_path / "empty", "--output", tmp_path / "o.proposals")
    with pytest.raises(SystemExit, match="does not exist"):
        _gen("--image-root", tmp_path / "nope", "--output", tmp_path / "o.proposals")
    assert not (tmp_path / "o.proposals").exists()


def test_unwritable_output_fails_before_work(bad_root, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match="not writable"):
        _gen("--image-root", bad_root, "--output", blocker / "sub" / "out.proposals")
    with pytest.raises(SystemExit, match="not writable"):
        _gen("--image-root", bad_root, "--output", tmp_path / "o.proposals", "--work-dir",
             blocker / "work")
    assert sorted(os.listdir(tmp_path)) == ["a_file"]  # nothing created, nothing half-written


def test_existing_output_needs_overwrite(bad_root, tmp_path):
    out = tmp_path / "o.proposals"
    _gen("--image-root", bad_root, "--output", out, "--chunk-size", 100)
    with pytest.raises(SystemExit, match="already exists"):
        _gen("--image-root", bad_root, "--output", out)
    _gen("--image-root", bad_root, "--output", out, "--overwrite")
    assert sorted(os.listdir(tmp_path)) == ["o.proposals"]  # no temp folders left behind
    assert len(ProposalStore.open(str(out))) == len(READABLE)


def test_bad_flags(bad_root, tmp_path):
    with pytest.raises(SystemExit, match="--filter"):
        _gen("--image-root", bad_root, "--output", tmp_path / "o", "--filter", "ratio2.5")
    with pytest.raises(SystemExit, match="both --num-shards and --shard-id"):
        _gen("--image-root", bad_root, "--output", tmp_path / "o", "--num-shards", "2")
    with pytest.raises(SystemExit, match="outside"):
        _gen("--image-root", bad_root, "--output", tmp_path / "o", "--num-shards", "2",
             "--shard-id", "2")
    with pytest.raises(SystemExit, match="not a readable COCO"):
        (tmp_path / "bad.json").write_text("{not json")
        _gen("--image-root", bad_root, "--coco-json", tmp_path / "bad.json", "--output",
             tmp_path / "o")


def test_corrupt_chunk_file_fails_merge_cleanly(bad_root, tmp_path):
    out, work = tmp_path / "o.proposals", tmp_path / "work"
    _gen("--image-root", bad_root, "--output", out, "--work-dir", work, "--chunk-size", 4,
         "--no-merge")
    chunk = sorted((work / "chunks").iterdir())[1]
    chunk.write_bytes(chunk.read_bytes()[:50])
    with pytest.raises(SystemExit, match=f"chunk file .*{chunk.name} is unreadable"):
        _gen("--output", out, "--work-dir", work, "--merge")
    assert sorted(os.listdir(tmp_path)) == ["work"]  # no store, no temp folder
    chunk.unlink()  # a rerun regenerates the deleted chunk, then merges
    _gen("--image-root", bad_root, "--output", out, "--work-dir", work, "--chunk-size", 4)
    assert len(ProposalStore.open(str(out))) == len(READABLE)
