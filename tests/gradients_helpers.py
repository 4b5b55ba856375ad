"""Shared helpers for the gradient tests: drive GradientExtension by hand (no store) and
compute the brute-force reference with torch.func (vmap of grad), sketched by scattering
every entry of the explicit per-example gradients (projection.sketch_reference)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from dynascope.recorder.extensions import BatchContext
from dynascope.recorder.gradients import GradientExtension, sketch_reference


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def record(model, ext, x, y, loss_fn=ce, reduce="mean", weights=None, kind="train"):
    """One hooked step; returns float32 columns. reduce: mean | sum | weights (custom w)."""
    B = len(y)
    batch = BatchContext(kind, torch.arange(B))
    ext.begin_batch(batch)
    losses = loss_fn(model(x), y)
    batch.losses = losses
    ext.on_losses(batch)
    if reduce == "mean":
        losses.mean().backward()
    elif reduce == "sum":
        losses.sum().backward()
    else:
        (losses * weights).sum().backward()
    return ext.columns(batch)


def per_example_grads(model, x, y, loss_fn=ce):
    """{parameter name: (B, *shape)} per-example gradients of each example's own loss."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = dict(model.named_buffers())

    def f(p, xi, yi):
        return loss_fn(functional_call(model, (p, buffers), (xi[None],)), yi[None]).sum()

    return vmap(grad(f), in_dims=(None, 0, 0))(params, x, y)


def layer_grads(meta, g):
    """[(layer info, (B, out, in) or (B, n) explicit gradient)] in metadata order."""
    out = []
    for info in meta["layers"]:
        parts = [g[p] for p in info["params"]]
        B = parts[0].shape[0]
        if info["form"] == "factored":
            out.append((info, torch.cat([t.reshape(B, info["matrix_shape"][0], -1) for t in parts], 2)))
        else:
            out.append((info, torch.cat([t.reshape(B, -1) for t in parts], 1)))
    return out


def reference(model, ext, x, y, loss_fn=ce, with_gram=False):
    """(B, layers) squared norms and (B, K) sketch (None without one) from vmap per-example
    grads; with_gram adds the (B, B) Gram of the covered flat gradients."""
    meta = ext.metadata()
    layers = layer_grads(meta, per_example_grads(model, x, y, loss_fn))
    sq = torch.stack([G.reshape(G.shape[0], -1).square().sum(1) for _, G in layers], 1)
    proj = None
    if meta["projection"]["dim"]:
        proj = sum(sketch_reference(meta, info["name"], G) for info, G in layers)
    if not with_gram:
        return sq, proj
    flat = torch.cat([G.reshape(G.shape[0], -1) for _, G in layers], 1).double()
    return sq, proj, (flat @ flat.t()).float()


def rel_err(a, b):
    """Per-example relative error ||a - b|| / ||b||, worst example."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    return ((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-30)).max().item()


def gram_rel_err(a, b):
    """max |a - b| / max |b| over the Gram (entries near 0 have no relative scale)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def check(model, x, y, loss_fn=ce, reduce="mean", tol=1e-4, gram=True, **kw):
    """Record with the extension and compare norms, sketch and Gram to the reference."""
    ext = GradientExtension(gram=gram, **kw).attach_model(model)
    cols = record(model, ext, x, y, loss_fn, reduce)
    sq_ref, proj_ref, gram_ref = reference(model, ext, x, y, loss_fn, with_gram=True)
    assert rel_err(cols["grad_norm_layer"].square(), sq_ref) <= tol
    assert rel_err(cols["grad_norm"], sq_ref.sum(1).sqrt()) <= tol
    if proj_ref is not None:
        assert rel_err(cols["grad_proj"], proj_ref) <= tol
    if gram:
        assert gram_rel_err(cols["grad_gram"], gram_ref) <= tol
    ext.detach()
    return ext, cols
