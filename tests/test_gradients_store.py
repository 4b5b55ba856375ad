"""GradientExtension through the real Recorder: arrays, dims, dtypes and metadata in the
store; stored values equal the extension's (float16 for projections); probe passes."""
import numpy as np
import torch
import torch.nn.functional as F

import analysis
from gradients_helpers import reference, rel_err
from recorder import Recorder
from recorder.models import build_model


def test_recorded_store_holds_gradient_signals(tmp_path):
    torch.manual_seed(0)
    model = build_model("cnn", 4, (3, 8, 8))
    ref_model = build_model("cnn", 4, (3, 8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    X, Y = torch.randn(12, 3, 8, 8), torch.randint(0, 4, (12,))
    expected = []
    with Recorder(tmp_path / "r.zarr", model, num_classes=4, num_examples=12, optimizer=opt,
                  chunk_steps=2, grad_norms=True, grad_projection=64) as rec:
        ext = rec.extensions[0]
        for s in range(3):
            idx = torch.arange(4 * s, 4 * s + 4)
            ref_model.load_state_dict(model.state_dict())
            expected.append(reference(ref_model, ext, X[idx], Y[idx]))
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
    for s, (sq, proj) in enumerate(expected):
        got = torch.from_numpy(train.grad_proj[s].values.astype(np.float32))
        assert rel_err(got, proj) < 2e-3  # float16 storage
        assert rel_err(torch.from_numpy(train.grad_norm[s].values), sq.sum(1).sqrt()) <= 1e-4
    assert np.isfinite(probe.grad_norm.values).all() and (probe.grad_norm.values > 0).all()
