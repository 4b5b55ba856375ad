"""The training step never waits on the device: nothing inside `rec.step` (with every
train-time signal on) reads a tensor's value back to the host.

On CUDA this is asserted directly with `torch.cuda.set_sync_debug_mode("error")`. Without
CUDA, the same step runs on the `meta` device, where every value-dependent host read
(`.item()`, `bool(t)`, `.tolist()`, `torch.nonzero`, a CUDA `bincount`'s size) raises: a
CPU-checkable proxy. It cannot see plain host-to-device copies, which only the CUDA test does.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynascope.recorder import Recorder
from dynascope.recorder.driver.models import build_model


class _Done(Exception):
    pass


def _steps(rec, net, opt, x, y, steps):
    for _ in range(steps):
        with rec.step(example_ids=torch.arange(len(x)), targets=y) as st:
            logits = net(x)
            losses = F.cross_entropy(logits, y, reduction="none")
            st.record(losses=losses, logits=logits)
            losses.mean().backward()
        opt.step()
        opt.zero_grad()


SIGNALS = {"params every step": dict(param_stats_every=1),
           "params under a cadence": dict(param_stats_every=2),
           "all signals": dict(param_stats_every=2, grad_norms=True, grad_projection=64)}


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("signals", list(SIGNALS))
def test_step_reads_no_values_on_the_meta_device(tmp_path, model, signals):
    if model == "mlp":
        net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
        x = torch.randn(16, 6, device="meta")
        opts = {}
    else:   # the fused conv backward checks autocast, which has no meta device: use the unfused rules
        net = build_model("cnn", 3, (3, 16, 16))
        x = torch.randn(16, 3, 16, 16, device="meta")
        opts = {"grad_fused": False} if "grad_norms" in SIGNALS[signals] else {}
    net = net.to("meta")
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    y = torch.zeros(16, dtype=torch.long, device="meta")
    with pytest.raises(_Done):   # meta rows cannot be written: end as a failed run, on purpose
        with Recorder(tmp_path / "m.zarr", net, num_classes=3, num_examples=16, optimizer=opt,
                      chunk_steps=64, **SIGNALS[signals], **opts) as rec:
            for ext in rec.extensions:
                if ext.name == "gradients":
                    # the first batch's check that the hooks saw every use of each parameter
                    # reads its verdict once, by design (checks.py); every other step must not
                    ext._checked.add("train")
            _steps(rec, net, opt, x, y, 6)
            assert rec.steps == 6
            raise _Done


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("signals", list(SIGNALS))
def test_step_never_synchronises_on_cuda(tmp_path, signals):
    torch.manual_seed(0)
    net = build_model("cnn", 10, (3, 32, 32)).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(32, 3, 32, 32, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    # chunk_steps: no chunk is handed to the writer thread (whose device copies are meant to
    # synchronise) while the debug mode, which is process-wide, is on
    with Recorder(tmp_path / "c.zarr", net, num_classes=10, num_examples=32, optimizer=opt,
                  chunk_steps=64, **SIGNALS[signals]) as rec:
        _steps(rec, net, opt, x, y, 2)          # first steps build projections and optimizer state
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _steps(rec, net, opt, x, y, 4)      # recorded, remembered and closing steps
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert rec.steps == 6
