"""Activation recording for feature-signal analyses: forward hooks on chosen layers, active
during probe passes only, writing one `(probe, example, <name>__unit)` array per layer into
the store's `activations/` group (docs/STORE.md, docs/FEATURES.md).

Why probe passes only: the probe subset is fixed, so every probe row holds the same examples
in the same order, which is what comparing layers and tracking drift needs; train batches
differ every step and would cost a hook per step for nothing.

Spatial maps (N, C, *spatial) are reduced per channel ("mean" / "max") or flattened
("flatten"). Sequence outputs (B, T, F) — any 3-D output of a module that is not
channels-first (Conv1d, BatchNorm1d, 1-d pooling) — are pooled over T by `sequence_pool`:
"mean" over the real tokens (the batch's `attention_mask` when the probe batch has one),
"last" (the last real token, as GPT-style classifiers read out) or an integer position
(0: BERT's [CLS]). Time-first outputs (T, B, F) are recognised by their batch dimension. Layers wider than `max_units` keep a fixed, seeded subset of units, chosen with
numpy from the layer's name so analysis can name the units (`<name>__unit` coordinate).
Stored as float32 by default: correlations of nearly-constant units lose their variance in
float16 (10-bit mantissa); pass dtype="float16" to halve the size when that does not matter.
"""
from __future__ import annotations

import fnmatch
import zlib

import numpy as np
import torch
from torch import nn

from .extensions import ArraySpec, BatchContext, Extension, register_extension

GROUP = "activations"
POOLS = ("mean", "max", "flatten")
SEQUENCE_POOLS = ("mean", "last")
# modules whose 3-D outputs are (N, C, L) feature maps, not (B, T, F) sequences
CHANNELS_FIRST = (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d, nn.InstanceNorm1d, nn.MaxPool1d,
                  nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)
DEFAULT_TYPES = ("Linear", "Conv2d")


def array_name(module_name: str) -> str:
    """Store name of a layer's array: the module path with '.' replaced by '__'."""
    return module_name.replace(".", "__")


def select_layers(model: nn.Module, layers=None) -> list[str]:
    """Module names matching `layers` (names, glob patterns, type names or nn.Module classes),
    in the model's registration order. None/True selects every Linear and Conv2d module."""
    if layers is None or layers is True:
        layers = DEFAULT_TYPES
    if isinstance(layers, (str, type)):
        layers = [layers]
    wanted = []
    for item in layers:
        wanted += [s.strip() for s in item.split(",") if s.strip()] if isinstance(item, str) else [item]
    named = [(n, m) for n, m in model.named_modules() if n]
    chosen, used = [], set()
    for name, module in named:
        for w in wanted:
            hit = (isinstance(w, type) and isinstance(module, w)) or (
                isinstance(w, str) and (name == w or type(module).__name__ == w
                                        or (any(c in w for c in "*?[") and fnmatch.fnmatchcase(name, w))))
            if hit:
                chosen.append(name)
                used.add(w if isinstance(w, str) else w.__name__)
                break
    missing = [w for w in wanted if (w if isinstance(w, str) else w.__name__) not in used]
    if missing:
        raise ValueError(f"activations: no module matches {missing}; module names are e.g. "
                         f"{[n for n, _ in named[:12]]} (types: {sorted({type(m).__name__ for _, m in named})})")
    return chosen


def unit_subset(name: str, num_units: int, max_units: int | None, seed: int = 0) -> np.ndarray | None:
    """The kept units of a layer wider than max_units (sorted, seeded from the layer name)."""
    if not max_units or num_units <= max_units:
        return None
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return np.sort(rng.choice(num_units, size=max_units, replace=False))


def pool_output(out: torch.Tensor, pool: str) -> torch.Tensor:
    """(N, C, *spatial) -> (N, C) by mean/max over positions, or (N, C*prod(spatial)) flattened."""
    if out.dim() <= 2:
        return out.reshape(out.shape[0], -1)
    if pool == "flatten":
        return out.flatten(1)
    spatial = tuple(range(2, out.dim()))
    return out.mean(dim=spatial) if pool == "mean" else out.amax(dim=spatial)


