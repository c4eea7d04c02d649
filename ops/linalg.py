"""Linear algebra shared by every decomposition: sign-canonical SVD and top-k SVD.

All functions are pure xp code (numpy or cupy) and take ``(out, in)`` matrices.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import Array, OpError, array_namespace, solver_checked

__all__ = [
    "svd", "svd_topk", "randomized_svd", "canonicalize_signs", "use_randomized", "gram_svd",
    "gram_ok", "gram_limit", "singular_values",
]  # fmt: skip


def canonicalize_signs(u: Array, vh: Array) -> tuple[Array, Array]:
    """Flip singular-vector pairs so the largest-|.| entry of each column of ``u`` is positive.

    Makes factors comparable across LAPACK and cuSOLVER; ``u @ diag(s) @ vh`` is unchanged.

    Args:
        u: ``(m, k)`` left singular vectors.
        vh: ``(k, n)`` right singular vectors.
    """
    xp = array_namespace(u, vh)
    if u.shape[1] == 0:
        return u, vh
    idx = xp.argmax(xp.abs(u), axis=0)  # (k,)
    signs = xp.sign(u[idx, xp.arange(u.shape[1])])
    signs = xp.where(signs == 0, 1, signs).astype(u.dtype)
    return u * signs[None, :], vh * signs[:, None]


def svd(w: Array) -> tuple[Array, Array, Array]:
    """Thin SVD ``w = u @ diag(s) @ vh`` with canonical signs (divide and conquer, gesdd).

    Args:
        w: ``(m, n)`` float32/float64 matrix.

    Returns:
        ``u (m, k)``, ``s (k,)`` descending, ``vh (k, n)`` with ``k = min(m, n)``.

    Reference: Golub & Van Loan, Matrix Computations, §8.6.
    """
    xp = array_namespace(w)
    if w.ndim != 2:
        raise OpError(f"svd expects a 2-D matrix, got shape {tuple(w.shape)}")
    if xp is not np:  # GPU: the gated fp64 Gram route or cuSOLVER gesvd (ops/cuda.py)
        from .cuda import svd as gpu_svd

        return gpu_svd(w)
    try:
        u, s, vh = xp.linalg.svd(w, full_matrices=False)
    except np.linalg.LinAlgError:
        # gesdd occasionally fails to converge; gesvd (scipy) is slower but robust.
        import scipy.linalg

        u, s, vh = scipy.linalg.svd(w, full_matrices=False, lapack_driver="gesvd")
    u, vh = canonicalize_signs(u, vh)
    return u, s, vh


# Unit roundoff-ish machine epsilons of the working precisions.
_EPS = {np.dtype(np.float32): float(np.finfo(np.float32).eps), np.dtype(np.float64): 2.2e-16}
# The fp32 Gram route's tolerance, from the measured table in PERFORMANCE.md §2.3: at κ = 64 the
# smallest σ came out to 3e-6, at κ = 2.6e5 every one was lost; tol 1e-3 accepts κ ≤ ~92.
_TOL_FP32_GRAM = 1e-3


def gram_limit(gram_dtype: Any = np.float64, target_dtype: Any = np.float32) -> float:
    """The largest ``κ_i = σ_1/σ_i`` for which the Gram route is as good as a direct SVD.

    ``eigh(AᵀA)`` in precision ε_g perturbs every eigenvalue by ≈ε_g·σ_1², i.e. σ_i by a relative
    ε_g·κ_i²/2 (and singular vectors likewise through ``λ`` gaps). A direct SVD in the target
    precision ε_t errs by ≈ε_t·κ_i. Requiring ``ε_g·κ² ≤ tol`` gives ``κ ≤ √(tol/ε_g)`` with
    ``tol = ε_t`` for an fp64 Gram feeding fp32 results (κ ≤ 2.3e4: no worse than fp32 ``gesvd``)
    and ``tol = 1e-3`` for an fp32 Gram (κ ≤ 92: the spec's table, κ = 64 fine, 2.6e5 lost).

    Args:
        gram_dtype: precision the Gram matrix and ``eigh`` run in.
        target_dtype: precision of the result (the input's dtype).
    """
    eg = _EPS[np.dtype(gram_dtype)]
    et = _EPS[np.dtype(target_dtype)]
    tol = _TOL_FP32_GRAM if eg >= et else et
    return float(np.sqrt(tol / eg))


def gram_ok(lam: Array, k: int, limit: float) -> bool:
    """Accept the Gram route when the ``k``-th largest eigenvalue keeps ``κ_k ≤ limit``.

    ``lam`` are the computed eigenvalues of ``AᵀA`` (descending); ``κ_k = √(λ_1/λ_k)``. The
    computed ``λ_k`` carries an absolute error ≈ε·λ_1, far below ``λ_1/limit²`` whenever the test
    passes, so deciding on computed values is safe. An all-zero matrix passes (nothing to lose).
    """
    l1 = float(lam[0])
    if l1 <= 0:
        return l1 == 0 and k >= 1
    lk = float(lam[k - 1])
    return lk > 0 and l1 / lk <= limit * limit


def _short_gram(w: Array, dtype: Any) -> tuple[Array, Array, bool]:
    """``(A, AᵀA, transposed)`` with ``A = w`` (or ``wᵀ`` when wide) in ``dtype``: ``A (M, N)``,
    ``M ≥ N``, so the Gram matrix is ``(N, N)`` over the short side."""
    transpose = w.shape[0] < w.shape[1]
    a = (w.T if transpose else w).astype(dtype)
    return a, a.T @ a, transpose


def gram_svd(
    w: Array, k: int | None = None, *, gram_dtype: Any = None, check: bool = True
) -> tuple[Array, Array, Array] | None:
    """Top-``k`` SVD through ``eigh`` of the short-side Gram matrix, or ``None`` when unsafe.

    ``A = w (m ≥ n, else wᵀ)``: ``G = AᵀA (n, n)`` in ``gram_dtype`` (float64 by default),
    ``G = V Λ Vᵀ``, ``σ = √λ`` descending, ``U = A V / σ (m, k)``. Returns ``None`` (the caller
    falls back to a direct SVD) unless :func:`gram_ok` accepts ``κ_k`` against
    :func:`gram_limit`. Pure xp: runs on numpy and cupy (GEMM + ``syevd`` on the GPU). On the
    CPU only the top ``k`` eigenpairs are computed (LAPACK ``syevr``): for the exact top-k this is
    4-5× faster than ``gesdd`` (1376×512, k = 16: 0.04 s vs 0.17 s; 4096², k = 128: 5.4 s vs
    25.9 s, 2 cores).

    Args:
        w: ``(m, n)`` float32/float64 matrix.
        k: components wanted (``None``: all ``min(m, n)``).
        gram_dtype: precision of ``G`` and ``eigh`` (default float64).
        check: apply the conditioning test (``False`` only for benchmarks and tests).

    Returns:
        ``u (m, k)``, ``s (k,)``, ``vh (k, n)`` in ``w``'s dtype with canonical signs, or ``None``.

    Reference: PERFORMANCE.md §2.3 (measured accuracy of the Gram route).
    """
    xp = array_namespace(w)
    if w.ndim != 2:
        raise OpError(f"gram_svd expects a 2-D matrix, got shape {tuple(w.shape)}")
    m, n = (int(d) for d in w.shape)
    kk = min(m, n) if k is None else int(k)
    if not 0 < kk <= min(m, n):
        raise OpError(f"rank must be in [1, {min(m, n)}], got {k}")
    gdt = np.dtype(np.float64 if gram_dtype is None else gram_dtype)
    a, g, transpose = _short_gram(w, gdt)  # (M, N) with M ≥ N; (N, N) symmetric PSD
    big_n = int(g.shape[0])
    if xp is np and kk < big_n and big_n >= 512:
        # Top-k only (syevr) pays from a few hundred columns on; below, numpy's full eigh is as
        # fast and spares the ~0.25 s scipy.linalg import.
        import scipy.linalg

        lam, v = scipy.linalg.eigh(g, subset_by_index=[big_n - kk, big_n - 1], driver="evr")
    else:
        with solver_checked(xp):
            lam, v = xp.linalg.eigh(g)  # ascending
    lam, v = lam[::-1][:kk], v[:, ::-1][:, :kk]  # (k,), (N, k) descending
    if check and not gram_ok(lam, kk, gram_limit(gdt, w.dtype)):
        return None
    s = xp.sqrt(xp.maximum(lam, 0))  # (k,)
    safe = xp.where(s > 0, s, 1)
    u = (a @ v) / safe[None, :]  # (M, k): columns A v_i / σ_i
    u, s, vh = u.astype(w.dtype), s.astype(w.dtype), v.T.astype(w.dtype)
    if transpose:
        u, vh = vh.T, u.T
    u, vh = canonicalize_signs(xp.ascontiguousarray(u), xp.ascontiguousarray(vh))
    return u, s, vh


def singular_values(w: Array) -> Array:
    """All singular values of ``w`` ``(m, n)`` as float64, descending, from the fp64 Gram.

    ``σ_i = √λ_i(AᵀA)`` over the short side, by ``eigvalsh`` (no vectors): each ``σ_i²`` is off by
    at most ≈ε₆₄·σ₁², so every ``σ_i ≥ 1e-7·σ₁`` is exact to fp32 precision and smaller ones are
    below ``1e-7·σ₁``: right for energies, ranks and budgets (their ``σ²`` shares are < 1e-14),
    and 5-9× faster than ``gesdd``'s values (2048×768: 0.05 s vs 0.43 s with vectors, 2 cores).

    Returns:
        ``s (min(m, n),)`` float64 on ``w``'s device.

    Reference: Golub & Van Loan, Matrix Computations, §8.6 (SVD via the symmetric eigenproblem).
    """
    xp = array_namespace(w)
    if w.ndim != 2:
        raise OpError(f"singular_values expects a 2-D matrix, got shape {tuple(w.shape)}")
    _, g, _ = _short_gram(w, xp.float64)
    with solver_checked(xp):
        lam = xp.linalg.eigvalsh(g)[::-1]  # descending
    return xp.sqrt(xp.maximum(lam, 0))


def use_randomized(shape: tuple[int, int], k: int) -> bool:
    """The default rule for :func:`svd_topk`: randomized when ``k`` is small against the matrix.

    Randomized SVD is used when ``k + oversampling ≤ min(m, n) / 4`` and the short side is at
    least 256; otherwise the exact SVD is cheaper or the sketch would not save work.
    """
    short = min(shape)
    return short >= 256 and (k + 10) * 4 <= short


def _normalize(y: Array) -> Array:
    """Return a well-conditioned basis of ``range(y)`` for a power step (``(M, ell)``).

    On numpy, CholeskyQR with a float64 Gram matrix: two BLAS-3 products instead of a Householder
    QR, which dominated small-matrix runs (numpy's QR is ~1.4 ms for 2048×42). Used only when
    ``cond(y) ≤ 1e6`` (diagonal of the Cholesky factor), where the float64 Gram loses nothing
    that matters for a range finder; otherwise, and on cupy, the Householder QR.
    """
    xp = array_namespace(y)
    if xp is np:
        y64 = y.astype(np.float64)
        try:
            lo = np.linalg.cholesky(y64.T @ y64)  # (ell, ell), y = Q Lᵀ
        except np.linalg.LinAlgError:
            lo = None
        if lo is not None:
            d = np.diag(lo)
            if d.min() > 1e-6 * d.max():
                return y @ np.linalg.inv(lo).T.astype(y.dtype)  # Q = y L⁻ᵀ
    return xp.linalg.qr(y)[0]


def randomized_svd(
    w: Array,
    k: int,
    *,
    niter: int = 4,
    oversample: int = 10,
    rng: np.random.Generator | None = None,
) -> tuple[Array, Array, Array]:
    """Top-``k`` SVD by randomized range finding with power iterations (Halko et al., 2011).

    ``Y = (W Wᵀ)^q W Ω``, ``Q = qr(Y)``, then the exact SVD of the small ``Qᵀ W``. The test matrix
    ``Ω (n, k + oversample)`` is drawn on the host so that CPU and GPU give the same sketch.
    Each power step is re-normalised (CholeskyQR on numpy when well conditioned, else QR) to keep
    fp32 accurate; the final sketch gets an exact Householder QR.

    Args:
        w: ``(m, n)`` matrix.
        k: number of components.
        niter: power iterations (4 reaches ~1e-3 relative error on decaying spectra).
        oversample: extra sketch columns.
        rng: host generator (defaults to seed 0).

    Returns:
        ``u (m, k)``, ``s (k,)``, ``vh (k, n)``, canonical signs.

    Reference: https://arxiv.org/abs/0909.4061
    """
    xp = array_namespace(w)
    m, n = w.shape
    if not 0 < k <= min(m, n):
        raise OpError(f"rank must be in [1, {min(m, n)}], got {k}")
    rng = rng if rng is not None else np.random.default_rng(0)
    ell = min(k + oversample, min(m, n))
    # Work on the wide orientation so the sketch is the smaller side.
    transpose = m < n
    a = w.T if transpose else w  # (M, N) with M >= N
    omega = xp.asarray(rng.standard_normal((a.shape[1], ell)), dtype=w.dtype)  # host draw
    y = a @ omega  # (M, ell)
    for _ in range(niter):
        y = a @ _normalize(a.T @ _normalize(y))  # (M, ell)
    q, _ = xp.linalg.qr(y)  # (M, ell): the one exact orthonormalisation
    b = q.T @ a  # (ell, N)
    ub, s, vh = xp.linalg.svd(b, full_matrices=False)
    u = q @ ub  # (M, ell)
    u, s, vh = u[:, :k], s[:k], vh[:k]
    if transpose:
        u, vh = vh.T, u.T
    u, vh = canonicalize_signs(xp.ascontiguousarray(u), xp.ascontiguousarray(vh))
    return u, s, vh


def svd_topk(
    w: Array,
    k: int,
    *,
    niter: int | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[Array, Array, Array]:
    """Top-``k`` singular triplets of ``w``: exact or randomized.

    ``niter=None`` applies :func:`use_randomized` (randomized with ``niter=4`` when ``k`` is small
    against the matrix, exact otherwise); ``niter=0`` forces the exact SVD; ``niter > 0`` forces the
    randomized SVD with that many power iterations. The exact top-k of ``k ≤ min(m, n)/2``
    components goes through :func:`gram_svd` (fp64 Gram, top-k ``eigh``) whenever ``κ_k`` allows
    it (:func:`gram_ok`), as accurate as a direct fp32 SVD and 4-5× faster on the CPU; otherwise
    the full SVD is sliced.

    Args:
        w: ``(m, n)`` matrix.
        k: number of components, ``1 ≤ k ≤ min(m, n)``.

    Returns:
        ``u (m, k)``, ``s (k,)``, ``vh (k, n)``.

    Reference: https://arxiv.org/abs/0909.4061
    """
    if not 0 < k <= min(w.shape):
        raise OpError(f"rank must be in [1, {min(w.shape)}], got {k}")
    if niter is None:
        niter = 4 if use_randomized(tuple(w.shape), k) else 0
    if niter == 0:
        if array_namespace(w) is not np:  # GPU: only κ of the top k matters (ops/cuda.py)
            from .cuda import svd_topk_exact

            return svd_topk_exact(w, k)
        if 2 * k <= min(w.shape):  # the top of the spectrum only: the Gram route when safe
            res = gram_svd(w, k)
            if res is not None:
                return res
        u, s, vh = svd(w)
        return u[:, :k], s[:k], vh[:k]
    return randomized_svd(w, k, niter=niter, rng=rng)
