"""Fidelity of the recorded gradient geometry against torch.func per-example gradients.

    python benchmarks/sketch_fidelity.py [--dims 1024 4096] [--seeds 3] [--models mlp cnn transformer resnet18]

For each model (an MLP on 4 generated classes, the built-in CNN, a small transformer encoder with
a pooled Linear head, torchvision resnet18 with random init), at initialisation and after
some SGD steps, and for several seeds, one batch is recorded with the GradientExtension
(sketch of K dims + exact Gram) and compared with the true per-example gradients restricted
to the covered parameters. Statistics over all within-batch pairs: Pearson r of the
cosines, sd of the cosine error, false positives (estimate <= -0.5, truth > -0.5) and false
negatives (truth <= -0.5, estimate > -0.5). Rows: the stored sketch (as stored: float16
unit rows x float32 scale), a dense Gaussian JL of the same K, and the Gram.

The dense JL is sampled in the span of the batch's true gradients (coordinates X with
X X^T = Gram, then X P^T with Gaussian P of size (K, B)): a Gaussian projection is
rotation-invariant, so this has exactly the distribution of a full (K, D) Gaussian JL, at a
cost that does not grow with D (resnet18: D = 11M).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dynascope.recorder.extensions import BatchContext  # noqa: E402
from dynascope.recorder.gradients import GradientExtension  # noqa: E402
from dynascope.recorder.gradients.extension import unit_rows  # noqa: E402
from dynascope.recorder.driver.models import build_model  # noqa: E402

THRESHOLD = -0.5


class Transformer(nn.Module):
    """Embedding + positional embedding, 2 TransformerEncoderLayers (batch_first), mean-pooled
    Linear head."""

    def __init__(self, vocab=50, T=16, d=32, classes=4):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(0.02 * torch.randn(T, d))
        self.enc = nn.Sequential(*[nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
                                   for _ in range(2)])
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.enc(self.emb(x) + self.pos).mean(1))


def data(name, n, g):
    """(inputs, targets) for a model, generated (no downloads)."""
    if name == "mlp":  # 4 overlapping Gaussian classes in 64 dims
        y = torch.randint(0, 4, (n,), generator=g)
        means = torch.randn(4, 64, generator=torch.Generator().manual_seed(7))
        return 0.5 * means[y] + torch.randn(n, 64, generator=g), y
    if name == "transformer":
        x = torch.randint(0, 50, (n, 16), generator=g)
        return x, (x < 25).sum(1) % 4
    size = 32 if name == "cnn" else 16
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 3, size, size, generator=g) * 0.5
    x[:, y % 3, : size // 2] += 1.0  # a learnable class signal
    return x, y


def build(name):
    if name == "mlp":
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 4))
    if name == "transformer":
        return Transformer()
    if name == "cnn":
        return build_model("cnn", 4, (3, 32, 32))
    return build_model("resnet18", 4, (3, 16, 16))


BATCH = {"mlp": 128, "cnn": 64, "transformer": 64, "resnet18": 24}


def train(model, name, steps, g):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        x, y = data(name, BATCH[name], g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad()


def true_grads(model, covered, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def f(p, xi, yi):
        return F.cross_entropy(functional_call(model, (p, buffers), (xi[None],)), yi[None])

    out = []
    for s in range(0, len(y), 8):  # bounded memory for resnet18
        g = vmap(grad(f), in_dims=(None, 0, 0))(params, x[s:s + 8], y[s:s + 8])
        out.append(torch.cat([g[c].reshape(g[c].shape[0], -1) for c in covered], 1).double())
    return torch.cat(out)


def record(model, ext, x, y):
    b = BatchContext("train", torch.arange(len(y)))
    ext.begin_batch(b)
    losses = F.cross_entropy(model(x), y, reduction="none")
    b.losses = losses
    ext.on_losses(b)
    losses.mean().backward()
    model.zero_grad()
    return ext.columns(b)


def cosines(X):
    X = X.double()
    n = X.norm(dim=1, keepdim=True)
    return (X / n) @ (X / n).t()


def stats(est, true):
    iu = np.triu_indices(len(true), 1)
    e, t = est[iu], true[iu]
    return {"r": float(np.corrcoef(e, t)[0, 1]), "sd": float((e - t).std()),
            "fp": int(((e <= THRESHOLD) & (t > THRESHOLD)).sum()),
            "fn": int(((t <= THRESHOLD) & (e > THRESHOLD)).sum()), "true": int((t <= THRESHOLD).sum())}


def measure(model, name, K, seed, x, y):
    model.eval()  # per-example gradients are defined without batch statistics
    ext = GradientExtension(projection_dim=K, gram=True, seed=seed).attach_model(model)
    cols = record(model, ext, x, y)
    covered = ext.metadata()["covered_parameters"]
    ext.detach()
    G = true_grads(model, covered, x, y)
    Ctrue = cosines(G).numpy()
    unit, scale = unit_rows(cols["grad_proj"])
    stored = unit.float() * scale[:, None]
    gram = G @ G.t()
    w, V = torch.linalg.eigh(gram)
    X = V * w.clamp_min(0).sqrt()
    P = torch.randn(K, X.shape[1], generator=torch.Generator().manual_seed(10_000 + seed),
                    dtype=torch.float64) / math.sqrt(K)
    rec_gram = cols["grad_gram"].double()
    d = rec_gram.diagonal().sqrt()
    return {"sketch": stats(cosines(stored).numpy(), Ctrue),
            "dense_jl": stats(cosines(X @ P.t()).numpy(), Ctrue),
            "gram": stats((rec_gram / d[:, None] / d[None, :]).numpy(), Ctrue),
            "D": G.shape[1], "true_sd": float(Ctrue[np.triu_indices(len(y), 1)].std())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn", "transformer", "resnet18"])
    ap.add_argument("--dims", nargs="+", type=int, default=[1024, 4096])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {args.seeds} seeds, threshold {THRESHOLD}; "
          f"load average {os.getloadavg()[0]:.2f} at start")
    print("# per cell: mean over seeds of r / sd of cosine error; fp / fn summed over seeds "
          "(true pairs <= -0.5 in brackets)")
    print(f"{'model':12s} {'phase':6s} {'K':>5s} {'D':>9s} {'sd(true cos)':>12s} | "
          f"{'sketch r / sd / fp / fn':>28s} | {'dense JL r / sd / fp / fn':>28s} | {'Gram sd':>8s} | ratio")
    t0 = time.time()
    for name in args.models:
        for phase in ("init", "trained"):
            for K in args.dims:
                rows = []
                for seed in range(args.seeds):
                    torch.manual_seed(seed)
                    model = build(name)
                    g = torch.Generator().manual_seed(seed)
                    steps = args.train_steps // (3 if name == "resnet18" else 1)
                    train(model, name, 8 if phase == "init" else steps, g)  # init: BN stats only
                    if phase == "init":
                        torch.manual_seed(seed)
                        fresh = build(name)
                        fresh.load_state_dict({k: v for k, v in model.state_dict().items()
                                               if "running" in k or "num_batches" in k}, strict=False)
                        model = fresh
                    x, y = data(name, BATCH[name], torch.Generator().manual_seed(1000 + seed))
                    rows.append(measure(model, name, K, seed, x, y))
                agg = {}
                for m in ("sketch", "dense_jl", "gram"):
                    agg[m] = {k: (np.mean if k in ("r", "sd") else np.sum)([r[m][k] for r in rows])
                              for k in ("r", "sd", "fp", "fn", "true")}
                s, dj = agg["sketch"], agg["dense_jl"]
                cell = lambda a: f"{a['r']:.3f} / {a['sd']:.4f} / {a['fp']:4d} / {a['fn']:4d}"  # noqa: E731
                print(f"{name:12s} {phase:6s} {K:5d} {rows[0]['D']:9d} {np.mean([r['true_sd'] for r in rows]):12.3f} | "
                      f"{cell(s):>28s} | {cell(dj):>28s} | {agg['gram']['sd']:8.1e} | "
                      f"{s['sd'] / dj['sd']:.2f}  [{s['true']}]", flush=True)
    print(f"# {time.time() - t0:.0f} s; load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
