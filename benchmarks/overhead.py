"""Recorder overhead on the training hot path, all ratios measured in one run.

    python benchmarks/overhead.py            # seed CNN, batch 128, 2 torch threads, CPU
    python benchmarks/overhead.py --lm       # GPT-style LM, batch 16 x 64 tokens

Step time with the recorder / plain training for (a) losses + logits, (b) + exact
per-example gradient norms, (c) + 1024-dim factored projections, (b) and (c) again with the
fused conv backward off (`grad_fused=False`); baselines: a per-example
Python loop and torch.func vmap gradients + a dense Gaussian projection; the writer's
throughput / a raw sequential write of the same bytes; the share of step time the
training thread spends blocked on the writer.

Variants are interleaved round by round and medians are reported, so a noisy shared
machine shifts them together; the process CPU time per step (less sensitive to other
processes than wall time) is printed next to wall time.
"""
from __future__ import annotations

import argparse
import warnings
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from recorder import Recorder  # noqa: E402
from recorder.models import build_model  # noqa: E402

N_EXAMPLES = 50_000


def make_batch(step: int, B: int):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(B, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (B,), generator=g)
    ids = (torch.arange(B) + step * B) % N_EXAMPLES
    return x, y, ids


class Variant:
    def __init__(self, name, base, tmp, rec_kwargs=None):
        self.name = name
        self.model = copy.deepcopy(base)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.rec = None
        if rec_kwargs is not None:
            self.rec = Recorder(Path(tmp) / f"{name}.zarr", self.model, num_classes=10,
                                num_examples=N_EXAMPLES, optimizer=self.opt, chunk_steps=8,
                                **rec_kwargs).open()
        self.wall, self.cpu, self.thread, self.steps = [], [], [], 0

    def step(self, x, y, ids):
        m, opt = self.model, self.opt
        if self.rec is None:
            losses = F.cross_entropy(m(x), y, reduction="none")
            losses.mean().backward()
        else:
            with self.rec.step(example_ids=ids, targets=y) as st:
                logits = m(x)
                losses = F.cross_entropy(logits, y, reduction="none")
                st.record(losses=losses, logits=logits)
                losses.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(self, x, y, ids):
        w0, c0, t0 = time.perf_counter(), time.process_time(), time.thread_time()
        self.step(x, y, ids)
        self.wall.append(time.perf_counter() - w0)
        self.cpu.append(time.process_time() - c0)
        self.thread.append(time.thread_time() - t0)


