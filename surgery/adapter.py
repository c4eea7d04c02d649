"""``Adapter``: PEFT LoRA adapters on disk ↔ ``{module: LowRank}`` plus a config dict.

On disk (PEFT 0.13 … 0.21): ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``) and
``adapter_config.json``. Keys are ``base_model.model.<module>.<suffix>``:

============================  =======================  =========================================
suffix                        shape                    meaning
============================  =======================  =========================================
``lora_A.weight``             ``(r, in)``              LoRA A (``lora_A`` bare for AdaLoRA)
``lora_B.weight``             ``(out, r)``             LoRA B (``lora_B`` bare for AdaLoRA)
``lora_embedding_A``          ``(r, vocab)``           embedding LoRA: ``ΔW = s·(B_e A_e)ᵀ``
``lora_embedding_B``          ``(dim, r)``
``lora_diag``                 ``(r,)``                 KaSA: ``ΔW = s·B diag(d) A``
``lora_E``                    ``(r, 1)``               AdaLoRA: ``ΔW = B (A ⊙ E)·α/(init_r + 1e-5)``
``lora_magnitude_vector``     ``(out,)``               DoRA magnitude (read, apply; never ported)
``lora_B.bias``               ``(out,)``               ``lora_bias: true`` only; merged as ``s·b``
``base_layer.weight``         ``(vocab, dim)``         a full embedding PEFT saves beside
                                                       embedding LoRAs (replaces the base's)
============================  =======================  =========================================

In memory every module's :class:`~ops.lowrank.LowRank` is in the **weight orientation**
``(out, in)`` of the module's weight as :class:`~surgery.checkpoint.Checkpoint` presents it, so
``LowRank.delta()`` is always the update of that weight: for embeddings ``A = B_eᵀ`` and
``B = A_eᵀ`` (PEFT's transposed semantics), for GPT-2 ``Conv1D`` the logical ``(out, in)`` (PEFT's
``fan_in_fan_out`` only changes the stored layout, which ``Checkpoint.to_stored`` restores).

Encoding per-module ranks and scales (the rule, as documented in the README): ``r`` is the most
common module rank (ties → the largest), ``lora_alpha`` the most common module alpha
(``α_m = s_m·r_m``, or ``s_m·√r_m`` with rsLoRA; ties → the one of the largest rank);
``rank_pattern`` / ``alpha_pattern`` hold the full module name of every module that differs. This
keeps patterns empty for uniform adapters (the servable profile) and exact otherwise; mergekit's
``r = α = max rank`` rule is the special case where every scale is 1.

PEFT swallows unexpected keys and only warns about missing ones (ECOSYSTEM.md §2.5), so the key
set is validated against the config here, on write and on read, with PEFT's own matching rules
(``target_modules`` suffix/regex match, ``layers_to_transform``, ``get_pattern_key``); every
problem goes into one :class:`SurgeryError`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ops.lowrank import LowRank

from .checkpoint import HUB_ID, PICKLE_SUFFIXES, read_header
from .errors import SurgeryError

if TYPE_CHECKING:
    import torch

    from .checkpoint import Checkpoint

__all__ = [
    "Adapter",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "PREFIX",
    "RESIDUAL_INITS",
    "find_adapter_dir",
    "is_hub_id",
    "pattern_key",
    "peft_prefix",
    "resolve_weight",
    "targets_module",
    "task_type_for",
]

log = logging.getLogger("surgery")

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
ADALORA_EPS = 1e-5  # PEFT: scaling / (ranknum + 1e-5)
# init_lora_weights strings whose meaning depends on the base weights (PEFT re-decomposes on load).
RESIDUAL_INITS = ("pissa", "corda", "olora", "loftq")
MAX_LISTED = 20  # problems listed in one error message

# Suffix → (role, expects PEFT type). Longest first so ".lora_B.weight" wins over ".lora_B".
_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
    (".lora_embedding_A", "emb_A"),
    (".lora_embedding_B", "emb_B"),
    (".base_layer.weight", "base_layer"),
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_B.bias", "bias"),
    (".lora_A.bias", "A_bias"),
    (".lora_diag", "diag"),
    (".lora_A", "ada_A"),
    (".lora_B", "ada_B"),
    (".lora_E", "E"),
)

# Config keys a written adapter may carry over from the caller's config; everything else (local
# paths in corda_config/eva_config/loftq_config, peft_version, auto_mapping …) is dropped.
_KEPT_KEYS = ("task_type", "base_model_name_or_path", "revision", "use_rslora", "fan_in_fan_out",
              "kasa_config", "lora_dropout", "target_modules")  # fmt: skip

# architectures suffix → PEFT task_type
_TASKS = (
    ("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
)  # fmt: skip
_SEQ2SEQ = frozenset({"t5", "mt5", "bart", "mbart", "pegasus", "marian", "umt5", "longt5", "led",
                      "blenderbot", "m2m_100", "nllb-moe", "fsmt", "prophetnet"})  # fmt: skip


# transformers' ``base_model_prefix`` by model_type, for head classes (``*ForCausalLM``,
# ``GPT2LMHeadModel``…) whose checkpoints may store tensor names without it (the Hub's ``gpt2``
# stores ``h.0.attn.c_attn.weight``; PEFT sees the module ``transformer.h.0.attn.c_attn``).
_MODEL_PREFIX = {
    **dict.fromkeys(("gpt2", "gpt_bigcode", "gptj", "bloom", "falcon", "codegen", "mpt",
                     "imagegpt", "openai-gpt"), "transformer"),
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                     "gemma", "gemma2", "phi", "phi3", "olmo", "olmo2", "starcoder2", "cohere",
                     "granite", "stablelm", "opt", "deepseek_v3"), "model"),
    "gpt_neox": "gpt_neox", "bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta",
    "distilbert": "distilbert", "electra": "electra", "deberta": "deberta",
    "deberta-v2": "deberta",
}  # fmt: skip
_STRIPPABLE = frozenset(_MODEL_PREFIX.values()) | {"base_model"}


def peft_prefix(base: Checkpoint) -> str:
    """The module-name prefix PEFT's model has but the checkpoint's tensor names lack.

    ``"transformer."`` for a ``GPT2LMHeadModel`` checkpoint stored as ``h.0…``; ``""`` when the
    names already carry it, for base-model classes (``LlamaModel``) and unknown architectures.
    """
    cfg = base.config
    archs = cfg.get("architectures") or []
    p = _MODEL_PREFIX.get(cfg.get("model_type"))
    if not p or not archs:
        return ""
    arch = archs[0]
    head = not arch.endswith("Model") or arch.endswith(("LMHeadModel", "DoubleHeadsModel"))
    if not head or any(n.startswith(p + ".") for n in base.names()):
        return ""
    return p + "."


def resolve_weight(ckpt: Checkpoint, module: str) -> str | None:
    """The tensor holding ``module``'s weight in ``ckpt``: ``<module>.weight``, or the same
    without a leading wrapper component (``transformer.``, ``model.``…) the checkpoint omits."""
    name = f"{module}.weight"
    if name in ckpt:
        return name
    first, _, rest = module.partition(".")
    if rest and first in _STRIPPABLE and f"{rest}.weight" in ckpt:
        return f"{rest}.weight"
    return None


# -- PEFT's matching rules, re-implemented so that validation agrees with what PEFT will do -------
def pattern_key(keys: Iterable[str], module: str) -> str | None:
    """Return the first ``rank_pattern``/``alpha_pattern`` key PEFT would use for ``module``.

    PEFT (``utils/other.py::get_pattern_key``) tries ``re.match(rf"(.*\\.)?({key})$", module)``
    for each key in order; the first hit wins.
    """
    for k in keys:
        try:
            if re.match(rf"(.*\.)?({k})$", module):
                return k
        except re.error:
            continue
    return None


def targets_module(config: Mapping[str, Any], module: str) -> bool:
    """Whether PEFT would wrap ``module`` given ``config`` (``check_target_module_exists``)."""
    excl = config.get("exclude_modules")
    if excl:
        if isinstance(excl, str):
            if re.fullmatch(excl, module):
                return False
        elif module in excl or any(module.endswith(f".{e}") for e in excl):
            return False
    mts = config.get("modules_to_save") or []
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in mts):
        return False
    tm = config.get("target_modules")
    if tm is None:
        # PEFT falls back to its per-architecture defaults (q_proj, v_proj for Llama): accept
        # the key set as written (it cannot be checked without the architecture table).
        return True
    if tm == "all-linear":  # PEFT's shorthand: every linear layer except the output head
        return module.rsplit(".", 1)[-1] not in ("lm_head", "embed_out", "score", "classifier")
    if isinstance(tm, str):
        try:
            return re.fullmatch(tm, module) is not None
        except re.error:
            return False
    if module in tm:
        return True
    found = any(module.endswith(f".{t}") for t in tm)
    layers = config.get("layers_to_transform")
    if found and layers not in (None, []):
        pats = config.get("layers_pattern")
        m = None
        if not pats:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        else:
            for p in [pats] if isinstance(pats, str) else pats:
                m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
                if m:
                    break
        if m is None:
            return False
        idx = int(m.group("idx"))
        return idx == layers if isinstance(layers, int) else idx in layers
    return found


def task_type_for(base_config: Mapping[str, Any] | None) -> str | None:
    """Map a base ``config.json`` (``architectures``, ``model_type``) to PEFT's ``task_type``."""
    if not base_config:
        return None
    archs = base_config.get("architectures") or []
    for arch in archs:
        for suffix, task in _TASKS:
            if arch.endswith(suffix):
                return task
        if arch.endswith("ForConditionalGeneration") and base_config.get("model_type") in _SEQ2SEQ:
            return "SEQ_2_SEQ_LM"
        if arch.endswith("Model"):
            return "FEATURE_EXTRACTION"
    return None


