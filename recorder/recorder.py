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

Epochs: pass `rec.step(..., epoch=e)` or set `rec.epoch`; otherwise they are inferred from
repeated example ids (recorder/epochs.py). `Recorder(path, ..., resume=True)` continues an
interrupted run from its committed rows (`rec.steps` is where the loop goes on); a lock in
`<run>/.dynascope/` keeps a second writer out. Durability: docs/STORE.md.

Tensors are detached and handed to the background writer as they are (still on the GPU
if they were): the device-to-host copy happens once per chunk in the writer thread, so
the training step never synchronises on the recorder.
"""
from __future__ import annotations

import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from dynascope import storage

from . import distributed
from . import batches
from . import sequence as seq_mod
from . import resume as resume_mod
from . import store as store_mod
from .epochs import EpochTracker
from .extensions import ArraySpec, BatchContext, Extension
from .lock import NoLock, RunLock, control_dir
from .reserve import DiskReserve
from .signals import SignalGuard
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
                 storage_options: dict | None = None, task: str | None = None,
                 sequence: dict | seq_mod.SequenceOptions | None = None, resume: bool = False,
                 resume_state: dict | None = None, handle_signals: bool = True, **extension_options):
        if num_classes is not None and (int(num_classes) != num_classes or num_classes < 1):
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if num_examples is not None and (int(num_examples) != num_examples or num_examples < 1):
            raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}")
        if task is not None and task not in seq_mod.TASKS:
            raise ValueError(f"task must be one of {seq_mod.TASKS}, got {task!r}")
        if task == "classification" and num_classes is None:
            raise ValueError("task='classification' needs num_classes=")
        self.sequence = seq_mod.SequenceOptions.build(sequence)
        # None: decided by the first targets (integer (B, T) with num_classes: a sequence run)
        self.task = task or ("sequence" if sequence is not None else None)
        # accelerate (HF Trainer) wraps the optimizer; hooks go on the torch optimizer inside
        while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
            optimizer = optimizer.optimizer
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
        if resume and overwrite:
            raise ValueError("resume=True continues a run and overwrite=True replaces it; pass one of them")
        self.resume = bool(resume or resume_state is not None)
        self.resume_state = resume_state
        if int(chunk_steps) != chunk_steps or chunk_steps < 1:
            raise ValueError(f"chunk_steps must be a positive integer, got {chunk_steps!r}")
        self.chunk_steps = int(chunk_steps)
        self.expected_steps = expected_steps
        self._loss_fn = loss_fn
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
        self._target_declared = False
        self._writer: ChunkWriter | None = None
        self._handles: list = []
        self._t0 = 0.0
        # under DDP each rank sees its shard: ceil(N / world) examples an epoch
        self._epochs = EpochTracker(distributed.examples_per_epoch(self.num_examples, self.rank))
        self._local = loc.local is not None   # lock and reserve need a directory; object stores have none
        store_dir = distributed.rank_path(self.path, self.rank) if self._local else None
        self._lock = RunLock(store_dir) if self._local else NoLock()
        self._reserve = DiskReserve(control_dir(store_dir)) if self._local else NoLock()
        self._guard = SignalGuard() if handle_signals else None
        self._notified = 0

    # -- lifecycle ------------------------------------------------------------
    def __enter__(self) -> "Recorder":
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self._finish("failed", error=f"{exc_type.__name__}: {exc}" if str(exc) else exc_type.__name__)
        return False

    def open(self) -> "Recorder":
        if self.resume:
            if not self._local or self.rank.active:
                raise ValueError("resume=True needs a local run directory recorded by one process; "
                                 "object-store and multi-rank runs cannot be resumed yet")
            stored = resume_mod.stored_attrs(self.path)
            self._lock.acquire("resume it")
            try:
                root = resume_mod.reopen(self.path, stored)
            except BaseException:
                self._lock.release()
                raise
            committed = dict(stored.get("committed", {}))
        else:
            root = distributed.after_main(self.rank, lambda: store_mod.create_store(
                distributed.rank_path(self.path, self.rank), overwrite=self.overwrite,
                attrs={**self._root_attrs(), **distributed.root_attrs(self.rank)},
                storage_options=self.storage_options, lock=self._lock))
            committed = {}
        try:
            self._open_writer(root, committed, stored if self.resume else None)
        except BaseException as e:
            self._abandon_open(e)
            raise
        self._reserve.hold()
        if self._guard is not None:
            self._guard.install()
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_post_hook(self._count_optimizer_step))
        self._t0 = time.perf_counter()
        if self.resume_state is not None:
            resume_mod.load_recorder_state(self, self._writer.root, self.resume_state)
        return self

    def _abandon_open(self, error: BaseException) -> None:
        """A bad argument found while opening: a new store holds nothing yet and goes (so
        the same command works once fixed); a resumed one keeps its rows, marked failed."""
        writer, self._writer = self._writer, None
        if writer is not None:
            attrs = {"status": "failed", "error": f"resume failed: {type(error).__name__}: {error}"} if self.resume else None
            writer.abort(attrs)
        if not self.resume and self._local:
            shutil.rmtree(distributed.rank_path(self.path, self.rank), ignore_errors=True)
        self._lock.release()

    def _open_writer(self, root, committed: dict, stored: dict | None) -> None:
        self._writer = ChunkWriter(root, committed={g: int(committed.get(g, 0)) for g, _, _ in store_mod.ROW_GROUPS})
        for name, row_dim, chunk in store_mod.ROW_GROUPS:
            self._writer.add_group(name, row_dim, self.chunk_steps if chunk == "steps" else 1)
        for spec in store_mod.core_specs(self.num_classes is not None):
            self._writer.declare(spec)
        for group, row in (("train", "step"), ("probe", "probe"), ("eval", "eval")):
            for spec in seq_mod.specs(group, row, "slot" if group == "train" else "example"):
                self._writer.declare(spec)
        if stored is not None:
            resume_mod.check_matches(self.path, stored, self._root_attrs(), [e.name for e in self.extensions])
        for ext in self.extensions:
            ext.attach(self)
            for spec in ext.specs():
                self._writer.declare(spec)
        if stored is not None:
            self._writer.adopt()
            if self.resume_state is None:
                resume_mod.align_groups(self, self._writer, root)
                resume_mod.counters_from_store(self, root)
        self._writer.update_attrs({"extensions": {e.name: e.metadata() for e in self.extensions}})

    def state_dict(self) -> dict:
        """Counters and extension state, after flushing everything: with the model and
        optimizer state this lets `Recorder(..., resume_state=...)` continue exactly here."""
        return resume_mod.recorder_state(self)

    def flush(self) -> None:
        """Write every buffered row now (partial chunks included) and wait for it."""
        self.writer.flush()

    def close(self) -> None:
        self._finish("complete")

    def _root_attrs(self) -> dict:
        params = list(self.model.parameters())
        dataset = {"name": "custom", "task": self.task or ("classification" if self.num_classes else "regression"),
                   "num_examples": self.num_examples, "num_classes": self.num_classes,
                   "class_names": [str(i) for i in range(self.num_classes or 0)] if self.task != "sequence" else [],
                   **self.dataset_info}
        if self.task == "sequence":
            dataset["sequence"] = self.sequence.metadata()
        model = {"name": type(self.model).__name__, "num_parameters": sum(p.numel() for p in params),
                 "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
                 "summary": str(self.model)[:4000], **self.model_info}
        return {"config": self.config, "dataset": dataset, "model": model,
                "committed": {name: 0 for name, _, _ in store_mod.ROW_GROUPS}}

    def _finish(self, status: str, error: str | None = None) -> None:
        """Flush extensions and buffers, record the final status; on failure keep
        everything already recorded and never mask the original error. Signals are held
        back meanwhile, so a second Ctrl-C cannot cut the store short."""
        if self._writer is None:
            return
        writer = self._writer
        if self._guard is not None:
            self._guard.hold()
        try:
            for h in self._handles:
                h.remove()
            self._handles = []
            if status == "complete":
                try:
                    self._close_extensions(strict=True)
                    writer.update_attrs({"extensions": {e.name: e.metadata() for e in self.extensions},
                                         **self._final_attrs("complete")})
                    writer.close(trim=True)
                except BaseException as e:
                    self._fail(writer, f"closing the store failed: {type(e).__name__}: {e}")
                    raise
                store_mod.consolidate(distributed.rank_path(self.path, self.rank), self.storage_options)
            else:
                self._close_extensions(strict=False)
                self._fail(writer, error)
        finally:
            self._notify(writer)
            self._writer = None
            if self._guard is not None:
                self._guard.remove()
            self._reserve.free()
            self._lock.release()

    def _final_attrs(self, status: str, error: str | None = None) -> dict:
        attrs = {"status": status, "finished": store_mod.now(), "epoch_source": self._epochs.source}
        if error:
            attrs["error"] = error
        return attrs

    def _close_extensions(self, strict: bool) -> None:
        for stage in ("close", "detach"):
            for ext in self.extensions:   # extensions may append their last rows on close
                try:
                    ext.close(self) if stage == "close" else ext.detach()
                except Exception:  # noqa: BLE001
                    if strict:
                        raise

    def _fail(self, writer: ChunkWriter, error: str | None) -> None:
        attrs = {"extensions": {e.name: e.metadata() for e in self.extensions}, **self._final_attrs("failed", error)}
        problems = writer.abort(attrs, before=self._reserve.free)
        for p in problems:
            print(f"dynascope: while marking {self.path} failed: {p}", file=sys.stderr)
        if problems:
            print(f"dynascope: {self.path} stays readable up to its committed rows", file=sys.stderr)

    def _notify(self, writer: ChunkWriter | None = None) -> None:
        writer = writer or self._writer
        notes = writer.notices if writer is not None else []
        for note in notes[self._notified:]:
            warnings.warn(note, stacklevel=3)
        self._notified = len(notes)

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
            targets = self._check_targets(targets, len(ids), "train")
        elif self.num_classes is not None:
            raise ValueError("rec.step() needs targets= in a classification run (num_classes was given): "
                             "without them correctness, forgetting, AUM, EL2N and cartography cannot be "
                             "computed; pass rec.step(example_ids=idx, targets=y)")
        epoch = self._epochs.next(ids.numpy(), epoch if epoch is not None else self.epoch)
        return StepContext(self, ids, targets, int(epoch))

    @property
    def loss_fn(self):
        if self._loss_fn is not None:
            return self._loss_fn
        if self.task == "sequence":
            return lambda logits, y: seq_mod.sequence_loss(logits, y, self.sequence)
        return _classification_loss if self.task == "classification" or (
            self.task is None and self.num_classes) else _regression_loss

    @loss_fn.setter
    def loss_fn(self, fn) -> None:
        self._loss_fn = fn

    def _check_targets(self, targets, n: int, group: str) -> torch.Tensor:
        """Check a batch's targets; the first ones decide the task and the target array."""
        if not isinstance(targets, torch.Tensor):
            targets = torch.as_tensor(targets)
        if self.task is None:
            self._set_task(seq_mod.infer_task(targets, self.num_classes))
        if self.task == "sequence":
            return seq_mod.check_targets(targets, n, self.num_classes, self.sequence)
        t = check_targets(targets, n, self.num_classes if self.task == "classification" else None)
        if group == "train" and not self._target_declared:
            dims = ("step", "slot") if t.dim() == 1 else ("step", "slot", "output")
            if self.task == "regression" and t.dim() > 2:
                raise ValueError(f"regression targets must be (B,) or (B, k); got {tuple(t.shape)}")
            self.writer.declare(ArraySpec("train", "target", dims,
                                          "int64" if self.task == "classification" else "float32"))
            self._target_declared = True
        return t

    def _set_task(self, task: str) -> None:
        self.task = task
        attrs = self._root_attrs()["dataset"]
        self.writer.update_attrs({"dataset": attrs})

    def _count_optimizer_step(self, *args, **kwargs) -> None:
        self.optimizer_steps += 1

    def _lr(self) -> float:
        if self.optimizer is None:
            return float("nan")
        return float(self.optimizer.param_groups[0].get("lr", float("nan")))

    # -- probe and evaluation passes --------------------------------------------------
    def probe(self, loader, loss_fn=None, *, ids_key: str = batches.DEFAULT_IDS_KEY,
              targets_key: str = batches.DEFAULT_TARGETS_KEY) -> None:
        """Evaluate the fixed tracked subset as one probe row. The loader yields (x, y, example_id)
        or dicts (model keyword arguments plus the ids and targets under `ids_key`/`targets_key`)."""
        self._pass("probe", loader, loss_fn or self.loss_fn, (ids_key, targets_key))

    def evaluate(self, loader, loss_fn=None, *, ids_key: str = batches.DEFAULT_IDS_KEY,
                 targets_key: str = batches.DEFAULT_TARGETS_KEY) -> None:
        """Evaluate the held-out split as one eval row (loader batches as for `probe`)."""
        self._pass("eval", loader, loss_fn or self.loss_fn, (ids_key, targets_key))

    def _pass(self, kind: str, loader, loss_fn, keys=(batches.DEFAULT_IDS_KEY, batches.DEFAULT_TARGETS_KEY)) -> None:
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
        pairs: dict = {}
        try:
            for ext in active:
                ext.begin_pass(kind)
            for batch in loader:
                b = batches.unpack(batch, kind, *keys)
                ids = check_example_ids(b.example_ids, None if kind == "eval" else self.num_examples)
                y = self._check_targets(b.targets, len(ids), kind).to(device)
                ctx = BatchContext(kind, ids, y, step_index=self.steps)
                if b.attention_mask is not None:  # lets activations pool over real tokens only
                    ctx.extras["attention_mask"] = b.attention_mask.to(device)
                for ext in active:
                    ext.begin_batch(ctx)
                for p, _ in saved_grads:
                    p.grad = None
                with torch.set_grad_enabled(need_grad):
                    logits = batches.output_logits(batches.call_model(self.model, batches.to_device(b.inputs, device)))
                    losses = loss_fn(logits, y)
                    ctx.losses, ctx.logits = losses, logits
                    for ext in active:
                        ext.on_losses(ctx)
                    if need_grad:
                        losses.sum().backward()
                row = {"example_id": ids, "target": y.detach(), "loss": losses.detach()}
                if self.task == "sequence":
                    row.update(seq_mod.token_stats(logits, y, self.sequence))
                elif self.task == "classification":
                    row["logits"] = logits.detach()
                for ext in active:
                    row.update(ext.end_batch(ctx))
                for k, v in row.items():
                    cols.setdefault(k, []).append(v.detach().cpu() if hasattr(v, "detach") else torch.as_tensor(v))
            row_index = self.writer.committed.get(kind, 0)
            for ext in active:
                pairs.update({k: v.detach().cpu() for k, v in ext.end_pass(kind, row_index).items()})
        finally:
            for p, g in saved_grads:
                p.grad = g
            self.model.train(was_training)
        if not cols:
            raise ValueError(f"the {kind} loader yielded no batches")
        self._append_pass(kind, groups, cols, pairs)

    def _append_pass(self, kind: str, groups, cols: dict, pairs: dict | None = None) -> None:
        ids = torch.cat(cols.pop("example_id"))
        order = torch.argsort(ids)
        ids = ids[order]
        known = self._probe_ids.get(kind)
        if known is None:
            if len(torch.unique(ids)) != len(ids):
                raise ValueError(f"the {kind} loader yielded some example ids twice; each example once")
            self._probe_ids[kind] = ids
            self.write_static(kind, "example_id", ids, ("example",))
            if self.task != "sequence":   # token targets are the user's data, not stored
                target = torch.cat(cols["target"])[order]
                dims = ("example",) if target.dim() == 1 else ("example", "output")
                self.write_static(kind, "target", target, dims)
        elif not torch.equal(known, ids):
            raise ValueError(f"the {kind} pass covered different examples than the first {kind} pass; "
                             f"{kind} passes must use a fixed subset (build the loader once, shuffle=False)")
        cols.pop("target")
        for k, v in cols.items():   # sequence batches may differ in length
            if v[0].dim() >= 2 and k in seq_mod.TOKEN_ARRAYS:
                cols[k] = seq_mod.pad_tokens(v, -1 if k == "topk_token" else float("nan"))
        values = {k: torch.cat(v)[order] if v[0].dim() else torch.stack(v) for k, v in cols.items()}
        # pass-wide pair arrays (N, N, ...): both example axes sorted like the examples
        values.update({k: v[order][:, order] for k, v in (pairs or {}).items()})
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
        if self.rec.writer.notices:
            self.rec._notify()
        for ext in self.rec.extensions:
            ext.begin_batch(self.batch)
        return self

    def record(self, losses: torch.Tensor, logits: torch.Tensor | None = None) -> None:
        """Give the per-example losses (reduction='none') and, for classification, the logits."""
        if self._recorded:
            raise RuntimeError("step.record() was called twice in one rec.step(); call it once per batch")
        n = self.batch.batch_size
        self.batch.losses = check_losses(losses, n)
        rec = self.rec
        if logits is not None and rec.task == "sequence":
            if self.batch.targets is None:
                raise ValueError("sequence logits need the token targets: pass rec.step(example_ids=..., targets=tokens)")
            seq_mod.check_logits(logits, self.batch.targets, rec.num_classes, rec.sequence)
            self.batch.logits = logits
            self.batch.extras["sequence"] = seq_mod.token_stats(logits, self.batch.targets, rec.sequence)
        elif logits is not None:
            self.batch.logits = check_logits(logits, n, rec.num_classes)
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
               "optimizer_step": rec.optimizer_steps, "lr": rec._lr(),
               "batch_size": b.batch_size, "wall_time": time.perf_counter() - rec._t0}
        if "sequence" in b.extras:      # reduced on the device: the (B, T, V) logits are not kept
            row.update(b.extras["sequence"])
        else:
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