class LoopVariant(Variant):
    """Per-example gradients by B separate backward passes; norms from them."""

    def step(self, x, y, ids):
        params = [p for p in self.model.parameters() if p.requires_grad]
        total = [torch.zeros_like(p) for p in params]
        norms = torch.empty(len(y))
        for i in range(len(y)):
            loss = F.cross_entropy(self.model(x[i:i + 1]), y[i:i + 1])
            gs = torch.autograd.grad(loss, params)
            norms[i] = torch.sqrt(sum(g.square().sum() for g in gs))
            for t, g in zip(total, gs):
                t.add_(g, alpha=1.0 / len(y))
        for p, t in zip(params, total):
            p.grad = t
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class VmapVariant(Variant):
    """torch.func per-example gradients (B x P) + norms + a dense Gaussian projection."""

    def __init__(self, *a, dense_dim=512, **kw):
        super().__init__(*a, **kw)
        from torch.func import functional_call, grad, vmap
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        P = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        g = torch.Generator().manual_seed(0)
        self.dense = torch.randn(P, dense_dim, generator=g) / dense_dim ** 0.5 if dense_dim else None
        model = self.model

        def f(params, xi, yi):
            return F.cross_entropy(functional_call(model, params, (xi[None],)), yi[None])

        self.per_example = vmap(grad(f), in_dims=(None, 0, 0))

    def step(self, x, y, ids):
        params = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        grads = self.per_example(params, x, y)
        flat = torch.cat([grads[n].flatten(1) for n in self.names], 1)  # (B, P)
        flat.norm(dim=1)
        if self.dense is not None:
            flat @ self.dense
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                p.grad = grads[n].mean(0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def raw_write_rate(nbytes: int, tmp: str) -> float:
    """Bytes/s of one sequential write of `nbytes` (page cache, no fsync, like zarr)."""
    buf = os.urandom(1 << 20) * 16  # 16 MiB blocks
    path = Path(tmp) / "raw.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        left = nbytes
        while left > 0:
            fh.write(buf[: min(left, len(buf))])
            left -= len(buf)
    dt = time.perf_counter() - t0
    path.unlink()
    return nbytes / dt


def writer_throughput(tmp: str, B: int, proj_dim: int, rows: int):
    """Push `rows` ready-made train rows (what a recorded step hands over) through a
    Recorder's writer; returns (bytes, wall seconds incl. the final flush, writer busy s)."""
    model = build_model("cnn", 10, (3, 32, 32))
    rec = Recorder(Path(tmp) / "writer.zarr", model, num_classes=10, num_examples=N_EXAMPLES,
                   chunk_steps=64, grad_norms=True, grad_projection=proj_dim, param_stats=False).open()
    n_layers = len(rec.extensions[0].layers)
    g = torch.Generator().manual_seed(0)
    rows_data = []
    for i in range(8):  # distinct content, recycled
        rows_data.append({
            "example_id": torch.arange(B) + i * B, "target": torch.randint(0, 10, (B,), generator=g),
            "loss": torch.rand(B, generator=g), "logits": torch.randn(B, 10, generator=g),
            "grad_norm": torch.rand(B, generator=g), "grad_norm_layer": torch.rand(B, n_layers, generator=g),
            "grad_proj": torch.randn(B, rec.extensions[0].proj_total, generator=g).half()})
    w = rec.writer
    b0, s0 = w.bytes_written, w.write_seconds
    t0 = time.perf_counter()
    for i in range(rows):
        row = dict(rows_data[i % 8], epoch=0, optimizer_step=i, lr=0.01, batch_loss=1.0,
                   batch_size=B, wall_time=float(i))
        w.append("train", row)
    w.flush()
    wall = time.perf_counter() - t0
    out = (w.bytes_written - b0, wall, w.write_seconds - s0)
    rec.close()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    ap.add_argument("--baseline-steps", type=int, default=2, help="steps for loop / vmap baselines")
    ap.add_argument("--proj-dim", type=int, default=1024)
    ap.add_argument("--dense-dim", type=int, default=512, help="vmap baseline's dense projection")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--writer-rows", type=int, default=512, help="rows for the writer throughput")
    ap.add_argument("--lm", action="store_true", help="the GPT-style LM instead (benchmarks/lm_overhead.py)")
    args = ap.parse_args(argv)
    if args.lm:
        from lm_overhead import report, run
        torch.set_num_threads(args.threads)
        print(report(run(batch=16, rounds=args.rounds, steps=args.steps, proj_dim=args.proj_dim)))
        print(f"# torch threads {args.threads}; load average {os.getloadavg()[0]:.2f} at the end")
        return
    warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = build_model("cnn", 10, (3, 32, 32))
    n_params = sum(p.numel() for p in base.parameters())
    B = args.batch
    with tempfile.TemporaryDirectory(prefix="dynascope-bench-") as tmp:
        variants = [Variant("plain", base, tmp),
                    Variant("rec_losses_logits", base, tmp, {"param_stats": False}),
                    Variant("rec_norms", base, tmp, {"grad_norms": True, "param_stats": False}),
                    Variant("rec_norms_proj", base, tmp, {"grad_norms": True, "grad_projection": args.proj_dim,
                                                          "param_stats": False}),
                    # the same two with the fused conv backward switched off (the pre-fusion path)
                    Variant("rec_norms_unfused", base, tmp, {"grad_norms": True, "grad_fused": False,
                                                             "param_stats": False}),
                    Variant("rec_norms_proj_unfused", base, tmp, {"grad_norms": True, "grad_fused": False,
                                                                  "grad_projection": args.proj_dim,
                                                                  "param_stats": False}),
                    Variant("rec_proj_only", base, tmp, {"grad_norms": False, "grad_projection": args.proj_dim,
                                                         "param_stats": False}),
                    # the Recorder's default: losses + logits + per-parameter statistics (issue 7)
                    Variant("rec_default_params", base, tmp, {})]
        baselines = [] if args.no_baselines else [
            LoopVariant("per_example_loop", base, tmp),
            VmapVariant("vmap_norms", base, tmp, dense_dim=0),
            VmapVariant(f"vmap_dense_proj{args.dense_dim}", base, tmp, dense_dim=args.dense_dim)]
        step = 0
        for v in variants + baselines:  # warm-up (allocations, first chunk creation)
            v.step(*make_batch(step, B))
        blocked0 = {v.name: v.rec.writer_blocked_seconds for v in variants if v.rec is not None}
        for r in range(args.rounds):
            for v in variants:
                for _ in range(args.steps):
                    step += 1
                    v.timed(*make_batch(step, B))
            if baselines and r < args.baseline_steps:  # a few, interleaved with the rest
                for v in baselines:
                    step += 1
                    v.timed(*make_batch(step, B))
        writer_stats = {}
        for v in variants:
            if v.rec is not None:
                w = v.rec.writer
                blocked = v.rec.writer_blocked_seconds - blocked0[v.name]
                v.rec.close()
                writer_stats[v.name] = (blocked, w.bytes_written, w.write_seconds)
        plain = statistics.median(variants[0].wall)
        plain_cpu = statistics.median(variants[0].cpu)
        plain_thr = statistics.median(variants[0].thread)
        print(f"# seed CNN ({n_params:,} params), batch {B}, CPU, torch threads {args.threads}, "
              f"torch {torch.__version__}")
        print(f"# {args.rounds} interleaved rounds x {args.steps} steps; medians; "
              f"load average {os.getloadavg()[0]:.2f} at the end")
        print("# wall: elapsed; process cpu: all threads (torch workers incl. spin-waits, writer);")
        print("# train-thread cpu: the training thread alone = all torch compute when --threads 1")
        print(f"{'variant':24s} {'wall ms':>8s} {'ratio':>6s} {'proc cpu ms':>11s} {'ratio':>6s} "
              f"{'train-thread cpu ms':>19s} {'ratio':>6s}")
        for v in variants + baselines:
            w, c, t = (statistics.median(a) for a in (v.wall, v.cpu, v.thread))
            print(f"{v.name:24s} {w * 1e3:8.1f} {w / plain:6.2f} {c * 1e3:11.1f} {c / plain_cpu:6.2f} "
                  f"{t * 1e3:19.1f} {t / plain_thr:6.2f}")
        print()
        nbytes, wall, busy = writer_throughput(tmp, B, args.proj_dim, args.writer_rows)
        raw = raw_write_rate(nbytes, tmp)
        print(f"writer: {args.writer_rows} train rows ({nbytes / 1e6:.0f} MB uncompressed) in "
              f"{wall:.2f} s = {nbytes / wall / 1e6:.0f} MB/s (writer thread busy {busy:.2f} s = "
              f"{nbytes / max(busy, 1e-9) / 1e6:.0f} MB/s); raw sequential write of the same bytes "
              f"{raw / 1e6:.0f} MB/s; ratio {nbytes / wall / raw:.3f}")
        for v in variants[1:]:
            blocked = writer_stats[v.name][0]
            share = blocked / max(sum(v.wall), 1e-9)
            print(f"{v.name:28s} blocked on writer {blocked * 1e3:7.2f} ms = {100 * share:.2f}% "
                  f"of its {len(v.wall)} timed steps")


if __name__ == "__main__":
    main()
