"""Several torch.distributed ranks recording one run (docs/SCALE.md).

Each rank writes only its own files: rank 0 the run's root (metadata, its train rows,
probes, evals, parameter statistics), rank r > 0 a store of its own train rows under
`<run>/ranks/<r>`. No two processes ever write the same chunk or attribute file, which is
what zarr needs (concurrent writers to one chunk lose data). `analysis.open_run` merges the
ranks' train rows into one table: global step k holds every rank's batch of step k.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

RANKS_GROUP = "ranks"


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> RankInfo:
    """This process's rank and the world size (0 of 1 outside torch.distributed)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return RankInfo(dist.get_rank(), dist.get_world_size())
    return RankInfo()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers: hooks go on it (the
    wrapper calls its forward), and probe passes run through it without collectives."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model


def rank_path(path, info: RankInfo):
    """Where this rank writes: the run's root for rank 0, `ranks/<r>` inside it otherwise."""
    return path if info.is_main else path / RANKS_GROUP / str(info.rank)


def barrier(info: RankInfo) -> None:
    if info.active:
        torch.distributed.barrier()


def examples_per_epoch(num_examples: int | None, info: RankInfo) -> int | None:
    """Examples one rank sees per epoch under DistributedSampler (drop_last=False pads every
    rank to ceil(N / world)); the epoch of a step is inferred from it."""
    if num_examples is None:
        return None
    return -(-num_examples // info.world_size)


def after_main(info: RankInfo, create):
    """Run `create` on rank 0 first, then on the other ranks, so none writes inside a root
    that rank 0 is still creating or replacing. If rank 0 fails, every rank raises (rather
    than waiting forever for it)."""
    if not info.active:
        return create()
    dist = torch.distributed
    if info.is_main:
        try:
            result = create()
        except BaseException as e:
            dist.broadcast_object_list([f"{type(e).__name__}: {e}"], src=0)
            raise
        dist.broadcast_object_list([None], src=0)
        return result
    outcome = [None]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise RuntimeError(f"rank 0 could not create the run, so rank {info.rank} records nothing: {outcome[0]}")
    return create()


def root_attrs(info: RankInfo) -> dict:
    if not info.active:
        return {}
    if info.is_main:
        return {"distributed": {"world_size": info.world_size, "ranks": RANKS_GROUP}}
    return {"distributed": {"world_size": info.world_size, "rank": info.rank}}
