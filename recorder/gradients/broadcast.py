"""Embeddings indexed by positions shared by the whole batch (`wpe(arange(T))`, HF
`position_ids` of shape (1, T)): their output has no batch dimension, so autograd delivers
only the batch sum of the output gradient, never each example's share.

The forward hook returns the output wrapped as `Broadcast`, a tensor subclass that waits
for its first real use. If that use broadcasts it against a (B, ...) operand (the usual
`tok + pos`), the operand it contributes is replaced by an explicit expansion to (B, ...)
whose gradient hook sees per-example rows: same values, same result, exact per-example
gradients. Value-preserving ops on the way (`.to`, `.contiguous`, leading size-1 dims) are
replayed on the expansion. An index vector of length B that is used without such a
broadcast is an ordinary per-example lookup. Any other use gives NaN with a warning, never
a guess: the attribution of a shared row to examples is then unknown.
"""
from __future__ import annotations

import torch

#: elementwise ops whose result is unchanged when a broadcast operand is expanded first
_ELEMENTWISE = {"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "__add__", "__radd__",
                "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
                "__truediv__", "__rtruediv__", "__itruediv__", "expand", "expand_as", "broadcast_to"}
#: value-preserving ops: replayed on the expansion
_CASTS = {"to", "contiguous", "float", "half", "bfloat16", "double", "type_as", "clone"}
#: ops that only add leading size-1 dimensions
_LEADING = {"unsqueeze", "view", "reshape", "__getitem__"}
#: ops that do not use the values in a differentiable way
_INERT = {"detach", "size", "dim", "numel", "__len__", "__repr__", "__format__", "stride",
          "is_contiguous", "element_size", "get_device", "data_ptr", "storage_offset",
          "is_floating_point", "cpu", "numpy", "tolist", "__get__", "requires_grad_"}

INVALID = ("positions shared by the batch (indices of shape (T,) or (1, T)) whose output is "
           "used other than by broadcasting it against a (B, ...) tensor, so its rows cannot be "
           "attributed to examples; add it to a (B, T, d) tensor, or index with (B, T) ids")


class _Node:
    def __init__(self, ext, feeds, idx, base, extra):
        self.ext, self.feeds, self.idx, self.base, self.extra = ext, feeds, idx, base, extra
        self.shape = tuple(base.shape)
        self.casts: list = []

    @property
    def per_example(self) -> bool:
        """A length-B index vector with no leading dims added reads as one id per example."""
        return self.idx.dim() == 1 and self.idx.shape[0] == self.ext._bsz and self.shape == tuple(self.base.shape)

    def replay(self, t):
        for func, args, kwargs in self.casts:
            t = func(t, *args, **kwargs)
        return t

    def expanded(self, out_shape):
        """The output expanded to (B, ...) with a per-example hook, or None if `out_shape`
        is not this tensor broadcast over a new (or size-1) leading batch dimension."""
        B = self.ext._bsz
        pad = (1,) * (len(out_shape) - len(self.shape)) + self.shape
        if len(pad) != len(out_shape) or pad[0] != 1 or out_shape[0] != B or tuple(pad[1:]) != tuple(out_shape[1:]):
            return None
        e = self.base.reshape(pad).expand(out_shape)
        idx = self.idx.reshape(1, -1).expand(B, -1)
        self.ext.capture(self.feeds, idx, e, dict(self.extra))
        return self.replay(e)

    def alias(self, invalid: str | None):
        e = self.base.view_as(self.base)
        idx = self.idx.reshape(self.idx.shape[0], -1) if self.idx.dim() else self.idx.reshape(1, 1)
        extra = dict(self.extra, invalid=invalid) if invalid else dict(self.extra)
        self.ext.capture(self.feeds, idx, e, extra)
        return self.replay(e)


def wrap(ext, feeds, idx, output, extra):
    t = output.as_subclass(Broadcast)
    t._node = _Node(ext, feeds, idx, output, extra)
    return t


def _name(func) -> str:
    return getattr(func, "__name__", "")


def _plain(obj, swap):
    if isinstance(obj, Broadcast):
        return swap(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(o, swap) for o in obj)
    return obj


class Broadcast(torch.Tensor):
    """See the module docstring. Every op returns plain tensors except the replayable
    value-preserving ones, so the subclass never escapes past the first real use."""

    _node: _Node

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        node = next(a._node for a in _flat(args, kwargs) if isinstance(a, Broadcast))
        name = _name(func)
        with torch._C.DisableTorchFunctionSubclass():
            if name in _INERT or not node.ext._active:
                return func(*_plain(args, lambda b: b.as_subclass(torch.Tensor)),
                            **{k: _plain(v, lambda b: b.as_subclass(torch.Tensor)) for k, v in kwargs.items()})
            self_first = isinstance(args[0], Broadcast) if args else False
            if self_first and name in _CASTS:
                out = func(args[0].as_subclass(torch.Tensor), *args[1:], **kwargs)
                return _rewrap(node, out, cast=(func, args[1:], kwargs))
            if self_first and name in _LEADING:
                out = func(args[0].as_subclass(torch.Tensor), *args[1:], **kwargs)
                if isinstance(out, torch.Tensor) and _adds_leading_ones(node.shape, tuple(out.shape)):
                    return _rewrap(node, out, shape=tuple(out.shape))
                swap = (lambda b: b._node.alias(None)) if node.per_example else (lambda b: b._node.alias(INVALID))
                return func(*_plain(args, swap), **kwargs)
            if name in _ELEMENTWISE:
                shapes = [tuple(a.shape) for a in _flat(args, kwargs) if isinstance(a, torch.Tensor)]
                if name in ("expand", "broadcast_to"):
                    shapes = [tuple(func(args[0].as_subclass(torch.Tensor), *args[1:], **kwargs).shape)]
                elif name == "expand_as":
                    shapes = [tuple(args[1].shape)]
                out_shape = torch.broadcast_shapes(*shapes)
                if node.per_example and tuple(out_shape[:len(node.shape)]) == node.shape and len(out_shape) == len(node.shape):
                    return func(*_plain(args, lambda b: b._node.alias(None)), **kwargs)
                cache = {}

                def swap(b):
                    if id(b._node) not in cache:
                        e = b._node.expanded(out_shape)
                        cache[id(b._node)] = e if e is not None else b._node.alias(
                            None if b._node.per_example else INVALID)
                    return cache[id(b._node)]
                return func(*_plain(args, swap), **{k: _plain(v, swap) for k, v in kwargs.items()})
            swap = (lambda b: b._node.alias(None if b._node.per_example else INVALID))
            return func(*_plain(args, swap), **{k: _plain(v, swap) for k, v in kwargs.items()})


def _rewrap(node, out, cast=None, shape=None):
    if not isinstance(out, torch.Tensor):
        return out
    child = _Node(node.ext, node.feeds, node.idx, node.base, node.extra)
    child.casts = node.casts + ([cast] if cast else [])
    child.shape = shape if shape is not None else node.shape
    t = out.as_subclass(Broadcast)
    t._node = child
    return t


def _adds_leading_ones(before: tuple, after: tuple) -> bool:
    k = len(after) - len(before)
    return k > 0 and after[k:] == before and all(d == 1 for d in after[:k])


def _flat(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a
