"""Exact gradient Gram across every tracked example of one probe pass.

A probe pass spans several batches, so the in-batch Gram of training does not cover it.
Each batch's per-example flat gradients (per covered layer, the direct form) are kept on
the device until the pass ends; the (N, N) Gram is then built block by block (batch a x
batch b, summed over the layers both batches have), and each example's loss weight is
divided out. Keeping them costs N x (covered parameters) x 4 bytes, so a pass whose
gradients would exceed `budget` bytes gets no Gram (one warning; the sketch is still
recorded) instead of exhausting the device's memory.
"""
from __future__ import annotations

import torch

#: bytes of per-example gradients one probe pass may keep for its Gram (256 MiB)
DEFAULT_BUDGET = 256 << 20

OVER_BUDGET = ("probe pass {row}: its exact Gram would keep {need} MB of per-example gradients "
               "({n} examples x {p} covered parameters x 4 bytes), over probe_gram_budget = {budget} MB; "
               "probe/grad_gram is not recorded for this pass (the sketch still is). Raise "
               "GradientExtension(probe_gram_budget=...) / Recorder(grad_probe_gram_budget=...) in bytes, "
               "or track fewer examples or layers.")


class ProbeGram:
    """Collects one probe pass's per-example gradients and builds its Gram at the end."""

    def __init__(self, budget: int, numel: int):
        self.budget, self.numel = int(budget), int(numel)
        self.batches: list = []   # (flats {layer index: (B, n) tensor}, inv (B,), nan_rows (B,) bool)
        self.collecting = False
        self.over = False
        self.examples = 0
        self.seen = 0

    def begin_pass(self) -> None:
        self.batches, self.collecting, self.over, self.examples, self.seen = [], True, False, 0, 0

    def admit(self, batch: int) -> bool:
        """Whether this batch's gradients still fit; once a pass is over budget it stays so."""
        self.seen += batch
        if not self.collecting:
            return False
        if (self.examples + batch) * self.numel * 4 > self.budget:
            self.collecting, self.over, self.batches = False, True, []
            return False
        self.examples += batch
        return True

    def need_bytes(self, total: int) -> int:
        return total * self.numel * 4

    def add(self, flats: dict, inv: torch.Tensor, nan_rows: torch.Tensor) -> None:
        self.batches.append((flats, inv, nan_rows))

    def result(self) -> torch.Tensor | None:
        """(N, N) Gram in the order the batches came, or None when the pass was not kept."""
        if not self.collecting or not self.batches:
            self.batches = []
            return None
        sizes = [inv.shape[0] for _, inv, _ in self.batches]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        device = self.batches[0][1].device
        N = sum(sizes)
        out = torch.zeros(N, N, device=device)
        for a, (fa, inv_a, _) in enumerate(self.batches):
            ra = slice(starts[a], starts[a] + sizes[a])
            for b in range(a, len(self.batches)):
                fb, inv_b, _ = self.batches[b]
                rb = slice(starts[b], starts[b] + sizes[b])
                blk = out.new_zeros(sizes[a], sizes[b])
                for j, F in fa.items():   # a layer absent from a batch had zero gradient there
                    if j in fb:
                        blk += F @ fb[j].t()
                blk = blk * inv_a[:, None] * inv_b[None, :]
                out[ra, rb] = blk
                out[rb, ra] = blk.t()
        nan = torch.cat([m for _, _, m in self.batches])
        out[nan] = float("nan")
        out[:, nan] = float("nan")
        self.batches = []
        return out
