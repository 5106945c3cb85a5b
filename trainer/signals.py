"""Preemption signals: the handler only sets a flag; the loop checks it at step boundaries on all ranks."""
from __future__ import annotations

import signal


class StopFlag:
    """Installs handlers for the named signals (e.g. SIGUSR1, SIGTERM) that record the first one seen."""

    def __init__(self, names: list[str]):
        self.received: str | None = None
        for name in names:
            sig = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
            if sig is None:
                raise ValueError(f"unknown signal {name!r}")
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    @property
    def set(self) -> bool:
        return self.received is not None
