"""Benchmark: peak memory of the per-example analyses at 12 vs 48 epochs of 50,000 examples.

    python benchmarks/analysis_memory.py                  # builds the stores under data/bench/
    python benchmarks/analysis_memory.py --epochs 12 48 --analyses forgetting cartography

Each (analysis, store) is measured in a fresh Python process: peak RSS of the process
(`ru_maxrss`, includes the ~200 MB of imported libraries) and the tracemalloc peak during
the call (numpy buffers included), the size of the result (its variables and coordinates),
and the peak minus the result: what the analysis needs beyond what it returns, the figure
that must not grow with the run when the result itself has a row per epoch. `--gathered`
also measures the gathered path (`sequences.gather`, which holds every presentation).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANALYSES = ("forgetting", "cartography", "aum", "el2n", "difficulty", "loss_trajectories", "epoch_curves",
            "class_curves")

CHILD = r"""
import json, resource, sys, tracemalloc
sys.path.insert(0, sys.argv[1])
from dynascope import analysis
from dynascope.analysis.sequences import gather
store, name, mode = sys.argv[2:5]
run = analysis.open_run(store)
kwargs = {"source": "train"} if name == "loss_trajectories" else {}
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
if mode == "gathered":
    scores = {"forgetting": ("correct",), "cartography": ("p_gold", "correct"), "aum": ("margin",),
              "el2n": ("el2n",), "difficulty": ("loss", "p_gold", "correct"), "loss_trajectories": ("loss",)}
    seq = gather(run, "train", scores=scores[name])
    result = 0
else:
    ds = analysis.ANALYSES[name].func(run, **kwargs).load()
    result = sum(v.nbytes for v in ds.variables.values())
peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
print(json.dumps({"tracemalloc_mb": peak / 2**20, "result_mb": result / 2**20,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_before_mb": base / 1024}))
"""


def measure(store: str, name: str, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), store, name, mode],
                         capture_output=True, text=True, timeout=900, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="data/bench")
    ap.add_argument("--examples", type=int, default=50_000)
    ap.add_argument("--epochs", type=int, nargs=2, default=[12, 48])
    ap.add_argument("--analyses", nargs="+", default=list(ANALYSES))
    ap.add_argument("--gathered", action="store_true", help="also measure sequences.gather")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from synthetic_store import make_store

    stores = {}
    for e in args.epochs:
        stores[e] = str(Path(args.dir) / f"mem_{args.examples // 1000}k_e{e}.zarr")
        if not Path(stores[e], "zarr.json").exists():
            make_store(stores[e], args.examples, e)
    modes = ["streamed"] + (["gathered"] if args.gathered else [])
    print(f"loadavg at start: {loadavg()}")
    print("| analysis | path | " + " | ".join(f"{e} ep: tracemalloc / result / RSS (MB)" for e in args.epochs)
          + " | ratio tracemalloc | ratio tracemalloc - result | ratio RSS |")
    print("| --- | --- | " + " | ".join("---" for _ in args.epochs) + " | --- | --- | --- |")
    for name in args.analyses:
        for mode in modes:
            if mode == "gathered" and name in ("epoch_curves", "class_curves"):
                continue
            r = {e: measure(stores[e], name, mode) for e in args.epochs}
            lo, hi = (r[e] for e in args.epochs)
            beyond = {e: r[e]["tracemalloc_mb"] - r[e]["result_mb"] for e in args.epochs}
            print(f"| {name} | {mode} | "
                  + " | ".join(f"{r[e]['tracemalloc_mb']:.1f} / {r[e]['result_mb']:.1f} / {r[e]['rss_mb']:.0f}"
                               for e in args.epochs)
                  + f" | {hi['tracemalloc_mb'] / lo['tracemalloc_mb']:.2f}"
                  + f" | {beyond[args.epochs[1]] / beyond[args.epochs[0]]:.2f} | {hi['rss_mb'] / lo['rss_mb']:.2f} |",
                  flush=True)
    print(f"loadavg at end: {loadavg()}")


if __name__ == "__main__":
    main()
