"""Plots: singular-value spectra and per-module error / drift maps (extra ``plot``).

matplotlib is imported lazily and figures are drawn on an ``Agg`` canvas without pyplot, so
``import surgery`` never pays for it, the plots work on headless machines, and a notebook's own
backend is left alone. A missing matplotlib is a ``SurgeryError``
telling the user how to install it.

* :func:`plot_spectra` reads what :func:`surgery.api.spectra` / :func:`surgery.api.inspect` return.
* :func:`plot_report` reads the ``tensors`` rows of a ``surgery.json`` (extract errors, port
  drifts, …) and draws one layer × module-type heat map per numeric field.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import SurgeryError

__all__ = [
    "require",
    "plot_spectra",
    "plot_report",
    "report_fields",
    "report_grid",
    "module_type",
    "energy_curve",
]

log = logging.getLogger("surgery")

INSTALL_HINT = "plotting needs matplotlib: pip install 'ckpt-surgery[plot]'"

# The block index in a tensor name (same families as surgery.targets: layers/h/layer/blocks).
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)\.")
# Row fields that are bookkeeping, not per-module figures worth a map.
_SKIP_FIELDS = {
    "seconds", "time", "elapsed", "bytes", "nbytes", "numel", "seed", "shard", "offset",
    "in", "out",  # the module's shape
}  # fmt: skip
# When several numeric fields exist, these come first (drifts and errors are what the maps are
# for; a port manifest has both its drift and, for a full fine-tune input, an extraction error).
# Substrings, first match wins: port → drift, cos_drift_patch, …; extract/decompose → rel_error,
# rank, energy_adapter, max_abs_error.
_PREFERRED = ("drift", "rel_error", "cos", "rank", "energy_adapter", "rel_", "err", "energy")
_MAX_PANELS = 4


class _Mpl:
    """The few matplotlib pieces used here, imported on first use."""

    def __init__(self) -> None:
        try:
            from matplotlib import cm, colormaps, colors
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            raise SurgeryError(INSTALL_HINT) from None
        self.cm, self.colormaps, self.colors = cm, colormaps, colors
        self.Figure, self.Canvas = Figure, FigureCanvasAgg

    def figure(self, nrows: int, ncols: int, figsize: tuple[float, float]) -> tuple[Any, Any]:
        # A bare Figure on an Agg canvas: no pyplot, so no global backend switch (a notebook's
        # inline backend keeps working) and nothing to close (freed with the object).
        fig = self.Figure(figsize=figsize, layout="constrained")
        self.Canvas(fig)
        return fig, fig.subplots(nrows, ncols, squeeze=False)


def require() -> None:
    """Raise the install hint now if matplotlib is missing (the CLI checks before a long run)."""
    _Mpl()


def module_type(name: str) -> tuple[int | None, str]:
    """Split a tensor name into (layer index, module type).

    ``model.layers.3.self_attn.q_proj.weight`` → ``(3, "self_attn.q_proj")``; a name without a
    block index keeps its module name as type and layer ``None`` (``lm_head``).
    """
    module = name[: -len(".weight")] if name.endswith(".weight") else name
    m = _LAYER.search(module + ".")
    if m is None:
        return None, module
    return int(m.group(1)), (module + ".")[m.end() :].rstrip(".") or module


def energy_curve(sigma: Sequence[float]) -> list[float]:
    """Cumulative energy ``Σ_{i≤k} σ_i² / Σ σ²`` for k = 1..n (all zeros for a zero matrix)."""
    sq = [float(s) ** 2 for s in sigma]
    total = sum(sq)
    out, acc = [], 0.0
    for v in sq:
        acc += v
        out.append(acc / total if total > 0 else 0.0)
    return out


def _rank_at(curve: Sequence[float], energy: float) -> int:
    # Smallest k with cumulative energy ≥ threshold (1-based), like ops.lowrank.rank_for_energy.
    for k, e in enumerate(curve, 1):
        if e >= energy - 1e-12:
            return k
    return len(curve)


def _layer_colors(mpl: _Mpl, layers: Sequence[int | None]) -> dict[int | None, Any]:
    known = sorted({li for li in layers if li is not None})
    cmap = mpl.colormaps["viridis"]
    colors: dict[int | None, Any] = {None: "black"}
    for j, li in enumerate(known):
        colors[li] = cmap(j / max(len(known) - 1, 1))
    return colors


def plot_spectra(
    spectra: Mapping[str, Any],
    path: str | Path,
    *,
    energy: float = 0.9,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Plot per-layer singular-value curves and cumulative energy, grouped by module type.

    One column per module type (``self_attn.q_proj``, ``mlp.down_proj``…): on top the normalised
    spectrum ``σ_i / σ_1`` (log scale) of every layer, coloured by depth; below the cumulative
    energy ``Σ_{i≤k} σ_i² / ||W||²_F`` with the effective rank at ``energy`` marked on each curve.

    Args:
        spectra: ``{tensor name: {"sigma": [...], ...}}`` from :func:`surgery.api.spectra`, or
            the whole dict returned by ``inspect(..., spectra_of=...)`` (its ``"spectra"`` entry).
        path: the image to write (format from the suffix; ``.png`` recommended).
        energy: the energy threshold whose rank is marked (``0.9`` → the ``rank90`` of inspect).
        title: figure title (default: the source of an inspect dict, else "singular values").
        dpi: resolution of the written image.

    Returns:
        The path written.

    Raises:
        SurgeryError: matplotlib missing, no spectra, a row without ``sigma``, or a bad ``energy``.
    """
    if "spectra" in spectra and isinstance(spectra.get("spectra"), Mapping):
        src = str(spectra.get("source") or "")
        # A local folder is named by its last component; a Hub id stays "org/name".
        title = title or (Path(src).name if src and Path(src).exists() else src) or None
        spectra = spectra["spectra"]
    if not (0.0 < energy <= 1.0):
        raise SurgeryError(f"plot_spectra: energy must be in (0, 1], got {energy}")
    if not spectra:
        raise SurgeryError(
            "plot_spectra: no spectra to plot; run inspect with --spectra (spectra_of=...) and a "
            "--targets that selects at least one matrix"
        )
    missing = [
        n for n, row in spectra.items() if not isinstance(row, Mapping) or "sigma" not in row
    ]
    if missing:
        raise SurgeryError(
            "plot_spectra: these rows have no 'sigma' list (pass the output of surgery.api.spectra "
            "or inspect(..., spectra_of=...)): " + ", ".join(missing[:5])
        )
    mpl = _Mpl()

    # Group rows by module type, keeping first-seen order (the checkpoint's disk order).
    groups: dict[str, list[tuple[int | None, str, list[float]]]] = {}
    for name, row in spectra.items():
        layer, mtype = module_type(name)
        groups.setdefault(mtype, []).append((layer, name, [float(s) for s in row["sigma"]]))
    colors = _layer_colors(mpl, [li for rows in groups.values() for li, _, _ in rows])

    ncols = len(groups)
    fig, axes = mpl.figure(2, ncols, (max(2.6 * ncols, 4.0), 5.2))
    for j, (mtype, rows) in enumerate(groups.items()):
        ax_s, ax_e = axes[0][j], axes[1][j]
        ranks = []
        for layer, _name, sigma in sorted(rows, key=lambda r: (r[0] is None, r[0] or 0)):
            if not sigma:
                continue
            c = colors[layer]
            top = sigma[0] if sigma[0] > 0 else 1.0
            k = list(range(1, len(sigma) + 1))
            # Normalised by σ_1 so layers of different scale share one axis; floor avoids log(0).
            ax_s.semilogy(k, [max(s / top, 1e-12) for s in sigma], color=c, lw=1)
            curve = energy_curve(sigma)
            ax_e.plot(k, curve, color=c, lw=1)
            r = _rank_at(curve, energy)
            ranks.append(r)
            ax_e.plot([r], [curve[r - 1]], "o", color=c, ms=4)
        ax_s.set_title(mtype, fontsize=9)
        ax_e.axhline(energy, color="gray", ls="--", lw=0.8)
        if ranks:
            # The median effective rank over layers, as a vertical guide.
            med = sorted(ranks)[len(ranks) // 2]
            ax_e.axvline(med, color="red", ls=":", lw=0.8)
            ax_e.text(
                0.97, 0.05, f"r{round(energy * 100)}≈{med}", transform=ax_e.transAxes,
                ha="right", fontsize=8, color="red",
            )  # fmt: skip
        ax_e.set_ylim(0, 1.02)
        ax_e.set_xlabel("k", fontsize=8)
        for ax in (ax_s, ax_e):
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3, lw=0.5)
    axes[0][0].set_ylabel("σ_k / σ_1", fontsize=8)
    axes[1][0].set_ylabel("cumulative energy", fontsize=8)
    known = sorted({li for rows in groups.values() for li, _, _ in rows if li is not None})
    if len(known) > 1:
        sm = mpl.cm.ScalarMappable(
            cmap="viridis", norm=mpl.colors.Normalize(vmin=known[0], vmax=known[-1])
        )
        fig.colorbar(sm, ax=axes[:, -1].tolist(), label="layer", shrink=0.8)
    fig.suptitle(title or "singular values", fontsize=10)
    return _save(fig, path, dpi)


