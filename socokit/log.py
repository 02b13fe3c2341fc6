"""Rank-aware logging: rank 0 talks to stdout, every rank writes its own file."""
from __future__ import annotations

import json
import logging
import os
import sys

_FORMAT = "[%(asctime)s %(name)s] %(message)s"
_DATEFMT = "%m/%d %H:%M:%S"


def setup_logging(output_dir: str | None = None, rank: int = 0, name: str = "soco",
                  log_environment: bool = True) -> logging.Logger:
    """Configure the ``name`` logger (and its children) for this process.

    Rank 0 logs INFO to stdout; other ranks only log WARNING and above to stderr. With
    ``output_dir`` every rank also writes ``log.txt`` (rank 0) or ``log.rank{r}.txt``.
    Calling it again replaces the handlers it installed before.

    With ``log_environment`` the first line logged is the environment record of
    :mod:`socokit.env` (versions, GPU model, git commit) as one JSON object.
    """
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        if getattr(h, "_soco", False):
            logger.removeHandler(h)
            h.close()
    fmt = logging.Formatter(_FORMAT, _DATEFMT)
    stream = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    stream.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    stream.setFormatter(fmt)
    stream._soco = True
    logger.addHandler(stream)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        fname = "log.txt" if rank == 0 else f"log.rank{rank}.txt"
        fh = logging.FileHandler(os.path.join(output_dir, fname))
        fh.setFormatter(fmt)
        fh._soco = True
        logger.addHandler(fh)
    if log_environment:
        from socokit.env import environment

        logger.info("environment: %s", json.dumps(environment(), sort_keys=True))
    return logger


def get_logger(name: str = "soco") -> logging.Logger:
    """A child of the ``soco`` logger (``get_logger("pretrain")`` → ``soco.pretrain``)."""
    if name == "soco" or name.startswith("soco."):
        return logging.getLogger(name)
    return logging.getLogger(f"soco.{name}")
