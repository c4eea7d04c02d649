"""Property tests for ops/decompose.py against float64 numpy references written from ALGORITHMS.md.

§1.6 (CorDA), §2.4 (KaSA), §6.3 (Eckart–Young for extraction), §6.4 (rank budgets), the PiSSA
rule's error.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from ops.backend import OpError, to_host
from ops.decompose import (
    allocate_ranks,
    corda,
    kasa,
    pissa,
    ranks_for_energy,
    report,
    svd_extract,
)
from ops.linalg import use_randomized

F64 = np.float64


# ----------------------------------------------------------------------------- float64 references


def ref_svd(w):
    return np.linalg.svd(np.asarray(w, dtype=F64), full_matrices=False)


def ref_topk(w, r):
    u, s, vh = ref_svd(w)
    return (u[:, :r] * s[:r]) @ vh[:r]


def ref_corda(w, c, r, mode, damp0=0.01):
    """PEFT's collect_eigens_for_layer + corda_init in float64, with its inverse and damp loop."""
    w = np.asarray(w, F64)
    c = np.asarray(c, F64)
    damp = damp0
    while True:
        c_fix = c + np.eye(len(c)) * np.mean(np.diag(c)) * damp
        c_inv = np.linalg.inv(c_fix)
        if np.linalg.norm(c_fix @ c_inv - np.eye(len(c))) < 0.05:
            break
        damp *= 2
    u, s, vh = np.linalg.svd(w @ c_fix, full_matrices=False)
    vt = vh @ c_inv
    sel = slice(0, r) if mode == "ipm" else slice(len(s) - r, len(s))
    delta = (u[:, sel] * s[sel]) @ vt[sel]
    return w - delta, delta, c_fix, s[sel]


def rand_w(rng, out_f, in_f, dtype=F64):
    return rng.standard_normal((out_f, in_f)).astype(dtype)


