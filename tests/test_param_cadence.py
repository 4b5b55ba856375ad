"""param_stats_every=N: rows at steps 0, N, 2N, ... hold exactly what an every-step recording
holds at those steps, because the step before each recorded one is remembered."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dynascope.analysis import open_run
from dynascope.analysis.gradient_dynamics import gradient_dynamics
from dynascope.recorder import Recorder
from dynascope.recorder.params import ParamStats, hist_edges

torch.set_num_threads(1)

STEP_ARRAYS = ("grad_norm", "param_norm", "update_norm", "weight_diff_norm", "secant_dot",
               "grad_hist", "released", "sign_flips", "unit_zero", "num_updates")


def _train(path, every, steps=13, optimizer=True):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.5) if optimizer else None
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    with Recorder(path, net, num_classes=3, num_examples=64, optimizer=opt, chunk_steps=4,
                  param_stats_every=every) as rec:
        for t in range(steps):
            idx = torch.arange(16) + 16 * (t % 4)
            with rec.step(example_ids=idx, targets=y[idx]) as st:
                logits = net(x[idx])
                losses = torch.nn.functional.cross_entropy(logits, y[idx], reduction="none")
                st.record(losses=losses, logits=logits)
                losses.mean().backward()
            if opt is not None:
                opt.step()
                opt.zero_grad()
            else:
                with torch.no_grad():
                    for p in net.parameters():
                        p -= 0.5 * p.grad
                        p.grad = None
    return open_run(path)


@pytest.mark.parametrize("optimizer", [True, False])
@pytest.mark.parametrize("every", [2, 3, 5])
def test_cadence_rows_equal_every_step_rows(tmp_path, every, optimizer):
    full = _train(tmp_path / "full.zarr", 1, optimizer=optimizer).group("params")
    sub = _train(tmp_path / "sub.zarr", every, optimizer=optimizer).group("params")
    steps = np.arange(0, 13, every)
    np.testing.assert_array_equal(sub["step"].values, steps)
    for name in STEP_ARRAYS:
        a, b = full[name].values[steps], sub[name].values
        if name == "update_norm" and not optimizer:
            a, b = a[:-1], b[:-1]   # the last row's update comes from the step after it
        np.testing.assert_array_equal(b, a, err_msg=name)
    # the previous step's histogram, for retained counts (the previous step is not a row)
    np.testing.assert_array_equal(sub["prev_grad_hist"].values[1:], full["grad_hist"].values[steps[1:] - 1])
    assert "prev_grad_hist" not in full


def test_gradient_dynamics_under_a_cadence_matches_every_step(tmp_path):
    full = gradient_dynamics(_train(tmp_path / "full.zarr", 1), eps=1e-3, near_zero=1e-2, window=6)
    sub = gradient_dynamics(_train(tmp_path / "sub.zarr", 3), eps=1e-3, near_zero=1e-2, window=6)
    steps = np.arange(0, 13, 3)
    np.testing.assert_array_equal(sub["step"].values, steps)
    for name in ("below_eps", "sign_flip_fraction", "released_fraction", "retained_fraction",
                 "weight_diff_norm", "update_norm", "curvature", "zero_grad_units_by_param"):
        np.testing.assert_array_equal(sub[name].values, full[name].values[steps], err_msg=name)
    assert sub.attrs["every"] == 3 and sub.attrs["window_rows"] == 2 and sub.attrs["window"] == 6
    np.testing.assert_array_equal(sub["step_epoch"].values, full["step_epoch"].values[steps])


def test_remember_then_capture_compares_with_the_remembered_step():
    rng = np.random.default_rng(0)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(4, 3), (4,)]]
    s = ParamStats(["w", "b"], params, hist_edges(), block=1)
    history = []
    for t in range(3):
        for p in params:
            p.grad = torch.from_numpy(rng.normal(size=p.shape).astype(np.float32))
            with torch.no_grad():
                p.copy_(torch.from_numpy(rng.normal(size=p.shape).astype(np.float32)))
        history.append([(p.grad.clone().reshape(-1), p.detach().clone().reshape(-1)) for p in params])
        if t == 1:
            s.remember()
        else:
            row = s.capture()
    flips = [int(((history[1][i][0].sign() * history[2][i][0].sign()) < 0).sum()) for i in range(2)]
    assert row["sign_flips"].tolist() == flips
    dw = [torch.linalg.vector_norm(history[2][i][1] - history[1][i][1]) for i in range(2)]
    torch.testing.assert_close(row["weight_diff_norm"], torch.stack(dw))
    dot = [torch.dot(history[2][i][0] - history[1][i][0], history[2][i][1] - history[1][i][1]) for i in range(2)]
    torch.testing.assert_close(row["secant_dot"], torch.stack(dot))


def test_param_stats_every_must_be_a_positive_integer(tmp_path):
    net = torch.nn.Linear(2, 2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="param_stats_every must be a positive integer"):
            Recorder(tmp_path / "x.zarr", net, num_examples=4, param_stats_every=bad)
