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
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import MODELS  # noqa: E402
from dynascope.recorder import Recorder  # noqa: E402

VARIANTS = {"plain step": None, "losses + logits": {}, "+ exact norms": {"grad_norms": True},
            "+ norms + 1024-dim sketch": {"grad_norms": True, "grad_projection": 1024}}


class Variant:
    def __init__(self, base, kwargs, tmp, batch):
        self.model = copy.deepcopy(base)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.t, self.times, self.batch = 0, [], batch
        self.rec = None if kwargs is None else Recorder(
            Path(tmp) / f"r{id(self)}.zarr", self.model, num_classes=10, num_examples=1 << 20,
            optimizer=self.opt, chunk_steps=8, param_stats=False, **kwargs).open()

    def step(self, x, y):
        start = time.thread_time()
        if self.rec is None:
            F.cross_entropy(self.model(x), y, reduction="none").mean().backward()
        else:
            ids = (torch.arange(self.batch) + self.t * self.batch) % (1 << 20)
            with self.rec.step(example_ids=ids, targets=y) as st:
                logits = self.model(x)
                losses = F.cross_entropy(logits, y, reduction="none")
                st.record(losses=losses, logits=logits)
                losses.mean().backward()
        self.t += 1
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.times.append(time.thread_time() - start)


def measure(name: str, rounds: int, tmp: str) -> None:
    build, B, make, _ = MODELS[name]
    g = torch.Generator().manual_seed(0)
    base, x, y = build(), make(B, g), torch.randint(0, 10, (B,), generator=g)
    variants = {k: Variant(base, kw, tmp, B) for k, kw in VARIANTS.items()}
    for v in variants.values():  # warm-up, including the first-batch coverage check
        for _ in range(3):
            v.step(x, y)
        v.times.clear()
    for r in range(rounds):
        for v in (list(variants.values())[r % len(variants):] + list(variants.values())[:r % len(variants)]):
            for _ in range(5):
                v.step(x, y)
    plain = statistics.median(variants["plain step"].times)
    print(f"\n## {name}, batch {B}: median training-thread CPU per step\n\n| variant | ms | ratio |\n| --- | --- | --- |")
    for k, v in variants.items():
        m = statistics.median(v.times)
        print(f"| {k} | {m * 1e3:.1f} | {m / plain:.3f} |")
        if v.rec is not None:
            v.rec.close()


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