def rand_cov(rng, in_f, tokens=None, dtype=F64):
    """X^T X of tokens with a few outlier channels (LLM-like, moderately ill-conditioned)."""
    tokens = tokens or 3 * in_f
    x = rng.standard_normal((tokens, in_f))
    x[:, : max(1, in_f // 8)] *= 10.0
    return (x.T @ x).astype(dtype)


def decaying(rng, out_f, in_f, power=1.0, dtype=F64):
    """A matrix with σ_i = i^-power and random singular vectors."""
    k = min(out_f, in_f)
    u, _ = np.linalg.qr(rng.standard_normal((out_f, k)))
    v, _ = np.linalg.qr(rng.standard_normal((in_f, k)))
    s = np.arange(1, k + 1, dtype=F64) ** -power
    return ((u * s) @ v.T).astype(dtype)


SHAPES = [(24, 16), (16, 24), (20, 20)]


# ----------------------------------------------------------------------------- CorDA §1.6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
@pytest.mark.parametrize("scale", [1.0, 2.0, 0.25])
def test_corda_exact_split(xp, shape, mode, scale):
    """§1.6.1: W_res + s·B@A == W (fp64 to 1e-10, fp32 to 1e-5·‖W‖)."""
    rng = np.random.default_rng(0)
    w, c = rand_w(rng, *shape), rand_cov(rng, shape[1])
    for dtype, tol in ((F64, 1e-10), (np.float32, 1e-5)):
        wx, cx = xp.asarray(w.astype(dtype)), xp.asarray(c.astype(dtype))
        res, lr = corda(wx, rank=5, rng=rng, cov=cx, mode=mode, scale=scale)
        assert res.dtype == dtype and lr.A.shape == (5, shape[1]) and lr.B.shape == (shape[0], 5)
        err = np.linalg.norm(to_host(res + lr.delta()).astype(F64) - w)
        assert err <= tol * np.linalg.norm(w)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_full_rank(shape, mode):
    """§1.6.2: r = k gives W_res ≈ 0 and s·BA ≈ W for both modes."""
    rng = np.random.default_rng(1)
    w, c = rand_w(rng, *shape), rand_cov(rng, shape[1])
    k = min(shape)
    for dtype, tol in ((F64, 1e-10), (np.float32, 2e-5)):
        res, lr = corda(w.astype(dtype), rank=k, rng=rng, cov=c.astype(dtype), mode=mode, scale=2.0)
        assert np.linalg.norm(res.astype(F64)) <= tol * np.linalg.norm(w)
        assert np.linalg.norm(lr.delta().astype(F64) - w) <= tol * np.linalg.norm(w)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r", [1, 6])
def test_corda_complement(shape, r):
    """§1.6.3: B@A from IPM at r plus B@A from KPM at k − r equals W."""
    rng = np.random.default_rng(2)
    w, c = rand_w(rng, *shape), rand_cov(rng, shape[1])
    k = min(shape)
    _, ipm = corda(w, rank=r, rng=rng, cov=c, mode="ipm", niter=0)
    _, kpm = corda(w, rank=k - r, rng=rng, cov=c, mode="kpm")
    np.testing.assert_allclose(ipm.delta() + kpm.delta(), w, atol=1e-10)


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_scale_invariance(mode):
    """§1.6.4: C → c·C leaves A, B and W_res unchanged (C is normalised by mean(diag C))."""
    rng = np.random.default_rng(3)
    w, c = rand_w(rng, 24, 16), rand_cov(rng, 16)
    res1, lr1 = corda(w, rank=4, rng=rng, cov=c, mode=mode, scale=2.0, niter=0)
    for factor in (1e-3, 7.5, 1e4):
        res2, lr2 = corda(w, rank=4, rng=rng, cov=c * factor, mode=mode, scale=2.0, niter=0)
        np.testing.assert_allclose(lr2.A, lr1.A, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(lr2.B, lr1.B, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(res2, res1, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_energy_identity(shape, mode):
    """§1.6.5: ‖s·B@A·C_fix‖_F == ‖S_sel‖_2; for KPM the smallest over every choice of r."""
    rng = np.random.default_rng(4)
    w, c = rand_w(rng, *shape), rand_cov(rng, shape[1])
    r = 5
    _, lr = corda(w, rank=r, rng=rng, cov=c, mode=mode, scale=3.0, niter=0)
    _, _, c_fix, s_sel = ref_corda(w, c, r, mode)
    got = np.linalg.norm(lr.delta() @ c_fix)
    assert got == pytest.approx(np.linalg.norm(s_sel), rel=1e-9)
    s_all = np.linalg.svd(w @ c_fix, compute_uv=False)
    if mode == "kpm":
        best = min(np.linalg.norm(s_all[list(idx)]) for idx in itertools.combinations(range(7), r))
        assert got <= best * (1 + 1e-9)
        assert got == pytest.approx(np.linalg.norm(s_all[-r:]), rel=1e-9)
    else:
        assert got == pytest.approx(np.linalg.norm(s_all[:r]), rel=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
def test_corda_identity_cov_is_pissa_milora(shape):
    """§1.6.6: with C = I, IPM is the top-r SVD of W (PiSSA) and KPM the bottom-r (MiLoRA)."""
    rng = np.random.default_rng(5)
    w = rand_w(rng, *shape)
    eye = np.eye(shape[1])
    u, s, vh = ref_svd(w)
    r = 4
    _, ipm = corda(w, rank=r, rng=rng, cov=eye, mode="ipm", niter=0)
    _, kpm = corda(w, rank=r, rng=rng, cov=eye, mode="kpm")
    np.testing.assert_allclose(ipm.delta(), (u[:, :r] * s[:r]) @ vh[:r], atol=1e-10)
    np.testing.assert_allclose(kpm.delta(), (u[:, -r:] * s[-r:]) @ vh[-r:], atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_matches_float64_reference(shape, mode):
    """§1.6.7: fp32 kernel vs the float64 PEFT-algorithm reference: residual and B@A to ~1e-6."""
    rng = np.random.default_rng(6)
    w, c = rand_w(rng, *shape), rand_cov(rng, shape[1])
    res_ref, delta_ref, _, _ = ref_corda(w, c, 5, mode)
    res, lr = corda(
        w.astype(np.float32), rank=5, rng=rng, cov=c.astype(np.float32), mode=mode, scale=2.0
    )
    scale = np.abs(w).max()
    assert np.abs(res - res_ref).max() <= 2e-6 * scale
    assert np.abs(lr.delta() - delta_ref).max() <= 2e-6 * scale


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_matches_real_peft(mode):
    """§1.6.7 against PEFT 0.21's own collect_eigens_for_layer (fp32) and corda_init factors."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("attr")  # peft's corda.py imports attrs
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import collect_eigens_for_layer

    rng = np.random.default_rng(7)
    w, c = rand_w(rng, 24, 16, np.float32), rand_cov(rng, 16, dtype=np.float32)
    r, alpha = 4, 8
    lin = torch.nn.Linear(16, 24, bias=False)
    lin.weight.data = torch.from_numpy(w.copy())
    lin.covariance_matrix = torch.from_numpy(c.copy())
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=mode),
    )
    eig = collect_eigens_for_layer(lin, cfg)
    sel = slice(0, r) if mode == "ipm" else slice(-r, None)
    scaling = alpha / r
    s = eig.S_WC[sel] / scaling
    lora_a = (eig.V_WC[:, sel].t() * s.sqrt().view(-1, 1)).numpy()
    lora_b = (eig.U_WC[:, sel] * s.sqrt()).numpy()
    delta_peft = scaling * lora_b @ lora_a
    res, lr = corda(w, rank=r, rng=rng, cov=c, mode=mode, scale=scaling, niter=0)
    np.testing.assert_allclose(lr.delta(), delta_peft, atol=2e-5 * np.abs(w).max())
    np.testing.assert_allclose(res, w - delta_peft, atol=2e-5 * np.abs(w).max())


def test_corda_damping_doubles_for_indefinite_cov():
    """A covariance that 0.01·mean(diag) cannot make positive definite gets a larger damping."""
    rng = np.random.default_rng(8)
    w = rand_w(rng, 12, 8)
    c = np.diag([1.0] * 7 + [-0.05])  # mean diag 0.868 → 0.01 damping leaves it indefinite
    res, lr = corda(w, rank=3, rng=rng, cov=c, mode="ipm", niter=0)
    res_ref, delta_ref, c_fix, _ = ref_corda(w, np.diag([1.0] * 7 + [-0.05]), 3, "ipm", damp0=0.08)
    assert np.all(np.linalg.eigvalsh(c_fix) > 0)
    np.testing.assert_allclose(lr.delta(), delta_ref, atol=1e-10)


# ----------------------------------------------------------------------------- KaSA §2.4


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r", [1, 5])
def test_kasa_truncation(xp, shape, r):
    """§2.4.1 and §2.4.3: W_base + dropped == W, rank k − r, top σ kept, ‖W − W_base‖ = √Σ tail
    σ²."""
    rng = np.random.default_rng(10)
    w = rand_w(rng, *shape)
    k = min(shape)
    base, lr = kasa(xp.asarray(w), rank=r, rng=np.random.default_rng(0))
    base = to_host(base)
    u, s, vh = ref_svd(w)
    dropped = (u[:, k - r :] * s[k - r :]) @ vh[k - r :]
    np.testing.assert_allclose(base + dropped, w, atol=1e-10)
    sb = np.linalg.svd(base, compute_uv=False)
    np.testing.assert_allclose(sb[: k - r], s[: k - r], rtol=1e-10)
    assert np.all(sb[k - r :] < 1e-10 * s[0])  # rank k − r
    assert np.linalg.matrix_rank(base, tol=1e-9 * s[0]) == k - r
    assert np.linalg.norm(w - base) == pytest.approx(math.sqrt(np.sum(s[k - r :] ** 2)), rel=1e-10)


def test_kasa_idempotent_fp32():
    """§2.4.2: truncate(truncate(W, r), r) == truncate(W, r) to ~1e-6 in fp32."""
    rng = np.random.default_rng(11)
    w = rand_w(rng, 48, 32, np.float32)
    once, _ = kasa(w, rank=6, rng=rng)
    twice, _ = kasa(once, rank=6, rng=rng)
    assert np.abs(twice - once).max() <= 1e-6 * np.abs(w).max() * 4


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_kasa_adapter_is_zero_at_init(scale):
    """§2.4.4: B = 0, so the adapter delta is exactly 0; A' = diag(d)·A is seeded and bounded."""
    w = rand_w(np.random.default_rng(12), 24, 16, np.float32)
    _, lr = kasa(w, rank=4, rng=np.random.default_rng(3), scale=scale)
    assert lr.B.shape == (24, 4) and lr.A.shape == (4, 16) and lr.A.dtype == np.float32
    assert not np.any(lr.delta()) and np.any(lr.A)
    assert lr.scale == scale
    _, again = kasa(w, rank=4, rng=np.random.default_rng(3), scale=scale)
    assert again.A.tobytes() == lr.A.tobytes()


def test_kasa_official_bug_flag():
    """§2.4.6: the released code keeps in − r components; for in > out (and in − r ≥ out) W_base ==
    W."""
    rng = np.random.default_rng(13)
    wide = rand_w(rng, 16, 24)  # in = 24 > out = 16
    base, _ = kasa(wide, rank=4, rng=rng, truncation="official")
    np.testing.assert_array_equal(base, wide)
    peft_base, _ = kasa(wide, rank=4, rng=rng)
    assert np.linalg.norm(peft_base - wide) > 0
    tall = rand_w(rng, 24, 16)  # in < out: both rules keep k − r
    a, _ = kasa(tall, rank=4, rng=rng, truncation="official")
    b, _ = kasa(tall, rank=4, rng=rng)
    np.testing.assert_allclose(a, b, atol=1e-12)


# ----------------------------------------------------------------------------- PiSSA


@pytest.mark.parametrize("shape", SHAPES + [(300, 280)])
@pytest.mark.parametrize("niter", [-1, 0, 2])
def test_pissa_split_and_principal_part(xp, shape, niter):
    """Residual + s·B@A == W exactly; s·B@A is the top-r SVD (decaying spectrum for randomized)."""
    rng = np.random.default_rng(20)
    w = decaying(rng, *shape, power=1.0)
    r = 4
    res, lr = pissa(xp.asarray(w), rank=r, rng=np.random.default_rng(0), niter=niter, scale=2.0)
    res, delta = to_host(res), to_host(lr.delta())
    np.testing.assert_allclose(res + delta, w, atol=1e-12)
    exact = niter == 0 or (niter == -1 and not use_randomized(shape, r))
    # randomized (p = 10, q power steps): accuracy ~ (σ_{r+p}/σ_r)^(2q+1) = (r/(r+p))^(2q+1) here
    q = niter if niter > 0 else 4
    tol = 1e-10 if exact else 3 * (r / (r + 10)) ** (2 * q + 1)
    np.testing.assert_allclose(delta, ref_topk(w, r), atol=tol * np.abs(w).max())
    # PEFT's factor convention: A = √(S/s)·Vh, so s·‖A_i‖² = σ_i
    s_ref = ref_svd(w)[1][:r]
    np.testing.assert_allclose(2.0 * np.sum(to_host(lr.A) ** 2, axis=1), s_ref, rtol=max(tol, 1e-9))


def test_pissa_fp32_split_tolerance():
    w = rand_w(np.random.default_rng(21), 64, 48, np.float32)
    res, lr = pissa(w, rank=8, rng=None, scale=0.5)
    assert res.dtype == np.float32
    assert np.linalg.norm(res + lr.delta() - w) <= 1e-6 * np.linalg.norm(w)


@pytest.mark.parametrize(("spectrum", "bound"), [("gaussian", 1.004), ("decay", 1.0004)])
def test_pissa_rule_error(spectrum, bound):
    """The niter=-1 rule (p = 10, q = 4): residual ‖W − sBA‖_F against the exact top-r optimum.

    Measured at 512×384, r = 16: 1.0029 on a Gaussian matrix (flat Marchenko–Pastur top, the hard
    case) and 1.00024 on σ_i ∝ i^-0.5; PEFT's pissa_niter_4 (torch.svd_lowrank, q = r): 1.0055 and
    1.0034.
    """
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(22)
    if spectrum == "gaussian":
        w = rand_w(rng, 512, 384, np.float32)
    else:
        w = decaying(rng, 512, 384, power=0.5, dtype=np.float32)
    r = 16
    assert use_randomized(w.shape, r)
    res_rule, _ = pissa(w, rank=r, rng=np.random.default_rng(0))
    s = ref_svd(w)[1]
    optimum = math.sqrt(np.sum(s[r:] ** 2))
    ratio = np.linalg.norm(res_rule.astype(F64)) / optimum
    assert 1 - 1e-6 <= ratio <= bound, ratio
    torch.manual_seed(0)
    u, sv, v = torch.svd_lowrank(torch.from_numpy(w), q=r, niter=4)  # PEFT's pissa_niter_4
    peft_ratio = np.linalg.norm(w.astype(F64) - ((u * sv) @ v.T).double().numpy()) / optimum
    assert ratio <= peft_ratio


# ----------------------------------------------------------------------------- extraction §6.3


@pytest.mark.parametrize("shape", SHAPES + [(400, 300)])
@pytest.mark.parametrize("r", [1, 3, 8])
def test_extract_eckart_young_exact(shape, r):
    """§6.3: with the exact SVD, ‖δ − sBA‖_F = √Σ_{i>r}σ² and ‖δ − sBA‖_2 = σ_{r+1}."""
    rng = np.random.default_rng(30)
    d = rand_w(rng, *shape)
    none, lr = svd_extract(d, rank=r, rng=rng, niter=0, scale=1.5)
    assert none is None
    s = ref_svd(d)[1]
    e = d - lr.delta()
    assert np.linalg.norm(e) == pytest.approx(math.sqrt(np.sum(s[r:] ** 2)), rel=1e-10)
    assert np.linalg.norm(e, 2) == pytest.approx(s[r], rel=1e-10)


@pytest.mark.parametrize("niter", [-1, 0, 1, 4])
@pytest.mark.parametrize("true_rank", [1, 5])
def test_extract_exact_at_true_rank(niter, true_rank):
    """A task vector of rank ≤ r is reproduced exactly, whichever SVD path."""
    rng = np.random.default_rng(31)
    d = rng.standard_normal((300, true_rank)) @ rng.standard_normal((true_rank, 280))
    for r in (true_rank, true_rank + 3):
        _, lr = svd_extract(d, rank=r, rng=np.random.default_rng(1), niter=niter)
        np.testing.assert_allclose(lr.delta(), d, atol=1e-9 * np.abs(d).max())


@pytest.mark.parametrize("power", [0.0, 0.5, 1.5])
def test_extract_randomized_within_bound(power):
    """Randomized (p = 10, q = 4) vs exact: Frobenius error within 1 %, spectral within HMT."""
    rng = np.random.default_rng(32)
    shape, r = (400, 320), 24
    d = rand_w(rng, *shape) if power == 0.0 else decaying(rng, *shape, power=power)
    d = d.astype(np.float32)
    assert use_randomized(shape, r)
    _, lr = svd_extract(d, rank=r, rng=np.random.default_rng(0))
    s = ref_svd(d)[1]
    e = d.astype(F64) - lr.delta().astype(F64)
    opt = math.sqrt(np.sum(s[r:] ** 2))
    assert np.linalg.norm(e) <= 1.01 * opt
    p, q = 10, 4
    hmt = (1 + 4 * math.sqrt(r + p) / (p - 1) * math.sqrt(min(shape))) ** (1 / (2 * q + 1))
    assert np.linalg.norm(e, 2) <= hmt * s[r] * 1.001


def test_extract_singular_values_and_sign_convention():
    """σ from the factors are non-increasing; B@A does not depend on the sign convention (±δ)."""
    rng = np.random.default_rng(33)
    d = decaying(rng, 40, 30, power=0.7)
    _, lr = svd_extract(d, rank=6, rng=rng, niter=0)
    sig = np.sum(lr.A**2, axis=1)  # σ_i / scale
    assert np.all(np.diff(sig) <= 1e-12)
    _, neg = svd_extract(-d, rank=6, rng=rng, niter=0)
    np.testing.assert_allclose(neg.delta(), -lr.delta(), atol=1e-12)


def test_same_seed_same_bytes():
    w = rand_w(np.random.default_rng(34), 300, 280, np.float32)
    c = rand_cov(np.random.default_rng(35), 280, dtype=np.float32)
    for fn, kw in ((svd_extract, {}), (pissa, {}), (kasa, {}), (corda, {"cov": c})):
        out1 = fn(w, rank=8, rng=np.random.default_rng(5), **kw)
        out2 = fn(w, rank=8, rng=np.random.default_rng(5), **kw)
        assert out1[1].A.tobytes() == out2[1].A.tobytes()
        assert out1[1].B.tobytes() == out2[1].B.tobytes()
        if out1[0] is not None:
            assert out1[0].tobytes() == out2[0].tobytes()


# ----------------------------------------------------------------------------- report


def test_report_figures():
    rng = np.random.default_rng(40)
    w = decaying(rng, 30, 20, power=0.5)
    s = ref_svd(w)[1]
    tot = np.sum(s**2)
    res, lr = pissa(w, rank=4, rng=rng, niter=0, scale=2.0)
    rep = report(w, res, lr)
    assert rep["rank"] == 4 and rep["scale"] == 2.0
    np.testing.assert_allclose(rep["sigma_kept"], s[:4], rtol=1e-5)
    assert rep["energy_adapter"] == pytest.approx(np.sum(s[:4] ** 2) / tot, rel=1e-10)
    assert rep["rel_error"] < 1e-13 and rep["norm"] == pytest.approx(math.sqrt(tot))
    _, ex = svd_extract(w, rank=4, rng=rng, niter=0)
    rep = report(w, None, ex)
    assert rep["energy_dropped"] == pytest.approx(np.sum(s[4:] ** 2) / tot, rel=1e-10)
    base, ka = kasa(w, rank=4, rng=rng)
    rep = report(w, base, ka, dropped_values=4)
    np.testing.assert_allclose(sorted(rep["sigma_dropped"]), sorted(s[-4:]), rtol=1e-5)
    assert rep["rel_error"] == pytest.approx(math.sqrt(np.sum(s[-4:] ** 2) / tot), rel=1e-9)
    assert rep["energy_adapter"] == 0.0 and rep["sigma_kept"] == [0.0] * 4


# ----------------------------------------------------------------------------- budgets §6.4


def brute_force(spectra, budget, costs, normalize=False, min_rank=0, max_rank=None):
    """Minimal summed (normalised) squared error over every feasible rank vector."""
    best = math.inf
    gains = []
    for s in spectra:
        g = np.asarray(s, F64) ** 2
        gains.append(g / g.sum() if normalize and g.sum() > 0 else g)
    caps = [len(s) if max_rank is None else min(len(s), max_rank) for s in spectra]
    for ranks in itertools.product(*[range(min(min_rank, c), c + 1) for c in caps]):
        if sum(r * c for r, c in zip(ranks, costs)) <= budget:
            best = min(best, sum(g[r:].sum() for g, r in zip(gains, ranks)))
    return best


def error_of(spectra, ranks, normalize=False):
    tot = 0.0
    for s, r in zip(spectra, ranks):
        g = np.asarray(s, F64) ** 2
        tot += (g / g.sum() if normalize else g)[r:].sum()
    return tot


def random_spectra(rng, n=3, max_len=4):
    return [
        np.sort(rng.random(rng.integers(1, max_len + 1)) * rng.choice([1, 5]))[::-1]
        for _ in range(n)
    ]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("normalize", [False, True])
def test_allocate_rank_budget_is_optimal(seed, normalize):
    rng = np.random.default_rng(seed)
    spectra = random_spectra(rng)
    total = sum(len(s) for s in spectra)
    for budget in range(total + 2):
        for min_rank, max_rank in ((0, None), (1, None), (0, 2)):
            if min_rank * len(spectra) > budget:
                with pytest.raises(OpError, match="min_rank"):
                    allocate_ranks(spectra, budget, min_rank=min_rank)
                continue
            ranks = allocate_ranks(
                spectra, budget, normalize=normalize, min_rank=min_rank, max_rank=max_rank
            )
            assert sum(ranks) <= budget
            assert all(min_rank <= r <= (max_rank or 99) for r in ranks)
            opt = brute_force(spectra, budget, [1] * 3, normalize, min_rank, max_rank)
            assert error_of(spectra, ranks, normalize) == pytest.approx(opt, abs=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_allocate_param_budget_greedy_bound(seed):
    """Never over budget; within one item of the brute-force optimum (fractional-knapsack bound)."""
    rng = np.random.default_rng(100 + seed)
    spectra = random_spectra(rng)
    costs = [int(c) for c in rng.integers(2, 7, size=3)]
    top_item = max(float(s[0]) ** 2 for s in spectra)
    for budget in range(0, sum(len(s) * c for s, c in zip(spectra, costs)) + 3):
        ranks = allocate_ranks(spectra, budget, unit="params", costs=costs)
        assert sum(r * c for r, c in zip(ranks, costs)) <= budget
        opt = brute_force(spectra, budget, costs)
        assert error_of(spectra, ranks) <= opt + top_item + 1e-12
    # equal costs: the parameter budget reduces to the (exact) rank budget
    for budget in range(0, 3 * sum(len(s) for s in spectra) + 1, 3):
        ranks = allocate_ranks(spectra, budget, unit="params", costs=[3, 3, 3])
        assert ranks == allocate_ranks(spectra, budget // 3)


@pytest.mark.parametrize("unit", ["rank", "params"])
@pytest.mark.parametrize("normalize", [False, True])
def test_allocate_monotone_in_budget(unit, normalize):
    rng = np.random.default_rng(200)
    spectra = [np.sort(rng.random(n) * 3)[::-1] for n in (8, 5, 12, 3)]
    costs = [40, 17, 33, 9]
    prev = [0] * 4
    for budget in range(0, 600 if unit == "params" else 30):
        ranks = allocate_ranks(spectra, budget, unit=unit, costs=costs, normalize=normalize)
        assert all(a >= b for a, b in zip(ranks, prev)), (budget, ranks, prev)
        prev = ranks


@pytest.mark.parametrize("unit", ["rank", "params"])
@pytest.mark.parametrize("flat", [False, True])
def test_allocate_uniform_for_equal_layers(unit, flat):
    s = np.ones(10) if flat else np.linspace(3, 1, 10)
    spectra = [s.copy() for _ in range(4)]
    for per_layer in range(0, 11):
        budget = 4 * per_layer * (7 if unit == "params" else 1)
        ranks = allocate_ranks(spectra, budget, unit=unit, costs=[7] * 4)
        assert ranks == [per_layer] * 4


def test_allocate_edge_cases_and_errors():
    spectra = [np.array([3.0, 1.0]), np.zeros(4), np.array([2.0, 0.0])]
    assert allocate_ranks(spectra, 10) == [2, 0, 1]  # zero components are never taken
    assert allocate_ranks(spectra, 10, min_rank=2) == [2, 0, 1]  # min_rank capped at #nonzero σ
    assert allocate_ranks([], 5) == []
    with pytest.raises(OpError, match="unit"):
        allocate_ranks(spectra, 3, unit="bytes")
    with pytest.raises(OpError, match="costs"):
        allocate_ranks(spectra, 3, unit="params")
    with pytest.raises(OpError, match="max_rank"):
        allocate_ranks(spectra, 3, min_rank=3, max_rank=2)
    with pytest.raises(OpError, match="descending"):
        allocate_ranks([np.array([1.0, 2.0])], 1)


def test_normalize_equalises_a_large_layer():
    small = np.linspace(1.0, 0.1, 8)
    big = 100 * small
    assert allocate_ranks([small, big], 8) == [0, 8]
    assert allocate_ranks([small, big], 8, normalize=True) == [4, 4]


def test_ranks_for_energy():
    rng = np.random.default_rng(300)
    spectra = [np.sort(rng.random(n))[::-1] for n in (6, 9, 4)] + [np.zeros(3)]
    for energy in (0.3, 0.8, 0.95, 1.0):
        ranks = ranks_for_energy(spectra, energy)
        for s, r in zip(spectra, ranks):
            e = np.cumsum(s**2)
            if e[-1] == 0:
                assert r == 0
                continue
            assert e[r - 1] >= energy * e[-1] * (1 - 1e-12)
            assert r == 1 or e[r - 2] < energy * e[-1]
    assert ranks_for_energy(spectra, 0.3, min_rank=3, max_rank=5)[:3] == [3, 3, 3]
    assert ranks_for_energy(spectra, 1.0, max_rank=5) == [5, 5, 4, 0]


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda w, c: pissa(w, rank=0, rng=None), r"rank must be in \[1, 16\].*got 0"),
        (lambda w, c: pissa(w, rank=17, rng=None), r"rank must be in \[1, 16\].*got 17"),
        (lambda w, c: pissa(w, rank=2, rng=None, niter=-2), "niter must be .* got -2"),
        (lambda w, c: svd_extract(w, rank=2, rng=None, scale=0.0), "scale must be .* got 0.0"),
        (lambda w, c: corda(w, rank=2, rng=None, cov=c, mode="xpm"), "mode must be .* 'xpm'"),
        (lambda w, c: corda(w, rank=2, rng=None, cov=c[:3, :3]), r"cov must have shape .*\(3, 3\)"),
        (lambda w, c: corda(w, rank=2, rng=None, cov=c * 0), "mean diagonal"),
        (lambda w, c: corda(w, rank=2, rng=None, cov=c, damping=-1.0), "damping must be .* -1.0"),
        (lambda w, c: corda(w, rank=2, rng=None, cov=c, mode="kpm", niter=4), "niter applies"),
        (lambda w, c: kasa(w, rank=2, rng=None, truncation="paper"), "truncation must be .*paper"),
    ],
)
def test_bad_parameters_raise_operror(call, match):
    w = rand_w(np.random.default_rng(0), 24, 16)
    c = rand_cov(np.random.default_rng(1), 16)
    with pytest.raises(OpError, match=match):
        call(w, c)
