"""The fused conv backward (recorder/gradients/fused.py): per-example values exact against
torch.func, weight gradients and forward outputs equal to plain training, and every case
it must not handle falling back to the hook path."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dynascope.recorder.gradients.fused as fused_mod
from gradients_helpers import ce, record, reference, rel_err
from dynascope.recorder.extensions import BatchContext
from dynascope.recorder.gradients import GradientExtension

torch.set_num_threads(1)


class Convs(nn.Module):
    """Conv2d and Conv1d layers with the geometries the rule handles; shapes where the
    direct (per-example gradient) form is used, so each conv is fused."""

    def __init__(self, conv2d_kw, norm=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, **conv2d_kw)
        self.norm = nn.BatchNorm2d(6) if norm else nn.Identity()
        self.conv1d = nn.Conv1d(6, 5, 3, padding=1)
        self.head = nn.LazyLinear(4)

    def forward(self, x):
        h = torch.tanh(self.norm(self.conv(x)))
        h = torch.tanh(self.conv1d(h.flatten(2)))
        return self.head(h.flatten(1))


GEOMETRIES = [{"padding": 1}, {"stride": 2, "padding": (1, 2)}, {"dilation": 2, "padding": 2},
              {"padding": 1, "padding_mode": "reflect"}, {"padding": 1, "padding_mode": "circular"},
              {"padding": "valid", "bias": False}]


def build(conv2d_kw=None, norm=False, seed=0):
    torch.manual_seed(seed)
    m = Convs(conv2d_kw or {"padding": 1}, norm)
    m(torch.randn(2, 3, 8, 8))  # materialise the lazy head
    return m


def data(B=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 8, 8, generator=g), torch.randint(0, 4, (B,), generator=g)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts backward passes that took the fused path."""
    count = [0]
    original = fused_mod._per_example

    def counting(*a, **kw):
        count[0] += 1
        return original(*a, **kw)

    monkeypatch.setattr(fused_mod, "_per_example", counting)
    return count


def plain_grads(model, x, y, reduce="mean", times=1):
    m = copy.deepcopy(model)
    for _ in range(times):
        losses = ce(m(x), y)
        (losses.mean() if reduce == "mean" else losses.sum()).backward()
    return m, {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


def assert_grads_equal(model, want):
    for n, p in model.named_parameters():
        if n not in want:
            assert p.grad is None, n
            continue
        assert (p.grad - want[n]).norm() <= 1e-5 * want[n].norm(), n


@pytest.mark.parametrize("kw", GEOMETRIES)
def test_fused_exact_and_weight_grads_equal_plain(kw, fused_calls):
    m, (x, y) = build(kw), data()
    _, want = plain_grads(m, x, y)
    ext = GradientExtension(projection_dim=64).attach_model(m)
    cols = record(m, ext, x, y)
    assert fused_calls[0] == 2  # both convolutions
    assert_grads_equal(m, want)
    sq, proj = reference(m, ext, x, y)
    assert rel_err(cols["grad_norm_layer"].square(), sq) <= 1e-4
    assert rel_err(cols["grad_proj"], proj) <= 1e-4


def test_forward_outputs_identical_and_detach_restores_forward():
    m, (x, _) = build(), data()
    plain = copy.deepcopy(m)
    ext = GradientExtension().attach_model(m)
    assert "forward" in m.conv.__dict__ and "forward" in m.conv1d.__dict__
    ext.begin_batch(BatchContext("train", torch.arange(len(x))))
    out = m(x)
    assert out.grad_fn is not None and torch.equal(out, plain(x))
    ext.detach()
    assert "forward" not in m.conv.__dict__ and "forward" not in m.conv1d.__dict__


def test_overridden_forwards_are_not_fused():
    m = build()
    mine = m.conv.forward
    m.conv.forward = mine  # an instance forward of the user's: kept, not bypassed

    class Scaled(nn.Conv1d):
        def forward(self, x):
            return 2 * super().forward(x)

    m.conv1d = Scaled(6, 5, 3, padding=1)
    GradientExtension().attach_model(m)
    assert m.conv.__dict__["forward"] is mine and "forward" not in m.conv1d.__dict__


def test_installed_for_any_signal_not_when_switched_off():
    m = build()
    GradientExtension(norms=False, projection_dim=None).attach_model(m)
    assert "forward" not in m.conv.__dict__  # nothing to compute
    GradientExtension(fused=False).attach_model(m)
    assert "forward" not in m.conv.__dict__
    ext = GradientExtension(norms=False, projection_dim=64).attach_model(m)
    assert "forward" in m.conv.__dict__  # the conv sketch comes from per-example G
    ext.detach()


def test_accumulation_over_microbatches(fused_calls):
    m, (x, y) = build(), data(8)
    plain = copy.deepcopy(m)
    ext = GradientExtension(projection_dim=64).attach_model(m)
    for s in (slice(0, 4), slice(4, 8)):
        ce(plain(x[s]), y[s]).mean().backward()
        cols = record(m, ext, x[s], y[s])
        sq, proj = reference(m, ext, x[s], y[s])
        assert rel_err(cols["grad_norm_layer"].square(), sq) <= 1e-4
        assert rel_err(cols["grad_proj"], proj) <= 1e-4
    assert fused_calls[0] == 4
    assert_grads_equal(m, {n: p.grad for n, p in plain.named_parameters()})


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(torch.tanh(self.conv(x)))).flatten(1))


