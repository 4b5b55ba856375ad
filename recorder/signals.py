"""Signals while recording.

SIGTERM (what schedulers send before SIGKILL) ends the training loop the way Ctrl-C does,
by raising in the main thread, so the Recorder flushes and marks the run `failed`. From the
first signal on, further SIGINT/SIGTERM are held back while the store is finished, so a
second Ctrl-C cannot leave a half-written store; one more after that abandons the flush
(the store still opens, up to its committed rows). Handlers the program installed itself
are left alone, and nothing is installed outside the main thread.
"""
from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM while a Recorder is open."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _is_default(signum, handler) -> bool:
    return handler is signal.SIG_DFL or (signum == signal.SIGINT and handler is signal.default_int_handler)


class SignalGuard:
    def __init__(self):
        self.saved: dict = {}
        self.held = 0

    def install(self) -> None:
        if not _main_thread():
            return
        for s in SIGNALS:
            current = signal.getsignal(s)
            if _is_default(s, current):
                self.saved[s] = current
                signal.signal(s, self._first)

    def _first(self, signum, frame):
        self.hold()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    def _hold(self, signum, frame):
        self.held += 1
        if self.held >= 2:
            raise Terminated(signum)
        print(f"dynascope: {signal.Signals(signum).name} received; finishing the store first "
              f"(send it again to abandon the flush)", file=sys.stderr, flush=True)

    def hold(self) -> None:
        """From now until `remove`, signals are held back (the finish has begun)."""
        if not _main_thread():
            return
        for s in SIGNALS:
            if s not in self.saved:
                self.saved[s] = signal.getsignal(s)
            signal.signal(s, self._hold)

    def remove(self) -> None:
        if _main_thread():
            for s, h in self.saved.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)
        self.saved = {}
        self.held = 0
