"""probe/grad_gram: the exact Gram across every tracked example of a probe pass (several
batches of uneven size), through the real Recorder, against torch.func per-example
gradients; the memory budget; NaN rows for examples whose gradient is not known."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynascope import analysis
from dynascope.recorder import Recorder
from dynascope.recorder.driver.models import build_model
from gradients_helpers import gram_rel_err, layer_grads, per_example_grads

SHAPES = {"cnn": (3, 8, 8), "mlp-bn": (1, 6, 6)}


def _train_and_probe(path, model, X, Y, batches, passes=1, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(path, model, num_classes=4, num_examples=len(Y), optimizer=opt, chunk_steps=2,
                  grad_norms=True, grad_projection=32, grad_gram=True, **kw) as rec:
        for _ in range(passes):
            with rec.step(example_ids=torch.arange(8), targets=Y[:8]) as step:
                logits = model(X[:8])
                losses = F.cross_entropy(logits, Y[:8], reduction="none")
                step.record(losses=losses, logits=logits)
                losses.mean().backward()
            opt.step()
            opt.zero_grad()
            rec.probe([(X[b], Y[b], b) for b in batches])
        meta = rec.extensions[0].metadata()
    return analysis.open_run(path), meta


def _reference(model, meta, X, Y, ids):
    """(N, N) Gram of the covered flat per-example gradients, eval mode, ids in sorted order."""
    model.eval()
    g = per_example_grads(model, X[ids], Y[ids])
    flat = torch.cat([G.reshape(G.shape[0], -1) for _, G in layer_grads(meta, g)], 1).double()
    return flat @ flat.t()


@pytest.mark.parametrize("name", ["cnn", "mlp-bn"])
def test_probe_gram_equals_torch_func_across_uneven_batches(tmp_path, name):
    torch.manual_seed(0)
    model = build_model(name, 4, SHAPES[name])
    X, Y = torch.randn(20, *SHAPES[name]), torch.randint(0, 4, (20,))
    batches = [torch.tensor([9, 2, 14, 5, 11]), torch.tensor([0, 17, 3]), torch.tensor([19, 7, 12, 8])]
    run, meta = _train_and_probe(tmp_path / "p.zarr", model, X, Y, batches)
    probe = run.probe
    ids = torch.sort(torch.cat(batches)).values
    assert probe.grad_gram.dims == ("probe", "example", "example_j")
    assert probe.grad_gram.dtype == np.float32 and probe.grad_gram.shape == (1, 12, 12)
    assert np.array_equal(probe.example_id.values, ids.numpy())
    ref = _reference(model, meta, X, Y, ids)
    got = torch.from_numpy(probe.grad_gram[0].values)
    assert gram_rel_err(got, ref) <= 1e-4
    # its diagonal is the recorded exact norm, and it is not block-diagonal (cross-batch pairs)
    assert np.allclose(np.diag(got.numpy()), probe.grad_norm[0].values ** 2, rtol=1e-4)
    assert (got[0, 1:].abs() > 0).all()
    assert meta["gram"]["probe_passes"] == [0] and meta["gram"]["probe_passes_over_budget"] == []
    if name == "cnn":
        assert [l["type"] for l in meta["layers"]][:2] == ["Conv2d", "Conv2d"]


def test_probe_gram_over_budget_warns_once_and_is_not_recorded(tmp_path):
    torch.manual_seed(1)
    model = build_model("cnn", 4, (3, 8, 8))
    X, Y = torch.randn(12, 3, 8, 8), torch.randint(0, 4, (12,))
    batches = [torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6])]
    numel = sum(p.numel() for p in model.parameters())
    with pytest.warns(RuntimeWarning, match="probe_gram_budget") as caught:
        run, meta = _train_and_probe(tmp_path / "b.zarr", model, X, Y, batches, passes=2,
                                     grad_probe_gram_budget=5 * numel * 4)
    assert sum("probe_gram_budget" in str(w.message) for w in caught) == 1
    assert "grad_gram" not in run.probe
    assert np.isfinite(run.probe.grad_proj.values.astype(np.float32)).all()  # the sketch stays
    assert meta["gram"]["probe_passes"] == [] and meta["gram"]["probe_passes_over_budget"] == [0, 1]
    assert meta["gram"]["probe_budget_bytes"] == 5 * numel * 4


def test_probe_gram_of_an_invalid_layer_is_nan_with_a_warning(tmp_path):
    """A layer whose per-example gradients cannot be known makes every entry that includes
    it NaN (the Gram sums all layers), with a warning naming it: never a partial sum."""
    torch.manual_seed(2)
    model = build_model("cnn", 4, (3, 8, 8))
    X, Y = torch.randn(12, 3, 8, 8), torch.randint(0, 4, (12,))
    with Recorder(tmp_path / "n.zarr", model, num_classes=4, num_examples=12,
                  grad_norms=True, grad_gram=True) as rec:
        rec.probe([(X[b], Y[b], b) for b in (torch.tensor([0, 1, 2]), torch.tensor([3, 4]))])
        rec.extensions[0].layers[1].broken = "made invalid by the test"
        with pytest.warns(RuntimeWarning, match="conv2: made invalid by the test"):
            rec.probe([(X[b], Y[b], b) for b in (torch.tensor([0, 1, 2]), torch.tensor([3, 4]))])
    gram = analysis.open_run(tmp_path / "n.zarr").probe.grad_gram.values
    assert np.isfinite(gram[0]).all() and np.isnan(gram[1]).all()


def _brute_from_gram(K, ids, k, threshold, labels=None):
    """Each example's k most negative partners from the full exact Gram, by loops."""
    K = np.asarray(K, dtype=np.float64)
    d = np.sqrt(np.diag(K))
    C = K / np.outer(d, d)
    out = {}
    for i in range(len(K)):
        cols = [j for j in range(len(K)) if j != i and (threshold is None or C[i, j] <= threshold)
                and (labels is None or labels[i] != labels[j])]
        cols = sorted(cols, key=lambda j: (C[i, j], j))[:k]
        for j in cols:
            a, b = min(i, j), max(i, j)
            out[(int(ids[a]), int(ids[b]))] = C[a, b]
    return out