def _save(fig: Any, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    except (OSError, ValueError) as e:
        raise SurgeryError(f"cannot write the plot to {path}: {e}") from None
    log.info("wrote plot %s", path)
    return path


def _load_manifest(src: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(src, Mapping):
        return dict(src)
    p = Path(src)
    if p.is_dir():
        p = p / "surgery.json"
    if not p.is_file():
        raise SurgeryError(
            f"plot_report: {p} not found; pass an output folder of surgery (with surgery.json), "
            "the surgery.json file, or its parsed dict"
        )
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SurgeryError(f"plot_report: {p} is not valid JSON ({e})") from None


def _number(v: Any) -> float | None:
    # surgery.json writes non-finite floats as strings ("nan", "inf"); bools are not figures.
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, str) and v.lower() in {"nan", "inf", "-inf", "infinity", "-infinity"}:
        return float(v)
    return None


def report_fields(manifest: Mapping[str, Any] | str | Path) -> list[str]:
    """The numeric per-tensor fields of a manifest, most interesting first (errors, drifts…)."""
    rows = _load_manifest(manifest).get("tensors") or []
    seen: dict[str, None] = {}
    for row in rows:
        for k, v in row.items():
            if k != "name" and k not in _SKIP_FIELDS and _number(v) is not None:
                seen.setdefault(k)

    def key(f: str) -> tuple[int, bool, int]:
        ranks = [i for i, p in enumerate(_PREFERRED) if p in f.lower()]
        i = ranks[0] if ranks else len(_PREFERRED)
        # An exact name ("drift") before a longer one containing it ("cos_drift_patch").
        return (i, i == len(_PREFERRED) or f.lower() != _PREFERRED[i], list(seen).index(f))

    return sorted(seen, key=key)


def report_grid(
    manifest: Mapping[str, Any] | str | Path, field: str
) -> tuple[list[str], list[str], Any]:
    """Arrange one per-tensor field of a manifest as a layer × module-type grid.

    Returns:
        ``(row labels, column labels, grid)``: rows are the block indices in order plus ``"-"``
        for modules outside the blocks; columns are module types in first-seen order; ``grid`` is
        a float64 numpy array ``(rows, cols)`` with NaN where a module has no finite value.
    """
    import numpy as np

    rows = [r for r in _load_manifest(manifest).get("tensors") or [] if "name" in r]
    cells = [(module_type(r["name"]), r) for r in rows]
    layers = sorted({li for (li, _), _ in cells if li is not None})
    has_other = any(li is None for (li, _), _ in cells)
    ylabels = [str(li) for li in layers] + (["-"] if has_other else [])
    types = list(dict.fromkeys(t for (_, t), _ in cells))
    yi = {li: i for i, li in enumerate(layers)}
    xi = {t: i for i, t in enumerate(types)}
    grid = np.full((len(ylabels), len(types)), np.nan)
    for (li, t), r in cells:
        v = _number(r.get(field))
        if v is not None and math.isfinite(v):
            grid[yi[li] if li is not None else len(layers), xi[t]] = v
    return ylabels, types, grid


def plot_report(
    manifest_or_path: Mapping[str, Any] | str | Path,
    path: str | Path,
    *,
    metric: str | Sequence[str] | None = None,
    title: str | None = None,
    log_scale: bool | None = None,
    dpi: int = 100,
) -> Path:
    """Plot per-module figures of a run as layer × module-type heat maps.

    Reads the ``tensors`` rows of ``surgery.json`` (``{"name": ..., <figure>: <number>, ...}``):
    extract writes per-module reconstruction errors, port writes base drifts and patch cosines.
    Each selected numeric field gets one panel: rows are layers (plus a last row ``-`` for modules
    outside the blocks, e.g. ``lm_head``), columns are module types; missing cells are blank.

    Args:
        manifest_or_path: an output folder, its ``surgery.json`` path, or the parsed dict.
        path: the image to write.
        metric: one field name or several; default: every numeric field (errors and drifts first,
            at most four panels).
        title: figure title (default: ``surgery <verb> <method>``).
        log_scale: colour scale in log10; default: on when a field's positive values span more
            than three decades.
        dpi: resolution of the written image.

    Returns:
        The path written.

    Raises:
        SurgeryError: matplotlib missing, no tensor rows, or an unknown ``metric`` (the error lists
            the fields that exist).
    """
    man = _load_manifest(manifest_or_path)
    rows = [r for r in man.get("tensors") or [] if isinstance(r, Mapping) and "name" in r]
    fields = report_fields(man)
    if not rows or not fields:
        raise SurgeryError(
            "plot_report: the manifest has no per-tensor numeric figures to plot "
            f"({len(rows)} tensor rows; verb {man.get('verb')!r})"
        )
    if metric is None:
        chosen = fields[:_MAX_PANELS]
    else:
        chosen = [metric] if isinstance(metric, str) else list(metric)
        bad = [m for m in chosen if m not in fields]
        if bad:
            raise SurgeryError(
                f"plot_report: unknown metric {', '.join(map(repr, bad))}; this manifest has: "
                + ", ".join(fields)
            )
    mpl = _Mpl()
    import numpy as np

    n = len(chosen)
    ylabels, types, _ = report_grid(man, chosen[0])
    cw = max(0.55 * len(types) + 1.8, 3.2)
    ch = max(0.28 * len(ylabels) + 1.4, 2.4)
    fig, axes = mpl.figure(1, n, (cw * n, ch))
    annotate = len(types) * len(ylabels) <= 80
    for ax, field in zip(axes[0], chosen):
        _, _, grid = report_grid(man, field)
        finite = grid[np.isfinite(grid)]
        pos = finite[finite > 0]
        use_log = log_scale
        if use_log is None:
            use_log = bool(pos.size and finite.min() > 0 and pos.max() / pos.min() > 1e3)
        shown = np.log10(np.where(grid > 0, grid, np.nan)) if use_log else grid
        cmap = mpl.colormaps["magma_r"].with_extremes(bad="#eeeeee")  # blank = no value
        im = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", cmap=cmap, interpolation="none")
        fig.colorbar(im, ax=ax, shrink=0.85, label=f"log10 {field}" if use_log else field)
        if annotate and finite.size:
            for (i, j), v in np.ndenumerate(grid):
                if math.isfinite(v):
                    # Light text on the dark end of the colour map, dark text elsewhere.
                    dark = im.norm(shown[i, j]) > 0.6 if math.isfinite(shown[i, j]) else False
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6,
                            color="white" if dark else "black")  # fmt: skip
        ax.set_xticks(range(len(types)))
        ax.set_xticklabels(types, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(ylabels)))
        ax.set_yticklabels(ylabels, fontsize=7)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_title(field, fontsize=9)
    default = " ".join(str(x) for x in ("surgery", man.get("verb"), man.get("method")) if x)
    fig.suptitle(title or default, fontsize=10)
    return _save(fig, path, dpi)
