"""One writer per run: a lock file inside the store names the process that records it.

`<run>/.dynascope/lock` holds JSON `{"pid", "host", "started", "proc_start", "command"}`.
It is created with O_EXCL, so two writers racing for a run cannot both win. A lock whose
process is gone (same host, pid not alive, or alive but started at another time: a reused
pid) is stale and taken over with a warning; a lock held by a live process, or by any
process on another host (whose liveness we cannot check), is refused with its pid and host.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path

CONTROL_DIR = ".dynascope"   # lock, reserve and checkpoint files; never a Zarr node
LOCK_NAME = "lock"


class StoreLockedError(RuntimeError):
    """Another live process records into this run."""


def control_dir(path) -> Path:
    return Path(path) / CONTROL_DIR


def lock_path(path) -> Path:
    return control_dir(path) / LOCK_NAME


def _proc_start(pid: int) -> str | None:
    """Start time of `pid` in clock ticks since boot (Linux); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_lock(path) -> dict | None:
    try:
        return json.loads(lock_path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": None, "host": None, "unreadable": True}


def holder_alive(info: dict) -> bool | None:
    """True/False for a lock taken on this host; None when it cannot be known."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return None
    pid = info["pid"]
    if not _alive(pid):
        return False
    start = info.get("proc_start")
    return start is None or _proc_start(pid) in (None, start)


def describe_holder(info: dict) -> str:
    return (f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('started')}, "
            f"`{info.get('command', '?')}`)")


def check_unlocked(path, action: str) -> None:
    """Raise StoreLockedError if a live process holds the run's lock."""
    info = read_lock(path)
    if info is None or info.get("unreadable"):   # a writer killed while creating it
        return
    alive = holder_alive(info)
    if info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        raise StoreLockedError(f"{path} is already open for recording in this process; "
                               f"close that Recorder before you {action}")
    if alive is False:
        return
    where = "is being recorded by" if alive else "is locked by"
    hint = ("wait for it to finish or stop it" if alive else
            f"if that job is dead, delete {lock_path(path)}")
    raise StoreLockedError(f"{path} {where} {describe_holder(info)}; refusing to {action}; {hint}")


class RunLock:
    """Held while a Recorder writes; released (file removed) on close."""

    def __init__(self, path):
        self.path = Path(path)
        self.file = lock_path(path)
        self.held = False

    def acquire(self, action: str = "record into it") -> "RunLock":
        self.file.parent.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "proc_start": _proc_start(os.getpid()), "command": " ".join(sys.argv)[:500]}
        for _ in range(3):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                old = read_lock(self.path)
                if old is None:
                    continue
                check_unlocked(self.path, action)   # raises unless the holder is dead
                warnings.warn(f"{self.path}: taking over the stale lock of {describe_holder(old)}, "
                              f"which is no longer running", stacklevel=3)
                try:
                    os.unlink(self.file)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            self.held = True
            return self
        raise StoreLockedError(f"could not take the lock {self.file}: another process keeps taking it")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        info = read_lock(self.path)
        if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            try:
                os.unlink(self.file)
            except FileNotFoundError:
                pass


class NoLock:
    """Stands in for the lock and the disk reserve where the run is not a local directory
    (object storage): those stores have no atomic create-if-absent to build a lock on."""

    held = False

    def acquire(self, action: str = "") -> "NoLock":
        return self

    def release(self) -> None:
        pass

    def hold(self) -> None:
        pass

    def free(self) -> None:
        pass
