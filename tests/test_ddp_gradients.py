"""Gradient extensions under DDP (torchrun, 2 gloo processes on CPU): every stored
per-example norm, per-layer norm, sketch and in-batch Gram in the merged run is that of
each example's own loss, equal to torch.func on the rank's batch at the step's weights.

Why they are: each rank's hooks see its local forward and backward, and the loss-weight
hook learns w_i = dL_local/dloss_i = 1/B_local, which is divided out; DDP's all-reduce
only touches parameter gradients, which the signals never read. The training itself is
checked too: with the fused conv backward in the graph, the all-reduced update is still
the mean gradient over both ranks' batches."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed

from dynascope import analysis
from torchrun_helpers import torchrun
from dynascope.recorder.gradients import sketch_reference
from gradients_helpers import layer_grads, per_example_grads

WORKER = Path(__file__).with_name("ddp_grad_worker.py")
sys.path.insert(0, str(WORKER.parent))
import ddp_grad_worker as worker  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@pytest.fixture(scope="module")
def ddp_grad_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_grad") / "run.zarr"
    torchrun(WORKER, out)
    return out, [dict(np.load(f"{out}.rank{r}.npz")) for r in range(2)]


def _model(weights: dict, prefix: str, k: int) -> torch.nn.Module:
    model = worker.make_model()
    model.load_state_dict({n: torch.from_numpy(weights[f"{prefix}/{n}"][k]) for n, _ in model.named_parameters()})
    return model


def _reference(meta, model, x, y):
    """Per-layer norms, total norm, sketch and Gram of each example's own loss (torch.func)."""
    layers = layer_grads(meta, per_example_grads(model, x, y))
    flat = [G.reshape(G.shape[0], -1).double() for _, G in layers]
    per_layer = torch.stack([f.norm(dim=1) for f in flat], 1)
    allg = torch.cat(flat, 1)
    sketch = sum(sketch_reference(meta, info["name"], G) for info, G in layers)
    return per_layer, allg.norm(dim=1), sketch.double(), allg @ allg.t(), allg


def test_merged_gradient_signals_are_each_examples_own(ddp_grad_run):
    out, logs = ddp_grad_run
    run = analysis.open_run(out)
    train = run.train.load()
    meta = run.attrs["extensions"]["gradients"]
    B, W = worker.BATCH, 2
    steps = train.sizes["step"]
    assert steps == worker.EPOCHS * worker.N // (B * W) and train.sizes["slot"] == B * W
    gram = train.grad_gram.values
    assert gram.shape == (steps, B * W, B * W)
    for k in range(steps):
        for r, log in enumerate(logs):
            for name in (n for n in log if n.startswith("w/")):
                np.testing.assert_array_equal(log[name][k], logs[0][name][k])   # the ranks' weights agree
            own = slice(B * r, B * (r + 1))
            np.testing.assert_array_equal(train.example_id[k, own], log["ids"][k])
            x, y = torch.from_numpy(log["x"][k]), torch.from_numpy(log["y"][k])
            per_layer, norm, sketch, g, _ = _reference(meta, _model(log, "w", k), x, y)
            np.testing.assert_allclose(train.grad_norm[k, own], norm, rtol=1e-4)
            np.testing.assert_allclose(train.grad_norm_layer[k, own], per_layer, rtol=1e-4)
            proj = train.grad_proj[k, own].values.astype(np.float64) * train.grad_proj_scale[k, own].values[:, None]
            err = np.linalg.norm(proj - sketch.numpy(), axis=1) / np.linalg.norm(sketch.numpy(), axis=1)
            assert err.max() < 2e-3          # float16 unit rows
            np.testing.assert_allclose(gram[k][own, own], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()))
            other = np.ones(B * W, bool)
            other[own] = False
            assert np.isnan(gram[k][own][:, other]).all()   # pairs across ranks: never computed


def test_ddp_update_is_the_mean_gradient_over_both_ranks(ddp_grad_run):
    """The fused conv backward hands its weight gradient to autograd, so DDP all-reduces it."""
    _, logs = ddp_grad_run
    for k in range(len(logs[0]["ids"]) - 1):
        grads = [per_example_grads(_model(log, "w", k), torch.from_numpy(log["x"][k]), torch.from_numpy(log["y"][k]))
                 for log in logs]
        for name in grads[0]:
            mean = torch.cat([g[name] for g in grads]).mean(0).numpy()
            want = logs[0][f"w/{name}"][k] - worker.LR * mean
            np.testing.assert_allclose(logs[0][f"w/{name}"][k + 1], want, rtol=1e-5, atol=1e-6)


def test_probe_gradients_on_rank0(ddp_grad_run):
    out, logs = ddp_grad_run
    run = analysis.open_run(out)
    probe = run.probe.load()
    meta = run.attrs["extensions"]["gradients"]
    X, Y = worker.data()
    assert probe.sizes["probe"] == worker.EPOCHS
    np.testing.assert_array_equal(probe.example_id, np.arange(6))
    for e in range(worker.EPOCHS):
        _, norm, _, g, _ = _reference(meta, _model(logs[0], "probe_w", e).eval(), X[:6], Y[:6])
        np.testing.assert_allclose(probe.grad_norm[e], norm, rtol=1e-4)
        np.testing.assert_allclose(probe.grad_gram[e], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()))
    assert not (Path(out) / "ranks" / "1" / "probe").exists()


def test_opposing_analyses_say_the_gram_is_per_rank(ddp_grad_run):
    """Cross-rank pairs were never computed: 'auto' takes the sketch (every pair), an explicit
    'exact_gram' keeps the exact within-rank pairs and NaN cosines to the whole batch's mean,
    each with one warning naming the cause."""
    out, logs = ddp_grad_run
    run = analysis.open_run(out)
    with pytest.warns(RuntimeWarning, match="recorded by 2 DDP ranks.*using the sketch"):
        auto = analysis.majority_opposition(run, source="train")
    assert auto.attrs["cosine_source"] == "sketch" and np.isfinite(auto.cosine).all()
    with pytest.warns(RuntimeWarning, match="recorded by 2 DDP ranks.*record grad_projection too"):
        exact = analysis.majority_opposition(run, source="train", cosine_source="exact_gram")
    assert np.isnan(exact.cosine).all()
    with pytest.warns(RuntimeWarning, match="recorded by 2 DDP ranks"):
        pairs = analysis.opposing_pairs(run, source="train", cosine_source="exact_gram", cos_threshold=1.0,
                                        magnitude_ratio=None, top_k=50)   # every pair with a cosine
    rank_of = {}
    for r, log in enumerate(logs):
        for k, ids in enumerate(log["ids"]):
            rank_of.update({(k, int(i)): r for i in ids})
    assert len(pairs.example_a) > 0 and np.isfinite(pairs.cosine).all()
    for k, a, b in zip(pairs.at_step.values, pairs.example_a.values, pairs.example_b.values):
        assert rank_of[(int(k), int(a))] == rank_of[(int(k), int(b))]   # only pairs one rank computed
