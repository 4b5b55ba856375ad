"""Fused convolution backward: per-example weight gradients computed once, summed into the
weight gradient, so exact conv norms do not repeat autograd's own weight-gradient work.

With exact norms, a convolution's per-example gradients (one grouped `conv2d_weight` per
16 examples) cost about as much as the layer's ordinary weight gradient, which autograd
would compute anyway. While the extension is attached, a covered Conv1d/Conv2d runs its
forward through `FusedConv`, whose backward returns grad_input as usual, forms the
per-example gradients once, takes the norms (and projections) from them, and returns their
sum as grad_weight (and grad_bias). `weight.grad` still arrives through autograd, so
parameter hooks, accumulation and optimizers are untouched.

Anything unusual falls back to the ordinary conv backward (the hooks' captured input and
output gradient then feed the rule as before): a module called more than once in the
batch, a second backward through the same call, create_graph, non-float32 tensors,
shapes where the rule would pick the ghost form, or a batch-dimension mismatch. The
forward runs the same `F.conv*d` call as the module, so outputs are identical.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .factors import Patches, full_float32, grouped_chunks
from .gram import DirectSignals
from .sketch import sketch_flat


def fusable(module, layer) -> bool:
    """Plain Conv1d/Conv2d (forward not overridden, by a subclass or on the instance) with a
    covered weight and no "same" padding: FusedConv then computes exactly their forward."""
    if type(module).forward not in (torch.nn.Conv1d.forward, torch.nn.Conv2d.forward):
        return False
    if "forward" in module.__dict__ or module.groups != 1 or "weight" not in layer.params:
        return False
    return not (isinstance(module.padding, str) and module.padding == "same")


def fused_forward(ext, layer, original, x, *args, **kwargs):
    """Instance forward installed by the extension: FusedConv while a batch is recorded and
    the weight trains; the module's own forward otherwise."""
    m = layer.module
    w, b = m.weight, m.bias
    if (args or kwargs or not ext._active or not torch.is_grad_enabled() or not w.requires_grad
            or not isinstance(x, torch.Tensor) or x.shape[0] != ext._bsz or x.dim() != m.weight.dim()
            or _autocast_on(x)):
        return original(x, *args, **kwargs)
    if m.padding_mode != "zeros":
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
        pad = (0,) * (w.dim() - 2)
    else:
        pad = (0,) * (w.dim() - 2) if isinstance(m.padding, str) else tuple(m.padding)
    state = (ext, layer, ext._generation, len(layer.calls), pad)
    return FusedConv.apply(x, w, b if b is not None else None, state)


def _autocast_on(x) -> bool:
    return torch.is_autocast_enabled(x.device.type)


class FusedConv(torch.autograd.Function):
    """conv(x, w, b) whose backward forms per-example weight gradients once (see module)."""

    @staticmethod
    def forward(ctx, x, weight, bias, state):
        ext, layer, _, _, pad = state
        m = layer.module
        conv = F.conv1d if weight.dim() == 3 else F.conv2d
        ctx.state = state
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return conv(x, weight, bias, m.stride, pad, m.dilation, 1)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        ext, layer, gen, index, pad = ctx.state
        m = layer.module
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        one_d = weight.dim() == 3
        call = layer.calls[index] if gen == ext._generation and index < len(layer.calls) else None
        fuse = (need_w and call is not None and len(layer.calls) == 1 and ext._active
                and not torch.is_grad_enabled() and "fused" not in call[2]
                and grad_out.dtype == x.dtype == weight.dtype == torch.float32)
        if call is not None and "fused" in call[2]:
            call[2]["fused"] = None  # second backward through this call: the rule redoes it
        if fuse:
            T = grad_out[0, 0].numel()
            out, n_in = layer.shape
            fuse = T * (out + n_in) >= out * n_in  # else the rule's ghost form is cheaper
        mask = [need_x, need_w and not fuse, need_b and not fuse]
        gx = gw = gb = None
        if any(mask):
            gx, gw, gb = torch.ops.aten.convolution_backward(
                grad_out, x, weight, [weight.shape[0]] if ctx.has_bias else None, m.stride, pad,
                m.dilation, False, [0] * (weight.dim() - 2), 1, mask)
        if not fuse:
            return gx, gw, gb, None
        gw, gb = _per_example(ext, layer, call, x, grad_out, weight, pad, one_d, ctx.has_bias)
        return gx, gw, (gb if need_b else None), None


def _per_example(ext, layer, call, x, g, weight, pad, one_d, has_bias):
    """Per-example gradients in chunks: squared norms, sketch and Gram stored on the call,
    their sums returned as (grad_weight, grad_bias)."""
    m = layer.module
    with_bias = "bias" in layer.params
    if one_d:
        x, g = x.unsqueeze(2), g.unsqueeze(2)
        kernel, stride, dil, pad = ((1,) + tuple(m.kernel_size), (1,) + tuple(m.stride),
                                    (1,) + tuple(m.dilation), (0,) + tuple(pad))
    else:
        kernel, stride, dil = tuple(m.kernel_size), tuple(m.stride), tuple(m.dilation)
    with torch.no_grad(), full_float32():
        patches = Patches(x, g, kernel, stride, dil, pad, True, with_bias, None)
        sketch = None
        if ext.proj_total:
            hs, cache = ext._hashes(layer, g.device)
            sketch = lambda f: sketch_flat(f, hs, ext.proj_total, cache)  # noqa: E731
        n = weight[0].numel()
        direct = DirectSignals(patches.grad_parts, x.shape[0], *layer.shape, keep_flat=ext._probe_collect,
                               chunks=grouped_chunks)
        sq, proj, gram, total = direct.run(sketch, ext._want_gram, want_sum=True)
        call[2]["fused"] = (sq, proj, gram)
        if ext._probe_collect:  # the probe pass's Gram pairs these with other batches later
            call[2]["fused_flat"] = direct.kept
        gw = total[:, :n].reshape(weight.shape)
        if not has_bias:
            return gw, None
        return gw, (total[:, n] if with_bias else g.sum((0, 2, 3)))
