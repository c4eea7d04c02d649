"""Merge kernels and sparsifiers against float64 numpy references written from the spec.

References: ALGORITHMS.md §12 (mergekit 0.1.5 ``generalized_task_arithmetic`` + ``sparsify``) and
§3.2 (the official ``PCB_merge``, transcribed with full sorts); invariances of §3.6 and §12.4.
"""

from __future__ import annotations

import numpy as np
import pytest

from ops import merge as M
from ops.backend import OpError, host_rng, to_host
from ops.sparsify import (
    bernoulli_mask,
    kth_smallest,
    magnitude_mask,
    rescale_l1,
    sortable_keys,
    topk_count,
)

# --------------------------------------------------------------------------- references


def ref_magnitude(x: np.ndarray, density: float) -> np.ndarray:
    """mergekit ``sparsify.magnitude`` with a stable descending order (lowest index wins ties)."""
    if density >= 1:
        return x.copy()
    k = max(1, int(density * x.size))
    order = np.argsort(-np.abs(x).ravel(), kind="stable")[:k]
    mask = np.zeros(x.size)
    mask[order] = 1
    return x * mask.reshape(x.shape)


def ref_gta(sparse, w, *, consensus, normalize, lam):
    """mergekit ``GeneralizedTaskArithmeticMerge.merge_group`` after sparsification, float64."""
    w = np.asarray(w, dtype=np.float64).reshape((-1,) + (1,) * (sparse.ndim - 1))
    wd = sparse * w
    if consensus:
        majority = np.where(wd.sum(0) >= 0, 1.0, -1.0)
        mask = np.sign(wd) == majority
        mixed = (wd * mask).sum(0)
        div = (w * mask).sum(0)
        div[div == 0] = 1
    else:
        mixed = wd.sum(0)
        div = w.sum(0)
        div[np.abs(div) < 1e-8] = 1
    if normalize:
        mixed = mixed / div
    return mixed * lam


def ref_dare_sparse(x, keep, rescale, density):
    """DARE's drop and rescale from an explicit keep-mask (§12.3)."""
    masked = x * keep
    if rescale == "l1":
        b, a = np.abs(x).sum(), np.abs(masked).sum()
        return masked if (b < 1e-7 or a < 1e-7) else masked * (b / a)
    if rescale == "density":
        return masked / density
    return masked


def ref_pcb(T: np.ndarray, ratio: float, q: float, lam: np.ndarray | float = 1.0):
    """The official ``PCB_merge`` (§3.2) in float64 with full sorts; returns (merged, scale)."""
    n, d = T.shape

    def clamp(x, min_ratio, max_ratio):
        s = np.sort(x, axis=1)
        lo = s[:, int(d * min_ratio)][:, None]
        hi = s[:, int(d * (1 - max_ratio) - 1)][:, None]
        return np.minimum(np.maximum(x, lo), hi)  # torch.clamp(x, min, max)

    def normalize(x):
        mn, mx = x.min(1, keepdims=True), x.max(1, keepdims=True)
        return (x - mn) / (mx - mn)

    a = clamp(np.abs(T), q, q)
    tc = np.sign(T) * a
    intra = np.exp(n * normalize(a) ** 2)
    inter = np.tanh(T * T.sum(0))
    scale = normalize(clamp(intra * inter, 1 - ratio, 0))
    lam = np.broadcast_to(np.asarray(lam, dtype=np.float64), (n,))[:, None]
    merged = (lam * tc * scale).sum(0) / np.maximum(scale.sum(0), 1e-12)
    return merged, scale


def rand_deltas(seed, k=3, shape=(17, 23), dtype=np.float64, quantize=False):
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((k, *shape)) * 0.01
    if quantize:  # many exact ties, like bf16 differences
        d = np.round(d * 300) / 300
    return d.astype(dtype)


def rngs(seed, name, k):
    return [host_rng(seed, name, i) for i in range(k)]


# --------------------------------------------------------------------------- sparsify


