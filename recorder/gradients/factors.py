"""Per-example gradient representations that never materialise a (B, P) gradient.

A layer's per-example gradient (of all its covered parameters, laid out as one matrix or
vector) is held in one of two forms:

- `Factored`: G_i = sum_t u_it v_it^T summed over positions t and over calls of the module,
  with left factors u (output-grad side) and right factors v (input side, bias as a trailing
  column of ones). Norms use either the ghost form <U U^T, V V^T> (cheap for few positions)
  or the direct form ||U^T V||^2 batched in example chunks (cheap for many positions), which
  is picked per shape. Calls may mix one-hot and dense left factors (a tied embedding and
  output layer on one parameter). Sketches and Grams of both forms: signals.py.
- `Vector`: exact small per-example vectors (normalisation affine parameters).

Everything is computed in float32 regardless of autocast.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

#: max float32 elements of a temporary (per example chunk) before we split the batch
CHUNK_ELEMS = 1 << 24


#: examples per chunk of per-example gradients formed at once (grouped weight-gradient
#: convolutions, patches @ grads), and the most float32 elements such a chunk may hold:
#: past ~2 MB the grouped convolution falls out of cache (resnet18's 128-channel 3x3
#: convolution, 32 examples on one CPU thread: 13.8 ms in chunks of 3, 20 in 16, 28 in 32)
GROUPED_EXAMPLES = 32
GROUPED_ELEMS = 1 << 19
FORMED_EXAMPLES = 16

#: below this patch width (C·kh·kw) per-example conv gradients are patches + bmm: a grouped
#: convolution with so few channels per group is slow (seed CNN conv1, 3 channels: ~7 ms vs
#: ~5 ms per 128 examples on one CPU thread)
PATCH_BMM_WIDTH = 64


@contextlib.contextmanager
def full_float32():
    """No TF32 in our own products (cuDNN convolutions allow it by default on Ampere+)."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        cudnn = torch.backends.cudnn
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                         deterministic=cudnn.deterministic, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def _chunks(batch: int, per_example: int, most: int | None = None):
    step = max(1, CHUNK_ELEMS // max(1, per_example))
    step = min(step, most) if most else step
    for s in range(0, batch, step):
        yield slice(s, min(batch, s + step))


def grouped_chunks(batch: int, per_example: int):
    """Example chunks for per-example convolution gradients of `per_example` elements each."""
    return _chunks(batch, per_example, max(1, min(GROUPED_EXAMPLES, GROUPED_ELEMS // max(1, per_example))))


def formed_chunks(batch: int, per_example: int):
    """Example chunks for per-example gradients formed from factors (a bmm per chunk, whose
    per-call cost dominates below ~16 examples)."""
    return _chunks(batch, per_example, FORMED_EXAMPLES)


class Dense:
    """A dense factor (B, T, n)."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    @property
    def width(self) -> int:
        return self.t.shape[-1]

    @property
    def batch(self) -> int:
        return self.t.shape[0]

    @property
    def positions(self) -> int:
        return self.t.shape[1]

    def dense(self) -> torch.Tensor:
        return self.t

    def rows(self, s: slice) -> torch.Tensor:
        return self.t[s]

    def position_gram(self, s: slice) -> torch.Tensor:
        """(b, T, T) inner products between the positions of each example in `s`."""
        v = self.t[s]
        return torch.bmm(v, v.transpose(1, 2))



class OneHot:
    """Left factor of an embedding: one-hot rows given by indices (B, T) into n classes."""

    def __init__(self, idx: torch.Tensor, n: int):
        self.idx = idx
        self.n = n

    @property
    def width(self) -> int:
        return self.n

    @property
    def batch(self) -> int:
        return self.idx.shape[0]

    @property
    def positions(self) -> int:
        return self.idx.shape[1]

    def dense(self) -> torch.Tensor:  # only used by tests / tiny vocabularies
        return F.one_hot(self.idx, self.n).float()

    def rows(self, s: slice) -> torch.Tensor:
        return F.one_hot(self.idx[s], self.n).float()


class Patches:
    """Right factor of a convolution: input patches (plus a ones row for the bias), built
    lazily: with many positions the per-example gradients are formed directly (`grads`) and
    patches are never needed. `conv` (the layer's own convolution) is kept for rules that
    re-derive outputs. Patches are gathered with one
    strided copy into a (B, C*kh*kw [+1], T) buffer (F.unfold is several times slower on
    CPU) and returned as a transposed (B, T, n) view."""

    def __init__(self, x: torch.Tensor, g: torch.Tensor, kernel, stride, dilation, padding,
                 with_weight: bool, with_bias: bool, conv: Callable):
        self.x, self.g, self.kernel, self.stride, self.dilation = x, g, kernel, stride, dilation
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
            self._dense = self._build(self.x)
        return self._dense.transpose(1, 2)

    def rows(self, s: slice) -> torch.Tensor:
        """Patches of examples `s` only (bounded memory for large layers)."""
        if self._dense is not None:
            return self._dense[s].transpose(1, 2)
        return self._build(self.x[s]).transpose(1, 2)

    def grads(self, s: slice) -> torch.Tensor:
        """Per-example gradients (b, out, in) of examples `s` for this call."""
        parts = self.grad_parts(s)
        return torch.cat(parts, 2) if len(parts) > 1 else parts[0]

    def grad_parts(self, s: slice) -> tuple:
        """The per-example gradients of examples `s` as column blocks of (b, out, in): the
        weight block and the bias column (norms and sums need no concatenated copy). Wide
        inputs use one grouped weight-gradient convolution (groups = examples), several times
        faster on CPU than patches + bmm; narrow ones (PATCH_BMM_WIDTH) patches + bmm, with
        the patches on the left (~25% faster than grad @ patches^T for these thin shapes)."""
        x, g = self.x[s], self.g[s]
        b, O = g.shape[:2]
        if self.with_weight and x.shape[1] * math.prod(self.kernel) < PATCH_BMM_WIDTH:
            return (torch.bmm(self._build(x), g.flatten(2).transpose(1, 2)).transpose(1, 2),)
        parts = []
        if self.with_weight:
            C = x.shape[1]
            gw = torch.nn.grad.conv2d_weight(
                x.reshape(1, b * C, *x.shape[2:]), (b * O, C, *self.kernel),
                g.reshape(1, b * O, *g.shape[2:]), stride=self.stride, padding=self.padding,
                dilation=self.dilation, groups=b)
            parts.append(gw.view(b, O, -1))
        if self.with_bias:
            parts.append(g.sum((2, 3)).unsqueeze(2))
        return tuple(parts)

    def sketch_columns(self, s: slice, h: torch.Tensor, sign: torch.Tensor, K: int) -> torch.Tensor:
        """(b, K, T) CountSketch of each patch of examples `s` (entry j to bucket h[j] with
        sign sign[j]), scattered in the patch buffer's own (b, n, T) layout and signed in
        place: no transposed copy and no signed temporary. index_add_ moves whole rows of T
        positions (3-10x faster than scatter_add_ on CPU for these shapes)."""
        cols = self._build(self.x[s])
        cols.mul_(sign[:, None])
        b, n, T = cols.shape
        return cols.new_zeros(b, K, T).index_add_(1, h, cols)

    def position_gram(self, s: slice) -> torch.Tensor:
        """(b, T, T) inner products between the patches of each example in `s`. Where the
        padded input has fewer pixels than T * sqrt(kh * kw) (stride 1, few positions: the
        late layers of a ResNet), from the pixel Gram X^T X, a patch product being the sum
        over kernel offsets of pixel products: fewer multiply-adds and no patch copy."""
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = self.kernel, self.stride, self.dilation, self.padding
        x = self.x[s]
        b, C, H, W = x.shape
        Hp, Wp = H + 2 * ph, W + 2 * pw
        Ho, Wo = (Hp - (kh - 1) * dh - 1) // sh + 1, (Wp - (kw - 1) * dw - 1) // sw + 1
        T, P = Ho * Wo, Hp * Wp
        if not self.with_weight or P * P >= T * T * kh * kw:
            v = self.rows(s)
            return torch.bmm(v, v.transpose(1, 2))
        xp = (F.pad(x, (pw, pw, ph, ph)) if (ph or pw) else x).reshape(b, C, P)
        pixels = torch.bmm(xp.transpose(1, 2), xp).view(b, P * P)
        dev = x.device
        base = ((torch.arange(Ho, device=dev) * sh * Wp)[:, None]
                + torch.arange(Wo, device=dev) * sw).reshape(-1)
        out = None
        for i in range(kh):
            for j in range(kw):
                at = base + i * dh * Wp + j * dw
                part = pixels.index_select(1, (at[:, None] * P + at[None, :]).reshape(-1))
                out = part if out is None else out.add_(part)
        out = out.view(b, T, T)
        return out.add_(1.0) if self.with_bias else out

    def _build(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = self.kernel, self.stride, self.dilation, self.padding
        x = F.pad(x, (pw, pw, ph, ph)) if (ph or pw) else x
        v = x.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)
        v = v[..., ::dh, ::dw]  # (B, C, H', W', kh, kw), a view
        B, C, Ho, Wo = v.shape[:4]
        n = C * kh * kw if self.with_weight else 0
        out = torch.empty(B, n + int(self.with_bias), Ho * Wo, dtype=x.dtype, device=x.device)
        if self.with_weight:
            out[:, :n].view(B, C, kh, kw, Ho, Wo).copy_(v.permute(0, 1, 4, 5, 2, 3))
        if self.with_bias:
            out[:, n].fill_(1.0)
        return out


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
        if self._use_ghost():
            return self._ghost(sum(l.positions for l, _ in self.calls))
        return self._direct()

    def _use_ghost(self) -> bool:
        if any(isinstance(l, OneHot) for l, _ in self.calls):
            return True
        T = sum(l.positions for l, _ in self.calls)
        return T * (self.out_features + self.in_features) < self.out_features * self.in_features

    def _is_conv(self) -> bool:
        return all(isinstance(r, Patches) for _, r in self.calls)

    def _conv_chunks(self):
        return grouped_chunks(self._batch(), self.out_features * self.in_features)

    def _direct(self) -> torch.Tensor:
        B = self._batch()
        T = sum(l.positions for l, _ in self.calls)
        out = []
        per_example = max(self.out_features * self.in_features, T * (self.out_features + self.in_features))
        if self._is_conv():
            for s in self._conv_chunks():
                G = sum(r.grads(s) for _, r in self.calls)
                out.append(G.square().sum((1, 2)))
            return torch.cat(out)
        for s in _chunks(B, per_example):
            u = _cat([l.rows(s) for l, _ in self.calls])
            v = _cat([r.rows(s) for _, r in self.calls])
            if u.shape[1] == 1:
                out.append(u.square().sum((1, 2)) * v.square().sum((1, 2)))
            else:
                out.append(torch.bmm(u.transpose(1, 2), v).square().sum((1, 2)))
        return torch.cat(out)

    def _ghost(self, T: int) -> torch.Tensor:
        onehot = all(isinstance(l, OneHot) for l, _ in self.calls)
        out = []
        for s in _chunks(self._batch(), T * T + T * (self.out_features + self.in_features)):
            if len(self.calls) == 1:
                gv = self.calls[0][1].position_gram(s)
            else:
                v = _cat([r.rows(s) for _, r in self.calls])
                gv = torch.bmm(v, v.transpose(1, 2))
            if onehot:
                idx = torch.cat([l.idx[s] for l, _ in self.calls], 1)
                gu = (idx[:, :, None] == idx[:, None, :]).to(gv.dtype)
            else:
                u = _cat([l.rows(s) for l, _ in self.calls])
                gu = torch.bmm(u, u.transpose(1, 2))
            out.append((gu * gv).sum((1, 2)))
        return torch.cat(out)

    def _batch(self) -> int:
        return self.calls[0][0].batch


@dataclass
class Vector:
    """Exact per-example gradient vectors (B, n), summed over calls."""

    vec: torch.Tensor

    def sq_norm(self) -> torch.Tensor:
        return self.vec.square().sum(1)
