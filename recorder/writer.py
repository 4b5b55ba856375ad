"""Background chunk writer: rows are buffered in memory and written to Zarr as whole chunks
from one thread, so the training thread never waits on compression or disk.

Why one writer thread: zarr 3 loses data with concurrent partial-chunk writers, and a
per-step write into a chunk is a read-modify-write (70x slower, see DESIGN.md). After each
flush the group's committed row count goes into the root attributes (an atomic file
replace in zarr's local store), so a killed run is readable up to its last flush.
"""
from __future__ import annotations

import queue
import threading
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import zarr

try:  # zarr's own bridge to its event loop (what zarr.Array.__setitem__ calls)
    from zarr.core.sync import sync as _zarr_sync
except ImportError:  # pragma: no cover - another zarr layout: one call per array
    _zarr_sync = None

from .extensions import ArraySpec


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor; the writer thread does the device copy
        value = value.detach()
        if value.dtype.is_floating_point and value.dtype not in _NUMPY_FLOATS:
            value = value.float()  # bfloat16 has no numpy dtype
        return value.cpu().numpy()
    return np.asarray(value)


# Fixed-width unicode (parameter and layer names) has no ratified zarr v3 spec yet; zarr warns
# on every write. The store is read back by zarr-python/xarray, which handle it.
warnings.filterwarnings("ignore", message=r".*FixedLengthUTF32.*", module=r"zarr\..*")

_NUMPY_FLOATS: set = set()
try:  # torch is a recorder dependency, but keep the writer importable without it
    import torch

    _NUMPY_FLOATS = {torch.float16, torch.float32, torch.float64}
except ImportError:  # pragma: no cover
    pass


#: chunks up to this size (a per-step scalar: 64 rows x 8 bytes) are stored uncompressed:
#: zstd saves a few hundred bytes on them but costs a codec round trip per chunk in zarr
UNCOMPRESSED_CHUNK_BYTES = 2048


def _codec_options(chunks: tuple, dtype) -> dict:
    """Per-array codec choice; zarr records it in the array's metadata, so any reader decodes
    old (zstd) and new (uncompressed) chunks alike."""
    nbytes = int(np.prod(chunks)) * np.dtype(dtype).itemsize
    return {"compressors": None} if nbytes <= UNCOMPRESSED_CHUNK_BYTES else {}


def _write_rows(writes: list, rows: slice) -> None:
    """Write one chunk's rows of every array in one round trip to zarr's event loop instead
    of one blocking call per array. One array after the other: written concurrently
    (`asyncio.gather`) the codec and file threads burst onto every core at once and take
    the training thread's (measured: 1-2 % of a seed-CNN step with one torch thread)."""
    if len(writes) > 1 and _zarr_sync is not None:
        async def write_all():
            for arr, block in writes:
                await arr.async_array.setitem(rows, block)
        _zarr_sync(write_all())
        return
    for arr, block in writes:
        arr[rows] = block


def _set_event() -> threading.Event:
    e = threading.Event()
    e.set()
    return e


@dataclass
class RowGroup:
    """One row group (train, probe, eval, params, ...): its specs, buffer and sizes."""

    name: str
    row_dim: str
    chunk_rows: int
    specs: dict[str, ArraySpec] = field(default_factory=dict)
    buffer: list[dict] = field(default_factory=list)
    start: int = 0            # first row of the buffer (rows before are handed to the writer)
    capacity: int = 0         # rows allocated on disk (writer thread only)
    dim_sizes: dict[str, int] = field(default_factory=dict)   # writer thread only
    arrays: dict[str, zarr.Array] = field(default_factory=dict)  # writer thread only
    done: threading.Event = field(default_factory=_set_event)    # last hand-off written


