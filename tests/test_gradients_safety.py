"""No silent wrong numbers: every covered parameter is exact, or NaN with one warning that
names it and the fix (functional uses, tied weights, T == B layouts, positions used
other than by broadcasting, parametrizations, train-mode BatchNorm)."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations

from dynascope.recorder.gradients import GradientExtension, checks
from seq_helpers import per_example, reference, rel, run, token_loss

torch.set_num_threads(1)
pytestmark = [pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
              pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")]


class Functional(nn.Module):
    """mode "emb": the embedding's weight also used as a head by F.linear (outside its
    module); "head": a Linear used only functionally; "penalty" adds an explicit L2 term
    (not a use through the model: must not be flagged)."""

    def __init__(self, mode, V=11, d=6):
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(V, d), nn.Linear(d, d), nn.Linear(d, V)
        self.mode = mode

    def forward(self, idx):
        h = torch.tanh(self.mid(self.emb(idx)))
        if self.mode == "emb":
            return F.linear(h, self.emb.weight)
        if self.mode == "head":
            return F.linear(h, self.head.weight, self.head.bias)
        return self.head(h)


def data(V=11, B=4, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def layer_index(ext, name):
    return [l.name for l in ext.layers].index(name)


@pytest.mark.parametrize("mode,bad", [("emb", "emb"), ("head", "head")])
def test_use_outside_the_module_is_nan_with_one_warning_from_then_on(mode, bad):
    torch.manual_seed(0)
    m = Functional(mode)
    ext = GradientExtension(projection_dim=32).attach_model(m)
    with pytest.warns(RuntimeWarning, match=rf"{bad}\.weight.*outside its module's forward.*Fix: call the module") as rec:
        cols = run(m, ext, *data(), token_loss)
    assert sum("outside its module" in str(w.message) for w in rec) == 1
    j = layer_index(ext, bad)
    assert torch.isnan(cols["grad_norm_layer"][:, j]).all() and torch.isnan(cols["grad_norm"]).all()
    assert torch.isnan(cols["grad_proj"]).all()  # the shared sketch includes every layer
    m.zero_grad()
    sq, _, _ = reference(ext, per_example(m, *data(), token_loss))
    keep = [i for i in range(len(ext.layers)) if i != j and ext.layers[i].params != []]
    finite = cols["grad_norm_layer"][:, keep]
    assert rel(finite.square(), sq[:, keep]) <= 1e-4  # the others stay exact
    with warnings.catch_warnings():  # a later step: still NaN, no second warning, no re-check
        warnings.simplefilter("error")
        calls = []
        orig = checks.reference
        checks.reference = lambda *a: calls.append(1) or orig(*a)
        try:
            later = run(m, ext, *data(seed=1), token_loss)
        finally:
            checks.reference = orig
    assert calls == [] and torch.isnan(later["grad_norm_layer"][:, j]).all()


def test_explicit_l2_penalty_is_not_a_use_outside_the_module():
    torch.manual_seed(1)
    m = Functional("plain")
    ext = GradientExtension().attach_model(m)
    from dynascope.recorder.extensions import BatchContext
    x, y = data()
    b = BatchContext("train", torch.arange(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ext.begin_batch(b)
        b.losses = token_loss(m(x), y)
        ext.on_losses(b)
        (b.losses.mean() + 0.1 * sum(p.square().sum() for p in m.parameters())).backward()
        cols = ext.columns(b)
    m.zero_grad()
    sq, _, _ = reference(ext, per_example(m, x, y, token_loss))
    assert rel(cols["grad_norm_layer"].square(), sq) <= 1e-4


def test_check_every_catches_a_use_that_starts_later():
    torch.manual_seed(2)
    m = Functional("plain")
    ext = GradientExtension(check_every=1).attach_model(m)
    from dynascope.recorder.extensions import BatchContext
    for step in range(2):
        m.mode = "plain" if step == 0 else "head"
        b = BatchContext("train", torch.arange(4), step_index=step)
        ext.begin_batch(b)
        b.losses = token_loss(m(data()[0]), data()[1])
        ext.on_losses(b)
        if step == 1:
            with pytest.warns(RuntimeWarning, match="head.weight, head.bias"):
                b.losses.mean().backward()
                cols = ext.columns(b)
        else:
            b.losses.mean().backward()
            cols = ext.columns(b)
    assert torch.isnan(cols["grad_norm_layer"][:, layer_index(ext, "head")]).all()


class TiedBias(nn.Module):
    def __init__(self, V=9, d=5):
        super().__init__()
        self.emb, self.head = nn.Embedding(V, d), nn.Linear(d, V)  # head keeps its own bias
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx)))


def test_tied_embedding_and_head_counted_once_with_cross_terms():
    torch.manual_seed(3)
    m = TiedBias()
    ext = GradientExtension(projection_dim=48).attach_model(m)
    meta = ext.metadata()
    assert meta["covered_fraction"] == 1.0
    assert sorted(meta["covered_parameters"]) == ["emb.weight", "head.bias"]
    x, y = data(V=9)
    cols = run(m, ext, x, y, token_loss)
    m.zero_grad()
    sq, proj, _ = reference(ext, per_example(m, x, y, token_loss))
    assert rel(cols["grad_norm_layer"].square(), sq) <= 1e-4
    assert rel(cols["grad_proj"], proj) <= 1e-4


class SeqFirst(nn.Module):
    """nn.TransformerEncoderLayer without batch_first: its Linear/LayerNorm inputs are
    (T, B, d). `deep` adds a second layer (a branch first used after the first step)."""

    def __init__(self, V=11, d=8):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.enc = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0)
        self.enc2 = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0)
        self.head = nn.Linear(d, V)
        self.deep = False

    def forward(self, idx):  # idx (B, T)
        h = self.enc(self.emb(idx).transpose(0, 1))
        if self.deep:
            h = self.enc2(h)
        return self.head(h.transpose(0, 1))


def exact(m, ext, x, y, cols, names=None):
    m.zero_grad()
    sq, proj, _ = reference(ext, per_example(m, x, y, token_loss))
    j = [i for i, l in enumerate(ext.layers) if names is None or l.name in names]
    assert rel(cols["grad_norm_layer"][:, j].square(), sq[:, j]) <= 1e-4


def test_T_equal_B_resolved_by_the_first_step_check_and_exact():
    """(B, B, d) and (T, T, d) inputs: the first step's weighted check tells the axes apart."""
    torch.manual_seed(4)
    m = SeqFirst()
    ext = GradientExtension(projection_dim=64).attach_model(m)
    x, y = data(B=4, T=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cols = run(m, ext, x, y, token_loss)
    exact(m, ext, x, y, cols, [l.name for l in ext.layers if not l.name.startswith("enc2")])
    assert ext._batch_axes[id(m.enc.linear1)] == 1 and ext._batch_axes[id(m.head)] == 0


def test_T_equal_B_unresolved_is_nan_with_a_warning_until_learned():
    torch.manual_seed(5)
    m = SeqFirst()
    ext = GradientExtension(projection_dim=64).attach_model(m)
    x, y = data(B=4, T=4)
    run(m, ext, x, y, token_loss)  # first step: the check resolves enc, head, emb
    m.deep = True  # enc2 first runs on a later, unchecked step with T == B
    with pytest.warns(RuntimeWarning, match="both equal the batch size") as rec:
        cols = run(m, ext, x, y, token_loss)
    names = [l.name for l in ext.layers]
    ambiguous = {n for n in names if n.startswith("enc2.") and not n.startswith("enc2.self_attn")}
    warned = {str(w.message).split(":")[0] for w in rec if "both equal" in str(w.message)}
    assert warned == ambiguous
    for n in names:
        finite = torch.isfinite(cols["grad_norm_layer"][:, names.index(n)]).all()
        assert finite == (n not in ambiguous), n  # attention knows its own layout
    exact(m, ext, x, y, cols, set(names) - ambiguous)
    run(m, ext, *data(B=3, T=4, seed=1), token_loss)  # unambiguous: enc2 learns its axis
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = run(m, ext, x, y, token_loss)
    exact(m, ext, x, y, again)


class Positions(nn.Module):
    def __init__(self, use, V=11, d=6, T=5):
        super().__init__()
        self.tok, self.pos, self.head, self.use = nn.Embedding(V, d), nn.Embedding(T, d), nn.Linear(d, V), use

    def forward(self, idx):
        T = idx.shape[1]
        p = self.pos(torch.arange(T)[None])  # (1, T, d), as HF does
        if self.use == "cat":  # not a broadcast: which example owns a row is unknown
            h = self.tok(idx) + torch.cat([p, p], 0).mean(0, keepdim=True)
        else:
            h = self.tok(idx) + p.to(torch.float32)
        return self.head(torch.tanh(h))


def test_positions_broadcast_exact_and_other_uses_flagged():
    torch.manual_seed(5)
    x, y = data()
    m = Positions("add")
    ext = GradientExtension(projection_dim=32).attach_model(m)
    cols = run(m, ext, x, y, token_loss)
    m.zero_grad()
    sq, _, _ = reference(ext, per_example(m, x, y, token_loss))
    assert rel(cols["grad_norm_layer"].square(), sq) <= 1e-4
    m = Positions("cat")
    ext = GradientExtension().attach_model(m)
    with pytest.warns(RuntimeWarning, match="pos: positions shared by the batch"):
        cols = run(m, ext, x, y, token_loss)
    j = layer_index(ext, "pos")
    assert torch.isnan(cols["grad_norm_layer"][:, j]).all()
    assert torch.isfinite(cols["grad_norm_layer"][:, layer_index(ext, "tok")]).all()


def test_parametrized_and_weight_normed_weights_are_never_covered():
    torch.manual_seed(6)
    m = nn.Sequential(parametrizations.weight_norm(nn.Linear(4, 5)), nn.Tanh(),
                      torch.nn.utils.weight_norm(nn.Linear(5, 3)), nn.Tanh(), nn.Linear(3, 3))
    ext = GradientExtension(projection_dim=16).attach_model(m)
    meta = ext.metadata()
    assert sorted(meta["covered_parameters"]) == ["0.bias", "2.bias", "4.bias", "4.weight"]
    computed = {k for k, v in meta["excluded_parameters"].items() if "parametrization" in v}
    assert computed == {"0.parametrizations.weight.original0", "0.parametrizations.weight.original1",
                        "2.weight_g", "2.weight_v"}
    total = sum(p.numel() for p in m.parameters())
    assert meta["covered_fraction"] == pytest.approx((5 + 3 + 12) / total)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    loss = lambda o, t: F.cross_entropy(o, t, reduction="none")  # noqa: E731
    cols = run(m, ext, x, y, loss)
    m.zero_grad()
    sq, proj, _ = reference(ext, per_example(m, x, y, loss, method="loop"))
    assert rel(cols["grad_norm_layer"].square(), sq) <= 1e-4


def test_train_mode_batchnorm_warns_once_saying_what_is_recorded():
    m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    with pytest.warns(RuntimeWarning, match=r"BatchNorm in train mode \(1\).*share of the batch gradient"
                                            r".*eval-mode BatchNorm.*GroupNorm or LayerNorm") as rec:
        ext = GradientExtension().attach_model(m)
        run(m, ext, torch.randn(5, 4), torch.randint(0, 3, (5,)), lambda o, t: F.cross_entropy(o, t, reduction="none"))
    assert sum("BatchNorm in train mode" in str(w.message) for w in rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GradientExtension().attach_model(m.eval())