@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("quantize", [False, True])
def test_magnitude_mask_matches_stable_argsort(xp, density, quantize):
    x = rand_deltas(1, k=1, shape=(31, 29), quantize=quantize)[0]
    mask = to_host(magnitude_mask(xp.asarray(x), density))
    np.testing.assert_array_equal(x * mask, ref_magnitude(x, density))
    assert mask.sum() == topk_count(x.size, density)


def test_topk_count_rules():
    assert topk_count(1000, 0.2) == 200
    assert topk_count(10, 0.01) == 1  # mergekit 0.1.5 keeps at least one
    assert topk_count(10, 1.0) == 10
    assert topk_count(7, 0.5) == 3  # int(), not round()


def test_bernoulli_mask_is_the_host_draw(xp):
    m1 = to_host(bernoulli_mask((40, 50), 0.3, host_rng(7, "w", 2), like=xp.zeros(1)))
    expect = host_rng(7, "w", 2).random((40, 50), dtype=np.float32) < np.float32(0.3)
    np.testing.assert_array_equal(m1, expect)
    m2 = bernoulli_mask((40, 50), 0.3, host_rng(7, "w", 3))
    assert not np.array_equal(m1, m2)
    assert abs(m1.mean() - 0.3) < 0.05


def test_rescale_l1_preserves_norm_and_skips_tiny(xp):
    x = rand_deltas(2, k=1, shape=(50, 40))[0]
    keep = np.random.default_rng(0).random(x.shape) < 0.3
    out = to_host(rescale_l1(xp.asarray(x), xp.asarray(x * keep)))
    assert np.isclose(np.abs(out).sum(), np.abs(x).sum(), rtol=1e-12)
    tiny = np.full((4,), 1e-9)
    np.testing.assert_array_equal(to_host(rescale_l1(xp.asarray(tiny), xp.asarray(tiny * 0.5))),
                                  tiny * 0.5)  # fmt: skip


def test_sortable_keys_are_monotone():
    for dt in (np.float32, np.float64):
        v = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-40, 2.0, np.inf], dtype=dt)
        k = [int(x) for x in sortable_keys(v)]
        assert k == sorted(k) and len(set(k)) == len(k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cap", [1 << 22, 3])  # 3 forces histogram refinement down to the last bit
def test_kth_smallest_equals_partition(xp, dtype, cap):
    rng = np.random.default_rng(3)
    rows, d = 3, 20000
    x = rng.standard_normal((rows, d)).astype(dtype)
    x[:, :3000] = 0.0  # a heavy tie at zero
    x[:, 3000:3500] = -0.0
    x[:, 3500:4500] = -1.25  # a tie among negatives
    x[1, 10000:] = 7.0  # one row dominated by a single value
    x[2] = np.abs(x[2]) * 1e-30  # tiny magnitudes
    cuts = np.sort(rng.choice(np.arange(1, d), size=12, replace=False))
    chunks = [xp.asarray(c) for c in np.split(x, cuts, axis=1)]
    ks = [0, 1, 2999, 3000, 3499, 3500, 4499, 4500, 9999, 10000, d // 2, d - 2, d - 1]
    got = kth_smallest(lambda: iter(chunks), ks, gather_cap=cap)
    ref = np.stack([np.partition(x[r], ks)[ks] for r in range(rows)])
    np.testing.assert_array_equal(got, ref)
    assert got.dtype == dtype
    # 1-D chunks are one row; ranks may depend on the total length; chunk order is free.
    got1 = kth_smallest(lambda: (c[0] for c in reversed(chunks)), lambda n: [n // 3])
    assert got1[0, 0] == np.partition(x[0], d // 3)[d // 3]


def test_kth_smallest_errors():
    with pytest.raises(OpError, match=r"rank k must be in \[0, 5\), got 5"):
        kth_smallest(lambda: iter([np.arange(5, dtype=np.float32)]), [5])
    with pytest.raises(OpError, match="empty stream"):
        kth_smallest(lambda: iter([]), [0])
    with pytest.raises(OpError, match="float32 or float64"):
        kth_smallest(lambda: iter([np.arange(5)]), [0])


# --------------------------------------------------------------------------- task arithmetic, TIES


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, -0.2, 1.3], [1.0, -1.0, 0.0]])
def test_task_arithmetic_matches_reference(xp, normalize, weights):
    d = rand_deltas(4)
    got = to_host(M.task_arithmetic(xp.asarray(d), xp.asarray(weights), lambda_=0.7,
                                    normalize=normalize))  # fmt: skip
    ref = ref_gta(d, weights, consensus=False, normalize=normalize, lam=0.7)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 2.0, 0.1], [1.0, -0.5, 0.7]])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("quantize", [False, True])
