"""The Recorder: hooks a plain PyTorch loop and streams per-example rows into a run store.

    with Recorder("run.zarr", model, num_classes=10, num_examples=len(train_set),
                  optimizer=optimizer) as rec:
        for x, y, idx in loader:
            with rec.step(example_ids=idx, targets=y) as step:
                logits = model(x)
                losses = F.cross_entropy(logits, y, reduction="none")
                step.record(losses=losses, logits=logits)
                losses.mean().backward()
            optimizer.step(); optimizer.zero_grad()

Tensors are detached and handed to the background writer as they are (still on the GPU
if they were): the device-to-host copy happens once per chunk in the writer thread, so
the training step never synchronises on the recorder.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dynascope import storage

from . import distributed
from . import store as store_mod
from .extensions import ArraySpec, BatchContext, Extension
from .validation import check_example_ids, check_logits, check_losses, check_targets
from .writer import ChunkWriter

PASS_GROUPS = {"train": ("train",), "probe": ("probe", "activations"), "eval": ("eval",)}


class Recorder:
    """Record a training run, example by example, into a Zarr store (docs/STORE.md)."""

    def __init__(self, path, model: torch.nn.Module, *, num_classes: int | None = None,
                 num_examples: int | None = None, optimizer: torch.optim.Optimizer | None = None,
                 config: dict | None = None, overwrite: bool = False, chunk_steps: int = 64,
                 expected_steps: int | None = None, loss_fn=None, extensions: list[Extension] = (),
                 dataset_info: dict | None = None, model_info: dict | None = None,
                 storage_options: dict | None = None, **extension_options):
        if num_classes is not None and (int(num_classes) != num_classes or num_classes < 1):
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if num_examples is not None and (int(num_examples) != num_examples or num_examples < 1):
            raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}")
        loc = storage.location(path, storage_options)   # a local Path, or an fsspec URL
        self.path = loc.local if loc.local is not None else loc
        self.storage_options = storage_options
        self.rank = distributed.current()
        self.model = distributed.unwrap(model)   # hooks and probe passes use the module inside DDP
        self.optimizer = optimizer
        self.num_classes = None if num_classes is None else int(num_classes)
        self.num_examples = None if num_examples is None else int(num_examples)
        self.config = dict(config or {})
        self.overwrite = overwrite
        self.chunk_steps = int(chunk_steps)
        self.expected_steps = expected_steps
        self.loss_fn = loss_fn or (_classification_loss if self.num_classes else _regression_loss)
        if not self.rank.is_main:   # parameters are the same on every rank: rank 0 records them
            extension_options.setdefault("param_stats", False)
        self.extensions: list[Extension] = list(extensions) + store_mod.build_extensions(extension_options, extensions)
        self.dataset_info = dict(dataset_info or {})
        self.model_info = dict(model_info or {})
        self.epoch: int | None = None      # set it to override epoch inference
        self.steps = 0                     # recorded train rows
        self.optimizer_steps = 0
        self.examples_seen = 0
        self.last_epoch = -1
        self._probe_ids: dict[str, torch.Tensor] = {}
        self._writer: ChunkWriter | None = None
        self._handles: list = []
        self._t0 = 0.0

    # -- lifecycle ------------------------------------------------------------
    def __enter__(self) -> "Recorder":
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self._finish("failed", error=f"{exc_type.__name__}: {exc}")
        return False

    def open(self) -> "Recorder":
        root = distributed.after_main(self.rank, lambda: store_mod.create_store(
            distributed.rank_path(self.path, self.rank), overwrite=self.overwrite,
            attrs={**self._root_attrs(), **distributed.root_attrs(self.rank)}, storage_options=self.storage_options))
        self._writer = ChunkWriter(root, committed={g: 0 for g, _, _ in store_mod.ROW_GROUPS}, expected_rows={"train": self.expected_steps or 0,
                                                                     "params": self.expected_steps or 0})
        for name, row_dim, chunk in store_mod.ROW_GROUPS:
            self._writer.add_group(name, row_dim, self.chunk_steps if chunk == "steps" else 1)
        for spec in store_mod.core_specs(self.num_classes is not None):
            self._writer.declare(spec)
        for ext in self.extensions:
            ext.attach(self)
            for spec in ext.specs():
                self._writer.declare(spec)
        self._writer.update_attrs({"extensions": {e.name: e.metadata() for e in self.extensions}})
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_post_hook(self._count_optimizer_step))
        self._t0 = time.perf_counter()
        return self

    def close(self) -> None:
        self._finish("complete")

    def _root_attrs(self) -> dict:
        params = list(self.model.parameters())
        dataset = {"name": "custom", "task": "classification" if self.num_classes else "regression",
                   "num_examples": self.num_examples, "num_classes": self.num_classes,
                   "class_names": [str(i) for i in range(self.num_classes or 0)], **self.dataset_info}
        model = {"name": type(self.model).__name__, "num_parameters": sum(p.numel() for p in params),
                 "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
                 "summary": str(self.model)[:4000], **self.model_info}
        return {"config": self.config, "dataset": dataset, "model": model,
                "committed": {name: 0 for name, _, _ in store_mod.ROW_GROUPS}}

    def _finish(self, status: str, error: str | None = None) -> None:
        """Flush extensions and buffers, record the final status; on failure keep
        everything already recorded and never mask the original error."""
        if self._writer is None:
            return
        writer = self._writer
        for h in self._handles:
            h.remove()
        attrs = {"status": status, "finished": store_mod.now()}
        if error:
            attrs["error"] = error
        try:
            for ext in self.extensions:   # extensions may append their last rows here
                try:
                    ext.close(self)
                except Exception:  # noqa: BLE001
                    if status == "complete":
                        raise
            for ext in self.extensions:
                try:
                    ext.detach()
                except Exception:  # noqa: BLE001
                    if status == "complete":
                        raise
            writer.update_attrs({"extensions": {e.name: e.metadata() for e in self.extensions}})
            writer.update_attrs(attrs)
            writer.close(trim=True)
        except BaseException:
            if status == "complete":
                self._writer = None
                writer.abort()
                raise
            writer.abort()
        finally:
            self._writer = None
        if status == "complete":
            store_mod.consolidate(distributed.rank_path(self.path, self.rank), self.storage_options)

    @property
    def writer(self) -> ChunkWriter:
        if self._writer is None:
            raise RuntimeError("the Recorder is not open; use it as `with Recorder(...) as rec:`")
        return self._writer

    @property
    def writer_blocked_seconds(self) -> float:
        return self._writer.blocked_seconds if self._writer else 0.0

    # -- extension API ----------------------------------------------------------
    def append_row(self, group: str, values: dict) -> None:
        self.writer.append(group, values)

    def write_static(self, group: str, name: str, data, dims, attrs: dict | None = None) -> None:
        self.writer.write_static(group, name, data, tuple(dims), attrs)

    def set_ground_truth(self, **arrays) -> None:
        """Store per-training-example truths (e.g. is_mislabeled) for scoring analyses."""
        for name, values in arrays.items():
            self.write_static("ground_truth", name, values, ("example",))

    # -- training steps -----------------------------------------------------------
    def step(self, example_ids, targets=None, epoch: int | None = None) -> "StepContext":
        """Context for one training batch: forward, `step.record(...)`, backward inside it."""
        ids = check_example_ids(example_ids, self.num_examples)
        if targets is not None:
            targets = check_targets(targets, len(ids), self.num_classes)
        if epoch is None:
            epoch = self.epoch if self.epoch is not None else (
                self.examples_seen // distributed.examples_per_epoch(self.num_examples, self.rank)
                if self.num_examples else 0)
        return StepContext(self, ids, targets, int(epoch))

    def _count_optimizer_step(self, *args, **kwargs) -> None:
        self.optimizer_steps += 1

    def _lr(self) -> float:
        if self.optimizer is None:
            return float("nan")
        return float(self.optimizer.param_groups[0].get("lr", float("nan")))

    # -- probe and evaluation passes --------------------------------------------------
    def probe(self, loader, loss_fn=None) -> None:
        """Evaluate the fixed tracked subset (loader yields (x, y, example_id)) as one probe row."""
        self._pass("probe", loader, loss_fn or self.loss_fn)

    def evaluate(self, loader, loss_fn=None) -> None:
        """Evaluate the held-out split (loader yields (x, y, example_id)) as one eval row."""
        self._pass("eval", loader, loss_fn or self.loss_fn)

    def _pass(self, kind: str, loader, loss_fn) -> None:
        if not self.rank.is_main:   # rank 0 probes and evaluates; the same script runs everywhere
            return
        writer = self.writer
        groups = PASS_GROUPS[kind]
        active = [e for e in self.extensions if any(s.group in groups for s in e.specs())]
        need_grad = any(e.needs_backward for e in active)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        saved_grads = [(p, p.grad) for p in self.model.parameters()]
        self.model.eval()
        cols: dict[str, list] = {}
        try:
            for batch in loader:
                if not isinstance(batch, (tuple, list)) or len(batch) != 3:
                    raise ValueError(f"{kind} loaders must yield (inputs, targets, example_ids) batches; "
                                     "wrap the dataset in recorder.IndexedDataset")
                x, y, idx = batch
                ids = check_example_ids(idx, None if kind == "eval" else self.num_examples)
                y = check_targets(y, len(ids), self.num_classes).to(device)
                ctx = BatchContext(kind, ids, y, step_index=self.steps)
                for ext in active:
                    ext.begin_batch(ctx)
                for p, _ in saved_grads:
                    p.grad = None
                with torch.set_grad_enabled(need_grad):
                    logits = self.model(x.to(device))
                    losses = loss_fn(logits, y)
                    ctx.losses, ctx.logits = losses, logits
                    for ext in active:
                        ext.on_losses(ctx)
                    if need_grad:
                        losses.sum().backward()
                row = {"example_id": ids, "target": y.detach(), "loss": losses.detach()}
                if self.num_classes:
                    row["logits"] = logits.detach()
                for ext in active:
                    row.update(ext.end_batch(ctx))
                for k, v in row.items():
                    cols.setdefault(k, []).append(v.detach().cpu() if hasattr(v, "detach") else torch.as_tensor(v))
        finally:
            for p, g in saved_grads:
                p.grad = g
            self.model.train(was_training)
        if not cols:
            raise ValueError(f"the {kind} loader yielded no batches")
        self._append_pass(kind, groups, cols)

    def _append_pass(self, kind: str, groups, cols: dict) -> None:
        ids = torch.cat(cols.pop("example_id"))
        order = torch.argsort(ids)
        ids = ids[order]
        known = self._probe_ids.get(kind)
        if known is None:
            if len(torch.unique(ids)) != len(ids):
                raise ValueError(f"the {kind} loader yielded some example ids twice; each example once")
            self._probe_ids[kind] = ids
            target = torch.cat(cols["target"])[order]
            self.write_static(kind, "example_id", ids, ("example",))
            self.write_static(kind, "target", target, ("example",))
        elif not torch.equal(known, ids):
            raise ValueError(f"the {kind} pass covered different examples than the first {kind} pass; "
                             f"{kind} passes must use a fixed subset (build the loader once, shuffle=False)")
        cols.pop("target")
        values = {k: torch.cat(v)[order] if v[0].dim() else torch.stack(v) for k, v in cols.items()}
        by_group: dict[str, dict] = {g: {} for g in groups}
        owner = {s.name: s.group for e in self.extensions for s in e.specs() if s.group in groups}
        for k, v in values.items():
            by_group[owner.get(k, kind)][k] = v
        by_group[kind].update(step=self.steps, epoch=self.last_epoch)
        for g, row in by_group.items():
            if row:
                self.writer.append(g, row)
        # a pass row is a whole chunk: make it durable now, without cutting the train chunk short
        self.writer.flush(groups)


class StepContext:
    """One training batch. Collects what `record` is given plus every extension's columns."""

    def __init__(self, rec: Recorder, ids: torch.Tensor, targets, epoch: int):
        self.rec = rec
        self.batch = BatchContext("train", ids, targets, step_index=rec.steps)
        self.epoch = epoch
        self._recorded = False

    def __enter__(self) -> "StepContext":
        self.rec.writer.raise_if_failed()
        for ext in self.rec.extensions:
            ext.begin_batch(self.batch)
        return self

    def record(self, losses: torch.Tensor, logits: torch.Tensor | None = None) -> None:
        """Give the per-example losses (reduction='none') and, for classification, the logits."""
        if self._recorded:
            raise RuntimeError("step.record() was called twice in one rec.step(); call it once per batch")
        n = self.batch.batch_size
        self.batch.losses = check_losses(losses, n)
        if logits is not None:
            self.batch.logits = check_logits(logits, n, self.rec.num_classes)
        self._recorded = True
        for ext in self.rec.extensions:
            ext.on_losses(self.batch)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            return False
        if not self._recorded:
            raise RuntimeError("rec.step() closed without step.record(losses=...); "
                               "call step.record(losses=per_example_losses, logits=logits) inside it")
        rec, b = self.rec, self.batch
        losses = b.losses.detach()
        row = {"example_id": b.example_ids, "loss": losses, "epoch": self.epoch,
               "optimizer_step": rec.optimizer_steps, "lr": rec._lr(), "batch_loss": losses.float().mean(),
               "batch_size": b.batch_size, "wall_time": time.perf_counter() - rec._t0}
        if b.targets is not None:
            row["target"] = b.targets.detach()
        if b.logits is not None:
            row["logits"] = b.logits.detach()
        for ext in rec.extensions:
            row.update(ext.end_batch(b))
        rec.writer.append("train", row)
        for ext in rec.extensions:
            ext.after_step(rec)
        rec.steps += 1
        rec.examples_seen += b.batch_size
        rec.last_epoch = self.epoch
        return False


def _classification_loss(logits, y):
    return F.cross_entropy(logits.float(), y, reduction="none")


def _regression_loss(pred, y):
    pred = pred.float().reshape(pred.shape[0], -1)
    return F.mse_loss(pred, y.float().reshape(pred.shape[0], -1), reduction="none").mean(1)
