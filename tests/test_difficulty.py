"""Cartography, AUM, EL2N, GraNd, difficulty over time and loss changes against numpy
formulas and hand-computed values on small synthetic stores."""
import numpy as np
import pytest

from dynascope.analysis import (aum, cartography, difficulty, el2n, example_loss_change, grand,
                      open_run)
from helpers_dynamics import write_run

K = 4


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def rand_run(tmp_path_factory):
    rng = np.random.default_rng(0)
    n, slots, epochs = 9, 4, 5
    rows = []
    for e in range(epochs):
        perm = list(rng.permutation(n)) + [-1] * (-n % slots)
        rows += [perm[i:i + slots] for i in range(0, len(perm), slots)]
    ids = np.array(rows)
    target = np.where(ids >= 0, ids % K, 0)
    logits = rng.normal(0, 2, ids.shape + (K,)).astype(np.float32)
    gn = rng.random(ids.shape).astype(np.float32)
    path = write_run(tmp_path_factory.mktemp("d") / "r.zarr", example_id=ids, target=target,
                     logits=logits, epoch=np.repeat(np.arange(epochs), len(rows) // epochs),
                     grad_norm=gn)
    return open_run(path), ids, target, logits, gn


def _per_example(ids, values):
    return {i: np.array([values[s, k] for s in range(ids.shape[0]) for k in range(ids.shape[1])
                         if ids[s, k] == i]) for i in range(int(ids.max()) + 1)}


def test_cartography_matches_numpy(rand_run):
    run, ids, target, logits, _ = rand_run
    p = _softmax(logits.astype(np.float64))
    pg = np.take_along_axis(p, target[..., None], -1)[..., 0]
    ok = (logits.argmax(-1) == target).astype(float)
    ds = cartography(run)
    pg_e, ok_e = _per_example(ids, pg), _per_example(ids, ok)
    for i in range(9):
        assert ds["confidence"].sel(example=i).item() == pytest.approx(pg_e[i].mean(), abs=1e-6)
        assert ds["variability"].sel(example=i).item() == pytest.approx(pg_e[i].std(ddof=0), abs=1e-6)
        assert ds["correctness"].sel(example=i).item() == pytest.approx(ok_e[i].mean())
    assert (ds["presentations"].values == 5).all()


def test_aum_matches_numpy(rand_run):
    run, ids, target, logits, _ = rand_run
    gold = np.take_along_axis(logits, target[..., None], -1)[..., 0]
    other = logits.copy()
    np.put_along_axis(other, target[..., None], -np.inf, -1)
    margin = _per_example(ids, gold - other.max(-1))
    ds = aum(run)
    for i in range(9):
        assert ds["aum"].sel(example=i).item() == pytest.approx(margin[i].mean(), abs=1e-5)


def test_aum_and_el2n_by_hand(tmp_path):
    # one example, two presentations: logits [3,1,0] -> margin 2; [0,2,1] -> margin -2
    logits = np.array([[[3, 1, 0]], [[0, 2, 1]]], np.float32)
    path = write_run(tmp_path / "h.zarr", example_id=[[0], [0]], target=[[0], [0]], logits=logits,
                     epoch=[0, 1])
    run = open_run(path)
    assert aum(run)["aum"].item() == pytest.approx(0.0)
    # el2n at step 0: p = softmax([3,1,0]); ||p - e0||
    p = _softmax(np.array([3.0, 1, 0]))
    assert el2n(run, step=0)["el2n"].item() == pytest.approx(np.linalg.norm(p - [1, 0, 0]), rel=1e-6)
    assert el2n(run, step=0)["score_step"].item() == 0
    assert el2n(run)["score_step"].item() == 1  # default: end of training


def test_el2n_uniform_two_classes(tmp_path):
    path = write_run(tmp_path / "u.zarr", example_id=[[0, 1]], target=[[0, 1]],
                     logits=np.zeros((1, 2, 2), np.float32), epoch=[0])
    np.testing.assert_allclose(el2n(open_run(path))["el2n"].values, [np.sqrt(0.5)] * 2, rtol=1e-6)


def test_el2n_and_grand_latest_presentation_before_step(rand_run):
    run, ids, target, logits, gn = rand_run
    step = 7
    ds_g = grand(run, step=step)
    p = _softmax(logits.astype(np.float64))
    err = np.linalg.norm(p - np.eye(K)[target], axis=-1)
    ds_e = el2n(run, step=step)
    for i in range(9):
        s, k = max((s, k) for s in range(step + 1) for k in range(ids.shape[1]) if ids[s, k] == i)
        assert ds_g["grand"].sel(example=i).item() == pytest.approx(gn[s, k])
        assert ds_e["el2n"].sel(example=i).item() == pytest.approx(err[s, k], rel=1e-5)
        assert ds_e["score_step"].sel(example=i).item() == s


def test_grand_without_grad_norm_says_what_to_do(tmp_path):
    path = write_run(tmp_path / "n.zarr", example_id=[[0]], target=[[0]],
                     logits=np.zeros((1, 1, 2), np.float32), epoch=[0])
    with pytest.raises(ValueError, match="grad_norm"):
        grand(open_run(path))


def _probe_run(tmp_path):
    rng = np.random.default_rng(1)
    plog = rng.normal(size=(3, 4, K)).astype(np.float32)  # (probe, example, class)
    probe = {"example_id": [1, 3, 4, 6], "target": [0, 1, 2, 3], "logits": plog,
             "step": [0, 5, 9], "epoch": [-1, 0, 1], "grad_norm": rng.random((3, 4))}
    ids = np.arange(8).reshape(4, 2)
    path = write_run(tmp_path / "p.zarr", example_id=np.vstack([ids, ids]),
                     target=np.vstack([ids, ids]) % K, logits=rng.normal(size=(8, 2, K)),
                     epoch=[0] * 4 + [1] * 4, probe=probe)
    return open_run(path), probe


def test_probe_source(tmp_path):
    run, probe = _probe_run(tmp_path)
    plog, t = probe["logits"], np.array(probe["target"])
    p = _softmax(plog.astype(np.float64))
    pg = p[:, np.arange(4), t]  # (probe, example)
    ds = cartography(run, source="probe")
    assert list(ds["example"].values) == [1, 3, 4, 6]
    np.testing.assert_allclose(ds["confidence"].values, pg.mean(0), rtol=1e-5)
    np.testing.assert_allclose(ds["variability"].values, pg.std(0), rtol=1e-4, atol=1e-7)
    e = el2n(run, step=6, source="probe")  # last probe at or before step 6 is probe 1
    assert e.attrs["probe"] == 1
    np.testing.assert_allclose(e["el2n"].values, np.linalg.norm(p[1] - np.eye(K)[t], axis=-1), rtol=1e-5)
    g = grand(run, source="probe", probe=0)
    np.testing.assert_allclose(g["grand"].values, np.asarray(probe["grad_norm"][0], np.float32))


def test_difficulty_over_time(rand_run):
    run, ids, target, logits, _ = rand_run
    p = _softmax(logits.astype(np.float64))
    pg = np.take_along_axis(p, target[..., None], -1)[..., 0]
    ds = difficulty(run)
    assert list(ds["epoch"].values) == [0, 1, 2, 3, 4]
    rows_per_epoch = ids.shape[0] // 5
    for e in (0, 3):
        sl = slice(e * rows_per_epoch, (e + 1) * rows_per_epoch)
        d = _per_example(ids[sl], 1 - pg[sl])
        for i in range(9):
            assert ds["difficulty"].sel(epoch=e, example=i).item() == pytest.approx(d[i].mean(), rel=1e-5)
        per_ex = np.array([d[i].mean() for i in range(9)])
        cls = np.arange(9) % K
        for c in range(K):
            assert ds["class_difficulty"].sel(epoch=e, class_id=c).item() == pytest.approx(
                per_ex[cls == c].mean(), rel=1e-5)
        assert ds["mean_difficulty"].sel(epoch=e).item() == pytest.approx(per_ex.mean(), rel=1e-5)


def test_example_loss_change_split(tmp_path):
    # example 0 losses 1.0, 0.4, 0.9, 0.2 -> decreases 0.6 + 0.7, increase 0.5
    loss = np.array([[1.0, 2.0], [0.4, 2.0], [0.9, 2.5], [0.2, 1.0]], np.float32)
    path = write_run(tmp_path / "l.zarr", example_id=[[0, 1]] * 4, target=[[0, 1]] * 4,
                     logits=np.zeros((4, 2, 2), np.float32), epoch=[0, 1, 2, 3], loss=loss)
    ds = example_loss_change(open_run(path))
    np.testing.assert_allclose(ds["learning"].values, [1.3, 1.5], rtol=1e-6)
    np.testing.assert_allclose(ds["forgetting"].values, [0.5, 0.5], rtol=1e-6)
    np.testing.assert_array_equal(ds["n_learning"].values, [2, 1])
    np.testing.assert_array_equal(ds["n_forgetting"].values, [1, 1])
    np.testing.assert_allclose(ds["largest_increase"].values, [0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(ds["net_change"].values, [-0.8, -1.0], rtol=1e-6)
    np.testing.assert_allclose(ds["time_forgetting"].values, [0, 1.0, 0], rtol=1e-6)  # epoch 2 only
    assert list(ds["epoch"].values) == [1, 2, 3]
    np.testing.assert_allclose(ds["time_learning"].values, [0.6, 0.0, 2.2], rtol=1e-6)
