"""Helpers for the sequence-layer gradient tests: per-example gradients of each sequence's
loss by torch.func (vmap of grad over examples) or, for models vmap cannot trace (Hugging
Face), one autograd.grad per example, both with the extension inactive (so the modules'
own forwards run); compared with the extension per layer in each rule's own layout."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from dynascope.recorder.extensions import BatchContext
from dynascope.recorder.gradients import GradientExtension, sketch_reference


def token_loss(logits, y):
    """Per-sequence summed token loss: (B, T, V), (B, T) -> (B,)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none").view(y.shape).sum(1)


def run(model, ext, x, y, loss_fn, reduce="mean", kind="train"):
    """One recorded step through the extension; returns its float32 columns."""
    batch = BatchContext(kind, torch.arange(len(y)))
    ext.begin_batch(batch)
    losses = loss_fn(model(x), y)
    batch.losses = losses
    ext.on_losses(batch)
    (losses.mean() if reduce == "mean" else losses.sum()).backward()
    return ext.columns(batch)


def per_example(model, x, y, loss_fn, method="func"):
    """{parameter name: (B, *shape)} gradients of each example's own loss."""
    params = {k: v for k, v in model.named_parameters() if v.requires_grad}
    if method == "func":
        buffers = dict(model.named_buffers())
        detached = {k: v.detach() for k, v in params.items()}

        def f(p, xi, yi):
            return loss_fn(functional_call(model, (p, buffers), (xi[None],)), yi[None]).sum()

        return vmap(grad(f), in_dims=(None, 0, 0), randomness="same")(detached, x, y)
    losses = loss_fn(model(x), y)
    out = {k: [] for k in params}
    for i in range(len(y)):
        gs = torch.autograd.grad(losses[i], list(params.values()), retain_graph=True, allow_unused=True)
        for k, g, p in zip(params, gs, params.values()):
            out[k].append(torch.zeros_like(p) if g is None else g)
    return {k: torch.stack(v) for k, v in out.items()}


def reference(ext, grads):
    """(B, layers) squared norms, (B, K) sketch (None without one) and (B, B) Gram of the
    covered gradients, from explicit per-example gradients."""
    meta = ext.metadata()
    sq, proj, flat = [], None, []
    for layer in ext.layers:
        parts = [grads[n] for n in layer.param_names]
        B = parts[0].shape[0]
        sq.append(sum(p.reshape(B, -1).square().sum(1) for p in parts))
        G = torch.stack([layer.rule.layout(layer.module, layer.params, [p[i] for p in parts])
                         for i in range(B)])
        flat.append(G.reshape(B, -1))
        if ext.proj_total:
            s = sketch_reference(meta, layer.name, G)
            proj = s if proj is None else proj + s
    F_ = torch.cat(flat, 1).double()
    return torch.stack(sq, 1), proj, (F_ @ F_.t()).float()


def rel(a, b):
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    return ((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-30)).max().item()


def check(model, x, y, loss_fn=token_loss, method="func", tol=1e-4, ext=None, **kw):
    """Record one step and compare per-layer norms, total norms and projections."""
    ext = ext or GradientExtension(**{"gram": True, **kw}).attach_model(model)
    cols = run(model, ext, x, y, loss_fn)
    model.zero_grad()
    sq_ref, proj_ref, gram_ref = reference(ext, per_example(model, x, y, loss_fn, method))
    errs = {"layer": rel(cols["grad_norm_layer"].square(), sq_ref),
            "total": rel(cols["grad_norm"], sq_ref.sum(1).sqrt())}
    if proj_ref is not None:
        errs["proj"] = rel(cols["grad_proj"], proj_ref)
    if "grad_gram" in cols:
        g = cols["grad_gram"].double()
        errs["gram"] = ((g - gram_ref.double()).abs().max() / gram_ref.double().abs().max()).item()
    assert max(errs.values()) <= tol, errs
    return ext, cols, errs


class TinyLM(nn.Module):
    """A one-block causal transformer LM with token and arange positional embeddings: the
    sequence-run tests' model (recording, analyses, figures)."""

    def __init__(self, vocab=13, dim=8, length=7):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(length, dim)
        self.block = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x):
        t = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        return self.head(self.block(self.tok(x) + self.pos(torch.arange(t)), src_mask=mask, is_causal=True))
