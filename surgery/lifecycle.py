"""The adapter lifecycle: apply, port (PortLLM), convert for serving, and adapter merges.

* :func:`apply` folds a PEFT adapter into its base: ``W' = W + ΔW`` per adapted module in fp32
  (``Adapter.merge_weight``: rsLoRA, patterns, ``fan_in_fan_out``, KaSA ``lora_diag`` with PEFT's
  base truncation, AdaLoRA ``lora_E``, embeddings, DoRA), cast to the stored dtype; every other
  tensor is copied byte for byte. Equal to PEFT's ``merge_and_unload`` in fp32.
* :func:`port` carries a LoRA patch ``ΔW = s·B A`` learned on an old base to a new one (PortLLM,
  ALGORITHMS.md §4): the same factors re-targeted (``base_model_name_or_path``), or ``--merge``d:
  ``W_new + ΔW``. With ``--from OLD`` it reports the drift of every module. A full fine-tuned
  checkpoint is accepted too (the patch ``θ_ft − θ_old`` is extracted at ``-r``/``--energy``).
  Adapters whose meaning depends on the old weights (DoRA, KaSA, residual inits) are refused.
* :func:`convert` turns a residual-init adapter (PiSSA/CorDA, given its initial adapter) into a
  plain LoRA on the original base with the rank-2r identity ``A' = [A; A₀]``, ``B' = [B, −B₀]``;
  folds KaSA's diagonal (and, given ``--base``, the truncated tail) and AdaLoRA's ``E``; and writes
  the servable profile of ECOSYSTEM.md §3.4.
* :func:`merge_adapters` merges adapters of one base per module in delta space with any merge
  kernel and re-factors each result to rank ``-r`` (``surgery merge`` hands adapter inputs here).

Memory: one module's ``(k, out, in)`` deltas (adapter merge) or one weight plus its update (apply,
port) at a time; adapters themselves are small and held whole.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ops.lowrank import LowRank

from .adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    Adapter,
    _np32,
    find_adapter_dir,
    is_hub_id,
    resolve_weight,
)
from .checkpoint import COMPUTABLE_DTYPES, Checkpoint
from .errors import SurgeryError
from .manifest import Manifest, hub_id_of
from .run import (
    Plan,
    RunOptions,
    TensorResult,
    execute,
    load,
    narrow,
    out_dtype_name,
    resolve_device,
    store,
)
from .targets import is_embedding, is_head, module_of, select

__all__ = [
    "apply",
    "port",
    "convert",
    "merge_adapters",
    "is_adapter",
    "servable_problems",
    "drift_table",
    "VLLM_RANKS",
]

log = logging.getLogger("surgery")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's max_lora_rank choices
# Leaf names the serving engines map onto their LoRA layers (HF names; vLLM/SGLang fuse q/k/v).
SERVABLE_LEAVES = frozenset({
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
    "gate_up_proj", "embed_tokens", "lm_head", "c_attn", "c_proj", "c_fc", "query_key_value",
    "dense", "dense_h_to_4h", "dense_4h_to_h", "fc1", "fc2", "out_proj", "w1", "w2", "w3", "wq",
    "wk", "wv", "wo", "query", "key", "value", "Wqkv",
})  # fmt: skip
MAX_LINES = 20


# -- shared helpers -------------------------------------------------------------------------------
def is_adapter(path: str | Path) -> bool:
    """True when ``path`` is a PEFT adapter folder (or its ``adapter_model.*`` file)."""
    p = Path(path)
    if p.is_file():
        return p.name.startswith("adapter_model.")
    return (p / ADAPTER_CONFIG).is_file()


def _fail(problems: list[str], head: str) -> None:
    if not problems:
        return
    more = len(problems) - MAX_LINES
    lines = problems[:MAX_LINES] + ([f"... and {more} more"] if more > 0 else [])
    raise SurgeryError(f"{head} ({len(problems)} problem(s)):\n  - " + "\n  - ".join(lines))


def _adapter_record(role: str, ad: Adapter) -> dict[str, Any]:
    """A manifest ``inputs`` entry for an adapter (digest of its safetensors header)."""
    h = hashlib.sha256()
    if ad.path is not None:
        with open(ad.path / ADAPTER_WEIGHTS, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            h.update(f.read(n))
        h.update((ad.path / ADAPTER_CONFIG).read_bytes())
    name = ad.config.get("base_model_name_or_path")
    return {
        "role": role,
        "source": str(ad.path),
        "hub_id": name if is_hub_id(name) else None,
        "revision": ad.config.get("revision"),
        "header_digest": h.hexdigest(),
        "flavour": ad.flavour,
    }


def _decompose_origin(ad: Adapter) -> dict[str, Any] | None:
    """The ``surgery.json`` of a ``surgery decompose`` run that produced this adapter, if any."""
    if ad.path is None:
        return None
    for folder in (ad.path, ad.path.parent):
        f = folder / "surgery.json"
        if f.is_file():
            try:
                man = json.loads(f.read_text())
            except ValueError:
                continue
            if man.get("verb") == "decompose":
                return man
    return None


def _base_dependence(ad: Adapter) -> str | None:
    """Why an adapter's update depends on the weights of the base it was made for, or ``None``."""
    fl = ad.flavour
    if fl == "dora":
        return ("it is a DoRA adapter: its magnitude vector renormalises W + ΔW row by row, so "
                "the update depends on W")  # fmt: skip
    if fl == "kasa":
        return ("it is a KaSA adapter: PEFT truncates the base's r smallest singular components "
                "at load, which differ between bases")  # fmt: skip
    if fl == "residual":
        return (f"init_lora_weights={ad.config.get('init_lora_weights')!r}: PEFT re-decomposes "
                "the base at load (a residual init)")  # fmt: skip
    if ad.config.get("corda_config"):
        return "it carries a corda_config: it was trained on a CorDA residual base"
    origin = _decompose_origin(ad)
    if origin is not None:
        return (
            f"it comes from `surgery decompose -m {origin.get('method')}`: it belongs to the "
            "residual base written beside it, not to the original model"
        )
    return None


