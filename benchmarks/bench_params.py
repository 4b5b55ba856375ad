"""Overhead of the params extension on the seed CNN (batch 128, 3x32x32, 10 classes).

Times, on the same model, (a) a plain SGD step and (b) ParamStats.capture() + update_norms()
(what the extension adds per step), interleaved so machine load affects both alike.
Run: python benchmarks/bench_params.py [--threads 1] [--reps 30]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from dynascope.recorder.driver.models import build_model
from dynascope.recorder.params import ParamStats, hist_edges


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model("cnn", 10, (3, 32, 32))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    named = [(n, p) for n, p in model.named_parameters()]
    stats = ParamStats([n for n, _ in named], [p for _, p in named], hist_edges())

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def extra():
        stats.capture()
        stats.update_norms()

    for _ in range(3):
        step(); extra()
    n = sum(p.numel() for p in model.parameters())
    # thread CPU time (1 thread) is robust to other processes on a shared machine; wall time too
    for clock, name in ((time.thread_time, "thread CPU"), (time.perf_counter, "wall")):
        if clock is time.thread_time and args.threads != 1:
            continue
        t_step, t_extra = [], []
        for _ in range(args.reps):
            t0 = clock(); step(); t_step.append(clock() - t0)
            t0 = clock(); extra(); t_extra.append(clock() - t0)
        s, e = statistics.median(t_step), statistics.median(t_extra)
        print(f"cnn {n} params, batch {args.batch}, threads {args.threads} ({name} time): step "
              f"{s*1e3:.1f} ms, params stats {e*1e3:.2f} ms ({100*e/s:.1f}% of a step)")


if __name__ == "__main__":
    main()
