"""GradientExtension: exact per-example gradient norms, the exact in-batch gradient Gram,
and a shared CountSketch / TensorSketch of each example's gradient, computed from hooks on
the training (and probe) backward pass, with no second pass and no (B, P) per-example
gradient tensor.

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
from .probe_gram import DEFAULT_BUDGET, OVER_BUDGET, ProbeGram
from .projection import layer_hashes
from .signals import layer_flat, layer_signals

DEFAULT_PROJECTION_DIM = 1024
#: c in sd(cos error) ~= c (1 - cos^2) / sqrt(K) per layer sketch kind: a dense Gaussian JL
#: and a CountSketch are 1.0; for TensorSketch the largest measured ratio to a dense JL
#: (1.39, the seed CNN at init; benchmarks/sketch_fidelity.py), rounded up
SKETCH_INFLATION = {"tensorsketch": 1.4, "countsketch": 1.0}
PASS_GROUPS = {"train": ("step", "slot"), "probe": ("probe", "example")}


@dataclass
class _Layer:
    name: str
    module: nn.Module
    rule: object
    params: list[str]
    shape: tuple[int, ...]
    calls: list = field(default_factory=list)  # [input, grad or None, extra]
    mats: dict = field(default_factory=dict)   # device -> (hashes, index cache)
    path: str = ""                  # module path: parameter names are path.param
    broken: str | None = None       # why its values are NaN from now on (hooks.py, checks.py)

    @property
    def tensors(self) -> list:
        return [getattr(self.module, p) for p in self.params]

    @property
    def param_names(self) -> list[str]:
        return [f"{self.path or self.name}.{p}" for p in self.params]

    @property
    def sketch_kind(self) -> str:
        return "tensorsketch" if self.rule.form == "factored" else "countsketch"


@register_extension("gradients")
class GradientExtension(Hooks, Extension):
    """Per-example gradient norms (total and per layer), sketches and the in-batch Gram.

    norms: record exact norms. projection_dim: size K of the one sketch shared by all covered
    layers (int; True means DEFAULT_PROJECTION_DIM), or None / 0 for no sketch (the
    default, so that `Recorder(grad_norms=True)` records norms only).
    gram: record the exact (B, B) Gram of each training batch's per-example gradients, and
    the exact (N, N) Gram across all N tracked examples of each probe pass when their
    per-example gradients fit `probe_gram_budget` bytes (probe_gram.py).
    seed: seeds every hash together with the layer name. layers: module names or fnmatch
    patterns to cover (default: every supported module with trainable params).
    fused: covered convolutions run through `fused.FusedConv`, whose backward forms the
    per-example weight gradients once and returns their sum as the weight gradient,
    instead of repeating autograd's weight-gradient work (exact; see fused.py).
    batch_axis: {module path pattern: 0 or 1}, which input dimension holds the examples for
    modules whose inputs are (B, T, ...) or (T, B, ...) (learned from batches where B != T
    otherwise). check_every: besides the first batch of each kind, re-check every N train
    steps that the hooks saw every use of each covered parameter (0: first batch only).
    """

    needs_backward = True

    def __init__(self, norms: bool = True, projection_dim: int | bool | None = None,
                 seed: int = 0, layers: list[str] | None = None, fused: bool = True,
                 gram: bool = False, batch_axis: dict | None = None, check_every: int = 0,
                 probe_gram_budget: int = DEFAULT_BUDGET):
        if int(probe_gram_budget) != probe_gram_budget or probe_gram_budget < 0:
            raise ValueError(f"probe_gram_budget must be a number of bytes >= 0, got {probe_gram_budget!r}")
        self._probe = ProbeGram(int(probe_gram_budget), 0)
        self._probe_collect = False
        self.probe_gram_passes: list[int] = []
        self.probe_gram_skipped: list[int] = []
        self.norms = bool(norms)
        self.fused = bool(fused)
        self.gram = bool(gram)
        if projection_dim is True:
            projection_dim = DEFAULT_PROJECTION_DIM
        if isinstance(projection_dim, dict) or (projection_dim and int(projection_dim) != projection_dim):
            raise ValueError(f"projection_dim must be one integer K (the size of the sketch all "
                             f"layers share), got {projection_dim!r}")
        self.projection_dim = int(projection_dim) if projection_dim else None
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
        self._want_gram = False

    # -- setup ---------------------------------------------------------------------
    def attach(self, recorder) -> None:
        self.attach_model(recorder.model)  # hooks.py

    def _allocate(self) -> None:
        """The sketch's size (one K shared by every layer; called by attach_model)."""
        self.proj_total = (self.projection_dim or 0) if self.layers else 0

    @property
    def _any_signal(self) -> bool:
        return bool(self.norms or self.proj_total or self.gram)

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
                                     attrs={"seed": self.seed, "unit_rows": True,
                                            "scale": "grad_proj_scale"}))
                out.append(ArraySpec(group, "grad_proj_scale", (row, ex), "float32"))
        if self.gram:
            out.append(ArraySpec("train", "grad_gram", ("step", "slot", "slot_j"), "float32"))
            out.append(ArraySpec("probe", "grad_gram", ("probe", "example", "example_j"), "float32"))
        return out

    def metadata(self) -> dict:
        K = self.proj_total
        err = {kind: (c / K ** 0.5 if K else None) for kind, c in SKETCH_INFLATION.items()}
        kinds = {l.sketch_kind for l in self.layers}
        return {
            "norms": self.norms,
            "layer_names": [l.name for l in self.layers],
            "layers": [{"name": l.name, "type": type(l.module).__name__, "form": l.rule.form,
                        "params": l.param_names,
                        "numel": sum(t.numel() for t in l.tensors),
                        "matrix_shape": list(l.shape), "sketch": l.sketch_kind,
                        "cos_sd_at_zero": err[l.sketch_kind]} for l in self.layers],
            "covered_parameters": [n for l in self.layers for n in l.param_names],
            "excluded_parameters": dict(self.excluded),
            "covered_fraction": self._covered_numel / max(1, self.total_trainable),
            "projection": {
                "kind": "count_sketch", "dim": K, "seed": self.seed,
                "dtype": "float16 unit rows (grad_proj) x float32 norms (grad_proj_scale)",
                "layout": "one K-vector shared by all layers: sum over layers of each layer's sketch",
                "hash": "bucket, sign = torch.randint from torch.Generator('cpu').manual_seed("
                        "seed*1000003 + zlib.crc32('<layer>/<L|R|P>') mod 2^63-1); matrix entry "
                        "(o, i) -> bucket (h_L[o] + h_R[i]) mod K, sign s_L[o] s_R[i]",
                "error": {"law": "sd(cos_sketch - cos_true) ~= c (1 - cos_true^2) / sqrt(K)",
                          "c": max((SKETCH_INFLATION[k] for k in kinds), default=1.0),
                          "cos_sd_at_zero": (max((SKETCH_INFLATION[k] for k in kinds), default=1.0)
                                             / K ** 0.5) if K else None,
                          "measured_by": "benchmarks/sketch_fidelity.py"}},
            "gram": {"recorded": self.gram, "groups": ["train", "probe"] if self.gram else [],
                     "definition": "<g_i, g_j> over the covered parameters of each example's own "
                                   "loss; NaN rows/columns where an example's loss weight is 0",
                     "probe_budget_bytes": self._probe.budget,
                     "probe_bytes_per_example": self._covered_numel * 4,
                     "probe_passes": list(self.probe_gram_passes),
                     "probe_passes_over_budget": list(self.probe_gram_skipped)},
            "batchnorm_modules": list(self.batchnorm_modules),
            "batchnorm_train_mode_coupling": bool(self.batchnorm_modules),
            "zero_weight_examples": "nan",
            "loss_weighting": "dL/dloss_i from a hook on the per-example losses is divided out",
        }

    # -- probe passes ----------------------------------------------------------------
    def begin_pass(self, kind: str) -> None:
        if kind == "probe" and self.gram:
            self._probe.numel = self._covered_numel
            self._probe.begin_pass()

    def begin_batch(self, batch) -> None:
        super().begin_batch(batch)
        self._probe_collect = (batch.kind == "probe" and self.gram
                               and self._probe.admit(batch.batch_size))

    def end_pass(self, kind: str, row: int) -> dict:
        if kind != "probe" or not self.gram:
            return {}
        self._probe_collect = False
        gm = self._probe.result()
        if gm is None:
            self.probe_gram_skipped.append(row)
            if self._probe.over:
                n = self._probe.seen
                self._warn("probe_gram_budget", OVER_BUDGET.format(
                    row=row, need=self._probe.need_bytes(n) >> 20, n=n, p=self._covered_numel,
                    budget=self._probe.budget >> 20))
            return {}
        self.probe_gram_passes.append(row)
        return {"grad_gram": gm}

    def state_dict(self) -> dict:
        return {"probe_gram_passes": list(self.probe_gram_passes),
                "probe_gram_skipped": list(self.probe_gram_skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.probe_gram_passes = list(state.get("probe_gram_passes", []))
        self.probe_gram_skipped = list(state.get("probe_gram_skipped", []))

    # -- batches -------------------------------------------------------------------
    def end_batch(self, batch: BatchContext) -> dict:
        out = self.columns(batch)
        if "grad_proj" in out:
            out["grad_proj"], out["grad_proj_scale"] = unit_rows(out["grad_proj"])
        return out

    def columns(self, batch: BatchContext) -> dict:
        """end_batch's columns with the sketch unnormalised in float32 (tests compare these)."""
        if not self._active:
            return {}
        try:
            if self._checking:
                checks.verify(self)
            norms, proj, gram = self.compute(batch.batch_size)
        finally:
            self._reset()
        out = {}
        if self.norms:
            out["grad_norm"] = norms.sum(1).sqrt()
            out["grad_norm_layer"] = norms.sqrt()
        if proj is not None:
            out["grad_proj"] = proj
        if gram is not None:
            out["grad_gram"] = gram
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
        """(B, layers) squared norms, (B, K) sketch and (B, B) Gram (None when not recorded)
        of each example's own loss gradient, from what the hooks captured since begin_batch."""
        w = self._loss_grad
        B = batch_size
        # allocated where the captured gradients live: a CPU buffer moved to the device
        # later would block the host on every step
        device = next((c[1].device for layer in self.layers for c in layer.calls
                       if c[1] is not None), torch.device("cpu"))
        sq = torch.zeros(B, len(self.layers), device=device)
        proj = torch.zeros(B, self.proj_total, device=device) if self.proj_total else None
        gram = torch.zeros(B, B, device=device) if self._want_gram else None
        nan = float("nan")
        flats, nan_rows = {}, torch.zeros(B, dtype=torch.bool, device=device)
        if w is None:
            if not any(c[1] is not None for layer in self.layers for c in layer.calls):
                self._warn("nobackward", "no backward pass reached the hooked layers in this batch; "
                           "its per-example gradient signals are NaN")
                if self._probe_collect:
                    self._probe.add({}, sq.new_ones(B), torch.ones(B, dtype=torch.bool, device=device))
                return tuple(t.fill_(nan) if t is not None else None for t in (sq, proj, gram))
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
                               "recorded as NaN (and so are the sketch and the Gram, which include "
                               "every layer)")
                    sq[:, j] = nan
                    for t in (proj, gram):
                        if t is not None:
                            t.fill_(nan)
                    nan_rows[:] = True
                    continue
                fused = calls[0][2].get("fused") if len(calls) == 1 else None
                if fused is not None:  # formed in the backward (fused.py)
                    s, p, gm = fused
                    if self._probe_collect:
                        flats[j] = calls[0][2].get("fused_flat")
                        if flats[j] is None:  # formed before the pass began collecting
                            del flats[j]
                            nan_rows[:] = True
                            self._warn("probe_flat", f"{layer.name}: its per-example gradients were "
                                       "not kept in this probe batch; its rows of probe/grad_gram are NaN")
                else:
                    hs, cache = self._hashes(layer, device) if proj is not None else (None, None)
                    g = layer.rule.grad(layer.module, calls, layer.params)
                    s, p, gm = layer_signals(g, hs, self.proj_total, gram is not None, cache)
                    if self._probe_collect:
                        flats[j] = layer_flat(g)
                sq[:, j] = s
                if proj is not None:
                    proj += p
                if gram is not None:
                    gram += gm
            if w is not None:
                w = w.to(sq.device).float().reshape(-1)
                inv = torch.where(w != 0, 1.0 / w, torch.full_like(w, nan))
                sq = sq * inv[:, None].square()
                if proj is not None:
                    proj = proj * inv[:, None]
                if gram is not None:
                    gram = gram * inv[:, None] * inv[None, :]
            if self._probe_collect:
                self._probe.add(flats, inv if w is not None else sq.new_ones(B), nan_rows)
        return sq, proj, gram

    def _hashes(self, layer: _Layer, device) -> tuple:
        """(hashes, index cache) of a layer on a device, regenerated from (seed, name)."""
        key = str(device)
        if key not in layer.mats:
            layer.mats[key] = (layer_hashes(self.seed, layer.name, layer.rule.form, layer.shape,
                                            self.proj_total, device), {})
        return layer.mats[key]

    def _warn(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)


def unit_rows(proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float16 unit rows, float32 norms): a direction survives float16 at any gradient
    scale (a 1e-10 gradient included). A zero row stays zero with norm 0; NaN stays NaN."""
    scale = proj.norm(dim=1)
    unit = proj / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
    return unit.to(torch.float16), scale
