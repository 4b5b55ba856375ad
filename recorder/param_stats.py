"""The per-parameter statistics kernel: histogram edges, exact binning, one capture per step.

Cheap by construction (docs/OPTIMIZATION.md "Cost"): gradients and weights are copied into
flat float32 buffers; tensors are processed in contiguous blocks with preallocated scratch,
because a fresh tensor of tens of MB is a fresh mmap whose page faults cost ~10x the
arithmetic; each component's bin comes from one table lookup on its top 16 bits plus one
comparison (exact at every edge); nothing reads a value back to the host, so on a GPU
every operation is queued asynchronously.
"""
from __future__ import annotations

import numpy as np
import torch

#: mantissas of the default edges in each decade: thresholds people type (1e-7, 5e-6, ...)
MANTISSAS = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
#: scratch buffers hold at least this many elements (or the largest tensor): bounded memory
BLOCK = 1 << 22


def hist_edges(lo_exp: int = -12, hi_exp: int = 2, mantissas=MANTISSAS) -> np.ndarray:
    """Histogram edges m*10^e (lo_exp <= e < hi_exp) plus 10^hi_exp, as float32.

    Each edge is float32(float("<m>e<e>")), the same value numpy and torch compare a float32
    gradient against when given the Python float eps, so counts at edges are exact.
    """
    if not all(1.0 <= m < 10.0 for m in mantissas):
        raise ValueError(f"mantissas must lie in [1, 10), got {mantissas}")
    vals = {float(f"{float(m)!r}e{e}") for e in range(lo_exp, hi_exp) for m in mantissas}
    vals.add(float(f"1e{hi_exp}"))
    return np.asarray(sorted(vals), dtype=np.float32)


