"""Property tests for ops/quant.py and ops/compress.py against float64 references (§7, §8).

§7 (CPET / LoftQ recovery): the error equals ``sqrt(Σ_{i>r} σ_i(W − Q)²)`` and is non-increasing in
``r``; identity compression gives a zero adapter; low-rank compression plus recovery equals the
truncation at ``k + r``. §8 (PELA): the rank formula, the parameter budget, the product error.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from ops.backend import OpError, to_host
from ops.compress import compress, compress_report, loftq_trace, pela_rank, recover
from ops.quant import NF4_CODE, fake_quantize, quantize_absmax, quantize_nf4


def _w(out=40, n_in=96, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    # A decaying spectrum plus outliers, like real weights (and so quantisation error is uneven).
    w = rng.standard_normal((out, n_in)) * 0.02
    w += 0.05 * np.outer(rng.standard_normal(out), rng.standard_normal(n_in))
    w[3, 7] = 0.4
    return w.astype(dtype)


def _ref_absmax(w, bits, group_size):
    # Loop-based float64 reference written from the definition (no reshape tricks).
    w = w.astype(np.float64)
    qmax = 2 ** (bits - 1) - 1
    out = np.zeros_like(w)
    g = w.shape[1] if group_size <= 0 else group_size
    for i in range(w.shape[0]):
        for s in range(0, w.shape[1], g):
            grp = w[i, s : s + g]
            a = np.abs(grp).max()
            if a > 0:
                out[i, s : s + g] = np.clip(np.round(grp / a * qmax), -qmax, qmax) / qmax * a
    return out


def _ref_nf4(w, block):
    w = w.astype(np.float64)
    code = np.array(NF4_CODE)
    out = np.zeros_like(w)
    for i in range(w.shape[0]):
        for s in range(0, w.shape[1], block):
            grp = w[i, s : s + block]
            a = np.abs(grp).max()
            if a > 0:
                out[i, s : s + block] = code[np.argmin(np.abs(grp[:, None] / a - code), axis=1)] * a
    return out


def _sv(x):
    return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


# --- quantisers ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group_size", [(8, 0), (8, 32), (4, 64), (4, 0), (3, 40), (2, 16)])
def test_absmax_matches_reference_and_error_bound(xp, bits, group_size):
    w = _w()
    w[5] = 0.0  # an all-zero channel stays zero (no NaN from 0/0)
    got = to_host(quantize_absmax(xp.asarray(w), bits=bits, group_size=group_size))
    ref = _ref_absmax(w, bits, group_size)
    assert got.dtype == np.float32 and got.shape == w.shape
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert not got[5].any()
    # Per-element bound: |W − Q| ≤ absmax_group / qmax / 2.
    qmax = 2 ** (bits - 1) - 1
    g = w.shape[1] if group_size <= 0 else group_size
    for s in range(0, w.shape[1], g):
        a = np.abs(w[:, s : s + g]).max(axis=1, keepdims=True)
        err = np.abs(got[:, s : s + g].astype(np.float64) - w[:, s : s + g])
        assert np.all(err <= a / qmax / 2 * (1 + 1e-5) + 1e-9)


def test_int8_error_bound_per_channel_is_absmax_over_254():
    w = _w(out=64, n_in=128, seed=1)
    q = quantize_absmax(w, bits=8, group_size=0)
    bound = np.abs(w).max(axis=1, keepdims=True) / 127 / 2
    assert np.all(np.abs(q.astype(np.float64) - w) <= bound * (1 + 1e-5))
    # The bound is attained up to a factor close to 1 (the test would catch a coarser grid).
    assert (np.abs(q.astype(np.float64) - w) / bound).max() > 0.9


def test_nf4_code_book_is_qlora_normal_float():
    code = np.array(NF4_CODE)
    assert code.size == 16 and np.all(np.diff(code) > 0)
    assert code[0] == -1.0 and code[7] == 0.0 and code[-1] == 1.0
    # Rebuild it from N(0,1) quantiles as bitsandbytes' create_normal_map(0.9677083, True) does.
    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    np.testing.assert_allclose(code, v / v.max(), atol=2e-7)


@pytest.mark.parametrize("block", [64, 16, 40])
def test_nf4_matches_nearest_code_reference(xp, block):
    w = _w()
    got = to_host(quantize_nf4(xp.asarray(w), block_size=block))
    np.testing.assert_allclose(got, _ref_nf4(w, block), atol=1e-7)


@pytest.mark.parametrize(
    "kw",
    [
        dict(scheme="int", bits=8, group_size=0),
        dict(scheme="int", bits=4, group_size=32),
        dict(scheme="int", bits=3, group_size=40),
        dict(scheme="nf4", bits=4, group_size=64),
        dict(scheme="nf4", bits=4, group_size=24),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantisers_are_idempotent_bitwise(xp, kw, dtype):
    w = xp.asarray(_w(dtype=dtype, seed=2))
    q1 = fake_quantize(w, **kw)
    q2 = fake_quantize(q1, **kw)
    assert to_host(q1).tobytes() == to_host(q2).tobytes()
    assert q1.dtype == dtype


def test_quantiser_errors():
    w = _w()
    with pytest.raises(OpError, match="bits must be in \\[2, 8\\] for scheme='int', got 16"):
        fake_quantize(w, bits=16, scheme="int")
    with pytest.raises(OpError, match="bits must be 4 for scheme='nf4', got 8"):
        fake_quantize(w, bits=8, scheme="nf4")
    with pytest.raises(OpError, match="group_size must be >= 0"):
        fake_quantize(w, bits=4, group_size=-1)
    with pytest.raises(OpError, match="scheme must be one of 'int', 'nf4', got 'fp8'"):
        fake_quantize(w, scheme="fp8")


# --- compress + recovery (§7) ----------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["int", "nf4"])
@pytest.mark.parametrize("scale", [1.0, 2.0, 0.25])
def test_recovery_error_is_the_svd_tail(xp, scheme, scale):
    w = _w()
    res, lr = compress(xp.asarray(w), rank=6, bits=4, scheme=scheme, scale=scale, niter=0)
    res, a, b = to_host(res), to_host(lr.A), to_host(lr.B)
    q_ref = _ref_absmax(w, 4, 64) if scheme == "int" else _ref_nf4(w, 64)
    np.testing.assert_allclose(res, q_ref, atol=1e-6)  # the residual is Q(W), dequantized
    assert a.shape == (6, 96) and b.shape == (40, 6) and lr.scale == scale
    s = _sv(w.astype(np.float64) - q_ref)
    err = np.linalg.norm(w - res.astype(np.float64) - scale * (b.astype(np.float64) @ a))
    # Eckart–Young: the best rank-6 correction leaves exactly the tail of W − Q's spectrum.
    np.testing.assert_allclose(err, np.sqrt((s[6:] ** 2).sum()), rtol=1e-4)
    assert err < np.linalg.norm(w - q_ref)


def test_recovery_error_non_increasing_in_rank():
    w = _w()
    errs = []
    for r in range(1, 41, 3):
        res, lr = compress(w, rank=r, bits=3, group_size=32, niter=0)
        errs.append(compress_report(w, res, lr)["error_after"])
    assert all(e1 <= e0 * (1 + 1e-6) for e0, e1 in zip(errs, errs[1:]))
    assert errs[-1] < 0.2 * errs[0]


def test_full_rank_recovery_is_exact():
    w = _w(out=24, n_in=32)
    res, lr = compress(w, rank=24, bits=2, group_size=8, niter=0)
    np.testing.assert_allclose(res + lr.delta(), w, atol=1e-6)


def test_identity_compression_gives_zero_adapter(xp):
    # A weight already on the quantisation grid: Q(W) = W, nothing to recover.
    w = xp.asarray(quantize_absmax(_w(), bits=4, group_size=64))
    res, lr = compress(w, rank=4, bits=4, group_size=64, niter=0)
    assert to_host(res).tobytes() == to_host(w).tobytes()
    assert not to_host(lr.delta()).any()
    zero = recover(w, w, rank=3, niter=0)
    assert not to_host(zero.A).any() and not to_host(zero.B).any()


@pytest.mark.parametrize("k,r", [(3, 2), (5, 7), (1, 1)])
def test_low_rank_compression_plus_recovery_is_truncation_at_k_plus_r(k, r):
    w = _w(out=30, n_in=50, seed=4).astype(np.float64)
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    trunc = lambda n: (u[:, :n] * s[:n]) @ vh[:n]
    lr = recover(w, trunc(k), rank=r, niter=0)
    np.testing.assert_allclose(trunc(k) + lr.delta(), trunc(k + r), atol=1e-12)


def test_loftq_iterations_and_report():
    w = _w(out=48, n_in=64, seed=5)
    one = compress(w, rank=4, bits=2, group_size=16, niter=0)
    same = compress(w, rank=4, bits=2, group_size=16, niter=0, loftq_iter=1)
    assert to_host(one[0]).tobytes() == to_host(same[0]).tobytes()
    errs = []
    for t in (1, 2, 3, 5):
        res, lr = compress(w, rank=4, bits=2, group_size=16, niter=0, loftq_iter=t)
        # LoftQ invariant: the final adapter is SVD_r(W − Q_T), so its error is that SVD tail.
        s = _sv(w.astype(np.float64) - res)
        rep = compress_report(w, res, lr)
        np.testing.assert_allclose(rep["error_after"], np.sqrt((s[4:] ** 2).sum()), rtol=1e-4)
        errs.append(rep["error_after"])
    # Not guaranteed monotone (the quantiser is not a Euclidean projection), but it must help here.
    assert min(errs[1:]) < errs[0]
    # The per-iteration trace reproduces every run's final error.
    trace = loftq_trace(w, rank=4, iters=5, bits=2, group_size=16, niter=0)
    norm = np.linalg.norm(w.astype(np.float64))
    np.testing.assert_allclose([trace[0], trace[1], trace[2], trace[4]], np.array(errs) / norm,
                               rtol=1e-5)  # fmt: skip
    with pytest.raises(OpError, match="iters must be >= 1, got 0"):
        loftq_trace(w, rank=4, iters=0)


def test_compress_report_numbers():
    w = _w()
    res, lr = compress(w, rank=5, niter=0)
    rep = compress_report(w, res, lr)
    w64 = w.astype(np.float64)
    np.testing.assert_allclose(rep["error_before"], np.linalg.norm(w64 - res), rtol=1e-12)
    np.testing.assert_allclose(
        rep["error_after"], np.linalg.norm(w64 - res - lr.delta().astype(np.float64)), rtol=1e-12
    )
    np.testing.assert_allclose(rep["rel_error_after"], rep["error_after"] / np.linalg.norm(w64))
    assert rep["rank"] == 5 and rep["error_after"] < rep["error_before"]


def test_randomized_svd_path_is_close_to_optimal():
    # 300×512 at rank 8 takes the randomized branch of svd_topk (niter=-1 → auto).
    w = _w(out=300, n_in=512, seed=6)
    res, lr = compress(w, rank=8, bits=4, rng=np.random.default_rng(0))
    s = _sv(w.astype(np.float64) - res)
    err = compress_report(w, res, lr)["error_after"]
    assert np.sqrt((s[8:] ** 2).sum()) <= err * (1 + 1e-6) <= np.sqrt((s[8:] ** 2).sum()) * 1.01


def test_compress_errors():
    w = _w()
    with pytest.raises(OpError, match=r"rank must be in \[1, 40\].*got 41"):
        compress(w, rank=41)
    with pytest.raises(OpError, match="rank must be in"):
        compress(w, rank=0)
    with pytest.raises(OpError, match="loftq_iter must be >= 1, got 0"):
        compress(w, rank=2, loftq_iter=0)
    with pytest.raises(OpError, match="lowrank must be one of 'none', 'pela', got 'svd'"):
        compress(w, rank=2, lowrank="svd")
    with pytest.raises(OpError, match="scale must be > 0, got 0"):
        compress(w, rank=2, scale=0.0)
    with pytest.raises(OpError, match="niter must be"):
        compress(w, rank=2, niter=-2)


# --- PELA (§8) -------------------------------------------------------------------------------


def test_pela_rank_values_and_budget():
    assert pela_rank(768, 768, 2) == 192
    assert pela_rank(768, 3072, 3) == 204
    for n_in, n_out in [(768, 768), (768, 3072), (4096, 11008), (33, 17), (100, 7)]:
        for ratio in (1.0, 1.5, 2.0, 3.0, 4.0):
            k = pela_rank(n_in, n_out, ratio)
            assert k * (n_in + n_out) <= n_in * n_out / ratio
            assert (k + 1) * (n_in + n_out) > n_in * n_out / ratio  # floor: the largest such k
            assert 1 <= k <= min(n_in, n_out)


def test_pela_rank_errors():
    with pytest.raises(OpError, match="ratio must be >= 1"):
        pela_rank(16, 16, 0.5)
    with pytest.raises(OpError, match=r"leaves rank 0 for a \(2, 2\) weight"):
        pela_rank(2, 2, 3.0)


@pytest.mark.parametrize("ratio", [2.0, 3.0])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_pela_product_error_is_svd_tail(xp, ratio, scale):
    w = _w(out=48, n_in=80, seed=7)
    res, lr = compress(xp.asarray(w), rank=1, lowrank="pela", ratio=ratio, scale=scale, niter=0)
    k = pela_rank(80, 48, ratio)
    assert lr.rank == k and lr.A.shape == (k, 80) and lr.B.shape == (48, k)
    assert not to_host(res).any()  # the adapter holds the whole weight
    assert lr.rank * (80 + 48) <= 80 * 48 / ratio
    s = _sv(w)
    err = np.linalg.norm(w.astype(np.float64) - to_host(lr.delta()))
    np.testing.assert_allclose(err, np.sqrt((s[k:] ** 2).sum()), rtol=1e-4)
