"""Run a training entry point and SIGKILL it when it reaches a given step (exact-resume tests).

    python tests/killed_run.py pretrain STEP ARGS...   # pretrain/train.py ARGS, killed at global step STEP
    python tests/killed_run.py finetune STEP ARGS...   # transfer/finetune.py ARGS, killed at iteration STEP

The process kills itself with SIGKILL (no handler, no cleanup, as ``kill -9`` from a user) at the
start of that step's optimisation, after its batch was loaded, while the loader workers are
prefetching the next batches. Run it with the repository on PYTHONPATH.
"""
from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    which, kill_step, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if which == "pretrain":
        from pretrain import engine, train
        step_of = lambda args, kwargs: kwargs["step"]  # noqa: E731
        entry = train.main
    elif which == "finetune":
        from transfer import engine, finetune
        step_of = lambda args, kwargs: args[2].iteration  # noqa: E731  (model, batches, state, device)
        entry = finetune.main
    else:
        raise SystemExit(f"usage: killed_run.py pretrain|finetune STEP ARGS... (got {which!r})")
    original = engine.train_step

    def train_step(*args, **kwargs):
        if step_of(args, kwargs) == kill_step:
            _die()
        return original(*args, **kwargs)

    engine.train_step = train_step
    entry(argv)
    raise SystemExit(f"the run ended before step {kill_step}")


if __name__ == "__main__":
    main()
