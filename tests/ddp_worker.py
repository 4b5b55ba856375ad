"""One rank of the DDP test (tests/test_ddp.py runs it with torchrun, 2 processes, gloo).

Rank 0 hands the Recorder the DDP wrapper, rank 1 the module inside it: both must work.
Each rank saves what it gave `step.record` (and rank 0 the probe losses recomputed
independently) to `<out>.rank<r>.npz` for the test to compare against the merged run."""
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

N, EPOCHS, BATCH = 24, 3, 4


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    torch.manual_seed(0)   # same initial weights on every rank (DDP also broadcasts them)
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(N, 5, generator=g), torch.arange(N) % 3
    data = IndexedDataset(TensorDataset(X, Y))
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=BATCH, sampler=sampler)
    model = nn.Linear(5, 3)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    probe = [(X[:8], Y[:8], torch.arange(8))]
    ids, losses, probe_losses = [], [], []
    with Recorder(out, ddp if rank == 0 else ddp.module, num_classes=3, num_examples=N,
                  optimizer=opt, chunk_steps=2, param_stats_every=1) as rec:
        for epoch in range(EPOCHS):
            sampler.set_epoch(epoch)
            for x, y, idx in loader:
                with rec.step(example_ids=idx, targets=y) as step:
                    logits = ddp(x)
                    loss = F.cross_entropy(logits, y, reduction="none")
                    step.record(losses=loss, logits=logits)
                    loss.mean().backward()
                opt.step()
                opt.zero_grad()
                ids.append(idx.numpy())
                losses.append(loss.detach().numpy())
            rec.probe(probe)   # a no-op on rank 1; rank 0 uses the module, no collectives
            with torch.no_grad():
                probe_losses.append(F.cross_entropy(model(X[:8]), Y[:8], reduction="none").numpy())
    np.savez(f"{out}.rank{rank}.npz", ids=np.stack(ids), losses=np.stack(losses), probe=np.stack(probe_losses))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