def _convert_hint(reason: str) -> str:
    return (
        f"{reason}. Make it a plain LoRA of the original base first: `surgery convert ADAPTER "
        "--init INITIAL_ADAPTER -o PLAIN` for a trained PiSSA/CorDA adapter (the rank-2r "
        "identity), `surgery convert ADAPTER --base ORIGINAL_BASE -o PLAIN` for KaSA; DoRA has "
        "no plain-LoRA form (use `surgery apply`)"
    )


def _module_shape(ckpt: Checkpoint, module: str) -> tuple[int, ...] | None:
    name = resolve_weight(ckpt, module)
    return tuple(ckpt.shape(name)) if name is not None else None


def _rel(num: float, den: float) -> float:
    return float(num / den) if den > 0 else (0.0 if num == 0 else float("inf"))


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """``x (n, k)`` with zero rows appended up to ``rows`` (a grown vocabulary)."""
    if rows <= x.shape[0]:
        return x
    return np.concatenate([x, np.zeros((rows - x.shape[0], x.shape[1]), x.dtype)])


def _append_rank(lr: LowRank, a2: Any, b2: Any) -> LowRank:
    """``lr`` with more components at its scale: ``A' = [A; a2]``, ``B' = [B, b2]`` (float32)."""
    a = np.concatenate([_np32(lr.A), _np32(a2)])
    b = np.concatenate([_np32(lr.B), _np32(b2)], axis=1)
    return LowRank(A=a, B=b, scale=lr.scale)


def _tensor_of(ad: Adapter, module: str, rows: int | None = None) -> np.ndarray:
    """The adapter's ΔW ``(out, in)`` fp32 for ``module`` (zero rows appended up to ``rows``)."""
    d = ad.delta_array(module, np.float32)
    return d if rows is None else _pad_rows(d, rows)


# -- apply ----------------------------------------------------------------------------------------
def _apply_task(
    ckpt: Checkpoint, ad: Adapter, roles: dict[str, tuple[str, str]], dtype: str | None, name: str
) -> TensorResult:
    """Fold the adapter into one base tensor (fp32 numpy), cast to the output dtype."""
    role, module = roles[name]
    out_dt = out_dtype_name(dtype, ckpt.dtype(name))
    if role == "full":  # module: the adapter's key; stored layout, as the base's tensor
        t = np.asarray(ad.full[module], np.float32)
        return TensorResult(name, tensor=narrow(t, out_dt), report={"action": "replaced"})
    w = load(ckpt, name)  # (out, in) or (out,) for a bias
    if role == "bias":
        new = w + ad.bias_delta_array(module)
        rep = {"action": "applied", "module": module, "what": "lora_B.bias"}
    else:
        new = ad.merge_weight_array(module, w)
        dn = float(np.linalg.norm(new - w))
        rep = {"action": "applied", "module": module, "rank": ad.rank(module),
               "scale": ad.modules[module].scale, "delta_norm": dn,
               "rel_delta": _rel(dn, float(np.linalg.norm(w)))}  # fmt: skip
    return TensorResult(name, tensor=store(ckpt, name, new, out_dt), report=rep)


def _check_modules(ad: Adapter, ckpt: Checkpoint, what: str) -> list[str]:
    """Every adapted module must exist in ``ckpt`` with the update's shape, as a float weight."""
    problems = []
    for m in sorted(ad.modules):
        lr = ad.modules[m]
        want = (int(lr.B.shape[0]), int(lr.A.shape[1]))
        shape = _module_shape(ckpt, m)
        if shape is None:
            problems.append(f"{m}: no tensor {m}.weight in {what} {ckpt.source}")
        elif shape != want:
            problems.append(
                f"{m}: the adapter's update is {list(want)} but {m}.weight is "
                f"{list(shape)} in {what} {ckpt.source}"
            )
        elif ckpt.dtype(resolve_weight(ckpt, m)) not in COMPUTABLE_DTYPES:
            problems.append(
                f"{m}.weight is {ckpt.dtype(resolve_weight(ckpt, m))}; surgery computes only "
                "on F16/BF16/F32/F64 weights"
            )
    return problems


def apply(base: str, adapter: str, **options: Any) -> Path | Plan:
    """Fold a PEFT adapter into its base and write the merged model.

    Args:
        base: the base checkpoint (path or Hub id) the adapter was trained on.
        adapter: the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        **options: the shared run options (``out``, ``force``, ``dry_run``, ``dtype``, …).

    Returns:
        The output folder (a full model), or the plan for ``dry_run``.

    Raises:
        SurgeryError: unknown or pickled adapters, missing modules, shape mismatches (all listed),
            before anything is written.
    """
    opts = RunOptions.of(options)
    ad = Adapter.load(adapter)
    if ad.flavour == "residual":
        raise SurgeryError(
            f"{ad.path}: init_lora_weights={ad.config['init_lora_weights']!r} makes PEFT "
            "re-decompose the base at load, so the merged weights depend on that random/SVD "
            "init; apply it to the residual base it was trained on after setting "
            '"init_lora_weights": true, or convert it with `surgery convert --init`'
        )
    ckpt = Checkpoint.open(base)
    problems = _check_modules(ad, ckpt, "the base")
    problems += [f"{m}: DoRA on an embedding is not supported" for m in ad.magnitude
                 if m in ad.embeddings]  # fmt: skip
    roles: dict[str, tuple[str, str]] = {}
    for m in ad.modules:
        roles[resolve_weight(ckpt, m) or f"{m}.weight"] = ("weight", m)
    for m in ad.bias:
        bn = (resolve_weight(ckpt, m) or f"{m}.weight")[: -len("weight")] + "bias"
        if bn not in ckpt:
            problems.append(f"{m}: lora_bias needs {bn} in the base (PEFT refuses to merge)")
        else:
            roles[bn] = ("bias", m)
    for n0, t in ad.full.items():
        n = (resolve_weight(ckpt, module_of(n0)) if n0.endswith(".weight") else None) or n0
        if n not in ckpt:
            problems.append(f"{n}: the adapter stores a full tensor for it, absent from the base")
        elif tuple(ckpt.info(n).shape) != tuple(t.shape):
            problems.append(
                f"{n}: the adapter's full copy is {list(t.shape)}, the base "
                f"{list(ckpt.info(n).shape)}"
            )
        elif n not in roles:
            roles[n] = ("full", n0)
    _fail(problems, f"cannot apply {ad.path} to {base}")
    resolve_device(opts.device)  # validates --device; the fold itself is a cheap fp32 CPU op
    names = [n for n in ckpt.names() if n in roles]
    man = Manifest("apply", method=ad.flavour, params={}, seed=opts.seed, device="cpu")
    man.add_input("base", ckpt)
    man.inputs.append(_adapter_record("adapter", ad))
    man.dtypes = {"compute": "float32", "output": opts.dtype or "stored"}
    man.summary["modules"] = len(ad.modules)
    task = functools.partial(_apply_task, ckpt, ad, roles, opts.dtype)
    job = opts.job(
        "apply", man, names, task, template=ckpt,
        out_dtypes={n: out_dtype_name(opts.dtype, ckpt.dtype(n)) for n in names},
        plan_lines=[f"adapter: {ad.path} ({ad.flavour}, {len(ad.modules)} modules)"],
    )  # fmt: skip
    return execute(job, opts.progress)


