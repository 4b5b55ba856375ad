"""Per-example gradient representations that never materialise a (B, P) gradient.

A layer's per-example gradient (of all its covered parameters, laid out as one matrix or
vector) is held in one of two forms:

- `Factored`: G_i = sum_t u_it v_it^T summed over positions t and over calls of the module,
  with left factors u (output-grad side) and right factors v (input side, bias as a trailing
  column of ones). Norms use either the ghost form <U U^T, V V^T> (cheap for few positions)
  or the direct form ||U^T V||^2 batched in example chunks (cheap for many positions), which
  is picked per shape. Projections are (U L^T)^T (V R^T), i.e. L G_i R^T.
- `Vector`: exact small per-example vectors (normalisation affine parameters).

Everything is computed in float32 regardless of autocast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

#: max float32 elements of a temporary (per example chunk) before we split the batch
CHUNK_ELEMS = 1 << 24


def _chunks(batch: int, per_example: int):
    step = max(1, CHUNK_ELEMS // max(1, per_example))
    for s in range(0, batch, step):
        yield slice(s, min(batch, s + step))


class Dense:
    """A dense factor (B, T, n)."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    @property
    def width(self) -> int:
        return self.t.shape[-1]

    def dense(self) -> torch.Tensor:
        return self.t

    def project(self, m: torch.Tensor) -> torch.Tensor:
        """(B, T, k) = factor @ m^T for m of shape (k, n)."""
        return _project(self.t, m)


def _project(t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """t @ m^T, computed as m @ t^T when t is a transposed (B, n, T) buffer (conv layouts),
    so BLAS reads memory in order; the result may be a transposed view."""
    if t.shape[1] > 1 and t.transpose(1, 2).is_contiguous():
        return torch.matmul(m, t.transpose(1, 2)).transpose(1, 2)
    return torch.matmul(t, m.t())


class OneHot:
    """Left factor of an embedding: one-hot rows given by indices (B, T) into n classes."""

    def __init__(self, idx: torch.Tensor, n: int):
        self.idx = idx
        self.n = n

    @property
    def width(self) -> int:
        return self.n

    def dense(self) -> torch.Tensor:  # only used by tests / tiny vocabularies
        return F.one_hot(self.idx, self.n).float()

    def project(self, m: torch.Tensor) -> torch.Tensor:
        return m.t()[self.idx]  # (B, T, k)


class Patches:
    """Right factor of a convolution: input patches (plus a ones row for the bias), built
    lazily. Projection is a convolution of the input with R reshaped as a (k, C, kh, kw)
    kernel, so patches are only built when a norm needs them. Patches are gathered with one
    strided copy into a (B, C*kh*kw [+1], T) buffer (F.unfold is several times slower on
    CPU) and returned as a transposed (B, T, n) view."""

    def __init__(self, x: torch.Tensor, kernel, stride, dilation, padding, with_weight: bool,
                 with_bias: bool, conv: Callable):
        self.x, self.kernel, self.stride, self.dilation = x, kernel, stride, dilation
        self.padding = padding
        self.with_weight, self.with_bias = with_weight, with_bias
        self._conv = conv
        self._dense = None

    @property
    def width(self) -> int:
        n = self.x.shape[1] * math.prod(self.kernel) if self.with_weight else 0
        return n + int(self.with_bias)

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            (kh, kw), (sh, sw), (dh, dw), (ph, pw) = self.kernel, self.stride, self.dilation, self.padding
            x = F.pad(self.x, (pw, pw, ph, ph)) if (ph or pw) else self.x
            v = x.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)
            v = v[..., ::dh, ::dw]  # (B, C, H', W', kh, kw), a view
            B, C, Ho, Wo = v.shape[:4]
            n = C * kh * kw if self.with_weight else 0
            out = torch.empty(B, n + int(self.with_bias), Ho * Wo, dtype=x.dtype, device=x.device)
            if self.with_weight:
                out[:, :n].view(B, C, kh, kw, Ho, Wo).copy_(v.permute(0, 1, 4, 5, 2, 3))
            if self.with_bias:
                out[:, n].fill_(1.0)
            self._dense = out
        return self._dense.transpose(1, 2)

    def project(self, m: torch.Tensor) -> torch.Tensor:
        if not self.with_weight:
            return _project(self.dense(), m)
        k = m.shape[0]
        w = m[:, : m.shape[1] - int(self.with_bias)].reshape(k, self.x.shape[1], *self.kernel)
        b = m[:, -1].contiguous() if self.with_bias else None
        y = self._conv(self.x, w.contiguous(), b)  # (B, k, *spatial)
        return y.flatten(2).transpose(1, 2)


def _cat(ts: list) -> torch.Tensor:
    """Concatenate over positions; a single call keeps its (possibly transposed) layout."""
    return ts[0] if len(ts) == 1 else torch.cat(ts, 1)


@dataclass
class Factored:
    """G_i = sum over calls c and positions t of u_ct v_ct^T, shape (out, in)."""

    calls: list  # of (left, right) factor pairs, each (B, T_c, .)
    out_features: int
    in_features: int

    def sq_norm(self) -> torch.Tensor:
        lefts = [l for l, _ in self.calls]
        onehot = any(isinstance(l, OneHot) for l in lefts)
        T = sum((l.idx if isinstance(l, OneHot) else l.t).shape[1] for l in lefts)
        if onehot or T * (self.out_features + self.in_features) < self.out_features * self.in_features:
            return self._ghost(T)
        return self._direct()

    def _direct(self) -> torch.Tensor:
        u = _cat([l.dense() for l, _ in self.calls])
        v = _cat([r.dense() for _, r in self.calls])
        if u.shape[1] == 1:
            return u.square().sum((1, 2)) * v.square().sum((1, 2))
        out = []
        for s in _chunks(u.shape[0], self.out_features * self.in_features):
            g = torch.bmm(u[s].transpose(1, 2), v[s])
            out.append(g.square().sum((1, 2)))
        return torch.cat(out)

    def _ghost(self, T: int) -> torch.Tensor:
        v = _cat([r.dense() for _, r in self.calls])
        lefts = [l for l, _ in self.calls]
        if all(isinstance(l, OneHot) for l in lefts):
            idx = torch.cat([l.idx for l in lefts], 1)
            u = None
        else:
            u = _cat([l.dense() for l in lefts])
        out = []
        for s in _chunks(v.shape[0], T * T):
            gv = torch.bmm(v[s], v[s].transpose(1, 2))
            if u is None:
                gu = (idx[s, :, None] == idx[s, None, :]).to(gv.dtype)
            else:
                gu = torch.bmm(u[s], u[s].transpose(1, 2))
            out.append((gu * gv).sum((1, 2)))
        return torch.cat(out)

    def project(self, L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """(B, k_out * k_in): vec(L G_i R^T), row-major."""
        total = None
        for left, right in self.calls:
            a = left.project(L)   # (B, T, k_out)
            b = right.project(R)  # (B, T, k_in)
            p = torch.bmm(a.transpose(1, 2), b)
            total = p if total is None else total + p
        return total.flatten(1)


@dataclass
class Vector:
    """Exact per-example gradient vectors (B, n), summed over calls."""

    vec: torch.Tensor

    def sq_norm(self) -> torch.Tensor:
        return self.vec.square().sum(1)

    def project(self, P: torch.Tensor) -> torch.Tensor:
        return self.vec @ P.t()
