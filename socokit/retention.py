"""Checkpoint retention: keep the last K numbered checkpoints and every N-th, delete the rest.

Numbered checkpoints are files ``PREFIX<number>.pth`` in the output folder (``ckpt_epoch_0042.pth``,
``linear_epoch_0042.pth`` by epoch; ``model_0005000.pth`` by iteration). After every save,
:func:`prune_checkpoints` deletes the numbered files that are neither

* among the ``keep_last`` highest numbers (``keep_last=0`` keeps all of them: no pruning), nor
* a multiple of ``keep_every`` (``keep_every=0``: no milestones), nor
* the file ``current.pth`` is (``current.pth`` is a hard link to the newest save).

``current.pth`` itself, final files (``model_final.pth``) and anything not matching the
pattern are never touched. Saving writes the numbered file, then moves ``current.pth`` onto it,
then prunes: a kill at any point leaves ``current.pth`` complete, and a later prune never removes
the file it names, so ``--auto-resume`` always finds a valid checkpoint.

Defaults: SoCo_FPN_400ep checkpoints are ~585 MB (weights, EMA target, LARS momentum); keeping
the last 2 epochs and every 50th gives at most 2 + 400/50 = 10 files, ~5.9 GB per run instead
of ~234 GB.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from socokit.log import get_logger

#: Defaults by unit: (keep_last, keep_every).
DEFAULTS = {"epochs": (2, 50), "iterations": (2, 0)}


def numbered_checkpoints(output_dir: str, prefix: str) -> dict[int, str]:
    """``{number: path}`` of the files ``PREFIX<digits>.pth`` in ``output_dir``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.pth$")
    out = {}
    try:
        names = os.listdir(output_dir)
    except FileNotFoundError:
        return out
    for name in names:
        m = pattern.fullmatch(name)
        if m:
            out[int(m.group(1))] = os.path.join(output_dir, name)
    return out


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def to_delete(numbers, keep_last: int, keep_every: int) -> list[int]:
    """The checkpoint numbers the policy drops (before protecting ``current.pth``).

    Args:
        numbers: numbers of the existing numbered checkpoints.
        keep_last: keep the newest this many (0 = keep all: nothing is dropped).
        keep_every: keep multiples of this (0 = none).

    Raises:
        ValueError: a negative count.
    """
    if keep_last < 0 or keep_every < 0:
        raise ValueError(f"--keep-last and --keep-every must be >= 0, got {keep_last}, {keep_every}")
    if keep_last == 0:
        return []
    ordered = sorted(set(numbers))
    keep = set(ordered[-keep_last:])
    if keep_every:
        keep.update(n for n in ordered if n % keep_every == 0)
    return [n for n in ordered if n not in keep]


def prune_checkpoints(output_dir: str, prefix: str, keep_last: int, keep_every: int,
                      current: str = "current.pth", stale: tuple[str, ...] = ()) -> list[str]:
    """Delete the numbered checkpoints the policy drops; return the deleted paths.

    Args:
        output_dir: the run's folder.
        prefix: numbered checkpoints are ``PREFIX<digits>.pth``.
        keep_last, keep_every: see :func:`to_delete`.
        current: name of the always-valid checkpoint, never deleted nor the file it is.
        stale: names of rolling files (``ckpt_iter.pth``) deleted once ``current`` has moved
            past them (only when pruning is on, ``keep_last > 0``).

    The file ``output_dir/current`` is (same inode) is never deleted, whatever its number.
    Call it on one rank only, after the save it follows is complete.
    """
    files = numbered_checkpoints(output_dir, prefix)
    current_path = os.path.join(output_dir, current)
    doomed = [files[n] for n in to_delete(files, keep_last, keep_every)]
    if keep_last:
        doomed += [os.path.join(output_dir, name) for name in stale]
    deleted = []
    for path in doomed:
        if not os.path.exists(path) or _same_file(path, current_path):
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        deleted.append(path)
    if deleted:
        get_logger("soco.retention").info("retention (keep last %d, every %d): deleted %s",
                                          keep_last, keep_every,
                                          ", ".join(os.path.basename(p) for p in deleted))
    return deleted


@dataclass(frozen=True)
class Retention:
    """A retention policy bound to one kind of numbered checkpoint (see module docstring).

    Attributes:
        prefix: ``"ckpt_epoch_"``, ``"linear_epoch_"``, ``"model_"`` ...
        keep_last: newest numbered files kept (0 = keep all).
        keep_every: multiples kept (0 = none).
        stale: rolling files deleted once ``current.pth`` no longer is them.
    """

    prefix: str
    keep_last: int = 0
    keep_every: int = 0
    stale: tuple[str, ...] = ()

    def __post_init__(self):
        to_delete([], self.keep_last, self.keep_every)  # validates the counts

    def apply(self, output_dir: str) -> list[str]:
        """Prune ``output_dir`` (see :func:`prune_checkpoints`); returns the deleted paths."""
        return prune_checkpoints(output_dir, self.prefix, self.keep_last, self.keep_every,
                                 stale=self.stale)
