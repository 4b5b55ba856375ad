"""The cheap per-step checks must catch exactly what the straightforward versions catch:
duplicate ids (sort-based), epoch inference (one gather a step), and the writer's codec
choice (tiny per-step chunks uncompressed) must leave every stored value unchanged."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import zarr

from dynascope.recorder import Recorder
from dynascope.recorder.epochs import EpochTracker
from dynascope.recorder.validation import check_example_ids, check_targets


@pytest.mark.parametrize("seed", range(40))
def test_duplicate_ids_are_found_whenever_torch_unique_finds_them(seed):
    g = np.random.default_rng(seed)
    n = int(g.integers(2, 300))
    ids = g.permutation(2 * n)[:n] - (3 if seed % 5 == 0 else 0)   # distinct, some negative
    for _ in range(seed % 4):        # 0-3 pairs: one id copied over another, never a triple
        i, j = g.choice(n, 2, replace=False)
        if np.count_nonzero(ids == ids[j]) == 1 and np.count_nonzero(ids == ids[i]) == 1:
            ids[i] = ids[j]
    reference = len(torch.unique(torch.as_tensor(ids))) != n
    if reference:
        uniq, counts = np.unique(ids, return_counts=True)
        with pytest.raises(ValueError, match="repeat within one batch") as e:
            check_example_ids(torch.as_tensor(ids), None)
        assert f"({n - len(uniq)} duplicates, e.g. id {int(uniq[counts > 1][0])})" in str(e.value)
    elif ids.min() < 0:
        with pytest.raises(ValueError, match=f"must be >= 0, got {ids.min()}"):
            check_example_ids(torch.as_tensor(ids), None)
    else:
        out = check_example_ids(torch.as_tensor(ids, dtype=torch.int32), None)
        assert out.dtype == torch.int64 and torch.equal(out, torch.as_tensor(ids))
        with pytest.raises(ValueError, match=f"example id {ids.max()} is out of range"):
            check_example_ids(torch.as_tensor(ids), int(ids.max()))


def test_a_single_id_and_the_range_checks():
    assert check_example_ids([5], 6).tolist() == [5]
    with pytest.raises(ValueError, match="out of range for num_examples=5"):
        check_example_ids([5], 5)
    with pytest.raises(ValueError, match="repeat within one batch"):
        check_example_ids(torch.tensor([7, 1, 7, 2, 1]), 10)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_target_range_check_with_every_integer_dtype(dtype):
    assert check_targets(torch.tensor([0, 1, 1]).to(dtype), 3, 2).dtype == dtype
    if dtype != torch.bool:
        with pytest.raises(ValueError, match=r"targets must be in \[0, 2\); got \[0, 2\]"):
            check_targets(torch.tensor([0, 2, 1]).to(dtype), 3, 2)
    if dtype in (torch.int64, torch.int32):
        with pytest.raises(ValueError, match=r"got \[-1, 1\]"):
            check_targets(torch.tensor([-1, 1]).to(dtype), 2, 2)


class _ReferenceTracker:
    """The rule written out with Python sets: a batch repeating an id seen in the current
    epoch starts the next one; a given epoch different from the current one resets it."""

    def __init__(self):
        self.seen, self.epoch, self.source = set(), 0, None

    def next(self, ids, given):
        ids = set(int(i) for i in ids)
        if given is not None:
            if given != self.epoch:
                self.seen = set()
            self.epoch = given
            self.source = "loop" if self.source in (None, "loop") else "mixed"
        elif ids & self.seen:
            self.seen = set()
            self.epoch += 1
            self.source = "inferred" if self.source in (None, "inferred") else "mixed"
        else:
            self.source = self.source or "inferred"
        self.seen |= ids
        return self.epoch


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("known", [True, False])
def test_epoch_inference_matches_the_set_rule(seed, known):
    g = np.random.default_rng(seed)
    n = 50
    tracker, ref = EpochTracker(n if known else None), _ReferenceTracker()
    given = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(200):
            if seed % 3 == 0 and step % 37 == 0:   # the loop sometimes takes over, then lets go
                given = None if given is not None else int(g.integers(0, 4))
            ids = g.choice(n, size=int(g.integers(1, 12)), replace=False)
            assert tracker.next(ids, given) == ref.next(ids, given), step
            assert tracker.count == len(ref.seen) and tracker.source == ref.source
            assert set(np.flatnonzero(tracker.seen)) == ref.seen


def test_epoch_state_round_trip_keeps_the_count():
    a = EpochTracker(20)
    a.next(np.array([3, 4, 5]), None)
    a.next(np.array([7]), None)
    b = EpochTracker(20)
    b.load(a.state())
    assert (b.count, b.epoch, b.source) == (4, 0, "inferred")
    assert b.next(np.array([4]), None) == 1 and b.count == 1


def test_tiny_per_step_chunks_are_stored_uncompressed_and_read_back_exactly(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    losses_seen = []
    with Recorder(tmp_path / "r.zarr", model, num_classes=3, num_examples=6, optimizer=opt,
                  chunk_steps=4, param_stats=False) as rec:
        for step in range(10):
            ids = torch.tensor([step % 3 * 2, step % 3 * 2 + 1])
            with rec.step(example_ids=ids, targets=y[ids]) as st:
                logits = model(x[ids])
                losses = F.cross_entropy(logits, y[ids], reduction="none")
                st.record(losses=losses, logits=logits)
                losses.mean().backward()
            losses_seen.append(losses.detach().clone())
            opt.step()
            opt.zero_grad()
    train = zarr.open_group(str(tmp_path / "r.zarr"), mode="r")["train"]
    assert train["epoch"].metadata.codecs[-1].to_dict()["name"] == "bytes"   # 4 rows x 4 bytes
    assert train["batch_loss"].compressors == ()
    np.testing.assert_array_equal(train["loss"][:10], torch.stack(losses_seen).numpy())
    np.testing.assert_array_equal(train["epoch"][:10], [0, 0, 0, 1, 1, 1, 2, 2, 2, 3])
    np.testing.assert_array_equal(train["batch_size"][:10], np.full(10, 2))
    # the batch mean is taken in the writer, in float64 from the stored losses
    np.testing.assert_array_equal(train["batch_loss"][:10],
                                  torch.stack(losses_seen).double().mean(1).float().numpy())


def test_batch_loss_is_the_mean_over_each_batch_own_examples_nan_kept(tmp_path):
    model = nn.Linear(2, 2)
    given = [torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.5]), torch.tensor([1.0, float("nan")]),
             torch.tensor([3.0, 1e-8, 1e8])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Recorder(tmp_path / "r.zarr", model, num_classes=2, num_examples=20, chunk_steps=3,
                      param_stats=False) as rec:
            for step, losses in enumerate(given):
                ids = torch.arange(len(losses)) + 3 * step
                with rec.step(example_ids=ids, targets=torch.zeros(len(losses), dtype=torch.long)) as st:
                    st.record(losses=losses)
    bl = zarr.open_group(str(tmp_path / "r.zarr"), mode="r")["train"]["batch_loss"][:4]
    expected = [np.float32(7 / 3), np.float32(0.5), np.nan, np.float32((3.0 + np.float32(1e-8) + 1e8) / 3)]
    np.testing.assert_array_equal(bl, np.array(expected, dtype=np.float32))


def test_large_chunks_keep_zstd(tmp_path):
    from dynascope.recorder.writer import UNCOMPRESSED_CHUNK_BYTES, _codec_options

    assert _codec_options((64,), "float64") == {"compressors": None}            # 512 bytes
    assert _codec_options((64, 128), "float32") == {}                          # 32 kB: zstd
    assert _codec_options((UNCOMPRESSED_CHUNK_BYTES + 1,), "int8") == {}


def test_steps_without_logits_in_a_chunk_count_no_nonfinite_logits(tmp_path):
    """A chunk mixing steps with and without logits, the logit-less step the widest: the
    writer must neither fail (each source has its own slot width) nor count the fill values
    of a step that gave no logits as NaN logits: such a step's count is -1 (not recorded),
    whether or not other steps of its chunk gave logits."""
    import warnings

    import torch.nn as nn
    import torch.nn.functional as F

    from dynascope import analysis
    from dynascope.recorder import Recorder

    torch.manual_seed(0)
    m = nn.Linear(4, 3)
    plan = [(3, False), (2, True), (2, True), (3, True), (3, False)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a false "NaN/inf logits" notice would be raised here
        with Recorder(tmp_path / "r.zarr", m, num_classes=3, num_examples=40, chunk_steps=2,
                      param_stats=False) as rec:
            for t, (B, with_logits) in enumerate(plan):
                x, y = torch.randn(B, 4), torch.randint(0, 3, (B,))
                with rec.step(example_ids=torch.arange(B) + 5 * t, targets=y) as st:
                    logits = m(x)
                    losses = F.cross_entropy(logits, y, reduction="none")
                    st.record(losses=losses, logits=logits if with_logits else None)
                    losses.mean().backward()
    train = analysis.open_run(tmp_path / "r.zarr").train.load()
    assert train.sizes["step"] == len(plan)
    assert train["nonfinite_logits"].values.tolist() == [-1, 0, 0, 0, -1]
    assert train["nonfinite_loss"].values.tolist() == [0] * len(plan)
    assert np.isnan(train["logits"].values[0]).all() and np.isfinite(train["logits"].values[1, :2]).all()
