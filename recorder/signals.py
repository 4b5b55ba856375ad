"""Signals while recording: SIGTERM (what schedulers send before SIGKILL) ends the training
loop like Ctrl-C does, so the Recorder can flush and mark the run `failed`; while the store
is being finished, further SIGINT/SIGTERM are held back so a second Ctrl-C cannot leave a
half-written store. A third signal during the finish gives up on it (the store still opens
up to its committed rows)."""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM while a Recorder is open."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class TermHandler:
    """Installs a SIGTERM handler that raises `Terminated`, unless the program has its own."""

    def __init__(self):
        self.previous = None
        self.installed = False

    def install(self) -> None:
        if not _main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return   # a framework or the user handles SIGTERM already: leave it to them
        self.previous = signal.signal(signal.SIGTERM, self._raise)
        self.installed = True

    @staticmethod
    def _raise(signum, frame):
        raise Terminated(signum)

    def remove(self) -> None:
        if self.installed and _main_thread():
            signal.signal(signal.SIGTERM, self.previous)
        self.installed = False


@contextmanager
def held_signals(what: str):
    """Defer SIGINT/SIGTERM while `what` runs; the second one received here gives up."""
    if not _main_thread():
        yield
        return
    count = {"n": 0}

    def hold(signum, frame):
        count["n"] += 1
        if count["n"] >= 2:
            raise Terminated(signum)
        print(f"dynascope: {signal.Signals(signum).name} received while {what}; finishing the store "
              f"first (send it again to abandon the flush)", file=sys.stderr, flush=True)

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in saved:
        signal.signal(s, hold)
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