def test_ties_matches_mergekit_semantics(xp, density, weights, normalize, quantize):
    d = rand_deltas(5, quantize=quantize)
    got = to_host(M.ties(xp.asarray(d), xp.asarray(weights), density=density, lambda_=1.3,
                         normalize=normalize))  # fmt: skip
    sparse = np.stack([ref_magnitude(x, density) for x in d])
    ref = ref_gta(sparse, weights, consensus=True, normalize=normalize, lam=1.3)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)


def test_ties_fp32_close_to_fp64_reference(xp):
    d = rand_deltas(6)
    got = to_host(M.ties(xp.asarray(d.astype(np.float32)), xp.ones(3), density=0.2))
    assert got.dtype == np.float32
    sparse = np.stack([ref_magnitude(x, 0.2) for x in d.astype(np.float32).astype(np.float64)])
    ref = ref_gta(sparse, [1, 1, 1], consensus=True, normalize=True, lam=1.0)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-8)


def test_ties_one_model_density_one_equals_task_arithmetic(xp):
    d = xp.asarray(rand_deltas(7, k=1))
    w = xp.asarray([0.8])
    a = to_host(M.ties(d, w, density=1.0, normalize=False, lambda_=0.9))
    b = to_host(M.task_arithmetic(d, w, lambda_=0.9))
    np.testing.assert_allclose(a, b, rtol=1e-15, atol=0)


def test_ties_sign_consistency(xp):
    d = rand_deltas(8, k=4)
    w = [1.0, 0.5, 2.0, 1.0]
    out = to_host(M.ties(xp.asarray(d), xp.asarray(w), density=0.4))
    sparse = np.stack([ref_magnitude(x, 0.4) for x in d]) * np.asarray(w)[:, None, None]
    elected = np.where(sparse.sum(0) >= 0, 1.0, -1.0)
    nz = out != 0
    assert nz.any()
    assert np.all(np.sign(out[nz]) == elected[nz])


# --------------------------------------------------------------------------- DARE


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("rescale", ["l1", "density", "none"])
@pytest.mark.parametrize("normalize", [False, True])
def test_dare_matches_reference_with_the_host_mask(xp, method, rescale, normalize):
    d = rand_deltas(9)
    w = [0.6, 1.1, 0.9]
    fn = getattr(M, method)
    got = to_host(fn(xp.asarray(d), xp.asarray(w), rng=rngs(3, "t", 3), density=0.3,
                     rescale=rescale, lambda_=1.2, normalize=normalize))  # fmt: skip
    sparse = []
    for i, x in enumerate(d):
        keep = host_rng(3, "t", i).random(x.shape, dtype=np.float32) < np.float32(0.3)
        sparse.append(ref_dare_sparse(x, keep, rescale, 0.3))
    ref = ref_gta(np.stack(sparse), w, consensus=method == "dare_ties", normalize=normalize,
                  lam=1.2)  # fmt: skip
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)


