"""Kernels of the shared K-bucket sketch (hashes and definition in projection.py).

A matrix layer's sketch is a TensorSketch: entry (o, i) goes to bucket (h1(o) + h2(i)) mod K
with sign s1(o) s2(i). For G_i = sum_t u_t v_t^T it is therefore the circular convolution
of the CountSketches of u_t and v_t summed over t, i.e. irfft(sum_t rfft(CS u_t) rfft(CS v_t)):
O(T (o + i + K log K)) per example and no G. One-hot left factors (embeddings) are scattered
directly; when a per-example G is formed anyway (fused convolutions), it is scattered.
All three give the same numbers (tests check them against projection.sketch_reference).
"""
from __future__ import annotations

import torch

from .factors import CHUNK_ELEMS, OneHot

#: entries of a cached combined (out * in) bucket index before it is recomputed per call
INDEX_CACHE_ELEMS = 1 << 22


def count_sketch(x: torch.Tensor, h: torch.Tensor, s: torch.Tensor, K: int) -> torch.Tensor:
    """(..., n) -> (..., K): entry j added to bucket h[j] with sign s[j]."""
    lead = x.shape[:-1]
    flat = (x * s).reshape(-1, x.shape[-1])
    out = flat.new_zeros(flat.shape[0], K)
    out.scatter_add_(1, h.expand(flat.shape[0], -1), flat)
    return out.reshape(*lead, K)


def matrix_index(hs: tuple, K: int, cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket and sign of every entry (o, i) of a factored layer, row-major (o * in + i)."""
    if cache is not None and "index" in cache:
        return cache["index"]
    h1, s1, h2, s2 = hs
    idx = ((h1[:, None] + h2[None, :]) % K).reshape(-1)
    sign = (s1[:, None] * s2[None, :]).reshape(-1)
    if cache is not None and idx.numel() <= INDEX_CACHE_ELEMS:
        cache["index"] = (idx, sign)
    return idx, sign


def sketch_flat(flat: torch.Tensor, hs: tuple, K: int, cache: dict | None = None) -> torch.Tensor:
    """(b, out * in) explicit per-example matrix gradients -> (b, K)."""
    idx, sign = matrix_index(hs, K, cache)
    out = flat.new_zeros(flat.shape[0], K)
    return out.scatter_add_(1, idx.expand(flat.shape[0], -1), flat * sign)


def sketch_calls(calls: list, batch: int, hs: tuple, K: int) -> torch.Tensor:
    """(B, K) TensorSketch of G_i = sum over calls and positions of u v^T, from the factors."""
    h1, s1, h2, s2 = hs
    out = None
    for left, right in calls:
        T = left.positions
        width = right.width
        per = T * (K + width + (0 if isinstance(left, OneHot) else left.width))
        step = max(1, CHUNK_ELEMS // max(1, per))
        parts = []
        for a in range(0, batch, step):
            s = slice(a, min(batch, a + step))
            if isinstance(left, OneHot):
                parts.append(_onehot(left.idx[s], right.rows(s), hs, K))
                continue
            cu = torch.fft.rfft(count_sketch(left.rows(s), h1, s1, K))
            if hasattr(right, "sketch_columns"):  # patches: sketched in their own layout
                cv = torch.fft.rfft(right.sketch_columns(s, h2, s2, K), dim=1).transpose(1, 2)
            else:
                cv = torch.fft.rfft(count_sketch(right.rows(s), h2, s2, K))
            parts.append(torch.fft.irfft((cu * cv).sum(1), n=K))
        p = torch.cat(parts)
        out = p if out is None else out + p
    return out


def _onehot(idx: torch.Tensor, v: torch.Tensor, hs: tuple, K: int) -> torch.Tensor:
    """Row idx[b, t] of G gets v[b, t]: scatter each v entry to (h1(idx) + h2(j)) mod K."""
    h1, s1, h2, s2 = hs
    b = idx.shape[0]
    bucket = (h1[idx].unsqueeze(-1) + h2) % K               # (b, T, d)
    val = v * s1[idx].unsqueeze(-1) * s2
    out = v.new_zeros(b, K)
    return out.scatter_add_(1, bucket.reshape(b, -1), val.reshape(b, -1))


def sketch_cost(calls: list, batch: int, K: int) -> int:
    """Rough multiply-adds of sketch_calls (for choosing it against forming G)."""
    total = 0
    for left, right in calls:
        T = left.positions
        if isinstance(left, OneHot):
            total += batch * T * right.width
        else:
            total += batch * T * (left.width + right.width + 3 * K * max(1, K.bit_length()))
    return total

