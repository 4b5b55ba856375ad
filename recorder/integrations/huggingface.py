"""Hugging Face: a `Trainer` that records its run into a dynascope store.

    trainer = DynascopeTrainer(model=model, args=args, train_dataset=IndexedDataset(train_set),
                               data_collator=default_data_collator, record_to="run.zarr",
                               probe_dataset=Subset(IndexedDataset(train_set), range(64)),
                               record_options=dict(grad_norms=True))
    trainer.train()

Why a Trainer subclass and not a `TrainerCallback`: callbacks see neither the batch nor the
loss between the forward and the backward pass, and per-example signals need both. The
mixin (`DynascopeTrainerMixin`, for your own Trainer subclasses) does four things:

- keeps the example-index column (`ids_key`, default "example_id") that the default
  `remove_unused_columns=True` would drop, and takes it out of the model's inputs;
- computes each example's loss from the logits (a sequence's mean token cross-entropy, with
  the causal shift for causal LMs) and returns exactly the loss HF would (token-weighted over
  the batch, or over `num_items_in_batch` under gradient accumulation), built from those
  per-example losses so the recorder measures each example's weight in the backward;
- opens the recorded step before the forward pass and closes it after HF's backward;
- runs probe / eval passes before training and at every epoch's end.

accelerate wraps the optimizer; the Recorder hooks the optimizer inside the wrapper.
"""
from __future__ import annotations

try:
    import transformers
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover
    raise ImportError("recorder.integrations.huggingface needs transformers: pip install 'dynascope[hf]'") from e

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..recorder import Recorder
from ..sequence import SequenceOptions
from .common import OpenStep

__all__ = ["DynascopeTrainer", "DynascopeTrainerMixin", "is_causal_lm"]


def is_causal_lm(model) -> bool:
    """Whether HF shifts this model's labels (its class is registered as a causal LM)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover
        return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


class _Passes(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._open_recorder()
        self.trainer._record_passes()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer._record_passes()


class DynascopeTrainerMixin:
    """Mix into a `transformers.Trainer` subclass (before it): `class T(DynascopeTrainerMixin, Trainer)`.

    record_to: the store path. ids_key: the batch key of the example index
    (recorder.IndexedDataset(dataset, key=...) adds it). probe_dataset / eval_dataset_to_record:
    datasets of the same dict items, collated with the Trainer's collator. causal: whether labels
    are shifted (default: detected from the model class). num_examples: default len(train_dataset).
    record_options: keyword arguments for `Recorder` (grad_norms, grad_projection, activations,
    sequence=dict(token_losses=True, top_k=5), num_classes, task, ...).
    """

    # attribute names avoid Trainer's own (Trainer.num_examples is a method)
    def __init__(self, *args, record_to=None, ids_key: str = "example_id", probe_dataset=None,
                 eval_dataset_to_record=None, causal: bool | None = None, num_examples: int | None = None,
                 record_options: dict | None = None, **kwargs):
        if record_to is None:
            raise TypeError("DynascopeTrainer needs record_to=<path of the run store>")
        super().__init__(*args, **kwargs)
        self.record_to = record_to
        self.ids_key = ids_key
        self.probe_dataset = probe_dataset
        self.eval_dataset_to_record = eval_dataset_to_record
        self.causal = is_causal_lm(self.model) if causal is None else bool(causal)
        self.record_num_examples = num_examples
        self.record_options = dict(record_options or {})
        self.recorder: Recorder | None = None
        self._open_step = OpenStep()
        self.add_callback(_Passes(self))

    # -- the index column survives remove_unused_columns --------------------------------
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.ids_key not in self._signature_columns:
            self._signature_columns.append(self.ids_key)

    # -- recorder lifecycle ---------------------------------------------------------------
    def _open_recorder(self) -> None:
        if self.recorder is not None:
            return
        opts = dict(self.record_options)
        config = getattr(self.model, "config", None)
        sequence_model = self.causal or type(self.model).__name__.endswith(("ForMaskedLM", "LMHeadModel"))
        if sequence_model:
            opts.setdefault("task", "sequence")
            opts.setdefault("num_classes", getattr(config, "vocab_size", None))
            seq = opts.get("sequence") or {}
            if isinstance(seq, dict):
                opts["sequence"] = {"causal_shift": self.causal, **seq}
        else:
            opts.setdefault("num_classes", getattr(config, "num_labels", None))
        n = self.record_num_examples if self.record_num_examples is not None else len(self.train_dataset)
        self.recorder = Recorder(self.record_to, self.model, num_examples=n, optimizer=self.optimizer,
                                 config={"trainer": "transformers", "transformers": transformers.__version__},
                                 **opts).open()

    def train(self, *args, **kwargs):
        try:
            out = super().train(*args, **kwargs)
        except BaseException as e:
            if self.recorder is not None:
                rec, self.recorder = self.recorder, None
                rec._finish("failed", error=f"{type(e).__name__}: {e}")
            raise
        if self.recorder is not None:
            rec, self.recorder = self.recorder, None
            rec.close()
        return out

    def _loader(self, dataset):
        return DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size,
                          collate_fn=self.data_collator, shuffle=False)

    def _record_passes(self) -> None:
        keys = {"ids_key": self.ids_key, "targets_key": "labels"}
        if self.probe_dataset is not None:
            self.recorder.probe(self._loader(self.probe_dataset), **keys)
        if self.eval_dataset_to_record is not None:
            self.recorder.evaluate(self._loader(self.eval_dataset_to_record), **keys)

    # -- one recorded step ---------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        inputs = dict(inputs)
        if self.ids_key not in inputs:
            raise ValueError(f"the training batch has no {self.ids_key!r} column (keys: {sorted(inputs)}); "
                             f"wrap the train dataset in recorder.IndexedDataset(dataset, key={self.ids_key!r}) "
                             f"or pass ids_key=<your index column>")
        ids = inputs.pop(self.ids_key)
        self.recorder.epoch = int(self.state.epoch or 0)
        self._open_step.open(self.recorder, ids, inputs.get("labels"))
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._open_step.close()
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        step = self._open_step.ctx
        if step is None or "labels" not in inputs:     # evaluation, prediction: HF's own loss
            inputs = {k: v for k, v in inputs.items() if k != self.ids_key}
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        losses, weights = self._per_example(logits, labels)
        step.record(losses=losses, logits=logits)
        # HF's own loss, as a function of the recorded losses: sum over examples of weight x loss
        scaled_for_ga = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        total = num_items_in_batch if scaled_for_ga else weights.sum()
        loss = (torch.where(weights > 0, losses, 0.0) * weights).sum() / total
        return (loss, outputs) if return_outputs else loss

    def _per_example(self, logits, labels):
        """(per-example losses, their weights in HF's loss): scored tokens for sequences."""
        if labels.dim() == 1:
            losses = F.cross_entropy(logits.float(), labels, reduction="none")
            return losses, torch.ones_like(losses)
        opts = SequenceOptions(causal_shift=self.causal)
        z, y = (logits[:, :-1], labels[:, 1:]) if self.causal else (logits, labels)
        tok = F.cross_entropy(z.float().transpose(1, 2), y, ignore_index=opts.ignore_index, reduction="none")
        n = (y != opts.ignore_index).sum(1)
        losses = tok.sum(1) / n.clamp_min(1) + torch.where(n > 0, 0.0, float("nan"))
        return losses, n.to(losses.dtype)


class DynascopeTrainer(DynascopeTrainerMixin, Trainer):
    """`transformers.Trainer` that records per-example signals into `record_to`."""
