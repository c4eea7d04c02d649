"""``surgery decompose`` and ``surgery extract``: SVD splits of weights into PEFT LoRA adapters.

* :func:`decompose` (PiSSA, CorDA, KaSA, or any registered ``decompose`` method): every targeted
  weight ``W`` becomes ``residual + scale·B@A``. The residual model goes to ``OUT`` (same names,
  stored dtype), the adapter to ``OUT/adapter``; ``PeftModel.from_pretrained(residual_model, OUT,
  subfolder="adapter")`` reproduces the original model (PiSSA, CorDA) or the truncated one (KaSA).
  The adapter is written with ``init_lora_weights: true`` (never ``"pissa"``/``"corda"``, which
  make PEFT decompose again on load) and with no ``base_model_name_or_path``: it belongs to the
  residual beside it, not to the original model.
* :func:`extract`: a PEFT adapter of ``TUNED − BASE`` per targeted module (``lora_alpha = r`` per
  module, so scale 1, as mergekit does), with one of: a fixed rank (``-r``), a per-module energy
  threshold (``--energy``: one full SVD per module), or a global budget of ranks or parameters
  shared optimally across modules (``--budget``: a read-only pass computes every module's
  spectrum, :func:`ops.decompose.allocate_ranks` splits the budget, then the extraction pass).

Bad input (ranks above ``min(out, in)``, CorDA without stats, stats of the wrong shape, targets
that match nothing, non-float targets, mismatched BASE/TUNED shapes, bad parameter values) is
reported as one :class:`SurgeryError` listing every problem before anything is computed or
written.

Memory: the serial loop holds one module at a time: ``W`` (and, for extract, both inputs and the
delta) in fp32 plus the kernel's SVD factors and residual, about ``6 × 4 × out × in`` bytes
(CorDA adds ``2 × 8 × in²``), whatever the model size; the adapter factors of all modules
(``r·(out + in)`` floats each) are kept until the end.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .checkpoint import Checkpoint
from .errors import SurgeryError
from .manifest import Manifest
from .methods import Method, get, parse_params
from .run import (
    Plan,
    RunOptions,
    TensorResult,
    call,
    execute,
    load,
    map_tasks,
    narrow,
    out_dtype_name,
    resolve_device,
    widen,
)
from .targets import is_embedding, module_of, select

__all__ = ["decompose", "extract"]

log = logging.getLogger("surgery")
MAX_LINES = 20  # problems listed in one preflight error
N_DROPPED = 8  # dropped singular values listed per module when they are known
# Methods whose residual + adapter deliberately differs from W (the report lists what was dropped).
_TRUNCATING = frozenset({"kasa"})


# --------------------------------------------------------------------------- shared helpers


def _fail(problems: list[str], head: str) -> None:
    """Raise one SurgeryError listing up to MAX_LINES problems (the rest counted)."""
    if not problems:
        return
    lines = problems[:MAX_LINES]
    if len(problems) > MAX_LINES:
        lines.append(f"… and {len(problems) - MAX_LINES} more")
    raise SurgeryError(f"{head}:\n  " + "\n  ".join(lines))


def _select(ckpt: Checkpoint, opts: RunOptions, problems: list[str], **kw: Any) -> list[str]:
    """``select`` with its 'matches nothing' error collected into ``problems`` instead of raised."""
    try:
        return select(ckpt, opts.targets, opts.exclude, opts.layers, **kw)
    except SurgeryError as e:
        problems.append(str(e))
        return []


def _host_lowrank(lr):
    """Adapter factors as host float32 (what the adapter file stores)."""
    from ops.backend import to_host
    from ops.lowrank import LowRank

    a = np.ascontiguousarray(to_host(lr.A), dtype=np.float32)
    b = np.ascontiguousarray(to_host(lr.B), dtype=np.float32)
    return LowRank(A=a, B=b, scale=float(lr.scale))


def _needs(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def _svd_mode(fn, params: dict[str, Any], shape: tuple[int, int], r: int) -> str:
    """Which SVD a kernel ran for this module: ``exact`` or ``randomized(p=10,q=N)``."""
    from ops.linalg import use_randomized

    niter = params.get("niter")
    if niter is None or not _needs(fn, "niter") or params.get("mode") == "kpm":
        return "exact"
    if niter == -1:
        return "randomized(p=10,q=4)" if use_randomized(tuple(shape), r) else "exact"
    return "exact" if niter == 0 else f"randomized(p=10,q={niter})"


def _check_values(m: Method, params: dict[str, Any], extra: dict[str, Any]) -> list[str]:
    """Validate parameter values by calling the kernel once on a tiny input (before any I/O)."""
    from ops.backend import OpError

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    kw = dict(extra)
    if _needs(m.fn, "cov"):
        kw["cov"] = np.eye(8, dtype=np.float32)
    try:
        m.fn(w, rank=1, rng=rng, **kw, **params)
    except OpError as e:
        return [f"{m.name}: {e}"]
    return []


def _summary(manifest: Manifest) -> None:
    """Model-level figures from the per-module reports: ranks, parameters, global error/energy."""
    rows = [t for t in manifest.tensors if t.get("rank")]
    measured = [t for t in manifest.tensors if "norm" in t]  # rank-0 budget modules count too
    norm2 = sum(t["norm"] ** 2 for t in measured)
    drop2 = sum(t["energy_dropped"] * t["norm"] ** 2 for t in measured)
    kept2 = sum(t["energy_adapter"] * t["norm"] ** 2 for t in measured)
    manifest.summary.update(
        modules=len(rows),
        modules_skipped=len(manifest.tensors) - len(rows),
        total_rank=sum(t["rank"] for t in rows),
        adapter_params=sum(t["rank"] * (t["out"] + t["in"]) for t in rows),
        rel_error=math.sqrt(drop2 / norm2) if norm2 else 0.0,
        energy_adapter=kept2 / norm2 if norm2 else 0.0,
        max_rel_error=max((t["rel_error"] for t in rows), default=0.0),
    )


def _write_adapter(
    lowranks: dict,
    folder: Path,
    manifest: Manifest,
    *,
    ckpt: Checkpoint,
    base_for_config: Checkpoint | None,
    embeddings: set[str],
) -> None:
    """``finish_adapter`` for both verbs: summary figures, then the PEFT adapter files."""
    from .adapter import Adapter, task_type_for

    _summary(manifest)
    if not lowranks:
        raise SurgeryError(
            "nothing to write: every targeted module came out rank 0 (the models are equal "
            "there, or the budget/energy is too small)"
        )
    conv = any(ckpt.is_conv1d(f"{m}.weight") for m in lowranks if m not in embeddings)
    config = {"task_type": task_type_for(ckpt.config), "fan_in_fan_out": conv}
    ad = Adapter(modules=lowranks, config=config, embeddings=set(embeddings) & set(lowranks))
    ad.save(folder, base=base_for_config)


# --------------------------------------------------------------------------- decompose


def _decomposed_by(ckpt: Checkpoint) -> str | None:
    """The method of the ``surgery decompose`` run that wrote ``ckpt``, if its surgery.json says."""
    import json

    f = ckpt.root / "surgery.json" if ckpt.root.is_dir() else None
    if f is None or not f.is_file():
        return None
    try:
        man = json.loads(f.read_text())
    except ValueError:
        return None
    return man.get("method") if man.get("verb") == "decompose" else None


_STATS_CACHE: dict[str, Any] = {}


def _stats(path: str):
    """Open a stats file once per process (tasks run in workers too)."""
    from .stats import Stats

    if path not in _STATS_CACHE:
        _STATS_CACHE[path] = Stats.open(path)
    return _STATS_CACHE[path]


def _decompose_task(
    ckpt: Checkpoint,
    fn,
    params: dict[str, Any],
    rank: int,
    scale: float,
    stats_path: str | None,
    seed: int,
    device: str,
    dtype: str | None,
    name: str,
) -> TensorResult:
    """One module: ``W → (residual, LowRank)``; report measured on the residual as stored."""
    from ops.backend import host_rng
    from ops.decompose import report

    w = load(ckpt, name, device)  # (out, in) fp32
    kw: dict[str, Any] = {}
    if stats_path is not None and _needs(fn, "cov"):
        # float64 on the way in: CorDA damps and solves in float64.
        kw["cov"] = widen(_stats(stats_path).cov_array(module_of(name)), "F64", device, "float64")
    residual, lr = call(
        fn, name, ckpt.shape(name), w, rank=rank, rng=host_rng(seed, name), scale=scale,
        **kw, **params,
    )  # fmt: skip
    out_dt = out_dtype_name(dtype, ckpt.dtype(name))
    t = narrow(residual, out_dt)  # (out, in) in the output dtype, on the host
    # Errors are those of the stored residual (bf16 rounding included), not of the fp32 one.
    truncating = getattr(fn, "__name__", "") in _TRUNCATING
    rep = report(
        w, widen(t, out_dt, device), lr, dropped_values=min(rank, N_DROPPED) if truncating else 0
    )
    out_f, in_f = ckpt.shape(name)
    rep.update(out=out_f, svd=_svd_mode(fn, params, (out_f, in_f), rank), **{"in": in_f})
    return TensorResult(name, tensor=ckpt.to_stored(name, t), lowrank=_host_lowrank(lr), report=rep)


def decompose(
    src: str,
    *,
    method: str,
    rank: int,
    alpha: float | None = None,
    params: dict[str, Any] | list[str] | None = None,
    stats: str | Path | None = None,
    calib: str | Path | None = None,
    calib_options: dict[str, Any] | None = None,
    **options: Any,
) -> Path | Plan:
    """Split every targeted weight into a residual model and a PEFT adapter (PiSSA/CorDA/KaSA).

    Args:
        src: checkpoint folder, file or Hub id.
        method: a ``decompose`` method: ``pissa``, ``corda``, ``kasa`` (``surgery methods``).
        rank: adapter rank r (at most ``min(out, in)`` of every targeted module).
        alpha: ``lora_alpha`` (default r, i.e. adapter scale 1).
        params: method parameters, ``["niter=4"]`` or a dict.
        stats: a stats safetensors file with ``<module>.cov`` (CorDA).
        calib: a JSONL calibration file; the stats are computed (and cached) with
            :func:`surgery.calibrate.calibrate` when ``stats`` is not given, and kept beside the
            output as ``OUT.stats.safetensors``.
        calib_options: :func:`surgery.calibrate.calibrate` options for ``calib`` (``samples``,
            ``seq_len``, ``batch_size``, ``max_tokens``, ``cov_norm``, ``cov_dtype``,
            ``max_memory``, ``tokenizer``, ``config``, ``no_cache``, ``progress``); targets,
            layers and device follow the run options.
        **options: the shared run options (``out``, ``force``, ``dry_run``, ``targets``,
            ``exclude``, ``layers``, ``device``, ``dtype``, ``seed``, ``shard_size``,
            ``executor``, ``workers``, ``ray_address``, ``push``, ``progress``).

    Returns:
        The output folder (model in ``OUT``, adapter in ``OUT/adapter``) or the dry-run plan.

    Raises:
        SurgeryError: every bad input at once, before anything is computed or written.
    """
    opts = RunOptions.of(options)
    m = get(method, "decompose")
    if m.name == "svd_extract":
        raise SurgeryError(
            "svd_extract factors a task vector; use `surgery extract BASE TUNED -r R -o OUT`"
        )
    p = parse_params(m, params)
    problems: list[str] = []
    if not isinstance(rank, int) or rank < 1:
        problems.append(f"--rank must be a positive integer, got {rank!r}")
        rank = 1
    scale = 1.0 if alpha is None else float(alpha) / rank
    if not (math.isfinite(scale) and scale > 0):
        problems.append(f"--alpha must be > 0, got {alpha!r}")
        scale = 1.0
    problems += _check_values(m, p, {"scale": scale})
    ckpt = Checkpoint.open(src)
    names = _select(ckpt, opts, problems)
    for n in names:
        if not ckpt.info(n).computable:
            problems.append(
                f"{n} {list(ckpt.shape(n))} is {ckpt.dtype(n)}; surgery computes only on "
                "F16/BF16/F32/F64 weights; exclude it with --exclude or dequantize first"
            )
        elif rank > min(ckpt.shape(n)):
            problems.append(
                f"rank {rank} exceeds min(out, in) = {min(ckpt.shape(n))} for {n} "
                f"{list(ckpt.shape(n))}; use --rank ≤ {min(ckpt.shape(n))} or --exclude it"
            )
    if m.name in _TRUNCATING and _decomposed_by(ckpt) == m.name:
        # A second KaSA pass would drop r more components of an already truncated base.
        problems.append(
            f"{src} is already a {m.name} residual (its surgery.json says so); decompose the "
            "original model instead, or `surgery convert` the adapter"
        )
    stats_path: str | None = None
    if _needs(m.fn, "cov"):
        if stats is None and calib is None:
            problems.append(
                f"{m.name} needs the input covariance of every targeted module: pass --stats "
                "FILE (from `surgery calibrate SRC --calib data.jsonl -o FILE`) or --calib "
                "data.jsonl"
            )
        elif stats is not None:
            from .stats import Stats

            try:
                st = Stats.open(stats)
            except SurgeryError as e:
                problems.append(str(e))
            else:
                problems += st.check(ckpt, [module_of(n) for n in names])
                stats_path = str(st.path)
    elif stats is not None or calib is not None:
        log.warning("%s does not use calibration statistics; --stats/--calib ignored", m.name)
    _fail(problems, f"cannot decompose {src} with {m.name} (nothing was written)")
    calib_lines: list[str] = []
    if stats_path is None and calib is not None and _needs(m.fn, "cov"):
        from .calibrate import calibrate_beside

        # OUT.stats.safetensors beside the output (outside OUT, so the output stays atomic and
        # the covariances are never pushed); a dry run returns the calibration plan only.
        found, calib_lines = calibrate_beside(
            src, calib, opts.out, method=m.name, dry_run=opts.dry_run, targets=opts.targets,
            exclude=opts.exclude, layers=opts.layers, device=opts.device,
            **(calib_options or {}),
        )  # fmt: skip
        if found is not None:
            stats_path = str(found)
            from .stats import Stats

            _fail(Stats.open(stats_path).check(ckpt, [module_of(n) for n in names]),
                  f"cannot decompose {src}: the calibration stats do not fit")  # fmt: skip

    device = resolve_device(opts.device)
    kw_manifest = dict(p, rank=rank, lora_alpha=alpha if alpha is not None else rank)
    man = Manifest("decompose", method=m.name, method_reference=m.reference, params=kw_manifest,
                   seed=opts.seed, device=device)  # fmt: skip
    man.add_input("src", ckpt)
    man.dtypes = {"compute": "float32", "output": opts.dtype or "stored", "adapter": "float32"}
    if stats_path is not None:  # name and fingerprint only: no local paths in a pushed folder
        st = _stats(stats_path)
        man.summary["stats"] = {"file": Path(stats_path).name, "fingerprint": st.fingerprint}
    task = functools.partial(
        _decompose_task, ckpt, m.fn, p, rank, scale, stats_path, opts.seed, device, opts.dtype
    )
    finish = functools.partial(_write_adapter, ckpt=ckpt, base_for_config=None, embeddings=set())
    job = opts.job(
        "decompose", man, names, task,
        template=ckpt,
        out_dtypes={n: out_dtype_name(opts.dtype, ckpt.dtype(n)) for n in names},
        finish_adapter=finish,
        adapter_subdir="adapter",
        mem_per_tensor=lambda n: 6 * 4 * ckpt.info(n).numel
        + (16 * ckpt.shape(n)[1] ** 2 if stats_path else 0),
        plan_lines=[f"method: {m.name} {p}", f"rank {rank}, lora_alpha "
                    f"{alpha if alpha is not None else rank}", "adapter: OUT/adapter",
                    *calib_lines],
    )  # fmt: skip
    return execute(job, opts.progress)


# --------------------------------------------------------------------------- extract


def _delta(base: Checkpoint, tuned: Checkpoint, name: str, device: str):
    """``W_tuned − W_base`` as an fp32 xp array ``(out, in)``; one input in memory at a time."""
    d = load(tuned, name, device)
    d -= load(base, name, device)
    return d


def _spectrum_task(base: Checkpoint, tuned: Checkpoint, device: str, name: str) -> TensorResult:
    """Read-only pass for ``--budget``: the singular values of one module's task vector."""
    from ops.backend import to_host
    from ops.linalg import singular_values

    s = to_host(singular_values(_delta(base, tuned, name, device)))
    return TensorResult(name, report={"sigma": s})


