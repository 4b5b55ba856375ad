"""Hugging Face Trainer on a tiny random GPT-2 from a config: the index column survives,
accelerate's wrapped optimizer is counted, the loss HF backpropagates is unchanged, and the
stored per-sequence numbers match an independent computation at each step's parameters."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from dynascope import analysis  # noqa: E402
from dynascope.recorder import IndexedDataset  # noqa: E402
from dynascope.recorder.integrations.huggingface import DynascopeTrainer  # noqa: E402

V, T = 50, 8


class Tokens(Dataset):
    """Random token sequences with right padding (labels -100 there), HF-style dict items."""

    def __init__(self, n=24, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, V, (n, T), generator=g)
        self.len = torch.randint(4, T + 1, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        mask = (torch.arange(T) < self.len[i]).long()
        return {"input_ids": self.ids[i], "attention_mask": mask,
                "labels": torch.where(mask.bool(), self.ids[i], -100)}


def _reference(model, items):
    """Per-sequence mean next-token loss and token accuracy, straight from HF's logits."""
    batch = {k: torch.stack([it[k] for it in items]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    z, y = out.logits[:, :-1], batch["labels"][:, 1:]
    tok = F.cross_entropy(z.transpose(1, 2), y, reduction="none")
    valid = y != -100
    loss = tok.sum(1) / valid.sum(1)
    acc = ((z.argmax(-1) == y) & valid).sum(1) / valid.sum(1)
    return loss.numpy(), acc.numpy(), float(out.loss)


def _loop_norms(model, items):
    """‖∇ loss_i‖ one example at a time (loss_i: the sequence's mean next-token cross-entropy)."""
    model = copy.deepcopy(model).train()
    out = []
    for it in items:
        model.zero_grad()
        logits = model(input_ids=it["input_ids"][None], attention_mask=it["attention_mask"][None]).logits
        y = it["labels"][None, 1:]
        F.cross_entropy(logits[:, :-1].transpose(1, 2), y, ignore_index=-100).backward()
        out.append(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None)))
    return torch.stack(out).numpy()


class Snapshots(transformers.TrainerCallback):
    def __init__(self):
        self.models = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.models.append(copy.deepcopy(model))


def test_trainer_records_gpt2_sequences(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    train_set = Tokens()
    # --- the README's example (keep in sync) ---------------------------------------------
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=6,
                                          num_train_epochs=2, learning_rate=1e-2, report_to=[], use_cpu=True,
                                          save_strategy="no", logging_strategy="no", disable_tqdm=True)
    trainer = DynascopeTrainer(model=model, args=args, train_dataset=IndexedDataset(train_set),
                               data_collator=transformers.default_data_collator,
                               record_to=tmp_path / "run.zarr",
                               probe_dataset=Subset(IndexedDataset(train_set), range(8)),
                               record_options=dict(grad_norms=True, sequence=dict(token_losses=True)))
    # ---------------------------------------------------------------------------------------
    snaps = Snapshots()
    trainer.add_callback(snaps)
    trainer.train()

    run = analysis.open_run(tmp_path / "run.zarr")
    assert run.status == "complete" and run.task == "sequence"
    assert run.dataset["num_classes"] == V and run.dataset["sequence"]["causal_shift"] is True
    train = run.train
    assert train.sizes["step"] == len(snaps.models) == 8
    np.testing.assert_array_equal(train.optimizer_step, np.arange(8))   # through accelerate's wrapper
    seen = np.sort(train.example_id.values[:4].ravel())
    np.testing.assert_array_equal(seen, np.arange(24))                   # ids kept: one epoch, each once
    for s, m in enumerate(snaps.models):
        ids = train.example_id[s].values
        loss, acc, hf_loss = _reference(m, [train_set[i] for i in ids])
        np.testing.assert_allclose(train.loss[s], loss, rtol=1e-5)
        np.testing.assert_allclose(train.token_accuracy[s], acc, atol=1e-6)
        # HF's loss is token-weighted over the batch; the trainer optimises exactly that
        n = train.num_tokens[s].values
        assert float((loss * n).sum() / n.sum()) == pytest.approx(hf_loss, rel=1e-5)
    # exact per-example gradient norms: HF's token weights n_i / N are measured and divided out
    for s in (0, 5):
        ids = train.example_id[s].values
        np.testing.assert_allclose(train.grad_norm[s], _loop_norms(snaps.models[s], [train_set[i] for i in ids]),
                                   rtol=1e-4)
    assert run.probe.sizes["probe"] == 3
    loss, acc, _ = _reference(trainer.model, [train_set[i] for i in range(8)])
    np.testing.assert_allclose(run.probe.loss[-1], loss, rtol=1e-5)
    np.testing.assert_allclose(run.probe.token_accuracy[-1], acc, atol=1e-6)


def test_trainer_says_how_to_add_the_index(tmp_path):
    config = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                                          max_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                                          disable_tqdm=True)
    trainer = DynascopeTrainer(model=transformers.GPT2LMHeadModel(config), args=args, train_dataset=Tokens(),
                               data_collator=transformers.default_data_collator, record_to=tmp_path / "r.zarr")
    with pytest.raises(ValueError, match=r"IndexedDataset\(dataset, key='example_id'\)"):
        trainer.train()
    assert analysis.open_run(tmp_path / "r.zarr").status == "failed"


def test_trainer_optimises_exactly_hfs_loss_under_gradient_accumulation(tmp_path):
    """Same data order and seed: DynascopeTrainer ends at the parameters a plain Trainer reaches."""
    config = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    finals = []
    for recorded in (False, True):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config)
        args = transformers.TrainingArguments(output_dir=str(tmp_path / f"out{recorded}"), per_device_train_batch_size=4,
                                              gradient_accumulation_steps=2, num_train_epochs=1, learning_rate=1e-2,
                                              report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                                              disable_tqdm=True, seed=0, optim="sgd")
        # SGD: Adam would turn float-rounding noise in zero gradients (GPT-2's key bias) into full steps
        if recorded:
            trainer = DynascopeTrainer(model=model, args=args, train_dataset=IndexedDataset(Tokens()),
                                       data_collator=transformers.default_data_collator,
                                       record_to=tmp_path / "ga.zarr")
        else:
            trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                           data_collator=transformers.default_data_collator)
        trainer.train()
        finals.append({k: v.detach().clone() for k, v in model.named_parameters()})
    for k in finals[0]:
        torch.testing.assert_close(finals[1][k], finals[0][k], rtol=1e-5, atol=1e-6, msg=k)
    train = analysis.open_run(tmp_path / "ga.zarr").train
    np.testing.assert_array_equal(train.optimizer_step, np.arange(6) // 2)   # 6 micro-batches, 3 steps
