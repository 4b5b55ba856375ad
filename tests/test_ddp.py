"""Two DDP ranks (torchrun, gloo on CPU) record one run without racing, and `open_run`
presents one train table: every rank's batch of step k in row k, each example once per
epoch, epochs right, probes from rank 0 equal to an independent recomputation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch.distributed

from dynascope import analysis
from torchrun_helpers import torchrun
WORKER = Path(__file__).with_name("ddp_worker.py")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run.zarr"
    torchrun(WORKER, out)
    logs = [np.load(f"{out}.rank{r}.npz") for r in range(2)]
    return out, logs


def test_ranks_merge_into_one_train_table(ddp_run):
    out, logs = ddp_run
    run = analysis.open_run(out)
    train = run.train.load()
    assert run.status == "complete" and run.attrs["distributed"]["status"] == {"0": "complete", "1": "complete"}
    assert dict(train.sizes) == {"step": 9, "slot": 8, "class": 3}               # 24 examples / (2 ranks x 4) per epoch
    for r, log in enumerate(logs):
        block = slice(4 * r, 4 * r + 4)
        np.testing.assert_array_equal(train.example_id[:, block], log["ids"])
        np.testing.assert_array_equal(train.loss[:, block], log["losses"])
        np.testing.assert_array_equal(train.slot_rank[block], r)
    np.testing.assert_array_equal(train.epoch, np.repeat([0, 1, 2], 3))   # not halved
    for e in range(3):
        ids = train.example_id.where(train.epoch == e, drop=True).values.ravel()
        np.testing.assert_array_equal(np.sort(ids), np.arange(24))         # each example once per epoch
    np.testing.assert_array_equal(train.batch_size, 8)
    np.testing.assert_allclose(train.batch_loss, np.concatenate([logs[0]["losses"], logs[1]["losses"]], 1).mean(1),
                               rtol=1e-6)
    f = analysis.forgetting(run)
    np.testing.assert_array_equal(f.presentations, 3)


def test_rank0_owns_metadata_probes_and_parameters(ddp_run):
    out, logs = ddp_run
    run = analysis.open_run(out)
    assert run.probe.sizes["probe"] == 3
    np.testing.assert_allclose(run.probe.loss.values, logs[0]["probe"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(logs[0]["probe"], logs[1]["probe"])   # the ranks' weights agree
    assert run.attrs["model"]["name"] == "Linear"                        # the module, not the wrapper
    rank1 = out / "ranks" / "1"
    assert (rank1 / "train" / "loss").is_dir()
    assert not (rank1 / "probe").exists() and not (rank1 / "params").exists()
    assert run.has("params") and run.group("params").sizes["step"] == 9


def test_existing_run_stops_every_rank_with_the_reason(ddp_run):
    """Rank 0 refuses to overwrite; rank 1 must not hang waiting for it, nor write inside."""
    out, _ = ddp_run
    before = analysis.open_run(out).train.load()
    proc = torchrun(WORKER, out, check=False)
    assert proc.returncode != 0
    assert "already exists" in proc.stderr and "rank 0 could not create the run, so rank 1 records nothing" in proc.stderr
    import xarray as xr

    xr.testing.assert_identical(analysis.open_run(out).train.load(), before)
