"""Seeded random projection matrices for per-example gradient sketches.

Matrices are never stored: each is regenerated from (seed, layer name, role) with a
stable hash (zlib.crc32, not Python's salted `hash`) and a CPU `torch.Generator`, so the
same store metadata always yields the same matrices on any device. Entries are
N(0, 1/k) for a k-row matrix, which makes E[<Px, Py>] = <x, y> (an unbiased JL sketch);
for the factored sketch vec(L G R^T) with independent L, R the same holds because
E[L^T L] = I and E[R^T R] = I.
"""
from __future__ import annotations

import math
import zlib

import torch

__all__ = ["layer_seed", "gaussian_matrix", "split_dims", "allocate_dims", "projection_matrices"]


def layer_seed(seed: int, layer: str, role: str) -> int:
    """Stable 63-bit seed for one matrix of one layer ("L", "R" or "P")."""
    return (int(seed) * 1_000_003 + zlib.crc32(f"{layer}/{role}".encode())) % (2**63 - 1)


def gaussian_matrix(seed: int, layer: str, role: str, rows: int, cols: int,
                    device=None) -> torch.Tensor:
    """(rows, cols) float32 matrix with i.i.d. N(0, 1/rows) entries, generated on CPU."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(layer_seed(seed, layer, role))
    m = torch.randn(rows, cols, generator=gen, dtype=torch.float32)
    m.mul_(1.0 / math.sqrt(rows))
    return m if device is None else m.to(device)


def split_dims(dim: int, out_features: int, in_features: int) -> tuple[int, int]:
    """Factor a layer's sketch size into (k_out, k_in) with k_out * k_in <= dim.

    k_out ~ sqrt(dim) (a power of two), capped by the matrix's own sizes; the rest goes to
    k_in. Neither factor exceeds the dimension it compresses.
    """
    dim = max(1, int(dim))
    k_out = 1
    while k_out * 2 <= math.isqrt(dim):
        k_out *= 2
    k_out = max(1, min(k_out, out_features))
    k_in = max(1, min(dim // k_out, in_features))
    # give back unused room to k_out when k_in hit its cap
    k_out = max(1, min(out_features, dim // k_in))
    return k_out, k_in


def allocate_dims(names: list[str], total: int | dict | None) -> dict[str, int]:
    """Sketch size per layer: a dict passes through; an int is split equally (the
    remainder goes to the first layers); None means no projection."""
    if total is None:
        return {}
    if isinstance(total, dict):
        return {n: int(total[n]) for n in names if n in total and total[n]}
    if not names:
        return {}
    base, rem = divmod(int(total), len(names))
    return {n: base + (1 if i < rem else 0) for i, n in enumerate(names) if base or i < rem}


def projection_matrices(metadata: dict, layer: str, device=None) -> dict:
    """Rebuild a layer's matrices from the store's `extensions["gradients"]` metadata.

    Returns {"L": (k_out, out), "R": (k_in, in)} for factored layers or {"P": (k, n)} for
    vector layers; needs torch (analysis never does: it reads the stored projections)."""
    seed = metadata["projection"]["seed"]
    info = next(l for l in metadata["layers"] if l["name"] == layer)
    if not info["proj_dims"]:
        return {}
    if info["form"] == "factored":
        (k_out, k_in), (n_out, n_in) = info["proj_dims"], info["matrix_shape"]
        return {"L": gaussian_matrix(seed, layer, "L", k_out, n_out, device),
                "R": gaussian_matrix(seed, layer, "R", k_in, n_in, device)}
    return {"P": gaussian_matrix(seed, layer, "P", info["proj_dims"][0], info["matrix_shape"][0], device)}
