"""Sparsifiers and exact order statistics shared by the merges.

* :func:`magnitude_mask`: keep the ``k`` largest magnitudes (mergekit's ``sparsify.magnitude``).
* :func:`bernoulli_mask`: keep each entry with probability ``density``, drawn on the host.
* :func:`rescale_l1`: scale a masked tensor back to the L1 norm of the unmasked one.
* :func:`kth_smallest`: the exact ``k``-th smallest values of a stream of chunks that is too large
  to hold at once (PCB's whole-model quantiles), by histogram refinement on the float bits.

All functions are pure xp code (numpy or cupy); random draws happen on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from .backend import Array, OpError, array_namespace

__all__ = [
    "bernoulli_mask",
    "kth_smallest",
    "l1_factor",
    "magnitude_mask",
    "rescale_l1",
    "sortable_keys",
    "topk_count",
]


def topk_count(numel: int, density: float) -> int:
    """Return how many entries a magnitude trim keeps: ``max(1, int(density·numel))``.

    This is mergekit 0.1.5's rule (``sparsify.magnitude``); older mergekit asserted ``k > 0``.
    ``density ≥ 1`` keeps everything.
    """
    if density >= 1:
        return numel
    return min(numel, max(1, int(density * numel))) if numel else 0


def magnitude_mask(x: Array, density: float) -> Array:
    """Keep the ``int(density·numel)`` entries of largest ``|x|`` (at least one).

    Ties at the threshold are broken by flat index (lowest first), so the mask is deterministic
    and has exactly ``k`` entries. mergekit picks them with ``argsort(descending=True)``, whose
    order among equal magnitudes is unspecified.

    Args:
        x: ``(*shape)`` float array.
        density: kept fraction in ``(0, 1]``.

    Returns:
        ``(*shape)`` bool mask.
    """
    xp = array_namespace(x)
    flat = x.reshape(-1)
    n = flat.size
    k = topk_count(n, density)
    if k >= n:
        return xp.ones(x.shape, dtype=bool)
    # |x| as integers: the float bits without the sign bit order like the magnitudes (NaN aside),
    # and numpy's introselect runs ~1.6x faster on integers than on floats.
    itype = xp.int32 if x.dtype.itemsize == 4 else xp.int64
    no_sign = itype(0x7FFFFFFF if x.dtype.itemsize == 4 else 0x7FFFFFFFFFFFFFFF)
    bits = xp.ascontiguousarray(flat).view(itype)
    mag = xp.bitwise_and(bits, no_sign)  # (numel,)
    # The k-th largest magnitude is the (n-k)-th smallest: one O(n) selection in place, no sort.
    mag.partition(n - k)
    thr = mag[n - k].copy()
    xp.bitwise_and(bits, no_sign, out=mag)
    mask = mag >= thr
    extra = int(xp.count_nonzero(mask)) - k
    if extra > 0:
        # Ties at the threshold: keep only the first (lowest-index) ones, k entries in all.
        eq = xp.flatnonzero(mag == thr)
        mask[eq[eq.size - extra :]] = False
    return mask.reshape(x.shape)


def bernoulli_mask(
    shape: tuple[int, ...], density: float, rng: np.random.Generator, like: Array | None = None
) -> Array:
    """Draw a keep-mask ``u < density`` with ``u ~ U[0, 1)`` float32 from a host generator.

    The draw always happens on the host, so CPU and GPU runs keep the same entries.

    Args:
        shape: mask shape.
        density: keep probability in ``(0, 1]``.
        rng: the host generator (``host_rng(seed, tensor_name, model_index)``).
        like: an xp array whose device the mask goes to (numpy when ``None``).

    Returns:
        ``(*shape)`` bool mask on ``like``'s device.
    """
    mask = rng.random(shape, dtype=np.float32) < np.float32(density)
    xp = array_namespace(like) if like is not None else np
    return xp.asarray(mask)


def l1_factor(x: Array, keep: Array, eps: float = 1e-7) -> float:
    """Return ``‖x‖₁ / ‖x ⊙ keep‖₁``, or 1 when either norm is below ``eps`` (mergekit's rule).

    Norms are summed in float64 so long tensors do not lose precision.
    """
    xp = array_namespace(x, keep)
    if xp is np:
        a = xp.abs(x)
        before = float(a.sum(dtype=xp.float64))
        after = float(xp.sum(a, dtype=xp.float64, where=keep))
    else:  # GPU: two fused float64 reductions, no |x| temporary (ops/cuda.py)
        from .cuda import l1_norms

        before, after = l1_norms(x, keep)
    if before < eps or after < eps:
        return 1.0
    return before / after


def rescale_l1(x: Array, masked: Array, eps: float = 1e-7) -> Array:
    """Scale ``masked`` by ``‖x‖₁ / ‖masked‖₁`` so the L1 norm survives the drop.

    As mergekit's ``rescaled_masked_tensor(norm=l1)``: nothing is scaled when either norm is
    below ``eps``. Norms are summed in float64 so long tensors do not lose precision.

    Args:
        x: ``(*shape)`` the tensor before masking.
        masked: ``(*shape)`` the tensor after masking.
        eps: the smallest norm that is rescaled.
    """
    xp = array_namespace(x, masked)
    before = float(xp.abs(x).sum(dtype=xp.float64))
    after = float(xp.abs(masked).sum(dtype=xp.float64))
    if before < eps or after < eps:
        return masked
    return masked * masked.dtype.type(before / after)


# --------------------------------------------------------------------------- order statistics

_DIGIT = 16  # bits resolved per histogram pass: 65536 bins
_NBINS = 1 << _DIGIT


def sortable_keys(x: Array) -> Array:
    """Map floats to unsigned integers with the same order (IEEE-754 bit trick).

    Positive floats get their sign bit set; negative floats get every bit flipped. ``-0.0`` sorts
    just below ``+0.0`` (equal values, so order statistics are unaffected).

    Args:
        x: float32 or float64 array.

    Returns:
        uint32 or uint64 array of the same shape.
    """
    xp = array_namespace(x)
    if x.dtype == xp.float32:
        u = xp.ascontiguousarray(x).view(xp.uint32)
        top = xp.uint32(0x80000000)
        flip = (u >> xp.uint32(31)) * xp.uint32(0x7FFFFFFF) | top
    elif x.dtype == xp.float64:
        u = xp.ascontiguousarray(x).view(xp.uint64)
        top = xp.uint64(0x8000000000000000)
        flip = (u >> xp.uint64(63)) * xp.uint64(0x7FFFFFFFFFFFFFFF) | top
    else:
        raise OpError(f"order statistics need float32 or float64 values, got {x.dtype}")
    return u ^ flip


def _keys_to_values(keys: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Invert :func:`sortable_keys` on the host."""
    utype = np.uint32 if dtype == np.float32 else np.uint64
    nbits = 32 if dtype == np.float32 else 64
    keys = keys.astype(utype)
    negative = (keys >> utype(nbits - 1)) == 0  # sign bit clear in key space: a negative float
    u = np.where(negative, ~keys, keys ^ utype(1 << (nbits - 1)))
    return u.view(dtype)


def _rows(chunk: Array) -> Array:
    """View a chunk as ``(rows, m)``: 1-D chunks are one row, else the leading axis is rows."""
    return chunk.reshape(1, -1) if chunk.ndim <= 1 else chunk.reshape(chunk.shape[0], -1)


def kth_smallest(
    chunks: Callable[[], Iterable[Array]],
    ks: Sequence[int] | Callable[[int], Sequence[int]],
    *,
    gather_cap: int = 1 << 22,
) -> np.ndarray:
    """Return the exact ``k``-th smallest value (0-based) of each row of a chunked stream.

    The stream is never concatenated. ``chunks()`` must yield the same chunks, in any order,
    each time it is called; every chunk is ``(rows, ...)`` (or 1-D for a single row), with the
    same number of rows. Each pass builds, per row, a 65536-bin histogram of the next 16 bits of
    the order-preserving integer key of the values (:func:`sortable_keys`) restricted to the bin
    found so far; once the bin holding the ``k``-th value has at most ``gather_cap`` entries, one
    more pass gathers them and a partition finishes the job. float32 needs at most 2 passes after
    the first (3 in all), float64 at most 4, usually 2 in all.

    Args:
        chunks: callable returning a fresh iterable over the chunks.
        ks: 0-based ranks, the same for every row, or a callable ``ks(total)`` of the row
            length (e.g. ``lambda d: [int(d * 0.9)]``, the official code's index rules).
        gather_cap: largest candidate bin that is gathered instead of refined.

    Returns:
        ``(rows, len(ks))`` numpy array of the selected values (the chunks' dtype); equal to
        ``np.partition(row, k)[k]`` on the concatenated row.

    Raises:
        OpError: on an empty stream, mixed row counts or dtypes, or a rank out of range.
    """
    # Pass 1: top-16-bit histograms per row, plus the row length and dtype.
    rows = total = None
    dtype = None
    hists: list = []
    nbits = 0
    for chunk in chunks():
        c = _rows(chunk)
        xp = array_namespace(c)
        if rows is None:
            rows, total, dtype = c.shape[0], 0, c.dtype
            nbits = 32 if dtype == xp.float32 else 64
            hists = [xp.zeros(_NBINS, dtype=xp.int64) for _ in range(rows)]
        if c.shape[0] != rows or c.dtype != dtype:
            raise OpError(
                f"chunks must share rows and dtype: got {c.shape[0]} rows {c.dtype}, "
                f"expected {rows} rows {dtype}"
            )
        keys = sortable_keys(c)  # (rows, m)
        digit = (keys >> keys.dtype.type(nbits - _DIGIT)).astype(xp.int64)
        for r in range(rows if c.shape[1] else 0):  # cupy's bincount refuses empty input
            hists[r] += xp.bincount(digit[r], minlength=_NBINS)
        total += c.shape[1]
    if rows is None or total == 0:
        raise OpError("order statistic of an empty stream")
    kl = [int(k) for k in (ks(total) if callable(ks) else ks)]
    for k in kl:
        if not 0 <= k < total:
            raise OpError(f"rank k must be in [0, {total}), got {k}")

    # One target per (row, rank): the key prefix found so far, its bit count, the rank inside.
    utype = np.uint32 if nbits == 32 else np.uint64
    result = np.zeros((rows, len(kl)), dtype=np.dtype(dtype))
    targets: dict[tuple[int, int], dict] = {}
    for r in range(rows):
        cum = np.cumsum(np.asarray(_host(hists[r])))
        for j, k in enumerate(kl):
            b = int(np.searchsorted(cum, k, side="right"))
            below = int(cum[b - 1]) if b else 0
            targets[(r, j)] = {
                "prefix": b,
                "bits": _DIGIT,
                "rank": k - below,
                "count": int(cum[b]) - below,
            }

    while True:
        pending = {key: t for key, t in targets.items() if "value" not in t}
        for t in pending.values():
            if t["bits"] == nbits:  # every bit known: the key is the value
                t["value"] = _keys_to_values(np.array([t["prefix"]], dtype=utype), result.dtype)[0]
        pending = {key: t for key, t in pending.items() if "value" not in t}
        if not pending:
            break
        # One more pass: gather small bins, refine large ones by the next 16 bits.
        for t in pending.values():
            t["mode"] = "gather" if t["count"] <= gather_cap else "refine"
            t["acc"] = [] if t["mode"] == "gather" else None
        for chunk in chunks():
            c = _rows(chunk)
            xp = array_namespace(c)
            keys = sortable_keys(c)
            for (r, _j), t in pending.items():
                shift = keys.dtype.type(nbits - t["bits"])
                sel = (keys[r] >> shift) == keys.dtype.type(t["prefix"])
                if t["mode"] == "gather":
                    t["acc"].append(_host(c[r][sel]))
                else:
                    sub = keys[r][sel]
                    if sub.size == 0:  # nothing of this bin in this chunk (cupy's bincount
                        continue  # takes max() of its input, which fails on an empty one)
                    nxt = shift - keys.dtype.type(_DIGIT)
                    digit = ((sub >> nxt) & keys.dtype.type(_NBINS - 1)).astype(xp.int64)
                    h = xp.bincount(digit, minlength=_NBINS)
                    t["acc"] = h if t["acc"] is None else t["acc"] + h
        for t in pending.values():
            if t["mode"] == "gather":
                vals = np.concatenate(t["acc"]) if t["acc"] else np.zeros(0, result.dtype)
                t["value"] = np.partition(vals, t["rank"])[t["rank"]]
            else:
                cum = np.cumsum(np.asarray(_host(t["acc"])))
                b = int(np.searchsorted(cum, t["rank"], side="right"))
                below = int(cum[b - 1]) if b else 0
                t["prefix"] = (t["prefix"] << _DIGIT) | b
                t["bits"] += _DIGIT
                t["rank"] -= below
                t["count"] = int(cum[b]) - below
            t["acc"] = None
    for (r, j), t in targets.items():
        result[r, j] = t["value"]
    return result


def _host(x: Array) -> np.ndarray:
    """numpy view or copy of an xp array (cupy arrays are copied to the host)."""
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)
