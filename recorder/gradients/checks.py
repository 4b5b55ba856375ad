"""The check that the hooks saw every use of every covered parameter.

Hooks only see a parameter through its module's calls. A use outside them (a module's
weight in `F.linear(h, self.emb.weight)`, a head used only functionally, a custom op)
would make the per-example values silently wrong. So on the first batch of each kind (and
every `check_every` train steps) the extension takes, before the user's backward, the
gradient of sum_i c_i loss_i (random c_i) with respect to the covered parameters (one extra
backward through the retained graph, with the capture hooks switched off), and after the
backward compares it with sum_i c_i G_i / w_i formed from the captured factors (cheap:
U^T V summed over the batch). The same comparison settles which axis is the batch for
inputs whose first two dimensions both equal B. A layer that differs becomes NaN from then on, with one warning naming
the parameter and the fix. Loss terms outside the per-example losses (an explicit L2
penalty) do not trigger it: the reference is the gradient of the per-example losses only.
"""
from __future__ import annotations

import torch

from .factors import Factored, OneHot, Patches, full_float32

#: relative tolerance of the comparison (float32 captures; reduced precision: LOW_TOL)
TOL, LOW_TOL = 1e-3, 5e-2

MISMATCH = ("{params}: the gradient autograd computes for it differs from the sum of the "
            "per-example gradients its hooks saw (relative difference {diff:.2g}), so it is used "
            "outside its module's forward (e.g. F.linear(h, module.weight), or a head used only "
            "functionally). Its values are NaN from now on. Fix: call the module itself, wrap the "
            "functional use in a module (tie it as that module's weight), or exclude it with "
            "GradientExtension(layers=[...])")


def due(ext, batch) -> bool:
    key = ext._check_kind = batch.kind
    if key not in ext._checked:
        ext._checked.add(key)
        return True
    return bool(ext.check_every) and batch.kind == "train" and batch.step_index % ext.check_every == 0


def reference(ext, losses: torch.Tensor) -> None:
    """d(sum_i c_i loss_i)/dp for the covered parameters, through the still-intact graph.
    Random weights c_i (fixed seed) make the comparison see which example a gradient was
    attributed to, not only the batch sum (c = 1 under train-mode BatchNorm, whose hooked
    values are shares of the batch gradient)."""
    params = {id(t): t for l in ext.layers if not l.broken for t in l.tensors if t.requires_grad}
    if not params:
        return
    B = losses.shape[0]
    if any(m.training for m in ext._bn):
        c = torch.ones(B)
    else:
        c = torch.rand(B, generator=torch.Generator().manual_seed(20251201)) + 0.5
    c = c.to(losses.device)
    ext._suppress, ext._active = True, False  # inactive: the fused conv backward stays out of it
    try:
        grads = torch.autograd.grad((losses * c.to(losses.dtype)).sum(), list(params.values()),
                                    retain_graph=True, allow_unused=True)
    except RuntimeError as e:  # e.g. a custom Function that frees its buffers: no retry
        ext._warn("nocheck", "could not run the check that the hooks see every use of the covered "
                  f"parameters (an extra backward through the retained graph failed: {e}); values are "
                  "exact only if no covered weight is used outside its module's forward")
        return
    finally:
        ext._suppress, ext._active = False, True
    ext._reference = ({k: g for k, g in zip(params, grads)}, c.float().reshape(-1))


def verify(ext) -> None:
    if ext._reference is None or ext._loss_grad is None:
        return
    ref, c = ext._reference
    w = ext._loss_grad.detach().float().reshape(-1)
    coupled = any(m.training for m in ext._bn)
    if bool((w == 0).any()) or (coupled and not torch.allclose(w, w[0].expand_as(w))):
        ext._checked.discard(ext._check_kind)  # try again on a later batch
        return
    inv = c.to(w.device) / w
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False), \
            torch.no_grad(), full_float32():
        for layer in ext.layers:
            if layer.broken or any(id(t) not in ref for t in layer.tensors):
                continue
            calls = [c for c in layer.calls if c[1] is not None]
            if any(c[2].get("invalid") and not c[2].get("ambiguous") for c in calls):
                continue  # already NaN in this batch, for its own reason
            grads = [ref[id(t)] if ref[id(t)] is not None else torch.zeros_like(t) for t in layer.tensors]
            want = layer.rule.layout(layer.module, layer.params, [g.float() for g in grads])
            tol = LOW_TOL if any(c[1].dtype != torch.float32 for c in calls) else TOL
            if any(c[2].get("ambiguous") for c in calls):
                _resolve(ext, layer, calls, want, inv, tol)
                continue
            diff = _diff(layer, calls, want, inv)
            if diff > tol:
                layer.broken = MISMATCH.format(params=", ".join(layer.param_names), diff=diff)
                ext._warn(layer.name, f"{layer.name}: {layer.broken}")


def _diff(layer, calls, want, inv) -> float:
    got = batch_sum(layer.rule.grad(layer.module, calls, layer.params), inv.to(want.device)) \
        if calls else torch.zeros_like(want)
    scale = max(want.norm().item(), got.norm().item())
    return (got - want).norm().item() / scale if scale > 1e-30 else 0.0


def _resolve(ext, layer, calls, want, inv, tol) -> None:
    """Calls whose batch axis is ambiguous (T == B): the weighted comparison tells which
    axis holds the examples when exactly one of the two readings matches autograd; the
    calls are then fixed in place and the module's axis is learned. Otherwise they stay NaN."""
    def reading(axis):
        out = []
        for c in calls:
            if not c[2].get("ambiguous"):
                out.append(c)
                continue
            extra = {k: v for k, v in c[2].items() if k not in ("invalid", "ambiguous")}
            x, g = (c[0], c[1]) if axis == 0 else (c[0].transpose(0, 1), c[1].transpose(0, 1))
            out.append([x, g, extra])
        return out

    fits = [axis for axis in (0, 1) if _diff(layer, reading(axis), want, inv) <= tol]
    if len(fits) != 1:
        return
    for c, fixed in zip(calls, reading(fits[0])):
        if c[2].get("ambiguous"):
            ext._batch_axes[id(c[2]["module"])] = fits[0]
            c[0], c[1], c[2] = fixed


def batch_sum(g, inv: torch.Tensor) -> torch.Tensor:
    """sum_i inv_i G_i, from the factors (never the per-example gradients, except for
    convolutions, whose per-example gradients are formed once here)."""
    if not isinstance(g, Factored):
        return (g.vec * inv[:, None]).sum(0)
    total = None
    for left, right in g.calls:
        if isinstance(right, Patches):
            part = (right.grads(slice(None)) * inv[:, None, None]).sum(0)
        else:
            v = right.dense().float() * inv[:, None, None]
            v = v.reshape(-1, v.shape[-1])
            if isinstance(left, OneHot):
                part = v.new_zeros(g.out_features, v.shape[1]).index_add_(0, left.idx.reshape(-1), v)
            else:
                part = left.dense().float().reshape(-1, g.out_features).t() @ v
        total = part if total is None else total + part
    return total
