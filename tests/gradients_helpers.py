"""Shared helpers for the gradient tests: drive GradientExtension by hand (no store) and
compute the brute-force reference with torch.func (vmap of grad) projected with the same
matrices."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from recorder.extensions import BatchContext
from recorder.gradients import GradientExtension, projection_matrices


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


def reference(model, ext, x, y, loss_fn=ce):
    """(B, layers) squared norms and (B, proj) projections from vmap per-example grads."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = dict(model.named_buffers())

    def f(p, xi, yi):
        return loss_fn(functional_call(model, (p, buffers), (xi[None],)), yi[None]).sum()

    g = vmap(grad(f), in_dims=(None, 0, 0))(params, x, y)
    meta = ext.metadata()
    sq, proj = [], []
    for info in meta["layers"]:
        parts = [g[p] for p in info["params"]]
        B = parts[0].shape[0]
        if info["form"] == "factored":
            G = torch.cat([t.reshape(B, info["matrix_shape"][0], -1) for t in parts], 2)
            sq.append(G.square().sum((1, 2)))
            if info["proj_size"]:
                m = projection_matrices(meta, info["name"])
                proj.append(torch.einsum("ko,boi,ji->bkj", m["L"], G, m["R"]).flatten(1))
        else:
            v = torch.cat([t.reshape(B, -1) for t in parts], 1)
            sq.append(v.square().sum(1))
            if info["proj_size"]:
                proj.append(v @ projection_matrices(meta, info["name"])["P"].t())
    return torch.stack(sq, 1), (torch.cat(proj, 1) if proj else None)


def rel_err(a, b):
    """Per-example relative error ||a - b|| / ||b||, worst example."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    return ((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-30)).max().item()


def check(model, x, y, loss_fn=ce, reduce="mean", tol=1e-4, **kw):
    """Record with the extension and compare norms and projections to the reference."""
    ext = GradientExtension(**kw).attach_model(model)
    cols = record(model, ext, x, y, loss_fn, reduce)
    sq_ref, proj_ref = reference(model, ext, x, y, loss_fn)
    assert rel_err(cols["grad_norm_layer"].square(), sq_ref) <= tol
    assert rel_err(cols["grad_norm"], sq_ref.sum(1).sqrt()) <= tol
    if proj_ref is not None:
        assert rel_err(cols["grad_proj"], proj_ref) <= tol
    ext.detach()
    return ext, cols
