"""The configuration system: typed sections, recipe + command-line merge, fail-fast messages."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from socokit.config import (Config, Section, build_parser, config_to_yaml, option, parse_config,
                            section)
from socokit.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@dataclass
class _Data(Section):
    size: int = option(224, "image size", ge=1)
    crop: float = option(0.5, "crop fraction", gt=0.0, le=1.0)
    sizes: tuple[int, ...] = option((640, 800), "sizes", ge=1)
    mean: tuple[float, float, float] | None = option(None, "mean")
    name: str | None = option(None, "name", choices=("a", "b"))

    def check(self):
        if self.size < max(self.sizes) // 100:
            raise ConfigError(f"size: {self.size} is smaller than sizes / 100", "size", self.size)


@dataclass
class _Run(Section):
    amp: str = option("auto", "precision", choices=("auto", "none", "bf16"))
    resume: bool = option(True, "resume")
    overwrite: bool = option(False, "overwrite", negatable=False)


@dataclass
class _Toy(Config):
    description = "toy"
    data: _Data = section(_Data, "data")
    run: _Run = section(_Run, "run")


def _recipe(tmp_path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_recipe_then_command_line_with_types_converted(tmp_path):
    path = _recipe(tmp_path, "size: 64\ncrop: 1\nsizes: [10, 20]\nmean: [0.5, 0.5, 0.5]\nname: b\namp: none\n")
    cfg = parse_config(_Toy, ["--config", path, "--size", "32", "--no-resume", "--overwrite"])
    assert (cfg.data.size, cfg.data.crop, cfg.data.sizes, cfg.data.mean, cfg.data.name) == (
        32, 1.0, (10, 20), (0.5, 0.5, 0.5), "b")
    assert isinstance(cfg.data.crop, float)
    assert (cfg.run.amp, cfg.run.resume, cfg.run.overwrite, cfg.recipe) == ("none", False, True, path)
    assert parse_config(_Toy, []) == _Toy()  # defaults in one place


def test_yaml_quirk_1e4_is_a_number(tmp_path):
    cfg = parse_config(_Toy, ["--config", _recipe(tmp_path, "crop: 1e-1\n")])  # PyYAML reads a string
    assert cfg.data.crop == 0.1


@pytest.mark.parametrize("text, message", [
    ("amp: fp32\n", "recipe.yaml: amp: 'fp32' is not allowed; choose from auto, none, bf16"),
    ("size: 2.5\n", "recipe.yaml: size: 2.5 is not an integer"),
    ("size: '64'\n", None),  # a numeric string is converted like a command-line value
    ("size: abc\n", "recipe.yaml: size: 'abc' is not an integer"),
    ("size: true\n", "recipe.yaml: size: True is not an integer"),
    ("crop: 0\n", "recipe.yaml: crop: 0 is out of range; it must be > 0.0"),
    ("sizes: 800\n", "recipe.yaml: sizes: 800 is not a list of integers"),
    ("sizes: [800, 0]\n", "recipe.yaml: sizes: [800, 0] is out of range; it must be >= 1"),
    ("mean: [1, 2]\n", "recipe.yaml: mean: [1, 2] is not a list of 3 numbers (or null)"),
    ("resume: 'yes'\n", "recipe.yaml: resume: 'yes' is not true or false"),
    ("name: c\n", "recipe.yaml: name: 'c' is not allowed; choose from a, b"),
    ("siz: 3\n", "recipe.yaml: unknown key 'siz'; did you mean size, sizes?"),
    ("size: 1\nsizes: [800]\n", "recipe.yaml: size: 1 is smaller than sizes / 100"),
])
def test_bad_recipe_values_name_file_key_value_and_rule(tmp_path, text, message):
    path = _recipe(tmp_path, text)
    if message is None:
        assert parse_config(_Toy, ["--config", path]).data.size == 64
        return
    with pytest.raises(ConfigError) as info:
        parse_config(_Toy, ["--config", path])
    assert str(info.value).startswith(f"{path}: {message.split('recipe.yaml: ', 1)[1]}")


def test_command_line_range_error_names_the_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"^command line \(--size\): size: 0 is out of range; it must be >= 1"):
        parse_config(_Toy, ["--config", _recipe(tmp_path, "size: 8\n"), "--size", "0"])


def test_bad_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        parse_config(_Toy, ["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError, match="must hold a mapping"):
        parse_config(_Toy, ["--config", _recipe(tmp_path, "- 1\n- 2\n")])


def test_sections_validate_on_construction():
    with pytest.raises(ConfigError, match="crop: 2.0 is out of range; it must be <= 1.0"):
        _Data(crop=2.0)
    assert _Data(sizes=[1, 2]).sizes == (1, 2)


def test_print_config_round_trips(tmp_path, capsys):
    path = _recipe(tmp_path, "size: 48\nsizes: [100, 200]\n")
    with pytest.raises(SystemExit) as info:
        parse_config(_Toy, ["--config", path, "--print-config", "--amp", "bf16"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text == config_to_yaml(parse_config(_Toy, ["--config", path, "--amp", "bf16"]))
    assert "# data\n" in text and "sizes: [100, 200]\n" in text
    again = parse_config(_Toy, ["--config", _recipe(tmp_path, text)])
    assert again.to_dict() == yaml.safe_load(text) == {
        "size": 48, "crop": 0.5, "sizes": [100, 200], "mean": None, "name": None,
        "amp": "bf16", "resume": True, "overwrite": False}


def test_parser_flags_and_help():
    parser = build_parser(_Toy)
    ns = parser.parse_args(["--sizes", "1", "2", "--mean", "1", "2", "3"])
    assert (ns.sizes, ns.mean) == ([1, 2], [1.0, 2.0, 3.0])
    assert "--no-resume" in parser.format_help() and "--no-overwrite" not in parser.format_help()


# ------------------------------------------------------------------ the entry points
PRETRAIN_CASES = [  # (recipe text, extra flags, expected message after "error: ")
    ("amp: fp32\n", [], "{recipe}: amp: 'fp32' is not allowed; choose from auto, none, bf16, fp16"),
    ("amp: bf17\n", [], "{recipe}: amp: 'bf17' is not allowed; choose from auto, none, bf16, fp16"),
    ("arch: SoCo_FPM\n", [], "{recipe}: arch: 'SoCo_FPM' is not allowed; choose from SoCo_FPN, SoCo_FPN_Star, "
                             "SoCo_C4, BYOL"),
    ("batch_sise: 64\n", [], "{recipe}: unknown key 'batch_sise'; did you mean batch_size?"),
    ("output_size: 7\n", [], "{recipe}: unknown key 'output_size'"),  # the removed option
    ("batch_size: 2.5\n", [], "{recipe}: batch_size: 2.5 is not an integer"),
    ("aware_range: 48\n", [], "{recipe}: aware_range: 48 is not a list of integers"),
    ("select_k: 5\n", [], "{recipe}: select_k: 5 is larger than padding_k 4; need select_k <= padding_k"),
    ("arch: SoCo_C4\naug: ImageAsymBboxAwareMultiJitter1\n", [],
     "{recipe}: aug: 'ImageAsymBboxAwareMultiJitter1' does not fit arch 'SoCo_C4'; choose from ImageAsymBboxCutout"),
    ("batch_size: 8\n", ["--batch-size", "0"], "command line (--batch-size): batch_size: 0 is out of range; it "
                                               "must be >= 1"),
    ("", ["--crop", "1.5"], "command line (--crop): crop: 1.5 is out of range; it must be <= 1.0"),
    ("", ["--device", "gpu"], "command line (--device): device: 'gpu' is not allowed; choose from auto, cpu, "
                              "cuda, cuda:N"),
]
FINETUNE_CASES = [
    ("amp: fp32\n", [], "{recipe}: amp: 'fp32' is not allowed; choose from auto, none, bf16, fp16"),
    ("detector: maskrcnn\n", [], "{recipe}: detector: 'maskrcnn' is not allowed; choose from maskrcnn_fpn,"),
    ("max_iters: 10\n", [], "{recipe}: unknown key 'max_iters'; did you mean max_iter, "),
    ("max_iter: ten\n", [], "{recipe}: max_iter: 'ten' is not an integer (or null)"),
    ("norm: batchnorm\n", [], "{recipe}: norm: 'batchnorm' is not allowed; choose from syncbn, bn, frozenbn, gn, none"),
    ("schedule: 1x\nsteps: [80000, 60000]\n", [], "{recipe}: steps: [80000, 60000] must be in increasing order"),
    ("schedule: 1x\n", ["--flip-prob", "2"], "command line (--flip-prob): flip_prob: 2.0 is out of range; it "
                                             "must be <= 1.0"),
    ("max_iter: 10\n", ["--init-parts", "head"], None),  # argparse's own choice check (exit 2)
]
PROPOSAL_CASES = [
    ("backend: soco2\n", [], "{recipe}: backend: 'soco2' is not allowed; choose from opencv-fast, opencv-quality, "
                             "opencv-single, soco"),
    ("backend: opencv-fast\nscale: 300\n", [], "{recipe}: scale: backend 'opencv-fast' has no parameter scale "
                                              "(it takes: base_k, inc_k, sigma)"),
    ("chunksize: 4\n", [], "{recipe}: unknown key 'chunksize'; did you mean chunk_size?"),
    ("chunk_size: [4]\n", [], "{recipe}: chunk_size: [4] is not an integer"),
    ("filter: ratio2.5\n", [], "{recipe}: filter: unknown filter strategy 'ratio2.5'"),
    ("", ["--workers", "0"], "command line (--workers): workers: 0 is out of range; it must be >= 1"),
]


def _entry(name):
    import importlib
    return importlib.import_module({"pretrain": "pretrain.train", "finetune": "transfer.finetune",
                                    "proposals": "selective_search.generate_proposals"}[name])


@pytest.mark.parametrize("entry, text, flags, expected",
                         [("pretrain", *c) for c in PRETRAIN_CASES] + [("finetune", *c) for c in FINETUNE_CASES]
                         + [("proposals", *c) for c in PROPOSAL_CASES])
def test_entry_points_refuse_bad_values_before_building_anything(tmp_path, capsys, entry, text, flags,
                                                                 expected):
    recipe = _recipe(tmp_path, text)
    out = tmp_path / "out"
    where = {"pretrain": ["--output-dir", str(out), "--data", str(tmp_path), "--proposals", str(tmp_path)],
             "finetune": ["--output-dir", str(out)],
             "proposals": ["--output", str(out), "--image-root", str(tmp_path)]}[entry]
    with pytest.raises(SystemExit) as info:
        _entry(entry).main(["--config", recipe, *where, *flags])
    if expected is None:  # malformed command line: argparse's usage message, status 2
        assert info.value.code == 2 and "invalid choice: 'head'" in capsys.readouterr().err
    else:
        message = str(info.value.code)
        assert message.startswith("error: " + expected.format(recipe=recipe)), message
        assert "\n" not in message
    assert not out.exists()  # nothing was built or written


@pytest.mark.parametrize("script, recipe_text", [("pretrain/train.py", "amp: fp32\n"),
                                                 ("pretrain/linear_eval.py", "base_lr: -1\n"),
                                                 ("transfer/finetune.py", "amp: bf17\n"),
                                                 ("selective_search/generate_proposals.py", "workers: two\n")])
def test_scripts_fail_before_the_heavy_imports_without_a_traceback(tmp_path, script, recipe_text):
    recipe = _recipe(tmp_path, recipe_text)
    code = ("import runpy, sys\n"
            f"sys.argv = [{script!r}, '--config', {recipe!r}]\n"
            "try:\n"
            f"    runpy.run_path({script!r}, run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    print('torch' in sys.modules, 'skimage' in sys.modules)\n"
            "    print(e.code)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    imported, message = proc.stdout.splitlines()
    assert imported == "False False"  # the check ran before torch / scikit-image were imported
    key = recipe_text.split(":")[0]
    assert message.startswith(f"error: {recipe}: {key}: "), message


@pytest.mark.parametrize("entry, recipe", [("pretrain", "pretrain/configs/SoCo_C4_400ep.yaml"),
                                           ("finetune", "transfer/configs/mask_rcnn_R50_FPN_1x_soco.yaml"),
                                           ("proposals", None)])
def test_print_config_prints_the_resolved_recipe(entry, recipe, capsys):
    argv = (["--config", str(REPO / recipe)] if recipe else ["--output", "x.proposals"]) + ["--print-config"]
    with pytest.raises(SystemExit) as info:
        _entry(entry).main(argv)
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    if recipe:
        for key, value in yaml.safe_load((REPO / recipe).read_text()).items():
            assert printed[key] == value, key
    flags = {a.dest for a in _entry(entry).build_parser()._actions} - {"help", "config", "print_config"}
    assert set(printed) == flags  # every option, as one flat recipe
