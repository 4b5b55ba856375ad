"""Benchmark: blockwise most-negative-pair search vs the dense-product floor.

N x D random gradients (float16 or float32) with planted opposing pairs. The floor is
G @ G.T computed blockwise with the same block size and discarded (one full N x N product
would need N^2 * 4 bytes = 10 GB at N = 50,000). Reports time / floor and peak memory
(tracemalloc: numpy allocations; ru_maxrss: whole process).

    python benchmarks/opposing_pairs.py --n 50000 --d 1024 --dtype float16 --block 4096
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dynascope.analysis.opposing.topk import most_negative_pairs, unit_rows  # noqa: E402


def make_data(n: int, d: int, dtype, pairs: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    G = np.empty((n, d), dtype=dtype)
    for s in range(0, n, 8192):  # generate in chunks: no float64 N x D temporary
        G[s:s + 8192] = rng.standard_normal((min(8192, n - s), d), dtype=np.float32)
    idx = rng.permutation(n)[: 2 * pairs].reshape(pairs, 2)
    noise = 0.3 * rng.standard_normal((pairs, d), dtype=np.float32)
    G[idx[:, 1]] = (-G[idx[:, 0]].astype(np.float32) + noise).astype(dtype)
    return G, idx


def floor_product(G, block: int) -> float:
    """Blockwise dense G @ G.T on unit rows (same normalisation and block as the search)."""
    t = time.perf_counter()
    U, _ = unit_rows(G)
    n = len(U)
    buf = np.empty((block, block), dtype=np.float32)
    for i in range(0, n, block):
        for j in range(0, n, block):
            a, b = U[i:i + block], U[j:j + block]
            np.matmul(a, b.T, out=buf[: len(a), : len(b)])
    return time.perf_counter() - t


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--block", type=int, default=4096)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--threshold", type=float, default=-0.5)
    p.add_argument("--pairs", type=int, default=100)
    a = p.parse_args(argv)
    G, idx = make_data(a.n, a.d, np.dtype(a.dtype), a.pairs)
    data_mb = G.nbytes / 2**20
    floor = floor_product(G, a.block)
    tracemalloc.start()
    t = time.perf_counter()
    res = most_negative_pairs(G, k=a.k, block=a.block, threshold=a.threshold)
    took = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    found = set(zip(res.a.tolist(), res.b.tolist()))
    recall = np.mean([(min(x, y), max(x, y)) in found for x, y in idx])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"N={a.n} D={a.d} dtype={a.dtype} block={a.block} k={a.k} threshold={a.threshold}")
    print(f"input {data_mb:.0f} MB; pairs found {len(res)}; planted pairs recovered {recall:.0%}")
    print(f"search {took:.1f} s; floor (blockwise G@G.T) {floor:.1f} s; ratio {took / floor:.2f}x")
    print(f"peak traced memory during search {peak / 2**20:.0f} MB; process max RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
