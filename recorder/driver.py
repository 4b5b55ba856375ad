"""The built-in training driver behind `dynascope record` and `dynascope demo`: a plain
supervised loop over a registered dataset and model, recorded with the Recorder."""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .datasets import load_dataset
from .indexed import IndexedDataset
from .models import build_model
from .recorder import Recorder


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
    chunk_steps: int = 64
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


def record_run(cfg: TrainConfig, progress: bool = True) -> Path:
    """Train cfg.model on cfg.dataset for cfg.epochs, recording everything into cfg.out."""
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError("epochs and batch size must be at least 1")
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    bundle = load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download, seed=cfg.seed,
                          train_size=cfg.train_size, test_size=cfg.test_size, **cfg.dataset_options)
    model = build_model(cfg.model, bundle.num_classes, bundle.input_shape).to(device)
    optimizer = make_optimizer(cfg, model)
    train_set = IndexedDataset(bundle.train)
    gen = torch.Generator().manual_seed(cfg.seed)
    pin = device.type == "cuda"
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=gen, pin_memory=pin)
    probe_ids = _probe_subset(len(train_set), cfg.probe_size, cfg.seed)
    probe_loader = DataLoader(Subset(train_set, probe_ids.tolist()), batch_size=256, shuffle=False)
    eval_loader = DataLoader(IndexedDataset(bundle.test), batch_size=256, shuffle=False)
    schedule = make_schedule(cfg, optimizer, len(train_loader))
    options = _extension_options(cfg)
    recorder = Recorder(cfg.out, model, num_classes=bundle.num_classes, num_examples=len(train_set),
                        optimizer=optimizer, config=asdict(cfg), overwrite=cfg.overwrite,
                        chunk_steps=cfg.chunk_steps, expected_steps=cfg.epochs * len(train_loader),
                        dataset_info=bundle.describe(), model_info={"name": cfg.model}, **options)
    with recorder as rec:
        _write_static_data(rec, bundle)
        rec.probe(probe_loader)
        rec.evaluate(eval_loader)
        bar = tqdm(total=cfg.epochs * len(train_loader), desc=f"record {cfg.dataset}/{cfg.model}",
                   unit="step", disable=not progress, file=sys.stderr)
        for epoch in range(cfg.epochs):
            model.train()
            for x, y, idx in train_loader:
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
                bar.update(1)
            if not cfg.probe_every:
                rec.probe(probe_loader)
            rec.evaluate(eval_loader)
            bar.set_postfix(epoch=epoch)
        bar.close()
        if cfg.augment_samples:
            from .augment import record_augmentation_variance

            record_augmentation_variance(rec, model, bundle.train, [int(i) for i in _split(cfg.augment_samples)],
                                         n_aug=cfg.augment_n, layers=_split(cfg.activations) or None,
                                         pool=cfg.activation_pool, max_units=cfg.activation_max_units,
                                         device=device)
    return Path(cfg.out)
