"""Per-parameter statistics for optimization insight (docs/OPTIMIZATION.md).

Every `every`-th train step (default `DEFAULT_EVERY`), for every trainable parameter tensor,
the `params/` row group gets: the gradient, weight, update and weight-difference norms; a
histogram of |g| over fixed log-spaced edges (plus an exact-zero bin) from which
#(|g| < eps) is *exact* for every eps on an edge; the number of components whose gradient
sign flipped since the previous step; per edge, how many components crossed it upward
("released" near-zero gradients); the secant product <g_t - g_{t-1}, w_t - w_{t-1}> (sign
of the curvature along the step); and a per-output-unit "gradient exactly zero" flag (dead
units). Under a cadence the step before each recorded step is remembered (two copies), so
"previous" always means the previous training step. Raw gradient and weight tensors of
selected parameters go to `snapshots/` every `snapshot_every` steps.

The kernel (`param_stats.ParamStats`) never reads a value back to the host; the writer
thread copies the small results.
"""
from __future__ import annotations

import numpy as np
import torch

from .extensions import ArraySpec, BatchContext, Extension, register_extension
from .param_stats import MANTISSAS, ParamStats, bin_bounds, bin_lookup, hist_edges  # noqa: F401

#: the default cadence: the statistics cost ~5-25 % of a step when taken every step (linear
#: in the parameter count, independent of the batch), ~1-3 % every 10th (BENCHMARKS.md)
DEFAULT_EVERY = 10


def snapshot_key(name: str) -> str:
    return name.replace(".", "__")


@register_extension("params")
class ParamStatsExtension(Extension):
    """Optimizer-insight statistics per step and parameter tensor (see module docstring).

    params: names of the parameters to record (default: every trainable parameter).
    snapshot_params: names (or "all") whose raw gradient and weight go to `snapshots/`.
    snapshot_every: snapshot cadence in train steps (snapshots at steps 0, N, 2N, ...).
    every: statistics cadence in train steps (rows at steps 0, N, 2N, ...; 1 = every step).
    mantissas, lo_exp, hi_exp: histogram edges (see `hist_edges`).
    """

    name = "params"

    def __init__(self, params=None, snapshot_params=(), snapshot_every: int = 0,
                 mantissas=MANTISSAS, lo_exp: int = -12, hi_exp: int = 2, every: int = DEFAULT_EVERY):
        if isinstance(every, bool) or int(every) != every or every < 1:
            raise ValueError(f"param_stats_every must be a positive integer (1 = every step), got {every!r}")
        self.every = int(every)
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
        self._last = -2            # train step of the last capture or remember
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
        out += [ArraySpec("params", "step", ("step",), "int64"),
                ArraySpec("params", "grad_hist", (*P, "bin"), "int32"),
                ArraySpec("params", "released", (*P, "edge"), "int32"),
                ArraySpec("params", "sign_flips", P, "int64"),
                ArraySpec("params", "unit_zero", ("step", "unit"), "bool"),
                ArraySpec("params", "num_updates", ("step",), "int32")]
        if self.every > 1:   # the previous step is not a row: keep its histogram for retained counts
            out.append(ArraySpec("params", "prev_grad_hist", (*P, "bin"), "int32"))
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
            "every": self.every,
            "update_norm": "optimizer step hooks" if self._optimizer is not None else "weight diff at next step",
        }

    # -- per step -------------------------------------------------------------------------
    def begin_batch(self, batch: BatchContext) -> None:
        if batch.kind == "train" and self.stats is not None:
            t, n = batch.step_index, self.every
            self._step = t
            # work only where needed: a recorded step, the step before it, the step after
            # (closes the pending row), a snapshot; every other step costs nothing here
            self._need_capture = (t % n == 0 or (t + 1) % n == 0 or self._pending is not None
                                  or bool(self._snap_idx and t % self.snapshot_every == 0))

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
        t, n, s = self._step, self.every, self.stats
        consecutive = self._last == t - 1
        if self._pending is not None:
            if self._optimizer is None:   # the update is the weight change up to this step
                self._pending["update_norm"] = s.update_norms() if consecutive else None
            self._emit()
        if self._snap_idx and t % self.snapshot_every == 0:
            self._append("snapshots", {"step": t, **self._snapshot()})
        if t % n == 0:
            row = s.capture(compare=consecutive)
            if n == 1:
                row.pop("prev_grad_hist", None)
            row["step"] = t
            if self._optimizer is not None:
                row["update_norm"] = torch.zeros_like(row["grad_norm"])
                row["num_updates"] = 0
            else:
                row["num_updates"] = -1
            self._pending = row
            self._last = t
        elif (t + 1) % n == 0:
            s.remember()
            self._last = t

    @torch.no_grad()
    def _snapshot(self) -> dict:
        out = {}
        for i in self._snap_idx:
            p, key = self.stats.params[i], snapshot_key(self.stats.names[i])
            g = torch.zeros_like(p) if p.grad is None else p.grad
            out[f"grad__{key}"] = g.detach().reshape(-1).float().clone()
            out[f"weight__{key}"] = p.detach().reshape(-1).float().clone()
        return out

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
        """The previous step's gradients, weights and bins, the cadence position and the row
        still waiting for its update norm: the next rows are computed from them."""
        s = self.stats
        if s is None or self._primary is not None:
            return {}
        return {"pending": self._pending, "last": self._last, "step": self._step, "prev": s._prev,
                "g_prev": s.g_prev.clone(), "w_prev": s.w_prev.clone(), "b_prev": s.b_prev.clone(),
                "neg_prev": s.neg_prev.clone(),
                "hist_prev": None if s.hist_prev is None else s.hist_prev.clone()}

    def load_state_dict(self, state: dict) -> None:
        s = self.stats
        if not state or s is None:
            return
        for name in ("g_prev", "w_prev", "b_prev", "neg_prev"):   # in place: views point into them
            getattr(s, name).copy_(state[name])
        s.hist_prev, s._prev = state["hist_prev"], state["prev"]
        self._pending, self._last, self._step = state["pending"], state["last"], state["step"]