def is_hub_id(s: Any) -> bool:
    """True for ``org/name`` strings that are not local paths (``base_model_name_or_path``)."""
    if not isinstance(s, str) or not HUB_ID.match(s) or "@" in s:
        return False
    if s.startswith((".", "/", "~")) or os.path.isabs(s):
        return False
    return not os.path.exists(s)


def find_adapter_dir(path: str | os.PathLike[str]) -> Path:
    """Resolve a user path to the folder holding ``adapter_config.json``.

    Accepts the adapter folder, its ``adapter_model.safetensors``, or a ``surgery decompose``
    output (``OUT`` with the adapter in ``OUT/adapter``). Refuses pickled adapters.
    """
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise _pickle_error(p)
        p = p.parent
    if not p.is_dir():
        raise SurgeryError(
            f"{path}: no such adapter folder (expected a folder with "
            f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
        )
    if not (p / ADAPTER_CONFIG).is_file() and (p / "adapter" / ADAPTER_CONFIG).is_file():
        p = p / "adapter"
    if not (p / ADAPTER_WEIGHTS).is_file():
        pickles = sorted(
            q for q in p.glob("adapter_model.*") if q.suffix.lower() in PICKLE_SUFFIXES
        )
        if pickles:
            raise _pickle_error(pickles[0])
        raise SurgeryError(f"{p}: no {ADAPTER_WEIGHTS} (is this a PEFT adapter folder?)")
    if not (p / ADAPTER_CONFIG).is_file():
        raise SurgeryError(
            f"{p}: {ADAPTER_CONFIG} is missing; an adapter needs both "
            f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
        )
    return p


def _pickle_error(p: Path) -> SurgeryError:
    return SurgeryError(
        f"{p} is a pickled adapter; surgery never loads pickle files (they can run code). Convert "
        "it once where you trust the file: PeftModel.from_pretrained(base_model, folder)"
        ".save_pretrained(out) writes adapter_model.safetensors (PEFT's default)"
    )


