"""Fake quantisation: quantise a weight and return it dequantized, as floats of the same shape.

Used by :func:`ops.compress.compress` as the compressor ``C(W)`` whose error a low-rank adapter
recovers (CPET / LoftQ). Two schemes:

* ``absmax`` int-k (round-to-nearest, symmetric): per output channel, or per group of
  ``group_size`` consecutive input columns within a row (the GPTQ/AWQ group layout);
* ``nf4``: the QLoRA NormalFloat-4 code book with blockwise absmax scaling (bitsandbytes'
  ``quant_type="nf4"`` without double quantisation).

Both are exactly idempotent, ``Q(Q(W)) == Q(W)`` bit for bit: the dequantized value of the
largest-magnitude entry of a group is that entry itself (the code grid contains ±1 exactly), so
re-quantising sees the same scale and the same codes.
"""

from __future__ import annotations

from .backend import Array, OpError, array_namespace

__all__ = ["NF4_CODE", "quantize_absmax", "quantize_nf4", "fake_quantize"]

# QLoRA NF4 code book (Dettmers et al. 2023, Appendix E; bitsandbytes ``get_4bit_type("nf4")``):
# 8 positive and 7 negative quantiles of N(0, 1) plus an exact zero, normalised to [-1, 1].
NF4_CODE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def _groups(w: Array, group_size: int) -> tuple[Array, int]:
    """Reshape ``w (out, in)`` to ``(out, n_groups, g)``, zero-padding a ragged last group.

    ``group_size <= 0`` (or ``>= in``) means one group per output channel. Zero padding never
    changes a group's absmax and is dropped again by :func:`_ungroup`.
    """
    xp = array_namespace(w)
    n_out, n_in = w.shape
    g = n_in if group_size <= 0 or group_size >= n_in else group_size
    n_groups = -(-n_in // g)  # ceil
    pad = n_groups * g - n_in
    if pad:
        w = xp.concatenate([w, xp.zeros((n_out, pad), dtype=w.dtype)], axis=1)
    return w.reshape(n_out, n_groups, g), n_in


def _ungroup(wg: Array, n_in: int) -> Array:
    n_out = wg.shape[0]
    return wg.reshape(n_out, -1)[:, :n_in]


def _check_matrix(w: Array) -> None:
    if w.ndim != 2:
        raise OpError(f"quantisation expects a 2-D (out, in) matrix, got shape {tuple(w.shape)}")


def quantize_absmax(w: Array, *, bits: int = 8, group_size: int = 0) -> Array:
    """Round ``w`` to a symmetric int-``bits`` grid scaled by each group's absmax; return floats.

    Per group ``G`` (a row, or ``group_size`` columns of a row): ``a = max|G|``,
    ``q = clip(round(G · qmax / a), −qmax, qmax)`` with ``qmax = 2^(bits−1) − 1``, and the result
    is ``(q / qmax) · a``. Shapes: ``w (out, in) → (out, in)``. The element error is at most
    ``a / qmax / 2`` (e.g. absmax/127/2 at 8 bits). All-zero groups stay zero.

    Args:
        w: ``(out, in)`` float matrix.
        bits: code width, 2 to 8.
        group_size: columns per group; ``0`` quantises each output channel (row) as one group.

    Returns:
        The dequantized ``(out, in)`` array, same dtype as ``w``.

    Reference: https://arxiv.org/abs/2208.07339 (LLM.int8(), absmax quantisation)
    """
    xp = array_namespace(w)
    _check_matrix(w)
    if not 2 <= int(bits) <= 8:
        raise OpError(f"bits must be in [2, 8] for scheme='int', got {bits}")
    if group_size < 0:
        raise OpError(f"group_size must be >= 0 (0 = per output channel), got {group_size}")
    qmax = float(2 ** (int(bits) - 1) - 1)
    wg, n_in = _groups(w, group_size)  # (out, n_groups, g)
    absmax = xp.max(xp.abs(wg), axis=2, keepdims=True)  # (out, n_groups, 1)
    # An all-zero group has no scale; dividing by 1 keeps it zero without NaNs.
    safe = xp.where(absmax > 0, absmax, xp.ones_like(absmax))
    q = xp.clip(xp.rint(wg / safe * qmax), -qmax, qmax)
    # (q / qmax) · a, not q · (a / qmax): q = ±qmax then gives ±a exactly, which makes Q idempotent.
    deq = (q / qmax) * absmax
    return _ungroup(deq, n_in).astype(w.dtype, copy=False)


def quantize_nf4(w: Array, *, block_size: int = 64) -> Array:
    """Map ``w`` to the nearest NF4 code after per-block absmax scaling; return floats.

    Per block ``G`` of ``block_size`` consecutive columns of a row: ``a = max|G|``,
    ``c = argmin_k |G / a − NF4[k]|`` and the result is ``NF4[c] · a``. Shapes: ``(out, in) →
    (out, in)``. When ``in`` is a multiple of ``block_size`` the blocks are exactly bitsandbytes'
    blocks over the flattened tensor; otherwise our last block of each row is shorter (theirs
    would straddle two rows). The absmax is kept in full precision (no double quantisation).

    Args:
        w: ``(out, in)`` float matrix.
        block_size: columns per block (bitsandbytes and PEFT's LoftQ use 64).

    Returns:
        The dequantized ``(out, in)`` array, same dtype as ``w``.

    Reference: https://arxiv.org/abs/2305.14314 (QLoRA, NormalFloat)
    """
    xp = array_namespace(w)
    _check_matrix(w)
    if block_size < 1:
        raise OpError(f"group_size (the NF4 block size) must be >= 1, got {block_size}")
    code = xp.asarray(NF4_CODE, dtype=w.dtype)  # (16,)
    # Decision boundaries are the midpoints between neighbouring codes (what bitsandbytes uses).
    mids = (code[1:] + code[:-1]) / 2  # (15,)
    wg, n_in = _groups(w, block_size)  # (out, n_blocks, b)
    absmax = xp.max(xp.abs(wg), axis=2, keepdims=True)
    safe = xp.where(absmax > 0, absmax, xp.ones_like(absmax))
    x = wg / safe  # in [-1, 1]
    idx = xp.searchsorted(mids, x.ravel()).reshape(x.shape)  # nearest code, ties go up
    deq = code[idx] * absmax
    return _ungroup(deq, n_in).astype(w.dtype, copy=False)


def fake_quantize(w: Array, *, bits: int = 4, group_size: int = 64, scheme: str = "int") -> Array:
    """Quantise and dequantize ``w`` with ``scheme`` ``int`` (absmax) or ``nf4``.

    Args:
        w: ``(out, in)`` float matrix.
        bits: code width (``nf4`` requires 4).
        group_size: columns per group/block; ``0`` means per output channel (``int`` only).
        scheme: ``int`` or ``nf4``.

    Returns:
        ``Q(w)``, dequantized, ``(out, in)``.

    Reference: https://arxiv.org/abs/2305.14314
    """
    if scheme == "int":
        return quantize_absmax(w, bits=bits, group_size=group_size)
    if scheme == "nf4":
        if int(bits) != 4:
            raise OpError(f"bits must be 4 for scheme='nf4', got {bits}")
        if group_size <= 0:
            raise OpError(
                f"group_size must be >= 1 for scheme='nf4' (block size), got {group_size}"
            )
        return quantize_nf4(w, block_size=group_size)
    raise OpError(f"scheme must be one of 'int', 'nf4', got {scheme!r}")
