"""Property tests for ops/edit.py (Model Surgery probe edit, project_out), float64 references.

ALGORITHMS.md §5.3: exactly ``rows`` rows change, each by ``alpha·w``; the chosen rows are the
global top by ``−cos``; ``alpha = 0`` changes nothing; unselected rows are bit-identical; the
result does not depend on the order in which layers are read.
"""

from __future__ import annotations

import numpy as np
import pytest

from ops.backend import OpError, to_host
from ops.edit import project_out, row_cosines, select_top_rows, shift_rows


def _layers(n_layers=4, out=48, n_in=16, seed=0):
    rng = np.random.default_rng(seed)
    return {i: rng.standard_normal((out, n_in)).astype(np.float32) for i in range(n_layers)}


def _probe(n_in=16, seed=1, norm=2.08):
    # Not unit norm on purpose: the shift must use the probe as trained (§5.1: norm ≈ 2.08).
    p = np.random.default_rng(seed).standard_normal(n_in)
    return (p / np.linalg.norm(p) * norm).astype(np.float32)


def _ref_cos(w, p):
    w = w.astype(np.float64)
    p = p.astype(np.float64)
    norms = np.linalg.norm(w, axis=1) * np.linalg.norm(p)
    return np.array([row @ p / n if n > 0 else 0.0 for row, n in zip(w, norms)])


def _ref_top(layers, p, rows, sign=-1.0):
    # Brute force over every (layer, row) pair: sort by (score desc, layer, row).
    pairs = []
    for layer in sorted(layers):
        for j, c in enumerate(_ref_cos(layers[layer], p)):
            pairs.append((-(sign * c), layer, j))
    pairs.sort()
    return {(layer, j) for _, layer, j in pairs[:rows]}


def _edit_model(layers, p, rows, alpha, xp, order=None, selection="most_negative"):
    order = list(layers) if order is None else order
    pd = xp.asarray(p)
    cos = {k: row_cosines(xp.asarray(layers[k]), pd) for k in order}  # read-only pass
    sel = select_top_rows(cos, rows, selection=selection)
    out = {}
    for k in order:  # write pass
        out[k] = to_host(
            shift_rows(xp.asarray(layers[k]), direction=pd, selected=sel[k], alpha=alpha)
        )
    return out, sel


def test_row_cosines_match_reference(xp):
    w = np.random.default_rng(3).standard_normal((37, 11)).astype(np.float32)
    w[5] = 0.0  # a zero row has cosine 0, not NaN
    p = _probe(11)
    got = to_host(row_cosines(xp.asarray(w), xp.asarray(p)))
    ref = _ref_cos(w, p)
    assert ref[5] == 0.0
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, ref, atol=1e-7)


def test_row_cosines_chunks_agree():
    # More rows than one float64 block: the block boundary must not change anything.
    w = np.random.default_rng(4).standard_normal((4096 + 7, 8)).astype(np.float32)
    p = _probe(8)
    np.testing.assert_allclose(row_cosines(w, p), _ref_cos(w, p), atol=1e-12)


@pytest.mark.parametrize("rows", [1, 7, 50, 192])
def test_probe_edit_properties(xp, rows):
    layers = _layers()
    p = _probe()
    alpha = 1.08
    out, sel = _edit_model(layers, p, rows, alpha, xp)
    chosen = {(k, int(j)) for k, idx in sel.items() for j in idx}
    # The chosen rows are the global top `rows` by −cos (float64 brute-force reference).
    assert chosen == _ref_top(layers, p, rows)
    changed = set()
    for k, w in layers.items():
        diff = out[k] != w
        for j in np.flatnonzero(diff.any(axis=1)):
            changed.add((k, int(j)))
        # Unselected rows are bit-identical.
        keep = np.setdiff1d(np.arange(w.shape[0]), sel[k])
        assert np.array_equal(out[k][keep].view(np.uint32), w[keep].view(np.uint32))
        # Each selected row moved by alpha·w (the raw probe), to float32 tolerance.
        np.testing.assert_allclose(
            out[k][sel[k]].astype(np.float64) - w[sel[k]],
            np.broadcast_to(alpha * p.astype(np.float64), (len(sel[k]), p.size)),
            atol=2e-6,
        )
    # Exactly `rows` rows change.
    assert changed == chosen and len(changed) == rows


def test_most_positive_selects_top_cosines():
    layers = _layers(seed=5)
    p = _probe()
    _, sel = _edit_model(layers, p, 20, 1.0, np, selection="most_positive")
    chosen = {(k, int(j)) for k, idx in sel.items() for j in idx}
    assert chosen == _ref_top(layers, p, 20, sign=+1.0)
    assert chosen != _ref_top(layers, p, 20, sign=-1.0)


