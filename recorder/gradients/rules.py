"""Per-layer-type rules: how to turn a module's captured inputs and output gradients into
per-example gradients in factored or vector form (see factors.py).

A registry keyed by module type (looked up along the MRO, like Opacus'
`register_grad_sampler`) rather than if-chains: adding a layer type is one decorated class.
Each rule sees one batch's list of calls `(input, grad_output, extra)` of one module and
covers the module's *trainable* `weight` / `bias` only.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .factors import Dense, Factored, OneHot, Patches, Vector

RULES: dict[type, "Rule"] = {}


def register_rule(*types):
    """Class decorator: the rule handles these module types (and their subclasses)."""

    def deco(cls):
        for t in types:
            RULES[t] = cls()
        return cls

    return deco


#: rules for classes of optional libraries, matched by (module, qualname) so that the
#: library is never imported by us (HF transformers' Conv1D)
NAMED_RULES: dict[tuple[str, str], "Rule"] = {}


def find_rule(module: nn.Module) -> "Rule | None":
    for t in type(module).__mro__:
        if t in RULES:
            return RULES[t]
        named = NAMED_RULES.get((t.__module__, t.__qualname__))
        if named is not None:
            return named
    return None


class Rule:
    #: "factored" (matrix gradient, sketched as L G R^T) or "vector" (sketched as P g)
    form = "factored"

    def unsupported(self, module) -> str | None:
        """Reason this module instance cannot be handled, or None."""
        return None

    def params(self, module) -> list[str]:
        """Local names of the trainable parameters covered, in layout order."""
        return [n for n in ("weight", "bias")
                if getattr(module, n, None) is not None and getattr(module, n).requires_grad]

    def shape(self, module, params: list[str]) -> tuple[int, ...]:
        raise NotImplementedError

    def capture(self, module, x: torch.Tensor) -> dict:
        """State needed later that may change before backward (e.g. running stats)."""
        return {}

    def capture_call(self, module, args: tuple, kwargs: dict):
        """(the input the rule needs, captured state) from a forward call's arguments."""
        x = args[0] if args else next(iter(kwargs.values()))
        return x, self.capture(module, x)

    def leading(self, module, x: torch.Tensor) -> int:
        """Dimensions of the input before the feature dimensions. With two or more, the
        batch may be the second one (sequence-first layouts); see extension._batch_axis."""
        return 1

    def layout(self, module, params: list[str], grads: list) -> torch.Tensor:
        """The parameters' (batch) gradients laid out as this rule's matrix or vector."""
        if self.form == "vector":
            return torch.cat([g.reshape(-1) for g in grads])
        out = self.shape(module, params)[0]
        return torch.cat([g.reshape(out, -1) for g in grads], 1)

    def grad(self, module, calls: list, params: list[str]):
        raise NotImplementedError


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, *, n) -> (B, T, n) float32."""
    return t.reshape(t.shape[0], -1, t.shape[-1]).float()


@register_rule(nn.Linear)
class LinearRule(Rule):
    def leading(self, module, x):
        return x.dim() - 1

    def shape(self, module, params):
        return (module.out_features, module.in_features * ("weight" in params) + ("bias" in params))

    def grad(self, module, calls, params):
        pairs = []
        for x, g, _ in calls:
            a = _rows(x)
            parts = [a] if "weight" in params else []
            if "bias" in params:
                parts.append(a.new_ones(a.shape[0], a.shape[1], 1))
            pairs.append((Dense(_rows(g)), Dense(torch.cat(parts, 2) if len(parts) > 1 else parts[0])))
        return Factored(pairs, *self.shape(module, params))


@register_rule(nn.Conv1d, nn.Conv2d)
class ConvRule(Rule):
    """Conv1d is handled as a Conv2d with a height-1 kernel."""

    def unsupported(self, module):
        if module.groups != 1:
            return "grouped convolution (groups > 1) not supported"
        return None

    def shape(self, module, params):
        k = math.prod(module.kernel_size) * module.in_channels
        return (module.out_channels, k * ("weight" in params) + ("bias" in params))

    @staticmethod
    def _geometry(module, x):
        one_d = x.dim() == 3
        expand = (lambda v: (1, v[0])) if one_d else (lambda v: tuple(v))
        kernel, stride, dil = expand(module.kernel_size), expand(module.stride), expand(module.dilation)
        if module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            pad = (0,) * len(module.kernel_size)
        elif isinstance(module.padding, str):
            if module.padding == "valid":
                pad = (0,) * len(module.kernel_size)
            else:  # "same": torch puts the odd extra pixel at the end
                pads = []
                for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
                    total = d * (k - 1)
                    pads += [total // 2, total - total // 2]
                x = F.pad(x, pads)
                pad = (0,) * len(module.kernel_size)
        else:
            pad = module.padding
        pad = (0, pad[0]) if one_d else tuple(pad)
        if one_d:
            x = x.unsqueeze(2)
        return x, kernel, stride, dil, pad

    def grad(self, module, calls, params):
        pairs = []
        for x, g, _ in calls:
            x, kernel, stride, dil, pad = self._geometry(module, x.float())

            def conv(t, w, b, stride=stride, dil=dil, pad=pad):
                return F.conv2d(t, w, b, stride=stride, padding=pad, dilation=dil)

            g = g.float()
            if g.dim() == 3:
                g = g.unsqueeze(2)
            u = g.flatten(2).transpose(1, 2)  # (B, T, out) view of (B, out, T)
            right = Patches(x, g, kernel, stride, dil, pad, "weight" in params, "bias" in params, conv)
            pairs.append((Dense(u), right))
        return Factored(pairs, *self.shape(module, params))


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    def unsupported(self, module):
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq couples examples"
        return None

    #: outputs of (T,) or (1, T) indices may be broadcast over the batch (positions)
    broadcastable = True

    def params(self, module):
        return ["weight"] if module.weight.requires_grad else []

    def leading(self, module, x):
        return x.dim()

    def shape(self, module, params):
        return (module.num_embeddings, module.embedding_dim)

    def grad(self, module, calls, params):
        pairs = []
        for idx, g, _ in calls:
            idx = idx.reshape(idx.shape[0], -1)
            g = _rows(g)
            if module.padding_idx is not None:  # torch gives the padding row no gradient
                g = g * (idx != module.padding_idx).unsqueeze(-1)
            pairs.append((OneHot(idx, module.num_embeddings), Dense(g)))
        return Factored(pairs, *self.shape(module, params))


class _AffineRule(Rule):
    """Normalisation layers: per-example affine gradients are small exact vectors,
    weight_i = sum over non-channel positions of g * x_hat, bias_i = sum of g."""

    form = "vector"

    def shape(self, module, params):
        return (sum(getattr(module, p).numel() for p in params),)

    def normalized(self, module, x, extra) -> torch.Tensor:
        raise NotImplementedError

    def reduce_dims(self, module, g) -> tuple[int, ...]:
        raise NotImplementedError

    def grad(self, module, calls, params):
        total = None
        for x, g, extra in calls:
            g = g.float()
            dims = self.reduce_dims(module, g)
            parts = []
            if "weight" in params:
                parts.append(_sum_product(g, self.normalized(module, x.float(), extra), dims))
            if "bias" in params:
                parts.append(_sum(g, dims))
            v = torch.cat(parts, 1)
            total = v if total is None else total + v
        return Vector(total)


#: positions per (example, channel) from which a batched dot product beats multiply-then-sum
#: on CPU (BatchNorm at 32x32: 4.6 vs 10.8 ms per 32 x 64 channels, one thread)
DOT_POSITIONS = 256


def _trailing(t: torch.Tensor, dims: tuple) -> bool:
    return bool(dims) and dims == tuple(range(t.dim() - len(dims), t.dim())) and t.is_contiguous()


def _sum(g: torch.Tensor, dims: tuple) -> torch.Tensor:
    """(B, rest) sums of g over `dims` (a flattened last axis sums faster than two axes)."""
    if _trailing(g, dims):
        return g.reshape(*g.shape[:g.dim() - len(dims)], -1).sum(-1).flatten(1)
    return (g.sum(dims) if dims else g).flatten(1)  # sum(()) would sum all


def _sum_product(g: torch.Tensor, h: torch.Tensor, dims: tuple) -> torch.Tensor:
    """(B, rest) sums of g * h over `dims`; for long trailing runs one batched dot product,
    which never writes the g * h temporary."""
    if _trailing(g, dims) and h.is_contiguous() and h.shape == g.shape:
        lead = g.shape[:g.dim() - len(dims)]
        T = math.prod(g.shape[len(lead):])
        if T >= DOT_POSITIONS:
            n = math.prod(lead)
            return torch.bmm(h.reshape(n, 1, T), g.reshape(n, T, 1)).view(*lead).flatten(1)
    return _sum(g * h, dims)


@register_rule(nn.modules.batchnorm._BatchNorm)
class BatchNormRule(_AffineRule):
    """In train mode x_hat uses batch statistics, so examples are coupled: the vectors are
    each example's share of the batch gradient, as the hooks see it (flagged in metadata)."""

    def capture(self, module, x):
        batch_stats = module.training or module.running_mean is None
        if batch_stats:
            return {"batch_stats": True}
        return {"batch_stats": False, "mean": module.running_mean.detach().clone(),
                "var": module.running_var.detach().clone()}

    def reduce_dims(self, module, g):
        return tuple(d for d in range(g.dim()) if d not in (0, 1))

    def normalized(self, module, x, extra):
        if extra["batch_stats"]:
            return F.batch_norm(x, None, None, training=True, momentum=0.0, eps=module.eps)
        return F.batch_norm(x, extra["mean"].float(), extra["var"].float(), training=False,
                            eps=module.eps)


