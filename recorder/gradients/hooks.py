"""The attach/hook side of GradientExtension: layer discovery, forward and output-gradient
hooks, re-expressed forwards (attention, recurrent layers), where the batch axis is, and
the first-step check that the hooks saw every use of every covered parameter.

Forward hooks keep each covered module's input; a tensor hook on the module's output keeps
the output gradient (one entry per call, so modules used several times in a forward are
summed over calls, cross terms included). A hook on the per-example losses learns the
weight w_i = dL/dloss_i that the backward gave each example.
"""
from __future__ import annotations

import fnmatch
import functools

import torch
import torch.nn as nn

from . import broadcast, checks
from .discovery import discover
from .fused import fusable, fused_forward
from .rules import TiedRule

PASS_KINDS = ("train", "probe")

AMBIGUOUS = ("the input's first two dimensions both equal the batch size ({B}), and no earlier "
             "batch showed which one is the batch (batch-first or sequence-first); values are NaN "
             "until a batch whose size differs from the sequence length shows it. Fix: record a "
             "batch with batch size != sequence length, or pass GradientExtension(batch_axis="
             "{{'{path}': 0 or 1}})")
NOT_BATCH = "input's first dimension is not the batch"
BATCHNORM = ("BatchNorm in train mode ({names}): examples are coupled through the batch "
             "statistics, so the recorded per-example gradients (of every layer below a train-mode "
             "BatchNorm) are each example's share of the batch gradient, not the gradient of its "
             "own loss alone (they sum to the batch gradient). For per-example gradients use "
             "eval-mode BatchNorm (model.eval() on those modules), GroupNorm or LayerNorm.")


def _unique_trainable(model: nn.Module):
    seen = {}
    for p in model.parameters():
        if p.requires_grad:
            seen[id(p)] = p
    return seen.values()


def _swap01(g: torch.Tensor) -> torch.Tensor:
    return g.transpose(0, 1)


