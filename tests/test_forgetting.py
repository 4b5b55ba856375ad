"""Forgetting events against hand-computed sequences and a brute-force per-example loop."""
import numpy as np
import pytest

from dynascope.analysis import forgetting, forgetting_timeline, open_run
from dynascope.analysis.forgetting import forgetting_counts
from helpers_dynamics import logits_for, sequences_run, write_run

SEQS = {0: [1, 0, 1, 1, 0], 1: [0, 0, 1, 1, 1], 2: [0, 0, 0], 3: [1, 1, 1, 1], 4: [0, 1, 0, 1, 0, 1]}


@pytest.fixture(scope="module")
def seq_run(tmp_path_factory):
    return open_run(sequences_run(tmp_path_factory.mktemp("f") / "run.zarr", SEQS))


def test_hand_counted_sequences(seq_run):
    ds = forgetting(seq_run)
    assert list(ds["example"].values) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(ds["forgetting_events"].values, [2, 0, 3, 0, 2])
    np.testing.assert_array_equal(ds["learning_events"].values, [1, 1, 0, 0, 3])
    np.testing.assert_array_equal(ds["presentations"].values, [5, 5, 3, 4, 6])
    np.testing.assert_array_equal(ds["unforgettable"].values, [False, True, False, True, False])
    np.testing.assert_array_equal(ds["never_learned"].values, [False, False, True, False, False])
    # layout (2 slots/step): epoch0 steps 0-2, epoch1 steps 3-5, epoch2 steps 6-8
    np.testing.assert_array_equal(ds["first_learned_step"].values, [0, 6, np.nan, 1, 5])
    np.testing.assert_array_equal(ds["first_learned_epoch"].values, [0, 2, np.nan, 0, 1])
    np.testing.assert_array_equal(ds["target"].values, [0, 1, 2, 0, 1])


@pytest.mark.parametrize("mode,expected", [("inf", np.inf), ("exclude", np.nan), ("presentations", 3)])
def test_never_learned_modes(seq_run, mode, expected):
    ds = forgetting(seq_run, never_learned=mode)
    np.testing.assert_array_equal(ds["forgetting_events"].values, [2, 0, expected, 0, 2])


def test_bad_mode_rejected(seq_run):
    with pytest.raises(ValueError, match="never_learned"):
        forgetting(seq_run, never_learned="zero")


def test_core_on_single_sequence():
    c = np.array([1, 0, 1, 1, 0], bool)
    out = forgetting_counts(np.zeros(5, np.int64), c, np.arange(5), 1)
    assert out["forgetting_events"][0] == 2 and out["learning_events"][0] == 1


def _brute_force(ids, correct, n):
    """Plain per-example loop in (step, slot) order."""
    seqs = {i: [] for i in range(n)}
    for s in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            if ids[s, k] >= 0:
                seqs[int(ids[s, k])].append(bool(correct[s, k]))
    f = [sum(a and not b for a, b in zip(q, q[1:])) for q in seqs.values()]
    lrn = [sum(b and not a for a, b in zip(q, q[1:])) for q in seqs.values()]
    return np.array(f), np.array(lrn), np.array([any(q) for q in seqs.values()])


def test_matches_brute_force_on_shuffled_schedule(tmp_path):
    rng = np.random.default_rng(3)
    n, slots, epochs, k = 23, 4, 7, 3
    rows = []
    for e in range(epochs):  # reshuffled every epoch, last batch padded
        perm = list(rng.permutation(n))
        perm += [-1] * (-len(perm) % slots)
        rows += [perm[i:i + slots] for i in range(0, len(perm), slots)]
    ids = np.array(rows)
    target = np.where(ids >= 0, ids % k, 0)
    correct = rng.random(ids.shape) < 0.6
    path = write_run(tmp_path / "r.zarr", example_id=ids, target=target,
                     logits=logits_for(correct, target, k), epoch=np.repeat(np.arange(epochs), len(rows) // epochs))
    ds = forgetting(open_run(path), never_learned="exclude")
    f, lrn, learned = _brute_force(ids, correct, n)
    np.testing.assert_array_equal(ds["learning_events"].values, lrn)
    np.testing.assert_array_equal(ds["forgetting_events"].values[learned], f[learned])
    assert np.isnan(ds["forgetting_events"].values[~learned]).all()
    tl = forgetting_timeline(open_run(path))
    np.testing.assert_array_equal(tl["forgetting_events"].sum("epoch").values, f)
    np.testing.assert_array_equal(tl["learning_events"].sum("epoch").values, lrn)


def test_timeline_attributes_event_to_epoch(seq_run):
    tl = forgetting_timeline(seq_run)
    # example 0: [1,0,1,1,0] forgotten at epochs 1 and 4
    np.testing.assert_array_equal(tl["forgetting_events"].sel(example=0).values, [0, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(tl["learning_events"].sel(example=4).values, [0, 1, 0, 1, 0, 1])


def test_probe_source_uses_probe_order(tmp_path):
    # 3 tracked examples (ids 5, 7, 9), 4 probe passes
    seqs = np.array([[1, 0, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]], bool).T  # (probe, example)
    target = np.array([0, 1, 2])
    probe = {"example_id": [5, 7, 9], "target": target, "logits": logits_for(seqs, target, 3),
             "step": [0, 10, 20, 30], "epoch": [-1, 0, 1, 2]}
    path = sequences_run(tmp_path / "p.zarr", {i: [1] for i in range(10)}, probe=probe)
    ds = forgetting(open_run(path), source="probe", never_learned="inf")
    assert list(ds["example"].values) == [5, 7, 9]
    np.testing.assert_array_equal(ds["forgetting_events"].values, [2, 0, np.inf])
    np.testing.assert_array_equal(ds["first_learned_step"].values, [0, 10, np.nan])
