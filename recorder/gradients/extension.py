"""GradientExtension: exact per-example gradient norms and factored random projections,
computed from hooks on the training (and probe) backward pass, with no second pass and no
(B, P) per-example gradient tensor.

Hooks (hooks.py) capture each covered layer's calls; a hook on the per-example losses
learns the weight w_i = dL/dloss_i that the backward gave each example (1/B for `mean`, 1
for `sum`, GradScaler's scale, ...), which is divided out: the stored signals are those of
each example's own loss. Examples with w_i == 0 get NaN (their gradient was never computed).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..extensions import ArraySpec, BatchContext, Extension, register_extension
from . import checks
from .factors import full_float32
from .hooks import Hooks
from .projection import allocate_dims, gaussian_matrix, split_dims

DEFAULT_PROJECTION_DIM = 1024
PASS_GROUPS = {"train": ("step", "slot"), "probe": ("probe", "example")}


@dataclass
class _Layer:
    name: str
    module: nn.Module
    rule: object
    params: list[str]
    shape: tuple[int, ...]
    proj: tuple[int, ...] = ()      # (k_out, k_in) or (k,)
    offset: int = 0
    calls: list = field(default_factory=list)  # [input, grad or None, extra]
    mats: dict = field(default_factory=dict)   # device -> matrices
    path: str = ""                  # module path: parameter names are path.param
    broken: str | None = None       # why its values are NaN from now on (hooks.py, checks.py)

    @property
    def tensors(self) -> list:
        return [getattr(self.module, p) for p in self.params]

    @property
    def param_names(self) -> list[str]:
        return [f"{self.path or self.name}.{p}" for p in self.params]

    @property
    def proj_size(self) -> int:
        n = 1
        for k in self.proj:
            n *= k
        return n if self.proj else 0


@register_extension("gradients")
class GradientExtension(Hooks, Extension):
    """Per-example gradient norms (total and per layer) and projections.

    norms: record exact norms. projection_dim: total sketch size split equally over the
    covered layers (int; True means DEFAULT_PROJECTION_DIM), per-layer sizes
    ({layer name: dim}), or None / 0 for no projection (the default, so that
    `Recorder(grad_norms=True)` records norms only).
    seed: seeds every projection matrix together with the layer name. layers: module names
    or fnmatch patterns to cover (default: every supported module with trainable params).
    fused: with norms on, covered convolutions run through `fused.FusedConv`, whose backward
    forms the per-example weight gradients once and returns their sum as the weight
    gradient, instead of repeating autograd's weight-gradient work (exact; see fused.py).
    batch_axis: {module path pattern: 0 or 1}, which input dimension holds the examples for
    modules whose inputs are (B, T, ...) or (T, B, ...) (learned from batches where B != T
    otherwise). check_every: besides the first batch of each kind, re-check every N train
    steps that the hooks saw every use of each covered parameter (0: first batch only).
    """

    needs_backward = True

    def __init__(self, norms: bool = True, projection_dim: int | dict | bool | None = None,
                 seed: int = 0, layers: list[str] | None = None, fused: bool = True,
                 batch_axis: dict | None = None, check_every: int = 0):
        self.norms = bool(norms)
        self.fused = bool(fused)
        if projection_dim is True:
            projection_dim = DEFAULT_PROJECTION_DIM
        self.projection_dim = projection_dim or None
        self.seed = int(seed)
        self.layer_patterns = list(layers) if layers else None
        self.layers: list[_Layer] = []
        self.excluded: dict[str, str] = {}
        self.batchnorm_modules: list[str] = []
        self.total_trainable = 0
        self._covered_numel = 0
        self.proj_total = 0
        self._handles: list = []
        self._forwards: list = []  # (module, the fused forward installed on it)
        self._generation = 0  # bumped per batch: fused backwards of old graphs fall back
        self._active = False
        self._loss_grad: torch.Tensor | None = None
        self._warned: set[str] = set()
        self._bsz = 0
        self.batch_axis = dict(batch_axis or {})
        self.check_every = int(check_every)
        self._batch_axes: dict = {}
        self._bn: list = []
        self._checking = False
        self._checked: set = set()
        self._suppress = False
        self._reference: dict | None = None

    # -- setup ---------------------------------------------------------------------
    def attach(self, recorder) -> None:
        self.attach_model(recorder.model)  # hooks.py

    def _allocate(self) -> None:
        """Projection dims and offsets per layer (called by attach_model)."""
        dims = allocate_dims([l.name for l in self.layers], self.projection_dim)
        offset = 0
        for layer in self.layers:
            d = dims.get(layer.name, 0)
            if d:
                layer.proj = (split_dims(d, *layer.shape) if layer.rule.form == "factored"
                              else (min(d, layer.shape[0]),))
            layer.offset = offset
            offset += layer.proj_size
        self.proj_total = offset

    def specs(self) -> list[ArraySpec]:
        names = [l.name for l in self.layers]
        out = []
        for group, (row, ex) in PASS_GROUPS.items():
            if self.norms:
                out.append(ArraySpec(group, "grad_norm", (row, ex), "float32"))
                out.append(ArraySpec(group, "grad_norm_layer", (row, ex, "layer"), "float32",
                                     attrs={"layers": names}))
            if self.proj_total:
                out.append(ArraySpec(group, "grad_proj", (row, ex, "proj"), "float16",
                                     attrs={"seed": self.seed}))
        return out

    def metadata(self) -> dict:
        return {
            "norms": self.norms,
            "layer_names": [l.name for l in self.layers],
            "layers": [{"name": l.name, "type": type(l.module).__name__, "form": l.rule.form,
                        "params": l.param_names,
                        "numel": sum(t.numel() for t in l.tensors),
                        "matrix_shape": list(l.shape), "proj_dims": list(l.proj),
                        "proj_offset": l.offset, "proj_size": l.proj_size} for l in self.layers],
            "covered_parameters": [n for l in self.layers for n in l.param_names],
            "excluded_parameters": dict(self.excluded),
            "covered_fraction": self._covered_numel / max(1, self.total_trainable),
            "projection": {"kind": "factored_gaussian", "dim": self.proj_total, "seed": self.seed,
                           "dtype": "float16", "entries": "N(0, 1/k), k = rows",
                           "seed_hash": "seed*1000003 + zlib.crc32('<layer>/<L|R|P>') mod 2^63-1",
                           "generator": "torch.Generator('cpu').manual_seed; torch.randn(rows, cols)",
                           "layout": "per layer vec(L G R^T) row-major (factored) or P g (vector)"},
            "batchnorm_modules": list(self.batchnorm_modules),
            "batchnorm_train_mode_coupling": bool(self.batchnorm_modules),
            "zero_weight_examples": "nan",
            "loss_weighting": "dL/dloss_i from a hook on the per-example losses is divided out",
        }

    # -- batches -------------------------------------------------------------------
    def end_batch(self, batch: BatchContext) -> dict:
        out = self.columns(batch)
        if "grad_proj" in out:
            out["grad_proj"] = out["grad_proj"].to(torch.float16)
        return out

    def columns(self, batch: BatchContext) -> dict:
        """end_batch's columns in float32 (tests compare these before the float16 cast)."""
        if not self._active:
            return {}
        try:
            if self._checking:
                checks.verify(self)
            norms, proj = self.compute(batch.batch_size)
        finally:
            self._reset()
        out = {}
        if self.norms:
            out["grad_norm"] = norms.sum(1).sqrt()
            out["grad_norm_layer"] = norms.sqrt()
        if proj is not None:
            out["grad_proj"] = proj
        return out

    def _reset(self) -> None:
        self._active = False
        self._checking = False
        self._reference = None
        self._loss_grad = None
        self._generation += 1
        for layer in self.layers:
            layer.calls = []

    def compute(self, batch_size: int):
        """(B, layers) squared norms and (B, proj) float32 projections of each example's own
        loss gradient, from what the hooks captured since begin_batch."""
        w = self._loss_grad
        device = None
        sq = torch.zeros(batch_size, len(self.layers))
        proj = torch.zeros(batch_size, self.proj_total) if self.proj_total else None
        if w is None:
            if not any(c[1] is not None for layer in self.layers for c in layer.calls):
                self._warn("nobackward", "no backward pass reached the hooked layers in this batch; "
                           "its per-example gradient signals are NaN")
                return sq.fill_(float("nan")), (proj.fill_(float("nan")) if proj is not None else None)
            self._warn("noloss", "no gradient reached the per-example losses given to the recorder; "
                       "gradients are stored unscaled (as if each example's weight were 1). "
                       "Backpropagate through the recorded losses (e.g. losses.mean().backward()).")
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False), \
                torch.no_grad(), full_float32():
            for j, layer in enumerate(self.layers):
                calls = [c for c in layer.calls if c[1] is not None]
                reason = self._invalid(layer, calls)
                if not calls and not reason:
                    continue  # not used on the loss's graph: its gradient is zero
                if reason:
                    self._warn(layer.name, f"{layer.name}: {reason}; its per-example gradients are "
                               "recorded as NaN")
                    sq[:, j] = float("nan")
                    if proj is not None:
                        proj[:, layer.offset:layer.offset + layer.proj_size] = float("nan")
                    continue
                device = calls[0][1].device
                if sq.device != device:
                    sq, proj = sq.to(device), (proj.to(device) if proj is not None else None)
                fused = calls[0][2].get("fused") if len(calls) == 1 else None
                mats = self._matrices(layer, device) if layer.proj_size else None
                if fused is not None:  # formed in the backward (fused.py)
                    sq[:, j], p = fused
                    if mats:
                        proj[:, layer.offset:layer.offset + layer.proj_size] = p
                    continue
                g = layer.rule.grad(layer.module, calls, layer.params)
                if self.norms and mats:
                    sq[:, j], p = g.norm_and_project(*mats)
                elif self.norms:
                    sq[:, j] = g.sq_norm()
                if mats:
                    if not self.norms:
                        p = g.project(*mats)
                    proj[:, layer.offset:layer.offset + layer.proj_size] = p
            if w is not None:
                w = w.to(sq.device).float().reshape(-1)
                inv = torch.where(w != 0, 1.0 / w, torch.full_like(w, float("nan")))
                sq = sq * inv[:, None].square()
                if proj is not None:
                    proj = proj * inv[:, None]
        return sq, proj

    def _matrices(self, layer: _Layer, device) -> tuple:
        key = str(device)
        if key not in layer.mats:
            if layer.rule.form == "factored":
                (k_out, k_in), (n_out, n_in) = layer.proj, layer.shape
                layer.mats[key] = (gaussian_matrix(self.seed, layer.name, "L", k_out, n_out, device),
                                   gaussian_matrix(self.seed, layer.name, "R", k_in, n_in, device))
            else:
                layer.mats[key] = (gaussian_matrix(self.seed, layer.name, "P", layer.proj[0],
                                                   layer.shape[0], device),)
        return layer.mats[key]

    def _warn(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
