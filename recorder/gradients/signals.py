"""One layer's per-example signals (squared norms, its share of the shared sketch, its
share of the in-batch Gram) from a `Factored` or `Vector` gradient, choosing per shape
between the factored forms (ghost Gram, TensorSketch from factors) and forming each
example's G in chunks (direct), whichever costs fewer multiply-adds."""
from __future__ import annotations

import torch

from .factors import Factored, OneHot, Vector, grouped_chunks
from .gram import DirectSignals, direct_cost, ghost_cost, ghost_gram
from .sketch import count_sketch, sketch_calls, sketch_cost, sketch_flat


def layer_signals(g, hs: tuple | None, K: int, gram: bool, cache: dict | None = None):
    """(sq (B,), sketch (B, K) or None, Gram (B, B) or None). hs: the layer's hashes
    (projection.layer_hashes) or None for no sketch."""
    if isinstance(g, Vector):
        v = g.vec
        return (v.square().sum(1), count_sketch(v, *hs, K) if hs else None,
                v @ v.t() if gram else None)
    assert isinstance(g, Factored)
    B, o, i = g._batch(), g.out_features, g.in_features
    sketch = (lambda f: sketch_flat(f, hs, K, cache)) if hs else None
    if g._is_conv() and not g._use_ghost():
        grads = (g.calls[0][1].grad_parts if len(g.calls) == 1
                 else lambda s: sum(r.grads(s) for _, r in g.calls))
        d = DirectSignals(grads, B, o, i, chunks=grouped_chunks)
        sq, proj, gm, _ = d.run(sketch, gram)
        return sq, proj, gm
    if (hs or gram) and _direct_cheaper(g, B, o, i, bool(hs), gram, K):
        sq, proj, gm, _ = DirectSignals(lambda s: _formed(g, s), B, o, i).run(sketch, gram)
        return sq, proj, gm
    return (g.sq_norm(), sketch_calls(g.calls, B, hs, K) if hs else None,
            ghost_gram(g.calls, B) if gram else None)


def layer_flat(g) -> torch.Tensor:
    """(B, n) per-example flat gradients of one layer (a probe pass keeps them to pair
    examples of different batches, which the in-batch forms cannot)."""
    if isinstance(g, Vector):
        return g.vec
    B = g._batch()
    if g._is_conv() and not g._use_ghost():
        return sum(r.grads(slice(None)) for _, r in g.calls).reshape(B, -1)
    return _formed(g, slice(None)).reshape(B, -1)


def _direct_cheaper(g, B, o, i, sketch: bool, gram: bool, K: int) -> bool:
    factored = (sketch_cost(g.calls, B, K) if sketch else 0) + (ghost_cost(g.calls, B, o, i) if gram else 0)
    direct = direct_cost(g.calls, B, o, i) - (0 if gram else B * B * o * i)
    if any(isinstance(l, OneHot) for l, _ in g.calls):
        direct *= 2  # one-hot rows are materialised for the product
    return direct < factored


def _formed(g: Factored, s: slice) -> torch.Tensor:
    total = None
    for left, right in g.calls:
        p = torch.bmm(left.rows(s).transpose(1, 2), right.rows(s))
        total = p if total is None else total + p
    return total
