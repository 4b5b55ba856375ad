"""Where exact per-example norms spend their time, convolution by convolution.

    python benchmarks/norm_breakdown.py                 # seed CNN (batch 128) and resnet18 (batch 32)
    python benchmarks/norm_breakdown.py --models cnn

For every covered convolution of one recorded training step, its input and output gradient
are captured, then timed on the training thread (one torch thread) for:
- plain: the weight (+ bias) gradient autograd computes in every plain step;
- direct: the per-example gradients formed in chunks with their norms and batch sum (what the
  fused backward runs instead of `plain`, so its cost over a plain step is direct - plain);
- ghost: the ghost-form squared norms (run on top of `plain`, which autograd still computes).
The extension picks direct where T (out + in) >= out * in, else ghost; the chosen column is
marked. Load averages are printed: figures taken under load are not quiet.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import MODELS  # noqa: E402
from dynascope.recorder.gradients import GradientExtension  # noqa: E402
from dynascope.recorder.gradients.factors import Factored, Dense, Patches, grouped_chunks  # noqa: E402
from dynascope.recorder.gradients.gram import DirectSignals  # noqa: E402


def _ms(f, n: int) -> float:
    f()
    t = time.thread_time()
    for _ in range(n):
        f()
    return (time.thread_time() - t) / n * 1e3


def capture(model, x, y):
    """(name, module, input, output gradient) of every convolution in one backward."""
    ext = GradientExtension(norms=True, fused=False).attach_model(model)

    class Batch:
        kind, batch_size, losses = "train", len(y), None

    ext.begin_batch(Batch)
    loss = F.cross_entropy(model(x), y, reduction="none")
    loss.mean().backward()
    out = [(l.name, l.module, l.calls[0][0], l.calls[0][1]) for l in ext.layers
           if isinstance(l.module, torch.nn.Conv2d) and len(l.calls) == 1 and l.calls[0][1] is not None]
    ext.detach()
    return out


def breakdown(name: str, reps: int) -> list[tuple]:
    build, B, make, _ = MODELS[name]
    g = torch.Generator().manual_seed(0)
    model = build()
    rows = []
    for layer, m, x, gout in capture(model, make(B, g), torch.randint(0, 10, (B,), generator=g)):
        kernel, stride, dil = tuple(m.kernel_size), tuple(m.stride), tuple(m.dilation)
        pad = tuple(m.padding)
        bias = m.bias is not None
        out_f, in_f = m.out_channels, m.in_channels * kernel[0] * kernel[1] + bias
        T = gout[0, 0].numel()
        patches = Patches(x, gout, kernel, stride, dil, pad, True, bias, None)
        mask = [False, True, bias]
        plain = _ms(lambda: torch.ops.aten.convolution_backward(
            gout, x, m.weight, [out_f] if bias else None, list(stride), list(pad), list(dil),
            False, [0, 0], 1, mask), reps)
        direct = _ms(lambda: DirectSignals(patches.grad_parts, B, out_f, in_f, chunks=grouped_chunks)
                     .run(None, False, want_sum=True), reps)
        u = Dense(gout.flatten(2).transpose(1, 2))
        ghost = _ms(lambda: Factored([(u, patches)], out_f, in_f)._ghost(T), max(1, reps // 2))
        picked = "direct" if T * (out_f + in_f) >= out_f * in_f else "ghost"
        extra = direct - plain if picked == "direct" else ghost
        rows.append((layer, f"{m.in_channels}->{out_f}, T={T}", plain, direct, ghost, picked, extra))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="cnn,resnet18")
    ap.add_argument("--reps", type=int, default=6)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# torch {torch.__version__}, CPU, 1 thread; load average at start: {os.getloadavg()}")
    for name in args.models.split(","):
        rows = breakdown(name, args.reps)
        print(f"\n## {name}: ms a step, training-thread CPU\n")
        print("| layer | shape | plain weight grad | direct (per-example) | ghost norms | picked | cost over plain |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for layer, shape, plain, direct, ghost, picked, extra in rows:
            print(f"| {layer} | {shape} | {plain:.2f} | {direct:.2f} | {ghost:.2f} | {picked} | {extra:+.2f} |")
        print(f"| total | | {sum(r[2] for r in rows):.2f} | | | | {sum(r[6] for r in rows):+.2f} |")
    print(f"\n# load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
