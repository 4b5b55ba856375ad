"""A large run store without training: the Recorder is fed generated logits, so the store has
exactly the layout, chunking and compression of a real run (train/ with logits, epoch, ...).

    python benchmarks/synthetic_store.py data/bench50k_e12.zarr --examples 50000 --epochs 12

Each example has a hidden difficulty; its gold logit grows with the epoch at a rate set by
it, plus noise, so correctness flips back and forth (forgetting events) and the scores
spread out as in real training. Batches of 500, reshuffled each epoch (the last one short
when the batch does not divide the examples, so padding is exercised).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynascope.recorder import Recorder  # noqa: E402


def make_store(path, num_examples: int = 50_000, epochs: int = 12, batch: int = 500, classes: int = 10,
               seed: int = 0, chunk_steps: int = 64, overwrite: bool = True) -> Path:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (num_examples,), generator=g)
    rate = torch.rand(num_examples, generator=g) * 1.5          # hidden difficulty
    steps = epochs * -(-num_examples // batch)
    with Recorder(path, nn.Linear(1, classes), num_classes=classes, num_examples=num_examples,
                  chunk_steps=chunk_steps, expected_steps=steps, overwrite=overwrite,
                  param_stats=False) as rec:
        for epoch in range(epochs):
            for ids in torch.randperm(num_examples, generator=g).split(batch):
                logits = torch.randn(len(ids), classes, generator=g) * 1.5
                logits[torch.arange(len(ids)), target[ids]] += rate[ids] * (epoch + 1) ** 0.5
                with rec.step(example_ids=ids, targets=target[ids], epoch=epoch) as step:
                    step.record(losses=F.cross_entropy(logits, target[ids], reduction="none"), logits=logits)
    return Path(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--examples", type=int, default=50_000)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch", type=int, default=500)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    make_store(args.out, args.examples, args.epochs, args.batch)
    print(f"{args.out}: {args.examples} examples x {args.epochs} epochs in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
