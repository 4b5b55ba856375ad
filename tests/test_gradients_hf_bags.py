"""Hugging Face GPT-2 / BERT from tiny configs (Conv1D, (1, T) position ids, tied
embeddings), EmbeddingBag and RMSNorm against per-example gradients (<= 1e-4)."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynascope.recorder.gradients import GradientExtension
from dynascope.recorder.gradients.rules import HFConv1DRule, find_rule
from seq_helpers import check

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def ce(o, y):
    return F.cross_entropy(o, y, reduction="none")


class Logits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, x):
        return self.m(input_ids=x).logits


def test_gpt2_lm_conv1d_positions_and_tied_head():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=31, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    m = Logits(transformers.GPT2LMHeadModel(cfg))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 31, (3, 7), generator=g), torch.randint(0, 31, (3, 7), generator=g)
    ext, cols, errs = check(m, x, y, method="loop", projection_dim=512)
    meta = ext.metadata()
    assert meta["covered_fraction"] == 1.0 and meta["excluded_parameters"] == {}
    types = {l["name"]: l["type"] for l in meta["layers"]}
    assert types["m.transformer.h.0.attn.c_attn"] == "Conv1D"
    assert meta["covered_parameters"].count("m.transformer.wte.weight") == 1
    assert "m.lm_head.weight" not in meta["covered_parameters"]


def test_bert_classifier_position_ids_1_by_T():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    cfg = transformers.BertConfig(vocab_size=29, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=3)
    m = Logits(transformers.BertForSequenceClassification(cfg))
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 29, (4, 6), generator=g), torch.randint(0, 3, (4,), generator=g)
    ext, cols, _ = check(m, x, y, loss_fn=ce, method="loop", projection_dim=256)
    meta = ext.metadata()
    assert meta["covered_fraction"] == 1.0
    assert torch.isfinite(cols["grad_norm_layer"]).all()


def test_conv1d_rule_found_by_name_without_importing_transformers():
    """A class named like HF's Conv1D in a module named like HF's is matched by name."""
    import types
    mod = types.ModuleType("transformers.pytorch_utils")

    class Conv1D(nn.Module):
        def __init__(self, nf, nx):
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
            self.bias = nn.Parameter(torch.randn(nf) * 0.1)

        def forward(self, x):
            return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)

    Conv1D.__module__, Conv1D.__qualname__ = mod.__name__, "Conv1D"
    assert isinstance(find_rule(Conv1D(3, 4)), HFConv1DRule)
    torch.manual_seed(4)
    m = nn.Sequential(Conv1D(6, 5), nn.Tanh(), Conv1D(3, 6))
    x = torch.randn(4, 7, 5)
    check(m, x, torch.randint(0, 3, (4, 7)), loss_fn=lambda o, t: ce(o.flatten(0, 1), t.flatten()).view(t.shape).sum(1),
          projection_dim=64)


def test_attaching_does_not_import_transformers():
    code = ("import sys, torch.nn as nn; from recorder.gradients import GradientExtension; "
            "GradientExtension().attach_model(nn.Sequential(nn.Linear(2, 2))); "
            "assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


class Bag(nn.Module):
    def __init__(self, mode, flat=False, weights=False, padding_idx=None):
        super().__init__()
        self.bag = nn.EmbeddingBag(15, 6, mode=mode, padding_idx=padding_idx)
        self.head = nn.Linear(6, 3)
        self.flat, self.weights = flat, weights

    def forward(self, idx):
        psw = (idx.float() / 7.0 + 0.5) if self.weights else None
        if self.flat:  # variable-length bags: 1-D input + offsets (bag i has i + 1 entries)
            B, N = idx.shape
            parts = [idx[i, :i + 1] for i in range(B)]
            offsets = torch.tensor([0] + [len(p) for p in parts[:-1]]).cumsum(0)
            flat_w = torch.cat([psw[i, :i + 1] for i in range(B)]) if psw is not None else None
            return self.head(self.bag(torch.cat(parts), offsets, per_sample_weights=flat_w))
        return self.head(self.bag(idx, per_sample_weights=psw))


@pytest.mark.parametrize("mode,flat,weights,pad", [("sum", False, False, None), ("mean", False, False, 0),
                                                    ("sum", True, True, None), ("mean", True, False, 2),
                                                    ("sum", False, True, 1)])
def test_embedding_bag(mode, flat, weights, pad):
    torch.manual_seed(5)
    idx = torch.randint(0, 15, (5, 6))
    idx[:, 1] = idx[:, 0]  # repeated entry within a bag
    idx[1, 0] = 0
    m = Bag(mode, flat, weights, pad)
    ext, _, _ = check(m, idx, torch.randint(0, 3, (5,)), loss_fn=ce, projection_dim=64,
                      method="loop" if flat else "func")  # flat bags depend on the batch position
    assert ext.metadata()["covered_fraction"] == 1.0


def test_embedding_bag_max_is_excluded_with_reason():
    meta = GradientExtension().attach_model(Bag("max")).metadata()
    assert "mode='max'" in meta["excluded_parameters"]["bag.weight"]


@pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="torch without nn.RMSNorm")
def test_rmsnorm_and_layernorm_on_sequences():
    torch.manual_seed(6)
    m = nn.Sequential(nn.Linear(5, 8), nn.RMSNorm(8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 4))
    for p in m.parameters():
        nn.init.normal_(p, 0.0, 0.5)
    x = torch.randn(4, 6, 5)
    ext, _, _ = check(m, x, torch.randint(0, 4, (4, 6)),
                      loss_fn=lambda o, t: ce(o.flatten(0, 1), t.flatten()).view(t.shape).sum(1), projection_dim=64)
    assert [l["form"] for l in ext.metadata()["layers"]] == ["factored", "vector", "vector", "factored"]
