"""Recording cost on the training hot path: every ratio measured in one process.

    python benchmarks/overhead.py                    # seed CNN, resnet18, transformer; CPU, 2 threads
    python benchmarks/overhead.py --threads 1        # training-thread CPU time = all torch compute
    python benchmarks/overhead.py --device cuda      # the same on a GPU (wall time, synchronised)
    python benchmarks/overhead.py --models cnn --no-peers
    python benchmarks/overhead.py --lm --threads 1   # GPT-style LM (benchmarks/lm_overhead.py)

Per model, step time with the recorder / a plain step for: the default (losses, logits,
per-parameter statistics at their default cadence), its parts, exact per-example norms, and
norms + projections; then the peers (BackPACK BatchL2Grad, Opacus GradSampleModule,
torch.func vmap; `pip install -e .[bench]`, skipped with a note when missing) computing
the same norms. Last, the fixed per-step cost on a tiny MLP (batch 64) in microseconds.

Variants are interleaved round by round (order rotated), each round's mean step time taken
over whole cadence periods and the median over rounds reported, so load on a shared machine
shifts them together; the training thread's CPU time (robust to other processes; with
--threads 1 it is all torch compute) is printed next to wall time. Load averages are
printed at the start and end: figures taken under load are not quiet.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dynascope.recorder import Recorder  # noqa: E402
from dynascope.recorder.driver.models import build_model  # noqa: E402

N_EXAMPLES = 1 << 20
_STORES = itertools.count()


class TinyTransformer(nn.Module):
    """Two pre-norm encoder blocks, attention written with nn.Linear (what per-example rules
    see), fixed sinusoidal positions (a buffer, no broadcast parameter), mean-pooled head."""

    def __init__(self, vocab=512, d=128, heads=4, layers=2, T=64, classes=10):
        super().__init__()
        self.emb, self.heads = nn.Embedding(vocab, d), heads
        pos = torch.arange(T)[:, None] / torch.pow(10_000, torch.arange(0, d, 2) / d)
        self.register_buffer("pos", torch.cat([pos.sin(), pos.cos()], 1))
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(d), qkv=nn.Linear(d, 3 * d), out=nn.Linear(d, d), ln2=nn.LayerNorm(d),
            up=nn.Linear(d, 4 * d), down=nn.Linear(4 * d, d))) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, tokens):
        h = self.emb(tokens) + self.pos[: tokens.shape[1]]
        B, T, d = h.shape
        for b in self.blocks:
            q, k, v = b["qkv"](b["ln1"](h)).view(B, T, 3, self.heads, d // self.heads).unbind(2)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            h = h + b["out"](a.transpose(1, 2).reshape(B, T, d))
            h = h + b["down"](F.gelu(b["up"](b["ln2"](h))))
        return self.head(self.ln(h).mean(1))


def _images(B, g):
    return torch.randn(B, 3, 32, 32, generator=g)


def _tokens(B, g):
    return torch.randint(0, 512, (B, 64), generator=g)


MLP = lambda: nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))  # noqa: E731
# name: (builder, batch, input maker, targets (norms / norms + projections))
MODELS = {
    "cnn": (lambda: build_model("cnn", 10, (3, 32, 32)), 128, _images, (1.10, 1.30)),
    "resnet18": (lambda: build_model("resnet18", 10, (3, 32, 32)), 32, _images, (1.20, 1.35)),
    "transformer": (TinyTransformer, 32, _tokens, (None, None)),
    "mlp": (MLP, 64, lambda B, g: torch.randn(B, 32, generator=g), (None, None)),
}


def recorder_rows(proj_dim: int) -> list[tuple[str, dict, float | str | None]]:
    """(row, Recorder keywords, target); norms rows are on top of the default, as a user gets them."""
    return [("default: losses + logits + param stats", {}, 1.05),
            ("  losses + logits only", {"param_stats": False}, None),
            ("  param stats every step", {"param_stats_every": 1}, None),
            ("+ exact per-example norms", {"grad_norms": True}, "norms"),
            (f"+ norms + {proj_dim}-dim projections", {"grad_norms": True, "grad_projection": proj_dim}, "proj"),
            (f"+ norms + {proj_dim}-dim projections + exact Gram",
             {"grad_norms": True, "grad_projection": proj_dim, "grad_gram": True}, "gram"),
            ]


class Variant:
    """One configuration: its own model copy and optimizer; recorder if `kwargs` is given."""

    def __init__(self, name, base, device, tmp, kwargs=None, target=None):
        self.name, self.target, self.device = name, target, device
        self.model = copy.deepcopy(base).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.rec = None
        if kwargs is not None:
            self.rec = Recorder(Path(tmp) / f"run{next(_STORES)}.zarr", self.model, num_classes=10,
                                num_examples=N_EXAMPLES, optimizer=self.opt, chunk_steps=8, **kwargs).open()
        self.wall, self.thread, self.proc, self.t = [], [], [], 0
        self.rounds: list[tuple[float, float, float]] = []

    def end_round(self, k):
        """Mean step time of the round's last k steps: whole cadence periods, so the steps
        that take the statistics are counted at their real share (a median would drop them)."""
        self.rounds.append(tuple(sum(a[-k:]) / k for a in (self.wall, self.thread, self.proc)))

    def run(self, x, y):
        if self.rec is None:
            F.cross_entropy(self.model(x), y, reduction="none").mean().backward()
        else:
            ids = (torch.arange(len(y)) + self.t * len(y)) % N_EXAMPLES
            with self.rec.step(example_ids=ids, targets=y) as st:
                logits = self.model(x)
                losses = F.cross_entropy(logits, y, reduction="none")
                st.record(losses=losses, logits=logits)
                losses.mean().backward()
        self.t += 1
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed(self, x, y):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        w, c, p = time.perf_counter(), time.thread_time(), time.process_time()
        self.run(x, y)
        if cuda:
            torch.cuda.synchronize()
        self.wall.append(time.perf_counter() - w)
        self.thread.append(time.thread_time() - c)
        self.proc.append(time.process_time() - p)

    def close(self):
        if self.rec is not None:
            self.rec.close()


class Vmap(Variant):
    """torch.func: per-example gradients (B x P materialised), their norms, the mean step."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        from torch.func import functional_call, grad, vmap
        model = self.model
        buffers = dict(model.named_buffers())

        def f(params, xi, yi):
            return F.cross_entropy(functional_call(model, (params, buffers), (xi[None],)), yi[None])

        self.per_example = vmap(grad(f), in_dims=(None, 0, 0))

    def run(self, x, y):
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        grads = self.per_example(params, x, y)
        torch.cat([g.flatten(1) for g in grads.values()], 1).norm(dim=1)
        for n, p in self.model.named_parameters():
            p.grad = grads[n].mean(0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class BackPACK(Variant):
    """BackPACK BatchL2Grad: per-example squared gradient norms per parameter."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        from backpack import extend
        self.model = extend(self.model, use_converter=True)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.loss = extend(nn.CrossEntropyLoss())

    def run(self, x, y):
        from backpack import backpack
        from backpack.extensions import BatchL2Grad
        with backpack(BatchL2Grad()):
            self.loss(self.model(x), y).backward()
        sum(p.batch_l2 for p in self.model.parameters() if hasattr(p, "batch_l2")).sqrt()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class Opacus(Variant):
    """Opacus GradSampleModule: per-example gradients (grad_sample), their norms."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        from opacus import GradSampleModule
        self.model = GradSampleModule(self.model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

    def run(self, x, y):
        F.cross_entropy(self.model(x), y).backward()
        gs = [p.grad_sample.flatten(1) for p in self.model.parameters() if getattr(p, "grad_sample", None) is not None]
        torch.cat(gs, 1).norm(dim=1)
        for p in self.model.parameters():
            p.grad_sample = None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


PEERS = [("peer: BackPACK BatchL2Grad", BackPACK), ("peer: Opacus GradSampleModule", Opacus),
         ("peer: torch.func vmap norms", Vmap)]


def build(name, cls, base, device, tmp, notes, **kw):
    """A variant, or None with a note when its package is missing or the model unsupported."""
    try:
        v = cls(name, base, device, tmp, **kw)
        g = torch.Generator().manual_seed(0)
        _, B, make, _ = MODELS[notes["model"]]
        v.run(make(B, g).to(device), torch.randint(0, 10, (B,), generator=g).to(device))  # warm-up
        return v
    except ImportError as e:
        notes.setdefault("lines", []).append(f"{name}: not installed ({e.name}); pip install -e .[bench]")
    except Exception as e:  # noqa: BLE001 - a peer that cannot run this model is reported, not fatal
        notes.setdefault("lines", []).append(f"{name}: cannot run this model ({type(e).__name__}: "
                                             f"{str(e).splitlines()[0][:120]})")
    return None


def measure(model_name, args, device, tmp, peers=True):
    builder, B, make, (t_norms, t_proj) = MODELS[model_name]
    B = args.batch.get(model_name, B)
    torch.manual_seed(0)
    base = builder()
    notes = {"model": model_name}
    # the Gram's target is the CNN's only (issue target: 1.35x on the seed CNN)
    targets = {"norms": t_norms, "proj": t_proj, "gram": 1.35 if model_name == "cnn" else None}
    variants = [build("plain step", Variant, base, device, tmp, notes)]
    for name, kw, target in recorder_rows(args.proj_dim):
        if args.only and not any(name.strip().startswith(p) for p in args.only.split(",")):
            continue
        v = build(name, Variant, base, device, tmp, notes, kwargs=kw,
                  target=targets.get(target, target) if isinstance(target, str) else target)
        variants.append(v)
    if peers:
        variants += [build(name, cls, base, device, tmp, notes) for name, cls in PEERS]
    variants = [v for v in variants if v is not None]
    g = torch.Generator().manual_seed(1)
    batches = [(make(B, g).to(device), torch.randint(0, 10, (B,), generator=g).to(device)) for _ in range(4)]
    for r in range(args.rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:   # rotate the order
            k = args.peer_steps if v.name.startswith("peer") else args.steps
            for s in range(k):
                v.timed(*batches[(r + s) % len(batches)])
            v.end_round(k)
    for v in variants:
        v.close()
    n_params = sum(p.numel() for p in base.parameters())
    return variants, notes.get("lines", []), n_params, B


def table(variants, title, unit="ms"):
    scale = 1e3 if unit == "ms" else 1e6
    ref = [statistics.median(a) for a in zip(*variants[0].rounds)]
    print(title)
    print(f"| variant | wall {unit} | ratio | train-thread CPU {unit} | ratio | process CPU {unit} | ratio | target |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for v in variants:
        m = [statistics.median(a) for a in zip(*v.rounds)]
        cells = " | ".join(f"{x * scale:.1f} | {x / r:.2f}" for x, r in zip(m, ref))
        tgt = f"≤ {v.target:.2f}" if v.target else ""
        print(f"| {v.name} | {cells} | {tgt} |")


def fixed_cost(args, device, tmp):
    """Per-step cost on a tiny MLP, where the step itself is ~0.1 ms: mean over many steps."""
    rows = [("plain step", None), ("default: losses + logits + param stats", {}),
            ("  losses + logits only", {"param_stats": False}),
            ("  param stats every step", {"param_stats_every": 1}),
            ("+ exact per-example norms", {"grad_norms": True})]
    torch.manual_seed(0)
    base = MLP()
    vs = [Variant(n, base, device, tmp, kw) for n, kw in rows]
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, 32, generator=g).to(device), torch.randint(0, 10, (64,), generator=g).to(device)
    for _ in range(20):
        for v in vs:
            v.run(x, y)
    for _ in range(args.mlp_steps // 10):
        for v in vs:
            for _ in range(10):
                v.timed(x, y)
    for v in vs:
        v.close()
    plain = statistics.mean(vs[0].thread if device.type == "cpu" else vs[0].wall)
    print(f"\n## fixed per-step cost: tiny MLP (32-64-10, batch 64), {args.mlp_steps} interleaved steps, "
          f"means; target ≤ 1000 µs over a plain step")
    print("| variant | µs per step | over plain, µs | ratio |")
    print("| --- | --- | --- | --- |")
    for v in vs:
        t = statistics.mean(v.thread if device.type == "cpu" else v.wall)
        print(f"| {v.name} | {t * 1e6:.0f} | {(t - plain) * 1e6:.0f} | {t / plain:.2f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="cnn,resnet18,transformer")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds (medians over rounds)")
    ap.add_argument("--steps", type=int, default=10,
                    help="timed steps per variant per round (a multiple of the param-stats cadence)")
    ap.add_argument("--peer-steps", type=int, default=2, help="timed steps per peer per round")
    ap.add_argument("--proj-dim", type=int, default=1024)
    ap.add_argument("--batch", default="", help="per-model batch override, e.g. cnn=64,resnet18=16")
    ap.add_argument("--no-peers", action="store_true", help="skip BackPACK / Opacus / vmap")
    ap.add_argument("--only", default="", help="recorder rows whose names start so, e.g. 'default,losses'")
    ap.add_argument("--mlp-steps", type=int, default=500, help="0 skips the fixed-cost table")
    ap.add_argument("--lm", action="store_true", help="the GPT-style LM instead (benchmarks/lm_overhead.py)")
    args = ap.parse_args(argv)
    if args.lm:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from lm_overhead import report, run
        torch.set_num_threads(args.threads)
        print(report(run(batch=16, proj_dim=args.proj_dim)))
        print(f"# torch threads {args.threads}; load average {os.getloadavg()[0]:.2f} at the end")
        return
    args.batch = {k: int(v) for k, v in (kv.split("=") for kv in args.batch.split(",") if kv)}
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"# torch {torch.__version__}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"torch threads {args.threads}; {args.rounds} interleaved rounds x {args.steps} steps "
          f"({args.peer_steps} for peers); median over rounds of each round's mean step")
    print(f"# load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="dynascope-bench-") as tmp:
        for name in [m for m in args.models.split(",") if m]:
            variants, notes, n_params, B = measure(name, args, device, tmp, peers=not args.no_peers)
            print()
            table(variants, f"## {name} ({n_params:,} parameters), batch {B}")
            for line in notes:
                print(f"- {line}")
            print(f"- load average now: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if args.mlp_steps:
            fixed_cost(args, device, tmp)
    print(f"\n# load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
