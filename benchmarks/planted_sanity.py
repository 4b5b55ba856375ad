"""Sanity check of the `planted` dataset, without the recorder: is it learnable by `cnn` in a
few epochs on CPU, and do the planted examples of the two planted classes oppose each other?

Trains `cnn` (SGD lr 0.05, momentum 0.9, the driver's defaults) and prints per epoch the test
accuracy overall / on sky examples / on unplanted classes 0-1. At a few steps it also prints the
mean pairwise cosine of per-example gradients between groups: P0/P1 = planted examples of class
0/1, U0/U1 = clean unplanted examples of class 0/1. An opposing signal shows as cos(P0, P1)
strongly negative while cos(U0, U1) stays near zero, and as |g| swinging between P0 and P1.

    python benchmarks/planted_sanity.py --seed 1 [--control] [--batch-size 128] [--epochs 4]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from dynascope.recorder.driver.datasets import load_dataset
from dynascope.recorder.driver.models import build_model

REPORT_STEPS = (0, 8, 16, 24, 32, 48, 64)


def per_example_grads(model, x, y, idx):
    rows = []
    for i in idx:
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(rows)


def gradient_report(step, model, x, y, groups):
    grads = {k: per_example_grads(model, x, y, v) for k, v in groups.items() if len(v)}
    unit = {k: nn.functional.normalize(g, dim=1) for k, g in grads.items()}
    norms = " ".join(f"{k} {g.norm(dim=1).mean():5.2f}" for k, g in grads.items())
    pairs = [("P0", "P1"), ("U0", "U1"), ("P0", "U0"), ("P1", "U1")]
    cos = " ".join(f"{a}-{b} {(unit[a] @ unit[b].T).mean():+.2f}" for a, b in pairs
                   if a in unit and b in unit)
    print(f"  step {step:3d}  |g| {norms}  cos {cos}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--control", action="store_true", help="planted_fraction=0")
    args = ap.parse_args()
    torch.set_num_threads(1)

    bundle = load_dataset("planted-control" if args.control else "planted", seed=args.seed)
    torch.manual_seed(args.seed)
    model = build_model("cnn", bundle.num_classes, bundle.input_shape)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = bundle.train.images, torch.as_tensor(bundle.train.targets)
    xt, yt = bundle.test.images, torch.as_tensor(bundle.test.targets)
    gt, tgt = bundle.ground_truth, bundle.test_ground_truth
    planted, clean, flipped = gt["has_planted_feature"], gt["clean_target"], gt["is_mislabeled"]
    rng = np.random.default_rng(0)

    def pick(mask):
        members = np.flatnonzero(mask)
        return rng.choice(members, size=min(30, members.size), replace=False)

    groups = {"P0": pick(planted & (clean == 0)), "P1": pick(planted & (clean == 1)),
              "U0": pick(~planted & ~flipped & (clean == 0)),
              "U1": pick(~planted & ~flipped & (clean == 1))}
    sky_t = tgt["has_planted_feature"]
    plain01_t = ~sky_t & np.isin(tgt["clean_target"], [0, 1])

    step, t0 = 0, time.time()
    gen = torch.Generator().manual_seed(args.seed)
    gradient_report(step, model, x, y, groups)
    for epoch in range(1, args.epochs + 1):
        train_time = time.time()
        for batch in torch.randperm(len(y), generator=gen).split(args.batch_size):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step in REPORT_STEPS:
                gradient_report(step, model, x, y, groups)
        train_time = time.time() - train_time
        with torch.no_grad():
            correct = (model(xt).argmax(1) == yt).numpy()
        sky = f"{correct[sky_t].mean():.3f}" if sky_t.any() else "-"
        print(f"epoch {epoch}: test acc {correct.mean():.3f}  sky {sky}  "
              f"plain classes 0-1 {correct[plain01_t].mean():.3f}  "
              f"(epoch wall {train_time:.1f}s incl. gradient reports)")


if __name__ == "__main__":
    main()
