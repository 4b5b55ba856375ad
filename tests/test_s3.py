"""Runs recorded to and read from object storage through fsspec URLs: a moto S3 server on
127.0.0.1 (the `[s3]` extra) and fsspec's in-process `memory://` filesystem. Each remote run
must hold exactly what the same training recorded locally."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import xarray as xr

from dynascope import analysis
from dynascope.analysis import open_run
from dynascope.storage import StorageError
from dynascope.recorder import Recorder, StoreExistsError


def _train(path, storage_options=None, overwrite=False):
    """Two epochs of 4 batches over 20 examples with a probe pass per epoch."""
    torch.manual_seed(0)
    X, Y = torch.randn(20, 4), torch.arange(20) % 3
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    probe = [(X[:8], Y[:8], torch.arange(8))]
    with Recorder(path, model, num_classes=3, num_examples=20, optimizer=opt, chunk_steps=3,
                  storage_options=storage_options, overwrite=overwrite) as rec:
        for epoch in range(2):
            for ids in torch.randperm(20, generator=torch.Generator().manual_seed(epoch)).split(5):
                with rec.step(example_ids=ids, targets=Y[ids]) as step:
                    logits = model(X[ids])
                    losses = F.cross_entropy(logits, Y[ids], reduction="none")
                    step.record(losses=losses, logits=logits)
                    losses.mean().backward()
                opt.step()
                opt.zero_grad()
            rec.probe(probe)
    return path


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("local") / "run.zarr")


def _assert_same_run(remote, local):
    assert remote.status == "complete" and remote.committed == local.committed
    for group in ("train", "probe"):
        a, b = (r.group(group).drop_vars("wall_time", errors="ignore").load() for r in (remote, local))
        xr.testing.assert_identical(a, b)   # everything but the clock
    fa, fb = analysis.forgetting(remote), analysis.forgetting(local)
    xr.testing.assert_identical(fa, fb)


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 (an ephemeral port) with one bucket; stopped after."""
    pytest.importorskip("s3fs", reason="the [s3] extra (s3fs, moto[server]) is not installed")
    server_mod = pytest.importorskip("moto.server", reason="the [s3] extra (moto[server]) is not installed")
    import logging

    import boto3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)   # one log line per request otherwise
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint,
                                                                             "region_name": "us-east-1"}}
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket="runs")
        yield options
    finally:
        server.stop()


def test_s3_run_round_trips_exactly(s3, local_run):
    url = "s3://runs/exp/run.zarr"
    _train(url, storage_options=s3)
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    assert fs.exists("runs/exp/run.zarr/zarr.json") and fs.exists("runs/exp/run.zarr/train/loss/zarr.json")
    assert not Path("s3:").exists(), "an s3:// URL must never become a local folder"
    run = open_run(url, storage_options=s3)
    assert run.path.name == "run.zarr" and str(run.path) == url
    _assert_same_run(run, open_run(local_run))

    # a saved analysis goes into the bucket and reads back
    result = analysis.forgetting(run)
    analysis.save_result(run.path, "forgetting", result, {})
    assert analysis.saved_results(run.path) == ["forgetting"]
    xr.testing.assert_equal(analysis.load_result(run.path, "forgetting").load(), result.load())


def test_cli_analyzes_an_s3_run(s3, local_run):
    import json

    from click.testing import CliRunner

    from dynascope.cli import main

    url = "s3://runs/exp/cli.zarr"
    _train(url, storage_options=s3)
    remote = CliRunner().invoke(main, ["analyze", url, "--only", "forgetting", "--storage-options", json.dumps(s3)])
    local = CliRunner().invoke(main, ["analyze", str(local_run), "--only", "forgetting"])
    assert remote.exit_code == 0, remote.output
    assert remote.output.splitlines()[1:] == local.output.splitlines()[1:]   # line 0 names the run
    assert remote.output.splitlines()[0] == f"run: {url}"


def test_s3_store_is_never_overwritten_unless_asked(s3):
    url = "s3://runs/exp/twice.zarr"
    _train(url, storage_options=s3)
    with pytest.raises(StoreExistsError, match="already exists.*overwrite=True"):
        _train(url, storage_options=s3)
    _train(url, storage_options=s3, overwrite=True)
    assert open_run(url, storage_options=s3).committed["train"] == 8


def test_missing_s3_run_says_so(s3):
    with pytest.raises(analysis.RunError, match="does not exist"):
        open_run("s3://runs/nothing-here.zarr", storage_options=s3)


def test_memory_url_round_trips_exactly(local_run):
    url = f"memory://dynascope-test/{uuid.uuid4().hex}/run.zarr"
    _train(url)
    _assert_same_run(open_run(url), open_run(local_run))


def test_a_url_never_becomes_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match="looks like a URL that pathlib.Path collapsed.*'s3://bucket/run.zarr'"):
        _train(Path("s3://bucket/run.zarr"))
    with pytest.raises(StorageError, match="fsspec knows no such protocol"):
        _train("nosuchproto://bucket/run.zarr")
    with pytest.raises(StorageError, match="storage_options were given for the local path"):
        _train(tmp_path / "run.zarr", storage_options={"key": "x"})
    assert os.listdir(tmp_path) == []


def test_missing_filesystem_package_names_the_extra(monkeypatch, tmp_path):
    import importlib

    reg = importlib.import_module("fsspec.registry")   # the module; `fsspec.registry` is a mapping
    monkeypatch.setitem(reg.known_implementations, "s3",
                        {"class": "no_such_package_here.S3FileSystem", "err": "Install s3fs to access S3"})
    monkeypatch.delitem(reg._registry, "s3", raising=False)
    with pytest.raises(StorageError, match=r"s3:// needs a filesystem package .*pip install 'dynascope\[s3\]'"):
        open_run("s3://bucket/run.zarr")
    with pytest.raises(StorageError, match=r"pip install 'dynascope\[s3\]'"):
        _train("s3://bucket/run.zarr")