def bin_bounds(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower/upper bounds of the len(edges)+2 bins: {0}, (0, e0), [e0, e1), ..., [e_last, inf]."""
    e = np.asarray(edges, dtype=np.float32)
    lower = np.concatenate([[0, 0], e]).astype(np.float32)
    upper = np.concatenate([[0], e, [np.inf]]).astype(np.float32)
    return lower, upper


def bin_lookup(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tables for binning |g| by its top 16 float32 bits (sign, exponent, 7 mantissa bits).

    For a non-negative float32 x with bucket i = bits(x) >> 16:
    bin(x) = base[i] + (x >= split[i]), exact, because a bucket spans a relative width of
    2^-7 and so holds at most one edge (edges are >= 1.01x apart). Bucket 0 holds 0 and the
    subnormals; its split is the smallest positive float, separating the exact-zero bin.
    A bucket with no edge inside has split NaN (x >= NaN is never true).
    """
    e = np.asarray(edges, dtype=np.float32)
    if np.any(e[1:] / e[:-1] < 1.01) or e[0] < 2.0 ** -100:
        raise ValueError("histogram edges must be >= 1.01x apart and >= 2^-100")
    starts = (np.arange(1 << 15, dtype=np.uint32) << 16).view(np.float32)
    ends = ((np.arange(1 << 15, dtype=np.uint32) << 16) | 0xFFFF).view(np.float32)
    base = (np.searchsorted(e, starts, side="right") + (starts > 0)).astype(np.uint8)
    j = np.searchsorted(e, starts, side="right")       # first edge > start
    inside = (j < len(e)) & (e[np.minimum(j, len(e) - 1)] <= ends)
    split = np.where(inside, e[np.minimum(j, len(e) - 1)], np.float32(np.nan)).astype(np.float32)
    split[0] = np.nextafter(np.float32(0), np.float32(1))
    base[np.isnan(starts)] = len(e) + 1                # NaN buckets: last bin
    return base, split


def _blocks(sizes: list[int], target: int) -> list[tuple[int, int, int, int]]:
    """Contiguous runs of whole tensors, each <= max(target, its largest tensor):
    (first tensor, stop tensor, first element, stop element)."""
    out, first, start, acc = [], 0, 0, 0
    for i, s in enumerate(sizes):
        if acc and acc + s > target:
            out.append((first, i, start, start + acc))
            first, start, acc = i, start + acc, 0
        acc += s
    out.append((first, len(sizes), start, start + acc))
    return out


class ParamStats:
    """The statistics over a fixed list of parameter tensors (torch only, no store).

    `capture(compare)` returns one step's row; with compare=True the step-to-step statistics
    are taken against the last `capture` or `remember` (the caller knows it was the previous
    step). `remember()` only keeps this step's gradients and weights as the 'previous' ones.
    """

    def __init__(self, names: list[str], params: list[torch.Tensor], edges: np.ndarray,
                 scatter: bool | None = None, block: int = BLOCK):
        if not params:
            raise ValueError("no trainable parameters to record")
        self.names, self.params = list(names), list(params)
        dev = params[0].device
        if any(p.device != dev for p in params):
            raise ValueError("the params extension needs the recorded parameters on one device; "
                             "pass params=[names on one device] to ParamStatsExtension")
        self.sizes = [p.numel() for p in params]
        self.units = [int(p.shape[0]) if p.dim() >= 1 and p.numel() else 1 for p in params]
        n, P = sum(self.sizes), len(params)
        self.edges_np = np.asarray(edges, dtype=np.float32)
        self.nbins = len(self.edges_np) + 2
        if self.nbins > 255:
            raise ValueError(f"at most 253 histogram edges, got {len(self.edges_np)}")
        base, split = bin_lookup(self.edges_np)
        self.base, self.split = torch.as_tensor(base, device=dev), torch.as_tensor(split, device=dev)
        self.unit_param = np.repeat(np.arange(P, dtype=np.int32), self.units)
        self.unit_index = np.concatenate([np.arange(u, dtype=np.int32) for u in self.units])
        self.blocks = _blocks(self.sizes, block)
        m = max(b[3] - b[2] for b in self.blocks)
        f32 = dict(dtype=torch.float32, device=dev)
        self.g, self.g_prev = torch.empty(n, **f32), torch.empty(n, **f32)
        self.w, self.w_prev = torch.empty(n, **f32), torch.empty(n, **f32)
        u8, bl = dict(dtype=torch.uint8, device=dev), dict(dtype=torch.bool, device=dev)
        self.b, self.b_prev = torch.empty(n, **u8), torch.empty(n, **u8)
        self.neg, self.neg_prev = torch.empty(n, **bl), torch.empty(n, **bl)
        # block-sized scratch, reused by every pass (see module docstring)
        self._fa, self._fb = torch.empty(m, **f32), torch.empty(m, **f32)
        self._i32 = torch.empty(m, dtype=torch.int32, device=dev)
        self._ma, self._mb = torch.empty(m, **bl), torch.empty(m, **bl)
        self._u8 = torch.empty(m, **u8)
        self.hist_prev = None
        self._prev = None          # None, "captured" (bins known) or "remembered" (raw only)
        # CUDA bincount reads max(input) back to size its output (a device sync per call):
        # on accelerators histogram with one scatter-add into (param, bin) instead
        self.scatter = dev.type != "cpu" if scatter is None else scatter
        if self.scatter:
            self._keys = [torch.repeat_interleave(torch.arange(t1 - t0, device=dev) * self.nbins,
                                                  torch.tensor(self.sizes[t0:t1], device=dev),
                                                  output_size=e1 - e0)   # no size read-back
                          for t0, t1, e0, e1 in self.blocks]
            self._ones = torch.ones(m, dtype=torch.int64, device=dev)
        self.g_views, self.w_views = self._views(self.g), self._views(self.w)
        self.gp_views, self.wp_views = self._views(self.g_prev), self._views(self.w_prev)

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [v.view(p.shape) for v, p in zip(torch.split(flat, self.sizes), self.params)]

    def bins(self, a: torch.Tensor) -> torch.Tensor:
        """Bin index (uint8) of each |g| in `a` (float32, non-negative); allocates."""
        i = a.view(torch.int32) >> 16
        return self.base.index_select(0, i).add_(a >= self.split.index_select(0, i))

    def _bins_into(self, g: torch.Tensor, out: torch.Tensor) -> None:
        """out = bin(|g|) for a block g, through the scratch buffers (no allocation)."""
        k = g.numel()
        a, s, i, m = self._fa[:k], self._fb[:k], self._i32[:k], self._ma[:k]
        torch.abs(g, out=a)
        torch.bitwise_right_shift(a.view(torch.int32), 16, out=i)
        torch.index_select(self.base, 0, i, out=out)
        torch.index_select(self.split, 0, i, out=s)
        out.add_(torch.ge(a, s, out=m))

    def _hist(self, b: torch.Tensor, blk: int) -> torch.Tensor:
        """(tensors in block, nbins) int64 counts of the block's bin indices `b`."""
        t0, t1, e0, _ = self.blocks[blk]
        nb = self.nbins
        if self.scatter:
            out = torch.zeros((t1 - t0) * nb, dtype=torch.int64, device=b.device)
            return out.index_add_(0, self._keys[blk] + b, self._ones[:b.numel()]).view(-1, nb)
        return torch.stack([torch.bincount(s, minlength=nb) for s in torch.split(b, self.sizes[t0:t1])])

    def _load(self) -> None:
        """Copy the current gradients (zeros where None) and weights into self.g / self.w."""
        have_g, have_p = [], []
        for gv, p in zip(self.g_views, self.params):
            if p.grad is None:
                gv.zero_()
            else:
                have_g.append(gv)
                have_p.append(p.grad.detach())
        if have_g:
            torch._foreach_copy_(have_g, have_p)
        torch._foreach_copy_(self.w_views, [p.detach() for p in self.params])

    @torch.no_grad()
    def remember(self) -> None:
        """Keep the current gradients and weights as the 'previous' step (two copies)."""
        self._load()
        self.g, self.g_prev = self.g_prev, self.g
        self.w, self.w_prev = self.w_prev, self.w
        self.g_views, self.gp_views = self.gp_views, self.g_views
        self.w_views, self.wp_views = self.wp_views, self.w_views
        self._prev = "remembered"

    def _binned(self, g, b, neg) -> list[torch.Tensor]:
        """Bins and signs of flat gradients g into b / neg; per-block histograms."""
        hists = []
        for k, (_, _, e0, e1) in enumerate(self.blocks):
            self._bins_into(g[e0:e1], b[e0:e1])
            torch.lt(g[e0:e1], 0, out=neg[e0:e1])
            hists.append(self._hist(b[e0:e1], k))
        return hists

    @torch.no_grad()
    def capture(self, compare: bool = True) -> dict:
        """Statistics of the current gradients and weights; they become the 'previous' state."""
        self._load()
        compare = compare and self._prev is not None
        if compare and self._prev == "remembered":
            self.hist_prev = torch.cat(self._binned(self.g_prev, self.b_prev, self.neg_prev))
        g, b, neg = self.g, self.b, self.neg
        hist = torch.cat(self._binned(g, b, neg))
        unit_zero = [b_t.view(u, -1).amax(1) == 0 if b_t.numel() else torch.ones(1, dtype=torch.bool, device=b.device)
                     for b_t, u in zip(torch.split(b, self.sizes), self.units)]
        row = {
            "grad_norm": torch.stack(torch._foreach_norm(self.g_views)),
            "param_norm": torch.stack(torch._foreach_norm(self.w_views)),
            "grad_hist": hist.to(torch.int32),
            "unit_zero": torch.cat(unit_zero),
        }
        if compare:
            row.update(self._compare(hist))
        self.g, self.g_prev = self.g_prev, self.g
        self.w, self.w_prev = self.w_prev, self.w
        self.g_views, self.gp_views = self.gp_views, self.g_views
        self.w_views, self.wp_views = self.wp_views, self.w_views
        self.b, self.b_prev = self.b_prev, self.b
        self.neg, self.neg_prev = self.neg_prev, self.neg
        self.hist_prev, self._prev = hist, "captured"
        return row

    def _compare(self, hist: torch.Tensor) -> dict:
        """Step-to-step statistics of (g, w) against (g_prev, w_prev)."""
        flips, both, dw_norm, dots = [], [], [], []
        for k, (t0, t1, e0, e1) in enumerate(self.blocks):
            n, sizes = e1 - e0, self.sizes[t0:t1]
            flip, nz = self._ma[:n], self._mb[:n]
            # a sign flip: both nonzero and of opposite signs (zeros never flip)
            torch.bitwise_xor(self.neg[e0:e1], self.neg_prev[e0:e1], out=flip)
            flip.logical_and_(torch.ne(self.b[e0:e1], 0, out=nz))
            flip.logical_and_(torch.ne(self.b_prev[e0:e1], 0, out=nz))
            flips += [torch.count_nonzero(x) for x in torch.split(flip, sizes)]
            # released[k] = #{|g_prev| < e_k <= |g|} = #{b_prev < k+2} - #{max(b_prev, b) < k+2}
            both.append(self._hist(torch.maximum(self.b_prev[e0:e1], self.b[e0:e1], out=self._u8[:n]), k))
            dw = torch.sub(self.w[e0:e1], self.w_prev[e0:e1], out=self._fa[:n])
            dg = torch.sub(self.g[e0:e1], self.g_prev[e0:e1], out=self._fb[:n])
            dws, dgs = torch.split(dw, sizes), torch.split(dg, sizes)
            dw_norm += torch._foreach_norm(dws)
            dots += [torch.dot(x, y) for x, y in zip(dgs, dws)]
        released = self.hist_prev.cumsum(1) - torch.cat(both).cumsum(1)
        return {"sign_flips": torch.stack(flips),
                "released": released[:, 1:self.nbins - 1].to(torch.int32),
                "prev_grad_hist": self.hist_prev.to(torch.int32),
                "weight_diff_norm": torch.stack(dw_norm),
                "secant_dot": torch.stack(dots)}

    @torch.no_grad()
    def update_norms(self) -> torch.Tensor:
        """Per-tensor norm of the weights now minus the weights at the last capture."""
        norms = []
        for p, wp in zip(self.params, self.wp_views):
            d = torch.sub(p.detach(), wp, out=self._fa[:wp.numel()].view(wp.shape))
            norms.append(torch.linalg.vector_norm(d))   # before the scratch is reused
        return torch.stack(norms)
