"""Running analyses on the user's dask.distributed cluster.

The analyses compute through dask's current scheduler, so connecting a `distributed.Client`
is all it takes: every load of a run's arrays then runs on the cluster's workers. This
module only connects to a scheduler that already exists; it never starts one (an implicit
LocalCluster would silently compete with the user's own for cores and memory).
"""
from __future__ import annotations

from contextlib import contextmanager


class SchedulerError(RuntimeError):
    """The scheduler address cannot be used, with what to do about it."""


@contextmanager
def scheduler(address: str | None, timeout: float = 10.0):
    """`with scheduler("tcp://10.0.0.5:8786"):` run dask work on that cluster; None keeps
    dask's default (threads in this process). Yields the Client, or None."""
    if not address:
        yield None
        return
    try:
        from distributed import Client
    except ImportError:
        raise SchedulerError("a dask scheduler address was given but dask.distributed is not installed; "
                             "pip install 'dynascope[cluster]' (or distributed)") from None
    try:
        client = Client(address, timeout=timeout, set_as_default=True)
    except (OSError, TimeoutError) as e:
        raise SchedulerError(f"could not reach the dask scheduler at {address} within {timeout:g} s ({e}); "
                             f"start it (`dask scheduler`, `dask worker ADDRESS`) or fix the address") from None
    try:
        yield client
    finally:
        client.close()
