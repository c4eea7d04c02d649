"""Compression with low-rank recovery (CPET-style / LoftQ) and PELA's low-rank replacement.

``compress`` is a *decompose*-kind kernel: ``fn(w (out, in), *, rank, rng, **params) →
(residual, LowRank)``.

* ``lowrank='none'`` (default): ``residual = Q(W)`` (dequantized, the new base) and a rank-``r``
  adapter from the SVD of ``W − Q(W)``; by Eckart–Young it is the best rank-``r`` correction for
  that ``Q(W)``. With ``loftq_iter = T > 1`` it alternates ``Q_t = Q(W − B_{t−1} A_{t−1})`` and
  ``(A_t, B_t) = SVD_r(W − Q_t)`` (LoftQ; PEFT's ``loftq_init``).
* ``lowrank='pela'``: PELA replaces ``W`` by two factors ``W2 (out, k) · W1 (k, in)`` with
  ``k = pela_rank(in, out, ratio)``. A checkpoint cannot express the factored layer without an
  architecture change, so it is returned as a *zero residual plus a rank-k adapter that holds the
  whole weight*: ``A = W1``-like, ``B = W2``-like (scaled so ``scale · B @ A`` is the rank-k
  truncation). The model directory then stores zeros for those weights and the adapter carries the
  parameters; merging the adapter gives the dense rank-k preview. ``rank`` and the quantiser
  parameters are ignored in this mode (the rank comes from ``ratio``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from .backend import Array, OpError, array_namespace
from .linalg import svd_topk
from .lowrank import LowRank, split_factors
from .quant import fake_quantize

__all__ = ["compress", "recover", "pela_rank", "compress_report", "loftq_trace"]


def pela_rank(n_in: int, n_out: int, ratio: float) -> int:
    """Return PELA's rank ``floor(in·out / (ratio·(in + out)))`` (≈ ``1/ratio`` of the parameters).

    ``pela_rank(768, 768, 2) == 192``; ``pela_rank(768, 3072, 3) == 204``. The two factors hold
    ``k·(in + out) ≤ in·out / ratio`` parameters.

    Raises:
        OpError: for ``ratio < 1`` or when the rank would be 0 (the layer is too small).

    Reference: https://arxiv.org/abs/2310.10700
    """
    if not np.isfinite(ratio) or ratio < 1:
        raise OpError(f"ratio must be >= 1 (2 keeps half the parameters), got {ratio}")
    # Integer arithmetic where possible: in·out can exceed 2^53 only for absurd layers.
    k = int(np.floor(n_in * n_out / (float(ratio) * (n_in + n_out))))
    if k < 1:
        raise OpError(
            f"ratio {ratio} leaves rank 0 for a ({n_out}, {n_in}) weight; use a smaller ratio "
            "or exclude this module"
        )
    return k


def recover(
    w: Array,
    wc: Array,
    *,
    rank: int,
    scale: float = 1.0,
    niter: int = -1,
    rng: np.random.Generator | None = None,
) -> LowRank:
    """Fit the best rank-``r`` adapter to what compression lost: ``SVD_r(W − W_c)``.

    ``R = W − W_c = U S Vh``; ``A = √(S_r/scale) Vh_r (r, in)``, ``B = U_r √(S_r/scale) (out, r)``,
    so ``scale · B @ A`` is the rank-``r`` truncation of ``R`` and
    ``‖W − W_c − scale·B A‖_F = sqrt(Σ_{i>r} σ_i(R)²)`` (Eckart–Young).

    Args:
        w: ``(out, in)`` original weight.
        wc: ``(out, in)`` compressed weight (dequantized, pruned, truncated...).
        rank: adapter rank, ``1 ≤ rank ≤ min(out, in)``.
        scale: the adapter's ``lora_alpha / r``; folded into the factors.
        niter: ``-1`` automatic (randomized SVD when the rank is small against the matrix),
            ``0`` exact SVD, ``N > 0`` randomized with ``N`` power iterations.
        rng: host generator for the randomized sketch.

    Returns:
        The recovery ``LowRank``.

    Reference: https://arxiv.org/abs/2310.08659 (LoftQ, one alternating step)
    """
    if w.shape != wc.shape:
        raise OpError(f"compressed weight shape {tuple(wc.shape)} != weight shape {tuple(w.shape)}")
    if niter < -1:
        raise OpError(f"niter must be -1 (auto), 0 (exact) or > 0, got {niter}")
    r = w - wc  # (out, in)
    u, s, vh = svd_topk(r, rank, niter=None if niter == -1 else niter, rng=rng)
    return split_factors(u, s, vh, scale)


def compress(
    w: Array,
    *,
    rank: int,
    rng: np.random.Generator | None = None,
    bits: int = 4,
    group_size: int = 64,
    scheme: Literal["int", "nf4"] = "int",
    lowrank: Literal["none", "pela"] = "none",
    ratio: float = 2.0,
    loftq_iter: int = 1,
    scale: float = 1.0,
    niter: int = -1,
) -> tuple[Array, LowRank]:
    """Quantise ``w`` and fit a rank-``r`` recovery adapter to the error (or PELA-factor ``w``).

    ``lowrank='none'``: ``Q = Q_bits(W)`` (absmax int-k per group, or NF4), ``(A, B) =
    SVD_r(W − Q)``; returns ``(Q, LowRank)`` with ``Q + scale·B A ≈ W`` and error
    ``sqrt(Σ_{i>r} σ_i(W − Q)²)``. ``loftq_iter = T`` repeats ``Q ← Q(W − scale·B A)``,
    ``(A, B) ← SVD_r(W − Q)`` for ``T`` quantisations in all.
    ``lowrank='pela'``: returns ``(zeros, LowRank)`` with rank ``k = pela_rank(in, out, ratio)``
    and ``scale·B A`` the rank-``k`` SVD truncation of ``W``. Shapes: ``w (out, in)``, ``A (r,
    in)``, ``B (out, r)``.

    Args:
        w: ``(out, in)`` float weight.
        rank: recovery adapter rank (ignored for ``pela``).
        rng: host generator for the randomized SVD sketch.
        bits: quantiser code width (2–8 for ``int``; 4 for ``nf4``).
        group_size: columns per quantisation group / NF4 block; ``0`` = per output channel (int).
        scheme: ``int`` (absmax round-to-nearest) or ``nf4`` (QLoRA NormalFloat-4).
        lowrank: ``none`` (quantise + recover) or ``pela`` (two-factor replacement).
        ratio: PELA parameter ratio (2 keeps half, 3 a third).
        loftq_iter: number of LoftQ alternations (1 = CPET's compress-then-SVD-init).
        scale: adapter ``lora_alpha / r``; folded into the factors so ``scale·B@A`` is exact.
        niter: SVD mode: ``-1`` auto, ``0`` exact, ``N > 0`` randomized with ``N`` power steps.

    Returns:
        ``(residual (out, in), LowRank)``.

    Reference: https://arxiv.org/abs/2307.07705 (CPET); https://arxiv.org/abs/2310.08659
    (LoftQ); https://arxiv.org/abs/2310.10700 (PELA)
    """
    xp = array_namespace(w)
    if w.ndim != 2:
        raise OpError(f"compress expects a 2-D (out, in) matrix, got shape {tuple(w.shape)}")
    if not np.isfinite(scale) or scale <= 0:
        raise OpError(f"scale must be > 0, got {scale}")
    if lowrank == "pela":
        k = pela_rank(int(w.shape[1]), int(w.shape[0]), ratio)
        lr = recover(w, xp.zeros_like(w), rank=k, scale=scale, niter=niter, rng=rng)
        return xp.zeros_like(w), lr
    if lowrank != "none":
        raise OpError(f"lowrank must be one of 'none', 'pela', got {lowrank!r}")
    if not 1 <= int(rank) <= min(w.shape):
        raise OpError(
            f"rank must be in [1, {min(w.shape)}] for a {tuple(w.shape)} weight, got {rank}"
        )
    if int(loftq_iter) < 1:
        raise OpError(f"loftq_iter must be >= 1, got {loftq_iter}")
    q = fake_quantize(w, bits=bits, group_size=group_size, scheme=scheme)  # Q_1 = Q(W)
    lr = recover(w, q, rank=int(rank), scale=scale, niter=niter, rng=rng)
    for _ in range(int(loftq_iter) - 1):
        # LoftQ: quantise what the adapter does not explain, then refit the adapter.
        q = fake_quantize(w - lr.delta(), bits=bits, group_size=group_size, scheme=scheme)
        lr = recover(w, q, rank=int(rank), scale=scale, niter=niter, rng=rng)
    return q, lr


def compress_report(w: Array, residual: Array, lowrank: LowRank) -> dict[str, float]:
    """Return the per-module errors before and after the low-rank recovery (float64 norms).

    ``error_before = ‖W − residual‖_F`` (the compression error; ``‖W‖`` for PELA's zero
    residual), ``error_after = ‖W − residual − scale·B A‖_F``, both also relative to ``‖W‖_F``.

    Args:
        w: ``(out, in)`` original weight.
        residual: ``(out, in)`` compressed weight returned by :func:`compress`.
        lowrank: the recovery adapter.

    Returns:
        ``{"norm", "error_before", "error_after", "rel_error_before", "rel_error_after", "rank"}``.
    """
    xp = array_namespace(w, residual)
    w64 = w.astype(xp.float64)
    e0 = w64 - residual.astype(xp.float64)
    e1 = e0 - lowrank.delta().astype(xp.float64)
    norm = float(xp.linalg.norm(w64))
    before = float(xp.linalg.norm(e0))
    after = float(xp.linalg.norm(e1))
    rel = (lambda e: e / norm) if norm > 0 else (lambda e: 0.0)
    return {
        "norm": norm,
        "error_before": before,
        "error_after": after,
        "rel_error_before": rel(before),
        "rel_error_after": rel(after),
        "rank": float(lowrank.rank),
    }


def loftq_trace(
    w: Array,
    *,
    rank: int,
    iters: int,
    bits: int = 4,
    group_size: int = 64,
    scheme: Literal["int", "nf4"] = "int",
    niter: int = -1,
    rng: np.random.Generator | None = None,
) -> list[float]:
    """Return ``‖W − Q_t − B_t A_t‖_F / ‖W‖_F`` after each LoftQ iteration ``t = 1..iters``.

    The same alternation as :func:`compress` with ``loftq_iter = iters`` (its last entry is that
    run's error). LoftQ's error usually decreases but need not: the quantiser is not a Euclidean
    projection (ALGORITHMS.md §7).

    Reference: https://arxiv.org/abs/2310.08659
    """
    xp = array_namespace(w)
    if int(iters) < 1:
        raise OpError(f"iters must be >= 1, got {iters}")
    norm = float(xp.linalg.norm(w.astype(xp.float64))) or 1.0
    out: list[float] = []
    target = w
    for _ in range(int(iters)):
        q = fake_quantize(target, bits=bits, group_size=group_size, scheme=scheme)
        lr = recover(w, q, rank=int(rank), niter=niter, rng=rng)
        out.append(float(xp.linalg.norm((w - q - lr.delta()).astype(xp.float64))) / norm)
        target = w - lr.delta()  # LoftQ: quantise what the adapter does not explain
    return out