def test_alpha_zero_changes_nothing_bitwise():
    layers = _layers()
    layers[0][0, 0] = -0.0  # -0.0 + 0.0 would flip the sign bit; alpha 0 must not touch it
    p = _probe()
    out, sel = _edit_model(layers, p, 30, 0.0, np)
    assert sum(len(v) for v in sel.values()) == 30
    for k, w in layers.items():
        assert out[k].tobytes() == w.tobytes()


def test_result_independent_of_layer_order():
    layers = _layers(n_layers=5)
    p = _probe()
    ref, sel_ref = _edit_model(layers, p, 40, 1.0, np)
    for order in ([4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        got, sel = _edit_model(layers, p, 40, 1.0, np, order=order)
        assert list(sel) == [0, 1, 2, 3, 4]  # canonical key order in the result
        for k in layers:
            assert got[k].tobytes() == ref[k].tobytes()
            assert np.array_equal(sel[k], sel_ref[k])


def test_ties_break_by_layer_then_row_whatever_the_order():
    # Every row of every layer has the same cosine: a pure tie. The first `rows` pairs in
    # (layer, row) order win, whichever order the layers arrive in, with string keys too.
    cos = {name: np.full(6, -0.5) for name in ["layers.2", "layers.0", "layers.1"]}
    sel = select_top_rows(cos, 8)
    assert list(sel) == ["layers.0", "layers.1", "layers.2"]
    assert sel["layers.0"].tolist() == [0, 1, 2, 3, 4, 5]
    assert sel["layers.1"].tolist() == [0, 1]
    assert sel["layers.2"].tolist() == []


def test_selection_errors():
    cos = {0: np.zeros(4), 1: np.zeros(3)}
    with pytest.raises(OpError, match=r"rows must be in \[1, 7\].*got 8"):
        select_top_rows(cos, 8)
    with pytest.raises(OpError, match=r"rows must be in \[1, 7\].*got 0"):
        select_top_rows(cos, 0)
    with pytest.raises(OpError, match="selection must be one of"):
        select_top_rows(cos, 2, selection="negative")
    with pytest.raises(OpError, match="finite"):
        select_top_rows({0: np.array([np.nan, 0.0])}, 1)


def test_shift_and_score_errors():
    w = np.zeros((4, 3), np.float32)
    with pytest.raises(OpError, match=r"direction must have shape \(3,\).*got \(4,\)"):
        shift_rows(w, direction=np.ones(4, np.float32), selected=np.array([0]))
    with pytest.raises(OpError, match=r"selected rows must be in \[0, 4\)"):
        shift_rows(w, direction=np.ones(3, np.float32), selected=np.array([4]))
    with pytest.raises(OpError, match="unique"):
        shift_rows(w, direction=np.ones(3, np.float32), selected=np.array([1, 1]))
    with pytest.raises(OpError, match="non-zero"):
        row_cosines(w, np.zeros(3, np.float32))


def _ref_project(w, d):
    d = np.atleast_2d(d).astype(np.float64)
    q, _ = np.linalg.qr(d.T)
    p = np.eye(w.shape[0]) - q @ q.T
    return p @ w.astype(np.float64), q


@pytest.mark.parametrize("k", [1, 3])
def test_project_out_removes_direction_and_is_idempotent(xp, k):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((24, 10)).astype(np.float32)
    d = rng.standard_normal((k, 24)).astype(np.float32) * 3.0
    if k == 1:
        d = d[0]
    once = to_host(project_out(xp.asarray(w), direction=xp.asarray(d)))
    ref, q = _ref_project(w, d)
    np.testing.assert_allclose(once, ref, atol=1e-6)
    # No component left along the direction(s).
    assert np.abs(q.T @ once.astype(np.float64)).max() < 1e-5
    # Idempotent (to float32 round-off of the first result).
    twice = to_host(project_out(xp.asarray(once), direction=xp.asarray(d)))
    np.testing.assert_allclose(twice, once, atol=1e-6)
    # The orthogonal part of w is untouched: w − w' lies in span(d).
    delta = w.astype(np.float64) - once
    np.testing.assert_allclose(q @ (q.T @ delta), delta, atol=1e-5)


def test_project_out_drops_dependent_rows_and_rejects_bad_input():
    w = np.random.default_rng(8).standard_normal((6, 5)).astype(np.float32)
    d = np.random.default_rng(9).standard_normal(6)
    both = project_out(w, direction=np.stack([d, 2 * d]))  # rank 1 set of directions
    np.testing.assert_allclose(both, project_out(w, direction=d), atol=1e-6)
    with pytest.raises(OpError, match=r"direction must have shape \(6,\) or \(k, 6\)"):
        project_out(w, direction=np.ones(5))
    with pytest.raises(OpError, match="non-zero"):
        project_out(w, direction=np.zeros(6))