# -- port -----------------------------------------------------------------------------------------
def _drift(old, new, patch) -> dict[str, float]:
    """``‖new − old‖/‖old‖`` and the cosine between the drift ``new − old`` and the patch."""
    d = new.astype(np.float64) - old
    p = patch.astype(np.float64)
    nd, npch, no = (
        float(np.linalg.norm(d)),
        float(np.linalg.norm(p)),
        float(np.linalg.norm(old.astype(np.float64))),
    )
    cos = float((d * p).sum()) / (nd * npch) if nd > 0 and npch > 0 else 0.0
    return {"drift": _rel(nd, no), "cos_drift_patch": cos, "patch_norm": npch,
            "rel_patch": _rel(npch, no)}  # fmt: skip


def _extract(delta, rank: int | None, energy: float | None, seed: int, name: str):
    """Low-rank patch of ``delta (out, in)`` fp32 numpy: ``(LowRank, rel_error)``."""
    from ops.backend import host_rng
    from ops.decompose import svd_extract
    from ops.linalg import svd
    from ops.lowrank import rank_for_energy, split_factors

    k = min(delta.shape)
    norm = float(np.linalg.norm(delta))
    if energy is not None:
        u, s, vh = svd(delta)
        r = max(1, rank_for_energy(s, energy))
        lr = split_factors(u[:, :r], s[:r], vh[:r], 1.0)
    else:
        r = min(int(rank), k)
        _, lr = svd_extract(delta, rank=r, rng=host_rng(seed, name))
    err = float(np.linalg.norm(delta - lr.delta()))
    return LowRank(
        A=np.ascontiguousarray(lr.A, np.float32),
        B=np.ascontiguousarray(lr.B, np.float32),
        scale=1.0,
    ), _rel(err, norm)


def _port_task(
    kind: str,
    src: Any,
    new: Checkpoint,
    old: Checkpoint | None,
    merge: bool,
    rank: int | None,
    energy: float | None,
    seed: int,
    dtype: str | None,
    modmap: dict[str, tuple[str, str | None]] | None,
    name: str,
) -> TensorResult:
    """Port one module: extract (full fine-tune input) and/or merge, with the drift report.

    ``modmap``: new-base tensor name → (adapter module, old-base tensor name) for adapter inputs.
    """
    m, old_name = modmap[name] if modmap is not None else (module_of(name), name)
    w_new = load(new, name)  # fp32 numpy (out, in)
    report: dict[str, Any] = {"module": m}
    lowrank = None
    out_dt = out_dtype_name(dtype, new.dtype(name))
    if kind == "adapter" and name.endswith(".bias"):  # lora_bias: b_new + s·lora_B.bias
        new_b = narrow(w_new + src.bias_delta_array(m), out_dt)
        return TensorResult(name, tensor=new_b, report={"module": m, "action": "ported bias"})
    if kind == "adapter":
        patch = _tensor_of(src, m, rows=w_new.shape[0])  # zero rows for a grown vocabulary
        report["rank"] = src.rank(m)
    else:
        dense = load(src, name) - load(old, name)
        if rank is None and energy is None:
            patch = dense  # --merge without -r: the exact dense patch
            report["rank"] = "dense"
        else:
            lowrank, err = _extract(dense, rank, energy, seed, name)
            patch = lowrank.delta()
            report.update(rank=lowrank.rank, extract_rel_error=err)
        if patch.shape[0] < w_new.shape[0]:
            patch = _pad_rows(patch, w_new.shape[0])
            if lowrank is not None:
                lowrank = LowRank(A=lowrank.A, B=_pad_rows(lowrank.B, w_new.shape[0]), scale=1.0)
    if old is not None:
        w_old = load(old, old_name)
        if w_old.shape != w_new.shape:  # grown vocabulary: compare the shared rows
            rows = min(w_old.shape[0], w_new.shape[0])
            report.update(_drift(w_old[:rows], w_new[:rows], patch[:rows]))
        else:
            report.update(_drift(w_old, w_new, patch))
    tensor = None
    if merge:
        tensor = store(new, name, w_new + patch, out_dt)
        report["action"] = "ported"
    return TensorResult(name, tensor=tensor, lowrank=lowrank, report=report)


