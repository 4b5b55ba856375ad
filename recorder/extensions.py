"""Extension protocol: how optional signals (gradients, parameter statistics, activations)
plug into the Recorder without the Recorder knowing about them.

An extension registers its hooks once (`attach`), declares the arrays it writes
(`specs`), and contributes per-example columns to every batch it sees. The Recorder owns
the store, the buffering and the row alignment; extensions never write to zarr directly
except through `recorder.append_row(group, values)` for row groups of their own
(e.g. `params/`, one row per step).

Registering a class in `EXTENSIONS` lets the CLI and `Recorder(extensions=[...])` build
it by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .recorder import Recorder


@dataclass(frozen=True)
class ArraySpec:
    """One array in the store: its group, name, dimension names, dtype and fill value.

    `dims[0]` is the group's row dimension (`step`, `probe`, `eval`, `snapshot`); trailing
    sizes are taken from the first data written. Arrays that do not grow go through
    `Recorder.write_static` instead.
    """

    group: str
    name: str
    dims: tuple[str, ...]
    dtype: str
    fill: Any = None
    attrs: dict = field(default_factory=dict)

    @property
    def fill_value(self):
        if self.fill is not None:
            return self.fill
        import numpy as np

        kind = np.dtype(self.dtype).kind
        if kind == "f":
            return float("nan")
        if kind in "iu":
            return -1 if kind == "i" else 0
        if kind == "b":
            return False
        return ""


@dataclass
class BatchContext:
    """What an extension sees of one batch.

    kind: "train" (inside `rec.step`), "probe" or "eval".
    losses: per-example losses *with* their autograd graph, set by `step.record` (train)
            or by the recorder's own pass (probe/eval); hook it to learn the weight
            each example's loss gets in the backward pass (1/B under `mean`).
    """

    kind: str
    example_ids: "torch.Tensor"
    targets: "torch.Tensor | None" = None
    losses: "torch.Tensor | None" = None
    logits: "torch.Tensor | None" = None
    step_index: int = 0
    extras: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.example_ids.shape[0])


class Extension:
    """Base class; override what you need. All hooks are no-ops by default."""

    #: registry name, also the key of this extension's metadata in root attrs["extensions"]
    name: str = "extension"
    #: whether probe/eval passes must run a backward pass for this extension
    needs_backward: bool = False

    def specs(self) -> list[ArraySpec]:
        """Arrays this extension writes (across all groups)."""
        return []

    def attach(self, recorder: "Recorder") -> None:
        """Register hooks on recorder.model / recorder.optimizer. Called once, on open."""

    def detach(self) -> None:
        """Remove every hook registered in attach."""

    def metadata(self) -> dict:
        """JSON-serialisable description stored in root attrs["extensions"][name]."""
        return {}

    def begin_batch(self, batch: BatchContext) -> None:
        """Called before the forward pass of a train step / probe or eval batch."""

    def on_losses(self, batch: BatchContext) -> None:
        """Called as soon as per-example losses exist (before backward)."""

    def end_batch(self, batch: BatchContext) -> dict[str, Any]:
        """Called after backward (train) or after the pass's own backward (probe/eval).

        Returns per-example columns for the batch's group: {array name: (B, ...) tensor or
        ndarray}, or per-row values for 1-D row arrays.
        """
        return {}

    def begin_pass(self, kind: str) -> None:
        """Called before the first batch of a probe or eval pass."""

    def end_pass(self, kind: str, row: int) -> dict[str, Any]:
        """Called after the last batch of a probe or eval pass (`row`: the row it becomes).

        Returns pass-wide pair arrays {name: (N, N, ...) tensor} in the order the pass's
        batches came; the Recorder sorts both example axes as it sorts the examples.
        """
        return {}

    def after_step(self, recorder: "Recorder") -> None:
        """Called when the train step context closes, after `end_batch`."""

    def close(self, recorder: "Recorder") -> None:
        """Called once before the store is finalised (flush own buffers here)."""

    def state_dict(self) -> dict:
        """State that later rows depend on (e.g. the previous step's gradients), saved in a
        driver checkpoint so a resumed run writes the same rows. Empty by default."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (after `attach`)."""


EXTENSIONS: dict[str, Callable[..., Extension]] = {}


def register_extension(name: str):
    """Class decorator: make an extension constructible by name."""

    def deco(cls):
        cls.name = name
        EXTENSIONS[name] = cls
        return cls

    return deco
