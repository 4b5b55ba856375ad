"""The gradient rows of overhead.py alone, as medians of per-step training-thread CPU time:
short enough to run alternately in two checkouts (before / after a change), which is the
comparison that survives a shared machine's run-to-run spread.

    python benchmarks/gradient_rows.py --models cnn,resnet18,transformer --rounds 6

Variants (each its own model copy and optimizer, interleaved round by round, 5 steps each):
a plain step; losses + logits; + exact norms; + norms + a 1024-dim sketch. No parameter
statistics, so the rows isolate the gradient extension's cost.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import MODELS, Variant  # noqa: E402

NO_STATS = {"param_stats": False}
VARIANTS = {"plain step": None, "losses + logits": NO_STATS,
            "+ exact norms": {**NO_STATS, "grad_norms": True},
            "+ norms + 1024-dim sketch": {**NO_STATS, "grad_norms": True, "grad_projection": 1024}}


def measure(name: str, rounds: int, tmp: str) -> None:
    build, B, make, _ = MODELS[name]
    g = torch.Generator().manual_seed(0)
    base, x, y = build(), make(B, g), torch.randint(0, 10, (B,), generator=g)
    variants = {k: Variant(k, base, torch.device("cpu"), tmp, kw) for k, kw in VARIANTS.items()}
    for v in variants.values():  # warm-up, including the first-batch coverage check
        for _ in range(3):
            v.timed(x, y)
        v.thread.clear()
    order = list(variants.values())
    for r in range(rounds):
        for v in order[r % len(order):] + order[:r % len(order)]:
            for _ in range(5):
                v.timed(x, y)
    plain = statistics.median(variants["plain step"].thread)
    print(f"\n## {name}, batch {B}: median training-thread CPU per step\n\n| variant | ms | ratio |\n| --- | --- | --- |")
    for k, v in variants.items():
        m = statistics.median(v.thread)
        print(f"| {k} | {m * 1e3:.1f} | {m / plain:.3f} |")
        v.close()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="cnn,resnet18,transformer")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # resnet18's train-mode BatchNorm notice, once per variant
    print(f"# torch {torch.__version__}, CPU, {args.threads} thread(s); load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            measure(name, args.rounds, tmp)
    print(f"\n# load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