def port(
    adapter: str,
    *,
    to: str,
    from_: str | None = None,
    merge: bool = False,
    rank: int | None = None,
    energy: float | None = None,
    **options: Any,
) -> Path | Plan:
    """Port a LoRA patch to an evolved base (PortLLM, training-free).

    ``θ' = θ_new + s·B A`` with no extra coefficient (ALGORITHMS.md §4). Without ``merge`` the
    same factors are written as an adapter of the new base; with ``merge`` the ported model.

    Args:
        adapter: a PEFT adapter folder, or a full fine-tuned checkpoint (then ``from_`` is
            required and the patch ``θ_ft − θ_old`` is extracted per targeted module at ``rank``
            or ``energy``; with ``merge`` and neither, the dense patch is added exactly).
        to: the new base.
        from_: the old base; enables the per-module drift report (``‖new − old‖/‖old‖`` and the
            cosine between the drift and the patch) in ``surgery.json``.
        merge: write ``θ_new + ΔW`` instead of a re-targeted adapter.
        rank: extraction rank for a full fine-tune input.
        energy: extraction energy threshold (per-module ranks) for a full fine-tune input.
        **options: the shared run options (``targets`` selects modules of a full fine-tune).

    Raises:
        SurgeryError: base-dependent adapters (DoRA, KaSA, residual inits; with the convert
            command that fixes them), missing modules, shape mismatches, architecture mismatch.
    """
    opts = RunOptions.of(options)
    new = Checkpoint.open(to)
    old = Checkpoint.open(from_) if from_ is not None else None
    problems: list[str] = []
    if (
        old is not None
        and old.config.get("model_type")
        and new.config.get("model_type")
        and (old.config["model_type"] != new.config["model_type"])
    ):
        problems.append(
            f"--from is a {old.config['model_type']!r} model but --to is a "
            f"{new.config['model_type']!r} model; PortLLM needs two versions of one "
            "architecture"
        )
    kind = "adapter" if is_adapter(adapter) or _has_adapter_subdir(adapter) else "checkpoint"
    warnings: list[str] = []
    if kind == "adapter":
        ad = Adapter.load(adapter)
        reason = _base_dependence(ad)
        if reason is not None:
            raise SurgeryError(f"cannot port {ad.path}: {_convert_hint(reason)}")
        if rank is not None or energy is not None:
            problems.append(
                "-r/--energy apply to a full fine-tuned checkpoint input only; an "
                "adapter is ported with its own factors"
            )
        if ad.E:
            path, ad = ad.path, ad.fold()  # AdaLoRA: additive, base-independent once E is folded
            ad.path = path
        copies = {f"{m}.weight" for m in ad.embeddings} & set(ad.full)
        saved = sorted(set(ad.full) - copies)
        if saved:
            problems.append(
                f"modules_to_save tensors ({', '.join(saved[:3])}) replace whole weights; they "
                "are not a low-rank patch PortLLM can carry. Drop them from the adapter, or "
                "apply it to the old base and port the full fine-tune (--from OLD)"
            )
        if copies:
            warnings.append(
                f"dropped the embedding copies PEFT saved beside the embedding LoRA "
                f"({', '.join(sorted(copies))}): they are old-base weights"
            )
        ad.full = {}
        names, pads = [], {}
        modmap: dict[str, tuple[str, str | None]] | None = {}
        for m in sorted(ad.modules):
            lr = ad.modules[m]
            want = (int(lr.B.shape[0]), int(lr.A.shape[1]))
            shape = _module_shape(new, m)
            if shape is None:
                problems.append(f"{m}: missing in the new base {to}")
                continue
            grown = (
                shape[0] > want[0]
                and shape[1] == want[1]
                and (m in ad.embeddings or is_embedding(m) or is_head(m))
            )
            if grown:
                pads[m] = shape[0]
            elif shape != want:
                problems.append(
                    f"{m}: the patch is {list(want)} but {m}.weight is {list(shape)} "
                    f"in the new base {to}"
                )
                continue
            if old is not None:
                oshape = _module_shape(old, m)
                if oshape != want:
                    problems.append(
                        f"{m}: the patch is {list(want)} but the old base has "
                        f"{list(oshape) if oshape else 'no such module'}"
                    )
            wn = resolve_weight(new, m)
            names.append(wn)
            modmap[wn] = (m, resolve_weight(old, m) if old is not None else None)
            if m in ad.bias and merge:
                bn = wn[: -len("weight")] + "bias"
                if bn not in new:
                    problems.append(f"{m}: lora_bias needs {bn} in the new base")
                else:
                    names.append(bn)
                    modmap[bn] = (m, None)
        if pads:
            warnings.append(
                "vocabulary growth: zero rows appended to the patch of "
                + ", ".join(
                    f"{m} ({ad.modules[m].B.shape[0]} → {r})" for m, r in sorted(pads.items())
                )
                + "; the new tokens get no update"
            )
        src: Any = ad
    else:
        if old is None:
            raise SurgeryError(
                f"{adapter} is a full checkpoint, not an adapter: pass --from "
                "OLD_BASE so that the patch θ_ft − θ_old can be taken"
            )
        if not merge and rank is None and energy is None:
            problems.append(
                "a full fine-tune is ported as a LoRA: give -r RANK or --energy E "
                "(or --merge to add the dense patch exactly)"
            )
        if rank is not None and rank < 1:
            problems.append(f"-r must be ≥ 1, got {rank}")
        if energy is not None and not 0 < energy <= 1:
            problems.append(f"--energy must be in (0, 1], got {energy}")
        src = Checkpoint.open(adapter)
        names = select(old, opts.targets, opts.exclude, opts.layers)
        pads, modmap = {}, None
        for n in names:
            for ck, what in ((src, "the fine-tune"), (new, "the new base")):
                if n not in ck:
                    problems.append(f"{n}: missing in {what} {ck.source}")
                elif tuple(ck.shape(n)) != tuple(old.shape(n)):
                    grow = (
                        ck is new
                        and ck.shape(n)[1] == old.shape(n)[1]
                        and ck.shape(n)[0] > old.shape(n)[0]
                        and (is_embedding(module_of(n)) or is_head(module_of(n)))
                    )
                    if not grow:
                        problems.append(
                            f"{n}: {list(ck.shape(n))} in {what} but "
                            f"{list(old.shape(n))} in the old base"
                        )
                    else:
                        pads[module_of(n)] = ck.shape(n)[0]
        if pads:
            warnings.append(
                "vocabulary growth: zero rows appended to the patch of " + ", ".join(sorted(pads))
            )
    _fail(problems, f"cannot port {adapter} to {to}")
    for w in warnings:
        log.warning("%s", w)
    resolve_device(opts.device)
    man = Manifest("port", method="portllm", method_reference="https://arxiv.org/abs/2410.10870",
                   params={"merge": merge, "rank": rank, "energy": energy}, seed=opts.seed,
                   device="cpu")  # fmt: skip
    if kind == "adapter":
        man.inputs.append(_adapter_record("adapter", src))
    else:
        man.add_input("tuned", src)
    man.add_input("new_base", new)
    if old is not None:
        man.add_input("old_base", old)
    man.summary["warnings"] = warnings
    man.dtypes = {"compute": "float32", "output": opts.dtype or "stored"}
    task = functools.partial(
        _port_task, kind, src, new, old, merge, rank, energy, opts.seed, opts.dtype, modmap
    )
    finish = None
    if not merge:
        finish = functools.partial(_finish_port, src if kind == "adapter" else None, new, pads)
    job = opts.job(
        "port", man, names if (merge or old is not None or kind == "checkpoint") else [], task,
        template=new if merge else None,
        out_dtypes={n: out_dtype_name(opts.dtype, new.dtype(n)) for n in names} if merge else {},
        finish_adapter=finish,
        plan_lines=[f"{kind}: {adapter}", f"new base: {to}", f"old base: {from_}",
                    f"output: {'merged model' if merge else 'adapter'}"],
    )  # fmt: skip
    out = execute(job, opts.progress)
    return out


