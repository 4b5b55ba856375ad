"""End-to-end overhead of the params extension: the seed CNN (batch 128) trained through the
Recorder with param_stats off vs on, interleaved rounds; main-thread CPU time per step (robust
on a shared machine) and wall time per step. Run: python benchmarks/bench_params_recorder.py"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from dynascope.recorder import Recorder
from dynascope.recorder.driver.models import build_model


def run(path: str, stats: bool, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = build_model("cnn", 10, (3, 32, 32))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    cpu, wall = [], []
    with Recorder(path, model, num_classes=10, num_examples=128 * steps, optimizer=opt,
                  overwrite=True, param_stats=stats) as rec:
        for t in range(steps):
            c0, w0 = time.thread_time(), time.perf_counter()
            with rec.step(example_ids=torch.arange(128) + 128 * t, targets=y) as st:
                logits = model(x)
                losses = F.cross_entropy(logits, y, reduction="none")
                st.record(losses=losses, logits=logits)
                losses.mean().backward()
            opt.step()
            opt.zero_grad()
            cpu.append(time.thread_time() - c0)
            wall.append(time.perf_counter() - w0)
    return statistics.median(cpu[3:]), statistics.median(wall[3:])


def main() -> None:
    torch.set_num_threads(1)
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    res = {False: [], True: []}
    with tempfile.TemporaryDirectory() as d:
        for r in range(2):
            for stats in (False, True):
                res[stats].append(run(f"{d}/run{r}{stats}.zarr", stats, steps))
    off = [min(v[i] for v in res[False]) for i in (0, 1)]
    on = [min(v[i] for v in res[True]) for i in (0, 1)]
    for i, name in enumerate(("main-thread CPU", "wall")):
        print(f"{name}: step {off[i]*1e3:.1f} ms without, {on[i]*1e3:.1f} ms with param_stats "
              f"(+{100 * (on[i] / off[i] - 1):.1f}%)")


if __name__ == "__main__":
    main()
