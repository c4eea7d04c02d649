"""``surgery edit``: behaviour-probe weight editing (Model Surgery) and direction projection.

``probe`` (the default) follows Model Surgery's released code, generalised beyond LLaMA-2-7B's
hard-coded 32 layers × 11008 rows:

1. a read-only pass streams every candidate tensor (``-p module=mlp.gate_proj``, one at a time) and
   keeps only the cosine of each row with the probe (one float per row, never the weights);
2. the global top ``rows`` ``(layer, row)`` pairs by ``−cos`` are chosen over all layers at once;
3. the write pass shifts each chosen row by ``+alpha·w`` (the probe as trained, not normalised) in
   fp32 and casts back to the stored dtype; tensors with no chosen row are copied byte for byte.

The candidates are the tensors ``-p module`` matches (a suffix list or regex, ``--targets``
syntax), restricted by ``--targets``, ``--exclude`` and ``--layers`` when given. A negative
``alpha`` flips the shift (the spec's ``sign``).

``project_out`` removes the probe direction from the output space of ``--targets`` (modules that
write into the probe's space, e.g. ``o_proj,down_proj``).

The probe file is a safetensors file holding ``probe`` (``[hidden]`` or ``[classes, hidden]``,
row picked by ``-p probe_row``, default 1 = the toxic class of the released probe); a converted
official probe with ``mlp.weight`` is accepted too.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ops.edit import default_rows

from .checkpoint import PICKLE_SUFFIXES, Checkpoint
from .errors import SurgeryError
from .manifest import Manifest
from .methods import get, parse_params
from .run import (
    Plan,
    RunOptions,
    TensorResult,
    call,
    execute,
    load,
    map_tasks,
    out_dtype_name,
    resolve_device,
    store,
    widen,
)
from .targets import layer_of, matcher, module_of, select

__all__ = ["edit", "read_probe"]

log = logging.getLogger("surgery")
PROBE_KEYS = ("probe", "mlp.weight")  # ours; the released probe's state-dict key, converted


def read_probe(path: str | Path, probe_row: int | None = 1):
    """Read the probe vector ``[hidden]`` (fp32 numpy) from a safetensors file (no torch import).

    Args:
        path: a ``.safetensors`` file with a tensor ``probe`` (or ``mlp.weight``).
        probe_row: the row to take when the tensor is ``[classes, hidden]``; ``None`` keeps
            every row (``project_out`` then removes their span).

    Returns:
        ``(vector [hidden] or matrix [k, hidden], info)`` with
        ``info = {"file", "key", "shape", "row", "norm"}``.

    Raises:
        SurgeryError: missing or pickle file, no probe tensor, bad shape or row, zero/non-finite.
    """
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise SurgeryError(
            f"probe {p} is a pickle file; surgery never loads pickle files. Save the vector with "
            "safetensors.torch.save_file({'probe': w}, 'probe.safetensors')"
        )
    if not p.is_file():
        raise SurgeryError(f"probe file {p} does not exist; pass --probe PROBE.safetensors")
    try:
        f = Checkpoint.open(p)  # the header is validated against the file size
    except SurgeryError as e:
        raise SurgeryError(f"cannot read probe file {p} as safetensors ({e})") from None
    keys = f.names()
    key = next((k for k in PROBE_KEYS if k in keys), None)
    if key is None:
        raise SurgeryError(
            f"probe file {p} has no tensor 'probe' (found: {', '.join(keys) or 'none'}); "
            "save the vector [hidden] or matrix [classes, hidden] under the key 'probe'"
        )
    if not f.info(key).computable:
        raise SurgeryError(f"probe {p}:{key} is {f.dtype(key)}; a float vector is required")
    t = widen(f.array(key), f.dtype(key))  # fp32 numpy (a probe file has no config: no Conv1D)
    shape = list(t.shape)
    if t.ndim == 2 and probe_row is None:
        vec = t
    elif t.ndim == 2:
        if not -t.shape[0] <= probe_row < t.shape[0]:
            raise SurgeryError(
                f"probe_row {probe_row} is out of range for probe {p}:{key} of shape {shape}; "
                f"use -p probe_row=0..{t.shape[0] - 1}"
            )
        vec = t[probe_row]
    elif t.ndim == 1:
        vec = t
    else:
        raise SurgeryError(
            f"probe {p}:{key} has shape {shape}; expected [hidden] or [classes, hidden]"
        )
    norm = float(np.linalg.norm(vec.astype(np.float64).ravel()))
    if not np.isfinite(norm) or norm == 0.0:
        raise SurgeryError(f"probe {p}:{key} has norm {norm}; a finite non-zero vector is required")
    row = probe_row if t.ndim == 2 else None
    info = {"file": str(p), "key": key, "shape": shape, "row": row}
    info["norm"] = norm
    return np.ascontiguousarray(vec), info


def _cosine_task(ckpt: Checkpoint, vec, device: str, name: str) -> TensorResult:
    """Read-only pass: the cosine of every row of one tensor with the probe (float64, host)."""
    from ops.backend import to_host
    from ops.edit import row_cosines

    w = load(ckpt, name, device)  # (out, in) fp32
    cos = call(row_cosines, name, ckpt.shape(name), w, widen(vec, "F32", device))
    return TensorResult(name, report={"cos": to_host(cos)})


def _edit_task(
    ckpt: Checkpoint,
    fn,
    vec,
    params: dict[str, Any],
    selected: dict[str, np.ndarray] | None,
    device: str,
    dtype: str | None,
    name: str,
) -> TensorResult:
    """Write pass: edit one tensor in fp32, cast back to the output dtype."""
    from ops.backend import array_namespace

    w = load(ckpt, name, device)
    d = widen(vec, "F32", device)
    kw = dict(params)
    report: dict[str, Any] = {}
    if selected is not None:  # probe: this tensor's share of the global selection
        kw["selected"] = selected[name]
        report["rows_edited"] = int(selected[name].size)
    out = call(fn, name, ckpt.shape(name), w, direction=d, **kw)
    xp = array_namespace(out)
    report["delta_norm"] = float(xp.linalg.norm((out - w).astype(xp.float64)))
    tensor = store(ckpt, name, out, out_dtype_name(dtype, ckpt.dtype(name)))
    return TensorResult(name, tensor=tensor, report=report)


def _layer_key(name: str) -> tuple[int, str]:
    # Sort by the numeric layer index (layers.10 after layers.9), then by name.
    layer = layer_of(name)
    return (-1 if layer is None else layer, name)


def _preflight(ckpt: Checkpoint, names: list[str], vec, out_dim: bool) -> None:
    """Every candidate must be a float matrix whose rows (probe) or columns (project_out) match."""
    problems = []
    n = int(vec.shape[-1])
    for name in names:
        info = ckpt.info(name)
        shape = ckpt.shape(name)
        if not info.computable:
            problems.append(f"{name} {list(shape)} is {info.dtype}; exclude it (--exclude)")
            continue
        size = shape[0] if out_dim else shape[1]
        if size != n:
            side = "output size" if out_dim else "input size (row length)"
            problems.append(f"{name} {list(shape)}: {side} {size} != probe size {n}")
    if problems:
        more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise SurgeryError(
            "the probe does not fit the edited weights (it must come from the same model family "
            "and hidden space):\n  " + "\n  ".join(problems[:20]) + more
        )


def _candidates(ckpt: Checkpoint, module: str, opts: RunOptions) -> list[str]:
    names = select(ckpt, module, opts.exclude, opts.layers, require=False)
    if opts.targets:
        keep = matcher(opts.targets)
        names = [n for n in names if keep(module_of(n))]
    if not names:
        examples = sorted({module_of(n).split(".", 3)[-1] for n in select(ckpt, "all-linear")})
        raise SurgeryError(
            f"-p module={module!r} matches no 2-D weight in {ckpt.source} (with --targets, "
            f"--exclude, --layers); GPT-2/OPT have no gate_proj: pick the MLP input projection. "
            f"modules here: {', '.join(examples[:12])}"
        )
    return names


def _stats(x: np.ndarray) -> dict[str, float]:
    return {"min": float(x.min()), "max": float(x.max()), "mean": float(x.mean()),
            "std": float(x.std())}  # fmt: skip


def edit(
    src: str,
    *,
    method: str = "probe",
    probe: str | Path | None = None,
    params: dict[str, Any] | list[str] | None = None,
    **options: Any,
) -> Path | Plan:
    """Edit a checkpoint's weights with a behaviour probe and write the edited model.

    Args:
        src: checkpoint folder, file or Hub id.
        method: ``probe`` (Model Surgery row shift) or ``project_out``.
        probe: safetensors file with the probe (``probe``: ``[hidden]`` or ``[classes, hidden]``).
        params: ``-p`` values: ``alpha``, ``rows``, ``module``, ``selection``, ``probe_row``.
        **options: :class:`~surgery.run.RunOptions` (``out``, ``force``, ``dry_run``, ``device``…).

    Returns:
        The output folder (or the :class:`~surgery.run.Plan` for ``dry_run``). ``surgery.json``
        lists the edited ``(layer, row)`` pairs and the cosine statistics.

    Raises:
        SurgeryError: bad method/params/probe, a probe that does not fit the weights.
    """
    opts = RunOptions.of(options)
    m = get(method, "edit")
    p = parse_params(m, params)
    if probe is None:
        raise SurgeryError(f"edit -m {m.name} needs --probe PROBE.safetensors")
    ckpt = Checkpoint.open(src)
    # project_out takes every row of a [classes, hidden] probe (their span); probe one row.
    vec, pinfo = read_probe(probe, int(p["probe_row"]) if "probe_row" in p else None)
    if m.name == "probe":
        if not np.isfinite(p["alpha"]):
            raise SurgeryError(f"probe: alpha must be finite, got {p['alpha']}")
        names = _candidates(ckpt, p["module"], opts)
        _preflight(ckpt, names, vec, out_dim=False)
    else:
        if not opts.targets:
            raise SurgeryError(
                "edit -m project_out needs --targets: the modules that write into the probe's "
                "space, e.g. --targets o_proj,down_proj"
            )
        names = select(ckpt, opts.targets, opts.exclude, opts.layers)
        _preflight(ckpt, names, vec, out_dim=True)
    total = sum(ckpt.shape(n)[0] for n in names)
    n_rows = 0
    if m.name == "probe":
        n_rows = int(p["rows"]) or default_rows(int(vec.shape[0]), total)
        if not 1 <= n_rows <= total:
            raise SurgeryError(
                f"probe: rows must be in [1, {total}] (the rows of the {len(names)} "
                f"{p['module']} tensors), got {p['rows']}; use -p rows=N"
            )
    device = resolve_device(opts.device)
    man = Manifest("edit", method=m.name, method_reference=m.reference, params=p,
                   seed=opts.seed, device=device)  # fmt: skip
    man.add_input("src", ckpt)
    man.dtypes = {"compute": "float32", "scores": "float64",
                  "output": opts.dtype or "stored"}  # fmt: skip
    summary: dict[str, Any] = {"probe": pinfo, "candidates": len(names)}

    selected: dict[str, np.ndarray] | None = None
    compute = names
    if m.name == "probe" and not opts.dry_run:
        # Read-only reduce pass: one tensor at a time, keep one float64 per row.
        cos: dict[tuple[int, str], np.ndarray] = {}
        for res in map_tasks(
            functools.partial(_cosine_task, ckpt, vec, device),
            names,
            executor=opts.executor,
            workers=opts.workers,
            ray_address=opts.ray_address,
        ):
            cos[_layer_key(res.name)] = res.report["cos"]
        from ops.edit import select_top_rows

        sel = call(select_top_rows, "all layers", (total,), cos, n_rows, selection=p["selection"])
        selected = {key[1]: idx for key, idx in sel.items()}
        compute = [n for n in names if selected[n].size]  # untouched tensors copy through
        summary.update(_probe_summary(cos, sel, n_rows, p["selection"]))
    elif m.name == "probe":
        summary["rows"] = n_rows
    man.summary.update(summary)
    task = functools.partial(_edit_task, ckpt, m.fn, vec, p, selected, device, opts.dtype)
    job = opts.job(
        "edit",
        man,
        compute,
        task,
        template=ckpt,
        out_dtypes={n: out_dtype_name(opts.dtype, ckpt.dtype(n)) for n in compute},
        plan_lines=[
            f"method: {m.name}; probe {pinfo['file']} (norm {pinfo['norm']:.4g})",
            (
                f"read-only pass over {len(names)} tensors, then edit {n_rows} of {total} rows"
                if m.name == "probe"
                else f"project the probe direction out of {len(names)} tensors"
            ),
        ],
    )
    return execute(job, opts.progress)


def _probe_summary(
    cos: dict[tuple[int, str], np.ndarray], sel: dict, n_rows: int, selection: str
) -> dict[str, Any]:
    """The manifest's record of a probe edit: the (layer, row) list and cosine statistics."""
    keys = sorted(cos)
    all_cos = np.concatenate([cos[k] for k in keys])
    chosen = np.concatenate([cos[k][sel[k]] for k in keys])
    edited = [[k[0] if k[0] >= 0 else k[1], int(j)] for k in keys for j in sel[k]]
    # The cosine at the selection boundary: the least extreme selected score.
    threshold = float(chosen.max() if selection == "most_negative" else chosen.min())
    return {
        "rows": n_rows,
        "selection": selection,
        "threshold_cos": threshold,
        "cos_all": _stats(all_cos),
        "cos_selected": _stats(chosen),
        "rows_per_tensor": {k[1]: int(sel[k].size) for k in keys},
        "edited": edited,
    }