def test_module_called_twice_falls_back(fused_calls):
    torch.manual_seed(3)
    m, (x, y) = Twice(), data()
    _, want = plain_grads(m, x, y)
    ext = GradientExtension(projection_dim=64).attach_model(m)
    cols = record(m, ext, x, y)
    assert fused_calls[0] == 0
    assert_grads_equal(m, want)
    sq, proj = reference(m, ext, x, y)
    assert rel_err(cols["grad_norm_layer"].square(), sq) <= 1e-4
    assert rel_err(cols["grad_proj"], proj) <= 1e-4


def test_second_backward_through_the_same_forward_falls_back(fused_calls):
    m, (x, y) = build(), data()
    _, want = plain_grads(m, x, y, times=1)
    ext = GradientExtension(projection_dim=64).attach_model(m)
    batch = BatchContext("train", torch.arange(len(y)))
    ext.begin_batch(batch)
    batch.losses = ce(m(x), y)
    ext.on_losses(batch)
    batch.losses.mean().backward(retain_graph=True)
    batch.losses.mean().backward()
    cols = ext.columns(batch)
    assert_grads_equal(m, {n: 2 * g for n, g in want.items()})
    sq, proj = reference(m, ext, x, y)  # w doubles with the gradients: the same values
    assert rel_err(cols["grad_norm_layer"].square(), sq) <= 1e-4
    assert rel_err(cols["grad_proj"], proj) <= 1e-4


def test_frozen_weight_is_not_fused(fused_calls):
    m, (x, y) = build(), data()
    m.conv.weight.requires_grad_(False)  # before attach: bias only, never installed
    ext = GradientExtension().attach_model(m)
    assert "forward" not in m.conv.__dict__
    m.conv1d.weight.requires_grad_(False)  # after attach: the module's own forward runs
    _, want = plain_grads(m, x, y)
    cols = record(m, ext, x, y)
    assert fused_calls[0] == 0
    assert_grads_equal(m, want)
    assert torch.isfinite(cols["grad_norm"]).all()


def test_eval_mode_probe_pass_with_batchnorm(fused_calls):
    m, (x, y) = build(norm=True), data()
    m.norm.running_mean.uniform_(-0.5, 0.5)
    m.eval()
    _, want = plain_grads(m, x, y, reduce="sum")
    ext = GradientExtension(projection_dim=64).attach_model(m)
    cols = record(m, ext, x, y, reduce="sum", kind="probe")
    assert fused_calls[0] == 2
    assert_grads_equal(m, want)
    sq, proj = reference(m, ext, x, y)
    assert rel_err(cols["grad_norm_layer"].square(), sq) <= 1e-4
    assert rel_err(cols["grad_proj"], proj) <= 1e-4


def test_autocast_is_not_fused(fused_calls):
    m, (x, y) = build(), data()
    ext = GradientExtension().attach_model(m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cols = record(m, ext, x, y, loss_fn=lambda o, t: ce(o.float(), t))
    assert fused_calls[0] == 0
    sq, _ = reference(m, ext, x, y)
    assert rel_err(cols["grad_norm_layer"].square(), sq) < 0.1


def test_create_graph_falls_back(fused_calls):
    m, (x, y) = build(), data()
    ext = GradientExtension().attach_model(m)
    batch = BatchContext("train", torch.arange(len(y)))
    ext.begin_batch(batch)
    batch.losses = ce(m(x), y)
    ext.on_losses(batch)
    g = torch.autograd.grad(batch.losses.mean(), m.conv.weight, create_graph=True)[0]
    assert g.requires_grad and fused_calls[0] == 0
    ext.columns(batch)
    plain = copy.deepcopy(m)
    want = torch.autograd.grad(F.cross_entropy(plain(x), y), plain.conv.weight)[0]
    assert (g - want).norm() <= 1e-5 * want.norm()