def test_dare_same_seed_same_bytes_and_density_one_identity(xp):
    d = xp.asarray(rand_deltas(10).astype(np.float32))
    w = xp.ones(3)
    a = to_host(M.dare_ties(d, w, rng=rngs(1, "x", 3), density=0.5))
    b = to_host(M.dare_ties(d, w, rng=rngs(1, "x", 3), density=0.5))
    c = to_host(M.dare_ties(d, w, rng=rngs(2, "x", 3), density=0.5))
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()
    one = to_host(M.dare_linear(d, w, rng=rngs(1, "x", 3), density=1.0))
    np.testing.assert_array_equal(one, to_host(M.task_arithmetic(d, w)))


@pytest.mark.parametrize("rescale", ["density", "l1"])
def test_dare_mean_over_seeds_is_the_task_vector(xp, rescale):
    tau = rand_deltas(11, k=1, shape=(20, 30))
    d = xp.asarray(tau)
    outs = [to_host(M.dare_linear(d, xp.ones(1), rng=rngs(s, "m", 1), density=0.25,
                                  rescale=rescale)) for s in range(400)]  # fmt: skip
    mean = np.mean(outs, axis=0)
    # Each entry's estimator has sd |τ|·sqrt((1-p)/p)/sqrt(400) ≈ 0.087|τ|; allow 5 sd.
    assert np.all(np.abs(mean - tau[0]) <= 5 * 0.087 * np.abs(tau[0]) + 1e-12)
    if rescale == "l1":
        np.testing.assert_allclose(np.abs(outs[0]).sum(), np.abs(tau).sum(), rtol=1e-12)


# --------------------------------------------------------------------------- PCB


@pytest.mark.parametrize("case", range(12))
def test_pcb_matches_official_formulas(xp, case):
    rng = np.random.default_rng(100 + case)
    n = int(rng.integers(1, 6))
    d = int(rng.integers(10, 3000))
    ratio = [0.05, 0.1, 0.2, 0.5, 1.0, 0.33][case % 6]
    q = [1e-4, 1e-2, 0.0][case % 3]
    t = rng.standard_normal((n, d)) * rng.uniform(0.001, 0.1, size=(n, 1))
    lam = rng.uniform(0.8, 1.3, size=n)
    got = to_host(M.pcb(xp.asarray(t), xp.asarray(lam), density=ratio, clip=q, scope="tensor"))
    ref, _ = ref_pcb(t, ratio, q, lam)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-17)


def test_pcb_scale_properties(xp):
    rng = np.random.default_rng(12)
    t = rng.standard_normal((4, 2000)) * 0.01
    for ratio in (0.05, 0.1, 0.5):
        stats = M._local_stats(xp.asarray(t), ratio, 1e-4)
        scale = to_host(M.pcb_scale(xp.asarray(t), stats))
        _, ref_scale = ref_pcb(t, ratio, 1e-4)
        np.testing.assert_allclose(scale, ref_scale, rtol=1e-12, atol=1e-15)
        assert np.all((scale > 0).sum(1) <= int(2000 * ratio))
        np.testing.assert_array_equal(scale.max(1), 1.0)


def test_pcb_one_model_ratio_one_changes_one_entry(xp):
    tau = np.random.default_rng(13).standard_normal((1, 500)) * 0.01
    out = to_host(M.pcb(xp.asarray(tau), xp.ones(1), density=1.0, clip=0.0))
    diff = np.flatnonzero(~np.isclose(out, tau[0], rtol=1e-13, atol=0))
    assert diff.size == 1 and out[diff[0]] == 0
    bal = np.exp((np.abs(tau) - np.abs(tau).min()) ** 2 / np.ptp(np.abs(tau)) ** 2)
    bal *= np.tanh(tau * tau)
    assert diff[0] == np.argmin(bal[0])


def test_pcb_linear_in_lambda_and_order_invariant(xp):
    t = rand_deltas(14, k=3)
    a = to_host(M.pcb(xp.asarray(t), xp.ones(3), lambda_=1.0))
    b = to_host(M.pcb(xp.asarray(t), xp.ones(3), lambda_=2.5))
    np.testing.assert_allclose(b, 2.5 * a, rtol=1e-13, atol=1e-18)
    c = to_host(M.pcb(xp.asarray(t[[2, 0, 1]]), xp.ones(3), lambda_=1.0))
    np.testing.assert_allclose(c, a, rtol=1e-12, atol=1e-18)


