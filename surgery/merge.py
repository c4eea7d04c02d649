"""``surgery merge``: task arithmetic, TIES, DARE and PCB merges of fine-tunes of one base.

Every floating-point tensor is merged (as mergekit and the official PCB code do): per tensor,
``deltas[i] = θ_i − θ_0`` in fp32 → the kernel (``ops.merge``) → ``θ_0 + δ`` cast to the base's
dtype (or ``--dtype``). Non-float tensors are copied from the base; tensors no model changed are
copied byte for byte. Inputs are checked on their headers first (same names, shapes and dtypes in
every model), and every mismatch is reported in one error before anything is computed or written.

PCB with ``scope=model`` (the default, the official whole-model semantics) first streams the task
vectors read-only to compute its per-task order statistics exactly (``ops.merge.pcb_reduce``:
histogram refinement on the float bits, never a concatenated model), then runs the write pass.

A mergekit YAML (``--config``) is mapped onto the same arguments: ``merge_method``, ``base_model``,
``models[].model`` / ``models[].parameters`` (``weight``; ``density`` when all models agree), the
global ``parameters`` (``density``, ``lambda``, ``normalize``, ``rescale``; ``int8_mask`` is a
memory option and is ignored) and ``dtype`` / ``out_dtype``. mergekit's defaults apply to what the
YAML leaves out (``density`` 1.0, ``rescale`` true for DARE), so a config means what it means there.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import COMPUTABLE_DTYPES, Checkpoint
from .errors import SurgeryError
from .manifest import Manifest
from .methods import get, parse_pairs, parse_params
from .run import (
    Plan,
    Progress,
    RunOptions,
    TensorResult,
    call,
    execute,
    load,
    out_dtype_name,
    resolve_device,
    store,
)
from .targets import layer_of, matcher, module_of, parse_layers, select

__all__ = ["merge", "read_mergekit_config", "merge_targets"]

log = logging.getLogger("surgery")
MAX_LINES = 20  # mismatch lines listed in one preflight error

# mergekit's defaults for what a YAML leaves out (merge_methods/registry.py, 0.1.5).
_MERGEKIT_DEFAULTS: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"lambda": 1.0, "normalize": False},
    "ties": {"density": 1.0, "lambda": 1.0, "normalize": True},
    "dare_linear": {"density": 1.0, "lambda": 1.0, "normalize": False, "rescale": "l1"},
    "dare_ties": {"density": 1.0, "lambda": 1.0, "normalize": False, "rescale": "l1"},
    "pcb": {},
}
_IGNORED_KEYS = {"int8_mask"}  # mergekit options with no numeric effect


# --------------------------------------------------------------------------- mergekit YAML


def read_mergekit_config(path: str | Path) -> dict[str, Any]:
    """Map a mergekit YAML onto :func:`merge`'s arguments.

    Args:
        path: the YAML file (``mergekit-yaml CONFIG OUT``'s ``CONFIG``).

    Returns:
        ``{"models", "base", "method", "weights", "params", "dtype"}``.

    Raises:
        SurgeryError: unreadable YAML, an unsupported method or key, gradients or filtered
            parameter lists, per-model densities that differ; every problem in one message.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SurgeryError(f"--config {p} does not exist")
    try:
        cfg = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SurgeryError(f"--config {p}: invalid YAML ({e})") from None
    if not isinstance(cfg, dict):
        raise SurgeryError(f"--config {p}: expected a mapping with merge_method and models")
    problems: list[str] = []
    method = cfg.get("merge_method")
    supported = sorted(_MERGEKIT_DEFAULTS)
    if method is None:
        problems.append("merge_method is missing")
    elif method not in _MERGEKIT_DEFAULTS:
        problems.append(
            f"merge_method {method!r} is not supported; choices: {', '.join(supported)}"
        )
    for key in ("slices", "modules"):
        if key in cfg:
            problems.append(f"{key}: is not supported; list whole models under models:")
    for key in ("tokenizer", "tokenizer_source", "chat_template"):
        if key in cfg and cfg[key] not in (None, "base"):
            problems.append(f"{key}: {cfg[key]!r} is not supported; the base's tokenizer is copied")
    base = cfg.get("base_model")
    if isinstance(base, dict):
        base = base.get("model")
    if base is not None and "+" in str(base):
        problems.append(f"base_model {base!r}: model+lora references are not supported")

    def scalar(where: str, key: str, value: Any) -> Any:
        if isinstance(value, list | dict):
            problems.append(
                f"{where} {key}: gradients and filtered lists are not supported; give one value"
            )
            return None
        return value

    defaults = dict(_MERGEKIT_DEFAULTS.get(method, {}))
    params: dict[str, Any] = {}
    for key, value in (cfg.get("parameters") or {}).items():
        if key not in _IGNORED_KEYS:
            params[key] = scalar("parameters:", key, value)
    models: list[str] = []
    weights: list[float] = []
    densities: dict[str, Any] = {}
    for i, entry in enumerate(cfg.get("models") or []):
        if isinstance(entry, str):
            entry = {"model": entry}
        name = entry.get("model") if isinstance(entry, dict) else None
        if isinstance(name, dict):
            name = name.get("model")
        if not name:
            problems.append(f"models[{i}]: no model given")
            continue
        if "+" in str(name):
            problems.append(f"models[{i}] {name!r}: model+lora references are not supported")
        if base is not None and str(name) == str(base):
            continue  # mergekit lists the base among the models; it has no task vector
        mp = dict(entry.get("parameters") or {})
        models.append(str(name))
        weights.append(float(scalar(f"models[{i}]", "weight", mp.pop("weight", 1.0)) or 0.0))
        if "density" in mp:
            densities[str(name)] = scalar(f"models[{i}]", "density", mp.pop("density"))
        for key in sorted(set(mp) - _IGNORED_KEYS):
            problems.append(f"models[{i}] {name}: per-model parameter {key!r} is not supported")
    if not models:
        problems.append("models: no model to merge (list the fine-tunes under models:)")
    if densities:
        values = set(densities.values())
        if len(values) > 1 or len(densities) != len(models):
            listing = ", ".join(f"{m}={densities.get(m, 'unset')}" for m in models)
            problems.append(
                f"per-model densities differ ({listing}); surgery uses one density for all models"
            )
        else:
            params.setdefault("density", values.pop())
    if problems:
        raise SurgeryError(f"--config {p}: " + "; ".join(problems))
    for key, value in defaults.items():
        params.setdefault(key, value)
    if method in ("dare_linear", "dare_ties") and isinstance(params.get("rescale"), bool):
        params["rescale"] = "l1" if params["rescale"] else "none"
    elif "rescale" in params and method not in ("dare_linear", "dare_ties"):
        if params.pop("rescale"):
            raise SurgeryError(f"--config {p}: rescale: true is only supported for DARE methods")
    dtype = cfg.get("out_dtype") or cfg.get("dtype")
    return {
        "models": models,
        "base": None if base is None else str(base),
        "method": method,
        "weights": weights,
        "params": params,
        "dtype": dtype,
    }


# --------------------------------------------------------------------------- selection, preflight


def merge_targets(
    base: Checkpoint,
    targets: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    layers: str | list[int] | None = None,
) -> list[str]:
    """The tensors a merge computes: every floating-point tensor unless restricted.

    ``--targets`` uses the usual module selection (2-D weights); ``--exclude`` and ``--layers``
    alone filter the full float set.
    """
    if targets is not None:
        names = select(base, targets, exclude, layers)
        return [n for n in names if base.dtype(n) in COMPUTABLE_DTYPES]
    skip = matcher(exclude) if exclude else (lambda m: False)
    layer_set = parse_layers(layers)
    out = []
    for n in base.names():
        if base.dtype(n) not in COMPUTABLE_DTYPES or skip(module_of(n)):
            continue
        if layer_set is not None and layer_of(n) not in layer_set:
            continue
        out.append(n)
    return out


def _preflight(base: Checkpoint, models: list[Checkpoint], sources: list[str]) -> None:
    """Check names, shapes and dtypes of every model against the base; one error for all."""
    problems: list[str] = []
    ref = {n: base.info(n) for n in base.names()}
    for src, m in zip(sources, models):
        names = set(m.names())
        missing = [n for n in base.names() if n not in names]
        extra = [n for n in m.names() if n not in ref]
        for n in missing:
            problems.append(f"{src}: missing {n} {list(ref[n].shape)} (present in the base)")
        for n in extra:
            problems.append(f"{src}: extra tensor {n} {list(m.info(n).shape)} (not in the base)")
        for n in base.names():
            if n not in names:
                continue
            a, b = ref[n], m.info(n)
            if tuple(a.shape) != tuple(b.shape):
                problems.append(f"{src}: {n} has shape {list(b.shape)}, the base {list(a.shape)}")
            elif a.dtype != b.dtype:
                problems.append(f"{src}: {n} is {b.dtype}, the base {a.dtype}")
    if problems:
        more = len(problems) - MAX_LINES
        lines = problems[:MAX_LINES] + ([f"... and {more} more"] if more > 0 else [])
        raise SurgeryError(
            f"the models do not match the base ({len(problems)} problem(s)); merge needs "
            "fine-tunes of one base with the same tensor names, shapes and dtypes:\n  "
            + "\n  ".join(lines)
        )


# --------------------------------------------------------------------------- per-tensor work


def _deltas(base: Checkpoint, models: Sequence[Checkpoint], name: str, device: str):
    """``(θ_0 fp32 (*shape), τ fp32 (k, *shape))`` for one tensor, one model loaded at a time."""
    from ops.backend import array_namespace

    b = load(base, name, device)
    xp = array_namespace(b)
    deltas = xp.empty((len(models), *b.shape), dtype=b.dtype)
    for i, m in enumerate(models):
        xp.subtract(load(m, name, device), b, out=deltas[i])
    return b, deltas


def _merge_task(
    base: Checkpoint,
    models: Sequence[Checkpoint],
    fn,
    params: dict[str, Any],
    weights: Sequence[float],
    seed: int,
    device: str,
    dtype: str | None,
    name: str,
) -> TensorResult:
    """Write pass for one tensor: ``θ_0 + fn(τ, w)`` in fp32, cast to the output dtype."""
    from ops.backend import array_namespace, host_rng

    b, deltas = _deltas(base, models, name, device)
    xp = array_namespace(b)
    out_dt = out_dtype_name(dtype, base.dtype(name))
    if not bool(xp.any(deltas)):
        # No model changed this tensor: the base's bytes (every method maps τ = 0 to δ = 0).
        return TensorResult(name, tensor=store(base, name, b, out_dt), report={"action": "same"})
    del b  # reloaded below: keeps the peak at k + 1 fp32 copies while the kernel runs
    rng = [host_rng(seed, name, i) for i in range(len(models))]
    w = xp.asarray(np.asarray(weights, dtype=np.float32))
    delta = call(fn, name, base.shape(name), deltas, w, rng=rng, **params)
    del deltas
    delta += load(base, name, device)  # θ = θ_0 + δ, in place
    return TensorResult(name, tensor=store(base, name, delta, out_dt), report={"action": "merged"})


def _stream(
    base: Checkpoint,
    models: Sequence[Checkpoint],
    names: list[str],
    device: str,
    progress: Progress | None = None,
):
    """A re-iterable stream of ``(k, *shape)`` task vectors, one tensor at a time.

    Each full iteration is one read-only pass; ``progress(i, len(names), "pass p: name")`` reports
    it (a new bar per pass in the CLI). On the CPU the next tensor's task vectors are read in a
    background thread while the consumer works on the current one (file reads and numpy drop the
    GIL): the order, hence every statistic, is unchanged, and the memory is two tensors' ``k``
    task vectors, still below the write pass's ``2k + 5`` fp32 copies.
    """
    passes = [0]

    def chunks() -> Iterator:
        from concurrent.futures import ThreadPoolExecutor

        from ops.backend import release_memory

        passes[0] += 1
        task_vectors = lambda n: _deltas(base, models, n, device)[1]  # noqa: E731
        if device != "cpu" or len(names) < 2:
            pool = None
        else:
            pool = ThreadPoolExecutor(1, thread_name_prefix="surgery-prefetch")
        try:
            nxt = pool.submit(task_vectors, names[0]) if pool else None
            for i, n in enumerate(names):
                d = nxt.result() if nxt is not None else task_vectors(n)
                nxt = (
                    pool.submit(task_vectors, names[i + 1]) if pool and i + 1 < len(names) else None
                )
                if progress is not None:
                    progress(i + 1, len(names), f"pass {passes[0]}: {n}")
                yield d
                del d
                release_memory()
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    return chunks


# --------------------------------------------------------------------------- the verb


def merge(
    models: Sequence[str] | None = None,
    *,
    base: str | None = None,
    method: str | None = None,
    weights: Sequence[float] | None = None,
    params: dict[str, Any] | list[str] | None = None,
    config: str | Path | None = None,
    **options: Any,
) -> Path | Plan:
    """Merge fine-tunes of one base with task arithmetic, TIES, DARE or PCB.

    Args:
        models: the fine-tuned checkpoints (paths or Hub ids).
        base: the base checkpoint the task vectors are taken from (required).
        method: ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties`` or ``pcb``.
        weights: one weight per model (default 1 each).
        params: method parameters, ``["density=0.2"]`` or a dict (``lambda`` for ``lambda_``).
        config: a mergekit YAML giving the models, base, method, weights, params and dtype
            (explicit ``params`` override its values).
        **options: the shared run options (``out``, ``force``, ``dry_run``, ``targets``,
            ``exclude``, ``layers``, ``device``, ``dtype``, ``seed``, ``shard_size``, ``executor``,
            ``workers``, ``ray_address``, ``push``, ``progress``).

    Returns:
        The output folder, or the :class:`~surgery.run.Plan` for ``dry_run``.

    Raises:
        SurgeryError: bad arguments, unknown method or parameter, mismatched inputs (all listed).
    """
    models = list(models or [])
    # Adapter inputs (PEFT folders of one base): a delta-space merge re-factored to rank -r.
    from .lifecycle import is_adapter, merge_adapters

    rank = options.pop("rank", None)
    n_adapters = sum(is_adapter(x) for x in models)
    if models and n_adapters == len(models):
        return merge_adapters(models, method=method, base=base, weights=weights, params=params,
                              rank=rank, **options)  # fmt: skip
    if n_adapters or rank is not None:
        raise SurgeryError(
            "mix of adapters and full models (or -r with full models): merge "
            "either PEFT adapters of one base, or full fine-tunes with --base"
        )
    if config is not None:
        if models or method:
            raise SurgeryError(
                "--config gives the models and the method; drop the MODEL arguments and --method"
            )
        cfg = read_mergekit_config(config)
        models, method = cfg["models"], cfg["method"]
        base = base or cfg["base"]
        weights = list(weights) if weights else cfg["weights"]
        params = {**cfg["params"], **parse_pairs(params)}  # -p overrides the YAML
        if options.get("dtype") is None and cfg["dtype"]:
            options["dtype"] = cfg["dtype"]
    opts = RunOptions.of(options)
    if not method:
        raise SurgeryError("a merge method is required: --method ties (or --config FILE.yaml)")
    m = get(method, "merge")
    p = parse_params(m, params)
    problems = []
    if not models:
        problems.append("no models to merge; pass the fine-tuned checkpoints as MODEL arguments")
    if base is None:
        problems.append(f"--base is required for {m.name} (task vectors are model − base)")
    w = [1.0] * len(models) if not weights else [float(x) for x in weights]
    if len(w) != len(models):
        problems.append(f"got {len(w)} weight(s) for {len(models)} model(s); give one -w per model")
    problems += _check_params(m, p, len(models))
    if problems:
        raise SurgeryError("; ".join(problems))
    base_ckpt = Checkpoint.open(base)
    ckpts = [Checkpoint.open(x) for x in models]
    _preflight(base_ckpt, ckpts, [str(x) for x in models])
    names = merge_targets(base_ckpt, opts.targets, opts.exclude, opts.layers)
    if not names:
        raise SurgeryError(f"{base}: no floating-point tensor to merge")
    device = resolve_device(opts.device)

    man = Manifest(
        "merge", method=m.name, method_reference=m.reference, params=p, seed=opts.seed,
        device=device,
    )  # fmt: skip
    man.add_input("base", base_ckpt)
    for i, c in enumerate(ckpts):
        man.add_input(f"model{i}", c)
    man.summary["weights"] = w
    man.dtypes = {"compute": "float32", "output": opts.dtype or "stored"}
    k = len(ckpts)
    plan_lines = [
        f"method: {m.name} {p}",
        f"base: {base}",
        *[f"model {i}: {x} (weight {wi})" for i, (x, wi) in enumerate(zip(models, w))],
    ]
    kernel_params = dict(p)
    if m.name == "pcb" and p.get("scope") == "model":
        plan_lines.append("pcb scope=model: read-only passes for whole-model order statistics")
        if not opts.dry_run:
            kernel_params["stats"] = _pcb_stats(
                base_ckpt, ckpts, names, device, p, man, opts.progress
            )
    task = functools.partial(
        _merge_task, base_ckpt, ckpts, m.fn, kernel_params, w, opts.seed, device, opts.dtype
    )
    job = opts.job(
        "merge", man, names, task,
        template=base_ckpt,
        out_dtypes={n: out_dtype_name(opts.dtype, base_ckpt.dtype(n)) for n in names},
        mem_per_tensor=lambda n: (2 * k + 5) * 4 * base_ckpt.info(n).numel,
        plan_lines=plan_lines,
    )  # fmt: skip
    return execute(job, opts.progress)


def _check_params(m, params: dict[str, Any], k: int) -> list[str]:
    """Validate parameter values by calling the kernel on a one-entry input (before any I/O)."""
    from ops.backend import OpError

    try:
        m.fn(np.zeros((max(k, 1), 1), np.float32), np.ones(max(k, 1), np.float32), **params)
    except OpError as e:
        return [f"{m.name}: {e}"]
    return []


def _pcb_stats(base, ckpts, names, device, p: dict[str, Any], man: Manifest, progress=None):
    """PCB scope=model: the whole-model statistics over every merged tensor (read-only passes)."""
    import time

    from ops.backend import OpError
    from ops.merge import pcb_reduce

    t0 = time.perf_counter()
    try:
        stats = pcb_reduce(
            _stream(base, ckpts, names, device, progress), density=p["density"], clip=p["clip"]
        )
    except OpError as e:
        raise SurgeryError(f"pcb: {e}") from None
    seconds = round(time.perf_counter() - t0, 3)
    log.info("pcb: whole-model statistics over %d tensors in %.1f s", len(names), seconds)
    man.summary["pcb_stats"] = {
        "lo": stats.lo.tolist(), "hi": stats.hi.tolist(), "thr": stats.thr.tolist(),
        "top": stats.top.tolist(), "tensors": len(names), "seconds": seconds,
    }  # fmt: skip
    return stats
