"""Sequence (language-model) runs: the example is the sequence, its targets are tokens.

A `(B, T, V)` logits tensor is far too large to store per step (a 50k vocabulary at B=32,
T=512 is 3 GB), so the recorder reduces it on the device, in the training thread and without
a host sync, to a few numbers per sequence over its *valid* tokens (target != ignore_index):

- ``num_tokens``      valid target tokens
- ``token_accuracy``  fraction of valid tokens whose argmax is the target
- ``target_prob``     mean probability of the target token
- ``margin``          mean of (target logit - largest other logit)
- ``el2n``            mean over tokens of ||softmax(z) - onehot(target)||_2

Optionally also per-token losses (float16), the top-k logits and their token ids, or the
full logits (float16). Definitions and their analysis use: docs/SEQUENCES.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .extensions import ArraySpec

TASKS = ("classification", "regression", "sequence")
STATS = ("num_tokens", "token_accuracy", "target_prob", "margin", "el2n")
TOKEN_ARRAYS = ("token_loss", "topk_logit", "topk_token", "token_logits")
CHUNK_BYTES = 256 << 20   # float32 logits reduced at once; bounds the temporary memory


@dataclass(frozen=True)
class SequenceOptions:
    """How sequence runs are recorded.

    ignore_index: target value of padding / unscored tokens (PyTorch's and HF's -100).
    causal_shift: targets are the model's *inputs* (HF `labels=input_ids`): the recorder
        scores logits[:, :-1] against targets[:, 1:], as HF causal LMs do internally.
    token_losses: store each valid token's cross-entropy, float16 (NaN elsewhere).
    top_k: store the k largest logits (float16) and their token ids per position.
    store_logits: store the full (B, T, V) logits as float16; only for small vocabularies.
    """

    ignore_index: int = -100
    causal_shift: bool = False
    token_losses: bool = False
    top_k: int = 0
    store_logits: bool = False

    @classmethod
    def build(cls, value) -> "SequenceOptions":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise TypeError(f"unknown sequence option(s) {sorted(unknown)}; known: "
                                f"{sorted(cls.__dataclass_fields__)}")
            opts = cls(**value)
        else:
            raise TypeError(f"sequence= takes a dict or SequenceOptions, got {type(value).__name__}")
        if int(opts.top_k) < 0:
            raise ValueError(f"sequence top_k must be >= 0, got {opts.top_k}")
        return opts

    def metadata(self) -> dict:
        return {"ignore_index": int(self.ignore_index), "causal_shift": bool(self.causal_shift),
                "token_losses": bool(self.token_losses), "top_k": int(self.top_k),
                "store_logits": bool(self.store_logits)}


def specs(group: str, row: str, slot: str) -> list[ArraySpec]:
    """Arrays a sequence run may write in one group (created only when written)."""
    per = (row, slot)
    tok = (row, slot, "token")
    return [
        ArraySpec(group, "num_tokens", per, "int32", fill=-1),
        *[ArraySpec(group, s, per, "float32") for s in STATS[1:]],
        ArraySpec(group, "token_loss", tok, "float16"),
        ArraySpec(group, "topk_logit", (*tok, "topk"), "float16"),
        ArraySpec(group, "topk_token", (*tok, "topk"), "int32", fill=-1),
        ArraySpec(group, "token_logits", (*tok, "vocab"), "float16"),
    ]


def infer_task(targets: torch.Tensor, num_classes: int | None) -> str:
    """Integer (B, T) targets with a class count are token targets; float targets regression."""
    if targets.dtype.is_floating_point or num_classes is None:
        return "regression"
    return "sequence" if targets.dim() == 2 else "classification"


def check_targets(targets, n: int, num_classes: int | None, opts: SequenceOptions) -> torch.Tensor:
    if not isinstance(targets, torch.Tensor):
        targets = torch.as_tensor(targets)
    if targets.dim() != 2 or targets.shape[0] != n:
        raise ValueError(f"sequence targets must have shape ({n}, T), one row of token ids per example; "
                         f"got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"sequence targets must be integer token ids, got {targets.dtype}")
    if targets.device.type == "cpu" and num_classes is not None and targets.numel():
        valid = targets[targets != opts.ignore_index]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
            raise ValueError(f"token targets must be in [0, {num_classes}) or ignore_index={opts.ignore_index}; "
                             f"got [{int(valid.min())}, {int(valid.max())}] (set sequence=dict(ignore_index=...) "
                             f"if your padding uses another value)")
    return targets


def align(logits: torch.Tensor, targets: torch.Tensor, opts: SequenceOptions):
    """Pair each logit row with the token it scores (the causal shift, if asked)."""
    if opts.causal_shift:
        return logits[:, :-1], targets[:, 1:]
    return logits, targets


def check_logits(logits, targets: torch.Tensor, num_classes: int | None, opts: SequenceOptions):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    b, t = targets.shape
    if logits.dim() != 3 or logits.shape[:2] != (b, t):
        raise ValueError(f"sequence logits must have shape ({b}, {t}, vocab) to match the ({b}, {t}) targets; "
                         f"got {tuple(logits.shape)}")
    if num_classes is not None and logits.shape[2] != num_classes:
        raise ValueError(f"logits have a vocabulary of {logits.shape[2]} but the Recorder was given "
                         f"num_classes={num_classes}")
    return logits


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor, opts: SequenceOptions) -> torch.Tensor:
    """Per-sequence mean cross-entropy over valid tokens (the default probe/eval loss)."""
    z, y = align(logits, targets, opts)
    tok = F.cross_entropy(z.float().transpose(1, 2), y, ignore_index=opts.ignore_index, reduction="none")
    n = (y != opts.ignore_index).sum(1)
    return tok.sum(1) / n.clamp_min(1).to(tok.dtype) + torch.where(n > 0, 0.0, float("nan"))


def token_weights(targets: torch.Tensor, opts: SequenceOptions) -> torch.Tensor:
    """Valid target tokens per sequence after alignment (the HF loss weights examples so)."""
    y = targets[:, 1:] if opts.causal_shift else targets
    return (y != opts.ignore_index).sum(1)


@torch.no_grad()
def token_stats(logits: torch.Tensor, targets: torch.Tensor, opts: SequenceOptions) -> dict:
    """Per-sequence statistics (and optional per-token arrays) of aligned (B, T, V) logits."""
    z_all, y_all = align(logits.detach(), targets.to(logits.device), opts)
    b, t, v = z_all.shape
    step = max(1, CHUNK_BYTES // max(1, t * v * 4))
    parts = [_chunk_stats(z_all[i:i + step], y_all[i:i + step], opts) for i in range(0, b, step)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _chunk_stats(z: torch.Tensor, y: torch.Tensor, opts: SequenceOptions) -> dict:
    z = z.float()
    valid = y != opts.ignore_index
    tgt = torch.where(valid, y, 0).unsqueeze(-1)
    lse = torch.logsumexp(z, -1)
    gold = z.gather(-1, tgt).squeeze(-1)
    top2 = z.topk(min(2, z.shape[-1]), -1)
    first_is_gold = top2.indices[..., 0] == tgt.squeeze(-1)
    other = top2.values[..., 1] if z.shape[-1] > 1 else torch.full_like(gold, float("-inf"))
    best_other = torch.where(first_is_gold, other, top2.values[..., 0])
    logp_gold = gold - lse
    p_gold = logp_gold.exp()
    sum_p2 = torch.exp(2 * (z - lse.unsqueeze(-1))).sum(-1)
    el2n = (sum_p2 - 2 * p_gold + 1).clamp_min(0).sqrt()
    correct = z.argmax(-1) == tgt.squeeze(-1)   # first maximum, as the classification scores
    n = valid.sum(1)
    nan_if_empty = torch.where(n > 0, 0.0, float("nan"))

    def mean(x):
        return torch.where(valid, x, 0.0).sum(1) / n.clamp_min(1) + nan_if_empty

    out = {"num_tokens": n.to(torch.int32), "token_accuracy": mean(correct.float()),
           "target_prob": mean(p_gold), "margin": mean(gold - best_other), "el2n": mean(el2n)}
    if opts.token_losses:
        out["token_loss"] = torch.where(valid, -logp_gold, float("nan")).half()
    if opts.top_k:
        k = min(int(opts.top_k), z.shape[-1])
        top = z.topk(k, -1)
        out["topk_logit"], out["topk_token"] = top.values.half(), top.indices.to(torch.int32)
    if opts.store_logits:
        out["token_logits"] = z.half()
    return out


def pad_tokens(values: list[torch.Tensor], fill) -> list[torch.Tensor]:
    """Pad per-batch (B, T, ...) arrays to the longest T so passes can be concatenated."""
    t = max(v.shape[1] for v in values)
    out = []
    for v in values:
        if v.shape[1] < t:
            pad = torch.full((v.shape[0], t - v.shape[1], *v.shape[2:]), fill, dtype=v.dtype)
            v = torch.cat([v, pad], 1)
        out.append(v)
    return out
