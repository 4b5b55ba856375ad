"""One rank of the DDP gradient-extension test (tests/test_ddp_gradients.py runs it with
torchrun, 2 processes, gloo): exact norms, the sketch and the in-batch Gram on a
DDP-wrapped conv + linear model. Rank 0 hands the Recorder the wrapper, rank 1 the module.

Each rank saves its batches and the weights every step started from to
`<out>.rank<r>.npz`, so the test can recompute every example's own gradient with
torch.func, independently of the recorder."""
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dynascope.recorder import IndexedDataset, Recorder  # noqa: E402

N, EPOCHS, BATCH, LR, PROJ = 16, 2, 4, 0.5, 64


def make_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(18, 3))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 1, 5, 5, generator=g), torch.arange(N) % 3


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    torch.manual_seed(0)   # same initial weights on every rank (DDP also broadcasts them)
    X, Y = data()
    ds = IndexedDataset(TensorDataset(X, Y))
    sampler = DistributedSampler(ds, shuffle=True, seed=0)
    loader = DataLoader(ds, batch_size=BATCH, sampler=sampler)
    model = make_model()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    probe = [(X[:6], Y[:6], torch.arange(6))]
    log: dict[str, list] = {"ids": [], "x": [], "y": []}
    weights: dict[str, list] = {k: [] for k, _ in model.named_parameters()}
    after_epoch: dict[str, list] = {k: [] for k, _ in model.named_parameters()}
    with Recorder(out, ddp if rank == 0 else ddp.module, num_classes=3, num_examples=N, optimizer=opt,
                  chunk_steps=2, param_stats=False, grad_norms=True, grad_projection=PROJ,
                  grad_gram=True) as rec:
        for epoch in range(EPOCHS):
            sampler.set_epoch(epoch)
            for x, y, idx in loader:
                for k, p in model.named_parameters():
                    weights[k].append(p.detach().clone().numpy())
                with rec.step(example_ids=idx, targets=y) as step:
                    logits = ddp(x)
                    loss = F.cross_entropy(logits, y, reduction="none")
                    step.record(losses=loss, logits=logits)
                    loss.mean().backward()
                opt.step()
                opt.zero_grad()
                log["ids"].append(idx.numpy())
                log["x"].append(x.numpy())
                log["y"].append(y.numpy())
            rec.probe(probe)   # rank 0 only, through the module: per-example gradients there too
            for k, p in model.named_parameters():
                after_epoch[k].append(p.detach().clone().numpy())
    np.savez(f"{out}.rank{rank}.npz", **{k: np.stack(v) for k, v in log.items()},
             **{f"w/{k}": np.stack(v) for k, v in weights.items()},
             **{f"probe_w/{k}": np.stack(v) for k, v in after_epoch.items()})
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
