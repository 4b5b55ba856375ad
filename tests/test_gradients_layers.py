"""Every supported layer type against torch.func per-example gradients (rel. err <= 1e-4)."""
import pytest
import torch
import torch.nn as nn

from gradients_helpers import check

torch.set_num_threads(1)


class Seq(nn.Module):
    """Linear on (B, T, in): positions summed per example (ghost / direct norm paths)."""

    def __init__(self, din=6, dout=5, T=4):
        super().__init__()
        self.lin = nn.Linear(din, dout)
        self.head = nn.Linear(dout, 3, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x)).mean(1))


def test_linear_mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 8, bias=False), nn.Tanh(), nn.Linear(8, 3))
    check(m, torch.randn(7, 10), torch.randint(0, 3, (7,)), projection_dim=60)


@pytest.mark.parametrize("T", [2, 40])  # ghost (few positions) and direct (many)
def test_linear_sequence(T):
    torch.manual_seed(1)
    check(Seq(T=T), torch.randn(5, T, 6), torch.randint(0, 3, (5,)), projection_dim=32)


@pytest.mark.parametrize("kw", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1, bias=False),
    dict(kernel_size=(2, 3), dilation=2, padding="same", padding_mode="reflect"),
    dict(kernel_size=3, padding="valid"),
])
def test_conv2d(kw):
    torch.manual_seed(2)
    m = nn.Sequential(nn.Conv2d(3, 4, **kw), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5))
    check(m, torch.randn(6, 3, 9, 9), torch.randint(0, 5, (6,)), projection_dim=50)


@pytest.mark.parametrize("H,kw", [(4, dict(padding=1)), (6, dict(padding=2, dilation=2, bias=False)),
                                  (6, dict(padding=0))])
def test_conv2d_ghost_from_pixel_gram(H, kw):
    """Few positions, many channels: the norms take the ghost form, whose patch products come
    from the pixel Gram (factors.Patches.position_gram) rather than from patches, and the
    sketch is a TensorSketch of patches sketched in their own layout (sketch_columns)."""
    torch.manual_seed(2)
    m = nn.Sequential(nn.Conv2d(64, 64, 3, **kw), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(6, 64, H, H)
    m(x)  # materialise the lazy head
    ext, _ = check(m, x, torch.randint(0, 3, (6,)), gram=False, projection_dim=64)
    assert ext.layers[0].rule.form == "factored"


def test_conv1d():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
                      nn.Conv1d(4, 3, 2, padding="same", padding_mode="circular"),
                      nn.AdaptiveAvgPool1d(1), nn.Flatten())
    check(m, torch.randn(5, 2, 11), torch.randint(0, 3, (5,)), projection_dim=40)


class Emb(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 5, padding_idx=0)
        self.head = nn.Linear(5, 4)

    def forward(self, idx):
        return self.head(self.emb(idx).sum(1))


def test_embedding_repeated_and_padding_indices():
    torch.manual_seed(4)
    idx = torch.randint(0, 12, (6, 7))
    idx[:, 0] = idx[:, 1]  # repeated token within an example
    idx[0, 2] = 0          # padding token
    check(Emb(), idx, torch.randint(0, 4, (6,)), projection_dim=30)


@pytest.mark.parametrize("norm,H", [("layer", 5), ("group", 5), ("bn-eval", 5), ("bn1d-eval", 0),
                                     # 16 x 16 positions: the batched-dot reduction (rules.py)
                                     ("group", 16), ("bn-eval", 16)])
def test_normalisation_affine(norm, H):
    torch.manual_seed(5)
    if norm == "bn1d-eval":
        m = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        x = torch.randn(5, 6)
    else:
        layer = {"layer": nn.LayerNorm([4, H, H]), "group": nn.GroupNorm(2, 4),
                 "bn-eval": nn.BatchNorm2d(4)}[norm]
        m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), layer, nn.ReLU(), nn.Flatten(), nn.Linear(4 * H * H, 3))
        x = torch.randn(5, 2, H, H)
    if norm.startswith("bn"):
        with torch.no_grad():  # non-trivial running statistics
            m.train()(torch.randn(32, *x.shape[1:]) * 2 + 1)
        m.eval()
    for p in m.parameters():
        nn.init.normal_(p, 0.0, 0.5)
    ext, _ = check(m, x, torch.randint(0, 3, (5,)), projection_dim=48)
    assert any(l["form"] == "vector" for l in ext.metadata()["layers"])