class Hooks:
    """Mixin for GradientExtension (which holds the state fields)."""

    def attach_model(self, model: nn.Module):
        """Hook a model directly (used by attach, tests and benchmarks)."""
        from .extension import _Layer
        self.detach()
        if self.layer_patterns:   # a misspelt layer would otherwise record norms of 0
            from ..validation import check_patterns_match

            check_patterns_match(self.layer_patterns, [n for n, _ in model.named_modules() if n], "grad_layers")
        plan = discover(model, self.layer_patterns)
        self.excluded, self.batchnorm_modules = plan.excluded, plan.batchnorm
        self.layers = [_Layer(s.name, s.module, s.rule, s.params, s.rule.shape(s.module, s.params),
                              path=s.path) for s in plan.specs]
        by_name = {l.name: l for l in self.layers}
        self.total_trainable = sum(p.numel() for p in _unique_trainable(model))
        covered = {id(t): t for l in self.layers for t in l.tensors}
        self._covered_numel = sum(t.numel() for t in covered.values())
        self._allocate()
        self._batch_axes = {}
        modules = {id(m): p for p, m in model.named_modules()}
        for module, rule, names in plan.feeds.values():
            if not names:
                continue
            feeds = [by_name[n] for n in names]
            self._hint(module, modules.get(id(module), ""))
            self._handles.append(module.register_forward_hook(
                functools.partial(self._forward_hook, rule, feeds), with_kwargs=True))
            tied = len(feeds) > 1 or isinstance(feeds[0].rule, TiedRule)
            if self.fused and self._any_signal and not tied and fusable(module, feeds[0]):
                self._install_fused(feeds[0])
        for module, rule, names in plan.forwards:
            self._install(module, functools.partial(rule.forward, self, module,
                                                    {n: by_name[n] for n in names}, module.forward))
        self._bn = [m for p, m in model.named_modules() if p in set(self.batchnorm_modules)]
        if any(m.training for m in self._bn):
            self._warn_batchnorm()
        return self

    def _hint(self, module, path: str) -> None:
        for pattern, axis in (self.batch_axis or {}).items():
            if fnmatch.fnmatch(path, pattern):
                self._batch_axes[id(module)] = int(axis)

    def _install(self, module: nn.Module, forward) -> None:
        """An instance forward (removed by detach)."""
        module.forward = forward
        self._forwards.append((module, forward))

    def _install_fused(self, layer) -> None:
        m = layer.module
        self._install(m, functools.partial(fused_forward, self, layer, m.forward))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for m, installed in self._forwards:
            if m.__dict__.get("forward") is installed:
                del m.forward
        self._forwards = []

    # -- capture ---------------------------------------------------------------------
    def _forward_hook(self, rule, feeds, module, args, kwargs, output):
        if not self._active or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        x, extra = rule.capture_call(module, args, kwargs)
        extra = {**extra, "module": module, "rule": rule}
        axis = self._batch_axis(module, rule, x)
        if axis == "broadcast":
            return broadcast.wrap(self, feeds, x, output, extra)
        if axis == 1:
            x, extra["g_fn"] = x.transpose(0, 1), _swap01
        elif axis is None:
            path = next((l.path for l in feeds), "")
            extra["invalid"] = AMBIGUOUS.format(B=self._bsz, path=path)
            extra["ambiguous"] = True  # a check step may still resolve it (checks.py)
        elif axis != 0:
            extra["invalid"] = NOT_BATCH
        self.capture(feeds, x, output, extra)
        return None

    def capture(self, layers, x, output, extra, g_fn=None):
        """Record one call of the layers: its input now, its output gradient in backward."""
        if g_fn is not None:
            extra["g_fn"] = g_fn
        call = [x.detach(), None, extra]
        for layer in layers:
            layer.calls.append(call)
        output.register_hook(functools.partial(self._grad_hook, call))
        return call

    def _grad_hook(self, call, grad) -> None:
        if self._suppress:  # the check's own backward
            return
        if call[2].get("fused") is not None:  # a later backward: the fused values are stale
            call[2]["fused"] = None
        g = grad.detach()
        fn = call[2].get("g_fn")
        if fn is not None:
            g = fn(g)
        call[1] = g if call[1] is None else call[1] + g

    def _loss_hook(self, grad) -> None:
        if self._suppress:
            return
        g = grad.detach()
        self._loss_grad = g if self._loss_grad is None else self._loss_grad + g

    def _batch_axis(self, module, rule, x):
        """0 or 1 (which input dimension holds the examples), "broadcast" (positions shared
        by the batch), None (cannot be known yet) or "bad"."""
        B = self._bsz
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return "bad"
        if getattr(rule, "broadcastable", False) and (x.dim() == 1 or (x.shape[0] == 1 and B != 1)):
            return "broadcast"
        lead = rule.leading(module, x)
        first = x.shape[0] == B
        if lead < 2 or B == 1:
            return 0 if first else "bad"
        second = x.shape[1] == B
        if first and second:
            return self._batch_axes.get(id(module))
        if first or second:
            self._batch_axes[id(module)] = 0 if first else 1
            return 0 if first else 1
        return "bad"

    # -- batches -----------------------------------------------------------------------
    def begin_batch(self, batch) -> None:
        self._reset()
        if batch.kind in PASS_KINDS:
            self._active = True
            self._bsz = batch.batch_size
            self._checking = checks.due(self, batch)
            self._want_gram = self.gram and batch.kind == "train"
            if batch.kind == "train" and any(m.training for m in self._bn):
                self._warn_batchnorm()

    def on_losses(self, batch) -> None:
        losses = batch.losses
        if self._active and losses is not None and losses.requires_grad:
            if self._checking:
                checks.reference(self, losses)
            losses.register_hook(self._loss_hook)

    def _warn_batchnorm(self) -> None:
        names = ", ".join(p for p, m in zip(self.batchnorm_modules, self._bn) if m.training)
        self._warn("batchnorm", BATCHNORM.format(names=names or ", ".join(self.batchnorm_modules)))

    def _invalid(self, layer, calls) -> str | None:
        """Why this layer's values are NaN in this batch, or None."""
        if layer.broken:
            return layer.broken
        return next((c[2]["invalid"] for c in calls if c[2].get("invalid")), None)
