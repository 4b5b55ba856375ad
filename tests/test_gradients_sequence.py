"""Sequence models against per-example gradients of each sequence's loss (torch.func, or
one autograd.grad per example where vmap cannot run the module): norms and projections
within 1e-4, coverage >= 95%."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynascope.recorder.extensions import BatchContext
from dynascope.recorder.gradients import GradientExtension
from seq_helpers import check, rel, token_loss

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


class GPT(nn.Module):
    """nn.TransformerEncoderLayer LM: token + arange positions, causal mask, tied head."""

    def __init__(self, V=17, d=16, T=8, batch_first=True, layers=2):
        super().__init__()
        self.tok, self.pos, self.bf = nn.Embedding(V, d), nn.Embedding(T, d), batch_first
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=batch_first,
                                                               norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, V, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx):
        T = idx.shape[1]
        h = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=idx.device)
        h = h if self.bf else h.transpose(0, 1)
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        h = h if self.bf else h.transpose(0, 1)
        return self.head(self.norm(h))


class RNNLM(nn.Module):
    def __init__(self, cls=nn.LSTM, V=13, d=8, H=10, classify=False, **kw):
        super().__init__()
        self.emb, self.rnn, self.classify = nn.Embedding(V, d), cls(d, H, **kw), classify
        D = 2 if kw.get("bidirectional") else 1
        self.head = nn.Linear(H * D, 3 if classify else V)

    def forward(self, idx):
        h = self.emb(idx)
        if not self.rnn.batch_first:
            h = h.transpose(0, 1)
        o, _ = self.rnn(h)
        if not self.rnn.batch_first:
            o = o.transpose(0, 1)
        return self.head(o[:, -1] if self.classify else o)


def ce(o, y):
    return F.cross_entropy(o, y, reduction="none")


def tokens(V, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


@pytest.mark.parametrize("batch_first", [True, False])
def test_gpt_style_lm_tied_head_positions_and_attention(batch_first):
    torch.manual_seed(0)
    m = GPT(batch_first=batch_first)
    ext, cols, errs = check(m, *tokens(17, 5, 8), projection_dim=512)
    meta = ext.metadata()
    assert meta["covered_fraction"] == 1.0 and meta["excluded_parameters"] == {}
    names = meta["layer_names"]
    assert "blocks.0.self_attn" in names and "blocks.0.self_attn.out_proj" in names
    assert meta["covered_parameters"].count("tok.weight") == 1  # tied: one layer, both uses
    assert "head.weight" not in meta["covered_parameters"]
    assert torch.isfinite(cols["grad_norm"]).all()


@pytest.mark.parametrize("hint", [None, {"*": 0}])
def test_positions_when_sequence_length_equals_batch_size(hint):
    """pos(arange(T)) with T == B is a broadcast, not one index per example; the (B, B, d)
    inputs of the other layers are settled by the first step's check (or the hint)."""
    torch.manual_seed(1)
    m = GPT(T=6)
    ext = GradientExtension(projection_dim=64, batch_axis=hint).attach_model(m)
    check(m, *tokens(17, 6, 6, seed=2), ext=ext)


def test_lstm_lm_two_layer_bidirectional():
    torch.manual_seed(2)
    m = RNNLM(nn.LSTM, num_layers=2, bidirectional=True, batch_first=True)
    ext, _, _ = check(m, *tokens(13, 4, 6), projection_dim=256)
    meta = ext.metadata()
    assert meta["covered_fraction"] == 1.0
    assert "rnn:l1_reverse" in meta["layer_names"]


def test_lstm_sequence_first_with_initial_state_and_dropout_off_in_eval():
    torch.manual_seed(3)
    m = RNNLM(nn.LSTM, num_layers=2, dropout=0.5).eval()  # eval: inter-layer dropout off
    check(m, *tokens(13, 3, 5), projection_dim=128)


