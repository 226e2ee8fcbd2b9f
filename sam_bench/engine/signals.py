"""Preemption: SIGTERM / SIGUSR1 / SIGUSR2 (and a first Ctrl-C, SIGINT) ask the run to stop cleanly.

A handler only sets a flag; the epoch loop looks at it after every step (a Python attribute, no
device sync), writes a checkpoint and raises :class:`Preempted`. ``sam-bench train`` notes the
scheduler's signals from its first line on (:func:`catch_early`), so one that comes while Hydra
composes the config or Python imports torch stops the run the same way, before it trains. The CLI turns that into exit
status :data:`PREEMPTED_EXIT_CODE`, so a scheduler (SLURM ``--signal``, Kubernetes, a spot-instance
notice) can tell "stopped on request, re-run me" from success (0), a Python/Hydra error (1) and bad
input (2).

Under SLURM via Hydra's submitit launcher, submitit's own handler for its preemption signal
(SIGUSR2 by default) requeues the job. That handler is chained: once the checkpoint is written, it
is called, so the job is requeued and resumes from that checkpoint instead of from an older one.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

# sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry". Not used by Python
# (0/1), Hydra (1), our bad-input errors (2), timeout(1) (124-127) or death by a signal (128+N).
PREEMPTED_EXIT_CODE = 75
#: SIGINT too: the first Ctrl-C checkpoints where the run is and stops (as a preemption), a second one aborts at once
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


class Preempted(Exception):
    """Training stopped on a signal after writing a checkpoint; re-running the command resumes."""


#: the signals a scheduler sends; caught from the CLI's start (a Ctrl-C then still interrupts at once)
EARLY_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class PreemptionHandler:
    """Context manager that turns SIGTERM, SIGUSR1, SIGUSR2 and a first SIGINT into a flag
    (:attr:`signal_name`) while active; it takes over a signal an enclosing handler (one entered
    before, e.g. :func:`catch_early`'s) had noted."""

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPT_SIGNALS):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:  # Ctrl-C twice: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> "PreemptionHandler":
        # signal.signal only works in the main thread; elsewhere (a launcher's worker thread) the
        # default action stays, i.e. the run dies and resumes from its last checkpoint.
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
            for handler in self._previous.values():
                outer = getattr(handler, "__self__", None)
                if isinstance(outer, PreemptionHandler) and outer.received is not None:
                    if self.received is None:
                        self.received = outer.received
                    outer.received = None
        return self

    def __exit__(self, *exc) -> None:
        previous = self._previous.get(self.received) if self.received is not None else None
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        if callable(previous) and self.received != signal.SIGINT:  # e.g. submitit's checkpoint-and-requeue: hand the signal on
            previous(self.received, None)


def catch_early() -> PreemptionHandler:
    """Note :data:`EARLY_SIGNALS` from now on, for the trainer's handler to take over: a signal sent
    before it is installed (while Hydra composes, Python imports torch) otherwise killed the run
    (status 143) instead of stopping it as a preemption (75). Left in place until the process ends."""
    return PreemptionHandler(EARLY_SIGNALS).__enter__()