def _extract_task(
    base: Checkpoint,
    tuned: Checkpoint,
    fn,
    params: dict[str, Any],
    ranks: dict[str, int] | None,
    rank: int | None,
    energy: float | None,
    bounds: tuple[int, int | None],
    spectra: dict[str, np.ndarray] | None,
    seed: int,
    device: str,
    name: str,
) -> TensorResult:
    """One module: ``Δ = W_tuned − W_base`` → best rank-r factors (rank from -r/energy/budget)."""
    from ops.backend import array_namespace, host_rng, to_host
    from ops.decompose import ranks_for_energy, report
    from ops.linalg import singular_values, svd_topk
    from ops.lowrank import split_factors

    d = _delta(base, tuned, name, device)  # (out, in)
    xp = array_namespace(d)
    out_f, in_f = base.shape(name)
    head = {"out": out_f, "in": in_f}
    if not bool(xp.any(d)):
        return TensorResult(name, report={**head, "rank": 0, "unchanged": True})
    sigma = None
    if energy is not None:
        # The spectrum (fp64 Gram eigenvalues) picks the rank; the exact top-r gives the factors.
        sigma = to_host(singular_values(d))
        r = ranks_for_energy([sigma], energy, min_rank=bounds[0], max_rank=bounds[1])[0]
        u, s, vh = svd_topk(d, r, niter=0)
        lr = split_factors(u, s, vh, 1.0)
    else:
        r = ranks[name] if ranks is not None else int(rank)
        if r == 0:  # the budget gave this module nothing: all of Δ is dropped
            norm = float(xp.linalg.norm(d))
            rep0 = {**head, "rank": 0, "unchanged": False, "norm": norm, "energy_adapter": 0.0,
                    "energy_dropped": 1.0, "rel_error": 1.0}  # fmt: skip
            return TensorResult(name, report=rep0)
        _, lr = call(fn, name, (out_f, in_f), d, rank=r, rng=host_rng(seed, name), scale=1.0,
                     **params)  # fmt: skip
        sigma = spectra.get(name) if spectra is not None else None
    rep = report(d, None, lr)
    rep.update(head, svd="exact" if energy is not None else _svd_mode(fn, params, (out_f, in_f), r))
    if sigma is not None:
        rep["sigma_dropped"] = [float(f"{v:.6g}") for v in sigma[r : r + N_DROPPED]]
    return TensorResult(name, lowrank=_host_lowrank(lr), report=rep)


