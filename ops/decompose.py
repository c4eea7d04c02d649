"""SVD decompositions of one weight into a frozen residual plus a PEFT low-rank adapter.

Every kernel here follows the ``decompose`` contract (DESIGN.md, "Kind contracts")::

    fn(w (out, in), *, rank, rng, [cov (in, in)], **params) -> (residual | None, LowRank)

with ``residual + lowrank.delta() == w`` for the function-preserving inits (PiSSA, CorDA), a
truncated base for KaSA, and ``residual = None`` for LoRA extraction (``w`` is then the task
vector ``W_tuned - W_base``). ``scale`` is the adapter scale the caller writes
(``lora_alpha / r``); the factors are divided by it so that ``scale · B @ A`` is exactly the
selected components (PEFT's convention).

Also here: :func:`report` (per-module figures for the manifest) and the global rank-budget
allocators :func:`allocate_ranks` and :func:`ranks_for_energy` (ALGORITHMS.md §6.4).

Memory: a kernel holds ``w`` plus a few matrices of its size (SVD factors, residual) for one
module at a time; CorDA adds two ``in × in`` float64 arrays (the damped covariance and its
Cholesky factor).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from .backend import Array, OpError, array_namespace, scipy_namespace, to_host
from .linalg import svd, svd_topk
from .lowrank import LowRank, rank_for_energy, split_factors

__all__ = [
    "svd_extract",
    "pissa",
    "corda",
    "kasa",
    "report",
    "allocate_ranks",
    "ranks_for_energy",
]


def _check_common(w: Array, rank: int, scale: float) -> tuple[int, int]:
    """Validate the matrix, the rank and the scale shared by every kernel; return ``(out, in)``."""
    if w.ndim != 2:
        raise OpError(f"expected a 2-D (out, in) matrix, got shape {tuple(w.shape)}")
    out_f, in_f = (int(d) for d in w.shape)
    k = min(out_f, in_f)
    if not isinstance(rank, (int, np.integer)) or not 1 <= int(rank) <= k:
        raise OpError(
            f"rank must be in [1, {k}] (min(out, in) of shape {(out_f, in_f)}), got {rank}"
        )
    if not (math.isfinite(scale) and scale > 0):
        raise OpError(f"scale must be a finite number > 0, got {scale}")
    return out_f, in_f


def _niter_arg(niter: int) -> int | None:
    """Map the user's ``niter`` (-1 rule, 0 exact, N > 0 randomized) to ``svd_topk``'s."""
    if not isinstance(niter, (int, np.integer)) or niter < -1:
        raise OpError(
            f"niter must be -1 (automatic), 0 (exact SVD) or a positive integer, got {niter}"
        )
    return None if niter == -1 else int(niter)


def svd_extract(
    w: Array,
    *,
    rank: int,
    rng: np.random.Generator | None = None,
    niter: int = -1,
    scale: float = 1.0,
) -> tuple[None, LowRank]:
    """Extract the best rank-r LoRA of a task vector: ``Δ (out, in) ≈ scale · B @ A``.

    ``U, S, Vh = svd_r(Δ)``; ``A = √(S/scale)·Vh (r, in)``, ``B = U·√(S/scale) (out, r)``
    (mergekit's ``distribute_scale``). By Eckart–Young, with the exact SVD,
    ``‖Δ − sBA‖_F = √(Σ_{i>r} σ_i²)`` and ``‖Δ − sBA‖_2 = σ_{r+1}``; the result is exact when
    ``rank(Δ) ≤ r`` (the randomized range finder then captures the whole range).

    ``niter=-1`` follows :func:`ops.linalg.use_randomized`: randomized SVD (oversampling p = 10,
    q = 4 re-orthonormalised power iterations) when ``(r + 10)·4 ≤ min(out, in)`` and
    ``min(out, in) ≥ 256``, exact otherwise. Halko et al. (2011, §10) bound the expected spectral
    error by ``(1 + 4√(r+p)/(p−1)·√min(out, in))^{1/(2q+1)} · σ_{r+1}`` (≤ 1.7·σ_{r+1} at 4096²).
    Measured (tests/test_ops_decompose.py): the Frobenius error is within 1 % of the optimum even
    on flat (Gaussian) spectra.

    Args:
        w: ``(out, in)`` task vector ``W_tuned − W_base`` (float32 or float64).
        rank: adapter rank ``r``, ``1 ≤ r ≤ min(out, in)``.
        rng: host generator for the randomized sketch.
        niter: -1 automatic, 0 exact SVD, N > 0 randomized with N power iterations.
        scale: the adapter scale ``lora_alpha / r`` the caller writes.

    Returns:
        ``(None, LowRank)``.

    Reference: https://arxiv.org/abs/0909.4061 (randomized SVD); mergekit ``extract_lora.py``.
    """
    _check_common(w, rank, scale)
    u, s, vh = svd_topk(w, int(rank), niter=_niter_arg(niter), rng=rng)  # (out, r), (r,), (r, in)
    return None, split_factors(u, s, vh, scale)


def pissa(
    w: Array,
    *,
    rank: int,
    rng: np.random.Generator | None = None,
    niter: int = -1,
    scale: float = 1.0,
) -> tuple[Array, LowRank]:
    """Split a weight into its principal rank-r adapter and the residual (PiSSA initialisation).

    ``U, S, Vh = svd_r(W)``; ``A = √(S/scale)·Vh (r, in)``, ``B = U·√(S/scale) (out, r)``;
    ``W_res = W − scale·B@A (out, in)``, so ``W_res + scale·B@A == W`` up to rounding, whatever
    the SVD.

    ``niter=-1`` applies the rule of :func:`ops.linalg.use_randomized`: randomized with
    oversampling 10 and 4 power iterations when ``(r + 10)·4 ≤ min(out, in)`` and
    ``min(out, in) ≥ 256``, exact otherwise. Measured (tests/test_ops_decompose.py::
    test_pissa_rule_error, 512×384, r = 16): the residual norm ``‖W − sBA‖_F`` is 1.0029× the exact
    top-r optimum on a Gaussian matrix (a flat Marchenko–Pastur top, the hard case) and 1.00024× on
    σ_i ∝ i^-0.5, against 1.0055× and 1.0034× for PEFT's ``pissa_niter_4`` (``torch.svd_lowrank``
    with q = r, no oversampling). The split is exact either way; only which directions go to the
    adapter differs. ``niter=0`` forces the exact SVD (PEFT's ``init_lora_weights="pissa"``).

    Args:
        w: ``(out, in)`` weight.
        rank: adapter rank r.
        rng: host generator for the randomized sketch.
        niter: -1 automatic, 0 exact SVD, N > 0 randomized with N power iterations.
        scale: the adapter scale ``lora_alpha / r``.

    Returns:
        ``(residual (out, in), LowRank)``.

    Reference: https://arxiv.org/abs/2404.02948
    """
    _check_common(w, rank, scale)
    u, s, vh = svd_topk(w, int(rank), niter=_niter_arg(niter), rng=rng)
    lr = split_factors(u, s, vh, scale)
    # Subtract exactly what PEFT will add back (scale·B@A), not U S Vh, so the split is exact in fp.
    return w - lr.delta(), lr


def _cholesky(c: Array) -> Array | None:
    """Lower Cholesky factor of ``c`` or ``None`` when it is not (numerically) positive definite."""
    xp = array_namespace(c)
    try:
        if xp is np:
            lo = xp.linalg.cholesky(c)
        else:  # cupy ignores potrf's devInfo unless asked: ops.cuda.cholesky checks it
            from .cuda import cholesky

            lo = cholesky(c)
    except np.linalg.LinAlgError:
        return None
    except Exception as e:  # cupy raises its own LinAlgError class
        if type(e).__name__ == "LinAlgError":
            return None
        raise
    # cuSOLVER may return NaNs instead of raising.
    return lo if bool(xp.all(xp.isfinite(lo))) else None


def corda(
    w: Array,
    *,
    rank: int,
    rng: np.random.Generator | None = None,
    cov: Array,
    mode: Literal["ipm", "kpm"] = "ipm",
    damping: float = 0.01,
    niter: int = 0,
    scale: float = 1.0,
) -> tuple[Array, LowRank]:
    """Split a weight along its covariance-oriented components (CorDA, IPM or KPM).

    ``C_fix = C + λ·mean(diag C)·I (in, in)``; ``U, S, Vh = svd(W @ C_fix)``;
    ``Ṽᵀ = Vh @ C_fix⁻¹ (k, in)``. IPM keeps the r largest components, KPM the r smallest:
    ``A = √(S_sel/scale)·Ṽᵀ_sel (r, in)``, ``B = U_sel·√(S_sel/scale) (out, r)``,
    ``W_res = W − scale·B@A``.

    Damping follows ALGORITHMS.md §1.2: start at ``λ = damping`` (0.01) and double while
    ``C_fix`` is not positive definite or the solve is inaccurate, ``‖C_fix·X − Vᵀ_sel‖_F ≥ 0.05``
    (PEFT's ``‖C_fix·C_inv − I‖_F < 0.05`` test restricted to the r directions used; the same
    number when ``out ≥ in`` and ``r = in``, since Vh is then orthogonal).

    Deviations from PEFT, on purpose: ``C_fix⁻¹`` is never formed. ``W @ C_fix``, the Cholesky
    factor and the two triangular solves run in float64, the SVD in ``w``'s dtype (IPM's exact
    top-r through :func:`ops.linalg.svd_topk`: an fp64 Gram + top-r ``eigh`` when ``κ_r`` allows,
    4-5× faster than ``gesdd``), so the result is at least as accurate as PEFT's fp32 ``inv``.
    Because the check runs on an fp64 solve, λ stays at 0.01 where PEFT's fp32 check may double it
    for an ill-conditioned C. C is divided by ``mean(diag C)`` first, so ``A``, ``B`` and ``W_res``
    do not depend on C's overall scale (PEFT's split between A and B does; its ``B@A`` and
    ``W_res`` equal ours).

    Args:
        w: ``(out, in)`` weight.
        rank: adapter rank r.
        rng: host generator (randomized top-r SVD in IPM mode).
        cov: ``(in, in)`` input covariance ``Σ XᵀX`` of this linear layer (any positive scale).
        mode: ``ipm`` (instruction-previewed: the r largest components) or ``kpm``
            (knowledge-preserved: the r smallest; needs the full SVD).
        damping: initial relative damping λ.
        niter: IPM only: 0 exact (the default: ``W·C`` often has a flat top spectrum, where a
            randomized top-r subspace is as good in energy but measurably differs from the
            components PEFT and the official code pick — ~1e-1 relative on a 4M-parameter Llama),
            -1 automatic, N > 0 randomized top-r SVD with N power iterations.
        scale: the adapter scale ``lora_alpha / r``.

    Returns:
        ``(residual (out, in), LowRank)``.

    Raises:
        OpError: a bad mode, damping or niter; a covariance of the wrong shape, non-finite or zero.

    Reference: https://arxiv.org/abs/2406.05223
    """
    out_f, in_f = _check_common(w, rank, scale)
    r = int(rank)
    xp = array_namespace(w, cov)
    sp = scipy_namespace(w)
    if mode not in ("ipm", "kpm"):
        raise OpError(f"mode must be one of ipm, kpm, got {mode!r}")
    if not (math.isfinite(damping) and damping > 0):
        raise OpError(f"damping must be a finite number > 0, got {damping}")
    nit = _niter_arg(niter)
    if mode == "kpm" and nit not in (None, 0):
        raise OpError(f"niter applies only to mode=ipm (kpm needs the full SVD), got niter={niter}")
    if tuple(cov.shape) != (in_f, in_f):
        raise OpError(
            f"cov must have shape (in, in) = {(in_f, in_f)} for a weight of shape {(out_f, in_f)}, "
            f"got {tuple(cov.shape)}"
        )
    c = cov.astype(xp.float64)
    if not bool(xp.all(xp.isfinite(c))):
        raise OpError("cov contains NaN or Inf")
    c = (c + c.T) * 0.5  # (in, in); accumulations in fp32 are symmetric only up to rounding
    mean_diag = float(xp.trace(c)) / in_f
    if not mean_diag > 0:
        raise OpError(
            f"cov has mean diagonal {mean_diag}; it must be positive (is the layer ever used?)"
        )
    c /= mean_diag  # scale-free: C → c·C changes nothing below
    w64 = w.astype(xp.float64)
    eye = xp.eye(in_f, dtype=xp.float64)
    lam = float(damping)
    for _ in range(64):  # λ doubles each time: 64 steps cover any finite C
        c_fix = c + lam * eye  # (in, in); PEFT's C_fix divided by mean(diag C)
        lo = _cholesky(c_fix)
        if lo is None:
            lam *= 2
            continue
        m = (w64 @ c_fix).astype(w.dtype)  # (out, in)
        if mode == "ipm":
            u, s, vh = svd_topk(m, r, niter=nit, rng=rng)  # (out, r), (r,), (r, in)
        else:
            u, s, vh = svd(m)  # full spectrum: KPM takes the r smallest
            u, s, vh = u[:, -r:], s[-r:], vh[-r:]
        # Ṽ_selᵀ = Vh_sel @ C_fix⁻¹, i.e. C_fix @ X = Vh_selᵀ (C_fix symmetric): 2 triangular solves
        rhs = vh.astype(xp.float64).T  # (in, r)
        y = sp.linalg.solve_triangular(lo, rhs, lower=True)
        x = sp.linalg.solve_triangular(lo.T, y, lower=False)  # (in, r)
        if float(xp.linalg.norm(c_fix @ x - rhs)) < 0.05:
            break
        lam *= 2
    else:  # pragma: no cover - needs a C that no damping makes positive definite
        raise OpError("could not damp cov into a positive definite matrix")
    vt = x.T.astype(w.dtype)  # (r, in), rows not orthonormal
    lr = split_factors(u, s, vt, scale)
    return w - lr.delta(), lr


def kasa(
    w: Array,
    *,
    rank: int,
    rng: np.random.Generator | None = None,
    truncation: Literal["peft", "official"] = "peft",
    scale: float = 1.0,
) -> tuple[Array, LowRank]:
    """Drop the r smallest singular components; return a zero-delta adapter (KaSA, portable layout).

    ``U, S, Vh = svd(W)`` (full), ``k = min(out, in)``;
    ``W_base = W − U_tail S_tail Vh_tail`` over the r smallest components (PEFT's ``k − r``
    rule), so     ``rank(W_base) = k − r`` and ``‖W − W_base‖_F = √(Σ_{r smallest} σ²)``. Unlike
    PiSSA, the function changes by the dropped tail.

    Layout B of ALGORITHMS.md §2.3 (chosen): the truncated base is the residual and the adapter is a
    plain LoRA with KaSA's init folded in: ``A' = diag(d)·A (r, in)`` with ``A ~ U(−1/√in, 1/√in)``
    (kaiming-uniform, a = √5), ``d ~ N(0, 1)``, and ``B = 0 (out, r)``, so the delta is exactly 0.
    No ``kasa_config`` is written, hence PEFT never truncates a second time on load (truncation is
    idempotent anyway: the base's r smallest σ are already 0). Training is then plain LoRA: KaSA's
    separate ``lora_diag`` and its regularisers are not reproduced.

    Args:
        w: ``(out, in)`` weight.
        rank: number of dropped components, and the adapter rank r.
        rng: host generator for ``A`` and ``d``.
        truncation: ``peft`` keeps ``min(out, in) − r`` components; ``official`` reproduces the
            released KaSA code, which keeps ``in − r`` (nothing is dropped when ``in − r ≥ out``).
        scale: the adapter scale ``lora_alpha / r`` (irrelevant to the zero delta; for PEFT).

    Returns:
        ``(W_base (out, in), LowRank)``.

    Reference: https://arxiv.org/abs/2412.06071
    """
    out_f, in_f = _check_common(w, rank, scale)
    r = int(rank)
    xp = array_namespace(w)
    if truncation not in ("peft", "official"):
        raise OpError(f"truncation must be one of peft, official, got {truncation!r}")
    k = min(out_f, in_f)
    keep = k - r if truncation == "peft" else min(in_f - r, k)
    if keep < k:
        u, s, vh = svd(w)  # full SVD: the tail is what randomized top-k methods get wrong
        tail = (u[:, keep:] * s[None, keep:]) @ vh[keep:]  # (out, in), rank k − keep
        base = w - tail
    else:
        base = w.copy()
    rng = rng if rng is not None else np.random.default_rng(0)
    bound = 1.0 / math.sqrt(in_f)
    a = rng.uniform(-bound, bound, size=(r, in_f))  # (r, in), host draw
    d = rng.standard_normal(r)  # (r,)
    a = xp.asarray(d[:, None] * a, dtype=w.dtype)
    b = xp.zeros((out_f, r), dtype=w.dtype)
    return base, LowRank(A=a, B=b, scale=float(scale))


def _sigma_lowrank(lr: LowRank) -> Array:
    """Singular values of ``scale·B@A`` from two thin QRs, O((out + in)·r²), without the product."""
    xp = array_namespace(lr.A, lr.B)
    _, rb = xp.linalg.qr(lr.B)  # (r, r)
    _, ra = xp.linalg.qr(lr.A.T)  # (r, r)
    return xp.linalg.svd(rb @ ra.T, compute_uv=False) * abs(lr.scale)


def report(
    w: Array,
    residual: Array | None,
    lowrank: LowRank,
    *,
    max_values: int = 32,
    dropped_values: int = 0,
) -> dict[str, float | int | list[float]]:
    """Summarise one decomposition as plain floats for ``surgery.json``.

    With ``Δ = scale·B@A`` and ``E = W − residual − Δ`` (``residual = 0`` for extraction):

    * ``rank``, ``scale``, ``norm`` = ``‖W‖_F``;
    * ``sigma_kept``: singular values of Δ (the components in the adapter), descending, at most
      ``max_values``; exact for any factorisation (QR of A and B);
    * ``energy_adapter`` = ``‖Δ‖²_F / ‖W‖²_F``: the energy captured by the adapter;
    * ``energy_dropped`` = ``‖E‖²_F / ‖W‖²_F``: what the output loses (rounding for PiSSA/CorDA,
      the truncated tail for KaSA, the unexplained part of the task vector for extraction);
    * ``rel_error`` = ``‖E‖_F / ‖W‖_F``, the reconstruction error of ``residual + Δ`` against W;
    * ``max_abs_error`` = ``max |E|``;
    * ``sigma_dropped`` (only with ``dropped_values > 0``): the largest singular values of E (for
      KaSA, exactly the dropped components), by a randomized top-k SVD: one extra pass over E.

    Pass the residual as it will be stored (e.g. cast to bf16 and back) to report the stored error.

    Args:
        w: ``(out, in)`` the original weight (or the task vector, for extraction).
        residual: ``(out, in)`` residual or ``None``.
        lowrank: the adapter.
        max_values: how many singular values to list.
        dropped_values: how many singular values of E to list (0: skip, saving an SVD).

    Returns:
        A JSON-ready dict.
    """
    xp = array_namespace(w, residual, lowrank.A, lowrank.B)
    delta = lowrank.delta()  # (out, in)
    e = w - delta if residual is None else (w - residual) - delta
    norm2 = float(xp.sum(w.astype(xp.float64) ** 2))
    err2 = float(xp.sum(e.astype(xp.float64) ** 2))
    d2 = float(xp.sum(delta.astype(xp.float64) ** 2))
    sig = to_host(_sigma_lowrank(lowrank)).astype(np.float64)
    denom = norm2 if norm2 > 0 else 1.0
    out = {
        "rank": lowrank.rank,
        "scale": float(lowrank.scale),
        "norm": math.sqrt(norm2),
        "sigma_kept": [float(f"{v:.6g}") for v in sig[:max_values]],
        "energy_adapter": d2 / denom,
        "energy_dropped": err2 / denom,
        "rel_error": math.sqrt(err2 / denom),
        "max_abs_error": float(xp.max(xp.abs(e))) if e.size else 0.0,
    }
    k = min(int(dropped_values), *e.shape)
    if k > 0:
        # niter=2 is exact for a rank-≤k E (KaSA's tail) and near-optimal otherwise.
        s_e = svd_topk(e, k, niter=2, rng=np.random.default_rng(0))[1]
        out["sigma_dropped"] = [float(f"{v:.6g}") for v in to_host(s_e).astype(np.float64)]
    return out


def _eligible(spectra: Sequence[Array], normalize: bool) -> list[np.ndarray]:
    """Per-layer gains ``σ²`` (or ``σ²/‖δ‖²_F``) on the host, float64, zero components removed."""
    gains = []
    for i, s in enumerate(spectra):
        s64 = to_host(s).astype(np.float64).ravel()
        if s64.size and (not np.all(np.isfinite(s64)) or np.any(s64 < 0)):
            raise OpError(f"spectrum {i} has negative or non-finite singular values")
        if np.any(np.diff(s64) > 1e-12 * max(float(s64[0]) if s64.size else 0.0, 1.0)):
            raise OpError(f"spectrum {i} is not sorted in descending order")
        g = s64**2
        if normalize and g.sum() > 0:
            g = g / g.sum()
        gains.append(g[s64 > 0])  # a zero component never reduces the error (δ = 0 → rank 0)
    return gains


def allocate_ranks(
    spectra: Sequence[Array],
    budget: int,
    *,
    unit: Literal["rank", "params"] = "rank",
    costs: Sequence[int] | None = None,
    normalize: bool = False,
    min_rank: int = 0,
    max_rank: int | None = None,
) -> list[int]:
    """Share a global budget of ranks or parameters across layers from their singular values.

    ``unit="rank"``: keep the ``budget`` globally largest gains ``σ²_{l,j}``. This is exactly
    optimal for the summed squared Frobenius error ``Σ_l Σ_{j>r_l} σ²_{l,j}`` (the errors add up
    and each layer's gains are sorted). ``unit="params"``: one component of layer l costs
    ``c_l = out_l + in_l`` parameters; take components in order of ``σ²/c_l`` while they fit
    (fractional-knapsack greedy, stopping at the first that does not fit: optimal up to that last
    item, and monotone in the budget). ``normalize`` ranks by ``σ²/‖δ_l‖²_F`` so that every layer's
    relative error counts equally. Ties go to the lower component index, then the lower layer, so
    equal spectra and costs get a uniform allocation.

    Args:
        spectra: one descending singular-value array per layer (the full spectrum, for
            ``normalize``).
        budget: total ranks (``unit="rank"``) or parameters (``unit="params"``).
        unit: ``rank`` or ``params``.
        costs: per-layer cost of one component (``out + in``); required for ``params``.
        normalize: rank by relative instead of absolute energy.
        min_rank: every layer gets at least ``min(min_rank, #nonzero σ)``.
        max_rank: per-layer cap (``None``: no cap).

    Returns:
        Ranks, one per layer: ``Σ r_l ≤ budget`` (rank) or ``Σ r_l·c_l ≤ budget`` (params).

    Raises:
        OpError: a bad unit, costs or bounds, or a budget below what ``min_rank`` needs.

    Reference: ALGORITHMS.md §6.4, a training-free analogue of AdaLoRA
    (https://arxiv.org/abs/2303.10512).
    """
    if unit not in ("rank", "params"):
        raise OpError(f"unit must be one of rank, params, got {unit!r}")
    if budget < 0:
        raise OpError(f"budget must be >= 0, got {budget}")
    if min_rank < 0:
        raise OpError(f"min_rank must be >= 0, got {min_rank}")
    if max_rank is not None and max_rank < max(min_rank, 0):
        raise OpError(f"max_rank must be >= min_rank = {min_rank}, got {max_rank}")
    n = len(spectra)
    if unit == "params":
        if costs is None or len(costs) != n:
            raise OpError(
                f"costs must give one cost (out + in) per layer for unit=params: {n} layers, "
                f"got {costs}"
            )
        cost = np.asarray(costs, dtype=np.int64)
        if np.any(cost <= 0):
            raise OpError(f"costs must be positive, got {list(costs)}")
    else:
        cost = np.ones(n, dtype=np.int64)
    gains = _eligible(spectra, normalize)
    cap = [g.size if max_rank is None else min(g.size, int(max_rank)) for g in gains]
    ranks = [min(int(min_rank), c) for c in cap]
    left = int(budget) - int(sum(r * int(c) for r, c in zip(ranks, cost)))
    if left < 0:
        raise OpError(
            f"budget {budget} is below what min_rank={min_rank} needs ({int(budget) - left} {unit})"
        )
    # Candidate items: layer l, component j ≥ its forced minimum, below its cap.
    layer = np.concatenate(
        [np.full(cap[i] - ranks[i], i, dtype=np.int64) for i in range(n)] or [np.zeros(0, np.int64)]
    )
    comp = np.concatenate(
        [np.arange(ranks[i], cap[i], dtype=np.int64) for i in range(n)] or [np.zeros(0, np.int64)]
    )
    if layer.size == 0:
        return ranks
    score = np.concatenate([gains[i][ranks[i] : cap[i]] for i in range(n)]) / cost[layer]
    order = np.lexsort((layer, comp, -score))  # by score desc, then component, then layer
    for idx in order:
        c = int(cost[layer[idx]])
        if c > left:
            break  # prefix greedy: stopping (not skipping) keeps ranks monotone in the budget
        ranks[int(layer[idx])] += 1
        left -= c
    return ranks


def ranks_for_energy(
    spectra: Sequence[Array],
    energy: float,
    *,
    min_rank: int = 0,
    max_rank: int | None = None,
) -> list[int]:
    """Per layer, the smallest rank whose top components hold ``energy`` of ``‖δ_l‖²_F``.

    ``r_l = min{k : Σ_{j<k} σ²_{l,j} ≥ energy · Σ_j σ²_{l,j}}`` (PEFT's float ``rank``), clipped to
    ``[min_rank, max_rank]`` and to the spectrum length; a zero spectrum gives 0.

    Args:
        spectra: one descending singular-value array per layer.
        energy: fraction in ``(0, 1]``.
        min_rank: lower clip (not applied to all-zero spectra).
        max_rank: upper clip.

    Returns:
        Ranks, one per layer.
    """
    if min_rank < 0:
        raise OpError(f"min_rank must be >= 0, got {min_rank}")
    if max_rank is not None and max_rank < max(min_rank, 1):
        raise OpError(f"max_rank must be >= max(min_rank, 1), got {max_rank}")
    out = []
    for s in spectra:
        k = rank_for_energy(s, energy)
        if k > 0:
            k = max(k, min(int(min_rank), int(s.shape[0])))
            if max_rank is not None:
                k = min(k, int(max_rank))
        out.append(k)
    return out
