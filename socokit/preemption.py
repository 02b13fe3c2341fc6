"""Save on SIGTERM / SIGUSR1 at the next step boundary, then exit so the job can be requeued.

Cluster schedulers announce the end of a job with a signal: SLURM sends SIGTERM at the time
limit or on preemption (then SIGKILL after ``KillWait``, 30 s by default), and
``#SBATCH --signal=USR1@300`` asks for SIGUSR1 five minutes ahead. A signal handler must not
save a checkpoint itself (it may fire inside a collective or half-way through an optimizer
step), so :class:`PreemptionWatcher` only records it; the training loops ask
:meth:`PreemptionWatcher.requested` after every step. That call all-reduces the flag, so every
rank stops after the same step even when only some of them received the signal. The loop
then writes a checkpoint through its normal save path (``current.pth`` included) and raises
:class:`Preempted`; the entry script turns it into exit status :data:`REQUEUE_EXIT_CODE`.
Restarting the same command resumes from ``current.pth`` (``--auto-resume``).

The exit status is 75 (``EX_TEMPFAIL`` of sysexits.h: "temporary failure, retry later"). A
cluster whose ``slurm.conf`` lists it in ``RequeueExit`` requeues such jobs by itself; the
templates in ``docs/cluster.md`` run ``scontrol requeue`` when they see it.
"""
from __future__ import annotations

import signal

import torch

from socokit import distributed as sdist
from socokit.log import get_logger

#: Exit status of a run that saved after a signal and wants to be restarted (EX_TEMPFAIL).
REQUEUE_EXIT_CODE = 75

#: Signals that request a save-and-exit by default.
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")


class Preempted(Exception):
    """The run saved a checkpoint after a signal and stops; restart it to resume.

    Attributes:
        signal_name: e.g. ``"SIGUSR1"`` (the first signal this process saw, or ``"peer"`` when
            only another rank received one).
        step: completed iterations saved in the checkpoint.
    """

    def __init__(self, signal_name: str, step: int):
        super().__init__(f"received {signal_name}: checkpoint saved after iteration {step}; "
                         f"exiting with status {REQUEUE_EXIT_CODE} so the job can be requeued "
                         "(rerun the same command to resume)")
        self.signal_name, self.step = signal_name, step


def watcher_from_args(args, device) -> "PreemptionWatcher":
    """A watcher for the default signals, or an inert one with ``--no-save-on-signal``.

    ``args``: anything with a ``save_on_signal`` attribute (a run configuration section).
    """
    return PreemptionWatcher(DEFAULT_SIGNALS if args.save_on_signal else (), device)


class PreemptionWatcher:
    """Records the signals in ``names`` and answers, collectively, whether to stop.

    Use it as a context manager (handlers are restored on exit). With no names it is inert.

    Args:
        names: signal names such as ``"SIGTERM"``, ``"SIGUSR1"``.
        device: device of the one-element tensor all-reduced by :meth:`requested` (the
            process group's device: CUDA for NCCL).

    Raises:
        ValueError: an unknown signal name.
    """

    def __init__(self, names=DEFAULT_SIGNALS, device: torch.device | str = "cpu"):
        self.signals = []
        for name in names or ():
            sig = getattr(signal, name if name.startswith("SIG") else "SIG" + name, None)
            if not isinstance(sig, signal.Signals):
                raise ValueError(f"unknown signal {name!r}")
            self.signals.append(sig)
        self.device = torch.device(device)
        self.received: str | None = None
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def install(self) -> "PreemptionWatcher":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.restore()

    def requested(self) -> bool:
        """True on every rank when any rank has received a watched signal (collective when
        distributed: call it at the same point on every rank)."""
        if not self.signals:
            return False
        flag = 1.0 if self.received is not None else 0.0
        if sdist.is_dist():
            flag = float(sdist.all_reduce_sum(torch.tensor([flag], device=self.device)).item())
        if flag > 0 and self.received is None:
            self.received = "peer"
        if flag > 0:
            get_logger("soco.preemption").warning("%s received: saving at this step boundary",
                                                  self.received)
        return flag > 0
