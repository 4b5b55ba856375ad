"""Activation recording (probe passes only, pooled and subsampled as documented) and the
augmentation recorder (stored views equal the model on the transformed inputs)."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from dynascope.analysis.run import open_run
from dynascope.recorder import Recorder
from dynascope.recorder.activations import ActivationExtension, pool_output, select_layers, unit_subset
from dynascope.recorder.augment import record_augmentation_variance
from dynascope.recorder.indexed import IndexedDataset
from dynascope.recorder.driver.models import build_model


def tiny(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(24, 1, 8, 8)
    y = torch.randint(0, 3, (24,))
    return TensorDataset(x, y), build_model("cnn", 3, (1, 8, 8))


def test_layer_selection():
    _, model = tiny()
    assert select_layers(model) == ["conv1", "conv2", "fc1", "fc2"]
    assert select_layers(model, "ReLU") == ["relu1", "relu2", "relu3"]
    assert select_layers(model, [nn.MaxPool2d, "fc2"]) == ["pool1", "pool2", "fc2"]
    assert select_layers(model, "fc*, conv1") == ["conv1", "fc1", "fc2"]
    with pytest.raises(ValueError, match="no module matches"):
        select_layers(model, ["fc1", "fc9"])


def test_pooling():
    out = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert torch.equal(pool_output(out, "mean"), out.mean((2, 3)))
    assert torch.equal(pool_output(out, "max"), out[:, :, 1, 1])
    assert pool_output(out, "flatten").shape == (2, 12)
    assert torch.equal(pool_output(out[:, :, 0, 0], "max"), out[:, :, 0, 0])  # (N, F) untouched


def record(path, ds, model, ext, steps=2, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = IndexedDataset(ds)
    probe = DataLoader(Subset(ids, [9, 3, 5, 7, 11, 1]), batch_size=4)   # ids out of order
    with Recorder(path, model, num_classes=3, num_examples=len(ds), optimizer=opt,
                  extensions=[ext] if ext else [], **kw) as rec:
        rec.probe(probe)
        for xb, yb, ib in list(DataLoader(ids, batch_size=8))[:steps]:
            with rec.step(ib, yb, epoch=0) as st:
                logits = model(xb)
                losses = nn.functional.cross_entropy(logits, yb, reduction="none")
                st.record(losses, logits)
                losses.mean().backward()
            opt.step()
            opt.zero_grad()
        rec.probe(probe)
    return open_run(path)


def test_probe_activations_equal_the_model(tmp_path):
    ds, model = tiny()
    ext = ActivationExtension(layers=["conv1", "fc1", "fc2"], pool="max", max_units=8)
    run = record(tmp_path / "r.zarr", ds, model, ext)
    act = run.group("activations")
    assert act.sizes["probe"] == 2 and run.train.sizes["step"] == 2    # no rows from train steps
    keep = unit_subset("conv1", 32, 8)
    assert act["conv1__unit"].values.tolist() == keep.tolist()
    assert act["fc2"].shape == (2, 6, 3) and act["fc2"].dtype == np.float32
    # final model state == state of the last probe: recompute it directly
    model.eval()
    seen = {}
    hooks = [getattr(model, m).register_forward_hook(lambda mod, i, o, m=m: seen.__setitem__(m, o))
             for m in ("conv1", "fc1", "fc2")]
    x = ds.tensors[0][[1, 3, 5, 7, 9, 11]]                               # stored in id order
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    tol = dict(rtol=1e-5, atol=1e-6)   # float32 rounding differs with the batch composition
    np.testing.assert_allclose(act["conv1"].values[-1], seen["conv1"].amax((2, 3))[:, keep].numpy(), **tol)
    np.testing.assert_allclose(act["fc1"].values[-1], seen["fc1"][:, unit_subset("fc1", 128, 8)].numpy(), **tol)
    np.testing.assert_allclose(act["fc2"].values[-1], seen["fc2"].numpy(), **tol)
    meta = run.extensions["activations"]
    assert meta["layers"] == ["conv1", "fc1", "fc2"] and meta["units"]["conv1"]["output_shape"] == [32, 8, 8]
    assert not ext._handles                                              # detached at close


def test_keyword_path_and_float16(tmp_path):
    ds, model = tiny()
    run = record(tmp_path / "k.zarr", ds, model, None, activations="relu3", activation_pool="flatten")
    assert list(run.group("activations").data_vars) == ["relu3"]
    assert run.group("activations")["relu3"].shape == (2, 6, 128)
    ds, model = tiny()
    ext = ActivationExtension(layers="conv2", pool="flatten", max_units=None, dtype="float16")
    run = record(tmp_path / "h.zarr", ds, model, ext, steps=1)
    assert run.group("activations")["conv2"].dtype == np.float16
    assert run.group("activations")["conv2"].shape == (2, 6, 64 * 4 * 8 // 2)


class Scale:
    """A deterministic 'augmentation': the k-th call multiplies by 1 + k/10."""

    def __init__(self):
        self.k = 0

    def __call__(self, x):
        self.k += 1
        return x * (1 + self.k / 10)


def test_augmentation_recording(tmp_path):
    ds, model = tiny()
    run = record(tmp_path / "a.zarr", ds, model, None, steps=1)
    state = torch.get_rng_state()
    record_augmentation_variance(run.path, model, ds, [4, 2], n_aug=5, transforms=Scale(), layers="fc1",
                                 max_units=16, n_reference=10, montage_views=3)
    assert torch.equal(torch.get_rng_state(), state)                 # global RNG untouched
    g = open_run(run.path).group("augmentation")
    assert g["fc1"].shape == (2, 5, 16) and g["sample_id"].values.tolist() == [4, 2]
    ref = g["reference_id"].values
    assert len(ref) == 10 and {2, 4} <= set(ref.tolist())
    model.eval()
    keep = unit_subset("fc1", 128, 16)
    with torch.no_grad():  # float32 rounding differs with the batch composition: rtol 1e-5
        x2 = ds.tensors[0][2]
        views = torch.stack([x2 * (1 + k / 10) for k in range(6, 11)])       # second sample: calls 6..10
        fc1 = model.fc1(model.flatten(model.pool2(model.relu2(model.conv2(model.pool1(model.relu1(
            model.conv1(views))))))))
        np.testing.assert_allclose(g["fc1"].values[1], fc1[:, keep].numpy(), rtol=1e-5, atol=1e-6)
        clean = model.fc1(model.flatten(model.pool2(model.relu2(model.conv2(model.pool1(model.relu1(
            model.conv1(ds.tensors[0][ref]))))))))
        np.testing.assert_allclose(g["fc1__clean"].values, clean[:, keep].numpy(), rtol=1e-5, atol=1e-6)
    m = g["montage"].values
    assert m.shape == (3, 1, 8, 8) and np.array_equal(m[0], ds.tensors[0][4].numpy())
    assert np.allclose(m[1], ds.tensors[0][4].numpy() * 1.1)
    with pytest.raises(ValueError):
        record_augmentation_variance(run.path, model, ds, [1, 1], n_aug=5)