def test_opposing_pairs_on_probes_use_the_exact_gram(tmp_path):
    from dynascope.analysis.opposing import opposing_pairs

    torch.manual_seed(4)
    model = build_model("cnn", 4, (3, 8, 8))
    X, Y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    batches = [torch.tensor([15, 2, 9, 4, 0]), torch.tensor([7, 1, 12]), torch.tensor([3, 10, 5, 14])]
    run, _ = _train_and_probe(tmp_path / "o.zarr", model, X, Y, batches)
    res = opposing_pairs(run, source="probe", cos_threshold=0.2, magnitude_ratio=None,
                         cross_class=True, top_k=2)
    assert res.attrs["cosine_source"] == "exact_gram" and res.attrs["cosine_sd_at_zero"] == 0
    assert (res.cosine_sd.values == 0).all()
    probe = run.probe
    want = _brute_from_gram(probe.grad_gram[0].values, probe.example_id.values, 2, 0.2,
                            labels=probe.target.values)
    got = {(int(a), int(b)): float(c) for a, b, c in
           zip(res.example_a.values, res.example_b.values, res.cosine.values)}
    assert len(want) >= 5 and set(got) == set(want)
    assert max(abs(got[p] - want[p]) for p in want) <= 1e-6
    # pair norms are the exact gradient norms
    norms = dict(zip(probe.example_id.values.tolist(), probe.grad_norm[0].values))
    assert np.allclose(res.norm_a.values, [norms[a] for a in res.example_a.values], rtol=1e-5)
    sketch = opposing_pairs(run, source="probe", cos_threshold=0.2, magnitude_ratio=None, top_k=2,
                            cosine_source="sketch")
    assert sketch.attrs["cosine_source"] == "sketch" and sketch.attrs["cosine_sd_at_zero"] > 0


def test_opposing_pairs_fall_back_to_the_sketch_when_a_pass_has_no_gram(tmp_path):
    from dynascope.analysis.opposing import opposing_pairs
    from dynascope.analysis.run import RunError

    torch.manual_seed(5)
    model = build_model("cnn", 4, (3, 8, 8))
    X, Y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    loader = [(X[b], Y[b], b) for b in (torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7]))]
    with Recorder(tmp_path / "m.zarr", model, num_classes=4, num_examples=8, grad_norms=True,
                  grad_projection=16, grad_gram=True) as rec:
        rec.probe(loader)
        rec.extensions[0]._probe.budget = 1   # the second pass is over budget
        with pytest.warns(RuntimeWarning, match="probe_gram_budget"):
            rec.probe(loader)
    run = analysis.open_run(tmp_path / "m.zarr")
    assert np.isnan(run.probe.grad_gram[1].values).all()
    assert opposing_pairs(run, source="probe", probes=[0]).attrs["cosine_source"] == "exact_gram"
    with pytest.warns(RuntimeWarning, match=r"probe passes \[1\] have no probe/grad_gram"):
        assert opposing_pairs(run, source="probe").attrs["cosine_source"] == "sketch"
    with pytest.raises(RunError, match=r"probe/grad_gram for probe passes \[1\]"):
        opposing_pairs(run, source="probe", cosine_source="exact_gram")


def test_probe_gram_of_an_embedding_gru_classifier(tmp_path):
    """Sequence layers (one-hot Embedding, the GRU re-expressed per gate, Linear over
    positions) through the probe Gram: exact against per-example gradients by loop."""
    from seq_helpers import per_example
    from test_gradients_sequence import RNNLM, ce

    torch.manual_seed(11)
    m = RNNLM(torch.nn.GRU, classify=True, batch_first=True)
    X, Y = torch.randint(0, 13, (9, 5)), torch.randint(0, 3, (9,))
    batches = [torch.tensor([4, 0, 7, 2]), torch.tensor([8, 1]), torch.tensor([3, 6, 5])]
    with Recorder(tmp_path / "g.zarr", m, num_classes=3, num_examples=9, grad_norms=True,
                  grad_gram=True) as rec:
        rec.probe([(X[b], Y[b], b) for b in batches])
    run = analysis.open_run(tmp_path / "g.zarr")
    assert run.attrs["extensions"]["gradients"]["covered_fraction"] == 1.0
    m.eval()
    g = per_example(m, X, Y, ce, method="loop")
    flat = torch.cat([v.reshape(9, -1) for v in g.values()], 1).double()
    assert gram_rel_err(torch.from_numpy(run.probe.grad_gram[0].values), flat @ flat.t()) <= 1e-4
