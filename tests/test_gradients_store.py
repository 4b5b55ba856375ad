"""GradientExtension through the real Recorder: arrays, dims, dtypes and metadata in the
store; stored values equal the extension's (float16 for projections); probe passes."""
import numpy as np
import torch
import torch.nn.functional as F

from dynascope import analysis
from gradients_helpers import gram_rel_err, reference, rel_err
from dynascope.recorder import Recorder
from dynascope.recorder.driver.models import build_model


def test_recorded_store_holds_gradient_signals(tmp_path):
    torch.manual_seed(0)
    model = build_model("cnn", 4, (3, 8, 8))
    ref_model = build_model("cnn", 4, (3, 8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    X, Y = torch.randn(12, 3, 8, 8), torch.randint(0, 4, (12,))
    expected = []
    with Recorder(tmp_path / "r.zarr", model, num_classes=4, num_examples=12, optimizer=opt,
                  chunk_steps=2, grad_norms=True, grad_projection=64, grad_gram=True) as rec:
        ext = rec.extensions[0]
        for s in range(3):
            idx = torch.arange(4 * s, 4 * s + 4)
            ref_model.load_state_dict(model.state_dict())
            expected.append(reference(ref_model, ext, X[idx], Y[idx], with_gram=True))
            with rec.step(example_ids=idx, targets=Y[idx]) as step:
                logits = model(X[idx])
                losses = F.cross_entropy(logits, Y[idx], reduction="none")
                step.record(losses=losses, logits=logits)
                losses.sum().backward()  # sum: stored values must not depend on it
            opt.step()
            opt.zero_grad()
        probe_ids = torch.tensor([1, 5, 7])
        rec.probe([(X[probe_ids], Y[probe_ids], probe_ids)])
        meta = ext.metadata()
    run = analysis.open_run(tmp_path / "r.zarr")
    train, probe = run.train, run.probe
    assert train.grad_proj.dims == ("step", "slot", "proj") and train.grad_proj.dtype == np.float16
    assert train.grad_norm_layer.dims == ("step", "slot", "layer")
    assert probe.grad_proj.dims == ("probe", "example", "proj")
    assert train.sizes["proj"] == meta["projection"]["dim"] == 64
    assert run.attrs["extensions"]["gradients"]["layer_names"] == ["conv1", "conv2", "fc1", "fc2"]
    assert train.grad_gram.dims == ("step", "slot", "slot_j") and train.grad_gram.dtype == np.float32
    assert train.grad_proj_scale.dims == ("step", "slot")
    assert probe.grad_gram.dims == ("probe", "example", "example_j")  # across the tracked set
    for s, (sq, proj, gram) in enumerate(expected):
        unit = train.grad_proj[s].values.astype(np.float32)
        got = torch.from_numpy(unit * train.grad_proj_scale[s].values[:, None])
        assert rel_err(got, proj) < 2e-3  # float16 storage of unit rows
        assert np.allclose(np.linalg.norm(unit, axis=1), 1, atol=2e-3)
        assert gram_rel_err(torch.from_numpy(train.grad_gram[s].values), gram) <= 1e-4
        assert rel_err(torch.from_numpy(train.grad_norm[s].values), sq.sum(1).sqrt()) <= 1e-4
    assert np.isfinite(probe.grad_norm.values).all() and (probe.grad_norm.values > 0).all()


def test_tiny_gradients_keep_their_direction_in_the_store(tmp_path):
    """Gradients of norm ~1e-10 (a loss scaled by 1e-10): float16 at a fixed scale would
    store zeros; unit rows with a float32 scale keep direction and size. Nothing is dropped
    by the analyses."""
    torch.manual_seed(3)
    model = build_model("cnn", 4, (3, 8, 8))
    X, Y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))

    def tiny(out, y):
        return 1e-10 * F.cross_entropy(out, y, reduction="none")

    with Recorder(tmp_path / "t.zarr", model, num_classes=4, num_examples=8, chunk_steps=1,
                  grad_norms=True, grad_projection=256, grad_gram=True) as rec:
        ext = rec.extensions[0]
        _, proj, gram = reference(model, ext, X, Y, loss_fn=tiny, with_gram=True)
        with rec.step(example_ids=torch.arange(8), targets=Y) as step:
            losses = tiny(model(X), Y)
            step.record(losses=losses)
            losses.mean().backward()
    run = analysis.open_run(tmp_path / "t.zarr")
    unit = run.train.grad_proj[0].values.astype(np.float64)
    scale = run.train.grad_proj_scale[0].values.astype(np.float64)
    ref = proj.double().numpy()
    assert (scale > 0).all() and (np.abs(unit).max(1) > 0).all()
    assert 1e-12 < scale.max() < 1e-8
    cos = (unit * ref).sum(1) / (np.linalg.norm(unit, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.9999
    assert np.allclose(scale, np.linalg.norm(ref, axis=1), rtol=1e-4)
    assert gram_rel_err(torch.from_numpy(run.train.grad_gram[0].values), gram) <= 1e-4
    assert (np.abs(ref).max(1) < 6e-8).all()  # what the old fixed-scale float16 stored as 0


def test_grad_gram_flag_reaches_the_recorder():
    """`dynascope record --grad-gram` -> TrainConfig.grad_gram -> Recorder(grad_gram=True)."""
    from dynascope.cli import record as record_cmd
    from dynascope.recorder.driver.loop import TrainConfig, _extension_options

    assert any(p.name == "grad_gram" for p in record_cmd.params)
    opts = _extension_options(TrainConfig(grad_gram=True))
    assert opts["grad_gram"] is True
    from dynascope.recorder.extension_options import ENABLING, KEYWORDS
    assert "grad_gram" in ENABLING["gradients"] and KEYWORDS["grad_gram"][2] == "gram"
