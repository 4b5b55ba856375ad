"""Lightning: one callback records a `Trainer.fit` run into a dynascope store.

    trainer = pl.Trainer(callbacks=[DynascopeCallback("run.zarr", num_classes=10,
                                                      probe_loader=probe_loader, grad_norms=True)])

`training_step` returns the per-example losses (and logits) next to the loss Lightning
backpropagates: ``return {"loss": losses.mean(), "losses": losses, "logits": logits}``.
Batches are `(x, y, example_id)` (recorder.IndexedDataset) or dicts; name the ids and targets
with `ids=` / `targets=` (a position, a key or a callable) where they are elsewhere.

Why the callback wraps `training_step`: Lightning calls backward *after* training_step
returns, so the recorded step is opened before the forward pass (gradient hooks must see it),
given the losses as soon as training_step returns (before backward, so their weight in the
backward can be measured) and closed in `on_after_backward`. Under gradient accumulation
every micro-batch is one train row; `optimizer_step` says which optimizer step it fed, and the
per-example gradient signals stay exact (Lightning's 1/accumulate_grad_batches is measured
and divided out like the 1/B of a mean).
"""
from __future__ import annotations

from collections.abc import Mapping

try:
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover - the newer package name
    try:
        import lightning.pytorch as pl
    except ImportError as e:
        raise ImportError("recorder.integrations.lightning needs Lightning: pip install 'dynascope[lightning]'") from e

from ..recorder import Recorder
from .common import OpenStep, pick

__all__ = ["DynascopeCallback"]


class DynascopeCallback(pl.Callback):
    """Record per-example losses, logits, gradient signals, probes and evals of `Trainer.fit`.

    path: the store. ids / targets: where a batch keeps them (default position 2 and 1 of a
    tuple batch, "example_id" and "labels" of a dict batch). num_examples: defaults to the
    length of the train dataloader's dataset. probe_loader / eval_loader: passes run before
    training and after every `probe_every_n_epochs` epochs (and every `probe_every_n_steps`
    optimizer steps if set). Other keyword arguments go to `Recorder` (num_classes, task,
    sequence, grad_norms, grad_projection, activations, ...).
    """

    def __init__(self, path, *, ids=None, targets=None, num_examples: int | None = None,
                 probe_loader=None, eval_loader=None, probe_every_n_epochs: int = 1,
                 probe_every_n_steps: int = 0, ids_key: str = "example_id", targets_key: str = "labels",
                 **recorder_options):
        self.path = path
        self.ids, self.targets = ids, targets
        self.num_examples = num_examples
        self.probe_loader, self.eval_loader = probe_loader, eval_loader
        self.probe_every_n_epochs = int(probe_every_n_epochs)
        self.probe_every_n_steps = int(probe_every_n_steps)
        self.keys = {"ids_key": ids_key, "targets_key": targets_key}
        self.options = recorder_options
        self.recorder: Recorder | None = None
        self._step = OpenStep()
        self._original = None
        self._last_probe_step = -1

    # -- lifecycle -----------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        n = self.num_examples
        loader = trainer.train_dataloader
        if n is None and hasattr(loader, "dataset"):
            n = len(loader.dataset)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.recorder = Recorder(self.path, pl_module, num_examples=n, optimizer=optimizer,
                                 **self.options).open()
        self._original = pl_module.training_step
        pl_module.training_step = self._training_step
        self._passes(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore(pl_module)
        if self.recorder is not None:
            rec, self.recorder = self.recorder, None
            rec.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore(pl_module)
        if self.recorder is not None:
            rec, self.recorder = self.recorder, None
            rec._finish("failed", error=f"{type(exception).__name__}: {exception}")

    def _restore(self, pl_module) -> None:
        if self._original is not None:
            pl_module.__dict__.pop("training_step", None)
            self._original = None

    # -- one recorded step across Lightning's hooks ----------------------------------
    def _training_step(self, batch, *args, **kwargs):
        rec = self.recorder
        dict_batch = isinstance(batch, Mapping)
        ids = pick(batch, self.ids if self.ids is not None else (self.keys["ids_key"] if dict_batch else 2), "ids")
        targets = pick(batch, self.targets if self.targets is not None else
                       (self.keys["targets_key"] if dict_batch else 1), "targets")
        rec.epoch = rec.model.trainer.current_epoch
        step = self._step.open(rec, ids, targets)
        out = self._original(batch, *args, **kwargs)
        if out is None:            # Lightning skips backward: nothing to record
            self._step.discard()
            return out
        if not isinstance(out, Mapping) or "losses" not in out:
            self._step.discard()
            raise ValueError("with DynascopeCallback, training_step must return the per-example losses too: "
                             "return {'loss': losses.mean(), 'losses': losses, 'logits': logits} "
                             "(losses with reduction='none')")
        step.record(losses=out["losses"], logits=out.get("logits"))
        return out

    def on_after_backward(self, trainer, pl_module) -> None:
        self._step.close()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._step.close()         # manual optimisation without backward, or a skipped backward
        n = self.probe_every_n_steps
        if n and trainer.global_step and trainer.global_step % n == 0 and trainer.global_step != self._last_probe_step:
            self._last_probe_step = trainer.global_step
            self._passes(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.probe_every_n_epochs and (trainer.current_epoch + 1) % self.probe_every_n_epochs == 0:
            self._passes(trainer)

    def _passes(self, trainer) -> None:
        if self.probe_loader is not None:
            self.recorder.probe(self.probe_loader, **self.keys)
        if self.eval_loader is not None:
            self.recorder.evaluate(self.eval_loader, **self.keys)