def drift_table(folder: str | Path, top: int = 10) -> str:
    """The port drift report from ``surgery.json``: the modules that drifted most."""
    man = json.loads((Path(folder) / "surgery.json").read_text())
    rows = [t for t in man.get("tensors", []) if "drift" in t]
    if not rows:
        return "drift: no --from base given"
    rows.sort(key=lambda t: -float(t["drift"]))
    mean = sum(float(t["drift"]) for t in rows) / len(rows)
    lines = [
        f"drift over {len(rows)} modules: mean ‖new−old‖/‖old‖ = {mean:.3g}",
        f"  {'module':<48} {'drift':>9} {'cos(drift,patch)':>17} {'‖patch‖/‖old‖':>14}",
    ]
    for t in rows[:top]:
        lines.append(
            f"  {t['module']:<48} {float(t['drift']):>9.3g} "
            f"{float(t['cos_drift_patch']):>17.3f} {float(t['rel_patch']):>14.3g}"
        )
    return "\n".join(lines)


def _has_adapter_subdir(path: str) -> bool:
    p = Path(path)
    return (
        p.is_dir()
        and not (p / "config.json").is_file()
        and (p / "adapter" / ADAPTER_CONFIG).is_file()
    )


def _finish_port(
    ad: Adapter | None,
    new: Checkpoint,
    pads: dict[str, int],
    lowranks: dict[str, LowRank],
    folder: Path,
    manifest: Manifest,
) -> None:
    """Write the ported adapter: the same factors (zero-padded rows) aimed at the new base."""
    if ad is None:  # extracted from a full fine-tune
        out = Adapter(modules=dict(lowranks), embeddings={m for m in lowranks if is_embedding(m)})
    else:
        mods = {}
        for m, lr in ad.modules.items():
            if m in pads:  # weight orientation: B's rows are the vocabulary for embeddings too
                mods[m] = LowRank(A=lr.A, B=_pad_rows(np.asarray(lr.B), pads[m]), scale=lr.scale)
            else:
                mods[m] = lr
        keep = {k: v for k, v in ad.config.items() if k in ("task_type", "use_rslora")}
        out = Adapter(modules=mods, config=keep, embeddings=set(ad.embeddings), bias=dict(ad.bias))
    hub = hub_id_of(new)
    out.config["base_model_name_or_path"] = hub
    out.config["revision"] = new.revision if hub and new.revision else None
    out.save(folder, base=new)
    manifest.summary["adapter"] = {"r": out.config["r"], "modules": len(out.modules),
                                   "base_model_name_or_path": hub}  # fmt: skip


# -- convert --------------------------------------------------------------------------------------
def _next_rank(r: int) -> int:
    for x in VLLM_RANKS:
        if x >= r:
            return x
    return r


