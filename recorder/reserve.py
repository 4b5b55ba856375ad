"""A little disk space held back while recording, released on failure, so that marking the
run `failed` with its reason still fits when the disk filled up."""
from __future__ import annotations

import os
from pathlib import Path

RESERVE_BYTES = 256 << 10   # the root zarr.json (config, model summary) is far smaller


class DiskReserve:
    def __init__(self, directory):
        self.file = Path(directory) / "reserve"

    def hold(self) -> None:
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.file, "wb") as f:
                f.write(b"\0" * RESERVE_BYTES)
                f.flush()
                os.fsync(f.fileno())
        except OSError:   # already short of space: nothing to hold back
            self.free()

    def free(self) -> None:
        try:
            self.file.unlink()
        except OSError:
            pass
