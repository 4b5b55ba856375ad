"""A run killed with SIGKILL stays readable up to its last committed flush."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import xarray as xr

from dynascope import analysis
from dynascope.recorder import Recorder

SCRIPT = textwrap.dedent("""
    import sys, time, torch, torch.nn as nn, torch.nn.functional as F
    from dynascope.recorder import Recorder
    torch.set_num_threads(1)
    model = nn.Linear(4, 3)
    X, Y = torch.randn(64, 4), torch.arange(64) % 3
    with Recorder(sys.argv[1], model, num_classes=3, num_examples=64, chunk_steps=4) as rec:
        for step in range(10_000):
            ids = torch.arange(step % 8 * 8, step % 8 * 8 + 8)
            with rec.step(example_ids=ids, targets=Y[ids]) as s:
                out = model(X[ids])
                s.record(losses=F.cross_entropy(out, Y[ids], reduction="none"), logits=out)
            time.sleep(0.01)
""")


def _committed(path) -> int:
    try:
        return json.loads((path / "zarr.json").read_text())["attributes"]["committed"]["train"]
    except (FileNotFoundError, KeyError, ValueError):
        return 0


def test_sigkill_mid_run_leaves_a_readable_store(tmp_path):
    path = tmp_path / "killed.zarr"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(path)])
    try:
        deadline = time.time() + 120
        while _committed(path) < 12 and time.time() < deadline:
            time.sleep(0.05)
        assert _committed(path) >= 12, "the recorder never committed 12 steps"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    run = analysis.open_run(path)
    assert run.status == "recording"
    n = run.committed["train"]
    assert n >= 12 and n % 4 == 0          # whole chunks only
    assert run.train.sizes["step"] == n
    ids = run.train.example_id.values
    expected = np.stack([np.arange(s % 8 * 8, s % 8 * 8 + 8) for s in range(n)])
    np.testing.assert_array_equal(ids, expected)
    assert np.isfinite(run.train.loss.values).all()
    assert "committed" in run.describe_progress()
    # plain xarray can read it too (rows past `committed` may hold fill values)
    raw = xr.open_zarr(path, group="train", consolidated=False)
    np.testing.assert_array_equal(raw.example_id.values[:n], expected)


# -- signals ---------------------------------------------------------------------------
LOOP = textwrap.dedent("""
    import sys, time, torch, torch.nn as nn, torch.nn.functional as F
    from dynascope.recorder import Recorder
    torch.set_num_threads(1)
    model = nn.Linear(4, 3)
    X, Y = torch.randn(64, 4), torch.arange(64) % 3
    rec = Recorder(sys.argv[1], model, num_classes=3, num_examples=64, chunk_steps=16)
    try:
        with rec:
            for step in range(10_000):
                ids = torch.arange(step % 8 * 8, step % 8 * 8 + 8)
                with rec.step(example_ids=ids, targets=Y[ids]) as s:
                    out = model(X[ids])
                    s.record(losses=F.cross_entropy(out, Y[ids], reduction="none"), logits=out)
                time.sleep(0.01)
    finally:
        open(sys.argv[2], "w").write(str(rec.steps))
