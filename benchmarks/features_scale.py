"""Memory and time of the feature-signal estimators on many samples (dask inputs).

    python benchmarks/features_scale.py [n_samples] [units]

Checks that peak memory stays near the O(p q) accumulators / O(L batch^2) minibatch Grams,
not O(n^2) or the full activation matrix.
"""
from __future__ import annotations

import resource
import sys
import time
import tracemalloc

import dask
import dask.array as da
import numpy as np

from dynascope.analysis.cka import cka, cka_matrix
from dynascope.analysis.correlation import pearson


def measure(label, fn):
    tracemalloc.start()
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    print(f"{label:<46s} {dt:7.2f} s   peak traced {peak:8.1f} MiB")
    return out


def main(n: int = 50_000, p: int = 512) -> None:
    dask.config.set(scheduler="synchronous")
    rng = da.random.default_rng(0)
    X = rng.standard_normal((n, p), chunks=(4096, p), dtype=np.float32)
    Y = (X[:, : p // 2] * 2.0 + rng.standard_normal((n, p // 2), chunks=(4096, p // 2), dtype=np.float32))
    full = n * p * 4 / 2**20
    print(f"n={n} samples, p={p} units (one layer: {full:.0f} MiB as float32; n x n float64 would be "
          f"{n * n * 8 / 2**30:.1f} GiB)")
    measure("pearson(X, Y), chunk 4096", lambda: pearson(X, Y, chunk_size=4096))
    measure("cka(X, Y) exact, feature-space sums", lambda: cka(X, Y, chunk_size=4096, max_gram_samples=0))
    measure("cka(X, Y, debiased) exact, feature-space", lambda: cka(X, Y, True, chunk_size=4096, max_gram_samples=0))
    measure("cka_matrix([X, Y, X**2], minibatch 256)",
            lambda: cka_matrix([X, Y, X ** 2], method="minibatch", batch_size=256, seed=0))
    print(f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
