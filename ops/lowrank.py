"""``LowRank``: the common language of extract, init, compress, port, apply and adapters."""

from __future__ import annotations

from dataclasses import dataclass

from .backend import Array, OpError, array_namespace

__all__ = ["LowRank", "split_factors", "rank_for_energy"]


@dataclass(frozen=True)
class LowRank:
    """A low-rank update ``scale · B @ A`` in PEFT orientation.

    Attributes:
        A: ``(r, in)`` — PEFT ``lora_A.weight``.
        B: ``(out, r)`` — PEFT ``lora_B.weight``.
        scale: ``lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA).
    """

    A: Array
    B: Array
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> Array:
        """Return ``scale · B @ A`` with shape ``(out, in)``."""
        return (self.B @ self.A) * self.scale


def split_factors(u: Array, s: Array, vh: Array, scale: float = 1.0) -> LowRank:
    """Split singular triplets into PEFT factors: ``A = √(s/scale)·vh``, ``B = u·√(s/scale)``.

    ``scale · B @ A == u @ diag(s) @ vh`` exactly (PEFT's PiSSA/CorDA convention).

    Args:
        u: ``(out, r)``; s: ``(r,)``; vh: ``(r, in)``.
        scale: the adapter's ``lora_alpha / r``.
    """
    xp = array_namespace(u, s, vh)
    if scale <= 0:
        raise OpError(f"scale must be > 0, got {scale}")
    root = xp.sqrt(xp.maximum(s, 0) / scale)
    return LowRank(A=root[:, None] * vh, B=u * root[None, :], scale=float(scale))


def rank_for_energy(s: Array, energy: float) -> int:
    """Smallest ``k`` with ``Σ_{i<k} σ_i² ≥ energy · Σ σ²`` (PEFT's float-rank rule).

    Args:
        s: ``(k,)`` singular values, descending.
        energy: fraction in ``(0, 1]``.

    Returns:
        The rank (0 when every σ is 0).
    """
    xp = array_namespace(s)
    if not 0 < energy <= 1:
        raise OpError(f"energy must be in (0, 1], got {energy}")
    e = s.astype(xp.float64) ** 2
    total = float(e.sum())
    if total == 0:
        return 0
    cum = xp.cumsum(e) / total
    # searchsorted(cum, e, side="left") as a count: cupy < 14 takes no scalar ``v``.
    k = int(xp.count_nonzero(cum < energy - 1e-12)) + 1
    return min(k, int(s.shape[0]))
