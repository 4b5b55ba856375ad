"""Benchmark: per-example analyses on a 50k-example store, dask's default threads vs a
dask.distributed LocalCluster of 1, 2 and 4 single-threaded worker processes.

    python benchmarks/cluster.py                      # builds data/bench/cluster_50k.zarr if missing
    python benchmarks/cluster.py --workers 1 2 --rounds 1

The cluster is started by this script (a user would connect to theirs with
`dynascope analyze --scheduler ADDRESS`); its start-up is not timed. Rounds interleave the
configurations so a machine whose load changes affects all of them alike. Results are
checked to be identical to the default scheduler's. Printed per scheduler: wall time and
the client process's CPU time (the per-example accumulations of the blockwise passes run
in the client; the workers read and decode chunks).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import xarray as xr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynascope import analysis  # noqa: E402
from dynascope.analysis.cluster import scheduler  # noqa: E402


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def run_all(store, names):
    run = analysis.open_run(store)
    return {n: analysis.ANALYSES[n].func(run).load() for n in names}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="data/bench/cluster_50k.zarr")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--analyses", nargs="+", default=["forgetting", "cartography", "aum", "el2n"])
    args = ap.parse_args(argv)
    from distributed import LocalCluster

    if not Path(args.store, "zarr.json").exists():
        from synthetic_store import make_store

        make_store(args.store, 50_000, args.epochs)
    reference = run_all(args.store, args.analyses)
    clusters = {k: LocalCluster(n_workers=k, threads_per_worker=1, processes=True, host="127.0.0.1",
                                dashboard_address=None) for k in args.workers}
    times: dict[str, list[float]] = {}
    client_cpu: dict[str, list[float]] = {}
    try:
        for _ in range(args.rounds):
            for label, address in [("default threads", None)] + [(f"{k} workers", c.scheduler_address)
                                                                  for k, c in clusters.items()]:
                with scheduler(address):
                    t0, c0 = time.perf_counter(), time.process_time()
                    out = run_all(args.store, args.analyses)
                    times.setdefault(label, []).append(time.perf_counter() - t0)
                    client_cpu.setdefault(label, []).append(time.process_time() - c0)
                for n in args.analyses:
                    xr.testing.assert_identical(out[n], reference[n])
                print(f"{label:>16}: {times[label][-1]:6.2f} s wall, {client_cpu[label][-1]:6.2f} s client CPU"
                      f"   loadavg {loadavg()}", flush=True)
    finally:
        for c in clusters.values():
            c.close()
    print(f"\nstore {args.store}, analyses {', '.join(args.analyses)}, {os.cpu_count()} CPUs")
    print("| scheduler | best wall (s) | all rounds wall (s) | client CPU, best round (s) |\n| --- | --- | --- | --- |")
    for label, ts in times.items():
        best = min(range(len(ts)), key=ts.__getitem__)
        print(f"| {label} | {ts[best]:.2f} | {', '.join(f'{t:.2f}' for t in ts)} | {client_cpu[label][best]:.2f} |")
    print(f"loadavg at end: {loadavg()}")


if __name__ == "__main__":
    main()