""")


def _start_loop(tmp_path):
    path, steps = tmp_path / "sig.zarr", tmp_path / "steps.txt"
    proc = subprocess.Popen([sys.executable, "-c", LOOP, str(path), str(steps)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while _committed(path) < 16 and time.time() < deadline:
        time.sleep(0.02)
    assert _committed(path) >= 16
    time.sleep(0.1)     # a partly filled buffer: those rows must be flushed too
    return proc, path, steps


@pytest.mark.parametrize("signals, reason", [
    ([signal.SIGTERM], "SIGTERM"),
    ([signal.SIGINT], "KeyboardInterrupt"),
    ([signal.SIGINT, signal.SIGINT], "KeyboardInterrupt"),
    ([signal.SIGTERM, signal.SIGINT], "SIGTERM"),
])
def test_signals_flush_the_buffer_and_mark_the_run_failed(tmp_path, signals, reason):
    proc, path, steps = _start_loop(tmp_path)
    for s in signals:
        os.kill(proc.pid, s)
        time.sleep(0.05)   # let Python run the first handler (pending ones run in signal order)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    run = analysis.open_run(path)
    assert run.status == "failed" and reason in run.attrs["error"], err
    n = int(steps.read_text())
    assert run.committed["train"] == n                # every step kept, the partial buffer too
    assert run.train.sizes["step"] == n
    assert np.isfinite(run.train.loss.values).all()
    assert not (path / ".dynascope" / "lock").exists()
    if len(signals) > 1:
        assert "finishing the store first" in err


# -- writer failures -----------------------------------------------------------------------
def _fill_until_failure(path, max_steps=20_000, width=64):
    """Record wide rows until the store fails; returns the error and the steps recorded."""
    torch.manual_seed(0)
    model = nn.Linear(8, width)
    X = torch.randn(32, 8)
    Y = torch.arange(32) % width
    with pytest.raises(RuntimeError, match="writer failed") as info:
        with Recorder(path, model, num_classes=width, num_examples=32, chunk_steps=4) as rec:
            for step in range(max_steps):
                ids = torch.arange(32)
                with rec.step(example_ids=ids, targets=Y) as s:
                    out = model(X) + torch.randn(32, width)   # incompressible
                    s.record(losses=F.cross_entropy(out, Y, reduction="none"), logits=out)
    return info.value, rec.steps


def test_chunk_write_errors_mark_the_run_failed_and_keep_committed_rows(tmp_path, monkeypatch):
    import errno

    import zarr.storage._local as local

    real_put, calls = local._put, {"chunks": 0}

    def full_disk(path, value, exclusive=False):
        if "/c/" in str(path) or str(path).endswith("/c"):
            calls["chunks"] += 1
            if calls["chunks"] > 60:
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real_put(path, value, exclusive)

    monkeypatch.setattr(local, "_put", full_disk)
    err, steps = _fill_until_failure(tmp_path / "full.zarr")
    monkeypatch.setattr(local, "_put", real_put)
    run = analysis.open_run(tmp_path / "full.zarr")
    assert run.status == "failed" and "No space left" in run.attrs["error"]
    n = run.committed["train"]
    assert 0 < n <= steps and run.train.sizes["step"] == n
    assert np.isfinite(run.train.loss.values).all()       # committed rows hold real data, no gap
    assert (run.train.example_id.values >= 0).all()


def _mount_tmpfs(where, size: str) -> bool:
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_a_really_full_disk_still_ends_failed_with_the_reason(tmp_path):
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _mount_tmpfs(disk, "3m"):
        pytest.skip("needs root to mount a tiny tmpfs")
    try:
        err, steps = _fill_until_failure(disk / "run.zarr")
        assert "No space left" in str(err) or "Errno 28" in str(err)
        run = analysis.open_run(disk / "run.zarr")
        assert run.status == "failed" and ("No space left" in run.attrs["error"] or "28" in run.attrs["error"])
        n = run.committed["train"]
        assert n > 0 and np.isfinite(run.train.loss.values).all()
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# -- interrupted resizes and live readers ------------------------------------------------------
def _small_run(path, steps=6, chunk_steps=4, close=True):
    model = nn.Linear(4, 3)
    X, Y = torch.randn(40, 4), torch.arange(40) % 3
    rec = Recorder(path, model, num_classes=3, num_examples=40, chunk_steps=chunk_steps)
    rec.open()
    for s in range(steps):
        ids = torch.arange(s * 5, s * 5 + 5) % 40
        with rec.step(example_ids=ids, targets=Y[ids]) as st:
            out = model(X[ids])
            st.record(losses=F.cross_entropy(out, Y[ids], reduction="none"), logits=out)
    if close:
        rec.close()
    else:
        rec.flush()
        rec._lock.release()        # as after SIGKILL: rows committed, status still recording
    return rec


@pytest.mark.parametrize("damage", ["one_short", "one_long", "slot_grown", "all_ragged"])
def test_arrays_of_unequal_length_open_and_resume(tmp_path, damage):
    import zarr

    path = tmp_path / "r.zarr"
    _small_run(path, steps=6, close=False)
    want = analysis.open_run(path).train.example_id.values.copy()
    train = zarr.open_group(str(path / "train"), mode="r+")
    if damage == "one_short":        # a trim killed half way: some arrays cut, others not
        train["loss"].resize((6, 5))
        train["logits"].resize((6, 5, 3))
    elif damage == "one_long":
        train["epoch"].resize((train["epoch"].shape[0] * 4,))
    elif damage == "slot_grown":     # a slot growth killed half way
        train["loss"].resize((train["loss"].shape[0], 9))
    else:
        for k, (name, arr) in enumerate(train.arrays()):
            arr.resize((6 + 3 * k, *arr.shape[1:]))
    run = analysis.open_run(path)
    assert run.train.sizes["step"] == 6
    np.testing.assert_array_equal(run.train.example_id.values, want)
    assert np.isfinite(run.train.loss.values[:, :5]).all()
    # and the recorder can continue it
    model = nn.Linear(4, 3)
    with Recorder(path, model, num_classes=3, num_examples=40, chunk_steps=4, resume=True) as rec:
        assert rec.steps == 6
        with rec.step(example_ids=torch.tensor([1, 2]), targets=torch.tensor([1, 2])) as st:
            out = model(torch.randn(2, 4))
            st.record(losses=out.sum(1), logits=out)
    run = analysis.open_run(path)
    assert run.status == "complete" and run.committed["train"] == 7
    np.testing.assert_array_equal(run.train.example_id.values[:6, :5], want)
    np.testing.assert_array_equal(run.train.example_id.values[6, :2], [1, 2])


READER_LOOP = textwrap.dedent("""
    import sys, time, torch, torch.nn as nn, torch.nn.functional as F
    from dynascope.recorder import Recorder
    torch.set_num_threads(1)
    model = nn.Linear(4, 3)
    X, Y = torch.randn(400, 4), torch.arange(400) % 3
    with Recorder(sys.argv[1], model, num_classes=3, num_examples=400, chunk_steps=4,
                  optimizer=torch.optim.SGD(model.parameters(), lr=0.1)) as rec:
        for step in range(150):
            ids = torch.arange(0, 40 + step // 8)    # the slot dimension keeps growing
            with rec.step(example_ids=ids, targets=Y[ids]) as s:
                out = model(X[ids])
                s.record(losses=F.cross_entropy(out, Y[ids], reduction="none"), logits=out)
            if step % 10 == 0:
                rec.probe([(X[:50], Y[:50], torch.arange(50))])
            time.sleep(0.01)
""")


def test_a_reader_polling_a_live_run_never_sees_an_error(tmp_path):
    path = tmp_path / "live.zarr"
    proc = subprocess.Popen([sys.executable, "-c", READER_LOOP, str(path)])
    calls, errors, seen = 0, [], 0
    try:
        while proc.poll() is None or calls == 0:
            if not (path / "zarr.json").exists():
                time.sleep(0.01)
                continue
            try:
                run = analysis.open_run(path)
                n = run.committed.get("train", 0)
                if n and run.has("train"):
                    ids = run.train.example_id.values
                    loss = run.train.loss.values
                    assert ids.shape[0] == n
                    rows = [np.arange(0, 40 + s // 8) for s in range(n)]
                    for s, r in enumerate(rows):
                        assert (ids[s, :len(r)] == r).all() and np.isfinite(loss[s, :len(r)]).all()
                    seen = max(seen, n)
                if run.has("probe"):
                    run.probe.loss.values
            except Exception as e:  # noqa: BLE001 - counted: a reader must never see one
                errors.append(repr(e))
            calls += 1
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == 0
    assert not errors, f"{len(errors)} of {calls} reads failed: {errors[:3]}"
    assert calls > 15 and seen > 10


# -- one writer per run ------------------------------------------------------------------------
def test_a_live_run_cannot_be_overwritten_or_resumed_by_another_writer(tmp_path):
    import socket

    from dynascope.recorder.lock import StoreLockedError

    proc, path, steps = _start_loop(tmp_path)
    try:
        model = nn.Linear(4, 3)
        for kw in ({"overwrite": True}, {"resume": True}, {}):
            with pytest.raises((StoreLockedError, FileExistsError),
                               match=rf"pid {proc.pid} on host {socket.gethostname()}"):
                Recorder(path, model, num_classes=3, num_examples=64, **kw).open()
        cli = subprocess.run([sys.executable, "-m", "dynascope.cli", "record", "--out", str(path), "--overwrite",
                              "--epochs", "1", "--train-size", "64", "--test-size", "32", "--device", "cpu"],
                             capture_output=True, text=True, timeout=120)
        assert cli.returncode == 1 and f"pid {proc.pid}" in cli.stderr and "Traceback" not in cli.stderr
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=60)
    run = analysis.open_run(path)      # the live run lost nothing to the refused writers
    assert run.status == "failed" and run.committed["train"] == int(steps.read_text())
    assert {"loss", "logits", "example_id"} <= set(run.train.variables)


def test_a_stale_lock_is_taken_over_and_a_foreign_one_refused(tmp_path):
    import json as _json

    from dynascope.recorder.lock import StoreLockedError, lock_path

    path = tmp_path / "r.zarr"
    _small_run(path, close=False)                 # killed: status recording, lock gone below
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = lock_path(path)
    lock.write_text(_json.dumps({"pid": dead.pid, "host": __import__("socket").gethostname(),
                                 "started": "2026-01-01T00:00:00+00:00", "command": "train.py"}))
    with pytest.warns(UserWarning, match=f"stale lock of pid {dead.pid}"):
        with Recorder(path, nn.Linear(4, 3), num_classes=3, num_examples=40, chunk_steps=4, resume=True) as rec:
            assert rec.steps == 6 and _json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()
    lock.write_text(_json.dumps({"pid": 1234, "host": "gpu-node-17", "started": "x", "command": "train.py"}))
    with pytest.raises(StoreLockedError, match=r"pid 1234 on host gpu-node-17.*delete .*lock"):
        Recorder(path, nn.Linear(4, 3), num_classes=3, num_examples=40, overwrite=True).open()
    assert analysis.open_run(path).committed["train"] == 6


def test_a_killed_run_with_a_huge_planned_length_stays_small(tmp_path):
    """Preallocation follows what was recorded, never --epochs."""
    import zarr

    path = tmp_path / "huge.zarr"
    script = textwrap.dedent("""
        import sys, torch
        torch.set_num_threads(1)
        from dynascope.recorder.driver import TrainConfig, record_run
        record_run(TrainConfig(dataset="planted", epochs=100_000_000, out=sys.argv[1], train_size=64,
                               test_size=32, probe_size=16, batch_size=16, chunk_steps=4, device="cpu"),
                   progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)])
    try:
        deadline = time.time() + 120
        while _committed(path) < 12 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    n = _committed(path)
    shape = zarr.open_array(str(path / "train" / "loss"), mode="r").shape
    assert n >= 12 and shape[0] <= max(2 * n, 64)
    from dynascope.describe import describe_run

    t0 = time.perf_counter()
    desc = describe_run(path)
    assert desc["groups"]["train"]["dims"]["step"] == n and time.perf_counter() - t0 < 30
