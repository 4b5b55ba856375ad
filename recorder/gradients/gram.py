"""Exact in-batch gradient Gram <g_i, g_j> of one layer, without per-example gradients
where the layer allows it.

- ghost form (GhostSuite; Wang et al., "Data Shapley in One Training Run"): for
  G_i = sum_t u_it v_it^T, <G_i, G_j> = sum_{t, t'} (u_it . u_jt') (v_it . v_jt'); for one
  position it is (U U^T) (.) (V V^T). One-hot left factors (embeddings) give index equality,
  a one-hot against a dense left factor (tied embedding / output layer) a gather.
- direct form: per-example G_i flattened, F F^T; used where G is formed anyway (fused
  convolutions) or where it is cheaper (many positions, small matrices).

Both are chunked so no temporary exceeds CHUNK_ELEMS (the kept per-example gradients of the
direct form are bounded by DIRECT_KEEP_ELEMS; beyond it blocks are recomputed).
"""
from __future__ import annotations

import torch

from .factors import CHUNK_ELEMS, OneHot, formed_chunks

#: float32 elements of per-example gradients kept for one F F^T (256 MiB); beyond it the
#: Gram is built block by block, recomputing the other block's gradients
DIRECT_KEEP_ELEMS = 1 << 26


def _left_cross(a, sa: slice, b) -> torch.Tensor:
    """(b_a T_a, B T_b) inner products of left factor rows of examples sa against all of b."""
    if isinstance(a, OneHot) and isinstance(b, OneHot):
        ia, ib = a.idx[sa].reshape(-1), b.idx.reshape(-1)
        return (ia[:, None] == ib[None, :]).float()
    if isinstance(a, OneHot):
        ub = b.t.reshape(-1, b.t.shape[-1])
        return ub[:, a.idx[sa].reshape(-1)].t()
    ua = a.t[sa].reshape(-1, a.t.shape[-1])
    if isinstance(b, OneHot):
        return ua[:, b.idx.reshape(-1)]
    return ua @ b.t.reshape(-1, b.t.shape[-1]).t()


