"""Pure array kernels (numpy or cupy). No files, tensor names, torch dtypes or CLI here.

Importing ``ops`` never imports cupy.
"""

from __future__ import annotations

from .backend import OpError, array_namespace, host_rng, scipy_namespace
from .linalg import randomized_svd, svd, svd_topk
from .lowrank import LowRank, rank_for_energy, split_factors

__all__ = [
    "LowRank",
    "OpError",
    "array_namespace",
    "host_rng",
    "randomized_svd",
    "rank_for_energy",
    "scipy_namespace",
    "split_factors",
    "svd",
    "svd_topk",
]
