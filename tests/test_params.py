"""The params extension's statistics against brute-force numpy on crafted gradients."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dynascope.recorder.params import ParamStats, bin_bounds, hist_edges

torch.set_num_threads(1)


def _ref_bins(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    a = np.abs(x.astype(np.float32))
    b = np.where(a == 0, 0, np.searchsorted(edges, a, side="right") + 1)
    return np.where(np.isnan(a), len(edges) + 1, b)


def _crafted(rng, n, edges):
    """Values on, just below and just above every edge, zeros, tiny and huge values, random."""
    pick = rng.choice(edges, n)
    kind = rng.integers(0, 5, n)
    x = np.where(kind == 0, pick, np.where(kind == 1, np.nextafter(pick, np.float32(0)),
                 np.where(kind == 2, np.nextafter(pick, np.float32(np.inf)),
                          np.where(kind == 3, 0.0, 10 ** rng.uniform(-14, 3, n)))))
    x = x.astype(np.float32) * rng.choice(np.float32([-1, 1]), n)
    x[:3] = np.float32([1e-45, 3e5, -0.0])[:min(3, n)]
    return x


def test_edges_hold_common_thresholds_exactly():
    e = hist_edges()
    for eps in (1e-12, 1e-8, 1e-7, 1e-6, 5e-6, 1e-5, 2e-5, 1e-3, 0.01, 1.0, 100.0):
        assert np.float32(eps) in e
    lower, upper = bin_bounds(e)
    assert len(lower) == len(upper) == len(e) + 2
    assert lower[0] == upper[0] == 0 and upper[-1] == np.inf


def test_bins_match_searchsorted_everywhere():
    e = hist_edges()
    x = _crafted(np.random.default_rng(0), 100_000, e)
    x = np.concatenate([x, np.float32([np.inf, -np.inf, np.nan])])
    p = torch.nn.Parameter(torch.zeros(len(x)))
    s = ParamStats(["x"], [p], e)
    got = s.bins(torch.from_numpy(np.abs(x))).numpy().astype(np.int64)
    np.testing.assert_array_equal(got, _ref_bins(x, e))


@pytest.mark.parametrize("block, scatter", [(1 << 22, False), (1, False), (60, False), (60, True)])
def test_capture_matches_brute_force_over_steps(block, scatter):
    """Every block layout (one block, one per tensor, mixed) and both histogram paths."""
    rng = np.random.default_rng(1)
    e = hist_edges()
    shapes = [(7, 3, 2, 2), (7,), (5, 11), ()]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    s = ParamStats(["conv.w", "conv.b", "fc.w", "scalar"], params, e, scatter=scatter, block=block)
    prev_g = prev_w = None
    for t in range(4):
        gs, ws = [], []
        for p in params:
            g = _crafted(rng, p.numel(), e).reshape(p.shape)
            if p.dim() >= 1 and t >= 1:
                g[1] = 0.0                           # unit 1 of every tensor has zero gradient
            w = rng.normal(size=p.shape).astype(np.float32)
            p.grad = torch.from_numpy(g.copy())
            with torch.no_grad():
                p.copy_(torch.from_numpy(w))
            gs.append(g.reshape(-1))
            ws.append(w.reshape(-1))
        row = {k: v.numpy() for k, v in s.capture().items()}
        for i, (g, w) in enumerate(zip(gs, ws)):
            ref = np.bincount(_ref_bins(g, e), minlength=len(e) + 2)
            np.testing.assert_array_equal(row["grad_hist"][i], ref)
            assert row["grad_norm"][i] == pytest.approx(np.linalg.norm(g.astype(np.float64)), rel=1e-5)
            units = params[i].shape[0] if params[i].dim() else 1
            zero = ~np.any(g.reshape(units, -1) != 0, axis=1)
            off = sum(q.shape[0] if q.dim() else 1 for q in params[:i])
            np.testing.assert_array_equal(row["unit_zero"][off:off + units], zero)
            if t == 0:
                continue
            gp, wp = prev_g[i], prev_w[i]
            flips = int(np.sum((np.sign(g) * np.sign(gp)) < 0))
            assert row["sign_flips"][i] == flips
            rel = [int(np.sum((np.abs(gp) < ek) & (np.abs(g) >= ek))) for ek in e]
            np.testing.assert_array_equal(row["released"][i], rel)
            dw, dg = (w - wp).astype(np.float64), (g - gp).astype(np.float64)
            assert row["weight_diff_norm"][i] == pytest.approx(np.linalg.norm(dw), rel=1e-5)
            assert row["secant_dot"][i] == pytest.approx(np.dot(dg, dw), rel=1e-3, abs=1e-3)
        if t == 0:
            assert "sign_flips" not in row and "released" not in row
        prev_g, prev_w = gs, ws


@pytest.mark.parametrize("block", [1 << 22, 1000])
def test_captured_histogram_is_the_exact_at_edge_histogram(block):
    """The lookup-table bins inside capture() (scratch buffers, blocks) give the histogram
    of comparisons against every edge: values on and next to every edge, zeros of both
    signs, subnormals, the largest floats, +-inf and NaN (last bin)."""
    e = hist_edges()
    rng = np.random.default_rng(3)
    special = np.float32([0.0, -0.0, 1e-45, -1e-45, 1e-40, 1.1754942e-38, 1.1754944e-38,
                          3.4028235e38, np.inf, -np.inf, np.nan, -np.nan])
    x = np.concatenate([_crafted(rng, 30_000, e), special, np.nextafter(e, np.float32(0)), e, -e])
    parts = np.array_split(rng.permutation(x), 3)
    params = [torch.nn.Parameter(torch.zeros(len(q))) for q in parts]
    for p, q in zip(params, parts):
        p.grad = torch.from_numpy(q.copy())
    row = ParamStats(["a", "b", "c"], params, e, block=block).capture()
    for i, q in enumerate(parts):
        a = np.abs(q.astype(np.float64))
        ref = np.zeros(len(e) + 2, np.int64)
        ref[0] = np.sum(a == 0)
        ref[1] = np.sum((a > 0) & (a < e[0]))
        for k in range(1, len(e)):
            ref[k + 1] = np.sum((a >= e[k - 1]) & (a < e[k]))
        ref[-1] = np.sum((a >= e[-1]) | np.isnan(a))
        np.testing.assert_array_equal(row["grad_hist"][i].numpy(), ref)


def test_missing_gradient_counts_as_zero():
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([1.0, -2.0, 0.0])
    row = ParamStats(["p", "q"], [p, q], hist_edges()).capture()
    assert row["grad_hist"][1, 0] == 2 and row["grad_hist"][0, 0] == 1
    assert row["unit_zero"].tolist() == [False, False, True, True, True]


def test_scatter_histograms_equal_bincount_ones():
    """The accelerator path (scatter-add, no device sync) gives the CPU path's numbers."""
    rng = np.random.default_rng(2)
    e = hist_edges()
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(9, 4), (9,), (3, 2, 5)]]
    a = ParamStats(["a", "b", "c"], params, e, scatter=False)
    b = ParamStats(["a", "b", "c"], params, e, scatter=True)
    for _ in range(3):
        for p in params:
            p.grad = torch.from_numpy(_crafted(rng, p.numel(), e).reshape(p.shape))
        ra, rb = a.capture(), b.capture()
        assert ra.keys() == rb.keys()
        for k in ra:
            torch.testing.assert_close(ra[k], rb[k], rtol=0, atol=0, equal_nan=True)