class ChunkWriter:
    """Owns the zarr root after creation; every write goes through its queue."""

    def __init__(self, root: zarr.Group, committed: dict, expected_rows: dict | None = None,
                 max_pending: int = 3):
        self.root = root
        self.committed = dict(committed)
        # kept for callers; rows are never preallocated from a planned length (a killed
        # `--epochs 100000000` run must stay cheap to open): capacity grows by doubling
        self.expected_rows = dict(expected_rows or {})
        self.groups: dict[str, RowGroup] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self.blocked_seconds = 0.0      # training-thread time spent waiting on a full queue
        self.bytes_written = 0
        self.write_seconds = 0.0        # writer-thread time spent converting + writing
        self.notices: list[str] = []    # warnings for the training thread to show
        self._nonfinite_warned: set = set()
        self._thread = threading.Thread(target=self._run, name="dynascope-writer", daemon=True)
        self._thread.start()

    # -- training-thread API ----------------------------------------------------
    def add_group(self, name: str, row_dim: str, chunk_rows: int) -> RowGroup:
        if name not in self.groups:
            self.groups[name] = RowGroup(name, row_dim, chunk_rows, start=self.committed.get(name, 0))
        return self.groups[name]

    def adopt(self) -> None:
        """Take over the row arrays a resumed store already has (writer thread not busy yet)."""
        self._submit(("adopt",))
        self._queue.join()
        self.raise_if_failed()

    def truncate(self, rows: dict) -> None:
        """Cut groups back to `rows` (committed first, then the arrays), and wait."""
        self._submit(("truncate", dict(rows)))
        self._queue.join()
        self.raise_if_failed()
        for name, n in rows.items():
            if name in self.groups:
                self.groups[name].start = n

    def declare(self, spec: ArraySpec) -> None:
        group = self.groups.get(spec.group)
        if group is None:
            raise KeyError(f"unknown row group '{spec.group}' for array '{spec.name}'")
        group.specs.setdefault(spec.name, spec)

    def append(self, group_name: str, row: dict) -> None:
        """Buffer one row ({array name: value}); hand whole chunks to the writer."""
        self.raise_if_failed()
        group = self.groups[group_name]
        if not group.specs.keys() >= row.keys():   # a subset test: no sets built per row
            unknown = set(row) - set(group.specs)
            raise KeyError(f"arrays {sorted(unknown)} are not declared in group '{group_name}'")
        group.buffer.append(row)
        if len(group.buffer) >= group.chunk_rows:
            self._hand_off(group)

    def write_static(self, group: str, name: str, data, dims: tuple[str, ...], attrs: dict | None = None) -> None:
        """Write a whole array that does not grow (ground truth, tracked ids, thumbnails)."""
        self._submit(("static", group, name, data, tuple(dims), attrs or {}))

    def update_attrs(self, attrs: dict) -> None:
        self._submit(("attrs", attrs))

    def flush(self, groups=None) -> None:
        """Write the buffered rows of `groups` (default: all; a partial chunk included) and
        wait until everything queued is on disk."""
        for group in self.groups.values():
            if group.buffer and (groups is None or group.name in groups):
                self._hand_off(group)
        self._queue.join()
        self.raise_if_failed()

    def close(self, trim: bool = True) -> None:
        self.flush()
        if trim:
            self._submit(("trim",))
        self._submit(None)
        self._thread.join()
        self.raise_if_failed()

    def abort(self, attrs: dict | None = None, before=None) -> list[str]:
        """Best effort after a failure, never raising: stop the thread, then (in this thread,
        so nothing writes concurrently) mark the store with `attrs` first, a tiny write that
        matters most, then write what is buffered, trim, and mark it again with the final
        committed counts. `before()` runs once the thread stopped (e.g. free reserved disk
        space). Returns what could not be done, for the caller to report."""
        problems: list[str] = []
        try:
            self._queue.put(None, timeout=60)
        except BaseException:  # noqa: BLE001 - we are already handling an error
            pass
        self._thread.join(timeout=120)
        if self._thread.is_alive():
            return ["the writer thread did not stop within 120 s; the store is readable up to "
                    "its committed rows"]
        if self._error is not None:
            problems.append(f"writer: {self._error!r}")
            self._error = None
        if before is not None:
            before()
        steps = []
        if attrs:
            steps.append(("status", lambda: self._do_attrs(attrs)))
        for group in self.groups.values():
            if group.buffer:
                rows, start, group.buffer = group.buffer, group.start, []
                steps.append((f"{len(rows)} buffered {group.name} rows",
                              lambda g=group.name, s=start, r=rows: self._do_rows(g, s, r)))
        steps.append(("trim", self._do_trim))
        if attrs:
            steps.append(("status", lambda: self._do_attrs(attrs)))
        for what, do in steps:
            try:
                do()
            except BaseException as e:  # noqa: BLE001
                problems.append(f"{what}: {e!r}")
        return problems

    def raise_if_failed(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"the store writer failed: {err!r}") from err

    # -- internals ----------------------------------------------------------------
    def _hand_off(self, group: RowGroup) -> None:
        # at most one chunk per group in flight: a kill then loses the open buffer and the
        # chunk being written, never a queue of chunks
        if not group.done.is_set():   # usually written long ago: no timing, no wait
            t0 = time.perf_counter()
            group.done.wait()
            self.blocked_seconds += time.perf_counter() - t0
        rows, start = group.buffer, group.start
        group.buffer = []
        group.start += len(rows)
        group.done.clear()
        self._submit(("rows", group.name, start, rows))

    def _submit(self, task) -> None:
        t0 = time.perf_counter()
        self._queue.put(task)
        self.blocked_seconds += time.perf_counter() - t0

    def _run(self) -> None:
        while True:
            task = self._queue.get()
            try:
                if task is None:
                    return
                if self._error is None:
                    t0 = time.perf_counter()
                    getattr(self, f"_do_{task[0]}")(*task[1:])
                    self.write_seconds += time.perf_counter() - t0
            except BaseException as e:  # noqa: BLE001 - reported to the training thread
                self._error = e
            finally:
                if task is not None and task[0] == "rows":
                    self.groups[task[1]].done.set()
                self._queue.task_done()

    def _do_attrs(self, attrs: dict) -> None:
        self.root.attrs.update(attrs)

    def _do_static(self, group, name, data, dims, attrs) -> None:
        data = _to_numpy(data)
        g = self.root.require_group(group)
        if name in g:
            del g[name]
        row_bytes = max(1, data[:1].nbytes) if data.ndim else 1
        chunks = (max(1, min(len(data), (4 << 20) // row_bytes)), *data.shape[1:]) if data.ndim else None
        arr = g.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks,
                             dimension_names=list(dims), overwrite=True)
        if attrs:
            arr.attrs.update(attrs)
        arr[...] = data
        self.bytes_written += data.nbytes

    def _do_rows(self, group_name: str, start: int, rows: list[dict]) -> None:
        group = self.groups[group_name]
        if start != self.committed.get(group_name, 0):
            # an earlier write of this group failed: writing on would leave a gap of fill
            # values below a committed count that claims them
            raise RuntimeError(f"{group_name} rows {self.committed.get(group_name, 0)}..{start - 1} "
                               f"were not written; refusing to commit rows after a gap")
        zgroup = self.root.require_group(group_name)
        n = len(rows)
        blocks = {}
        for name, spec in group.specs.items():
            values = [r.get(name) for r in rows]
            if all(v is None for v in values):
                continue
            blocks[name] = self._stack(spec, values)
        self._derive_columns(group_name, start, blocks, rows)
        # grow shared dimensions (slot, class, ...) and rows before writing
        for name, block in blocks.items():
            for dim, size in zip(group.specs[name].dims[1:], block.shape[1:]):
                if size > group.dim_sizes.get(dim, 0):
                    self._grow_dim(group, dim, size)
        end = start + n
        if end > group.capacity:
            want = max(end, 2 * group.capacity, group.chunk_rows * 16 if group.chunk_rows > 1 else 1)
            self._grow_rows(group, want)
        writes = []
        for name, block in blocks.items():
            spec = group.specs[name]
            arr = group.arrays.get(name) or self._create(group, zgroup, spec, block)
            block = self._pad(block, arr.shape[1:], spec.fill_value)
            writes.append((arr, block))
            self.bytes_written += block.nbytes
        _write_rows(writes, slice(start, end))
        self.committed[group_name] = end
        self.root.attrs["committed"] = dict(self.committed)

    def _derive_columns(self, group_name: str, start: int, blocks: dict, rows: list) -> None:
        """The columns derived from a chunk's losses and logits: per row the examples whose
        loss / logits are NaN or inf (padding excluded) and the batch's mean loss, here in
        the writer thread from the host copies, so training pays nothing for them."""
        group = self.groups[group_name]
        if "nonfinite_loss" in group.specs and "loss" in blocks:
            n = blocks["loss"].shape[0]
            width = blocks["loss"].shape[1] if blocks["loss"].ndim > 1 else 1
            valid = (blocks["example_id"] >= 0) if "example_id" in blocks else np.ones((n, width), bool)
            valid = valid.reshape(n, -1)
            for name, src in (("nonfinite_loss", "loss"), ("nonfinite_logits", "logits")):
                if src in blocks and name not in blocks:
                    # each source has its own slot width (the widest batch that gave it), and
                    # rows that did not give it hold fill values, not recorded NaNs: their
                    # count is the array's fill (-1, "not recorded"), as in a chunk without any
                    b = blocks[src]
                    w = b.shape[1] if b.ndim > 1 else 1
                    bad = ~np.isfinite(b.reshape(n, w, -1)).all(-1) & valid[:, :w]
                    recorded = np.array([r.get(src) is not None for r in rows])
                    blocks[name] = np.where(recorded, bad.sum(1), group.specs[name].fill_value).astype(np.int32)
            if "batch_loss" in group.specs and "batch_loss" not in blocks:
                # the mean of the batch's losses, from the host copy: no reduction (on the GPU a
                # kernel launch) in the training step; accumulated in float64, stored float32
                loss = blocks["loss"].reshape(n, width)
                mask = valid[:, :width]
                with np.errstate(invalid="ignore", divide="ignore"):
                    mean = np.where(mask, loss, 0).sum(1, dtype=np.float64) / mask.sum(1)
                blocks["batch_loss"] = mean.astype(np.float32)
        for name in ("nonfinite_loss", "nonfinite_logits"):
            counts = blocks.get(name)
            if counts is None or (group_name, name) in self._nonfinite_warned or not (counts > 0).any():
                continue
            self._nonfinite_warned.add((group_name, name))
            row = start + int(np.flatnonzero(counts > 0)[0])
            what = name.split("_", 1)[1]
            self.notices.append(f"{group_name} row {row}: {int(counts.max())} example(s) with NaN/inf {what}; "
                                f"they are stored as recorded and counted in {group_name}/{name} "
                                f"(`dynascope info` reports them; analyses give NaN, never 0)")

    def _stack(self, spec: ArraySpec, values: list) -> np.ndarray:
        arrays = [None if v is None else _to_numpy(v) for v in values]
        present = [a for a in arrays if a is not None]
        ndim = present[0].ndim
        shape = tuple(max(a.shape[d] for a in present) for d in range(ndim))
        out = np.full((len(arrays), *shape), spec.fill_value, dtype=spec.dtype)
        for i, a in enumerate(arrays):
            if a is not None:
                out[(i, *(slice(0, s) for s in a.shape))] = a
        return out

    @staticmethod
    def _pad(block: np.ndarray, trailing: tuple, fill) -> np.ndarray:
        if block.shape[1:] == tuple(trailing):
            return block
        out = np.full((block.shape[0], *trailing), fill, dtype=block.dtype)
        out[(slice(None), *(slice(0, s) for s in block.shape[1:]))] = block
        return out

    def _create(self, group: RowGroup, zgroup: zarr.Group, spec: ArraySpec, block: np.ndarray) -> zarr.Array:
        if spec.name in zgroup:   # a resumed store: an array declared after reopening keeps its rows
            arr = zgroup[spec.name]
            group.arrays[spec.name] = arr
            for dim, size in zip(spec.dims[1:], arr.shape[1:]):
                group.dim_sizes[dim] = max(group.dim_sizes.get(dim, 0), size)
            for dim, size in zip(spec.dims[1:], block.shape[1:]):
                if size > group.dim_sizes.get(dim, 0):
                    self._grow_dim(group, dim, size)
            if arr.shape[0] < group.capacity:
                arr.resize((group.capacity, *arr.shape[1:]))
            group.capacity = max(group.capacity, arr.shape[0])
            return arr
        trailing = []
        for dim, size in zip(spec.dims[1:], block.shape[1:]):
            group.dim_sizes[dim] = max(group.dim_sizes.get(dim, 0), size)
            trailing.append(group.dim_sizes[dim])
        shape = (max(group.capacity, 1), *trailing)
        chunks = (group.chunk_rows, *trailing)  # one flush = one chunk: never rewritten
        arr = zgroup.create_array(spec.name, shape=shape, chunks=chunks, dtype=spec.dtype,
                                  fill_value=spec.fill_value, dimension_names=list(spec.dims),
                                  overwrite=True, **_codec_options(chunks, spec.dtype))
        if spec.attrs:
            arr.attrs.update(spec.attrs)
        group.arrays[spec.name] = arr
        group.capacity = max(group.capacity, 1)
        return arr

    def _grow_rows(self, group: RowGroup, rows: int) -> None:
        for arr in group.arrays.values():
            arr.resize((rows, *arr.shape[1:]))
        group.capacity = rows

    def _grow_dim(self, group: RowGroup, dim: str, size: int) -> None:
        group.dim_sizes[dim] = size
        for name, arr in group.arrays.items():
            dims = group.specs[name].dims
            if dim in dims:
                shape = list(arr.shape)
                shape[dims.index(dim)] = size
                arr.resize(tuple(shape))

    def _do_adopt(self) -> None:
        """Load the row arrays of a reopened store; grow any array that an interrupted
        resize or trim left shorter than its group, so every array agrees again."""
        for group in self.groups.values():
            if group.name not in self.root:
                continue
            zgroup = self.root[group.name]
            for name, arr in zgroup.arrays():
                dims = tuple(arr.metadata.dimension_names or ())
                if not dims or dims[0] != group.row_dim or name not in group.specs:
                    continue
                group.arrays[name] = arr
                for dim, size in zip(dims[1:], arr.shape[1:]):
                    group.dim_sizes[dim] = max(group.dim_sizes.get(dim, 0), size)
            if not group.arrays:
                continue
            capacity = max(a.shape[0] for a in group.arrays.values())
            capacity = max(capacity, self.committed.get(group.name, 0))
            for dim, size in list(group.dim_sizes.items()):
                self._grow_dim(group, dim, size)
            self._grow_rows(group, capacity)

    def _do_truncate(self, rows: dict) -> None:
        # committed goes down before the arrays shrink: arrays never end shorter than it
        for name, n in rows.items():
            self.committed[name] = min(int(n), self.committed.get(name, 0))
        self.root.attrs["committed"] = dict(self.committed)
        for name in rows:
            group = self.groups.get(name)
            if group is not None and group.arrays:
                self._grow_rows(group, self.committed[name])

    def _do_fill(self, group_name: str, end: int) -> None:
        """Commit fill-value rows up to `end`: rows lost in a kill of a group that must stay
        row-aligned with another (params with train)."""
        group = self.groups[group_name]
        start = self.committed.get(group_name, 0)
        if end <= start or not group.arrays:
            return
        if end > group.capacity:
            self._grow_rows(group, end)
        for arr in group.arrays.values():
            arr[start:end] = np.full((end - start, *arr.shape[1:]), arr.fill_value, dtype=arr.dtype)
        self.committed[group_name] = end
        self.root.attrs["committed"] = dict(self.committed)
        group.start = end

    def pad(self, group_name: str, end: int) -> None:
        self._submit(("fill", group_name, end))
        self._queue.join()
        self.raise_if_failed()

    def _do_trim(self) -> None:
        for group in self.groups.values():
            rows = self.committed.get(group.name, 0)
            if group.arrays and rows != group.capacity:
                self._grow_rows(group, rows)