def pool_sequence(out: torch.Tensor, pool, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, F) -> (B, F): mean over real tokens, the last real token, or position `pool`."""
    b, t = out.shape[:2]
    if mask is not None and tuple(mask.shape) != (b, t):
        mask = None   # a mask for other positions (e.g. the input before pooling layers)
    if isinstance(pool, int):
        if not -t <= pool < t:
            raise ValueError(f"activations: sequence_pool={pool} is outside sequences of length {t}")
        return out[:, pool]
    if pool == "last":
        last = (mask.long().sum(1) - 1).clamp_min(0) if mask is not None else torch.full((b,), t - 1, device=out.device)
        return out[torch.arange(b, device=out.device), last.to(out.device)]
    if mask is None:
        return out.mean(1)
    m = mask.to(out.dtype).unsqueeze(-1)
    return (out * m).sum(1) / m.sum(1).clamp_min(1)


@register_extension("activations")
class ActivationExtension(Extension):
    """Record chosen layers' outputs during probe passes.

    layers: module names, glob patterns ("layer4.*"), type names ("ReLU") or classes, or a
            comma-separated string; default every Linear and Conv2d.
    pool: "mean" | "max" | "flatten" for outputs with spatial dimensions.
    max_units: keep at most this many units per layer (seeded subset); None keeps all.
    sequence_pool: "mean" | "last" | int position, for (B, T, F) sequence outputs.
    """

    name = "activations"

    def __init__(self, layers=None, pool: str = "mean", max_units: int | None = 2048,
                 dtype: str = "float32", seed: int = 0, kinds=("probe",), sequence_pool="mean"):
        if not (sequence_pool in SEQUENCE_POOLS or (isinstance(sequence_pool, int) and not isinstance(sequence_pool, bool))):
            raise ValueError(f"sequence_pool must be one of {SEQUENCE_POOLS} or a token position, got {sequence_pool!r}")
        self.sequence_pool = sequence_pool
        self._mask = None
        self._batch_size = None
        if pool not in POOLS:
            raise ValueError(f"activation pool must be one of {POOLS}, got {pool!r}")
        if dtype not in ("float32", "float16"):
            raise ValueError(f"activation dtype must be float32 or float16, got {dtype!r}")
        if max_units is not None and int(max_units) < 1:
            raise ValueError(f"max_units must be a positive integer or None, got {max_units!r}")
        self.layers_arg = layers
        self.pool = pool
        self.max_units = None if max_units is None else int(max_units)
        self.dtype = dtype
        self.seed = int(seed)
        self.kinds = tuple(kinds)
        self.modules: list[str] = []
        self._specs: list[ArraySpec] = []
        self._handles: list = []
        self._active = False
        self._captured: dict[str, torch.Tensor] = {}
        self._subsets: dict[str, torch.Tensor | None] = {}
        self._info: dict[str, dict] = {}
        self._recorder = None

    # -- protocol ------------------------------------------------------------------
    def specs(self) -> list[ArraySpec]:
        return list(self._specs)

    def attach(self, recorder) -> None:
        self._recorder = recorder
        self.attach_model(recorder.model)

    def attach_model(self, model: nn.Module) -> None:
        """Resolve layers and register the hooks (also usable without a Recorder)."""
        self.modules = select_layers(model, self.layers_arg)
        names = [array_name(m) for m in self.modules]
        if len(set(names)) != len(names):
            raise ValueError(f"activations: module names collide once '.' becomes '__': {self.modules}")
        self._specs = [ArraySpec(GROUP, a, ("probe", "example", f"{a}__unit"), self.dtype,
                                 attrs={"module": m, "pool": self.pool})
                       for m, a in zip(self.modules, names)]
        lookup = dict(model.named_modules())
        for m in self.modules:
            self._handles.append(lookup[m].register_forward_hook(self._hook(m)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def metadata(self) -> dict:
        return {"layers": [array_name(m) for m in self.modules], "modules": list(self.modules),
                "pool": self.pool, "sequence_pool": self.sequence_pool, "max_units": self.max_units, "dtype": self.dtype,
                "seed": self.seed, "kinds": list(self.kinds), "units": dict(self._info)}

    def begin_batch(self, batch: BatchContext) -> None:
        self._active = batch.kind in self.kinds
        self._captured = {}
        self._mask = batch.extras.get("attention_mask")
        self._batch_size = batch.batch_size

    def end_batch(self, batch: BatchContext) -> dict:
        if not self._active:
            return {}
        missing = [m for m in self.modules if m not in self._captured]
        if missing:
            raise RuntimeError(f"activations: layers {missing} did not run in the forward pass")
        out = {array_name(m): self._captured[m] for m in self.modules}
        self._captured, self._active = {}, False
        return out

    # -- hooks -------------------------------------------------------------------------
    def _hook(self, module_name: str):
        def hook(module, inputs, output):
            if not self._active or module_name in self._captured:
                return  # a module called twice per forward (shared ReLU): the first call counts
            if isinstance(output, (tuple, list)):
                output = output[0]
            self._captured[module_name] = self.reduce(module_name, output.detach(), module)
        return hook

    def reduce(self, module_name: str, output: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        """Pool, subsample and cast one layer's output to (B, units)."""
        if output.dim() == 3 and not isinstance(module, CHANNELS_FIRST):
            b = self._batch_size
            time_first = getattr(module, "batch_first", None) is False or (
                b is not None and output.shape[0] != b and output.shape[1] == b)
            seq = output.transpose(0, 1) if time_first else output
            flat = pool_sequence(seq, self.sequence_pool, self._mask)
        else:
            flat = pool_output(output, self.pool)
        if module_name not in self._subsets:
            self._first_seen(module_name, tuple(output.shape[1:]), flat.shape[1])
        keep = self._subsets[module_name]
        if keep is not None:
            if keep.device != flat.device:  # move once, not every batch
                keep = self._subsets[module_name] = keep.to(flat.device)
            flat = flat.index_select(1, keep)
        return flat.to(getattr(torch, self.dtype))

    def _first_seen(self, module_name: str, shape: tuple, num_units: int) -> None:
        subset = unit_subset(module_name, num_units, self.max_units, self.seed)
        self._subsets[module_name] = None if subset is None else torch.as_tensor(subset)
        units = np.arange(num_units) if subset is None else subset
        self._info[array_name(module_name)] = {"output_shape": list(shape), "pooled_units": num_units,
                                               "stored_units": int(len(units))}
        if self._recorder is not None:  # unit coordinate: index into the pooled/flattened output
            a = array_name(module_name)
            self._recorder.write_static(GROUP, f"{a}__unit", units.astype(np.int64), (f"{a}__unit",),
                                        {"module": module_name, "pool": self.pool,
                                         "output_shape": list(shape), "pooled_units": num_units})