def test_pcb_degenerate_inputs_give_no_nan(xp):
    tau = rand_deltas(15, k=1)[0]
    # τ and −τ: Σ τ = 0, every balance score is tanh(0) = 0 (the official code returns NaN).
    out = to_host(M.pcb(xp.asarray(np.stack([tau, -tau])), xp.ones(2)))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, 0.0, atol=1e-18)
    # A constant |τ| row (0/0 in the official minmax) and an all-zero task vector.
    const = np.where(tau >= 0, 0.01, -0.01)
    for stack in (np.stack([const, tau]), np.stack([np.zeros_like(tau), tau]), const[None]):
        out = to_host(M.pcb(xp.asarray(stack), xp.ones(len(stack))))
        assert np.all(np.isfinite(out))
    # One constant task alone falls back to the plain (clipped) task vector.
    np.testing.assert_allclose(to_host(M.pcb(xp.asarray(const[None]), xp.ones(1))), const)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_pcb_model_scope_over_a_stream_equals_the_concatenated_model(xp, dtype):
    rng = np.random.default_rng(16)
    shapes = [(7, 11), (13,), (5, 3, 4), (40, 9), (1,), (23, 17)]
    tensors = [(rng.standard_normal((3, *s)) * rng.uniform(0.001, 0.05)).astype(dtype)
               for s in shapes]  # fmt: skip
    flat = np.concatenate([x.reshape(3, -1) for x in tensors], axis=1)  # (3, D)
    w = np.array([1.0, 0.8, 1.2])
    whole = to_host(M.pcb(xp.asarray(flat), xp.asarray(w), density=0.1, clip=1e-2))
    stats = M.pcb_reduce(lambda: (xp.asarray(x) for x in tensors), density=0.1, clip=1e-2)
    parts = [to_host(M.pcb(xp.asarray(x), xp.asarray(w), density=0.1, clip=1e-2, stats=stats))
             for x in tensors]  # fmt: skip
    for p, x in zip(parts, tensors):
        assert p.shape == x.shape[1:] and p.dtype == dtype
    streamed = np.concatenate([p.reshape(-1) for p in parts])
    tol = dict(rtol=1e-12, atol=1e-18) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(streamed, whole, **tol)
    if dtype == np.float64:
        ref, _ = ref_pcb(flat.astype(np.float64), 0.1, 1e-2, w)
        np.testing.assert_allclose(streamed, ref, rtol=1e-12, atol=1e-18)
    # Tensor scope differs in general (per-tensor quantiles).
    per_tensor = np.concatenate([to_host(M.pcb(xp.asarray(x), xp.asarray(w), density=0.1,
                                 clip=1e-2, scope="tensor", stats=stats)).reshape(-1)
                                 for x in tensors])  # fmt: skip
    assert not np.allclose(per_tensor, whole)


# --------------------------------------------------------------------------- all kernels

ALL = {
    "task_arithmetic": {},
    "ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "pcb": {"density": 0.2},
}


@pytest.mark.parametrize("name", list(ALL))
def test_identical_inputs_give_the_input(xp, name):
    tau = rand_deltas(17, k=1)[0]
    d = xp.asarray(np.stack([tau, tau, tau]))
    if name == "pcb":  # §12.4 exception: PCB keeps the input only on its top-scored entries
        out = to_host(M.pcb(d, xp.ones(3), density=0.2, clip=0.0))
        kept = out != 0
        assert 0 < kept.sum() <= int(tau.size * 0.2)
        np.testing.assert_allclose(out[kept], tau[kept], rtol=1e-14)
        return
    params = {k: 1.0 for k in ALL[name]}  # density 1
    out = to_host(getattr(M, name)(d, xp.ones(3), rng=rngs(0, "i", 3), normalize=True, **params))
    np.testing.assert_allclose(out, tau, rtol=1e-14)


