"""Loaders as people write them: Subset / random_split, dict batches, dict probe loaders,
regression targets (B,) and (B, k), and (B, T, F) activations pooled over T."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner
from torch.utils.data import DataLoader, Subset, TensorDataset, default_collate, random_split

from dynascope import analysis
from dynascope.cli import main
from dynascope.recorder import IndexedDataset, Recorder
from dynascope.recorder.activations import ActivationExtension


def _base(n=20):
    return TensorDataset(torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n) % 3)


def test_indexed_dataset_over_subset_and_random_split():
    base = _base()
    part, _ = random_split(base, [12, 8], generator=torch.Generator().manual_seed(0))
    ds = IndexedDataset(part)                                  # ids: positions in the part
    ids = [ds[i][2] for i in range(len(ds))]
    assert ids == list(range(12))
    for i in range(12):                                         # the right example at each id
        assert float(ds[i][0]) == float(part.indices[i])
    based = IndexedDataset(part, ids="base")                    # ids: indices into `base`
    assert [based[i][2] for i in range(12)] == list(part.indices)
    np.testing.assert_array_equal(ds.base_indices, part.indices)
    # a Subset of an already indexed dataset (probe subsets): wrapping it again is fine
    inner = IndexedDataset(base)
    probe = Subset(inner, [5, 2, 9])
    assert [probe[i][2] for i in range(3)] == [5, 2, 9]         # Subset keeps the training ids
    assert [IndexedDataset(probe)[i][2] for i in range(3)] == [0, 1, 2]
    assert [IndexedDataset(probe, ids="base")[i][2] for i in range(3)] == [5, 2, 9]


def test_out_of_range_ids_say_what_to_change_not_to_wrap_again(tmp_path):
    part = Subset(IndexedDataset(_base()), [15, 16, 17])
    x, y, idx = default_collate([part[i] for i in range(3)])
    with Recorder(tmp_path / "r.zarr", nn.Linear(1, 3), num_classes=3, num_examples=len(part)) as rec:
        with pytest.raises(ValueError) as e:
            rec.step(example_ids=idx, targets=y)
    msg = str(e.value)
    assert "num_examples=len(larger dataset)" in msg and "IndexedDataset(part)" in msg


class DictData(torch.utils.data.Dataset):
    """Hugging Face style items: dicts of tensors."""

    def __init__(self, n=10, t=5, v=7):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randint(0, v, (n, t), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": torch.ones(5, dtype=torch.long), "labels": self.x[i]}


class DictLM(nn.Module):
    def __init__(self, v=7):
        super().__init__()
        self.emb = nn.Embedding(v, 4)
        self.head = nn.Linear(4, v)

    def forward(self, input_ids, attention_mask=None):
        return {"logits": self.head(self.emb(input_ids))}


def test_dict_items_and_dict_probe_loaders(tmp_path):
    ds = IndexedDataset(DictData(), key="idx")
    item = ds[3]
    assert item["idx"] == 3 and set(item) == {"input_ids", "attention_mask", "labels", "idx"}
    loader = DataLoader(Subset(ds, [1, 4, 6, 8]), batch_size=3)
    model = DictLM()
    with Recorder(tmp_path / "d.zarr", model, num_classes=7, num_examples=len(ds),
                  sequence=dict(causal_shift=True)) as rec:
        rec.probe(loader, ids_key="idx", targets_key="labels")
    run = analysis.open_run(tmp_path / "d.zarr")
    np.testing.assert_array_equal(run.probe.example_id, [1, 4, 6, 8])
    x = DictData().x[[1, 4, 6, 8]]
    with torch.no_grad():
        z = model(x)["logits"]
    ref = F.cross_entropy(z[:, :-1].transpose(1, 2), x[:, 1:], reduction="none").mean(1)
    np.testing.assert_allclose(run.probe.loss[0], ref.numpy(), rtol=1e-5)
    with Recorder(tmp_path / "e.zarr", model, num_classes=7, num_examples=len(ds)) as rec:
        with pytest.raises(ValueError, match=r"without \['example_id'\].*ids_key="):
            rec.probe(loader)


@pytest.mark.parametrize("k", [None, 1, 3])
def test_regression_targets(tmp_path, k):
    torch.manual_seed(0)
    n = 12
    x = torch.randn(n, 4)
    y = torch.randn(n) if k is None else torch.randn(n, k)
    model = nn.Linear(4, k or 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "reg.zarr"
    with Recorder(path, model, num_examples=n, optimizer=opt, grad_norms=True, grad_projection=8) as rec:
        for epoch in range(3):
            for i in range(0, n, 4):
                ids = torch.arange(i, i + 4)
                with rec.step(example_ids=ids, targets=y[ids]) as step:
                    pred = model(x[ids]).reshape(y[ids].shape)
                    losses = (pred - y[ids]).pow(2).reshape(4, -1).mean(1)
                    step.record(losses=losses)
                    losses.mean().backward()
                opt.step()
                opt.zero_grad()
            rec.probe([(x[:6], y[:6], torch.arange(6))])
    run = analysis.open_run(path)
    assert run.task == "regression" and run.status == "complete"
    want = y.numpy().reshape(n, -1) if k else y.numpy()
    np.testing.assert_allclose(run.train.target[0, :4].values, want[:4])
    assert run.train.target.dims == (("step", "slot") if k is None else ("step", "slot", "output"))
    np.testing.assert_allclose(run.probe.target.values, want[:6])
    r = CliRunner().invoke(main, ["analyze", str(path), "--only", "forgetting", "--only", "opposing_pairs",
                                  "--only", "epoch_curves", "--only", "majority_opposition"])
    assert r.exit_code == 0, r.output
    assert "forgetting           skipped: defined for classification and sequence runs; this run is regression" in r.output
    assert "opposing_pairs       skipped: defined for classification runs" in r.output
    assert "train_accuracy" not in r.output and "majority_opposition  step=" in r.output


def test_sequence_activations_pool_over_tokens(tmp_path):
    torch.manual_seed(0)
    b, t, f = 3, 5, 4
    lin = nn.Linear(f, 6)
    out = lin(torch.randn(b, t, f)).detach()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    for pool, want in (("mean", (out * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)),
                       ("last", out[torch.arange(b), mask.sum(1) - 1]), (0, out[:, 0])):
        ext = ActivationExtension(layers=["lin"], sequence_pool=pool)
        ext._batch_size, ext._mask = b, mask
        torch.testing.assert_close(ext.reduce("lin", out, lin), want)
    ext = ActivationExtension(layers=["lin"])
    ext._batch_size = b                                       # time-first (T, B, F) output
    torch.testing.assert_close(ext.reduce("lin", out.transpose(0, 1), lin), out.mean(1))
    conv = nn.Conv1d(4, 6, 1)                                 # (N, C, L) stays channels-first
    fmap = torch.randn(b, 6, 5)
    torch.testing.assert_close(ActivationExtension(layers=["c"]).reduce("c", fmap, conv), fmap.mean(2))
