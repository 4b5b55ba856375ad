"""Attention and recurrent layers, whose weights their forward uses functionally (hooks
never see them): re-expressed, while a batch is recorded, as an instance forward that
computes the same function through explicitly captured linear calls (the approach of
Opacus' DPMultiheadAttention / DPLSTM, without replacing the modules or their parameters).

- `nn.MultiheadAttention`: in-projection (packed `in_proj_weight` or separate q/k/v
  weights, with `in_proj_bias`), `out_proj`, and `bias_k`/`bias_v`, with the module's own
  mask, dropout, batch_first, need_weights and is_causal semantics.
- `nn.LSTM` / `nn.GRU`: one layer per (layer, direction) covering
  [weight_ih | weight_hh | bias_ih | bias_hh]; the input projection of all time steps is
  one captured call, the hidden projection one call per step (a Python loop over time,
  like DPLSTM: slower than the fused kernel, see docs/GRADIENTS.md).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

from .factors import Dense, Factored, Vector
from .rules import RULES, Rule, register_rule

UNBATCHED = "input is unbatched, packed or not batch-sized; this forward is not re-expressed"


def _trainable(module, names):
    return [n for n in names if isinstance(module._parameters.get(n), nn.Parameter)
            and module._parameters[n].requires_grad]


def _pad(t: torch.Tensor, before: int, after: int) -> torch.Tensor:
    return F.pad(t, (before, after)) if before or after else t


def _flag(ext, layers, out: torch.Tensor, reason: str) -> None:
    if isinstance(out, torch.Tensor) and out.requires_grad:
        ext.capture(list(layers), out.detach()[:0], out, {"invalid": reason})


class _Expands(Rule):
    def all_params(self, module, path):
        return [f"{path}.{n}" for n, p in module.named_parameters() if p.requires_grad]

    def params(self, module):
        return [n for n, p in module.named_parameters() if p.requires_grad]

    def unsupported(self, module):
        if "forward" in type(module).__dict__ and type(module) not in RULES:
            return f"{type(module).__name__} overrides forward; its functional uses cannot be re-expressed"
        return None


class _InProjRule(Rule):
    """(3E, E [+ kdim + vdim] [+1]): the q/k/v blocks of the in-projection, each call's
    factors padded into its block (exact; a call of the packed projection fills all)."""

    def __init__(self, mha):
        self.E = mha.embed_dim
        self.packed = mha._qkv_same_embed_dim
        self.widths = [self.E] if self.packed else [self.E, mha.kdim, mha.vdim]

    def shape(self, module, params):
        return (3 * self.E, sum(self.widths) * any("weight" in p for p in params) + ("in_proj_bias" in params))

    def grad(self, module, calls, params):
        has_w, has_b = any("weight" in p for p in params), "in_proj_bias" in params
        pairs = []
        for x, g, extra in calls:
            j = extra["block"]
            u = g.float() if j is None else _pad(g.float(), j * self.E, (2 - j) * self.E)
            parts = []
            if has_w:
                a = x.float()
                if not self.packed:
                    a = _pad(a, sum(self.widths[:j]), sum(self.widths[j + 1:]))
                parts.append(a)
            if has_b:
                parts.append(x.new_ones(*x.shape[:2], 1, dtype=torch.float32))
            pairs.append((Dense(u), Dense(torch.cat(parts, 2))))
        return Factored(pairs, *self.shape(module, params))

    def layout(self, module, params, grads):
        if self.packed:
            return super().layout(module, params, grads)
        out = torch.zeros(self.shape(module, params), device=grads[0].device)
        for n, gr in zip(params, grads):
            if n == "in_proj_bias":
                out[:, -1] = gr
                continue
            j = "qkv".index(n[0])
            c = sum(self.widths[:j])
            out[j * self.E:(j + 1) * self.E, c:c + gr.shape[1]] = gr
        return out


class _BiasKVRule(Rule):
    form = "vector"

    def shape(self, module, params):
        return (module.embed_dim * len(params),)

    def grad(self, module, calls, params):
        parts = {p: None for p in params}
        for _, g, extra in calls:
            v = g.float().sum(1)
            key = extra["part"]
            parts[key] = v if parts[key] is None else parts[key] + v
        B = calls[0][1].shape[0]
        return Vector(torch.cat([parts[p] if parts[p] is not None else calls[0][1].new_zeros(B, module.embed_dim)
                                 for p in params], 1))


@register_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(_Expands):
    def unsupported(self, module):
        if not module._qkv_same_embed_dim:
            n = len(_trainable(module, ["q_proj_weight", "k_proj_weight", "v_proj_weight"]))
            if 0 < n < 3:
                return "MultiheadAttention with only some of q/k/v_proj_weight frozen not supported"
        return super().unsupported(module)

    def expand(self, m, path):
        packed = ["in_proj_weight"] if m._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        out = []
        inp = _trainable(m, packed + ["in_proj_bias"])
        if inp:
            out.append((path, m, _InProjRule(m), inp, path))
        op = _trainable(m.out_proj, ["weight", "bias"])
        if op:
            out.append((f"{path}.out_proj", m.out_proj, RULES[nn.Linear], op, f"{path}.out_proj"))
        kv = _trainable(m, ["bias_k", "bias_v"])
        if kv:
            out.append((f"{path}.bias_kv", m, _BiasKVRule(), kv, path))
        return out

    def forward(self, ext, m, layers, original, query, key, value, key_padding_mask=None,
                need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
        args = (query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
        if not ext._active or not torch.is_grad_enabled():
            return original(*args)
        if query.dim() != 3 or query.shape[0 if m.batch_first else 1] != ext._bsz:
            out = original(*args)
            _flag(ext, layers.values(), out[0], UNBATCHED)
            return out
        return _attention(ext, m, layers, *args)


def _attention(ext, m, layers, query, key, value, key_padding_mask, need_weights, attn_mask,
               average_attn_weights, is_causal):
    """F.multi_head_attention_forward's computation in batch-first form, with captured
    projections."""
    E, H = m.embed_dim, m.num_heads
    hd = E // H
    self_attn = query is key and key is value
    q_in, k_in, v_in = (t if m.batch_first else t.transpose(0, 1) for t in (query, key, value))
    B, Lq = q_in.shape[:2]
    kpm = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                            other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                            target_type=query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    use_causal = is_causal and kpm is None and not need_weights
    attn_mask = None if use_causal else F._canonical_mask(
        mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=query.dtype,
        check_other=False)
    inp = next((l for l in layers.values() if isinstance(l.rule, _InProjRule)), None)
    outl = next((l for l in layers.values() if l.module is m.out_proj), None)
    kvl = next((l for l in layers.values() if isinstance(l.rule, _BiasKVRule)), None)

    def project(x, w, b, block):
        y = F.linear(x, w, b)
        if inp is not None:
            ext.capture([inp], x, y, {"block": block})
        return y

    b_all = m.in_proj_bias
    bq, bk, bv = b_all.chunk(3) if b_all is not None else (None, None, None)
    if m._qkv_same_embed_dim and self_attn:
        q, k, v = project(q_in, m.in_proj_weight, b_all, None).chunk(3, -1)
    else:
        ws = m.in_proj_weight.chunk(3) if m._qkv_same_embed_dim else (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
        q, k, v = (project(x, w, b, j) for j, (x, w, b) in enumerate(zip((q_in, k_in, v_in), ws, (bq, bk, bv))))
    if m.bias_k is not None:
        extra = []
        for part, t in (("bias_k", m.bias_k), ("bias_v", m.bias_v)):
            e = t.reshape(1, 1, E).expand(B, 1, E)
            if kvl is not None and part in kvl.params:
                ext.capture([kvl], e.detach()[:, :, :0], e, {"part": part})
            extra.append(e)
        k, v = torch.cat([k, extra[0]], 1), torch.cat([v, extra[1]], 1)
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        kpm = F.pad(kpm, (0, 1)) if kpm is not None else None
    q, k, v = (t.reshape(B, t.shape[1], H, hd).transpose(1, 2) for t in (q, k, v))
    if m.add_zero_attn:
        k, v = (torch.cat([t, t.new_zeros(B, H, 1, hd)], 2) for t in (k, v))
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        kpm = F.pad(kpm, (0, 1)) if kpm is not None else None
    S = k.shape[2]
    mask = None
    if attn_mask is not None:
        mask = attn_mask.reshape(1, 1, Lq, S) if attn_mask.dim() == 2 else attn_mask.reshape(B, H, Lq, S)
    if kpm is not None:
        kpm = kpm.reshape(B, 1, 1, S)
        mask = kpm if mask is None else mask + kpm
    p = m.dropout if m.training else 0.0
    weights = None
    if need_weights:
        scores = torch.matmul(q * math.sqrt(1.0 / hd), k.transpose(-2, -1))
        if mask is not None:
            scores = scores + mask
        w = torch.softmax(scores, -1)
        if p > 0.0:
            w = F.dropout(w, p=p)
        out = torch.matmul(w, v)
        weights = w.mean(1) if average_attn_weights else w
    else:
        out = F.scaled_dot_product_attention(q, k, v, mask, p, is_causal=use_causal)
    out = out.transpose(1, 2).reshape(B, Lq, E)
    y = F.linear(out, m.out_proj.weight, m.out_proj.bias)
    if outl is not None:
        ext.capture([outl], out, y, {"module": m.out_proj, "rule": RULES[nn.Linear]})
    return (y if m.batch_first else y.transpose(0, 1)), weights


@register_rule(nn.LSTM, nn.GRU)
class RecurrentRule(_Expands):
    """Each (layer, direction): G_i = sum_t g_t [x_t; 0; 1; 0]^T + sum_t g'_t [0; h_{t-1}; 0; 1]^T,
    g = gradient of the input projection, g' = of the hidden projection (equal for LSTM)."""

    def unsupported(self, module):
        if getattr(module, "proj_size", 0):
            return "LSTM(proj_size > 0) not supported"
        return super().unsupported(module)

    def expand(self, m, path):
        D = 2 if m.bidirectional else 1
        out = []
        for layer in range(m.num_layers):
            for d in range(D):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                names = _trainable(m, [n + sfx for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")])
                if names:
                    out.append((f"{path}:l{layer}{'_reverse' if d else ''}", m, _CellRule(m, layer), names, path))
        return out

    def forward(self, ext, m, layers, original, input, hx=None):
        if not ext._active or not torch.is_grad_enabled():
            return original(input, hx)
        if isinstance(input, PackedSequence) or input.dim() != 3 or \
                input.shape[0 if m.batch_first else 1] != ext._bsz:
            out = original(input, hx)
            _flag(ext, layers.values(), out[0].data if isinstance(out[0], PackedSequence) else out[0], UNBATCHED)
            return out
        return _recurrent(ext, m, {l.name.rpartition(":")[2]: l for l in layers.values()}, input, hx)


class _CellRule(Rule):
    def __init__(self, m, layer):
        self.G = (4 if isinstance(m, nn.LSTM) else 3) * m.hidden_size
        self.H = m.hidden_size
        self.n_in = m.input_size if layer == 0 else m.hidden_size * (2 if m.bidirectional else 1)

    def _widths(self, params):
        return [(self.n_in, "weight_ih"), (self.H, "weight_hh"), (1, "bias_ih"), (1, "bias_hh")], \
            {p.split("_l")[0] for p in params}

    def shape(self, module, params):
        parts, have = self._widths(params)
        return (self.G, sum(w for w, n in parts if n in have))

    def grad(self, module, calls, params):
        parts, have = self._widths(params)
        ih = [c for c in calls if c[2]["part"] == "ih"]
        hh = [c for c in calls if c[2]["part"] == "hh"]
        pairs = []
        for group, kind in ((ih, "ih"), (hh, "hh")):
            if not group:
                continue
            x = torch.cat([c[0] for c in group], 1).float()
            g = torch.cat([c[1].reshape(c[1].shape[0], -1, self.G) for c in group], 1).float()
            cols = []
            for w, n in parts:
                if n not in have:
                    continue
                mine = n.endswith(kind)
                if n.startswith("weight"):
                    cols.append(x if mine else x.new_zeros(*x.shape[:2], w))
                else:
                    cols.append(x.new_full((*x.shape[:2], 1), 1.0 if mine else 0.0))
            pairs.append((Dense(g), Dense(torch.cat(cols, 2))))
        return Factored(pairs, *self.shape(module, params))


def _recurrent(ext, m, layers, input, hx):
    lstm = isinstance(m, nn.LSTM)
    x = input if m.batch_first else input.transpose(0, 1)
    B, T = x.shape[:2]
    L, D, H = m.num_layers, 2 if m.bidirectional else 1, m.hidden_size
    if hx is None:
        zeros = x.new_zeros(L * D, B, H)
        hx = (zeros, zeros) if lstm else zeros
    h0, c0 = hx if lstm else (hx, None)
    h_n, c_n = [], []
    for layer in range(L):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = getattr(m, "weight_ih" + sfx), getattr(m, "weight_hh" + sfx)
            b_ih, b_hh = getattr(m, "bias_ih" + sfx, None), getattr(m, "bias_hh" + sfx, None)
            cell = layers.get(f"l{layer}" + ("_reverse" if d else ""))
            gi = F.linear(x, w_ih, b_ih)
            if cell is not None:
                ext.capture([cell], x, gi, {"part": "ih"})
            h, c = h0[layer * D + d], (c0[layer * D + d] if lstm else None)
            hs = [None] * T
            for t in (reversed(range(T)) if d else range(T)):
                gh = F.linear(h, w_hh, b_hh)
                if cell is not None:
                    ext.capture([cell], h[:, None], gh, {"part": "hh"})
                a = gi[:, t]
                if lstm:
                    i, f, g, o = (a + gh).chunk(4, 1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                else:
                    ir, iz, inn = a.chunk(3, 1)
                    hr, hz, hn = gh.chunk(3, 1)
                    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
                    h = (1 - z) * torch.tanh(inn + r * hn) + z * h
                hs[t] = h
            outs.append(torch.stack(hs, 1))
            h_n.append(h)
            c_n.append(c)
        x = torch.cat(outs, 2) if D > 1 else outs[0]
        if m.dropout and m.training and layer < L - 1:
            x = F.dropout(x, m.dropout, True)
    out = x if m.batch_first else x.transpose(0, 1)
    h_n = torch.stack(h_n, 0)
    return (out, (h_n, torch.stack(c_n, 0))) if lstm else (out, h_n)