@pytest.mark.parametrize("name", list(ALL))
def test_linear_in_lambda_shape_dtype_and_order(xp, name):
    fn = getattr(M, name)
    d = rand_deltas(18, k=3).astype(np.float32)
    w = np.array([0.7, 1.0, 1.4], dtype=np.float32)
    kw = ALL[name]
    a = to_host(fn(xp.asarray(d), xp.asarray(w), rng=rngs(5, "o", 3), lambda_=1.0, **kw))
    b = to_host(fn(xp.asarray(d), xp.asarray(w), rng=rngs(5, "o", 3), lambda_=0.0, **kw))
    c = to_host(fn(xp.asarray(d), xp.asarray(w), rng=rngs(5, "o", 3), lambda_=3.0, **kw))
    assert a.shape == d.shape[1:] and a.dtype == np.float32 and np.all(np.isfinite(a))
    np.testing.assert_array_equal(b, 0.0)
    np.testing.assert_allclose(c, 3 * a, rtol=1e-6, atol=1e-12)
    # Order invariance: permute models, their weights and their generators together.
    p = [2, 0, 1]
    r = rngs(5, "o", 3)
    e = to_host(fn(xp.asarray(d[p]), xp.asarray(w[p]), rng=[r[i] for i in p], lambda_=1.0, **kw))
    np.testing.assert_allclose(e, a, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    ("name", "kw", "msg"),
    [
        ("ties", {"density": 1.5}, r"density must be in \(0, 1\], got 1.5"),
        ("ties", {"density": 0.0}, r"density must be in \(0, 1\], got 0.0"),
        ("dare_ties", {"rescale": "l2"}, "rescale must be one of l1, density, none, got 'l2'"),
        ("dare_linear", {"density": -1.0}, r"density must be in \(0, 1\], got -1.0"),
        ("pcb", {"clip": 0.7}, r"clip must be in \[0, 0.5\), got 0.7"),
        ("pcb", {"scope": "layer"}, "scope must be one of model, tensor, got 'layer'"),
        ("task_arithmetic", {"lambda_": float("inf")}, "lambda must be finite, got inf"),
        ("pcb", {"lambda_": float("nan")}, "lambda must be finite, got nan"),
    ],
)
def test_bad_parameters_name_the_parameter(name, kw, msg):
    d = rand_deltas(19).astype(np.float32)
    with pytest.raises(OpError, match=msg):
        getattr(M, name)(d, np.ones(3), rng=rngs(0, "b", 3), **kw)


def test_bad_shapes_and_rngs():
    d = rand_deltas(20).astype(np.float32)
    with pytest.raises(OpError, match="got 2 weights for 3 models"):
        M.ties(d, np.ones(2))
    with pytest.raises(OpError, match="one generator per model: got 1 for 3 models"):
        M.dare_linear(d, np.ones(3), rng=rngs(0, "b", 1))


def test_pcb_blocking_does_not_change_the_result(xp, monkeypatch):
    t = rand_deltas(21, k=3, shape=(40, 33))
    stats = M.pcb_reduce(lambda: iter([xp.asarray(t)]), density=0.1, clip=1e-2)
    a = to_host(M.pcb(xp.asarray(t), xp.ones(3), density=0.1, clip=1e-2))
    b = to_host(M.pcb(xp.asarray(t), xp.ones(3), density=0.1, clip=1e-2, stats=stats))
    monkeypatch.setattr(M, "_BLOCK", 7)  # many column blocks, a ragged last one
    c = to_host(M.pcb(xp.asarray(t), xp.ones(3), density=0.1, clip=1e-2))
    stats7 = M.pcb_reduce(lambda: iter([xp.asarray(t)]), density=0.1, clip=1e-2)
    for f in ("lo", "hi", "thr", "top"):
        np.testing.assert_array_equal(getattr(stats7, f), getattr(stats, f))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