@register_rule(nn.LayerNorm)
class LayerNormRule(_AffineRule):
    def leading(self, module, x):
        return x.dim() - len(module.normalized_shape)

    def reduce_dims(self, module, g):
        return tuple(range(1, g.dim() - len(module.normalized_shape)))

    def normalized(self, module, x, extra):
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)


@register_rule(nn.GroupNorm)
class GroupNormRule(_AffineRule):
    def reduce_dims(self, module, g):
        return tuple(range(2, g.dim()))

    def normalized(self, module, x, extra):
        return F.group_norm(x, module.num_groups, eps=module.eps)


if hasattr(nn, "RMSNorm"):
    @register_rule(nn.RMSNorm)
    class RMSNormRule(LayerNormRule):
        def normalized(self, module, x, extra):
            return F.rms_norm(x, module.normalized_shape, None, module.eps)


class HFConv1DRule(LinearRule):
    """Hugging Face `transformers.pytorch_utils.Conv1D`: y = x W + b with W of shape
    (in, out), i.e. a Linear with a transposed weight. Laid out as (out, in [+1])."""

    def shape(self, module, params):
        n_in, n_out = module.weight.shape
        return (n_out, n_in * ("weight" in params) + ("bias" in params))

    def layout(self, module, params, grads):
        return torch.cat([g.t() if n == "weight" else g.reshape(-1, 1) for n, g in zip(params, grads)], 1)


