"""gradient_dynamics on runs recorded through the Recorder where the answer is known."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dynascope.analysis import open_run
from dynascope.analysis.gradient_dynamics import gradient_dynamics, gradient_signs
from dynascope.recorder import Recorder

torch.set_num_threads(1)


class Coords(torch.nn.Module):
    """One scalar parameter per coordinate; forward ignores its input."""

    def __init__(self, **init):
        super().__init__()
        for k, v in init.items():
            setattr(self, k, torch.nn.Parameter(torch.tensor([float(v)])))


def _record(path, model, loss_of, lr, steps, *, optimizer=True, inside=False, epochs_of=None, **ext):
    opt = torch.optim.SGD(model.parameters(), lr=lr) if optimizer else None
    ext.setdefault("param_stats_every", 1)   # the known answers below are per step
    with Recorder(path, model, num_examples=1, optimizer=opt, **ext) as rec:  # params is on by default
        for t in range(steps):
            with rec.step(example_ids=torch.tensor([0]), epoch=epochs_of(t) if epochs_of else None) as st:
                loss = loss_of(model).reshape(1)
                st.record(losses=loss)
                loss.sum().backward()
                if inside:
                    opt.step()
            if opt is not None:
                if not inside:
                    opt.step()
                opt.zero_grad()
            else:
                with torch.no_grad():
                    for p in model.parameters():
                        p -= lr * p.grad
                        p.grad = None
    return open_run(path)


@pytest.mark.parametrize("lr, flips", [(0.75, 1.0), (0.25, 0.0), (0.5, 0.0)])
def test_quadratic_flips_sign_exactly_when_lr_h_above_one(tmp_path, lr, flips):
    h = 2.0  # f(w) = h/2 w^2, g = h w, w <- (1 - lr h) w: the sign flips iff lr h > 1
    run = _record(tmp_path / "q.zarr", Coords(w=1.0), lambda m: 0.5 * h * m.w ** 2, lr, 8,
                  epochs_of=lambda t: 0)
    gd = gradient_dynamics(run, window=3)
    f = gd["sign_flip_fraction"].values
    assert np.isnan(f[0])
    np.testing.assert_array_equal(f[1:], flips)
    assert gd["epoch_sign_flip_fraction"].values.tolist() == [flips]
    # the weights follow w_t = (1 - lr h)^t exactly (powers of two here)
    w = (1 - lr * h) ** np.arange(8)
    np.testing.assert_array_equal(gd["weight_diff_norm"].values[1:], np.abs(np.diff(w)))
    np.testing.assert_array_equal(gd["update_norm"].values, lr * h * np.abs(w))
    np.testing.assert_array_equal(gd["grad_norm"].values, h * np.abs(w))
    if lr * h != 1:  # secant curvature of a quadratic is h: minimum-like
        np.testing.assert_array_equal(gd["curvature_by_param"].values[1:, 0], h)
        assert (gd["curvature_class_by_param"].values[1:] == 1).all()


def test_update_norm_without_optimizer_and_optimizer_inside_the_step(tmp_path):
    h, lr = 2.0, 0.75
    loss = lambda m: 0.5 * h * m.w ** 2  # noqa: E731
    a = gradient_dynamics(_record(tmp_path / "a.zarr", Coords(w=1.0), loss, lr, 6, optimizer=False))
    b = gradient_dynamics(_record(tmp_path / "b.zarr", Coords(w=1.0), loss, lr, 6, inside=True,
                                  snapshot_params=["w"], snapshot_every=1))
    w = (1 - lr * h) ** np.arange(6)
    np.testing.assert_array_equal(a["update_norm"].values[:-1], lr * h * np.abs(w[:-1]))
    assert np.isnan(a["update_norm"].values[-1])      # the last update is never seen
    np.testing.assert_array_equal(b["update_norm"].values, lr * h * np.abs(w))
    np.testing.assert_array_equal(a["grad_norm"].values, b["grad_norm"].values)
    snap = open_run(tmp_path / "b.zarr").group("snapshots")
    np.testing.assert_array_equal(snap["weight__w"].values[:, 0], w)   # weights before the step
    np.testing.assert_array_equal(snap["grad__w"].values[:, 0], h * w)


def test_saddle_min_along_x_max_along_y(tmp_path):
    lr = 0.1  # f = x^2 - y^2: x <- 0.8 x shrinks, y <- 1.2 y grows away
    run = _record(tmp_path / "s.zarr", Coords(x=1.0, y=0.01), lambda m: m.x ** 2 - m.y ** 2, lr, 10)
    gd = gradient_dynamics(run, window=4)
    gx, gy = gd["grad_norm_by_param"].sel(param="x").values, gd["grad_norm_by_param"].sel(param="y").values
    assert (np.diff(gx) < 0).all() and (np.diff(gy) > 0).all()
    np.testing.assert_allclose(gx, 2 * 0.8 ** np.arange(10), rtol=1e-5)
    np.testing.assert_allclose(gy, 0.02 * 1.2 ** np.arange(10), rtol=1e-5)
    curv = gd["curvature_by_param"].values[1:]
    np.testing.assert_allclose(curv[:, 0], 2.0, rtol=1e-4)
    np.testing.assert_allclose(curv[:, 1], -2.0, rtol=1e-4)
    cls = gd["curvature_window_class_by_param"].values[1:]
    assert (cls[:, 0] == 1).all() and (cls[:, 1] == -1).all()
    assert np.isnan(gd["sign_flip_fraction"].values[0]) and (gd["sign_flip_fraction"].values[1:] == 0).all()


def test_dead_relu_unit_has_exactly_zero_gradient_and_is_reported(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    with torch.no_grad():
        net[0].bias[1] = -100.0          # unit 1 never activates: its row gets zero gradient
    x = torch.randn(16, 4)
    run = _record(tmp_path / "d.zarr", net, lambda m: m(x).pow(2).mean(), 0.01, 6,
                  snapshot_params="all", snapshot_every=1)
    gd = gradient_dynamics(run, window=3)
    names = [str(n) for n in gd["param"].values]
    dead = gd["dead_at_end"].values
    pname = np.array(names)[gd["unit_param"].values]
    got = sorted((str(n), int(i)) for n, i in zip(pname[dead], gd["unit_index"].values[dead]))
    assert got == [("0.bias", 1), ("0.weight", 1)]
    snap = open_run(tmp_path / "d.zarr").group("snapshots")
    assert (snap["grad__0__weight"].values.reshape(6, 3, 4)[:, 1] == 0).all()
    assert (snap["grad__0__weight"].values.reshape(6, 3, 4)[:, [0, 2]] != 0).any(axis=2).all()
    by = gd["dead_units_by_param"].sel(param="0.weight").values
    assert by[:2].tolist() == [-1, -1] and by[2:].tolist() == [1] * 4   # window 3 needs 3 steps


def test_counts_equal_raw_snapshot_counts(tmp_path):
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x = torch.randn(32, 6) * torch.logspace(-6, 0, 6)   # gradients spread over many decades
    loss = lambda m: 1e-3 * m(x).pow(2).mean()          # noqa: E731
    run = _record(tmp_path / "c.zarr", net, loss, 0.5, 7, snapshot_params="all", snapshot_every=1,
                  epochs_of=lambda t: t // 3)
    snap = run.group("snapshots")
    names = [str(n) for n in run.group("params")["param"].values]
    g = [snap[f"grad__{n.replace('.', '__')}"].values for n in names]
    w = [snap[f"weight__{n.replace('.', '__')}"].values for n in names]
    total = sum(a.shape[1] for a in g)
    for eps in (1e-9, 1e-7, 5e-6, 1e-5, 2e-4, 1e-3):
        gd = gradient_dynamics(run, eps=eps, near_zero=eps, window=2)
        ref = np.stack([(np.abs(a) < eps).sum(1) for a in g], axis=1)
        np.testing.assert_array_equal(gd["below_eps_by_param"].values, ref)
        prev_small = [np.abs(a[:-1]) < eps for a in g]
        rel = sum((p & (np.abs(a[1:]) >= eps)).sum() for p, a in zip(prev_small, g))
        assert np.nansum(gd["released_by_param"].values) == rel
        ret = sum((p & (np.abs(a[1:]) < eps)).sum() for p, a in zip(prev_small, g))
        assert np.nansum(gd["retained_by_param"].values) == ret
    flips = sum(((np.sign(a[1:]) * np.sign(a[:-1])) < 0).sum(1) for a in g)
    np.testing.assert_array_equal(gd["sign_flip_fraction"].values[1:], flips / total)
    ep = gd["epoch_sign_flip_fraction"].values
    np.testing.assert_allclose(ep, [np.mean(flips[:2] / total), np.mean(flips[2:5] / total),
                                    np.mean(flips[5:] / total)])
    dw = np.sqrt(sum(((a[1:].astype(np.float64) - a[:-1]) ** 2).sum(1) for a in w))
    np.testing.assert_allclose(gd["weight_diff_norm"].values[1:], dw, rtol=1e-5)
    zero = sum((a == 0).sum(1) for a in g)
    np.testing.assert_array_equal(gradient_dynamics(run, eps=0)["below_eps"].values, zero)
    signs = gradient_signs(run, eps=1e-5)
    flat = np.concatenate(g, axis=1)
    np.testing.assert_array_equal(signs["sign"].values, np.where(np.abs(flat) <= 1e-5, 0, np.sign(flat)))
    assert signs["epoch"].values.tolist() == [0, 0, 0, 1, 1, 1, 2]


def test_threshold_off_the_edges_is_refused_or_snapped(tmp_path):
    run = _record(tmp_path / "e.zarr", Coords(w=1.0), lambda m: m.w ** 2, 0.1, 3)
    with pytest.raises(ValueError, match="not a histogram edge"):
        gradient_dynamics(run, eps=1.2e-7)
    gd = gradient_dynamics(run, eps=1.2e-7, snap_to_edge=True)
    assert gd.attrs["eps_used"] == pytest.approx(1e-7)


def test_explicit_extension_wins_over_the_default_one(tmp_path):
    from dynascope.recorder.params import ParamStatsExtension

    model = Coords(w=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.25)
    ext = ParamStatsExtension(snapshot_params=["w"], snapshot_every=3, every=1)
    with Recorder(tmp_path / "x.zarr", model, num_examples=1, optimizer=opt, extensions=[ext]) as rec:
        assert [type(e).__name__ for e in rec.extensions].count("ParamStatsExtension") == 1  # no default twin
        for _ in range(5):
            with rec.step(example_ids=torch.tensor([0])) as st:
                loss = (model.w ** 2).reshape(1)
                st.record(losses=loss)
                loss.sum().backward()
            opt.step()
            opt.zero_grad()
    run = open_run(tmp_path / "x.zarr")
    assert run.committed["params"] == 5 and run.group("params").sizes["step"] == 5
    assert run.group("snapshots")["step"].values.tolist() == [0, 3]
    assert run.extensions["params"]["snapshot_every"] == 3


def test_gradient_accumulation_rows_and_update_norms(tmp_path):
    h, lr = 2.0, 0.25
    model = Coords(w=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with Recorder(tmp_path / "acc.zarr", model, num_examples=1, optimizer=opt, param_stats_every=1) as rec:
        for t in range(6):
            with rec.step(example_ids=torch.tensor([0]), epoch=0) as st:
                loss = (0.5 * h * model.w ** 2).reshape(1)
                st.record(losses=loss)
                loss.sum().backward()
            if t % 2 == 1:          # accumulate two batches per optimizer step
                opt.step()
                opt.zero_grad()
    run = open_run(tmp_path / "acc.zarr")
    p = run.group("params")
    assert p["num_updates"].values.tolist() == [0, 1, 0, 1, 0, 1]
    gd = gradient_dynamics(run)
    w = [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]       # w <- w - lr * (2 h w) = 0 after the first step
    g = [h * 1.0, 2 * h * 1.0, 0.0, 0.0, 0.0, 0.0]   # accumulated gradients
    np.testing.assert_array_equal(gd["grad_norm"].values, g)
    np.testing.assert_array_equal(gd["update_norm"].values, [0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(gd["weight_diff_norm"].values[1:], np.abs(np.diff(w)))
    assert np.isnan(gd["curvature_by_param"].values[1, 0])     # no step between rows 0 and 1
    assert gd["below_eps"].values.tolist() == [0, 0, 1, 1, 1, 1]   # exact zeros once w = 0


def test_gradient_signs_near_zero_only_is_the_complement(tmp_path):
    torch.manual_seed(3)
    net = torch.nn.Linear(4, 3)
    x = torch.randn(8, 4) * torch.tensor([1e-7, 1e-5, 1e-3, 1.0])
    run = _record(tmp_path / "n.zarr", net, lambda m: m(x).pow(2).mean(), 0.1, 3,
                  snapshot_params="all", snapshot_every=1)
    g = np.concatenate([run.group("snapshots")[f"grad__{k}"].values for k in ("weight", "bias")], axis=1)
    small = np.abs(g) <= np.float32(1e-5)
    assert small.any() and (~small).any()
    a = gradient_signs(run, eps=1e-5)["sign"].values
    b = gradient_signs(run, eps=1e-5, near_zero_only=True)["sign"].values
    np.testing.assert_array_equal(a, np.where(small, 0, np.sign(g)))
    np.testing.assert_array_equal(b, np.where(small, np.sign(g), 0))
