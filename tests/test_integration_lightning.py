"""Lightning: the callback records what an independent computation gives at the parameters
each step saw (losses, logits, exact per-example gradient norms), probes and evals, with and
without gradient accumulation."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

pl = pytest.importorskip("pytorch_lightning")

from dynascope import analysis  # noqa: E402
from dynascope.recorder import IndexedDataset  # noqa: E402
from dynascope.recorder.integrations.lightning import DynascopeCallback  # noqa: E402


# --- the README's example (keep in sync) ----------------------------------------------
class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        logits = self(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        return {"loss": losses.mean(), "losses": losses, "logits": logits}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)
# ---------------------------------------------------------------------------------------


class Snapshots(pl.Callback):
    """Parameters at the start of every training batch (what that forward pass used)."""

    def __init__(self):
        self.models = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.models.append((copy.deepcopy(pl_module.net), batch))


def _per_example_norms(net, x, y):
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(torch.func.functional_call(net, p, (xi[None],)), yi[None])

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_callback_records_exact_numbers(tmp_path, accumulate):
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    train_set = IndexedDataset(TensorDataset(x, y))
    probe_loader = DataLoader(Subset(train_set, range(10)), batch_size=5)
    eval_loader = DataLoader(IndexedDataset(TensorDataset(torch.randn(8, 6), torch.randint(0, 3, (8,)))), batch_size=8)
    snaps = Snapshots()
    model = Classifier()
    callback = DynascopeCallback(tmp_path / "run.zarr", num_classes=3, grad_norms=True, grad_projection=16,
                                 probe_loader=probe_loader, eval_loader=eval_loader)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", enable_progress_bar=False, logger=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         accumulate_grad_batches=accumulate,
                         callbacks=[callback])
    trainer.callbacks.append(snaps)
    trainer.fit(model, DataLoader(train_set, batch_size=8, shuffle=True))

    run = analysis.open_run(tmp_path / "run.zarr")
    assert run.status == "complete" and run.dataset["num_examples"] == 40
    train = run.train
    assert train.sizes["step"] == len(snaps.models) == 10
    # optimizer steps taken before each micro-batch; Lightning also steps at an epoch's odd end
    want = np.arange(10) if accumulate == 1 else [0, 0, 1, 1, 2, 3, 3, 4, 4, 5]
    np.testing.assert_array_equal(train.optimizer_step, want)
    np.testing.assert_array_equal(train.epoch, [0] * 5 + [1] * 5)
    for s, (net, (bx, by, bid)) in enumerate(snaps.models):
        np.testing.assert_array_equal(train.example_id[s], bid)
        with torch.no_grad():
            logits = net(bx)
        np.testing.assert_allclose(train.logits[s], logits, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(train.loss[s], F.cross_entropy(logits, by, reduction="none"), rtol=1e-5)
        np.testing.assert_allclose(train.grad_norm[s], _per_example_norms(net, bx, by), rtol=1e-4)
    # probes: before training and after each epoch; the last one at the final parameters
    assert run.probe.sizes["probe"] == 3 and run.eval.sizes["eval"] == 3
    np.testing.assert_array_equal(run.probe.epoch, [-1, 0, 1])
    with torch.no_grad():
        final = F.cross_entropy(model(x[:10]), y[:10], reduction="none")
    np.testing.assert_allclose(run.probe.loss[-1], final, rtol=1e-5)
    np.testing.assert_allclose(run.probe.grad_norm[-1], _per_example_norms(model.net, x[:10], y[:10]), rtol=1e-4)


def test_lightning_step_must_return_per_example_losses(tmp_path):
    class ScalarOnly(Classifier):
        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            return F.cross_entropy(self(x), y)

    ds = IndexedDataset(TensorDataset(torch.randn(8, 6), torch.randint(0, 3, (8,))))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", enable_progress_bar=False, logger=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         callbacks=[DynascopeCallback(tmp_path / "r.zarr", num_classes=3)])
    with pytest.raises(ValueError, match="must return the per-example losses too"):
        trainer.fit(ScalarOnly(), DataLoader(ds, batch_size=4))
    assert analysis.open_run(tmp_path / "r.zarr").status == "failed"