@pytest.mark.parametrize("kw", [dict(batch_first=True), dict(num_layers=2, bidirectional=True)])
def test_gru_classifier(kw):
    torch.manual_seed(4)
    m = RNNLM(nn.GRU, classify=True, **kw)
    x, _ = tokens(13, 5, 7)
    y = torch.randint(0, 3, (5,))
    ext, _, _ = check(m, x, y, loss_fn=ce, method="loop", projection_dim=128)
    assert ext.metadata()["covered_fraction"] == 1.0


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_recurrent_forward_equals_the_module(cls):
    torch.manual_seed(5)
    rnn = cls(4, 6, num_layers=2, bidirectional=True)
    x = torch.randn(7, 3, 4)
    h0 = torch.randn(4, 3, 6)
    hx = (h0, torch.randn(4, 3, 6)) if cls is nn.LSTM else h0
    want = rnn(x, hx)
    ext = GradientExtension().attach_model(nn.Sequential(rnn))
    ext.begin_batch(BatchContext("train", torch.arange(3)))
    got = rnn(x, hx)
    flat = lambda o: [o[0]] + (list(o[1]) if isinstance(o[1], tuple) else [o[1]])  # noqa: E731
    for a, b in zip(flat(got), flat(want)):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(l.calls for l in ext.layers)  # it went through the re-expressed forward


class MHANet(nn.Module):
    def __init__(self, E=8, H=2, kdim=None, vdim=None, batch_first=True, cross=False, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, kdim=kdim, vdim=vdim, batch_first=batch_first, **kw)
        self.kproj = nn.Linear(E, kdim or E)
        self.vproj = nn.Linear(E, vdim or E)
        self.cross, self.bf = cross, batch_first
        self.head = nn.Linear(E, 3)
        self.mask_kind = None

    def forward(self, x):
        B, T, _ = x.shape
        q = x if self.bf else x.transpose(0, 1)
        k = v = q
        if self.cross:
            k, v = torch.tanh(self.kproj(q)), torch.tanh(self.vproj(q))
        kw = {}
        if self.mask_kind == "kpm":
            kpm = torch.zeros(B, T, dtype=torch.bool)
            kpm[0, -2:] = True
            kw = dict(key_padding_mask=kpm, need_weights=True, average_attn_weights=False)
        elif self.mask_kind == "float3d":
            kw = dict(attn_mask=torch.randn(B * self.attn.num_heads, T, T, generator=torch.Generator().manual_seed(0)))
        elif self.mask_kind == "causal":
            kw = dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(T), is_causal=True, need_weights=False)
        out, _ = self.attn(q, k, v, **kw)
        out = out if self.bf else out.transpose(0, 1)
        return self.head(out.mean(1))


MHA_CASES = [
    dict(),
    dict(batch_first=False, mask_kind="causal"),
    dict(cross=True, mask_kind="kpm"),
    dict(cross=True, kdim=6, vdim=5, mask_kind="float3d"),
    dict(add_bias_kv=True, add_zero_attn=True, mask_kind="kpm"),
    dict(bias=False, batch_first=False),
]


@pytest.mark.parametrize("case", MHA_CASES)
def test_multihead_attention_variants(case):
    torch.manual_seed(6)
    case = dict(case)
    kind = case.pop("mask_kind", None)
    m = MHANet(**case)
    m.mask_kind = kind
    x, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
    ext, _, _ = check(m, x, y, loss_fn=ce, method="loop", projection_dim=128)
    meta = ext.metadata()
    assert meta["covered_fraction"] == 1.0, meta["excluded_parameters"]


@pytest.mark.parametrize("case", MHA_CASES)
def test_attention_forward_equals_the_module(case):
    torch.manual_seed(7)
    case = dict(case)
    kind = case.pop("mask_kind", None)
    m = MHANet(**case)
    m.mask_kind = kind
    x = torch.randn(4, 5, 8)
    want = m(x)
    ext = GradientExtension().attach_model(m)
    ext.begin_batch(BatchContext("train", torch.arange(4)))
    assert torch.allclose(m(x), want, atol=1e-6)
    assert ext.layers[0].calls


