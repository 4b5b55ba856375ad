"""Per-step parameter statistics for optimization insight (issue 7; docs/OPTIMIZATION.md).

Every train step, for every trainable parameter tensor, the `params/` row group gets: the
gradient, weight, update and weight-difference norms; a histogram of |g| over fixed
log-spaced edges (plus an exact-zero bin) from which #(|g| < eps) is *exact* for every eps
on an edge; the number of components whose gradient sign flipped since the previous step;
per edge, how many components crossed it upward ("released" near-zero gradients); the
secant product <g_t - g_{t-1}, w_t - w_{t-1}> (sign of the curvature along the step); and a
per-output-unit "gradient exactly zero" flag (dead units). Raw gradient and weight tensors of
selected parameters go to `snapshots/` every `snapshot_every` steps.

Cheap by construction: gradients are copied into one flat float32 buffer, so one bucketize,
one bincount and a few elementwise passes serve all tensors at once; nothing syncs with the
device (the writer thread copies the small results to the host).
"""
from __future__ import annotations

import numpy as np
import torch

from .extensions import ArraySpec, BatchContext, Extension, register_extension

#: mantissas of the default edges in each decade: thresholds people type (1e-7, 5e-6, ...)
MANTISSAS = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)


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


def snapshot_key(name: str) -> str:
    return name.replace(".", "__")


