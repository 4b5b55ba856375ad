"""Loss reduction, loss weights, accumulation, repeated modules, frozen parameters,
autocast, BatchNorm in train mode, probe passes and the JL property."""
import math

import pytest
import torch
import torch.nn as nn

from gradients_helpers import ce, check, record, reference, rel_err
from dynascope.recorder.extensions import EXTENSIONS
from dynascope.recorder.gradients import GradientExtension, hashes, layer_hashes, sketch_reference
from dynascope.recorder.gradients.factors import Dense, Factored

torch.set_num_threads(1)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def data(B=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 6, generator=g), torch.randint(0, 3, (B,), generator=g)


def test_registered_by_name():
    assert EXTENSIONS["gradients"] is GradientExtension


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_reduction_is_divided_out(reduce):
    check(mlp(), *data(), reduce=reduce, projection_dim=24)


def test_custom_weights_and_zero_weight_is_nan():
    m, (x, y) = mlp(), data()
    ext = GradientExtension(projection_dim=24).attach_model(m)
    w = torch.tensor([0.5, 2.0, 0.0, 1.0, 3.0, 0.1])
    cols = record(m, ext, x, y, reduce="weights", weights=w)
    sq, proj = reference(m, ext, x, y)
    keep = w != 0
    assert rel_err(cols["grad_norm_layer"][keep].square(), sq[keep]) <= 1e-4
    assert rel_err(cols["grad_proj"][keep], proj[keep]) <= 1e-4
    assert torch.isnan(cols["grad_norm"][2]) and torch.isnan(cols["grad_proj"][2]).all()


def test_accumulation_each_microbatch_is_its_own_step():
    m, (x, y) = mlp(), data(8)
    ext = GradientExtension(projection_dim=24).attach_model(m)
    for s in (slice(0, 4), slice(4, 8)):  # .grad accumulates, hooks must not
        cols = record(m, ext, x[s], y[s])
        sq, proj = reference(m, ext, x[s], y[s])
        assert rel_err(cols["grad_norm_layer"].square(), sq) <= 1e-4
        assert rel_err(cols["grad_proj"], proj) <= 1e-4


