"""Analyses on the user's dask.distributed cluster give exactly the results of dask's default
scheduler, the work really runs on the cluster, and nothing ever starts a cluster itself."""
from __future__ import annotations

import pytest
import xarray as xr
from click.testing import CliRunner

distributed = pytest.importorskip("distributed", reason="the [cluster] extra (distributed) is not installed")

from dynascope.analysis.cluster import SchedulerError  # noqa: E402
from dynascope.analyze import run_analyses  # noqa: E402
from dynascope.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes on 127.0.0.1, closed by the test module."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as c:
        yield c


def _tasks_seen(address) -> int:
    with distributed.Client(address, set_as_default=False) as client:
        return client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)


def test_cluster_results_equal_the_default_scheduler_exactly(tiny_run, cluster):
    local = run_analyses(tiny_run, echo=lambda *_: None)
    assert distributed.client._get_global_client() is None, "no client may be created without --scheduler"
    before = _tasks_seen(cluster.scheduler_address)
    lines = []
    remote = run_analyses(tiny_run, echo=lines.append, scheduler=cluster.scheduler_address)
    assert _tasks_seen(cluster.scheduler_address) > before, "the analyses did not run on the cluster"
    assert lines[0] == f"dask scheduler: {cluster.scheduler_address} (2 workers)"
    assert sorted(remote) == sorted(local) and len(local) >= 4
    for name in local:
        xr.testing.assert_identical(remote[name].load(), local[name].load())
    assert distributed.client._get_global_client() is None, "the client is closed afterwards"


def test_cli_scheduler_option_prints_the_same_findings(tiny_run, cluster):
    runner = CliRunner()
    plain = runner.invoke(main, ["analyze", str(tiny_run), "--only", "forgetting", "--only", "cartography"])
    on_cluster = runner.invoke(main, ["analyze", str(tiny_run), "--only", "forgetting", "--only", "cartography",
                                      "--scheduler", cluster.scheduler_address])
    assert plain.exit_code == 0 and on_cluster.exit_code == 0, on_cluster.output
    first, *rest = on_cluster.output.splitlines()
    assert first.startswith(f"dask scheduler: {cluster.scheduler_address}")
    assert rest == plain.output.splitlines()


def test_unreachable_scheduler_is_one_clear_error(tiny_run):
    with pytest.raises(SchedulerError, match="could not reach the dask scheduler at tcp://127.0.0.1:9"):
        run_analyses(tiny_run, echo=lambda *_: None, scheduler="tcp://127.0.0.1:9")
    out = CliRunner().invoke(main, ["analyze", str(tiny_run), "--scheduler", "tcp://127.0.0.1:9"])
    assert out.exit_code == 1 and "could not reach the dask scheduler" in out.output
    assert "Traceback" not in out.output