def test_attention_dropout_is_exact_for_the_masks_drawn():
    """With dropout the re-expressed forward draws its own masks; per-example gradients
    through that same graph (autograd.grad per example) must match."""
    torch.manual_seed(8)
    m = MHANet(dropout=0.3).train()
    x, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
    ext = GradientExtension(check_every=0).attach_model(m)
    ext._checked.update({"train"})  # the reference below stands in for the check
    b = BatchContext("train", torch.arange(4))
    ext.begin_batch(b)
    losses = ce(m(x), y)
    b.losses = losses
    ext.on_losses(b)
    params = [p for p in m.parameters()]
    ext._suppress = True
    per = [[torch.zeros_like(p) if g is None else g for p, g in
            zip(params, torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True))]
           for i in range(4)]
    ext._suppress = False
    losses.sum().backward()
    cols = ext.columns(b)
    names = [n for n, _ in m.named_parameters()]
    want = []
    for layer in ext.layers:
        idx = [names.index(n) for n in layer.param_names]
        want.append(torch.stack([sum(per[i][j].square().sum() for j in idx) for i in range(4)]))
    assert rel(cols["grad_norm_layer"].square(), torch.stack(want, 1)) <= 1e-4


def test_detach_restores_the_modules_own_forward():
    m = GPT()
    rnn = RNNLM()
    for model in (m, rnn):
        ext = GradientExtension().attach_model(model)
        ext.attach_model(model)  # re-attaching replaces, never stacks
        assert len(ext._forwards) == sum("forward" in mod.__dict__ for mod in model.modules())
        ext.detach()
        assert not any("forward" in mod.__dict__ for mod in model.modules())


def test_gru_classifier_through_the_recorder(tmp_path):
    """Store side: layer names with ':' and the re-expressed forward through the real
    Recorder, train and probe passes; probe values exact (eval mode, losses summed)."""
    import numpy as np

    from dynascope import analysis
    from dynascope.recorder import Recorder
    torch.manual_seed(10)
    m = RNNLM(nn.GRU, classify=True, batch_first=True)
    X, Y = torch.randint(0, 13, (8, 5)), torch.randint(0, 3, (8,))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with Recorder(tmp_path / "r.zarr", m, num_classes=3, num_examples=8, optimizer=opt, chunk_steps=2,
                  grad_norms=True, grad_projection=64) as rec:
        for s in range(2):
            idx = torch.arange(4 * s, 4 * s + 4)
            with rec.step(example_ids=idx, targets=Y[idx]) as step:
                logits = m(X[idx])
                losses = ce(logits, Y[idx])
                step.record(losses=losses, logits=logits)
                losses.mean().backward()
            opt.step()
            opt.zero_grad()
        rec.probe([(X[:4], Y[:4], torch.arange(4))])
    run = analysis.open_run(tmp_path / "r.zarr")
    meta = run.attrs["extensions"]["gradients"]
    assert meta["covered_fraction"] == 1.0 and "rnn:l0" in meta["layer_names"]
    assert np.isfinite(run.train.grad_norm.values).all()
    from seq_helpers import per_example
    m.eval()
    g = per_example(m, X[:4], Y[:4], ce, method="loop")
    want = sum(v.reshape(4, -1).square().sum(1) for v in g.values()).sqrt()
    assert rel(torch.from_numpy(run.probe.grad_norm.values[0]), want) <= 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_cuda_matches_cpu(kind):
    from seq_helpers import run
    torch.manual_seed(9)
    m = GPT() if kind == "gpt" else RNNLM(nn.LSTM, num_layers=2, bidirectional=True, batch_first=True)
    x, y = tokens(17 if kind == "gpt" else 13, 4, 8)
    ext = GradientExtension(projection_dim=64).attach_model(m)
    cpu = run(m, ext, x, y, token_loss)
    ext.detach()
    m.zero_grad()
    m.cuda()
    ext = GradientExtension(projection_dim=64).attach_model(m)
    gpu = run(m, ext, x.cuda(), y.cuda(), token_loss)
    for k in cpu:
        assert rel(gpu[k].cpu(), cpu[k]) < 1e-4, k