class Twice(nn.Module):
    """A Linear and a Conv2d each called twice per forward (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.lin = nn.Linear(5, 5)
        self.head = nn.Linear(3 * 5 * 5, 4)

    def forward(self, x):
        x = torch.tanh(self.conv(torch.tanh(self.conv(x))))
        x = torch.tanh(self.lin(torch.tanh(self.lin(x))))
        return self.head(x.flatten(1))


def test_module_called_twice_sums_calls_with_cross_terms():
    torch.manual_seed(3)
    check(Twice(), torch.randn(5, 3, 5, 5), torch.randint(0, 4, (5,)), projection_dim=64)


def test_frozen_parameters_are_skipped():
    m = mlp()
    m[0].weight.requires_grad_(False)  # bias alone still covered
    m[2].requires_grad_(False)
    ext, _ = check(m, *data(), projection_dim=16)
    meta = ext.metadata()
    assert meta["covered_parameters"] == ["0.bias"]
    assert meta["covered_fraction"] == 1.0


def test_layers_filter_and_exclusions():
    m = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Conv2d(1, 2, 1, groups=1), nn.Conv1d(4, 4, 1, groups=2))
    meta = GradientExtension(layers=["0"]).attach_model(m).metadata()
    assert meta["layer_names"] == ["0"]
    assert set(meta["excluded_parameters"]) == {"1.weight", "2.weight", "2.bias", "3.weight", "3.bias"}
    assert "groups" in meta["excluded_parameters"]["3.weight"] or "selected" in meta["excluded_parameters"]["3.weight"]
    assert 0 < meta["covered_fraction"] < 1


def test_autocast_computes_in_float32():
    torch.manual_seed(4)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    ext = GradientExtension(projection_dim=32).attach_model(m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cols = record(m, ext, x, y, loss_fn=lambda o, t: ce(o.float(), t))
    assert cols["grad_proj"].dtype == torch.float32
    sq, proj = reference(m, ext, x, y)
    assert rel_err(cols["grad_norm_layer"].square(), sq) < 0.1  # bf16 forward, fp32 sums
    assert rel_err(cols["grad_proj"], proj) < 0.1


@pytest.mark.parametrize("H", [4, 16])  # 16 x 16 positions: the batched-dot reduction
def test_batchnorm_train_mode_shares_sum_to_batch_gradient(H):
    """In train mode per-example BN gradients are coupled; what we record are each example's
    shares, which (weighted by w_i) must sum to the true batch gradient, projected."""
    torch.manual_seed(5)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                      nn.Linear(4 * H * H, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()
    x, y = torch.randn(6, 2, H, H), torch.randint(0, 3, (6,))
    ext = GradientExtension(projection_dim=128, gram=True).attach_model(m)
    cols = record(m, ext, x, y, reduce="mean")
    meta = ext.metadata()
    assert meta["batchnorm_train_mode_coupling"] is True
    batch = (cols["grad_proj"] / len(y)).sum(0)
    want = 0
    for info in meta["layers"]:  # the sketch is linear: the shares' sketches sum to the batch's
        grads = [dict(m.named_parameters())[p].grad for p in info["params"]]
        if info["form"] == "factored":
            G = torch.cat([g.reshape(info["matrix_shape"][0], -1) for g in grads], 1)
        else:
            G = torch.cat([g.flatten() for g in grads])
        want = want + sketch_reference(meta, info["name"], G[None])[0]
    assert rel_err(batch[None], want[None]) <= 1e-4
    gram = cols["grad_gram"] / len(y) ** 2  # and the Gram's total is the batch gradient's norm^2
    batch_sq = sum(p.grad.square().sum() for p in m.parameters())
    assert abs(gram.sum().item() - batch_sq.item()) <= 1e-4 * batch_sq.item()


def test_probe_kind_and_eval_kind():
    m, (x, y) = mlp(), data()
    ext = GradientExtension(projection_dim=24).attach_model(m)
    cols = record(m, ext, x, y, reduce="sum", kind="probe")
    sq, _ = reference(m, ext, x, y)
    assert rel_err(cols["grad_norm_layer"].square(), sq) <= 1e-4
    groups = {(s.group, s.name) for s in ext.specs()}
    assert ("probe", "grad_proj") in groups and ("train", "grad_norm_layer") in groups
    assert record(m, ext, x, y, kind="eval") == {}


def test_end_batch_dtypes_and_no_capture_outside_batches():
    m, (x, y) = mlp(), data()
    ext = GradientExtension(projection_dim=24).attach_model(m)
    m(x).sum().backward()  # user's own forward outside a recorded batch: ignored
    assert all(not l.calls for l in ext.layers)
    from dynascope.recorder.extensions import BatchContext
    b = BatchContext("train", torch.arange(6))
    ext.begin_batch(b)
    b.losses = ce(m(x), y)
    ext.on_losses(b)
    b.losses.mean().backward()
    out = ext.end_batch(b)
    assert out["grad_proj"].dtype == torch.float16 and out["grad_proj"].shape == (6, 24)
    assert out["grad_norm"].dtype == torch.float32 and out["grad_norm_layer"].shape == (6, 2)


def test_hashes_are_reproducible_and_layer_specific():
    a = hashes(0, "conv1", "L", 50, 64)
    assert all(torch.equal(u, v) for u, v in zip(a, hashes(0, "conv1", "L", 50, 64)))
    assert not torch.equal(a[0], hashes(0, "conv2", "L", 50, 64)[0])
    assert not torch.equal(a[0], hashes(1, "conv1", "L", 50, 64)[0])
    assert set(a[1].tolist()) == {-1.0, 1.0} and 0 <= a[0].min() and a[0].max() < 64


def test_sketch_is_unbiased():
    """Mean over seeds of <S G1, S G2> (TensorSketch from the factors, and a CountSketch of
    a vector) estimates <G1, G2> and ||G||^2; checked against the sample's own standard
    error (4 sigma)."""
    from dynascope.recorder.gradients.sketch import count_sketch, sketch_calls
    torch.manual_seed(6)
    out, inn, T, K = 12, 20, 3, 16
    U, V = torch.randn(2, T, out), torch.randn(2, T, inn)
    U[1] += 0.5 * U[0]  # correlated pair: non-zero true inner product
    F = Factored([(Dense(U), Dense(V))], out, inn)
    G = torch.einsum("bto,bti->boi", U, V)
    true_ip, true_sq = (G[0] * G[1]).sum().item(), G[0].square().sum().item()
    ips, sqs, vec_ips = [], [], []
    g = G.flatten(1)
    for seed in range(400):
        p = sketch_calls(F.calls, 2, layer_hashes(seed, "x", "factored", (out, inn), K), K)
        ips.append((p[0] * p[1]).sum().item())
        sqs.append(p[0].square().sum().item())
        q = count_sketch(g, *layer_hashes(seed, "x", "vector", (out * inn,), K), K)
        vec_ips.append((q[0] * q[1]).sum().item())
    for samples, truth in ((ips, true_ip), (sqs, true_sq), (vec_ips, true_ip)):
        t = torch.tensor(samples, dtype=torch.float64)
        se = t.std().item() / math.sqrt(len(t))
        assert abs(t.mean().item() - truth) < 4 * se + 1e-9, (t.mean().item(), truth, se)


def test_example_chunking_gives_the_same_norms(monkeypatch):
    """Large layers are processed in example chunks (bounded memory); force tiny chunks."""
    import dynascope.recorder.gradients.factors as factors
    monkeypatch.setattr(factors, "CHUNK_ELEMS", 50)
    torch.manual_seed(7)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    check(m, torch.randn(7, 3, 6, 6), torch.randint(0, 3, (7,)), projection_dim=32)
    check(Twice(), torch.randn(5, 3, 5, 5), torch.randint(0, 4, (5,)), projection_dim=32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(8)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    x, y = torch.randn(5, 3, 6, 6), torch.randint(0, 3, (5,))
    cpu = record(m, GradientExtension(projection_dim=32).attach_model(m), x, y)
    m.zero_grad()
    m = m.cuda()
    gpu = record(m, GradientExtension(projection_dim=32).attach_model(m), x.cuda(), y.cuda())
    for k in cpu:
        assert rel_err(gpu[k].cpu(), cpu[k]) < 1e-4, k


def test_no_backward_gives_nan_with_a_warning():
    m, (x, y) = mlp(), data()
    ext = GradientExtension(projection_dim=24).attach_model(m)
    from dynascope.recorder.extensions import BatchContext
    b = BatchContext("train", torch.arange(6))
    ext.begin_batch(b)
    b.losses = ce(m(x), y)
    ext.on_losses(b)
    with pytest.warns(RuntimeWarning, match="no backward"):
        out = ext.columns(b)
    assert torch.isnan(out["grad_norm"]).all() and torch.isnan(out["grad_proj"]).all()


class Flat(nn.Module):
    """A Linear applied to (B*T, d): its rows are not examples, so it cannot be attributed."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        B, T, d = x.shape
        return self.head(self.lin(x.reshape(B * T, d)).reshape(B, T, d).mean(1))


def test_layer_whose_rows_are_not_examples_is_nan_others_exact():
    torch.manual_seed(9)
    m, x, y = Flat(), torch.randn(5, 3, 4), torch.randint(0, 3, (5,))
    ext = GradientExtension(projection_dim=16).attach_model(m)
    with pytest.warns(RuntimeWarning, match="not the batch"):
        cols = record(m, ext, x, y)
    sq, _ = reference(m, ext, x, y)
    assert torch.isnan(cols["grad_norm_layer"][:, 0]).all()
    assert rel_err(cols["grad_norm_layer"][:, 1:].square(), sq[:, 1:]) <= 1e-4
