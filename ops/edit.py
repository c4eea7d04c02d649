"""Probe editing: score weight rows against a behaviour probe, pick the global top rows, shift them.

Model Surgery (Wang et al., 2024) edits behaviour offline: every row of every layer's
``mlp.gate_proj`` (``(intermediate, hidden)``; each row is a vector in the hidden space) is
scored by its cosine with a linear probe ``w`` (``(hidden,)``, the toxic-class row, *not*
normalised); the ``rows`` rows with the most negative cosine over *all* layers are shifted by
``+alpha·w``.

The selection is a whole-model reduction, so it is split in two: :func:`row_cosines` runs per layer
in a read-only pass, :func:`select_top_rows` pools the per-layer scores (a few floats per row, never
the weights), and :func:`shift_rows` is the per-tensor edit. :func:`project_out` is a separate edit
that removes a direction from a layer's output space.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Literal, TypeVar

import numpy as np

from .backend import Array, OpError, array_namespace, to_host

__all__ = [
    "row_cosines",
    "select_top_rows",
    "shift_rows",
    "probe_edit",
    "default_rows",
    "project_out",
]

K = TypeVar("K", bound=Hashable)

_CHUNK = 4096  # rows upcast to float64 at a time in row_cosines (bounds the temporary copy)


def _direction_vector(direction: Array, n: int, what: str) -> Array:
    if direction.ndim != 1 or direction.shape[0] != n:
        raise OpError(
            f"direction must have shape ({n},) to match the {what} of the weight, "
            f"got {tuple(direction.shape)}"
        )
    return direction


def row_cosines(w: Array, direction: Array) -> Array:
    """Return the cosine of each row of ``w`` with ``direction``, in float64.

    ``cos_j = <w_j, d> / (‖w_j‖ ‖d‖)`` for ``w (out, in)``, ``d (in,)`` → ``(out,)``. Computed in
    float64 (row blocks of 4096) so the ranking, and hence the selection, is the same on CPU and
    GPU. A zero row has cosine 0.

    Args:
        w: ``(out, in)`` weight, e.g. a ``gate_proj``.
        direction: ``(in,)`` probe vector (any norm).

    Returns:
        ``(out,)`` float64 cosines in ``[-1, 1]``.

    Raises:
        OpError: on a shape mismatch or an all-zero (or non-finite) probe.

    Reference: https://arxiv.org/abs/2407.08770
    """
    xp = array_namespace(w, direction)
    if w.ndim != 2:
        raise OpError(f"row scores expect a 2-D (out, in) matrix, got shape {tuple(w.shape)}")
    d = _direction_vector(direction, w.shape[1], "input size").astype(xp.float64)
    d_norm = float(xp.linalg.norm(d))
    if not np.isfinite(d_norm) or d_norm == 0.0:
        raise OpError(f"direction must be a finite non-zero vector, got norm {d_norm}")
    out = xp.empty(w.shape[0], dtype=xp.float64)
    for start in range(0, w.shape[0], _CHUNK):
        block = w[start : start + _CHUNK].astype(xp.float64)  # (≤4096, in)
        norms = xp.linalg.norm(block, axis=1)
        dots = block @ d
        # 0/0 for an all-zero row: define its cosine as 0 (it is aligned with nothing).
        out[start : start + _CHUNK] = xp.where(
            norms > 0, dots / (xp.where(norms > 0, norms, 1.0) * d_norm), 0.0
        )
    return xp.clip(out, -1.0, 1.0)


def select_top_rows(
    cosines: Mapping[K, Array],
    rows: int,
    *,
    selection: Literal["most_negative", "most_positive"] = "most_negative",
) -> dict[K, np.ndarray]:
    """Pick the ``rows`` (layer, row) pairs with the best score over all layers.

    The score is ``−cos`` for ``most_negative`` (Model Surgery's released behaviour) and ``cos``
    for ``most_positive``. Ties are broken by layer key, then row index, ascending; the layer keys
    are sorted first, so the result does not depend on the order in which layers were read.

    Args:
        cosines: layer key (int index or module name; keys must be mutually comparable) →
            ``(out_l,)`` cosines from :func:`row_cosines`.
        rows: how many pairs to select, ``1 ≤ rows ≤ Σ out_l``.
        selection: ``most_negative`` or ``most_positive``.

    Returns:
        layer key → ascending ``int64`` row indices (an empty array for layers with none), in
        sorted key order.

    Raises:
        OpError: for a bad ``rows`` or ``selection``, or non-finite cosines.

    Reference: https://arxiv.org/abs/2407.08770
    """
    if selection not in ("most_negative", "most_positive"):
        raise OpError(
            f"selection must be one of 'most_negative', 'most_positive', got {selection!r}"
        )
    keys = sorted(cosines)  # canonical layer order, independent of the mapping's order
    total = sum(int(cosines[k].shape[0]) for k in keys)
    if not 1 <= int(rows) <= total:
        raise OpError(f"rows must be in [1, {total}] (the rows of all layers), got {rows}")
    # The pooled scores are tiny (one float per row), so the ranking runs on the host.
    score = np.concatenate([to_host(cosines[k]).astype(np.float64).ravel() for k in keys])
    if not np.all(np.isfinite(score)):
        raise OpError("cosines must be finite")
    if selection == "most_negative":
        score = -score
    layer = np.concatenate([np.full(cosines[k].shape[0], i) for i, k in enumerate(keys)])
    row = np.concatenate([np.arange(cosines[k].shape[0]) for k in keys])
    # lexsort: last key is primary → score descending, then layer, then row ascending.
    order = np.lexsort((row, layer, -score))[: int(rows)]
    out: dict[K, np.ndarray] = {}
    for i, k in enumerate(keys):
        out[k] = np.sort(row[order[layer[order] == i]]).astype(np.int64)
    return out


def shift_rows(
    w: Array,
    *,
    direction: Array,
    selected: Array,
    alpha: float = 1.0,
) -> Array:
    """Add ``alpha · direction`` to the selected rows of ``w``; other rows are copied bit for bit.

    ``w'[j] = w[j] + alpha · d`` for ``j ∈ selected``, ``w'[j] = w[j]`` otherwise;
    ``w (out, in)``, ``d (in,)`` (the probe as trained, not normalised), ``selected (n,)`` ints.

    Args:
        w: ``(out, in)`` weight.
        direction: ``(in,)`` probe vector.
        selected: row indices from :func:`select_top_rows` (unique, in ``[0, out)``).
        alpha: shift strength (Model Surgery's scripts use 1.08; argparse default 1.0).

    Returns:
        The edited ``(out, in)`` array (a new array; ``w`` is not modified).

    Reference: https://arxiv.org/abs/2407.08770
    """
    xp = array_namespace(w, direction)
    if w.ndim != 2:
        raise OpError(f"probe edit expects a 2-D (out, in) matrix, got shape {tuple(w.shape)}")
    d = _direction_vector(direction, w.shape[1], "input size")
    if not np.isfinite(alpha):
        raise OpError(f"alpha must be finite, got {alpha}")
    idx = np.asarray(to_host(selected)).astype(np.int64).ravel()
    if idx.size and (idx.min() < 0 or idx.max() >= w.shape[0]):
        raise OpError(f"selected rows must be in [0, {w.shape[0]}), got {idx.min()}..{idx.max()}")
    if np.unique(idx).size != idx.size:
        raise OpError("selected rows must be unique")
    out = w.copy()
    # alpha == 0 must be a no-op bit for bit: adding 0.0 would turn -0.0 into +0.0.
    if alpha != 0 and idx.size:
        rows = xp.asarray(idx)
        out[rows] = w[rows] + float(alpha) * d.astype(w.dtype)[None, :]
    return out


def default_rows(hidden: int, total: int) -> int:
    """Model Surgery's row budget generalised: ``4 · hidden`` rows, at most ``total``.

    The released LLaMA-2-7B setting edits ``4096 · 4 = 16384`` of 352,256 ``gate_proj`` rows.
    """
    return max(1, min(4 * int(hidden), int(total)))


def probe_edit(
    w: Array,
    *,
    direction: Array,
    selected: Array | None = None,
    alpha: float = 1.0,
    rows: int = 0,
    selection: Literal["most_negative", "most_positive"] = "most_negative",
    module: str = "mlp.gate_proj",
    probe_row: int = 1,
) -> Array:
    """Shift the rows most anti-aligned with a behaviour probe by ``+alpha·w`` (Model Surgery).

    ``w'[j] = w[j] + alpha · d`` for the selected rows ``j``; ``w (out, in)``, ``d (in,)``.
    ``selected`` (supplied by the verb's read-only pass) holds this tensor's share of the global
    top ``rows`` over all layers by ``−cos`` (``selection``); without it the top ``rows`` of this
    matrix alone are taken (``rows = 0``: ``min(4·in, out)``). ``module`` (which tensors) and
    ``probe_row`` (which row of a ``[classes, hidden]`` probe) are read by ``surgery edit``.

    Args:
        w: ``(out, in)`` weight (a ``gate_proj``: rows live in the hidden space).
        direction: ``(in,)`` probe vector, not normalised.
        selected: row indices to shift, or ``None`` to select within ``w``.
        alpha: shift strength (1.08 in the released scripts; negative flips the sign).
        rows: global number of rows to edit (``0``: 4 × hidden, the released 16384 for 4096).
        selection: ``most_negative`` (released behaviour) or ``most_positive`` cosine.
        module: module suffix of the edited tensors (used by the verb).
        probe_row: class row of a 2-D probe (1 = the toxic class in the released probe).

    Returns:
        The edited ``(out, in)`` array.

    Reference: https://arxiv.org/abs/2407.08770
    """
    if rows < 0:
        raise OpError(f"rows must be >= 0 (0 = 4 x hidden size), got {rows}")
    if selection not in ("most_negative", "most_positive"):
        # Validated here too: with `selected` given, selection is otherwise never looked at.
        raise OpError(f"selection must be most_negative or most_positive, got {selection!r}")
    if selected is None:
        cos = row_cosines(w, direction)
        n = int(rows) or default_rows(w.shape[1], w.shape[0])
        selected = select_top_rows({0: cos}, n, selection=selection)[0]
    return shift_rows(w, direction=direction, selected=selected, alpha=alpha)


def project_out(w: Array, *, direction: Array) -> Array:
    """Remove ``direction`` from the output space of ``w``: ``w' = (I − U Uᵀ) w``.

    ``U`` is an orthonormal basis of the direction(s): ``d (out,)`` gives ``U = d / ‖d‖``; ``D (k,
    out)`` gives ``U`` from a QR of ``Dᵀ`` (rank-deficient rows are dropped). Then ``Uᵀ w' = 0``
    (the layer can no longer write along ``d``) and the edit is idempotent.
    Shapes: ``w (out, in)`` → ``(out, in)``.

    Args:
        w: ``(out, in)`` weight.
        direction: ``(out,)`` or ``(k, out)`` direction(s) in the output space.

    Returns:
        The projected ``(out, in)`` array.

    Reference: https://arxiv.org/abs/2407.08770 (the behaviour probe); the projection is the
    standard orthogonal-complement projector (cf. INLP, https://arxiv.org/abs/2004.07667).
    """
    xp = array_namespace(w, direction)
    if w.ndim != 2:
        raise OpError(f"project_out expects a 2-D (out, in) matrix, got shape {tuple(w.shape)}")
    d = direction[None, :] if direction.ndim == 1 else direction
    if d.ndim != 2 or d.shape[1] != w.shape[0]:
        raise OpError(
            f"direction must have shape ({w.shape[0]},) or (k, {w.shape[0]}) to match the output "
            f"size of the weight, got {tuple(direction.shape)}"
        )
    d = d.astype(xp.float64)
    if not bool(xp.all(xp.isfinite(d))):
        raise OpError("direction must be finite")
    q, r = xp.linalg.qr(d.T)  # (out, k), (k, k)
    diag = xp.abs(xp.diag(r))
    keep = diag > 1e-10 * max(float(diag.max()) if diag.size else 0.0, 1e-300)
    if not bool(keep.any()):
        raise OpError("direction must be non-zero")
    u = q[:, keep]  # (out, k') orthonormal
    w64 = w.astype(xp.float64)
    # Projecting in float64 makes Uᵀw' ≈ 0 to float64 round-off before the cast back.
    return (w64 - u @ (u.T @ w64)).astype(w.dtype)
