"""Preemption signals: the handler only sets a flag; the loop checks it at step boundaries on all ranks.

Under torchrun the *launcher* receives Slurm's signal first. torch 2.13's torchrun forwards only
SIGTERM, SIGINT, SIGHUP and SIGQUIT to the workers by default; a SIGUSR1 kills torchrun itself
(exit 138) and never reaches the workers. Launch with
``torchrun --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1`` (or the environment variable
``PET_SIGNALS_TO_HANDLE``) so USR1 is forwarded, and give the save time with ``--shutdown-timeout``
(default 30 s before torchrun sends SIGKILL). torchrun then exits 1 whatever the workers return, so
the trainer also writes ``{run_dir}/STOPPED.json`` for launchers that cannot see exit code 3.
"""
from __future__ import annotations

import signal

# What torchrun needs to forward our default signals (see the module docstring).
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def parse_signal(name: str) -> signal.Signals:
    """"SIGUSR1" or "USR1" -> signal.SIGUSR1; anything else is an error naming the config field."""
    sig = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
    if not isinstance(sig, signal.Signals):
        raise ValueError(f"unknown signal {name!r} in signals.signals")
    return sig


class StopFlag:
    """Installs handlers for the named signals (e.g. SIGUSR1, SIGTERM) that record the first one seen.

    ``close()`` restores the previous handlers, so ``trainer.train.run`` can be called again in the
    same process (the stage runner does).
    """

    def __init__(self, names: list[str]):
        self.received: str | None = None
        self._previous: dict[signal.Signals, object] = {}
        for name in names:
            sig = parse_signal(name)
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    @property
    def set(self) -> bool:
        return self.received is not None

    def close(self) -> None:
        """Put back the handlers that were installed before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "StopFlag":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