def _raise(problems: list[str], what: str) -> None:
    if not problems:
        return
    head = f"{what}: {len(problems)} problem(s):\n  - "
    body = "\n  - ".join(problems[:MAX_LISTED])
    more = f"\n  … and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise SurgeryError(head + body + more)


def _num(x: float) -> int | float:
    """An alpha as JSON: an int when it is one (to 1e-6 relative), else a float."""
    r = round(x)
    if abs(x - r) <= 1e-6 * max(1.0, abs(x)):
        return int(r)
    return float(x)


def _np(x: Any, dtype: Any = np.float32) -> np.ndarray:
    """A numpy array of ``dtype`` from a numpy, cupy or torch array (no copy when it already is)."""
    kind = type(x).__module__.split(".")[0]
    if kind == "torch":
        x = x.detach().cpu()
        wide = x.dtype.is_floating_point and x.element_size() >= 4  # numpy has no bf16
        x = x.numpy() if wide else x.float().numpy()
    elif kind == "cupy":
        x = x.get()
    return np.asarray(x, dtype=dtype)


def _np32(x: Any) -> np.ndarray:
    """A contiguous float32 numpy array of ``x`` (what adapter files store)."""
    return np.ascontiguousarray(_np(x, np.float32))


_NP_FLOATS = {"torch.float32": np.float32, "torch.float64": np.float64}


def _np_dtype(dtype: Any) -> Any:
    """numpy float dtype for a torch or numpy dtype (``None``: float32)."""
    if dtype is None:
        return np.float32
    if str(dtype) in _NP_FLOATS:
        return _NP_FLOATS[str(dtype)]
    if str(dtype).startswith("torch."):
        raise SurgeryError(f"adapter updates are computed in float32 or float64, not {dtype}")
    return np.dtype(dtype).type


