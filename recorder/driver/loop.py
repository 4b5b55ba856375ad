"""The built-in training driver behind `dynascope record` and `dynascope demo`: a plain
supervised loop over a registered dataset and model, recorded with the Recorder."""
from __future__ import annotations

import random
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .datasets import load_dataset
from ..indexed import IndexedDataset
from .models import build_model
from ..recorder import Recorder


@dataclass
class TrainConfig:
    """Everything a recorded run depends on; stored verbatim in the run's `config` attr."""

    dataset: str = "planted"
    model: str = "cnn"
    epochs: int = 10
    out: str = "data/run.zarr"
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "none"            # none | cosine | step
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda
    data_dir: str = "data"
    download: bool = False
    train_size: int | None = None
    test_size: int | None = None
    probe_size: int = 500
    probe_every: int = 0              # steps between probe passes; 0 = once per epoch
    grad_norms: bool = False
    grad_proj_dim: int = 0            # 0 = no projections
    grad_gram: bool = False           # exact in-batch gradient Gram per training step
    grad_seed: int = 0
    grad_layers: str | None = None    # comma-separated module names / fnmatch patterns
    param_stats: bool = True
    snapshot_params: str | None = None  # comma-separated parameter names, or "all"
    snapshot_every: int = 0
    activations: str | None = None    # comma-separated layer names or module types
    activation_pool: str = "mean"
    activation_max_units: int = 2048
    augment_samples: str | None = None  # comma-separated training example ids
    augment_n: int = 300
    overwrite: bool = False
    resume: bool = False              # continue an interrupted run at `out` from its checkpoint
    chunk_steps: int = 64
    checkpoint_every: int = 64        # steps between checkpoints (and at every epoch end); 0 = none
    dataset_options: dict = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    builders = {
        "sgd": lambda: torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay),
        "adam": lambda: torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
    }
    if cfg.optimizer not in builders:
        raise ValueError(f"optimizer must be one of {sorted(builders)}, got {cfg.optimizer!r}")
    return builders[cfg.optimizer]()


def make_schedule(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    total = max(1, cfg.epochs * steps_per_epoch)
    builders = {
        "none": lambda: None,
        "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total),
        "step": lambda: torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, total // 3), gamma=0.1),
    }
    if cfg.schedule not in builders:
        raise ValueError(f"schedule must be one of {sorted(builders)}, got {cfg.schedule!r}")
    return builders[cfg.schedule]()


def _split(text: str | None) -> list[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def _extension_options(cfg: TrainConfig) -> dict:
    """Recorder keywords for the extensions the config asks for."""
    options: dict = {"param_stats": cfg.param_stats}
    if cfg.param_stats and cfg.snapshot_params:
        snap = _split(cfg.snapshot_params)
        options.update(snapshot_params="all" if snap == ["all"] else snap,
                       snapshot_every=cfg.snapshot_every or 1)
    if cfg.grad_norms or cfg.grad_proj_dim or cfg.grad_gram:
        options.update(grad_norms=cfg.grad_norms, grad_projection=cfg.grad_proj_dim or None,
                       grad_gram=cfg.grad_gram, grad_seed=cfg.grad_seed,
                       grad_layers=_split(cfg.grad_layers) or None)
    if cfg.activations:
        options.update(activations=_split(cfg.activations), activation_pool=cfg.activation_pool,
                       activation_max_units=cfg.activation_max_units)
    return options


def _probe_subset(n: int, size: int, seed: int) -> np.ndarray:
    if size <= 0 or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed + 1).choice(n, size=size, replace=False))


def _write_static_data(rec: Recorder, bundle) -> None:
    if bundle.ground_truth:
        rec.set_ground_truth(**bundle.ground_truth)
    images = bundle.train_images_uint8()
    if images is not None and images.nbytes <= 256 << 20:
        rec.write_static("examples", "image", images, ("example", "y", "x", "channel"))
        rec.write_static("examples", "target", np.asarray(bundle.train_targets), ("example",))


def _augment_ids(cfg: TrainConfig, n: int) -> list[int]:
    """Checked before training, so a typo does not surface after hours of it."""
    try:
        ids = [int(i) for i in _split(cfg.augment_samples)]
    except ValueError:
        raise ValueError(f"--augment-samples must be comma-separated example ids, got {cfg.augment_samples!r}") from None
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
        raise ValueError(f"--augment-samples ids {bad} are out of range: the training set has {n} examples "
                         f"(ids 0..{n - 1})")
    if len(set(ids)) != len(ids):
        raise ValueError(f"--augment-samples lists an id twice: {cfg.augment_samples!r}")
    return ids


