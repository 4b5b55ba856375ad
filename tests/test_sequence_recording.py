"""Sequence runs: (B, T) token targets, (B, T, V) logits reduced to per-sequence statistics
that match a hand computation and an independent numpy reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynascope import analysis
from dynascope.recorder import Recorder
from dynascope.recorder.sequence import SequenceOptions, token_stats
from seq_helpers import TinyLM

IGNORE = -100


def test_token_statistics_by_hand():
    # one sequence, V=3: token 0 right with margin 2, token 1 wrong with margin -1, token 2 padding
    z = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 0.0, 0.0]]])
    y = torch.tensor([[0, 2, IGNORE]])
    s = token_stats(z, y, SequenceOptions(token_losses=True))
    e = math.e
    p0, p1 = e**2 / (e**2 + 2), 1 / (e + 2)
    el2n0 = math.sqrt((1 - p0) ** 2 + 2 * (1 / (e**2 + 2)) ** 2)
    el2n1 = math.sqrt((e / (e + 2)) ** 2 + (1 / (e + 2)) ** 2 + (1 - p1) ** 2)
    assert int(s["num_tokens"]) == 2
    assert float(s["token_accuracy"]) == pytest.approx(0.5)
    assert float(s["margin"]) == pytest.approx((2 + -1) / 2, abs=1e-6)
    assert float(s["target_prob"]) == pytest.approx((p0 + p1) / 2, rel=1e-6)
    assert float(s["el2n"]) == pytest.approx((el2n0 + el2n1) / 2, rel=1e-6)
    tl = s["token_loss"][0].float()
    assert tl[0] == pytest.approx(-math.log(p0), rel=1e-3) and tl[1] == pytest.approx(-math.log(p1), rel=1e-3)
    assert torch.isnan(tl[2])


def _reference(z: np.ndarray, y: np.ndarray) -> dict:
    """Plain numpy, token by token."""
    out = {k: [] for k in ("num_tokens", "token_accuracy", "target_prob", "margin", "el2n")}
    for zb, yb in zip(z.astype(np.float64), y):
        acc, pg, mg, el = [], [], [], []
        for zt, t in zip(zb, yb):
            if t == IGNORE:
                continue
            p = np.exp(zt - zt.max()) / np.exp(zt - zt.max()).sum()
            acc.append(float(np.argmax(zt) == t))
            pg.append(p[t])
            mg.append(zt[t] - np.max(np.delete(zt, t)))
            el.append(np.linalg.norm(p - np.eye(len(zt))[t]))
        out["num_tokens"].append(len(acc))
        for k, v in (("token_accuracy", acc), ("target_prob", pg), ("margin", mg), ("el2n", el)):
            out[k].append(np.mean(v) if v else np.nan)
    return {k: np.asarray(v) for k, v in out.items()}


def _lm_data(n=12, t=7, v=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, v, (n, t), generator=g)
    lengths = torch.randint(3, t + 1, (n,), generator=g)
    y = x.roll(-1, 1)
    y[torch.arange(t)[None, :] >= lengths[:, None] - 1] = IGNORE   # padded tails
    return x, y


def _record_lm(path, sequence=None, epochs=2, batch=4, store_given=None, **kw):
    torch.manual_seed(0)
    x, y = _lm_data()
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    given = []
    with Recorder(path, model, num_classes=13, num_examples=len(x), optimizer=opt, sequence=sequence,
                  chunk_steps=4, **kw) as rec:
        for _ in range(epochs):
            for i in range(0, len(x), batch):
                ids = torch.arange(i, min(i + batch, len(x)))
                with rec.step(example_ids=ids, targets=y[ids]) as step:
                    z = model(x[ids])
                    tok = F.cross_entropy(z.transpose(1, 2), y[ids], reduction="none")
                    losses = tok.sum(1) / (y[ids] != IGNORE).sum(1)
                    step.record(losses=losses, logits=z)
                    losses.mean().backward()
                given.append((ids.numpy(), z.detach().numpy(), y[ids].numpy(), losses.detach().numpy()))
                opt.step()
                opt.zero_grad()
    return given


def test_store_holds_per_sequence_statistics_not_logits(tmp_path):
    given = _record_lm(tmp_path / "lm.zarr", sequence=dict(token_losses=True, top_k=3))
    run = analysis.open_run(tmp_path / "lm.zarr")
    assert run.task == "sequence" and run.dataset["sequence"]["ignore_index"] == IGNORE
    train = run.train
    assert "logits" not in train and "token_logits" not in train and "target" not in train
    for s, (ids, z, y, loss) in enumerate(given):
        ref = _reference(z, y)
        n = len(ids)
        np.testing.assert_array_equal(train.example_id[s, :n], ids)
        np.testing.assert_allclose(train.loss[s, :n], loss, rtol=1e-6)
        np.testing.assert_array_equal(train.num_tokens[s, :n], ref["num_tokens"])
        for k in ("token_accuracy", "target_prob", "margin", "el2n"):
            np.testing.assert_allclose(train[k][s, :n], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
        tok = F.cross_entropy(torch.as_tensor(z).transpose(1, 2), torch.as_tensor(y), reduction="none").numpy()
        stored = train.token_loss[s, :n].values.astype(np.float64)
        valid = y != IGNORE
        np.testing.assert_allclose(stored[valid], tok[valid], rtol=2e-3)      # float16
        assert np.isnan(stored[~valid]).all()
        top = torch.as_tensor(z).topk(3, -1)
        np.testing.assert_array_equal(train.topk_token[s, :n], top.indices.numpy())
        np.testing.assert_allclose(train.topk_logit[s, :n], top.values.numpy(), rtol=2e-3, atol=1e-3)


def test_full_logits_only_when_asked_and_task_is_inferred(tmp_path):
    given = _record_lm(tmp_path / "lm.zarr", sequence=None, epochs=1, batch=6)  # task inferred from (B, T) targets
    run = analysis.open_run(tmp_path / "lm.zarr")
    assert run.task == "sequence" and "token_loss" not in run.train and "topk_token" not in run.train
    given = _record_lm(tmp_path / "full.zarr", sequence=dict(store_logits=True), epochs=1, batch=6)
    stored = analysis.open_run(tmp_path / "full.zarr").train.token_logits
    np.testing.assert_allclose(stored[0, :6].values, given[0][1], rtol=2e-3, atol=2e-3)


def test_causal_shift_scores_next_tokens(tmp_path):
    torch.manual_seed(0)
    x, _ = _lm_data()
    model = TinyLM()
    with Recorder(tmp_path / "c.zarr", model, num_classes=13, num_examples=len(x),
                  sequence=dict(causal_shift=True)) as rec:
        ids = torch.arange(4)
        with rec.step(example_ids=ids, targets=x[ids]) as step:   # labels = input_ids, as in HF
            z = model(x[ids])
            losses = F.cross_entropy(z[:, :-1].transpose(1, 2), x[ids, 1:], reduction="none").mean(1)
            step.record(losses=losses, logits=z)
        rec.probe([(x[:4], x[:4], torch.arange(4))])
    ref = _reference(z.detach()[:, :-1].numpy(), x[:4, 1:].numpy())
    run = analysis.open_run(tmp_path / "c.zarr")
    np.testing.assert_allclose(run.train.token_accuracy[0].values, ref["token_accuracy"], rtol=1e-6)
    np.testing.assert_allclose(run.train.margin[0].values, ref["margin"], rtol=1e-5)
    # probe loss: per-sequence mean next-token cross-entropy; statistics as in training
    np.testing.assert_allclose(run.probe.loss[0].values, losses.detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(run.probe.target_prob[0].values, ref["target_prob"], rtol=1e-5)


def test_sequence_shape_errors_are_one_sentence(tmp_path):
    model = TinyLM()
    x, y = _lm_data()
    with Recorder(tmp_path / "e.zarr", model, num_classes=13, num_examples=12, task="sequence") as rec:
        with pytest.raises(ValueError, match=r"sequence logits must have shape \(2, 7, vocab\)"):
            with rec.step(example_ids=[0, 1], targets=y[:2]) as step:
                step.record(losses=torch.zeros(2), logits=torch.zeros(2, 6, 13))
        with pytest.raises(ValueError, match="token targets must be in"):
            rec.step(example_ids=[0, 1], targets=torch.full((2, 7), 13))
        with pytest.raises(ValueError, match=r"sequence targets must have shape \(2, T\)"):
            rec.step(example_ids=[0, 1], targets=torch.zeros(2, dtype=torch.long))


def _lm_steps(rec, model, opt, x, y, steps):
    for _ in range(steps):
        with rec.step(example_ids=torch.arange(len(x)), targets=y) as step:
            z = model(x)
            losses = F.cross_entropy(z.transpose(1, 2), y, reduction="none").sum(1) / (y != IGNORE).sum(1)
            step.record(losses=losses, logits=z)
            losses.mean().backward()
        opt.step()
        opt.zero_grad()


class MetaLM(nn.Module):
    """Embedding + Linear head: what the meta device can run (no attention kernels there)."""

    def __init__(self):
        super().__init__()
        self.tok, self.head = nn.Embedding(13, 8), nn.Linear(8, 13)

    def forward(self, x):
        return self.head(torch.tanh(self.tok(x)))


def test_sequence_step_reads_no_values_on_the_meta_device(tmp_path):
    """Token statistics are reduced without reading a value back to the host (CPU proxy for
    a CUDA sync; see tests/test_sync_free.py)."""
    model = MetaLM().to("meta")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.zeros(4, 7, dtype=torch.long, device="meta")
    y = torch.zeros(4, 7, dtype=torch.long, device="meta")

    class Done(Exception):
        pass

    with pytest.raises(Done):   # meta rows cannot be written: end as a failed run, on purpose
        with Recorder(tmp_path / "m.zarr", model, num_classes=13, num_examples=4, optimizer=opt, chunk_steps=64,
                      param_stats=False, sequence=dict(token_losses=True, top_k=2)) as rec:
            _lm_steps(rec, model, opt, x, y, 3)
            assert rec.steps == 3
            raise Done


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sequence_step_never_synchronises_on_cuda(tmp_path):
    torch.manual_seed(0)
    model = TinyLM().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = (t.cuda() for t in _lm_data())
    with Recorder(tmp_path / "c.zarr", model, num_classes=13, num_examples=12, optimizer=opt, chunk_steps=64,
                  sequence=dict(token_losses=True, top_k=3), grad_norms=True, grad_projection=64) as rec:
        _lm_steps(rec, model, opt, x, y, 2)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _lm_steps(rec, model, opt, x, y, 3)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    run = analysis.open_run(tmp_path / "c.zarr")
    assert run.train.sizes["step"] == 5 and np.isfinite(run.train.token_accuracy.values).all()
