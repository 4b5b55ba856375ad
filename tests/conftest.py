"""Shared fixtures. Recorded runs are session-scoped: recording is the slow part, and
every analysis/figure test reads the same store without modifying it."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    import torch

    torch.set_num_threads(1)  # CI has 2 cores; tests are tiny, threads only add noise


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A 3-epoch `planted` run (256 train / 128 test examples) with probes and eval passes."""
    from dynascope.recorder.driver import TrainConfig, record_run

    out = tmp_path_factory.mktemp("runs") / "tiny.zarr"
    cfg = TrainConfig(dataset="planted", model="cnn", epochs=3, out=str(out), batch_size=50,
                      probe_size=64, train_size=256, test_size=128, chunk_steps=4, seed=0)
    return record_run(cfg, progress=False)


@pytest.fixture(scope="session")
def planted_noisy_run(tmp_path_factory):
    """A 12-epoch `planted` run (500 train examples, 10% flipped labels, ground truth and
    thumbnails recorded): long enough for mislabel-detection scores (~6-10 s on 1 CPU)."""
    from dynascope.recorder.driver import TrainConfig, record_run

    out = tmp_path_factory.mktemp("runs") / "planted_noisy.zarr"
    cfg = TrainConfig(dataset="planted", model="cnn", epochs=12, out=str(out), batch_size=50,
                      probe_size=100, train_size=500, test_size=200, chunk_steps=16, seed=0,
                      param_stats=False, dataset_options={"label_noise": 0.1})
    return record_run(cfg, progress=False)


@pytest.fixture(scope="session")
def opposing_runs(tmp_path_factory):
    """Two `planted` runs with exact gradient norms, the in-batch Gram and 256-d sketches at a probe pass
    every 4 steps (5 epochs, 1000 train examples): one with the planted opposing signal
    (10% of examples, classes 0 and 1), one control without it (planted_fraction=0)."""
    from dynascope.recorder.driver import TrainConfig, record_run

    base = tmp_path_factory.mktemp("opposing")
    runs = {}
    for name, fraction in (("planted", 0.1), ("control", 0.0)):
        cfg = TrainConfig(dataset="planted", model="cnn", epochs=5, out=str(base / f"{name}.zarr"),
                          batch_size=64, probe_size=300, probe_every=4, train_size=1000, test_size=100,
                          chunk_steps=16, seed=1, grad_norms=True, grad_proj_dim=256, grad_gram=True,
                          param_stats=False,
                          dataset_options={"planted_fraction": fraction, "label_noise": 0.1})
        runs[name] = record_run(cfg, progress=False)
    return runs
