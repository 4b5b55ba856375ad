"""Recorder overhead on a GPT-style language model (`python benchmarks/overhead.py --lm`).

A causal transformer LM made of nn.TransformerEncoderLayer blocks (token + learned position
embeddings, untied head), trained on random tokens with right padding. Variants, interleaved
round by round, medians of wall and training-thread CPU time per step, as ratios to a plain
step: (a) per-sequence loss + token statistics from the (B, T, V) logits (docs/SEQUENCES.md),
(a) with per-token losses and top-5 logits, (a) with exact per-example gradient norms, and
(a) with norms and 1024-dim gradient projections.
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynascope.recorder import Recorder

IGNORE = -100


class GPTLike(nn.Module):
    def __init__(self, vocab: int, length: int, dim: int, layers: int, heads: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(length, dim)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True,
                                                               norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x):
        t = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=x.device)
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


def make_batch(step: int, B: int, T: int, V: int, n_examples: int):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, V, (B, T + 1), generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    y = x[:, 1:].clone()
    y[torch.arange(T)[None] >= lengths[:, None]] = IGNORE
    return x[:, :-1], y, (torch.arange(B) + step * B) % n_examples


def _losses(logits, y):
    tok = F.cross_entropy(logits.transpose(1, 2), y, ignore_index=IGNORE, reduction="none")
    return tok.sum(1) / (y != IGNORE).sum(1)


def run(batch: int = 16, length: int = 64, vocab: int = 2048, dim: int = 128, layers: int = 2,
        rounds: int = 6, steps: int = 3, proj_dim: int = 1024, n_examples: int = 10_000) -> dict:
    torch.manual_seed(0)
    base = GPTLike(vocab, length, dim, layers, 4)
    variants = {"plain": None,
                "token stats": {},
                "stats + token losses, top-5": {"sequence": dict(token_losses=True, top_k=5)},
                "stats + grad norms": {"grad_norms": True},
                f"stats + norms + proj {proj_dim}": {"grad_norms": True, "grad_projection": proj_dim}}
    tmp = tempfile.mkdtemp(prefix="dynascope-lm-bench-")
    state = {}
    for name, kw in variants.items():
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        rec = None
        if kw is not None:
            kw = dict(kw)
            seq = kw.pop("sequence", {})
            rec = Recorder(Path(tmp) / f"{len(state)}.zarr", model, num_classes=vocab, num_examples=n_examples,
                           optimizer=opt, chunk_steps=8, task="sequence", sequence=seq, param_stats=False,
                           **kw).open()
        state[name] = {"model": model, "opt": opt, "rec": rec, "wall": [], "thread": []}

    def step(s, x, y, ids):
        m, opt, rec = s["model"], s["opt"], s["rec"]
        if rec is None:
            _losses(m(x), y).mean().backward()
        else:
            with rec.step(example_ids=ids, targets=y) as st:
                logits = m(x)
                losses = _losses(logits, y)
                st.record(losses=losses, logits=logits)
                losses.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    counter = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # uncovered layers warn once per variant; timing only here
        for s in state.values():          # warm-up
            step(s, *make_batch(counter, batch, length, vocab, n_examples))
        for _ in range(rounds):
            for s in state.values():
                for _ in range(steps):
                    counter += 1
                    b = make_batch(counter, batch, length, vocab, n_examples)
                    w0, t0 = time.perf_counter(), time.thread_time()
                    step(s, *b)
                    s["wall"].append(time.perf_counter() - w0)
                    s["thread"].append(time.thread_time() - t0)
        for s in state.values():
            if s["rec"] is not None:
                s["rec"].close()
    med = {n: (statistics.median(s["wall"]), statistics.median(s["thread"])) for n, s in state.items()}
    w0, c0 = med["plain"]
    return {"config": dict(batch=batch, length=length, vocab=vocab, dim=dim, layers=layers,
                           params=sum(p.numel() for p in base.parameters())),
            "rows": [(n, w * 1e3, w / w0, c / c0) for n, (w, c) in med.items()]}


def report(result: dict) -> str:
    c = result["config"]
    lines = [f"GPT-style LM: {c['layers']} x TransformerEncoderLayer (d={c['dim']}), vocab {c['vocab']}, "
             f"T={c['length']}, batch {c['batch']}, {c['params']:,} parameters",
             f"{'variant':<28}{'ms/step':>9}{'wall x':>9}{'thread CPU x':>14}"]
    lines += [f"{n:<28}{ms:>9.1f}{w:>9.2f}{t:>14.2f}" for n, ms, w, t in result["rows"]]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(report(run()))
