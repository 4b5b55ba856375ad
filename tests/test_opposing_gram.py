"""Opposing analyses on the exact in-batch Gram: the same answers as from exact vectors,
the margin on sketched cosines, the sketch's unit-row layout, and dropped rows counted."""
import numpy as np
import pytest
import zarr

from dynascope import analysis
from dynascope.analysis.opposing.pairs import margin_threshold
from opposing_synth import write_synthetic_run


def _with_gram(path, unit_rows=False):
    """Add train/grad_gram = G G^T of the stored rows (and optionally re-store the sketch as
    unit rows with a scale, the recorder's layout)."""
    root = zarr.open_group(str(path), mode="r+")
    G = root["train/grad_proj"][...].astype(np.float64)
    K = np.einsum("sbd,scd->sbc", G, G).astype(np.float32)
    a = root["train"].create_array("grad_gram", shape=K.shape, dtype="float32",
                                   dimension_names=("step", "slot", "slot_j"), chunks=K.shape)
    a[...] = K
    if unit_rows:
        for grp in ("train", "probe"):
            P = root[f"{grp}/grad_proj"][...].astype(np.float64)
            n = np.linalg.norm(P, axis=-1)
            root[f"{grp}/grad_proj"][...] = (P / np.where(n > 0, n, 1)[..., None]).astype(np.float16)
            dims = ("step", "slot") if grp == "train" else ("probe", "example")
            s = root[grp].create_array("grad_proj_scale", shape=n.shape, dtype="float32",
                                       dimension_names=dims, chunks=n.shape)
            s[...] = n.astype(np.float32)
    return analysis.open_run(path)


@pytest.fixture
def run(tmp_path):
    return _with_gram(write_synthetic_run(tmp_path / "s.zarr"))


def test_gram_and_vectors_agree(run):
    kw = dict(source="train", cos_threshold=-0.5, magnitude_ratio=2.0)
    g, v = analysis.opposing_pairs(run, **kw), analysis.opposing_pairs(run, cosine_source="sketch", **kw)
    assert g.attrs["cosine_source"] == "exact_gram" and v.attrs["cosine_source"] == "sketch"
    assert g.sizes["pair"] > 10
    assert np.array_equal(g.example_a.values, v.example_a.values)
    assert np.array_equal(g.example_b.values, v.example_b.values)
    assert np.allclose(g.cosine.values, v.cosine.values, atol=1e-5)
    mg = analysis.majority_opposition(run)
    mv = analysis.majority_opposition(run, cosine_source="sketch")
    assert mg.attrs["cosine_source"] == "exact_gram"
    for name in ("cosine", "cosine_to_mean", "mean_gradient_norm"):
        a, b = mg[name].values, mv[name].values
        assert np.array_equal(np.isnan(a), np.isnan(b))
        assert np.allclose(a[np.isfinite(a)], b[np.isfinite(b)], atol=1e-4), name
    assert mg.attrs["dropped_rows"] == 0  # padding slots are not rows


def test_unit_rows_with_scale_read_like_the_vectors(tmp_path):
    plain = analysis.open_run(write_synthetic_run(tmp_path / "a.zarr"))
    unit = _with_gram(write_synthetic_run(tmp_path / "b.zarr"), unit_rows=True)
    m1 = analysis.majority_opposition(plain, cosine_source="sketch")
    m2 = analysis.majority_opposition(unit, cosine_source="sketch")
    assert np.allclose(m1.mean_gradient_norm.values, m2.mean_gradient_norm.values, rtol=2e-3)
    p1, p2 = analysis.opposing_pairs(plain), analysis.opposing_pairs(unit)
    assert abs(p1.sizes["pair"] - p2.sizes["pair"]) <= 2


def test_margin_keeps_only_pairs_clear_of_the_sketch_error(run):
    c0 = 0.45  # synthetic pair cosines are -0.89 to -0.96: a large error splits them
    thr, z = -0.9, 1.0
    c = margin_threshold(thr, z, c0)
    assert abs(c + z * c0 * (1 - c * c) - thr) < 1e-12 and c < thr
    run.attrs.setdefault("extensions", {})["gradients"] = {"projection": {"error": {"cos_sd_at_zero": c0}}}
    base = analysis.opposing_pairs(run, source="probe", cos_threshold=thr)
    strict = analysis.opposing_pairs(run, source="probe", cos_threshold=thr, margin=z)
    assert np.allclose(base.cosine_sd.values, c0 * (1 - base.cosine.values.astype(float) ** 2), rtol=1e-5)
    keep = base.cosine.values + z * base.cosine_sd.values <= thr
    want = set(zip(base.at_probe.values[keep], base.example_a.values[keep], base.example_b.values[keep]))
    got = set(zip(strict.at_probe.values, strict.example_a.values, strict.example_b.values))
    assert got == want and 0 < len(got) < base.sizes["pair"]


def test_dropped_rows_are_counted_and_warned(tmp_path):
    path = write_synthetic_run(tmp_path / "d.zarr")
    root = zarr.open_group(str(path), mode="r+")
    P = root["probe/grad_proj"][...]
    P[:, 3] = 0
    P[:, 5] = np.nan
    root["probe/grad_proj"][...] = P
    run = analysis.open_run(path)
    with pytest.warns(RuntimeWarning, match="2 of 96 example rows"):
        r = analysis.opposing_pairs(run, probes=[0])
    assert r.attrs["dropped_rows"] == 2 and r.attrs["rows_considered"] == 96
    with pytest.warns(RuntimeWarning, match="left out"):
        m = analysis.majority_opposition(run, source="probe", probes=[0])
    assert m.attrs["dropped_rows"] == 2