class EpochOrder:
    """The training order of each epoch: exactly the one DataLoader(shuffle=True,
    generator=Generator().manual_seed(seed)) yields (its base-seed draw, then RandomSampler's
    two randperm calls per epoch), computed without loading data, so a resumed run can
    replay the generator up to the epoch it was killed in and continue mid-epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.gen, self.next_epoch = n, torch.Generator().manual_seed(seed), 0

    def __call__(self, epoch: int) -> np.ndarray:
        if epoch < self.next_epoch:
            raise ValueError("epoch orders are drawn in increasing epoch order")
        while True:
            torch.empty((), dtype=torch.int64).random_(generator=self.gen)   # the iterator's base seed
            order = torch.randperm(self.n, generator=self.gen)
            torch.randperm(self.n, generator=self.gen)                       # RandomSampler's tail draw
            self.next_epoch += 1
            if self.next_epoch > epoch:
                return order.numpy()


def _start(cfg: TrainConfig):
    """The checkpoint to resume from, or None to record from scratch."""
    if not cfg.resume:
        return None
    from . import checkpoint
    from .. import resume

    stored = resume.stored_attrs(Path(cfg.out))      # a clear error if there is nothing resumable
    config = {k: v for k, v in asdict(cfg).items() if k != "resume"}
    resume.check_matches(Path(cfg.out), stored, {"config": config})
    state = checkpoint.load(cfg.out)
    if state is None:
        warnings.warn(f"{cfg.out} has no checkpoint yet (killed before the first one); recording it again "
                      f"from the start", stacklevel=3)
    return state


def record_run(cfg: TrainConfig, progress: bool = True) -> Path:
    """Train cfg.model on cfg.dataset for cfg.epochs, recording everything into cfg.out.
    With cfg.resume, continue an interrupted run from its last checkpoint instead."""
    from . import checkpoint

    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError("epochs and batch size must be at least 1")
    if cfg.checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0 (0 = no checkpoints), got {cfg.checkpoint_every}")
    ckpt = _start(cfg)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    device = resolve_device(cfg.device)
    bundle = load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download, seed=cfg.seed,
                          train_size=cfg.train_size, test_size=cfg.test_size, **cfg.dataset_options)
    model = build_model(cfg.model, bundle.num_classes, bundle.input_shape).to(device)
    optimizer = make_optimizer(cfg, model)
    train_set = IndexedDataset(bundle.train)
    augment_ids = _augment_ids(cfg, len(train_set)) if cfg.augment_samples else []
    pin = device.type == "cuda"
    steps_per_epoch = -(-len(train_set) // cfg.batch_size)
    epoch_order = EpochOrder(len(train_set), cfg.seed)
    probe_ids = _probe_subset(len(train_set), cfg.probe_size, cfg.seed)
    probe_loader = DataLoader(Subset(train_set, probe_ids.tolist()), batch_size=256, shuffle=False)
    eval_loader = DataLoader(IndexedDataset(bundle.test), batch_size=256, shuffle=False)
    schedule = make_schedule(cfg, optimizer, steps_per_epoch)
    options = _extension_options(cfg)
    config = {k: v for k, v in asdict(cfg).items() if k != "resume"}
    recorder = Recorder(cfg.out, model, num_classes=bundle.num_classes, num_examples=len(train_set),
                        optimizer=optimizer, config=config, overwrite=cfg.overwrite or (cfg.resume and ckpt is None),
                        chunk_steps=cfg.chunk_steps, resume_state=ckpt["recorder"] if ckpt else None,
                        dataset_info=bundle.describe(), model_info={"name": cfg.model}, **options)
    with recorder as rec:
        if ckpt is not None:
            position = checkpoint.restore(ckpt, model, optimizer, schedule)
        else:
            _write_static_data(rec, bundle)
            rec.probe(probe_loader)
            rec.evaluate(eval_loader)
            position = {"epoch": 0, "batch": 0}
        total = cfg.epochs * steps_per_epoch
        bar = tqdm(total=total, initial=min(rec.steps, total), desc=f"record {cfg.dataset}/{cfg.model}",
                   unit="step", disable=not progress, file=sys.stderr)
        for epoch in range(position["epoch"], cfg.epochs):
            model.train()
            first = position["batch"] if epoch == position["epoch"] else 0
            order = epoch_order(epoch)[first * cfg.batch_size:]
            # a generator of its own: creating the iterator must not draw from the global RNG
            loader = DataLoader(Subset(train_set, order.tolist()), batch_size=cfg.batch_size, shuffle=False,
                                generator=torch.Generator(), pin_memory=pin)
            for b, (x, y, idx) in enumerate(loader, start=first):
                x, y = x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)
                with rec.step(example_ids=idx, targets=y, epoch=epoch) as step:
                    logits = model(x)
                    losses = F.cross_entropy(logits, y, reduction="none")
                    step.record(losses=losses, logits=logits)
                    losses.mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if schedule is not None:
                    schedule.step()
                if cfg.probe_every and rec.steps % cfg.probe_every == 0:
                    rec.probe(probe_loader)
                last = b == steps_per_epoch - 1
                if last:
                    if not cfg.probe_every:
                        rec.probe(probe_loader)
                    rec.evaluate(eval_loader)
                    bar.set_postfix(epoch=epoch)
                if cfg.checkpoint_every and (last or rec.steps % cfg.checkpoint_every == 0):
                    checkpoint.save(cfg.out, rec, model, optimizer, schedule,
                                    {"epoch": epoch + 1, "batch": 0} if last else {"epoch": epoch, "batch": b + 1})
                bar.update(1)
        bar.close()
        if augment_ids:
            from ..augment import record_augmentation_variance

            record_augmentation_variance(rec, model, bundle.train, augment_ids,
                                         n_aug=cfg.augment_n, layers=_split(cfg.activations) or None,
                                         pool=cfg.activation_pool, max_units=cfg.activation_max_units,
                                         device=device)
    return Path(cfg.out)
