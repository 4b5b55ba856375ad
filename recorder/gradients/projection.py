"""Seeded hashes of the shared CountSketch / TensorSketch of the covered gradient.

The stored sketch of an example's gradient g (all covered layers concatenated) is one
K-vector S g = sum over layers of S_l g_l. Each layer's S_l is a CountSketch with its own
independent hashes: a vector layer (n,) sends entry j to bucket h(j) with sign s(j); a
matrix layer (out, in) sends entry (o, i) to bucket (h1(o) + h2(i)) mod K with sign
s1(o) s2(i), i.e. a TensorSketch, which can be computed from the factors of G = sum u v^T
with FFTs and never needs G. E[<Sx, Sy>] = <x, y> and Var ~ (|x|^2 |y|^2 + <x, y>^2) / K,
as for a dense Gaussian JL of the same size (measured: benchmarks/sketch_fidelity.py), and
no dims are allocated per layer.

Hashes are never stored: each is regenerated from (seed, layer name, role, K) with a stable
hash (zlib.crc32, not Python's salted `hash`) and a CPU `torch.Generator`, so the same
store metadata yields the same sketch on any device.
"""
from __future__ import annotations

import math
import zlib

import torch

__all__ = ["layer_seed", "gaussian_matrix", "hashes", "layer_hashes", "sketch_reference"]


def layer_seed(seed: int, layer: str, role: str) -> int:
    """Stable 63-bit seed for one hash of one layer ("L", "R" or "P")."""
    return (int(seed) * 1_000_003 + zlib.crc32(f"{layer}/{role}".encode())) % (2**63 - 1)


def hashes(seed: int, layer: str, role: str, n: int, K: int, device=None):
    """(bucket (n,) int64 in [0, K), sign (n,) float32 +-1), generated on CPU."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(layer_seed(seed, layer, role))
    h = torch.randint(0, K, (n,), generator=gen)
    s = torch.randint(0, 2, (n,), generator=gen).float().mul_(2).sub_(1)
    return (h, s) if device is None else (h.to(device), s.to(device))


def layer_hashes(seed: int, layer: str, form: str, shape, K: int, device=None) -> tuple:
    """(h1, s1, h2, s2) of a factored (out, in) layer, (h, s) of a vector (n,) layer."""
    if form == "factored":
        return (*hashes(seed, layer, "L", shape[0], K, device), *hashes(seed, layer, "R", shape[1], K, device))
    return hashes(seed, layer, "P", shape[0], K, device)


def gaussian_matrix(seed: int, layer: str, role: str, rows: int, cols: int, device=None) -> torch.Tensor:
    """(rows, cols) i.i.d. N(0, 1/rows): the dense JL that benchmarks compare the sketch to."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(layer_seed(seed, layer, role))
    m = torch.randn(rows, cols, generator=gen, dtype=torch.float32).mul_(1.0 / math.sqrt(rows))
    return m if device is None else m.to(device)


def sketch_reference(metadata: dict, layer: str, grads: torch.Tensor) -> torch.Tensor:
    """The layer's sketch (B, K) of explicit per-example gradients, (B, out, in) or (B, n),
    by scattering every entry into its bucket: the slow, obvious definition that the
    factored computations must reproduce (tests) and that any reader can re-derive."""
    proj = metadata["projection"]
    info = next(l for l in metadata["layers"] if l["name"] == layer)
    K = proj["dim"]
    hs = layer_hashes(proj["seed"], layer, info["form"], info["matrix_shape"], K, grads.device)
    B = grads.shape[0]
    if info["form"] == "factored":
        h1, s1, h2, s2 = hs
        idx = ((h1[:, None] + h2[None, :]) % K).reshape(-1)
        sign = (s1[:, None] * s2[None, :]).reshape(-1)
    else:
        idx, sign = hs
    flat = grads.reshape(B, -1).float() * sign
    return torch.zeros(B, K, dtype=flat.dtype, device=flat.device).index_add_(1, idx, flat)