def servable_problems(folder: str | Path) -> list[str]:
    """Check a written adapter against the servable profile (ECOSYSTEM.md §3.4).

    Returns:
        Problems that break a serving engine (empty when the adapter is servable everywhere).
    """
    from .checkpoint import read_header

    p = find_adapter_dir(folder)
    cfg = json.loads((p / ADAPTER_CONFIG).read_text())
    out = []
    if cfg.get("peft_type") != "LORA":
        out.append(f"peft_type is {cfg.get('peft_type')!r}, not LORA")
    for key, want in (
        ("use_rslora", False),
        ("use_dora", False),
        ("lora_bias", False),
        ("init_lora_weights", True),
        ("bias", "none"),
    ):
        if cfg.get(key, want) != want:
            out.append(f"{key} is {cfg.get(key)!r} (serving needs {want!r})")
    for key in ("modules_to_save", "layer_replication", "kasa_config", "corda_config"):
        if cfg.get(key):
            out.append(f"{key} is set ({cfg[key]!r}); engines reject it")
    if cfg.get("alpha_pattern"):
        out.append("alpha_pattern is set (llama.cpp ignores it)")
    name = cfg.get("base_model_name_or_path")
    if name is not None and not is_hub_id(name):
        out.append(f"base_model_name_or_path {name!r} is not a Hub id")
    _, infos = read_header(p / ADAPTER_WEIGHTS)  # the key names only (and no torch import)
    bad = [
        k
        for k in infos
        if not k.endswith(
            (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")
        )
    ]
    if bad:
        out.append(f"{len(bad)} tensor(s) vLLM calls 'unsupported LoRA weight', e.g. {bad[0]}")
    tm = cfg.get("target_modules")
    if not isinstance(tm, list):
        out.append(f"target_modules is {tm!r}; SGLang needs a list of leaf names")
    return out


def _profile_warnings(ad: Adapter) -> list[str]:
    w = []
    rmax = max(lr.rank for lr in ad.modules.values())
    if rmax not in VLLM_RANKS:
        w.append(
            f"the largest rank {rmax} is not one of vLLM's max_lora_rank values "
            f"{VLLM_RANKS}: serve with --max-lora-rank {_next_rank(rmax)}, or rerun with "
            "--pad-rank"
        )
    elif rmax > 16:
        w.append(
            f"rank {rmax} exceeds vLLM's default max_lora_rank 16: serve with "
            f"--max-lora-rank {rmax}"
        )
    leaves = sorted({m.rsplit(".", 1)[-1] for m in ad.modules} - SERVABLE_LEAVES)
    if leaves:
        w.append(
            f"module names {', '.join(leaves)} are not among the names vLLM/SGLang map to "
            "LoRA layers; check that your engine supports them"
        )
    if ad.bias:
        w.append("lora_B.bias tensors: vLLM needs --enable-lora-bias (newer vLLM rejects them)")
    return w


def _normalise(ad: Adapter, pad_to: int | None) -> Adapter:
    """The servable form: scales folded into B so that one ``lora_alpha`` = r holds for every
    module without ``alpha_pattern`` or rsLoRA (``s_m = α/r_m``), optional zero-padding of ranks."""
    ranks = [lr.rank for lr in ad.modules.values()]
    r = pad_to or max(set(ranks), key=lambda x: (ranks.count(x), x))
    alpha = float(r)
    mods = {}
    for m, lr in ad.modules.items():
        a, b = _np32(lr.A), _np32(lr.B)
        if pad_to is not None and lr.rank < pad_to:
            a = _pad_rows(a, pad_to)
            b = np.ascontiguousarray(_pad_rows(b.T, pad_to).T)
        s_new = alpha / a.shape[0]
        b = b * np.float32(lr.scale / s_new)
        mods[m] = LowRank(A=np.ascontiguousarray(a), B=np.ascontiguousarray(b), scale=s_new)
    cfg = {
        k: ad.config[k]
        for k in ("task_type", "base_model_name_or_path", "revision")
        if ad.config.get(k) is not None
    }
    return Adapter(modules=mods, config=cfg, embeddings=set(ad.embeddings), bias=dict(ad.bias))


def _kasa_tail_task(base: Checkpoint, ranks: dict[str, int], name: str) -> TensorResult:
    """The r smallest singular components of one original weight, as ``−U S Vh`` factors."""
    from ops.linalg import svd

    m = module_of(name)
    w = load(base, name, precision="float64")
    u, s, vh = svd(w)
    r, k = ranks[name], min(w.shape)
    tail = LowRank(
        A=vh[k - r :].astype(np.float32),
        B=(-u[:, k - r :] * s[k - r :]).astype(np.float32),
        scale=1.0,
    )
    return TensorResult(
        name,
        lowrank=tail,
        report={
            "module": m,
            "dropped": r,
            "tail_norm": float(np.sqrt((s[k - r :] ** 2).sum())),
            "rel_tail": _rel(float(np.sqrt((s[k - r :] ** 2).sum())), float(np.linalg.norm(s))),
        },
    )


def convert(
    adapter: str,
    *,
    init: str | None = None,
    base: str | None = None,
    pad_rank: bool = False,
    **options: Any,
) -> Path | Plan:
    """Turn an adapter into a plain, servable LoRA (ECOSYSTEM.md §2.6, §3.4).

    * ``init`` (PiSSA/CorDA/OLoRA): ``ΔW = s·B A − s₀·B₀ A₀`` relative to the **original** base,
      written at rank 2r as ``A' = [A; A₀]``, ``B' = [B, −(s₀/s)·B₀]``.
    * KaSA (``lora_diag``): ``A' = diag(d)·A``. With ``base`` (the original, untruncated weights),
      the truncated tail joins the adapter (rank 2r: ``A' = [diag(d)A; Vh_t]``,
      ``B' = [B, −U_t S_t / s]``) so that it applies to the original base; without it, the output
      applies to the KaSA-truncated base (said in the warning and in ``surgery.json``).
    * AdaLoRA: ``A' = (A ⊙ E)``, scale ``α/(init_r + 1e-5)``, triplets with ``E = 0`` dropped.
    * Every output: scales folded into B (``lora_alpha = r``, no ``alpha_pattern``, no rsLoRA),
      ``init_lora_weights: true``, leaf ``target_modules``, factors only; ``pad_rank`` pads every
      module with zero rows/columns to the next rank in vLLM's set.

    Raises:
        SurgeryError: DoRA adapters, residual inits without ``init``, mismatched init adapters,
            ``modules_to_save`` tensors (all listed).
    """
    opts = RunOptions.of(options)
    ad = Adapter.load(adapter)
    problems: list[str] = []
    warnings: list[str] = []
    notes: dict[str, Any] = {"source_flavour": ad.flavour}
    base_ckpt = Checkpoint.open(base) if base is not None else None
    if ad.flavour == "dora":
        raise SurgeryError(
            f"cannot convert {ad.path}: {_base_dependence(ad)}; a DoRA update is "
            "not low-rank in general. Fold it into the base with `surgery apply`"
        )
    if ad.full:
        mts = [n for n in ad.full if not any(n == f"{m}.weight" for m in ad.embeddings)]
        if mts:
            problems.append(
                f"modules_to_save tensors ({', '.join(sorted(mts)[:3])}) cannot be "
                "served as a LoRA; merge them with `surgery apply` instead"
            )
        else:
            warnings.append(
                "dropped the full embedding copies PEFT saved beside the embedding "
                "LoRA (base_layer.weight); serve on the same base vocabulary"
            )
    if ad.bias:
        problems.append(
            f"lora_B.bias tensors ({len(ad.bias)} modules): serving engines reject lora_bias "
            "adapters (vLLM: 'unsupported LoRA weight'); fold them with `surgery apply` instead"
        )
    origin = _decompose_origin(ad)
    is_kasa = ad.flavour == "kasa" or (origin or {}).get("method") == "kasa"
    init_ad = None
    if init is not None:
        init_ad = Adapter.load(init)
        for what, x in (("adapter", ad), ("init adapter", init_ad)):
            if x.flavour not in ("lora", "residual"):
                problems.append(
                    f"the {what} is a {x.flavour} adapter; --init expects two plain "
                    "LoRA adapters (trained and initial) of a PiSSA/CorDA/OLoRA run"
                )
        a_mods, i_mods = set(ad.modules), set(init_ad.modules)
        for m in sorted(a_mods ^ i_mods):
            problems.append(
                f"{m}: only in the {'adapter' if m in a_mods else 'init adapter'}; "
                "both must cover the same modules"
            )
        for m in sorted(a_mods & i_mods):
            x, y = ad.modules[m], init_ad.modules[m]
            if (x.B.shape[0], x.A.shape[1]) != (y.B.shape[0], y.A.shape[1]):
                problems.append(
                    f"{m}: update {list((x.B.shape[0], x.A.shape[1]))} in the "
                    f"adapter but {list((y.B.shape[0], y.A.shape[1]))} in the init"
                )
        notes["identity"] = "rank-2r: A' = [A; A0], B' = [B, -(s0/s) B0]"
    elif ad.flavour == "residual" or (origin or {}).get("method") in ("pissa", "corda"):
        raise SurgeryError(
            f"{ad.path} is a residual-init adapter ({_base_dependence(ad)}); pass the initial "
            "adapter saved before training: `surgery convert ADAPTER --init INITIAL_ADAPTER -o "
            "OUT` writes ΔW = BA − B0A0 as a rank-2r LoRA of the original base"
        )
    if base_ckpt is not None and not is_kasa:
        problems.append("--base is only used for KaSA adapters (to fold the truncated tail)")
    if base_ckpt is not None and is_kasa:
        problems += _check_modules(ad, base_ckpt, "the base")
    _fail(problems, f"cannot convert {ad.path}")

    plain = ad.fold() if not ad.magnitude else ad  # KaSA diag, AdaLoRA E → A
    plain.full = {}
    if init_ad is not None:
        init_plain = init_ad.fold()
        mods = {}
        for m, lr in plain.modules.items():
            y = init_plain.modules[m]
            mods[m] = _append_rank(lr, y.A, _np32(y.B) * np.float32(-(y.scale / lr.scale)))
        plain = Adapter(
            modules=mods, config=plain.config, embeddings=plain.embeddings, bias=plain.bias
        )
    if is_kasa and base_ckpt is None:
        warnings.append(
            "KaSA: the output applies to the truncated base (W minus its r smallest "
            "singular components, as PEFT's KaSA or `surgery decompose -m kasa` "
            "wrote it); pass --base ORIGINAL to fold the truncation into the adapter"
        )
        notes["requires_base"] = "kasa-truncated"
    wmap = {}  # base tensor name → adapter module (KaSA with --base)
    if is_kasa and base_ckpt is not None:
        wmap = {resolve_weight(base_ckpt, m): m for m in sorted(plain.modules)}
    names = list(wmap)
    if names:
        notes["identity"] = "rank-2r: A' = [diag(d)A; Vh_tail], B' = [B, -U_tail S_tail / s]"
        notes["requires_base"] = "original"
    resolve_device(opts.device)
    man = Manifest("convert", method=ad.flavour if init is None else "residual_init",
                   params={"pad_rank": pad_rank}, seed=opts.seed, device="cpu")  # fmt: skip
    man.inputs.append(_adapter_record("adapter", ad))
    if init_ad is not None:
        man.inputs.append(_adapter_record("init", init_ad))
    if base_ckpt is not None:
        man.add_input("base", base_ckpt)
    ranks = {n: plain.rank(m) for n, m in wmap.items()}
    task = functools.partial(_kasa_tail_task, base_ckpt, ranks)
    back = {module_of(n): m for n, m in wmap.items()}
    finish = functools.partial(_finish_convert, plain, base_ckpt, pad_rank, warnings, notes, back)
    job = opts.job("convert", man, names, task, template=None, finish_adapter=finish,
                   plan_lines=[f"adapter: {ad.path} ({ad.flavour})"])  # fmt: skip
    return execute(job, opts.progress)


def _finish_convert(
    plain: Adapter,
    base: Checkpoint | None,
    pad_rank: bool,
    warnings: list[str],
    notes: dict[str, Any],
    back: dict[str, str],
    tails: dict[str, LowRank],
    folder: Path,
    manifest: Manifest,
) -> None:
    if tails:  # KaSA with --base: append the (negated) tail at the adapter's scale
        tails = {back[k]: v for k, v in tails.items()}
        mods = {}
        for m, lr in plain.modules.items():
            t = tails[m]
            mods[m] = _append_rank(lr, t.A, _np32(t.B) / np.float32(lr.scale))
        plain = Adapter(
            modules=mods, config=plain.config, embeddings=plain.embeddings, bias=plain.bias
        )
    rmax = max(lr.rank for lr in plain.modules.values())
    out = _normalise(plain, _next_rank(rmax) if pad_rank else None)
    out.save(folder, base=base, leaf_targets=True)  # the serving profile: leaf names
    warnings = warnings + _profile_warnings(out)
    for w in warnings:
        log.warning("%s", w)
    bad = servable_problems(folder)
    if bad:  # our own output must be servable; anything else is a bug
        raise SurgeryError("internal: the converted adapter is not servable: " + "; ".join(bad))
    manifest.summary.update(notes)
    manifest.summary["warnings"] = warnings
    manifest.summary["adapter"] = {"r": out.config["r"], "lora_alpha": out.config["lora_alpha"],
                                   "rank_pattern": out.config["rank_pattern"],
                                   "modules": len(out.modules)}  # fmt: skip


# -- adapter merges -------------------------------------------------------------------------------
def _merge_module_task(
    ads: Sequence[Adapter],
    fn,
    params: dict[str, Any],
    weights: Sequence[float],
    rank: int | None,
    seed: int,
    name: str,
) -> TensorResult:
    """Merge one module's deltas with the kernel, then re-factor to rank ``rank``."""
    from ops.backend import host_rng
    from ops.decompose import svd_extract

    m = module_of(name)
    deltas = _stack(ads, m)  # (k, out, in) fp32
    rng = [host_rng(seed, name, i) for i in range(len(ads))]
    delta = fn(deltas, np.asarray(weights, np.float32), rng=rng, **params)
    delta = np.asarray(delta, np.float32)
    norm = float(np.linalg.norm(delta))
    in_ranks = sum(a.rank(m) for a in ads if m in a.modules)
    r = min(rank or in_ranks, min(delta.shape))
    if norm == 0:
        return TensorResult(name, report={"module": m, "rank": 0, "action": "zero"})
    _, lr = svd_extract(delta, rank=r, rng=host_rng(seed, name, len(ads)))
    err = float(np.linalg.norm(delta - lr.delta()))
    lr = LowRank(
        A=np.ascontiguousarray(lr.A, np.float32),
        B=np.ascontiguousarray(lr.B, np.float32),
        scale=1.0,
    )
    return TensorResult(
        name,
        lowrank=lr,
        report={
            "module": m,
            "rank": r,
            "input_ranks": in_ranks,
            "rel_error": _rel(err, norm),
            "exact": r >= in_ranks and fn.__name__ == "task_arithmetic",
        },
    )


def _stack(ads: Sequence[Adapter], m: str) -> np.ndarray:
    ref = next(a for a in ads if m in a.modules)
    shape = (int(ref.modules[m].B.shape[0]), int(ref.modules[m].A.shape[1]))
    out = np.zeros((len(ads), *shape), np.float32)
    for i, a in enumerate(ads):
        if m in a.modules:
            out[i] = a.delta_array(m)
    return out


def merge_adapters(
    adapters: Sequence[str],
    *,
    method: str | None = None,
    base: str | None = None,
    weights: Sequence[float] | None = None,
    params: dict[str, Any] | list[str] | None = None,
    rank: int | None = None,
    **options: Any,
) -> Path | Plan:
    """Merge adapters of one base in delta space and write one adapter.

    Per module (the union of the inputs' modules; a missing module counts as ``ΔW = 0``):
    ``δ = kernel([ΔW_1 … ΔW_k], weights)`` with any merge kernel, then the best rank-``rank``
    factorisation of ``δ`` (default: the sum of the input ranks, exact for ``task_arithmetic``);
    the relative error ``‖δ − δ_r‖/‖δ‖`` is reported per module.

    Args:
        adapters: adapter folders of the same base.
        method: a merge method (``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``,
            ``pcb``).
        base: optional base checkpoint: checks the modules' shapes and names the output's base.
        weights: one weight per adapter (default 1).
        params: method parameters.
        rank: output rank per module.
        **options: the shared run options.

    Raises:
        SurgeryError: inputs of different bases or shapes, base-dependent flavours (listed).
    """
    from .methods import get, parse_params

    opts = RunOptions.of(options)
    if not method:
        raise SurgeryError("a merge method is required: --method task_arithmetic|ties|dare_*|pcb")
    meth = get(method, "merge")
    p = parse_params(meth, params)
    ads = [Adapter.load(a) for a in adapters]
    problems: list[str] = []
    w = [1.0] * len(ads) if not weights else [float(x) for x in weights]
    if len(w) != len(ads):
        problems.append(f"got {len(w)} weight(s) for {len(ads)} adapter(s); give one -w each")
    if rank is not None and rank < 1:
        problems.append(f"-r must be ≥ 1, got {rank}")
    for i, a in enumerate(ads):
        saved = sorted(set(a.full) - {f"{m}.weight" for m in a.embeddings})
        if saved or a.bias:
            what = f"modules_to_save tensors ({', '.join(saved[:3])})" if saved else "lora_B.bias"
            problems.append(f"{a.path}: {what} cannot be merged in delta space; fold the "
                            "adapters with `surgery apply` and merge the full models")  # fmt: skip
        reason = _base_dependence(a)
        if reason is not None:
            problems.append(f"{a.path}: {_convert_hint(reason)}")
        elif a.E:
            ads[i] = a.fold()
            ads[i].path = a.path
    names = {a.config.get("base_model_name_or_path") for a in ads} - {None}
    if len(names) > 1:
        problems.append(
            f"the adapters name different bases ({', '.join(sorted(names))}); an "
            "adapter merge needs adapters of one base"
        )
    base_ckpt = Checkpoint.open(base) if base is not None else None
    shapes: dict[str, tuple[tuple[int, int], str]] = {}
    for a in ads:
        for m, lr in a.modules.items():
            s = (int(lr.B.shape[0]), int(lr.A.shape[1]))
            if m in shapes and shapes[m][0] != s:
                problems.append(
                    f"{m}: {list(s)} in {a.path} but {list(shapes[m][0])} in {shapes[m][1]}"
                )
            shapes.setdefault(m, (s, str(a.path)))
        if base_ckpt is not None:
            problems += _check_modules(a, base_ckpt, "the base")
    _fail(problems, "cannot merge the adapters")
    resolve_device(opts.device)
    man = Manifest("merge", method=meth.name, method_reference=meth.reference, params=p,
                   seed=opts.seed, device="cpu")  # fmt: skip
    for i, a in enumerate(ads):
        man.inputs.append(_adapter_record(f"adapter{i}", a))
    if base_ckpt is not None:
        man.add_input("base", base_ckpt)
    man.summary.update(weights=w, rank=rank, kind="adapter")
    mods = sorted(shapes)
    kernel_params = dict(p)
    if meth.name == "pcb" and p.get("scope") == "model" and not opts.dry_run:
        from ops.merge import pcb_reduce

        kernel_params["stats"] = pcb_reduce(
            lambda: (_stack(ads, m) for m in mods), density=p["density"], clip=p["clip"]
        )
    task = functools.partial(_merge_module_task, ads, meth.fn, kernel_params, w, rank, opts.seed)
    emb = set().union(*(a.embeddings for a in ads))
    cfg = {
        k: v
        for k, v in ads[0].config.items()
        if k in ("task_type", "base_model_name_or_path", "revision")
    }
    finish = functools.partial(_finish_merge, emb, cfg, base_ckpt)
    job = opts.job(
        "merge",
        man,
        [f"{m}.weight" for m in mods],
        task,
        template=None,
        finish_adapter=finish,
        plan_lines=[
            f"adapter merge: {meth.name} {p} of {len(ads)} adapters, "
            f"{len(mods)} modules, rank {rank or 'sum of inputs'}"
        ],
    )
    return execute(job, opts.progress)


def _finish_merge(
    emb: set[str],
    cfg: dict[str, Any],
    base: Checkpoint | None,
    lowranks: dict[str, LowRank],
    folder: Path,
    manifest: Manifest,
) -> None:
    if not lowranks:
        raise SurgeryError("every merged module is zero: nothing to write")
    out = Adapter(modules=dict(lowranks), config=dict(cfg), embeddings=emb & set(lowranks))
    out.save(folder, base=base)
    errs = [t.get("rel_error", 0.0) for t in manifest.tensors if "rel_error" in t]
    manifest.summary["max_rel_error"] = max(errs) if errs else 0.0
    manifest.summary["adapter"] = {"r": out.config["r"], "modules": len(out.modules)}
