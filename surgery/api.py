"""The public verbs. Each opens its inputs, preflights on headers, and runs the streaming loop.

Verbs that live in their own modules (merge, decompose, extract, calibrate, apply, port, convert,
edit, push) are re-exported here so that ``surgery.api`` is the one place to look.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

from .checkpoint import Checkpoint

__all__ = [
    "open_checkpoint", "inspect", "spectra", "format_inspect", "decompose", "extract", "edit",
    "push", "apply", "convert", "merge_adapters", "port", "merge", "plot_report", "plot_spectra",
    "calibrate",
]  # fmt: skip


def open_checkpoint(src: str) -> Checkpoint:
    """Open a checkpoint (path or ``org/name[@revision]``) lazily: headers only."""
    return Checkpoint.open(src)


def _group(name: str) -> str:
    # model.layers.3.mlp.up_proj.weight → model.layers.*.mlp.up_proj.weight
    return re.sub(r"\.\d+\.", ".*.", name)


def spectra(ckpt: Checkpoint, names: list[str], device: str = "cpu") -> dict[str, dict[str, Any]]:
    """Per-matrix singular-value figures: top σ, effective rank at 90/99 % energy, stable rank.

    Loads one matrix at a time; the singular values come from its fp64 Gram matrix
    (:func:`ops.linalg.singular_values`: exact to fp32 precision down to 1e-7·σ₁, 5-9× faster than
    an SVD).
    """
    import numpy as np

    from ops.backend import to_host
    from ops.linalg import singular_values
    from ops.lowrank import rank_for_energy

    from .run import load

    out: dict[str, dict[str, Any]] = {}
    for n in names:
        s = np.asarray(to_host(singular_values(load(ckpt, n, device))), dtype=np.float64)
        fro2 = float((s**2).sum())
        out[n] = {
            "top_sigma": float(s[0]) if s.size else 0.0,
            "rank90": rank_for_energy(s, 0.90) if fro2 else 0,
            "rank99": rank_for_energy(s, 0.99) if fro2 else 0,
            "stable_rank": fro2 / float(s[0]) ** 2 if s.size and s[0] > 0 else 0.0,
            "full_rank": int(min(ckpt.shape(n))),
            "sigma": s.tolist(),
        }
    return out


def inspect(src: str | Checkpoint, *, spectra_of: str | None = None) -> dict[str, Any]:
    """Describe a checkpoint from its headers (and optionally its spectra).

    Args:
        src: a path, a Hub id, or an open :class:`Checkpoint`.
        spectra_of: a ``--targets`` spec; when given, adds per-matrix singular-value figures.

    Returns:
        ``{"source", "num_tensors", "num_params", "num_bytes", "files": [...], "dtypes": {dtype: n},
        "groups": {pattern: {"count", "shape", "dtype", "params"}}, "tensors": [{"name", "shape",
        "dtype", "shard"}], "config": {...}}`` plus ``"spectra"`` when requested.
    """
    ckpt: Any = src
    if not isinstance(src, Checkpoint):
        from .hub import remote_source

        # A Hub id without --spectra: read the headers with range requests, no weight download.
        ckpt = (remote_source(str(src)) if spectra_of is None else None) or Checkpoint.open(src)
    dtypes: dict[str, int] = {}
    groups: OrderedDict[str, dict[str, Any]] = OrderedDict()
    tensors = []
    for n in ckpt.names():
        info = ckpt.info(n)
        dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
        g = groups.setdefault(
            _group(n), {"count": 0, "shape": list(info.shape), "dtype": info.dtype, "params": 0}
        )
        g["count"] += 1
        g["params"] += info.numel
        if list(info.shape) != g["shape"]:
            g["shape"] = "mixed"
        tensors.append(
            {
                "name": n,
                "shape": list(info.shape),
                "dtype": info.dtype,
                "shard": info.file.name,
                "conv1d": ckpt.is_conv1d(n),
            }
        )
    out: dict[str, Any] = {
        "source": str(ckpt.source),
        "revision": ckpt.revision,
        "num_tensors": len(ckpt),
        "num_params": ckpt.num_params,
        "num_bytes": ckpt.nbytes,
        "files": [f.name for f in ckpt.files],
        "dtypes": dtypes,
        "architectures": ckpt.config.get("architectures"),
        "model_type": ckpt.model_type,
        "groups": groups,
        "tensors": tensors,
    }
    if spectra_of is not None:
        from .targets import select

        names = select(ckpt, spectra_of)
        out["spectra"] = spectra(ckpt, names)
    return out


def format_inspect(info: dict[str, Any]) -> str:
    """Human-readable summary of :func:`inspect`'s result."""

    def size(b: float) -> str:
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if b < 1024 or unit == "TiB":
                return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
            b /= 1024
        return ""

    lines = [
        f"{info['source']}" + (f" @ {info['revision'][:12]}" if info.get("revision") else ""),
        f"  architecture: {', '.join(info.get('architectures') or ['?'])} "
        f"(model_type {info.get('model_type') or '?'})",
        f"  tensors: {info['num_tensors']}   parameters: {info['num_params']:,}   "
        f"size: {size(info['num_bytes'])}",
        f"  files: {len(info['files'])} ({', '.join(info['files'][:3])}"
        + (", …" if len(info["files"]) > 3 else "")
        + ")",
        "  dtypes: " + ", ".join(f"{k}×{v}" for k, v in sorted(info["dtypes"].items())),
        "",
        f"  {'tensor group':<56} {'count':>5}  {'shape':<16} {'dtype':<6} {'params':>14}",
    ]
    for pat, g in info["groups"].items():
        shape = "mixed" if g["shape"] == "mixed" else "×".join(map(str, g["shape"])) or "scalar"
        lines.append(f"  {pat:<56} {g['count']:>5}  {shape:<16} {g['dtype']:<6} {g['params']:>14,}")
    if "spectra" in info:
        lines += [
            "",
            f"  {'matrix':<56} {'top σ':>9} {'r90':>5} {'r99':>5} {'stable':>7} {'full':>5}",
        ]
        for n, s in info["spectra"].items():
            lines.append(
                f"  {n:<56} {s['top_sigma']:>9.4g} {s['rank90']:>5} {s['rank99']:>5} "
                f"{s['stable_rank']:>7.2f} {s['full_rank']:>5}"
            )
    return "\n".join(lines)


from .calibrate import calibrate  # noqa: E402, F401  (extra: calib; transformers loaded lazily)
from .decompose import decompose, extract  # noqa: E402, F401  (PiSSA/CorDA/KaSA, LoRA extraction)
from .edit import edit  # noqa: E402, F401  (re-export: probe edit, project_out)
from .hub import push  # noqa: E402, F401  (re-export: upload a folder to the Hub)
from .lifecycle import apply, convert, merge_adapters, port  # noqa: E402, F401  (adapters)
from .merge import merge  # noqa: E402, F401  (re-export: task arithmetic, TIES, DARE, PCB)
from .plot import plot_report, plot_spectra  # noqa: E402, F401  (matplotlib loaded lazily)