def bin_lookup(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tables for binning |g| by its top 16 float32 bits (sign, exponent, 7 mantissa bits).

    For a non-negative float32 x with bucket i = bits(x) >> 16:
    bin(x) = base[i] + (x >= split[i]), exact, because a bucket spans a relative width of
    2^-7 and so holds at most one edge (edges are >= 1.3x apart). Bucket 0 holds 0 and the
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


class ParamStats:
    """The per-step statistics over a fixed list of parameter tensors (torch only, no store)."""

    def __init__(self, names: list[str], params: list[torch.Tensor], edges: np.ndarray,
                 scatter: bool | None = None):
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
        f32 = dict(dtype=torch.float32, device=dev)
        self.g, self.g_prev = torch.empty(n, **f32), torch.empty(n, **f32)
        self.w, self.w_prev = torch.empty(n, **f32), torch.empty(n, **f32)
        self.b_prev = self.hist_prev = self.neg_prev = None
        # CUDA bincount reads max(input) back to size its output (a device sync per call):
        # on accelerators histogram with one scatter-add into (param, bin) instead
        self.scatter = dev.type != "cpu" if scatter is None else scatter
        if self.scatter:
            pid = torch.repeat_interleave(torch.arange(P, device=dev), torch.tensor(self.sizes, device=dev))
            self.key = pid * self.nbins
            self.ones = torch.ones(n, dtype=torch.int64, device=dev)
        self.has_prev = False

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [v.view(p.shape) for v, p in zip(torch.split(flat, self.sizes), self.params)]

    def bins(self, a: torch.Tensor) -> torch.Tensor:
        """Bin index (uint8) of each |g| in `a` (float32, non-negative)."""
        i = a.view(torch.int32) >> 16
        return self.base.index_select(0, i).add_(a >= self.split.index_select(0, i))

    def _hist(self, b: torch.Tensor) -> torch.Tensor:
        nb = self.nbins
        if self.scatter:
            out = torch.zeros(len(self.sizes) * nb, dtype=torch.int64, device=b.device)
            return out.index_add_(0, self.key + b, self.ones).view(-1, nb)
        return torch.stack([torch.bincount(s, minlength=nb) for s in torch.split(b, self.sizes)])

    @torch.no_grad()
    def capture(self) -> dict:
        """Statistics of the current gradients and weights; advances the 'previous' state."""
        g_views, w_views = self._views(self.g), self._views(self.w)
        grads = [p.grad for p in self.params]
        for gv, gr in zip(g_views, grads):
            if gr is None:
                gv.zero_()
        have = [(gv, gr) for gv, gr in zip(g_views, grads) if gr is not None]
        if have:
            torch._foreach_copy_([a for a, _ in have], [b.detach() for _, b in have])
        torch._foreach_copy_(w_views, [p.detach() for p in self.params])
        g = self.g
        b = self.bins(g.abs())
        nz, neg = b.bool(), g < 0
        hist = self._hist(b)
        row = {
            "grad_norm": torch.stack(torch._foreach_norm(g_views)),
            "param_norm": torch.stack(torch._foreach_norm(w_views)),
            "grad_hist": hist.to(torch.int32),
            "unit_zero": torch.cat([~s.view(u, -1).any(1) for s, u in
                                    zip(torch.split(nz, self.sizes), self.units)]),
        }
        if self.has_prev:
            bp = self.b_prev
            # a sign flip: both nonzero and of opposite signs (zeros never flip)
            flip = (neg ^ self.neg_prev).logical_and_(nz).logical_and_(bp.bool())
            row["sign_flips"] = torch.stack([torch.count_nonzero(x) for x in torch.split(flip, self.sizes)])
            # released[k] = #{|g_prev| < e_k <= |g|} = #{b_prev < k+2} - #{max(b_prev, b) < k+2}
            both = self._hist(torch.maximum(bp, b))
            row["released"] = (self.hist_prev.cumsum(1) - both.cumsum(1))[:, 1:self.nbins - 1].to(torch.int32)
            dw = torch._foreach_sub(w_views, self._views(self.w_prev))
            dg = torch._foreach_sub(g_views, self._views(self.g_prev))
            row["weight_diff_norm"] = torch.stack(torch._foreach_norm(dw))
            row["secant_dot"] = torch.stack([torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(dg, dw)])
        self.g, self.g_prev = self.g_prev, self.g
        self.w, self.w_prev = self.w_prev, self.w
        self.b_prev, self.hist_prev, self.neg_prev = b, hist, neg
        self.has_prev = True
        return row

    @torch.no_grad()
    def update_norms(self) -> torch.Tensor:
        """Per-tensor norm of the weights now minus the weights at the last capture."""
        diff = torch._foreach_sub([p.detach().float() for p in self.params], self._views(self.w_prev))
        return torch.stack(torch._foreach_norm(diff))

    def snapshot(self, which: list[int]) -> dict:
        """Copies of the last captured gradient and weight of parameters `which` (flattened)."""
        g, w = torch.split(self.g_prev, self.sizes), torch.split(self.w_prev, self.sizes)
        out = {}
        for i in which:
            key = snapshot_key(self.names[i])
            out[f"grad__{key}"], out[f"weight__{key}"] = g[i].clone(), w[i].clone()
        return out


@register_extension("params")
class ParamStatsExtension(Extension):
    """Optimizer-insight statistics per step and parameter tensor (see module docstring).

    params: names of the parameters to record (default: every trainable parameter).
    snapshot_params: names (or "all") whose raw gradient and weight go to `snapshots/`.
    snapshot_every: snapshot cadence in train steps (snapshots at steps 0, N, 2N, ...).
    mantissas, lo_exp, hi_exp: histogram edges (see `hist_edges`).
    """

    name = "params"

    def __init__(self, params=None, snapshot_params=(), snapshot_every: int = 0,
                 mantissas=MANTISSAS, lo_exp: int = -12, hi_exp: int = 2):
        self.param_names = None if params is None else list(params)
        if isinstance(snapshot_params, str):
            snapshot_params = [snapshot_params] if snapshot_params != "all" else "all"
        self.snapshot_params = snapshot_params if snapshot_params == "all" else list(snapshot_params or ())
        self.snapshot_every = int(snapshot_every or 0)
        if self.snapshot_every < 0:
            raise ValueError(f"snapshot_every must be >= 0, got {snapshot_every}")
        if self.snapshot_params and not self.snapshot_every:
            self.snapshot_every = 1
        self.edges = hist_edges(lo_exp, hi_exp, mantissas)
        self.edge_spec = {"mantissas": [float(m) for m in mantissas], "lo_exp": lo_exp, "hi_exp": hi_exp}
        self._rec = None
        self.stats: ParamStats | None = None
        self._handles: list = []
        self._pending: dict | None = None
        self._need_capture = False
        self._step = 0
        self._snap_idx: list[int] = []
        self._optimizer = None
        self._primary: ParamStatsExtension | None = None

    # -- setup ----------------------------------------------------------------------
    def attach(self, recorder) -> None:
        # One params extension per recorder: the first listed wins (an explicitly passed
        # instance comes before the one the Recorder builds by default); later ones stay idle.
        first = next((e for e in getattr(recorder, "extensions", ()) if isinstance(e, ParamStatsExtension)), self)
        if first is not self:
            self._primary = first
            return
        named = [(n, p) for n, p in recorder.model.named_parameters() if p.requires_grad]
        if self.param_names is not None:
            known = dict(named)
            missing = [n for n in self.param_names if n not in known]
            if missing:
                raise ValueError(f"params {missing} are not trainable parameters of the model; "
                                 f"available: {[n for n, _ in named]}")
            named = [(n, known[n]) for n in self.param_names]
        names = [n for n, _ in named]
        snap = names if self.snapshot_params == "all" else self.snapshot_params
        missing = [n for n in snap if n not in names]
        if missing:
            raise ValueError(f"snapshot_params {missing} are not recorded parameters; available: {names}")
        self._snap_idx = [names.index(n) for n in snap]
        self.stats = ParamStats(names, [p for _, p in named], self.edges)
        self._rec = recorder
        self._optimizer = recorder.optimizer
        if self._optimizer is not None:
            self._handles = [self._optimizer.register_step_pre_hook(self._pre_step),
                             self._optimizer.register_step_post_hook(self._post_step)]
        lower, upper = bin_bounds(self.edges)
        s = self.stats
        width = max(len(n) for n in names)
        recorder.write_static("params", "param", np.array(names, dtype=f"<U{width}"), ("param",))
        recorder.write_static("params", "param_size", np.array(s.sizes, dtype=np.int64), ("param",))
        recorder.write_static("params", "param_units", np.array(s.units, dtype=np.int64), ("param",))
        recorder.write_static("params", "edge", self.edges, ("edge",))
        recorder.write_static("params", "bin_lower", lower, ("bin",))
        recorder.write_static("params", "bin_upper", upper, ("bin",))
        recorder.write_static("params", "unit_param", s.unit_param, ("unit",))
        recorder.write_static("params", "unit_index", s.unit_index, ("unit",))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def specs(self) -> list[ArraySpec]:
        if self._primary is not None:
            return []
        P = ("step", "param")
        out = [ArraySpec("params", n, P, "float32") for n in
               ("grad_norm", "param_norm", "update_norm", "weight_diff_norm", "secant_dot")]
        out += [ArraySpec("params", "grad_hist", (*P, "bin"), "int32"),
                ArraySpec("params", "released", (*P, "edge"), "int32"),
                ArraySpec("params", "sign_flips", P, "int64"),
                ArraySpec("params", "unit_zero", ("step", "unit"), "bool"),
                ArraySpec("params", "num_updates", ("step",), "int32")]
        if self._snap_idx:
            out.append(ArraySpec("snapshots", "step", ("snapshot",), "int64"))
            for i in self._snap_idx:
                key = snapshot_key(self.stats.names[i])
                out += [ArraySpec("snapshots", f"{kind}__{key}", ("snapshot", f"{key}__index"), "float32")
                        for kind in ("grad", "weight")]
        return out

    def metadata(self) -> dict:
        if self._primary is not None:
            return self._primary.metadata()
        s = self.stats
        return {
            "params": s.names if s else self.param_names,
            "shapes": {n: list(p.shape) for n, p in zip(s.names, s.params)} if s else {},
            "edges": "params/edge (float32); grad_hist bins: {0}, (0, e0), [e0, e1), ..., [e_last, inf or NaN]",
            **self.edge_spec,
            "snapshot_params": [s.names[i] for i in self._snap_idx] if s else [],
            "snapshot_every": self.snapshot_every,
            "update_norm": "optimizer step hooks" if self._optimizer is not None else "weight diff at next step",
        }

    # -- per step -------------------------------------------------------------------------
    def begin_batch(self, batch: BatchContext) -> None:
        if batch.kind == "train" and self.stats is not None:
            self._need_capture = True
            self._step = batch.step_index

    def end_batch(self, batch: BatchContext) -> dict:
        if batch.kind == "train" and self.stats is not None:
            self._capture()
        return {}

    def _pre_step(self, optimizer, args, kwargs) -> None:
        self._capture()  # gradients are final once the optimizer steps, even inside rec.step

    def _post_step(self, optimizer, args, kwargs) -> None:
        if self._pending is not None:
            self._pending["update_norm"] = self.stats.update_norms()
            self._pending["num_updates"] += 1

    def _capture(self) -> None:
        if not self._need_capture:
            return
        self._need_capture = False
        row = self.stats.capture()
        if self._pending is not None:
            if self._optimizer is None:
                self._pending["update_norm"] = row.get("weight_diff_norm")
            self._emit()
        if self._optimizer is not None:
            row["update_norm"] = torch.zeros_like(row["grad_norm"])
            row["num_updates"] = 0
        else:
            row["num_updates"] = -1
        self._pending = row
        if self._snap_idx and self._step % self.snapshot_every == 0:
            self._append("snapshots", {"step": self._step, **self.stats.snapshot(self._snap_idx)})

    def _emit(self) -> None:
        row, self._pending = self._pending, None
        self._append("params", {k: v for k, v in row.items() if v is not None})

    def _append(self, group: str, row: dict) -> None:
        self._rec.append_row(group, row)

    def close(self, recorder) -> None:
        if self._pending is not None:
            self._emit()

    # -- resume -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The previous step's gradients, weights and bins and the row still waiting for its
        update norm: the next row's differences, flips and releases are computed from them."""
        s = self.stats
        if s is None or self._primary is not None:
            return {}
        return {"pending": self._pending, "has_prev": s.has_prev, "g_prev": s.g_prev.clone(),
                "w_prev": s.w_prev.clone(), "b_prev": s.b_prev, "hist_prev": s.hist_prev,
                "neg_prev": s.neg_prev}

    def load_state_dict(self, state: dict) -> None:
        s = self.stats
        if not state or s is None:
            return
        s.g_prev.copy_(state["g_prev"])
        s.w_prev.copy_(state["w_prev"])
        s.b_prev, s.hist_prev, s.neg_prev = state["b_prev"], state["hist_prev"], state["neg_prev"]
        s.has_prev, self._pending = state["has_prev"], state["pending"]
