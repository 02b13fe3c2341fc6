"""Selective search on large images: the pixel-budget warning, and the benchmark's --reference."""
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selective_search import backends

REPO = Path(__file__).resolve().parents[1]


def test_advice_text_and_threshold():
    assert backends.pixel_budget_advice(2000, 2000) is None  # exactly the 4 MP budget
    text = backends.pixel_budget_advice(3000, 4000)
    assert "4000x3000 (12.0 MP)" in text and "--max-side 1000" in text
    gib = 12e6 * backends.SOCO_BYTES_PER_PIXEL / 2**30
    assert f"about {gib:.1f} GiB of memory per worker" in text
    assert f"about {8 * gib:.1f} GiB for 8 workers" in backends.pixel_budget_advice(
        3000, 4000, workers=8)
    # the downscaled copy is what counts
    assert backends.pixel_budget_advice(3000, 4000, max_side=2000) is None
    assert "--max-side 1000" in backends.pixel_budget_advice(3000, 4000, max_side=3000)
    assert backends.pixel_budget_advice(10, 20, budget=199) is not None
    assert backends.pixel_budget_advice(10, 20, budget=200) is None


def test_run_backend_warns_above_the_budget(monkeypatch):
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    monkeypatch.setattr(backends, "PIXEL_BUDGET", 1999)
    with pytest.warns(backends.LargeImageWarning, match=r"50x40 \(0.0 MP\).*--max-side 1000"):
        backends.run_backend(image, "soco")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backends.run_backend(image, "soco", max_side=30)  # 30x24 searched: under the budget
        backends.run_backend(image, "opencv-fast")  # only the soco backend warns
        monkeypatch.setattr(backends, "PIXEL_BUDGET", 2000)
        backends.run_backend(image, "soco")


def test_generate_proposals_reports_the_first_large_image_once(tmp_path, monkeypatch, capsys):
    from selective_search import generate_proposals

    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, shape in [("a_small.png", (20, 30, 3)), ("b_big.png", (40, 60, 3)),
                        ("c_big.png", (50, 60, 3))]:
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name)
    monkeypatch.setattr(backends, "PIXEL_BUDGET", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", backends.LargeImageWarning)  # workers do not warn
        generate_proposals.main(["--image-root", str(root), "--output",
                                 str(tmp_path / "out.proposals")])
    large = [line for line in capsys.readouterr().out.splitlines() if "pixel budget" in line]
    assert len(large) == 1
    assert "] b_big.png: image 60x40 (0.0 MP)" in large[0] and "--max-side" in large[0]


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the package sums with Python's sum(), "
                    "compensated since 3.12; the original ran on Python 3.7")
def test_benchmark_times_a_reference_file(tmp_path):
    """--reference loads a file with the original's interface and checks identity with it.

    The stand-in is the PyPI package with SoCo's texture range, loaded as a private copy
    (SoCo's own file is not in this repository).
    """
    package = pytest.importorskip("selectivesearch.selectivesearch")
    reference = tmp_path / "selective_search.py"
    reference.write_text(textwrap.dedent(f"""
        import importlib.util
        import numpy as np
        _spec = importlib.util.spec_from_file_location("_ss_copy", {package.__file__!r})
        _ss = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_ss)
        _ss._calc_texture_hist = lambda img: np.concatenate(
            [np.histogram(img[:, c], 10, (0.0, 255.0))[0] for c in range(3)]) / len(img)
        selective_search = _ss.selective_search
    """))
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_selective_search.py"), "--repeats", "1",
         "--photos", "1", "--oracle-images", "0", "--size", "60x45", "--reference", str(reference)],
        capture_output=True, text=True, cwd=REPO, timeout=600, check=True).stdout
    assert "soco == reference: True" in out
    assert "package-mode == selectivesearch: True" in out
    assert "felzenszwalb labels == scikit-image's: True" in out
    assert "speed-up of soco (ours) over the original release:" in out
    bad = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_selective_search.py"), "--reference",
         str(tmp_path / "missing.py")], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert bad.returncode != 0 and "cannot load it" in bad.stderr
