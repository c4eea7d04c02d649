"""Merge kernels: task arithmetic, TIES, DARE (linear and TIES) and PCB.

Every kernel has the merge contract ``fn(deltas (k, *shape), weights (k,), *, rng, **params) ->
delta (*shape)``: ``deltas[i] = θ_i − θ_0`` are the task vectors of one tensor in float32 (float64
inputs stay float64), ``weights`` one weight per model, ``rng`` one host generator per model
(``host_rng(seed, tensor_name, i)``). The caller adds the base back and casts to the stored dtype.

TIES and DARE follow mergekit 0.1.5's per-tensor ``generalized_task_arithmetic`` exactly: sparsify
each task vector, multiply by its weight, optionally elect a sign by the weighted sum and keep the
agreeing entries, sum, optionally divide by the summed weights, multiply by ``lambda``. PCB follows
the official code's ``PCB_merge`` (duguodong7/pcb-merging), whose statistics are whole-model: see
:func:`pcb_reduce` for computing them over a stream of tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .backend import Array, OpError, array_namespace
from .sparsify import bernoulli_mask, kth_smallest, l1_factor, magnitude_mask

__all__ = [
    "PCBStats",
    "dare_linear",
    "dare_ties",
    "pcb",
    "pcb_balance",
    "pcb_balance_bounds",
    "pcb_magnitude_bounds",
    "pcb_reduce",
    "pcb_scale",
    "task_arithmetic",
    "ties",
]

_BLOCK = 1 << 20  # PCB columns per block: bounds the (k, block) temporaries

# (delta (*shape), model index) -> (keep-mask (*shape) | None, factor): s = factor·delta⊙keep
Sparsifier = Callable[[Array, int], tuple]


# --------------------------------------------------------------------------- validation


def _check_inputs(deltas: Array, weights: Array | Sequence[float]) -> tuple[object, Array]:
    """Return ``(xp, weights as a (k,) array in the deltas' dtype)`` or raise OpError."""
    xp = array_namespace(deltas)
    if deltas.ndim < 1 or deltas.shape[0] < 1:
        raise OpError(f"deltas must be (k, *shape) with k ≥ 1, got shape {tuple(deltas.shape)}")
    if deltas.dtype not in (xp.float32, xp.float64):
        raise OpError(f"deltas must be float32 or float64, got {deltas.dtype}")
    w = xp.asarray(weights, dtype=deltas.dtype).reshape(-1)
    if w.shape[0] != deltas.shape[0]:
        raise OpError(f"got {w.shape[0]} weights for {deltas.shape[0]} models")
    return xp, w


def _check_lambda(lambda_: float) -> None:
    # Any finite scale is meaningful (negative λ subtracts the task); NaN/Inf would poison it.
    if not math.isfinite(float(lambda_)):
        raise OpError(f"lambda must be finite, got {lambda_}")


def _check_density(density: float, name: str = "density") -> None:
    if not 0 < density <= 1:
        raise OpError(f"{name} must be in (0, 1], got {density}")


def _rngs(rng: Sequence[np.random.Generator] | None, k: int) -> list[np.random.Generator]:
    """One host generator per model; a fixed default keeps direct calls reproducible."""
    if rng is None:
        return [np.random.default_rng([0, i]) for i in range(k)]
    if isinstance(rng, np.random.Generator):
        raise OpError("rng must be a list with one numpy Generator per model, got one Generator")
    rng = list(rng)
    if len(rng) != k:
        raise OpError(f"rng must hold one generator per model: got {len(rng)} for {k} models")
    return rng


# --------------------------------------------------------------------------- the shared core


def _generalized_task_arithmetic(
    deltas: Array,
    weights: Array,
    sparsify: Sparsifier | None,
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> Array:
    """mergekit's ``GeneralizedTaskArithmeticMerge.merge_group`` on one tensor.

    ``mixed = Σ_i w_i·s_i(τ_i)·m_i`` with ``m_i = [sign(w_i·s_i(τ_i)) = γ]``,
    ``γ = +1 if Σ_i w_i·s_i(τ_i) ≥ 0 else −1`` under consensus (``m_i = 1`` without); with
    ``normalize`` divided by ``Σ_i w_i·m_i`` (0 → 1; ``|Σ w| < 1e-8`` → 1 without consensus);
    then ``× λ``. ``sparsify(τ_i, i)`` returns ``(keep-mask | None, factor)``: ``s_i(τ_i) =
    factor · τ_i ⊙ keep``.
    """
    xp = array_namespace(deltas)
    _check_lambda(lambda_)
    k = deltas.shape[0]
    dt = deltas.dtype.type
    wh = [float(x) for x in (weights.get() if hasattr(weights, "get") else weights)]
    # Sparsify once per model (one RNG draw / one selection each) and keep only the bool masks:
    # the weighted task vectors are rebuilt on the fly, so memory is not k extra float copies.
    keeps, scales = [], []
    for i in range(k):
        keep, factor = (None, 1.0) if sparsify is None else sparsify(deltas[i], i)
        keeps.append(keep)
        scales.append(dt(wh[i] * factor))
    if xp is not np:  # GPU: the same steps fused into one kernel, bit-identical (ops/cuda.py)
        from .cuda import gta

        return gta(
            deltas, keeps, scales, wh, consensus=consensus, normalize=normalize, lambda_=lambda_
        )
    t = xp.empty(deltas.shape[1:], dtype=deltas.dtype)  # (*shape) w_i·s_i(τ_i) of one model
    mixed = xp.zeros(deltas.shape[1:], dtype=deltas.dtype)
    if consensus:
        for i in range(k):
            _masked_scale(xp, deltas[i], scales[i], keeps[i], t)
            mixed += t
        # γ = ±1 with ties (Σ = +0) going to +1; Σ = −0 only when every term is ±0, and then no
        # entry agrees whatever γ is, so copysign gives mergekit's `(Σ >= 0)·2 − 1` exactly.
        gamma = xp.copysign(dt(1), mixed, out=mixed)
        mixed = xp.zeros(deltas.shape[1:], dtype=deltas.dtype)
        divisor = xp.zeros(deltas.shape[1:], dtype=deltas.dtype)
        for i in range(k):
            _masked_scale(xp, deltas[i], scales[i], keeps[i], t)
            t *= gamma
            agree = t > 0  # zeros never agree, as in mergekit's sign(x) == γ
            xp.maximum(t, 0, out=t)  # |w_i s_i| where it agrees, else 0
            mixed += t
            divisor += agree if wh[i] == 1 else agree * dt(wh[i])
        mixed *= gamma  # γ·Σ|agreeing| is exactly Σ agreeing (sign flips are exact)
        del gamma
        divisor[divisor == 0] = 1
    else:
        for i in range(k):
            _masked_scale(xp, deltas[i], scales[i], keeps[i], t)
            mixed += t
        total = sum(wh)
        divisor = total if abs(total) >= 1e-8 else 1.0
    del t, keeps
    if normalize:
        mixed /= divisor if not isinstance(divisor, float) else dt(divisor)
    if lambda_ != 1:
        mixed *= dt(lambda_)
    return mixed


def _masked_scale(xp, d: Array, s, keep: Array | None, out: Array) -> None:
    """``out = s·d⊙keep`` (two plain passes: numpy's ``where=`` is ~5× slower)."""
    xp.multiply(d, s, out=out)
    if keep is not None:
        xp.multiply(out, keep, out=out)


def _bernoulli_sparsifier(
    density: float, rescale: str, rngs: list[np.random.Generator]
) -> Sparsifier | None:
    """DARE's random drop: keep with probability ``density``, then rescale (l1 | density | none)."""
    if density >= 1:
        return None  # mergekit returns the tensor untouched, with no rescale

    def drop(delta: Array, i: int) -> tuple[Array, float]:
        keep = bernoulli_mask(delta.shape, density, rngs[i], like=delta)
        if rescale == "l1":
            return keep, l1_factor(delta, keep)
        if rescale == "density":
            return keep, 1.0 / density
        return keep, 1.0

    return drop


def _magnitude_sparsifier(density: float) -> Sparsifier | None:
    """TIES's trim: keep the ``max(1, int(density·numel))`` largest magnitudes."""
    if density >= 1:
        return None
    return lambda delta, i: (magnitude_mask(delta, density), 1.0)


# --------------------------------------------------------------------------- kernels


def task_arithmetic(
    deltas: Array,
    weights: Array,
    *,
    rng: Sequence[np.random.Generator] | None = None,
    lambda_: float = 1.0,
    normalize: bool = False,
) -> Array:
    """Add the weighted sum of task vectors.

    ``δ = λ · Σ_i w_i τ_i`` (divided by ``Σ_i w_i`` when ``normalize``; ``|Σw| < 1e-8`` counts as
    1), with ``deltas (k, *shape)``, ``weights (k,)`` → ``(*shape)``. mergekit ``task_arithmetic``.

    Args:
        deltas: ``(k, *shape)`` task vectors ``θ_i − θ_0``.
        weights: ``(k,)`` per-model weights.
        rng: unused (the merge contract passes one generator per model).
        lambda_: scale of the merged task vector (``-p lambda=``).
        normalize: divide by the sum of the weights.

    Returns:
        ``(*shape)`` merged task vector.

    Reference: Ilharco et al., Editing Models with Task Arithmetic, https://arxiv.org/abs/2212.04089
    """
    _, w = _check_inputs(deltas, weights)
    return _generalized_task_arithmetic(
        deltas, w, None, consensus=False, normalize=normalize, lambda_=lambda_
    )


def ties(
    deltas: Array,
    weights: Array,
    *,
    rng: Sequence[np.random.Generator] | None = None,
    density: float = 0.2,
    lambda_: float = 1.0,
    normalize: bool = True,
) -> Array:
    """Trim each task vector by magnitude, elect signs, and average the agreeing entries.

    Per tensor, as mergekit ``ties``: ``s_i = τ_i ⊙ top_k(|τ_i|)`` with ``k = max(1,
    int(density·numel))``; ``γ = sign⁺(Σ_i w_i s_i)`` (ties → +1); ``m_i = [sign(w_i s_i) = γ]``;
    ``δ = λ · Σ_i w_i s_i m_i / Σ_i w_i m_i`` (divisor 0 → 1; no division without ``normalize``).
    ``deltas (k, *shape)``, ``weights (k,)`` → ``(*shape)``. Deviations from mergekit: deltas are
    exact fp32 differences (mergekit subtracts in the stored dtype) and ties at the trim threshold
    are broken by flat index. The paper's official code is whole-model and keeps ``k + 1``.

    Args:
        deltas: ``(k, *shape)`` task vectors.
        weights: ``(k,)`` per-model weights.
        rng: unused.
        density: fraction of entries kept per model, in ``(0, 1]`` (1 = no trim; mergekit's
            default is 1.0, the paper's K = 20% is 0.2, our default).
        lambda_: scale of the merged task vector.
        normalize: divide by the summed weights of the agreeing models (mergekit default True).

    Returns:
        ``(*shape)`` merged task vector.

    Reference: Yadav et al., TIES-Merging, https://arxiv.org/abs/2306.01708
    """
    _, w = _check_inputs(deltas, weights)
    _check_density(density)
    return _generalized_task_arithmetic(
        deltas,
        w,
        _magnitude_sparsifier(density),
        consensus=True,
        normalize=normalize,
        lambda_=lambda_,
    )


def _dare(
    deltas: Array,
    weights: Array,
    rng: Sequence[np.random.Generator] | None,
    density: float,
    rescale: str,
    lambda_: float,
    normalize: bool,
    consensus: bool,
) -> Array:
    _, w = _check_inputs(deltas, weights)
    _check_density(density)
    if rescale not in ("l1", "density", "none"):
        raise OpError(f"rescale must be one of l1, density, none, got {rescale!r}")
    sparsify = _bernoulli_sparsifier(density, rescale, _rngs(rng, deltas.shape[0]))
    return _generalized_task_arithmetic(
        deltas, w, sparsify, consensus=consensus, normalize=normalize, lambda_=lambda_
    )


def dare_linear(
    deltas: Array,
    weights: Array,
    *,
    rng: Sequence[np.random.Generator] | None = None,
    density: float = 0.1,
    rescale: Literal["l1", "density", "none"] = "l1",
    lambda_: float = 1.0,
    normalize: bool = False,
) -> Array:
    """Drop task-vector entries at random, rescale, and add the weighted sum.

    ``s_i = τ_i ⊙ b_i · c_i`` with ``b_i ~ Bernoulli(density)`` drawn on the host from ``rng[i]``
    and ``c_i = ‖τ_i‖₁ / ‖τ_i ⊙ b_i‖₁`` (``rescale=l1``, mergekit since Feb 2025, the default),
    ``1/density`` (``density``, the paper and mergekit ≤ 0.1.0) or 1 (``none``);
    ``δ = λ · Σ_i w_i s_i`` (``/ Σ w`` when ``normalize``). ``density = 1`` is the identity.
    ``deltas (k, *shape)``, ``weights (k,)`` → ``(*shape)``.

    Args:
        deltas: ``(k, *shape)`` task vectors.
        weights: ``(k,)`` per-model weights.
        rng: one host generator per model (``host_rng(seed, tensor_name, i)``).
        density: keep probability in ``(0, 1]`` (drop rate ``1 − density``).
        rescale: how kept entries are scaled: ``l1``, ``density`` or ``none``.
        lambda_: scale of the merged task vector.
        normalize: divide by the sum of the weights (mergekit default False).

    Returns:
        ``(*shape)`` merged task vector.

    Reference: Yu et al., Language Models are Super Mario (DARE), https://arxiv.org/abs/2311.03099
    """
    return _dare(deltas, weights, rng, density, rescale, lambda_, normalize, consensus=False)


def dare_ties(
    deltas: Array,
    weights: Array,
    *,
    rng: Sequence[np.random.Generator] | None = None,
    density: float = 0.1,
    rescale: Literal["l1", "density", "none"] = "l1",
    lambda_: float = 1.0,
    normalize: bool = False,
) -> Array:
    """Drop task-vector entries at random, rescale, elect signs, and sum the agreeing entries.

    TIES (:func:`ties`) with DARE's Bernoulli sparsifier (:func:`dare_linear`) in place of the
    magnitude trim; as mergekit ``dare_ties``, ``normalize`` defaults to False. ``deltas (k,
    *shape)``, ``weights (k,)`` → ``(*shape)``.

    Args:
        deltas: ``(k, *shape)`` task vectors.
        weights: ``(k,)`` per-model weights.
        rng: one host generator per model.
        density: keep probability in ``(0, 1]``.
        rescale: ``l1`` (default), ``density`` or ``none``.
        lambda_: scale of the merged task vector.
        normalize: divide by the summed weights of the agreeing models.

    Returns:
        ``(*shape)`` merged task vector.

    Reference: Yu et al., Language Models are Super Mario (DARE), https://arxiv.org/abs/2311.03099
    """
    return _dare(deltas, weights, rng, density, rescale, lambda_, normalize, consensus=True)


# --------------------------------------------------------------------------- PCB


@dataclass(frozen=True)
class PCBStats:
    """PCB's per-task whole-model statistics (host numpy arrays of shape ``(k,)``).

    Attributes:
        lo: ``sorted(|τ_i|)[int(D·clip)]``, the lower magnitude clip.
        hi: ``sorted(|τ_i|)[int(D·(1 − clip) − 1)]``, the upper magnitude clip.
        thr: ``sorted(bal_i)[int(D·(1 − density))]``, the drop threshold.
        top: ``max(bal_i)``.
    """

    lo: np.ndarray
    hi: np.ndarray
    thr: np.ndarray
    top: np.ndarray


def _check_pcb(density: float, clip: float) -> None:
    _check_density(density)
    if not 0 <= clip < 0.5:
        raise OpError(f"clip must be in [0, 0.5), got {clip}")


def _magnitude_ranks(clip: float) -> Callable[[int], list[int]]:
    # The official clamp(x, q, q) indices, in Python float arithmetic exactly as written there.
    return lambda d: [int(d * clip), int(d * (1 - clip) - 1)]


def _balance_ranks(density: float) -> Callable[[int], list[int]]:
    # clamp(bal, 1 − ratio, 0): min index int(d·(1 − ratio)), max index int(d·1 − 1) = d − 1.
    return lambda d: [int(d * (1 - density)), int(d * (1 - 0) - 1)]


def pcb_balance(t: Array, lo: Array, hi: Array) -> Array:
    """Return PCB's balance scores ``bal = intra ⊙ inter`` for a ``(k, m)`` slice of task vectors.

    ``M = clamp(|τ|, lo, hi)``; ``intra = exp(k · ((M − min M)/(max M − min M))²)`` with
    ``min M = min(lo, hi)``, ``max M = hi`` (exact for the whole-model row); ``inter =
    tanh(τ ⊙ Σ_j τ_j)``. Guard: a constant ``M`` row (``hi = min M``, the official code's 0/0) gets
    ``intra = 1``.

    Args:
        t: ``(k, m)`` task vectors.
        lo: ``(k,)`` lower magnitude clip per task.
        hi: ``(k,)`` upper magnitude clip per task.
    """
    xp = array_namespace(t)
    if xp is not np:  # GPU: one fused kernel, no (k, m) temporaries (ops/cuda.py)
        from .cuda import pcb_balance as gpu_balance

        return gpu_balance(t, lo, hi)
    k = t.shape[0]
    dt = t.dtype.type
    lo = xp.asarray(lo, dtype=t.dtype).reshape(k, 1)
    hi = xp.asarray(hi, dtype=t.dtype).reshape(k, 1)
    mmin = xp.minimum(lo, hi)  # torch.clamp(min > max) gives max everywhere
    span = hi - mmin
    safe = xp.where(span > 0, span, 1)
    live = (span > 0).astype(t.dtype)  # 0 for a constant row: minmax := 0, intra = 1
    # Two (k, m) buffers, updated in place, in the reference's order of operations.
    a = xp.abs(t)
    xp.maximum(a, lo, out=a)
    xp.minimum(a, hi, out=a)  # M, the clipped magnitudes
    a -= mmin
    a /= safe
    a *= live
    a *= a
    a *= dt(k)
    xp.exp(a, out=a)  # intra
    b = t * t.sum(axis=0, keepdims=True)
    xp.tanh(b, out=b)  # inter: signed, conflicts score negative
    a *= b
    return a


def pcb_scale(t: Array, stats: PCBStats) -> Array:
    """Return PCB's per-entry merge weights ``scale (k, m)`` for a slice ``t (k, m)``.

    ``scale = (max(bal, thr) − thr) / (top − thr)``: the official ``minmax(clamp(bal, 1 − ratio,
    0))`` with the whole-model ``thr`` and ``top`` from ``stats``. Entries at or below ``thr`` get
    0 and the maximum gets 1. Guard: a row with ``top = thr`` gets 1 everywhere.
    """
    xp = array_namespace(t)
    k = t.shape[0]
    col = lambda a: xp.asarray(a, dtype=t.dtype).reshape(k, 1)  # noqa: E731
    thr, top = col(stats.thr), col(stats.top)
    span = top - thr
    bal = pcb_balance(t, stats.lo, stats.hi)  # (k, m), turned into the scale in place
    xp.maximum(bal, thr, out=bal)
    bal -= thr
    bal /= xp.where(span > 0, span, 1)
    dead = xp.flatnonzero(span.reshape(-1) <= 0)
    if dead.size:  # a constant row: the official 0/0; the task enters a plain mean instead
        bal[dead] = 1
    return bal


def _local_stats(t: Array, density: float, clip: float) -> PCBStats:
    """PCB's statistics when ``t (k, d)`` is the whole model (exact selection, no sort)."""
    xp = array_namespace(t)
    d = t.shape[1]
    buf = xp.abs(t)  # (k, d), reused for the balance scores
    mr = _magnitude_ranks(clip)(d)
    buf.partition(mr, axis=1)  # in place: one O(d) selection per row
    lo, hi = buf[:, mr[0]].copy(), buf[:, mr[1]].copy()
    for j in range(0, d, _BLOCK):
        buf[:, j : j + _BLOCK] = pcb_balance(t[:, j : j + _BLOCK], lo, hi)
    br = _balance_ranks(density)(d)
    buf.partition(br, axis=1)
    h = lambda a: a.get() if hasattr(a, "get") else np.asarray(a)  # noqa: E731
    return PCBStats(h(lo), h(hi), h(buf[:, br[0]]), h(buf[:, br[1]]))


def pcb_magnitude_bounds(
    chunks: Callable[[], Iterable[Array]], *, clip: float = 1e-4
) -> tuple[np.ndarray, np.ndarray]:
    """Return the per-task magnitude clips ``(lo, hi)`` over a stream of ``(k, *shape)`` deltas.

    Exact order statistics of ``|τ_i|`` over every streamed entry (:func:`kth_smallest`); the
    stream is read two or three times and never concatenated.
    """
    _check_pcb(0.5, clip)
    xp_abs = lambda c: array_namespace(c).abs(c)  # noqa: E731
    vals = kth_smallest(lambda: map(xp_abs, _blocks(chunks())), _magnitude_ranks(clip))
    return vals[:, 0], vals[:, 1]


def pcb_balance_bounds(
    chunks: Callable[[], Iterable[Array]],
    lo: np.ndarray,
    hi: np.ndarray,
    *,
    density: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Return the per-task drop threshold and maximum of PCB's balance scores over a stream."""
    _check_density(density)
    vals = kth_smallest(
        lambda: (pcb_balance(c, lo, hi) for c in _blocks(chunks())), _balance_ranks(density)
    )
    return vals[:, 0], vals[:, 1]


def pcb_reduce(
    chunks: Callable[[], Iterable[Array]], *, density: float = 0.1, clip: float = 1e-4
) -> PCBStats:
    """Compute PCB's whole-model statistics by streaming the task vectors (read-only passes).

    ``chunks()`` yields the ``(k, *shape)`` task vectors of every tensor of the model (any order,
    the same each call). Passing the result as ``pcb(..., stats=...)`` to each tensor gives exactly
    PCB on the concatenated model vector, as the official code computes it.

    Args:
        chunks: callable returning a fresh iterable of ``(k, *shape)`` task-vector arrays.
        density: the paper's ratio (fraction kept per task).
        clip: the outlier fraction clipped at each end of ``|τ|``.

    Returns:
        :class:`PCBStats` with ``(k,)`` arrays.
    """
    _check_pcb(density, clip)
    lo, hi = pcb_magnitude_bounds(chunks, clip=clip)
    thr, top = pcb_balance_bounds(chunks, lo, hi, density=density)
    return PCBStats(lo, hi, thr, top)


def _flat(c: Array) -> Array:
    return c.reshape(c.shape[0], -1)


def _blocks(chunks: Iterable[Array]) -> Iterator[Array]:
    """``(k, m)`` column blocks of at most ``_BLOCK`` entries from ``(k, *shape)`` chunks."""
    for c in chunks:
        f = _flat(c)
        for j in range(0, f.shape[1], _BLOCK):
            yield f[:, j : j + _BLOCK]


def pcb(
    deltas: Array,
    weights: Array,
    *,
    rng: Sequence[np.random.Generator] | None = None,
    density: float = 0.1,
    lambda_: float = 1.0,
    clip: float = 1e-4,
    scope: Literal["model", "tensor"] = "model",
    stats: PCBStats | None = None,
) -> Array:
    """Weight each entry by intra- and inter-task balance, drop the low scores, and average.

    The official ``PCB_merge`` on ``T = deltas (k, d)`` (each row flattened): ``M = clamp(|T|,
    lo, hi)`` (order statistics at ``int(d·clip)``, ``int(d(1−clip)−1)``), ``T_c = sign(T)⊙M``,
    ``bal = exp(k·minmax(M)²) ⊙ tanh(T ⊙ Σ_j T_j)``, ``scale = minmax(max(bal, thr))`` with
    ``thr = sorted(bal)[int(d(1−density))]``, and ``δ = λ · Σ_i w_i T_c,i ⊙ scale_i / max(Σ_i
    scale_i, 1e-12)`` → ``(*shape)``. ``w_i`` are the per-task λ multipliers of the official ES
    code (1 by default). NaN guard (the official code returns NaN): a constant ``|T|`` row uses
    ``minmax(M) = 0``; a row whose kept scores are constant (``max = thr``, e.g. ``τ`` and ``−τ``)
    gets ``scale = 1`` everywhere, i.e. that task enters a plain mean.

    ``scope="model"`` (default) takes ``lo, hi, thr, max`` from ``stats`` (whole-model figures from
    :func:`pcb_reduce`; ``surgery merge`` computes them in read-only passes); without ``stats`` the
    given deltas are treated as the whole model. ``scope="tensor"`` computes them from this tensor.

    Args:
        deltas: ``(k, *shape)`` task vectors.
        weights: ``(k,)`` per-task multipliers of λ.
        rng: unused.
        density: the paper's ratio: fraction of entries kept per task, in ``(0, 1]``.
        lambda_: scale of the merged task vector.
        clip: outlier fraction clipped at each end of ``|τ|``, in ``[0, 0.5)``.
        scope: ``model`` (the official whole-model statistics) or ``tensor``.
        stats: whole-model statistics (supplied by the loop for ``scope="model"``).

    Returns:
        ``(*shape)`` merged task vector.

    Reference: Du et al., Parameter Competition Balancing for Model Merging (NeurIPS 2024),
    https://arxiv.org/abs/2410.02396
    """
    xp, w = _check_inputs(deltas, weights)
    _check_pcb(density, clip)
    _check_lambda(lambda_)
    if scope not in ("model", "tensor"):
        raise OpError(f"scope must be one of model, tensor, got {scope!r}")
    k = deltas.shape[0]
    t = _flat(deltas)  # (k, d)
    if scope == "tensor" or stats is None:
        stats = _local_stats(t, density, clip)
    if len(stats.lo) != k:
        raise OpError(f"stats are for {len(stats.lo)} models, got {k}")
    if xp is not np:  # GPU: balance, scale and the weighted mean fused per column (ops/cuda.py)
        from .cuda import pcb_merge

        return pcb_merge(t, stats, w, lambda_).reshape(deltas.shape[1:])
    col = lambda a: xp.asarray(a, dtype=t.dtype).reshape(k, 1)  # noqa: E731
    lo, hi = col(stats.lo), col(stats.hi)
    lam = w.reshape(k, 1) * t.dtype.type(lambda_)
    out = xp.empty(t.shape[1], dtype=t.dtype)  # (d,)
    # Every step is per column given the statistics: blocks bound the temporaries.
    for j in range(0, t.shape[1], _BLOCK):
        tb = t[:, j : j + _BLOCK]
        scale = pcb_scale(tb, stats)  # (k, b)
        tc = xp.minimum(xp.maximum(xp.abs(tb), lo), hi)
        tc *= xp.sign(tb)  # clipped task vectors T_c
        tc *= lam
        tc *= scale
        den = xp.maximum(scale.sum(axis=0), t.dtype.type(1e-12))
        xp.divide(tc.sum(axis=0), den, out=out[j : j + _BLOCK])
    return out.reshape(deltas.shape[1:])