def ghost_gram(calls: list, batch: int) -> torch.Tensor:
    """(B, B) sum over call pairs and position pairs of the left and right inner products."""
    T = sum(l.positions for l, _ in calls)
    if len(calls) == 1 and T == 1 and not isinstance(calls[0][0], OneHot):
        (l, r), = calls
        u, v = l.t[:, 0], r.rows(slice(None))[:, 0]
        return (u @ u.t()) * (v @ v.t())
    out = None
    rights = [r.rows(slice(None)) for _, r in calls]
    step = max(1, CHUNK_ELEMS // max(1, T * T * batch))
    for a0 in range(0, batch, step):
        sa = slice(a0, min(batch, a0 + step))
        block = None
        for (la, _), va in zip(calls, rights):
            Ta = la.positions
            ra = va[sa].reshape(-1, va.shape[-1])
            for (lb, _), vb in zip(calls, rights):
                Tb = lb.positions
                m = _left_cross(la, sa, lb) * (ra @ vb.reshape(-1, vb.shape[-1]).t())
                m = m.view(-1, Ta, batch, Tb).sum((1, 3))
                block = m if block is None else block + m
        out = block if out is None else torch.cat([out, block])
    return out


def ghost_cost(calls: list, batch: int, out_f: int, in_f: int) -> int:
    T = sum(l.positions for l, _ in calls)
    return batch * batch * T * T * (out_f + in_f)


def direct_cost(calls: list, batch: int, out_f: int, in_f: int) -> int:
    T = sum(l.positions for l, _ in calls)
    return batch * T * out_f * in_f + batch * batch * out_f * in_f


class DirectSignals:
    """Norms, sketch, Gram (and optionally the batch sum) from per-example gradients made in
    chunks by `grads(slice) -> (b, out, in)`: G is formed once per chunk, never for the batch
    unless the Gram needs it and it fits DIRECT_KEEP_ELEMS."""

    def __init__(self, grads, batch: int, out_f: int, in_f: int, keep_flat: bool = False,
                 chunks=formed_chunks):
        self.grads, self.batch, self.n = grads, batch, out_f * in_f
        self.chunks = chunks  # (batch, per-example elements) -> example slices
        self.keep_flat = keep_flat  # keep the batch's F (a probe pass's Gram needs it later)
        self.kept = None

    def run(self, sketch=None, gram: bool = False, want_sum: bool = False):
        """sketch: callable (b, n) -> (b, K) or None. Returns (sq, proj, gram, total)."""
        chunks = list(self.chunks(self.batch, self.n))
        keep = self.keep_flat or (gram and self.batch * self.n <= DIRECT_KEEP_ELEMS)
        kept, sq, proj, total = None, [], [], None
        for s in chunks:
            parts = _parts(self.grads(s))
            b = parts[0].shape[0]
            flat = None
            if keep or sketch is not None:
                flat = _whole(parts).reshape(b, -1)
            if keep:  # written in place: the batch's F is one buffer, no concatenation
                if kept is None:
                    kept = flat.new_empty(self.batch, self.n)
                kept[s] = flat
                flat = kept[s]
            if want_sum:
                part = _whole([p.sum(0, keepdim=True) for p in parts])[0]
                total = part if total is None else total + part
            if not (keep and gram):  # else the Gram's diagonal
                sq.append(_sq_norms(parts) if flat is None else flat.square().sum(1))
            if sketch is not None:
                proj.append(sketch(flat))
        gm = None
        if gram:
            gm = symmetric_gram(kept) if keep else self._gram()
        sq = gm.diagonal().clone() if keep and gram else torch.cat(sq)
        self.kept = kept
        return sq, (torch.cat(proj) if sketch is not None else None), gm, total

    def _sub(self, s: slice):
        for c in self.chunks(s.stop - s.start, self.n):
            yield slice(s.start + c.start, s.start + c.stop)

    def _gram(self) -> torch.Tensor:
        """Block by block when the batch's gradients do not fit: row block I formed once,
        every other block recomputed (memory two blocks, compute ~ (B / block) passes)."""
        step = max(1, DIRECT_KEEP_ELEMS // (2 * self.n))
        blocks = [slice(a, min(self.batch, a + step)) for a in range(0, self.batch, step)]
        form = (lambda s: torch.cat([_whole(_parts(self.grads(c))).reshape(c.stop - c.start, -1)
                                     for c in self._sub(s)]))
        out = None
        for i, si in enumerate(blocks):
            Fi = form(si)
            rows = [Fi @ Fi.t() if j == i else Fi @ form(sj).t() for j, sj in enumerate(blocks)]
            row = torch.cat(rows, 1)
            out = row if out is None else torch.cat([out, row])
        return out


def _parts(grads) -> tuple:
    """A chunk's per-example gradients as column blocks (grads may give one tensor)."""
    return (grads,) if isinstance(grads, torch.Tensor) else tuple(grads)


def _whole(parts) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, 2)


def _sq_norms(parts) -> torch.Tensor:
    """Squared Frobenius norm per example, block by block: no concatenated copy, and no
    squared temporary (a fused reduction, which reads a transposed block in place)."""
    out = None
    for p in parts:
        n = torch.linalg.vector_norm(p, dim=tuple(range(1, p.dim()))).square()
        out = n if out is None else out + n
    return out


def symmetric_gram(F: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """F F^T from the upper block triangle only (~20% less time than one matmul on CPU)."""
    B = F.shape[0]
    if B < 4 * blocks:
        return F @ F.t()
    out = F.new_empty(B, B)
    step = -(-B // blocks)
    for a in range(0, B, step):
        blk = F[a:a + step] @ F[a:].t()
        out[a:a + step, a:] = blk
        out[a:, a:a + step] = blk.t()
    return out
