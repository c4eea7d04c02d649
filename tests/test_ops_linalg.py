"""Sign-canonical SVD, top-k SVD (exact and randomized), LowRank helpers — against float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest

from ops.backend import OpError, host_rng, to_host
from ops.linalg import canonicalize_signs, randomized_svd, svd, svd_topk, use_randomized
from ops.lowrank import LowRank, rank_for_energy, split_factors


def _decaying(rng, m, n, decay=8.0):
    u, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
    v, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
    s = np.exp(-np.arange(min(m, n)) / decay)
    return (u * s) @ v.T


@pytest.mark.parametrize("shape", [(20, 12), (12, 20), (16, 16)])
def test_svd_reconstructs_and_signs_canonical(xp, shape):
    rng = np.random.default_rng(0)
    w64 = rng.standard_normal(shape)
    u, s, vh = svd(xp.asarray(w64))
    u, s, vh = map(to_host, (u, s, vh))
    np.testing.assert_allclose((u * s) @ vh, w64, atol=1e-10)
    assert np.all(np.diff(s) <= 0)
    idx = np.argmax(np.abs(u), axis=0)
    assert np.all(u[idx, np.arange(u.shape[1])] > 0)
    # Canonicalization is idempotent and preserves the product.
    u2, vh2 = canonicalize_signs(u, vh)
    np.testing.assert_array_equal(u2, u)
    np.testing.assert_array_equal(vh2, vh)


def test_svd_sign_flip_invariance():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((10, 7))
    u1, _, vh1 = svd(w)
    u2, _, vh2 = svd(-w)  # singular vectors of -w: u flips; canonical form must agree up to vh sign
    np.testing.assert_allclose(np.abs(u1), np.abs(u2), atol=1e-12)
    np.testing.assert_allclose(u1, u2, atol=1e-12)
    np.testing.assert_allclose(vh1, -vh2, atol=1e-12)


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_randomized_svd_close_to_exact(xp, shape):
    rng = np.random.default_rng(2)
    w = _decaying(rng, *shape).astype(np.float32)
    k = 16
    u, s, vh = randomized_svd(xp.asarray(w), k, niter=4, rng=host_rng(0, "w"))
    u, s, vh = map(to_host, (u, s, vh))
    s_ref = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(s, s_ref[:k], rtol=1e-4)
    err = np.linalg.norm(w - (u * s) @ vh)
    best = np.sqrt((s_ref[k:] ** 2).sum())
    assert err <= best * 1.01 + 1e-6


def test_randomized_is_deterministic_per_rng():
    w = _decaying(np.random.default_rng(3), 100, 80).astype(np.float32)
    a = randomized_svd(w, 8, rng=host_rng(5, "x"))
    b = randomized_svd(w, 8, rng=host_rng(5, "x"))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_svd_topk_rule_and_errors():
    assert use_randomized((4096, 4096), 16)
    assert not use_randomized((64, 64), 16)
    assert not use_randomized((4096, 4096), 2000)
    w = np.random.default_rng(0).standard_normal((30, 20)).astype(np.float32)
    u, s, vh = svd_topk(w, 5)
    assert u.shape == (30, 5) and s.shape == (5,) and vh.shape == (5, 20)
    for bad in (0, 21):
        with pytest.raises(OpError, match="rank must be in"):
            svd_topk(w, bad)


def test_split_factors_exact_product(xp):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((12, 9))
    u, s, vh = svd(xp.asarray(w))
    for scale in (1.0, 2.0, 0.25):
        lr = split_factors(u[:, :4], s[:4], vh[:4], scale)
        ref = (to_host(u)[:, :4] * to_host(s)[:4]) @ to_host(vh)[:4]
        np.testing.assert_allclose(to_host(lr.delta()), ref, atol=1e-12)
        assert lr.rank == 4 and lr.scale == scale
    with pytest.raises(OpError, match="scale must be > 0"):
        split_factors(u, s, vh, 0.0)


def test_rank_for_energy():
    s = np.array([3.0, 2.0, 1.0, 0.0])
    tot = 14.0
    assert rank_for_energy(s, 9 / tot) == 1
    assert rank_for_energy(s, 9.5 / tot) == 2
    assert rank_for_energy(s, 1.0) == 3
    assert rank_for_energy(np.zeros(3), 0.5) == 0
    with pytest.raises(OpError, match="energy must be in"):
        rank_for_energy(s, 1.5)


def test_lowrank_delta_shape():
    lr = LowRank(np.ones((2, 5)), np.ones((3, 2)), 0.5)
    np.testing.assert_array_equal(lr.delta(), np.full((3, 5), 1.0))


def test_host_rng_depends_on_seed_name_and_extra():
    a = host_rng(0, "a").random(4)
    assert not np.array_equal(a, host_rng(1, "a").random(4))
    assert not np.array_equal(a, host_rng(0, "b").random(4))
    assert not np.array_equal(a, host_rng(0, "a", 1).random(4))
    np.testing.assert_array_equal(a, host_rng(0, "a").random(4))


def test_exact_topk_takes_the_gram_route_when_safe_and_falls_back_otherwise():
    """CPU exact top-k: fp64 Gram + top-k eigh when κ_k allows, else the sliced full SVD."""
    from ops.linalg import gram_svd, svd, svd_topk

    rng = np.random.default_rng(0)
    q1, _ = np.linalg.qr(rng.standard_normal((300, 120)))
    q2, _ = np.linalg.qr(rng.standard_normal((120, 120)))
    cases = [
        (np.arange(1, 121) ** -1.0, 10, True),  # κ_10 = 10
        (np.logspace(0, -12, 120), 60, False),  # κ_60 ≈ 9e5 > 2.3e4: refused
    ]
    for sig, k, gram in cases:
        w = ((q1 * sig) @ q2.T).astype(np.float32)  # (300, 120), exact spectrum sig
        assert (gram_svd(w, k) is not None) == gram
        u, s, vh = svd_topk(w, k, niter=0)
        uf, sf, vhf = svd(w)
        if gram:
            np.testing.assert_allclose(s, sf[:k], rtol=2e-5)
            np.testing.assert_allclose(u, uf[:, :k], atol=1e-4)  # canonical signs on both
            np.testing.assert_allclose(vh, vhf[:k], atol=1e-4)
        else:  # refused: exactly the sliced full SVD
            assert np.array_equal(s, sf[:k]) and np.array_equal(u, uf[:, :k])
        assert s.dtype == np.float32 and u.shape == (300, k) and vh.shape == (k, 120)
    # The wide orientation uses the other Gram (short side) and gives the transposed answer.
    w = ((q1 * np.arange(1, 121) ** -1.0) @ q2.T).astype(np.float32)
    u, s, vh = svd_topk(w.T.copy(), 10, niter=0)
    ut, st, vht = svd_topk(w, 10, niter=0)
    np.testing.assert_allclose(s, st, rtol=1e-5)
    np.testing.assert_allclose(np.abs(u), np.abs(vht.T), atol=1e-4)


@pytest.mark.parametrize("shape", [(200, 80), (80, 200)])
def test_singular_values_from_the_gram_match_the_svd(shape):
    from ops.linalg import singular_values

    rng = np.random.default_rng(1)
    w = (rng.standard_normal(shape) * np.logspace(0, -9, shape[1])).astype(np.float32)
    s = singular_values(w)
    ref = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    assert s.dtype == np.float64 and s.shape == (min(shape),) and np.all(np.diff(s) <= 0)
    np.testing.assert_allclose(s, ref, rtol=0, atol=1e-7 * ref[0])  # every σ to 1e-7·σ₁
    big = ref > 1e-4 * ref[0]
    np.testing.assert_allclose(s[big], ref[big], rtol=1e-9)  # the top: to fp64 precision
    assert np.sum(s**2) == pytest.approx(np.sum(w.astype(np.float64) ** 2), rel=1e-12)