@dataclass
class Adapter:
    """A PEFT LoRA adapter in memory.

    Attributes:
        modules: module name (``model.layers.0.self_attn.q_proj``) → :class:`LowRank` in the
            weight orientation, with the module's effective scale (α/r, α/√r with rsLoRA,
            α/(init_r+1e-5) for AdaLoRA). Factors may be torch or numpy (float32 on write).
        config: the ``adapter_config.json`` dict (as read, or caller overrides on write).
        embeddings: modules stored as ``lora_embedding_A/B``.
        diag: KaSA ``lora_diag`` per module, ``(r,)``.
        E: AdaLoRA ``lora_E`` per module, ``(r,)`` (read only; :meth:`fold` makes a plain LoRA).
        magnitude: DoRA ``lora_magnitude_vector`` per module, ``(out,)``.
        bias: ``lora_B.bias`` per module, ``(out,)`` (``lora_bias: true``).
        full: full tensors stored in the adapter (``modules_to_save``, embedding
            ``base_layer.weight``), keyed by the base tensor name they replace.
        path: the folder it was read from.
    """

    modules: dict[str, LowRank]
    config: dict[str, Any] = field(default_factory=dict)
    embeddings: set[str] = field(default_factory=set)
    diag: dict[str, Any] = field(default_factory=dict)
    E: dict[str, Any] = field(default_factory=dict)
    magnitude: dict[str, Any] = field(default_factory=dict)
    bias: dict[str, Any] = field(default_factory=dict)
    full: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    # -- facts ----------------------------------------------------------------------------------
    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "LORA")).upper()

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def flavour(self) -> str:
        """``lora``, ``kasa``, ``adalora``, ``dora`` or ``residual`` (an init PEFT re-runs)."""
        if self.peft_type == "ADALORA" or self.E:
            return "adalora"
        if self.magnitude or self.config.get("use_dora"):
            return "dora"
        if self.diag or self.config.get("kasa_config"):
            return "kasa"
        init = self.config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
            return "residual"
        return "lora"

    def rank(self, module: str) -> int:
        return self.modules[module].rank

    def weight_name(self, module: str) -> str:
        """The base tensor this module's update applies to (``<module>.weight``)."""
        return f"{module}.weight"

    # -- effective updates ----------------------------------------------------------------------
    def delta_array(self, module: str, dtype: Any = np.float32, *, stored: bool = False):
        """Return the module's additive update ``ΔW`` ``(out, in)`` as PEFT computes it (numpy).

        Plain / rsLoRA / patterns: ``s·B A``; KaSA: ``s·(B ⊙ d) A``; AdaLoRA: ``s·B (A ⊙ E)`` with
        ``s = α/(init_r + 1e-5)``; embeddings: ``s·(B_e A_e)ᵀ`` (already folded into the weight
        orientation). KaSA's base truncation and DoRA's renormalisation depend on the base weight:
        use :meth:`merge_weight_array` for those.

        Args:
            module: module name.
            dtype: compute dtype (float32 default; float64 for references).
            stored: return PEFT's ``transpose(ΔW, fan_in_fan_out)`` layout ``(in, out)`` when the
                config sets ``fan_in_fan_out`` (GPT-2 ``Conv1D``; embeddings are never transposed).
        """
        dt = _np_dtype(dtype)
        lr = self.modules[module]
        a = _np(lr.A, dt)  # (r, in)
        b = _np(lr.B, dt)  # (out, r)
        if module in self.diag:
            b = b * _np(self.diag[module], dt).reshape(1, -1)
        if module in self.E:
            a = a * _np(self.E[module], dt).reshape(-1, 1)
        d = (b @ a) * dt(lr.scale)  # (out, in)
        if stored and self.config.get("fan_in_fan_out") and module not in self.embeddings:
            d = np.ascontiguousarray(d.T)
        return d

    def merge_weight_array(self, module: str, w: Any, dtype: Any = np.float32) -> np.ndarray:
        """Return what PEFT's ``merge_and_unload`` makes of the base weight ``w`` ``(out, in)``.

        ``W + ΔW`` for plain LoRA, rsLoRA, AdaLoRA and embeddings; KaSA first drops the ``r``
        smallest singular components of ``W`` (``k = min(out, in)``, as PEFT does at load, in
        float64 here); DoRA rescales each row of ``W + ΔW`` to the stored magnitude.

        Args:
            module: module name.
            w: the base weight in ``(out, in)`` orientation (numpy or torch, any float dtype).
            dtype: compute/return dtype (default float32).
        """
        dt = _np_dtype(dtype)
        w = _np(w, dt)
        if self.weight_name(module) in self.full:
            w = _np(self.full[self.weight_name(module)], dt)
        kasa = self.config.get("kasa_config") and module not in self.embeddings
        if module in self.diag or kasa:
            w = kasa_truncate_array(w, self.rank(module)).astype(dt)
        out = w + self.delta_array(module, dt)
        if module in self.magnitude:
            # DoRA (PEFT dora.py): W' = m / ||W + s·BA||_row · (W + s·BA), norms over `in`.
            norm = np.linalg.norm(out, axis=1)
            out = out * (_np(self.magnitude[module], dt) / norm).reshape(-1, 1)
        return out

    def bias_delta_array(self, module: str, dtype: Any = np.float32) -> np.ndarray | None:
        """Return the bias update ``s·lora_B.bias`` ``(out,)`` (``lora_bias``), or ``None``."""
        if module not in self.bias:
            return None
        dt = _np_dtype(dtype)
        return _np(self.bias[module], dt) * dt(self.modules[module].scale)

    # torch views of the same (for callers holding torch tensors; the verbs use the arrays)
    def delta(
        self, module: str, dtype: torch.dtype | None = None, *, stored: bool = False
    ) -> torch.Tensor:
        """:meth:`delta_array` as a CPU torch tensor (``dtype``: torch.float32 or float64)."""
        import torch

        return torch.from_numpy(self.delta_array(module, dtype, stored=stored))

    def merge_weight(
        self, module: str, w: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """:meth:`merge_weight_array` as a CPU torch tensor."""
        import torch

        return torch.from_numpy(self.merge_weight_array(module, w, dtype))

    def bias_delta(self, module: str, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """:meth:`bias_delta_array` as a CPU torch tensor, or ``None``."""
        import torch

        d = self.bias_delta_array(module, dtype)
        return None if d is None else torch.from_numpy(d)

    def fold(self) -> Adapter:
        """Return a plain LoRA with the same updates: KaSA ``diag`` folded into ``A``, AdaLoRA
        ``E`` folded into ``A`` with pruned (``E == 0``) triplets dropped.

        KaSA's base truncation is *not* part of the result: the plain LoRA applies on the truncated
        base (``surgery convert`` makes that explicit). DoRA cannot be folded (its update depends on
        ``W``) and raises.
        """
        if self.magnitude:
            raise SurgeryError(
                "a DoRA adapter has no plain-LoRA equivalent independent of the base weights; "
                "apply it with `surgery apply` instead"
            )
        mods: dict[str, LowRank] = {}
        for m, lr in self.modules.items():
            a, b = _np(lr.A), _np(lr.B)
            if m in self.diag:
                a = _np(self.diag[m]).reshape(-1, 1) * a
            if m in self.E:
                e = _np(self.E[m]).reshape(-1)
                keep = np.flatnonzero(e != 0)
                a = (a * e.reshape(-1, 1))[keep]
                b = b[:, keep]
            mods[m] = LowRank(A=np.ascontiguousarray(a), B=np.ascontiguousarray(b), scale=lr.scale)
        cfg = {k: v for k, v in self.config.items() if k in _KEPT_KEYS and k != "kasa_config"}
        if self.peft_type == "ADALORA":
            cfg.pop("target_modules", None)  # AdaLoRA may drop whole modules (rank 0)
        mods = {m: lr for m, lr in mods.items() if lr.rank > 0}
        return Adapter(
            modules=mods,
            config=cfg,
            embeddings=set(self.embeddings) & set(mods),
            bias={m: v for m, v in self.bias.items() if m in mods},
            full=dict(self.full),
        )

    # -- reading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Adapter:
        """Read and validate a PEFT adapter folder (see :func:`find_adapter_dir`).

        Raises:
            SurgeryError: pickles, unknown adapter types, and every key/config inconsistency PEFT
                would silently ignore, in one message.
        """
        root = find_adapter_dir(path)
        try:
            config = json.loads((root / ADAPTER_CONFIG).read_text())
        except ValueError as e:
            raise SurgeryError(f"{root / ADAPTER_CONFIG}: invalid JSON ({e})") from None
        if not isinstance(config, dict):
            raise SurgeryError(f"{root / ADAPTER_CONFIG}: expected a JSON object")
        problems: list[str] = []
        tensors = _read_tensors(root / ADAPTER_WEIGHTS, problems)
        ptype = str(config.get("peft_type", "")).upper()
        if not ptype:
            problems.append(
                'adapter_config.json has no peft_type (PEFT requires it; add "peft_type": "LORA")'
            )
        elif ptype not in ("LORA", "ADALORA"):
            raise SurgeryError(
                f"{root}: unknown adapter type peft_type={config['peft_type']!r}; surgery reads "
                "LORA (incl. rsLoRA, DoRA, KaSA, embedding LoRAs) and ADALORA adapters"
            )
        parsed = _parse_keys(tensors, config, problems)
        adapter = _build(parsed, config, problems)
        _raise(problems, f"adapter {root}")
        adapter.path = root
        return adapter

    # -- writing --------------------------------------------------------------------------------
    def build_config(
        self, base: Checkpoint | None = None, *, leaf_targets: bool = False
    ) -> dict[str, Any]:
        """Compute the ``adapter_config.json`` this adapter is written with (see the module doc).

        Args:
            base: the base checkpoint (shape checks, task type, Hub id, exact targets).
            leaf_targets: always write ``target_modules`` as the sorted leaf names (the serving
                profile; SGLang indexes the list). Base modules with those names that the adapter
                lacks are then wrapped by PEFT with a zero update (``B = 0``) and a missing-keys
                warning: the same function, but not an exact target set.
        """
        problems: list[str] = []
        if self.E or self.peft_type == "ADALORA":
            raise SurgeryError(
                "AdaLoRA adapters are read-only here; fold them into a plain LoRA "
                "first (Adapter.fold(), or `surgery convert ADAPTER -o OUT`)"
            )
        if not self.modules:
            raise SurgeryError("an adapter needs at least one module")
        rs = self.use_rslora
        ranks = {m: lr.rank for m, lr in self.modules.items()}
        alphas = {
            m: _num(lr.scale * (math.sqrt(lr.rank) if rs else lr.rank))
            for m, lr in self.modules.items()
        }
        r = max(Counter(ranks.values()).most_common(), key=lambda kv: (kv[1], kv[0]))[0]
        by_alpha = Counter(alphas.values())
        alpha = max(
            by_alpha, key=lambda a: (by_alpha[a], max(ranks[m] for m in ranks if alphas[m] == a))
        )
        cfg: dict[str, Any] = {
            "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
            "revision": None, "r": r, "lora_alpha": alpha, "use_rslora": rs,
            "rank_pattern": _pattern(ranks, r),
            "alpha_pattern": _pattern(alphas, alpha),
            "target_modules": None, "fan_in_fan_out": False, "init_lora_weights": True,
            "bias": "none", "lora_bias": bool(self.bias), "lora_dropout": 0.0,
            "use_dora": bool(self.magnitude), "modules_to_save": None, "layers_to_transform": None,
            "layers_pattern": None, "layer_replication": None, "inference_mode": True,
        }  # fmt: skip
        for k in _KEPT_KEYS:
            if self.config.get(k) is not None:
                cfg[k] = self.config[k]
        cfg["use_rslora"] = rs
        if self.diag:
            cfg["kasa_config"] = self.config.get("kasa_config") or {"beta": 1e-4, "gamma": 1e-3}
        else:
            cfg.pop("kasa_config", None)
        if base is not None:
            if cfg["task_type"] is None:
                cfg["task_type"] = task_type_for(base.config)
            if base.revision and is_hub_id(base.source):
                cfg["base_model_name_or_path"], cfg["revision"] = base.source, base.revision
            elif cfg["base_model_name_or_path"] is None:
                cfg["base_model_name_or_path"] = base.config.get("_name_or_path")
            conv = [
                m
                for m in self.modules
                if m not in self.embeddings
                and resolve_weight(base, m) is not None
                and base.is_conv1d(resolve_weight(base, m))
            ]
            cfg["fan_in_fan_out"] = bool(conv)
            problems += _check_against_base(self, base)
        name = cfg["base_model_name_or_path"]
        if name is not None and not is_hub_id(name):
            log.warning(
                "base_model_name_or_path %r is not a Hub id; writing null instead (an "
                "adapter must not carry local paths)",
                name,
            )
            cfg["base_model_name_or_path"], cfg["revision"] = None, None
        if leaf_targets:
            cfg["target_modules"] = sorted({m.rsplit(".", 1)[-1] for m in self.modules})
        elif self.config.get("target_modules") is None or not _targets_exactly(
            cfg, self.modules, _base_modules(base)
        ):
            cfg["target_modules"] = _target_modules(self.modules, _base_modules(base))
        _raise(problems, "adapter")
        return cfg

    def tensors(self) -> dict[str, np.ndarray]:
        """The ``adapter_model.safetensors`` content: PEFT keys → float32 numpy arrays (sorted).

        numpy rather than torch: writing an adapter never imports torch (about 1.5 s).
        """
        out: dict[str, np.ndarray] = {}
        for m, lr in self.modules.items():
            a, b = _np32(lr.A), _np32(lr.B)
            if m in self.embeddings:
                out[f"{PREFIX}{m}.lora_embedding_A"] = b.T  # (r, vocab)
                out[f"{PREFIX}{m}.lora_embedding_B"] = a.T  # (dim, r)
            else:
                out[f"{PREFIX}{m}.lora_A.weight"] = a
                out[f"{PREFIX}{m}.lora_B.weight"] = b
            if m in self.diag:
                out[f"{PREFIX}{m}.lora_diag"] = _np32(self.diag[m]).reshape(-1)
            if m in self.magnitude:
                out[f"{PREFIX}{m}.lora_magnitude_vector"] = _np32(self.magnitude[m]).reshape(-1)
            if m in self.bias:
                out[f"{PREFIX}{m}.lora_B.bias"] = _np32(self.bias[m]).reshape(-1)
        if self.full:
            raise SurgeryError(
                f"the adapter holds full tensors ({', '.join(sorted(self.full)[:3])}): surgery "
                "writes LoRA factors only; drop them (they replace base weights) or use `apply`"
            )
        return {k: np.ascontiguousarray(out[k]) for k in sorted(out)}

    def save(
        self,
        out: str | os.PathLike[str],
        base: Checkpoint | None = None,
        *,
        leaf_targets: bool = False,
    ) -> Path:
        """Validate and write ``adapter_model.safetensors`` + ``adapter_config.json`` to ``out``.

        The bytes are deterministic: float32 factors, sorted keys, metadata ``{"format": "pt"}``,
        ``sort_keys`` JSON. With ``base``, module shapes are checked against it and ``task_type``,
        ``fan_in_fan_out``, the Hub id and exact ``target_modules`` are derived from it.

        Raises:
            SurgeryError: listing every inconsistency, before anything is written.
        """
        from safetensors.numpy import save

        problems: list[str] = []
        for m, lr in self.modules.items():
            problems += _check_module(self, m, lr)
        _raise(problems, "adapter")
        if base is not None:
            self._canonical_names(base)
        cfg = self.build_config(base, leaf_targets=leaf_targets)
        tensors = self.tensors()
        shapes = {k: tuple(t.shape) for k, t in tensors.items()}
        problems = _validate_keys(cfg, shapes)
        _raise(problems, "adapter (internal: written keys disagree with the config)")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / ADAPTER_WEIGHTS).write_bytes(save(tensors, metadata={"format": "pt"}))
        (out / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        self.config, self.path = cfg, out
        return out

    def _canonical_names(self, base: Checkpoint) -> None:
        """Rename modules to the names PEFT's model has for ``base`` (in place).

        Checkpoint names get ``peft_prefix`` (``h.0.attn.c_attn`` → ``transformer.h.0…`` for a
        GPT-2 LM checkpoint stored without it); PEFT names stay. Keys PEFT cannot match would
        make the adapter a silent no-op.
        """
        pfx = peft_prefix(base)
        ren: dict[str, str] = {}
        for m in self.modules:
            wn = resolve_weight(base, m)
            if wn is not None:
                ren[m] = pfx + wn[: -len(".weight")]
        if all(k == v for k, v in ren.items()):
            return
        if len(set(ren.values())) != len(ren):
            raise SurgeryError("two adapter modules map to the same base tensor")
        r = lambda d: {ren.get(k, k): v for k, v in d.items()}  # noqa: E731
        self.modules, self.diag, self.E = r(self.modules), r(self.diag), r(self.E)
        self.magnitude, self.bias = r(self.magnitude), r(self.bias)
        self.embeddings = {ren.get(m, m) for m in self.embeddings}
        log.info("adapter modules renamed to PEFT's names (prefix %r)", pfx)


# -- helpers: base checks, targets ----------------------------------------------------------------
def kasa_truncate_array(w: Any, r: int) -> np.ndarray:
    """Drop the ``r`` smallest singular components of ``w`` (PEFT's KaSA rule, float64 SVD).

    Returns the float64 ``(out, in)`` numpy array ``U_k Σ_k V_kᵀ`` with ``k = min(out, in) − r``.
    """
    from ops.linalg import svd

    k = min(w.shape)
    if r >= k:
        raise SurgeryError(f"KaSA rank {r} must be < min(out, in) = {k}")
    u, s, vh = svd(_np(w, np.float64))
    keep = k - r
    return (u[:, :keep] * s[:keep]) @ vh[:keep]


def kasa_truncate(w: torch.Tensor, r: int) -> torch.Tensor:
    """:func:`kasa_truncate_array` of a torch tensor, as a float64 CPU torch tensor."""
    import torch

    return torch.from_numpy(kasa_truncate_array(w, r))


def _read_tensors(path: Path, problems: list[str]) -> dict[str, np.ndarray]:
    """An adapter file's tensors as float numpy arrays (bf16/fp16 widened exactly to float32).

    Read without torch (about 1.5 s of import saved for apply/port/convert). Non-float dtypes and
    NaN/Inf values go to ``problems``.
    """
    from ops.backend import bf16_to_f32

    from .checkpoint import Checkpoint

    read_header(path)  # clear errors for truncated/corrupt files
    ck = Checkpoint.open(path)
    out: dict[str, np.ndarray] = {}
    for k in ck.names():
        dt = ck.dtype(k)
        if dt not in ("F16", "BF16", "F32", "F64"):
            problems.append(f"{k}: dtype {dt} is not a float type")
            continue
        a = ck.array(k, oriented=False)  # the stored layout: adapter keys are never Conv1D
        a = bf16_to_f32(a) if dt == "BF16" else (a.astype(np.float32) if dt == "F16" else a)
        if not np.isfinite(a).all():
            problems.append(f"{k}: contains NaN or Inf values")
        out[k] = a
    return out


def _pattern(values: Mapping[str, Any], default: Any) -> dict[str, Any]:
    """Pattern entries for modules whose value differs from the default.

    A full module name used as a PEFT pattern key also matches longer names ending in it
    (``x.model.layers.1.mlp.up_proj``); such keys are anchored with ``^`` so that PEFT's
    ``re.match(rf"(.*\\.)?({key})$", name)`` only accepts the module itself.
    """
    out: dict[str, Any] = {}
    for m in sorted(values):
        if values[m] == default:
            continue
        clash = any(o != m and re.match(rf"(.*\.)?({m})$", o) for o in values)
        out["^" + m if clash else m] = values[m]
    return out


def _base_modules(base: Checkpoint | None) -> list[str] | None:
    """The base's 2-D weight modules under the names PEFT will see (``peft_prefix`` added)."""
    if base is None:
        return None
    pfx = peft_prefix(base)
    return [
        pfx + n[: -len(".weight")]
        for n in base.names()
        if n.endswith(".weight") and len(base.shape(n)) == 2
    ]


def _target_modules(modules: Iterable[str], base_modules: list[str] | None) -> list[str] | str:
    """Leaf names when they select exactly ``modules`` in the base, else an exact regex."""
    mods = sorted(set(modules))
    leaves = sorted({m.rsplit(".", 1)[-1] for m in mods})
    if base_modules is not None:
        hit = {b for b in base_modules if b in leaves or any(b.endswith("." + t) for t in leaves)}
        if hit == set(mods):
            return leaves
    return "^(" + "|".join(re.escape(m) for m in mods) + ")$"


def _targets_exactly(
    cfg: Mapping[str, Any], modules: Iterable[str], base_modules: list[str] | None
) -> bool:
    mods = set(modules)
    if not all(targets_module(cfg, m) for m in mods):
        return False
    if base_modules is None:
        return True
    return {b for b in base_modules if targets_module(cfg, b)} <= mods


def _check_module(ad: Adapter, m: str, lr: LowRank) -> list[str]:
    p: list[str] = []
    if m.endswith(".weight") or m.startswith(PREFIX) or not m:
        p.append(
            f"{m!r}: module names are paths like 'model.layers.0.self_attn.q_proj' (no "
            f"'{PREFIX}' prefix, no '.weight')"
        )
    a, b = lr.A, lr.B
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
        p.append(f"{m}: A {tuple(a.shape)} and B {tuple(b.shape)} are not (r, in) and (out, r)")
        return p
    if a.shape[0] == 0:
        p.append(f"{m}: rank 0 (PEFT rejects r=0); drop the module")
    if not math.isfinite(lr.scale):
        p.append(f"{m}: scale {lr.scale} is not finite")
    r, out = a.shape[0], b.shape[0]
    if m in ad.diag and tuple(ad.diag[m].shape) not in ((r,), (r, 1)):
        p.append(f"{m}: lora_diag shape {tuple(ad.diag[m].shape)} should be ({r},)")
    if ad.diag and m not in ad.diag and m not in ad.embeddings:
        p.append(f"{m}: KaSA adapters need lora_diag on every linear module")
    if m in ad.magnitude and tuple(ad.magnitude[m].shape) != (out,):
        p.append(f"{m}: DoRA magnitude shape {tuple(ad.magnitude[m].shape)} should be ({out},)")
    if m in ad.bias and tuple(ad.bias[m].shape) != (out,):
        p.append(f"{m}: lora_B.bias shape {tuple(ad.bias[m].shape)} should be ({out},)")
    if m in ad.embeddings and (m in ad.diag or m in ad.bias):
        p.append(f"{m}: embedding LoRAs support neither lora_diag nor lora_bias in PEFT")
    for t, what in ((a, "A"), (b, "B")):
        if not bool(np.isfinite(_np32(t)).all()):
            p.append(f"{m}: {what} contains NaN or Inf")
    return p


def _check_against_base(ad: Adapter, base: Checkpoint) -> list[str]:
    p: list[str] = []
    names = set(base.names())
    for m, lr in sorted(ad.modules.items()):
        wn = resolve_weight(base, m) or ad.weight_name(m)
        if wn not in names:
            from .errors import did_you_mean

            hint = did_you_mean(wn, names)
            p.append(
                f"{m}: no tensor {wn!r} in the base {base.source}"
                + (f" (did you mean {hint!r}?)" if hint else "")
            )
            continue
        shape = tuple(base.shape(wn))
        want = (lr.B.shape[0], lr.A.shape[1])
        if shape != want:
            p.append(f"{m}: the update is {want} but {wn} is {shape} in {base.source}")
    return p


# -- helpers: parsing and validating the key set --------------------------------------------------
def _parse_keys(
    tensors: Mapping[str, Any], config: Mapping[str, Any], problems: list[str]
) -> dict[str, dict[str, Any]]:
    """Group tensors by module and role; record keys PEFT would ignore."""
    by_mod: dict[str, dict[str, Any]] = {}
    unprefixed: list[str] = []
    mts = config.get("modules_to_save") or []
    for key in sorted(tensors):
        t = tensors[key]
        if not key.startswith(PREFIX):
            unprefixed.append(key)
            continue
        k = key[len(PREFIX) :].replace(".default.", ".")
        if k.endswith(".default"):
            k = k[: -len(".default")]
        for suf, role in _SUFFIXES:
            if k.endswith(suf):
                by_mod.setdefault(k[: -len(suf)], {})[role] = (key, t)
                break
        else:
            # modules_to_save: full copies under the module path (`…modules_to_save.weight` too)
            k2 = k.replace(".modules_to_save.", ".")
            if any(re.match(rf"(^|.*\.){m}($|\..*)", k2) for m in mts):
                by_mod.setdefault("", {}).setdefault("full", {})[k2] = t
            else:
                problems.append(
                    f"{key}: not a LoRA tensor PEFT knows (lora_A/lora_B/"
                    "lora_embedding_A/B/lora_diag/lora_E/lora_magnitude_vector); "
                    "PEFT would ignore it silently"
                )
    if unprefixed:
        problems.append(
            f"{len(unprefixed)} key(s) lack the '{PREFIX}' prefix, e.g. "
            f"{unprefixed[0]!r}; PEFT loads such an adapter as a no-op. Rename them "
            f"to '{PREFIX}<module>.lora_A.weight'"
        )
    return by_mod


def _validate_keys(cfg: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Check a key → shape map against a LORA config exactly as PEFT would load it."""
    p: list[str] = []
    parsed = _parse_keys(shapes, cfg, p)
    _build(parsed, dict(cfg), p, shapes_only=True)
    return p


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x) if isinstance(x, tuple) else tuple(x.shape)


def _build(
    parsed: dict[str, dict[str, Any]],
    config: dict[str, Any],
    problems: list[str],
    shapes_only: bool = False,
) -> Adapter:
    """Turn grouped tensors into an :class:`Adapter`, checking each module against the config."""
    ada = str(config.get("peft_type", "LORA")).upper() == "ADALORA"
    rs = bool(config.get("use_rslora", False))
    r0, a0 = config.get("r", 8), config.get("lora_alpha", 8)
    rp = config.get("rank_pattern") or {}
    ap = config.get("alpha_pattern") or {}
    kasa = bool(config.get("kasa_config"))
    dora = bool(config.get("use_dora"))
    lbias = bool(config.get("lora_bias"))
    init_r = int(config.get("init_r", 12))
    full = parsed.pop("", {}).get("full", {})
    mods: dict[str, LowRank] = {}
    emb: set[str] = set()
    extras: dict[str, dict[str, Any]] = {"diag": {}, "E": {}, "magnitude": {}, "bias": {}}
    if ada:
        # AdaLoRA's rank_pattern maps "<module>.lora_E" to a boolean mask over init_r triplets
        rp = {k[: -len(".lora_E")] if k.endswith(".lora_E") else k: v for k, v in rp.items()}
    for m in sorted(parsed):
        roles = parsed[m]
        if "base_layer" in roles:
            full[f"{m}.weight"] = roles["base_layer"][1]
        is_emb = "emb_A" in roles or "emb_B" in roles
        a_role, b_role = (
            ("emb_A", "emb_B") if is_emb else (("ada_A", "ada_B") if ada else ("A", "B"))
        )
        if not ada and ({"ada_A", "ada_B", "E"} & roles.keys()):
            problems.append(
                f"{m}: bare lora_A/lora_B/lora_E keys are AdaLoRA's, but peft_type is "
                f"{config.get('peft_type')!r}; PEFT would ignore them"
            )
            continue
        if ada and ({"A", "B"} & roles.keys()):
            problems.append(
                f"{m}: lora_A.weight/lora_B.weight keys in an ADALORA adapter; PEFT "
                "would ignore them (AdaLoRA stores bare lora_A/lora_B/lora_E)"
            )
            continue
        if "A_bias" in roles:
            problems.append(f"{roles['A_bias'][0]}: lora_A has no bias in PEFT (ignored there)")
        ka, ta = roles.get(a_role, (None, None))
        kb, tb = roles.get(b_role, (None, None))
        if ta is None or tb is None:
            if ta is None and tb is None and set(roles) <= {"base_layer"}:
                continue
            missing = "A" if ta is None else "B"
            problems.append(f"{m}: lora_{missing} is missing (every module needs both factors)")
            continue
        sa, sb = _shape(ta), _shape(tb)
        if len(sa) != 2 or len(sb) != 2:
            problems.append(f"{m}: factors must be 2-D, got {ka} {sa} and {kb} {sb}")
            continue
        if is_emb:
            r, out_ = sa[0], sa[1]  # A_e (r, vocab), B_e (dim, r)
        else:
            r, out_ = sa[0], sb[0]  # A (r, in), B (out, r)
        if sb[1] != r:
            problems.append(f"{m}: rank of {ka} {sa} and {kb} {sb} disagree")
            continue
        if not targets_module(config, m):
            problems.append(
                f"{m}: not selected by target_modules={config.get('target_modules')!r}"
                + (
                    f" / layers_to_transform={config.get('layers_to_transform')!r}"
                    if config.get("layers_to_transform") not in (None, [])
                    else ""
                )
                + "; PEFT would ignore its tensors. Add it to target_modules"
            )
        # rank and alpha the config gives this module (PEFT's get_pattern_key, first match wins)
        kr = pattern_key(rp.keys(), m)
        if ada:
            if kr is not None:
                mask = rp[kr]
                if not isinstance(mask, list) or sum(bool(x) for x in mask) != r:
                    problems.append(
                        f"{m}: rank_pattern mask keeps {sum(map(bool, mask))} "
                        f"triplets but the tensors have rank {r}"
                    )
            elif r != init_r:
                problems.append(f"{m}: rank {r} but init_r={init_r} and no rank_pattern entry")
            alpha = float(a0)
            scale = (alpha if alpha > 0 else float(r)) / (init_r + ADALORA_EPS)
        else:
            want_r = rp[kr] if kr is not None else r0
            if want_r != r:
                problems.append(
                    f"{m}: tensors have rank {r} but the config gives r={want_r}"
                    + ("" if kr else " (no rank_pattern entry)")
                    + "; PEFT fails with a size mismatch. Add "
                    f'"rank_pattern": {{"{m}": {r}}}'
                )
            ka_ = pattern_key(ap.keys(), m)
            alpha = float(ap[ka_] if ka_ is not None else a0)
            scale = alpha / (math.sqrt(r) if rs else r) if r > 0 else 0.0
        # extras
        if "diag" in roles:
            if not kasa:
                problems.append(
                    f"{m}: lora_diag without kasa_config in the config; PEFT would "
                    'ignore it silently (add "kasa_config": {}) '
                )
            elif _shape(roles["diag"][1]) != (r,):
                problems.append(f"{m}: lora_diag shape {_shape(roles['diag'][1])} != ({r},)")
            extras["diag"][m] = roles["diag"][1]
        elif kasa and not is_emb:
            problems.append(
                f"{m}: kasa_config is set but lora_diag is missing (PEFT would use a "
                "random diagonal)"
            )
        if "E" in roles:
            if _shape(roles["E"][1]) not in ((r, 1), (r,)):
                problems.append(f"{m}: lora_E shape {_shape(roles['E'][1])} != ({r}, 1)")
            extras["E"][m] = roles["E"][1] if shapes_only else roles["E"][1].reshape(-1)
        elif ada:
            problems.append(f"{m}: AdaLoRA module without lora_E")
        if "magnitude" in roles:
            if not dora:
                problems.append(
                    f"{m}: lora_magnitude_vector without use_dora: true; PEFT would ignore it"
                )
            elif _shape(roles["magnitude"][1]) != (out_,):
                problems.append(
                    f"{m}: magnitude shape {_shape(roles['magnitude'][1])} != ({out_},)"
                )
            extras["magnitude"][m] = roles["magnitude"][1]
        elif dora:
            problems.append(f"{m}: use_dora is set but lora_magnitude_vector is missing")
        if "bias" in roles:
            if not lbias:
                problems.append(
                    f'{roles["bias"][0]}: lora_B.bias without "lora_bias": true; '
                    "PEFT ignores it silently. Set lora_bias or drop the tensor"
                )
            elif _shape(roles["bias"][1]) != (out_,):
                problems.append(f"{m}: lora_B.bias shape {_shape(roles['bias'][1])} != ({out_},)")
            extras["bias"][m] = roles["bias"][1]
        if shapes_only:
            continue
        if is_emb:
            emb.add(m)
            mods[m] = LowRank(
                A=np.ascontiguousarray(tb.T), B=np.ascontiguousarray(ta.T), scale=scale
            )
        else:
            mods[m] = LowRank(A=ta, B=tb, scale=scale)
    if lbias and not extras["bias"] and mods:
        log.warning("lora_bias is true but no lora_B.bias tensor was found")
    return Adapter(
        modules=mods,
        config=dict(config),
        embeddings=emb,
        diag=extras["diag"],
        E=extras["E"],
        magnitude=extras["magnitude"],
        bias=extras["bias"],
        full=full,
    )
