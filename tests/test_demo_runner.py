"""The end-to-end demo's stage commands parse with the entry points they call."""
import argparse
import importlib
import importlib.util
import os
import sys

import pytest

from socokit.config import parse_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {"pretrain/train.py": "pretrain.train", "transfer/finetune.py": "transfer.finetune",
           "transfer/convert.py": "transfer.convert",
           "selective_search/generate_proposals.py": "selective_search.generate_proposals",
           "selective_search/filter_proposals.py": "selective_search.filter_proposals",
           "selective_search/visualize.py": "selective_search.visualize"}


def _run_demo():
    spec = importlib.util.spec_from_file_location("run_demo", os.path.join(REPO, "scripts", "run_demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("extra", [[], ["--baseline", "--finetune-iters", "50", "--out", "elsewhere"]])
def test_every_stage_command_parses(extra):
    demo = _run_demo()
    args = demo.build_arg_parser().parse_args(extra)
    stages = demo.build_stages(args)
    titles = [s[0] for s in stages]
    assert len(titles) == len(set(titles)) == (9 if "--baseline" in extra else 8)
    for title, cmd, done, *env in stages:
        assert cmd[0] == sys.executable, cmd  # the interpreter running the demo, not a PATH lookup
        assert done.startswith((args.out, args.data)), (title, done)
        if cmd[1] == "-m":
            assert cmd[2] == "demo.data"
            continue
        script, argv = cmd[1], cmd[2:]
        assert os.path.isfile(os.path.join(REPO, script)), script
        module = importlib.import_module(MODULES[script])
        if hasattr(module, "CONFIG"):  # typed configuration: recipe + flags, validated
            parsed = argparse.Namespace(**parse_config(module.CONFIG, argv).to_dict())
        else:
            parsed = module.build_parser().parse_args(argv)
        if script == "transfer/finetune.py":
            assert parsed.output_dir.startswith(args.out)
            if "--finetune-iters" in extra:
                assert parsed.max_iter == 50 and list(parsed.steps) == [40, 47]
            else:
                assert parsed.max_iter == 500  # the recipe's schedule
        if script == "pretrain/train.py":
            assert parsed.epochs == args.pretrain_epochs and parsed.auto_resume