NAMED_RULES[("transformers.pytorch_utils", "Conv1D")] = HFConv1DRule()


@register_rule(nn.EmbeddingBag)
class EmbeddingBagRule(Rule):
    """One bag per example: G_i = sum over the bag's entries n of c_in e_{idx_in} g_i^T, with
    c = per_sample_weights (sum), 1/bag size (mean, padding entries not counted) or 1."""

    def unsupported(self, module):
        if module.mode == "max":
            return ("EmbeddingBag(mode='max'): each output dimension takes its gradient from a "
                    "different entry, which is not a product of factors; use mode='sum' or 'mean'")
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq couples examples"
        return None

    def params(self, module):
        return ["weight"] if module.weight.requires_grad else []

    def shape(self, module, params):
        return (module.num_embeddings, module.embedding_dim)

    def capture_call(self, module, args, kwargs):
        names = ("input", "offsets", "per_sample_weights")
        got = dict(zip(names, args), **kwargs)
        idx, offsets, psw = got["input"], got.get("offsets"), got.get("per_sample_weights")
        if idx.dim() == 1:  # flat entries + offsets: pad to (bags, longest bag)
            ends = offsets[1:] if module.include_last_offset else torch.cat(
                [offsets[1:], offsets.new_tensor([idx.numel()])])
            starts = offsets[:len(ends)]
            size = ends - starts
            width = int(size.max()) if len(size) else 0
            pos = starts[:, None] + torch.arange(width, device=idx.device)
            valid = torch.arange(width, device=idx.device) < size[:, None]
            pos = torch.where(valid, pos, torch.zeros_like(pos))
            flat_w = psw if psw is not None else None
            idx, psw = idx[pos] * valid, (flat_w[pos] * valid if flat_w is not None else None)
        else:
            valid = torch.ones_like(idx, dtype=torch.bool)
        if module.padding_idx is not None:
            valid = valid & (idx != module.padding_idx)
        c = valid.to(torch.float32) if psw is None else psw.detach().float() * valid
        if module.mode == "mean":
            c = c / valid.sum(1, keepdim=True).clamp_min(1)
        return idx, {"coef": c}

    def grad(self, module, calls, params):
        pairs = []
        for idx, g, extra in calls:
            right = extra["coef"][:, :, None] * g.float()[:, None, :]
            pairs.append((OneHot(idx, module.num_embeddings), Dense(right)))
        return Factored(pairs, *self.shape(module, params))


class TiedRule(Rule):
    """One parameter used by several modules (tied input/output embeddings): the calls of
    every user, each turned into factors by its own module's rule, are summed as one
    layer's calls, so cross terms between the uses are included."""

    def __init__(self, local: str, first_rule: Rule, first_module):
        self.local, self.first_rule, self.first_module = local, first_rule, first_module
        self.form = first_rule.form

    def shape(self, module, params):
        return self.first_rule.shape(self.first_module, [self.local])

    def layout(self, module, params, grads):
        return self.first_rule.layout(self.first_module, [self.local], grads)

    def grad(self, module, calls, params):
        by_module: dict[int, list] = {}
        for c in calls:
            by_module.setdefault(id(c[2]["module"]), []).append(c)
        parts = [group[0][2]["rule"].grad(group[0][2]["module"], group, [self.local])
                 for group in by_module.values()]
        if self.form == "vector":
            return Vector(sum(p.vec for p in parts))
        return Factored([pair for p in parts for pair in p.calls], *self.shape(module, params))