def extract(
    base: str,
    tuned: str,
    *,
    rank: int | None = None,
    energy: float | None = None,
    budget: int | None = None,
    budget_unit: Literal["rank", "params"] = "rank",
    normalize: bool = False,
    min_rank: int = 0,
    max_rank: int | None = None,
    include_embeddings: bool = False,
    params: dict[str, Any] | list[str] | None = None,
    **options: Any,
) -> Path | Plan:
    """Extract a PEFT LoRA adapter of ``TUNED − BASE`` (truncated SVD per targeted module).

    Exactly one of ``rank``, ``energy``, ``budget``. Factors follow mergekit's
    ``distribute_scale`` (``A = √S·Vh``, ``B = U·√S``) with ``lora_alpha = r`` per module; modules
    whose rank differs from the common one go to ``rank_pattern``/``alpha_pattern``. The SVD is
    randomized by default when r is small against the module (``-p niter=0`` forces the exact SVD;
    see :func:`ops.decompose.svd_extract` for the error bound). Modules that did not change are
    skipped.

    Args:
        base: the base checkpoint.
        tuned: the fine-tuned checkpoint (same names and shapes on the targets).
        rank: a fixed rank for every module.
        energy: per-module rank: the smallest keeping this fraction of ``‖Δ‖²_F`` (full SVD).
        budget: a global budget of ranks (``budget_unit="rank"``) or adapter parameters
            (``"params"``, a rank-1 component of an ``(out, in)`` module costs ``out + in``).
        budget_unit: ``rank`` or ``params``.
        normalize: share the budget by relative instead of absolute error (so a large-norm
            module such as ``lm_head`` does not take it all).
        min_rank: budget/energy: least rank per changed module.
        max_rank: budget/energy: largest rank per module.
        include_embeddings: also extract embeddings (``lora_embedding_A/B``) and the output head.
        params: ``svd_extract`` parameters (``niter``).
        **options: the shared run options (``out``, ``force``, ``dry_run``, ``targets``, …).

    Returns:
        The adapter folder, or the dry-run plan.

    Raises:
        SurgeryError: every bad input at once, before anything is computed or written.
    """
    from ops.backend import OpError

    opts = RunOptions.of(options)
    m = get("svd_extract", "decompose")
    p = parse_params(m, params)
    problems: list[str] = []
    modes = [x for x, v in (("-r", rank), ("--energy", energy), ("--budget", budget))
             if v is not None]  # fmt: skip
    if len(modes) != 1:
        problems.append(
            "give exactly one of -r RANK, --energy E or --budget N"
            + (f" (got {', '.join(modes)})" if modes else "")
        )
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        problems.append(f"-r must be a positive integer, got {rank!r}")
    if energy is not None and not 0 < energy <= 1:
        problems.append(f"--energy must be in (0, 1], got {energy}")
    if budget is not None and (not isinstance(budget, int) or budget < 1):
        problems.append(f"--budget must be a positive integer, got {budget!r}")
    if budget_unit not in ("rank", "params"):
        problems.append(f"--budget-unit must be rank or params, got {budget_unit!r}")
    if min_rank < 0 or (max_rank is not None and max_rank < max(min_rank, 1)):
        problems.append(f"need 0 ≤ --min-rank ≤ --max-rank, got {min_rank} and {max_rank}")
    problems += _check_values(m, p, {})
    base_ckpt = Checkpoint.open(base)
    tuned_ckpt = Checkpoint.open(tuned)
    names = _select(base_ckpt, opts, problems, include_embeddings=include_embeddings)
    for n in names:
        shape = list(base_ckpt.shape(n))
        if n not in tuned_ckpt:
            problems.append(f"{n} {shape}: missing from {tuned}")
            continue
        for c, who in ((base_ckpt, base), (tuned_ckpt, tuned)):
            if not c.info(n).computable:
                problems.append(
                    f"{n} {list(c.shape(n))} is {c.dtype(n)} in {who}; surgery computes only on "
                    "F16/BF16/F32/F64 weights; exclude it with --exclude or dequantize first"
                )
        if tuple(tuned_ckpt.shape(n)) != tuple(base_ckpt.shape(n)):
            hint = " (vocabulary changed?)" if is_embedding(module_of(n)) else ""
            problems.append(
                f"{n}: shape {shape} in {base} but {list(tuned_ckpt.shape(n))} in {tuned}"
                f"{hint}; exclude it with --exclude"
            )
        elif rank is not None and isinstance(rank, int) and rank > min(shape):
            problems.append(
                f"rank {rank} exceeds min(out, in) = {min(shape)} for {n} {shape}; use "
                f"-r ≤ {min(shape)}, --energy, or --exclude it"
            )
    _fail(problems, f"cannot extract {tuned} − {base} (nothing was written)")

    device = resolve_device(opts.device)
    params_m: dict[str, Any] = dict(p, rank=rank, energy=energy, budget=budget)
    if budget is not None:
        params_m.update(budget_unit=budget_unit, normalize=normalize)
    if budget is not None or energy is not None:
        params_m.update(min_rank=min_rank, max_rank=max_rank)
    man = Manifest("extract", method="svd_extract", method_reference=m.reference,
                   params=params_m, seed=opts.seed, device=device)  # fmt: skip
    man.add_input("base", base_ckpt)
    man.add_input("tuned", tuned_ckpt)
    man.dtypes = {"compute": "float32", "adapter": "float32"}
    ranks = spectra = None
    if budget is not None and not opts.dry_run:
        # Read-only pass: every module's spectrum, then the optimal split of the budget.
        from ops.decompose import allocate_ranks

        spectra = {}
        spec_task = functools.partial(_spectrum_task, base_ckpt, tuned_ckpt, device)
        for res in map_tasks(spec_task, names, executor=opts.executor, workers=opts.workers,
                             ray_address=opts.ray_address, device=device):  # fmt: skip
            spectra[res.name] = res.report["sigma"]
        costs = [sum(base_ckpt.shape(n)) for n in names]
        try:
            alloc = allocate_ranks([spectra[n] for n in names], budget, unit=budget_unit,
                                   costs=costs, normalize=normalize, min_rank=min_rank,
                                   max_rank=max_rank)  # fmt: skip
        except OpError as e:
            raise SurgeryError(f"--budget {budget}: {e}") from None
        ranks = dict(zip(names, alloc))
        man.summary["budget_used"] = int(sum(r * (c if budget_unit == "params" else 1)
                                             for r, c in zip(alloc, costs)))  # fmt: skip
    embeds = {module_of(n) for n in names if is_embedding(module_of(n))}
    task = functools.partial(
        _extract_task, base_ckpt, tuned_ckpt, m.fn, p, ranks, rank, energy,
        (min_rank, max_rank), spectra, opts.seed, device,
    )  # fmt: skip
    finish = functools.partial(
        _write_adapter, ckpt=base_ckpt, base_for_config=base_ckpt, embeddings=embeds
    )
    mode = modes[0] if modes else "-r"
    job = opts.job(
        "extract", man, names, task,
        template=None,
        finish_adapter=finish,
        mem_per_tensor=lambda n: 6 * 4 * base_ckpt.info(n).numel,
        plan_lines=[f"mode: {mode} {rank if rank is not None else energy or budget}",
                    f"modules: {len(names)}"]
        + (["--budget: a read-only pass computes every module's spectrum first"]
           if budget is not None else []),
    )  # fmt: skip
    return execute(job, opts.progress)
