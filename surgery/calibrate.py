"""Calibration straight from a JSONL file: per-module input covariances for CorDA.

``calibrate(src, "data.jsonl")`` builds the model described by the checkpoint's ``config.json``
with ``transformers`` (parameters on the meta device, then the checkpoint's own tensors assigned in
their stored dtype: nothing is downloaded and no fp32 copy of a bf16 model is made), registers
forward hooks on the targeted ``nn.Linear`` / ``Conv1D`` modules and accumulates, per module,

* ``cov_norm="max"`` (default, the official CorDA / PEFT convention): every sample's input
  ``X_b`` ``[tokens_b, in]`` (padding excluded) is divided by ``|max(X_b)|`` (the absolute value of
  the *signed* maximum) and ``C = Σ_b X̃_bᵀ X̃_b / n_samples``;
* ``cov_norm="none"``: the token-weighted ``C = Σ_b X_bᵀ X_b / n_tokens``.

Padding is masked per sample, so any batch size gives the covariance of batch size 1 (up to
floating-point summation order). Modules that see one token per sample (BERT's pooler) count that
token. The result is a :class:`surgery.stats.Stats` safetensors file keyed by checkpoint module
names (tensor name without ``.weight``).

Reference: CorDA, Yang et al., NeurIPS 2024, https://arxiv.org/abs/2406.05223 (covariance as in
iboing/CorDA and ``peft.tuners.lora.corda``).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .checkpoint import Checkpoint
from .errors import SurgeryError
from .stats import Stats, StatsWriter
from .writer import Entry

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "calibrate",
    "calibrate_beside",
    "stats_path_for",
    "plan_calibration",
    "read_calib",
    "build_model",
    "CalibPlan",
    "CalibProgress",
    "Sample",
    "parse_memory",
]

log = logging.getLogger("surgery")

FINGERPRINT_VERSION = "surgery-calib-v1"
MAX_LISTED = 20  # problems listed in one SurgeryError
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "spiece.model", "sentencepiece.bpe.model",
)  # fmt: skip
KINDS = ("input_ids", "messages", "prompt", "text")


# ----------------------------------------------------------------------------------------------
# Small records
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One calibration sample: the JSONL line it came from and its token ids (truncated)."""

    line: int
    ids: tuple[int, ...]


@dataclass(frozen=True)
class CalibProgress:
    """Progress report passed to the ``progress`` callback after every batch."""

    group: int  # 1-based module group (one pass over the data per group)
    groups: int
    samples: int  # samples done in this pass
    total_samples: int
    tokens: int  # tokens done in this pass
    total_tokens: int
    elapsed: float  # seconds since this pass started

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed if self.elapsed > 0 else 0.0


@dataclass
class CalibPlan:
    """Everything decided before any forward pass (also what ``--dry-run`` prints)."""

    ckpt: Checkpoint
    samples: list[Sample]
    modules: list[str]  # checkpoint module names, in model call order where known
    in_features: dict[str, int]
    groups: list[list[str]]
    cov_dtype: str  # "fp32" | "fp64"
    cov_norm: str
    batch_size: int
    seq_len: int
    device: str
    model_bytes: int
    budget: int  # bytes allowed for the covariances
    fingerprint: str
    options: dict[str, Any]
    model_class: str
    tokenizer_path: str | None
    data_path: Path
    _model_map: dict[str, str] = field(default_factory=dict)  # ckpt module -> model module
    config_path: str | None = None  # --config, when the checkpoint folder has no config.json

    @property
    def tokens(self) -> int:
        return sum(len(s.ids) for s in self.samples)

    def cov_bytes(self, modules: Iterable[str] | None = None) -> int:
        item = 8 if self.cov_dtype == "fp64" else 4
        return sum(self.in_features[m] ** 2 * item for m in (modules or self.modules))

    def describe(self) -> list[str]:
        """Human-readable lines: model, data, memory estimate, groups."""
        gib = _fmt_bytes
        peak_group = max((self.cov_bytes(g) for g in self.groups), default=0)
        conv = "per-sample |max| (official/PEFT)" if self.cov_norm == "max" else "token-weighted"
        lines = [
            f"model: {self.model_class} from {self.ckpt.source} ({gib(self.model_bytes)} of "
            f"weights, loaded in their stored dtype) on {self.device}",
            f"data: {len(self.samples)} samples, {self.tokens} tokens from {self.data_path} "
            f"(seq-len {self.seq_len}, batch size {self.batch_size})",
            f"modules: {len(self.modules)}; covariances {gib(self.cov_bytes())} in "
            f"{self.cov_dtype} (convention: {conv})",
            f"memory budget for covariances: {gib(self.budget)}; "
            f"{len(self.groups)} pass(es) over the data, largest group {gib(peak_group)}",
            f"estimated peak memory: {gib(self.model_bytes + peak_group + self._act_bytes())} "
            "(weights + covariances + activations of one batch)",
        ]
        return lines

    def _act_bytes(self) -> int:
        # A few hidden-state-sized tensors per layer plus the widest hooked input, upcast.
        cfg = self.ckpt.config
        hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model") or 0)
        widest = max(self.in_features.values(), default=hidden)
        per_tok = 4 * (8 * hidden + 3 * widest)
        return self.batch_size * self.seq_len * per_tok


def _fmt_bytes(b: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.2f} {unit}"
    return f"{int(b)} B"


# ----------------------------------------------------------------------------------------------
# Option parsing
# ----------------------------------------------------------------------------------------------
_MEM = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)


def parse_memory(spec: str | int | float | None) -> int | None:
    """``"8GB"``, ``"512MiB"``, ``"1.5g"`` or a byte count → bytes (``None`` stays ``None``).

    Decimal and binary suffixes are both read as powers of 1024 (what users mean for RAM).
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "auto")):
        return None
    if isinstance(spec, (int, float)):
        if spec <= 0:
            raise SurgeryError(f"--max-memory must be positive, got {spec}")
        return int(spec)
    m = _MEM.match(spec)
    if not m:
        raise SurgeryError(f"--max-memory: cannot parse {spec!r}; use e.g. 24GB, 512MiB or bytes")
    unit = (m.group(2) or "").lower()[:1]
    mult = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[unit]
    val = int(float(m.group(1)) * mult)
    if val <= 0:
        raise SurgeryError(f"--max-memory must be positive, got {spec!r}")
    return val


def _available_memory(device: str) -> int:
    """Free memory on the device now (bytes): CUDA free memory or Linux MemAvailable."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # macOS and friends: total physical memory as a loose upper bound
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def _torch_device(device: str | None) -> str:
    import torch

    d = (device or "auto").lower()
    if d in ("auto", ""):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d in ("gpu", "cuda") or d.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise SurgeryError(
                f"--device {device} was requested but torch sees no CUDA device; use --device cpu"
            )
        return "cuda" if d == "gpu" else d
    if d == "cpu":
        return "cpu"
    raise SurgeryError(f"unknown device {device!r}; choices: auto, cpu, cuda")


# ----------------------------------------------------------------------------------------------
# JSONL reading and tokenisation
# ----------------------------------------------------------------------------------------------
def _raise_problems(head: str, problems: list[str]) -> None:
    if not problems:
        return
    shown = problems[:MAX_LISTED]
    more = f"\n  … and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise SurgeryError(head + "\n  " + "\n  ".join(shown) + more)


def _check_line(obj: Any, where: str) -> tuple[str | None, str | None]:
    """Return ``(kind, problem)`` for one parsed JSONL value."""
    if not isinstance(obj, dict):
        return None, f"{where}: expected a JSON object, got {type(obj).__name__}"
    if "input_ids" in obj:
        ids = obj["input_ids"]
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids
        ):
            return None, f"{where}: 'input_ids' must be a list of integers"
        if not ids:
            return None, f"{where}: 'input_ids' is empty"
        return "input_ids", None
    if "messages" in obj:
        msgs = obj["messages"]
        ok = (
            isinstance(msgs, list)
            and msgs
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m
                for m in msgs
            )
        )
        if not ok:
            return None, (
                f"{where}: 'messages' must be a non-empty list of "
                '{"role": ..., "content": ...} objects'
            )
        return "messages", None
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not isinstance(obj.get("completion", ""), str):
            return None, f"{where}: 'prompt' and 'completion' must be strings"
        if not (obj["prompt"] + obj.get("completion", "")):
            return None, f"{where}: 'prompt' and 'completion' are empty"
        return "prompt", None
    if "text" in obj:
        if not isinstance(obj["text"], str):
            return None, f"{where}: 'text' must be a string"
        if not obj["text"]:
            return None, f"{where}: 'text' is empty"
        return "text", None
    keys = ", ".join(sorted(obj)[:6]) or "none"
    return None, (
        f"{where}: no known field (found: {keys}); each line needs one of "
        '"text", "messages", "prompt" (+ "completion") or "input_ids"'
    )


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """Load a tokenizer from a local folder only (never the network).

    Raises:
        SurgeryError: when the folder has no usable tokenizer files.
    """
    p = Path(path).expanduser()
    if not p.is_dir() or not any((p / n).is_file() for n in TOKENIZER_FILES):
        raise SurgeryError(
            f"no tokenizer files in {p} (looked for tokenizer.json, tokenizer_config.json, …); "
            'pass --tokenizer DIR, or use {"input_ids": [...]} lines'
        )
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        if (p / "tokenizer.json").is_file():
            # A bare tokenizer.json (no tokenizer_config.json) still makes a working fast tokenizer.
            return PreTrainedTokenizerFast(tokenizer_file=str(p / "tokenizer.json"))
        raise SurgeryError(f"cannot load the tokenizer in {p}: {e}") from None


def read_calib(
    path: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    tokenizer_loader: Callable[[], Any] | None = None,
    samples: int | None = None,
    seq_len: int | None = None,
    max_tokens: int | None = None,
    vocab_size: int | None = None,
) -> list[Sample]:
    """Read and validate a calibration JSONL file into token-id samples.

    Every line is checked first (JSON, a known field, field types); tokenisation follows, and
    all problems are raised together with their line numbers before any model compute.

    Args:
        path: the JSONL file. Blank lines are skipped.
        tokenizer: a transformers tokenizer (needed unless every used line has ``input_ids``).
        tokenizer_loader: called once to get the tokenizer when ``tokenizer`` is ``None`` and
            some line needs one (its ``SurgeryError`` is reported as a problem).
        samples: keep the first N valid samples (``None``: all).
        seq_len: truncate every sample to this many tokens.
        max_tokens: stop once this many tokens are collected (the last sample is truncated).
        vocab_size: ``input_ids`` must lie in ``[0, vocab_size)``.

    Raises:
        SurgeryError: empty file, malformed lines, missing tokenizer or chat template.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise SurgeryError(f"{p}: no such calibration file (expected a .jsonl file)")
    for name, v in (
        ("--calib-samples", samples),
        ("--seq-len", seq_len),
        ("--max-tokens", max_tokens),
    ):
        if v is not None and v <= 0:
            raise SurgeryError(f"{name} must be a positive integer, got {v}")
    problems: list[str] = []
    records: list[tuple[int, str, dict]] = []
    with open(p, "rb") as f:
        for no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                problems.append(f"{p.name}:{no}: not valid UTF-8")
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except ValueError as e:
                problems.append(f"{p.name}:{no}: invalid JSON ({e.msg} at column {e.colno})")
                continue
            kind, problem = _check_line(obj, f"{p.name}:{no}")
            if problem:
                problems.append(problem)
            else:
                records.append((no, kind, obj))
    _raise_problems(f"{p}: {len(problems)} bad line(s); fix them and rerun:", problems)
    if not records:
        raise SurgeryError(f"{p}: the file has no samples (it is empty or only blank lines)")
    if samples is not None:
        records = records[:samples]

    # Tokenise (only the lines that will be used).
    need_tok = [no for no, kind, _ in records if kind != "input_ids"]
    if need_tok and tokenizer is None:
        if tokenizer_loader is None:
            raise SurgeryError(
                f"{p}: line {need_tok[0]} needs a tokenizer (text/messages/prompt); "
                "pass --tokenizer DIR or use input_ids lines"
            )
        try:
            tokenizer = tokenizer_loader()
        except SurgeryError as e:
            raise SurgeryError(
                f"{p}: {len(need_tok)} line(s) need a tokenizer (first: line "
                f"{need_tok[0]}), but {e}"
            ) from None
    out: list[Sample] = []
    total = 0
    for no, kind, obj in records:
        where = f"{p.name}:{no}"
        if kind == "input_ids":
            ids = obj["input_ids"]
        elif kind == "messages":
            if not getattr(tokenizer, "chat_template", None):
                problems.append(
                    f"{where}: 'messages' need a chat template, but the tokenizer has "
                    "none; add chat_template to tokenizer_config.json or use 'text'"
                )
                continue
            try:
                rendered = tokenizer.apply_chat_template(obj["messages"], tokenize=False)
            except Exception as e:  # noqa: BLE001 - jinja/template errors vary
                problems.append(f"{where}: the chat template failed on these messages ({e})")
                continue
            # The template already holds BOS and friends: no second set of special tokens.
            ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        elif kind == "prompt":
            ids = tokenizer(obj["prompt"] + obj.get("completion", ""))["input_ids"]
        else:
            ids = tokenizer(obj["text"])["input_ids"]
        ids = [int(i) for i in ids]
        if not ids:
            problems.append(f"{where}: tokenises to zero tokens")
            continue
        if vocab_size is not None:
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                problems.append(
                    f"{where}: token id {bad[0]} is outside the model's vocabulary "
                    f"[0, {vocab_size})"
                )
                continue
        if seq_len is not None:
            ids = ids[:seq_len]
        if max_tokens is not None:
            ids = ids[: max_tokens - total]
            if not ids:
                break
        out.append(Sample(no, tuple(ids)))
        total += len(ids)
    _raise_problems(f"{p}: {len(problems)} bad line(s); fix them and rerun:", problems)
    return out


# ----------------------------------------------------------------------------------------------
# Model construction (config.json → transformers class, parameters from the Checkpoint)
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _params_on_meta():
    """Create parameters on the meta device (no memory, no init) while buffers stay real.

    Non-persistent buffers (rotary ``inv_freq``, position ids) are computed in ``__init__`` and are
    not in checkpoints, so they must exist for real; parameters are replaced from the checkpoint.
    """
    from torch import nn

    old = nn.Module.register_parameter

    def register(self, name, param):
        old(self, name, param)
        if param is not None:
            p = self._parameters[name]
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = old


def _load_config(ckpt: Checkpoint, config: str | os.PathLike[str] | None) -> dict[str, Any]:
    if config is not None:
        cp = Path(config).expanduser()
        cp = cp / "config.json" if cp.is_dir() else cp
        try:
            return json.loads(cp.read_text())
        except OSError:
            raise SurgeryError(f"--config {cp}: no such file") from None
        except ValueError as e:
            raise SurgeryError(f"--config {cp}: invalid JSON ({e})") from None
    if not ckpt.config:
        raise SurgeryError(
            f"{ckpt.source}: calibration builds the model from config.json, but there is none in "
            f"{ckpt.root}; put config.json (and tokenizer files, unless the JSONL has input_ids) "
            "beside the weights, or pass --config"
        )
    return dict(ckpt.config)


def build_model(
    ckpt: Checkpoint,
    *,
    config: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    load: bool = True,
) -> tuple[nn.Module, Callable[[str], str]]:
    """Build the transformers model for ``ckpt`` and assign its tensors (stored dtype).

    Args:
        ckpt: the checkpoint (its ``config.json`` names the architecture).
        config: another ``config.json`` (file or folder) when the checkpoint has none.
        device: torch device for the weights.
        load: ``False`` returns the skeleton with parameters on the meta device (for planning).

    Returns:
        ``(model, to_ckpt)`` where ``to_ckpt(model_name)`` maps a model parameter/module name to
        the checkpoint's naming (a base-model prefix may be added or stripped).

    Raises:
        SurgeryError: unknown architecture, or tensors the model needs missing from the checkpoint.
    """
    import torch
    import transformers

    cfg = _load_config(ckpt, config)
    model_type = cfg.get("model_type")
    if not model_type:
        raise SurgeryError(
            f"{ckpt.source}: config.json has no 'model_type'; cannot build the model"
        )
    archs = cfg.get("architectures") or []
    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    try:
        tconfig = transformers.AutoConfig.for_model(model_type, **kwargs)
    except (ValueError, KeyError) as e:
        raise SurgeryError(
            f"{ckpt.source}: model_type {model_type!r} is unknown to transformers "
            f"{transformers.__version__} ({e}); upgrade transformers "
            "(surgery never runs remote code)"
        ) from None
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        # No (or a custom) architecture: fall back to the bare model of this model_type.
        if archs:
            log.warning(
                "architecture %s is not in transformers %s; using AutoModel for %r",
                archs[0],
                transformers.__version__,
                model_type,
            )
        cls = transformers.AutoModel._model_mapping.get(type(tconfig), None)
        if cls is None:
            raise SurgeryError(f"{ckpt.source}: no transformers model class for {model_type!r}")
    names = [n for n in ckpt.names() if ckpt.info(n).computable]
    float_dtypes = {ckpt.dtype(n) for n in names}
    # The model's nominal dtype: the checkpoint's main float dtype (attention masks follow it).
    main = (
        max(
            float_dtypes,
            key=lambda d: sum(ckpt.info(n).nbytes for n in names if ckpt.dtype(n) == d),
        )
        if names
        else "F32"
    )
    from .checkpoint import torch_dtype

    dtype = torch_dtype(main)
    with _params_on_meta(), torch.device("cpu"):
        model = cls._from_config(tconfig, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    to_ckpt = _name_mapper(model, ckpt)
    if not load:
        return model, to_ckpt
    sd_keys = list(model.state_dict().keys())
    state: dict[str, torch.Tensor] = {}
    for k in sd_keys:
        ck = to_ckpt(k)
        if ck in ckpt:
            state[k] = ckpt.raw(ck).to(device)
    model.load_state_dict(state, strict=False, assign=True)
    with contextlib.suppress(Exception):  # models without tied weights may not implement it
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise SurgeryError(
            f"{ckpt.source}: {len(missing)} tensor(s) that {cls.__name__} needs are missing from "
            f"the checkpoint, e.g. {', '.join(to_ckpt(n) for n in missing[:5])}; the checkpoint "
            "does not match its config.json"
        )
    model.to(device)
    unused = len(ckpt) - len(state)
    if unused:
        log.debug("%d checkpoint tensor(s) are not used by %s", unused, cls.__name__)
    return model, to_ckpt


def _name_mapper(model: nn.Module, ckpt: Checkpoint) -> Callable[[str], str]:
    """Pick how model names map to checkpoint names: as is, ``prefix.`` added, or stripped."""
    keys = list(model.state_dict().keys())
    prefix = getattr(model, "base_model_prefix", "") or ""
    cands: dict[str, Callable[[str], str]] = {"same": lambda k: k}
    if prefix:
        pre = prefix + "."
        cands["add"] = lambda k: pre + k
        cands["strip"] = lambda k: k[len(pre) :] if k.startswith(pre) else k
    score = {m: sum(f(k) in ckpt for k in keys) for m, f in cands.items()}
    best = max(score, key=lambda m: (score[m], m == "same"))
    return cands[best]


# ----------------------------------------------------------------------------------------------
# Planning (everything checked before any forward pass)
# ----------------------------------------------------------------------------------------------
def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def _in_features(mod: nn.Module) -> int:
    from torch import nn

    if isinstance(mod, nn.Linear):
        return int(mod.in_features)
    return int(mod.weight.shape[0])  # Conv1D stores (in, out)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fingerprint(
    ckpt: Checkpoint,
    cfg: dict,
    data: Path,
    tok_dir: Path | None,
    uses_tok: bool,
    options: dict[str, Any],
) -> str:
    """SHA-256 over the checkpoint headers, config, data bytes, tokenizer files and options.

    The batch size, device and memory budget are left out on purpose: they do not change the
    result (up to summation order), so a rerun with another batch size reuses the stats.
    """
    h = hashlib.sha256(FINGERPRINT_VERSION.encode())
    h.update(ckpt.header_digest().encode())
    h.update(json.dumps(cfg, sort_keys=True).encode())
    h.update(_file_digest(data).encode())
    if uses_tok and tok_dir is not None:
        for n in TOKENIZER_FILES:
            if (tok_dir / n).is_file():
                h.update(n.encode())
                h.update(_file_digest(tok_dir / n).encode())
    h.update(json.dumps(options, sort_keys=True).encode())
    return h.hexdigest()


def plan_calibration(
    src: Checkpoint | str | os.PathLike[str],
    calib: str | os.PathLike[str],
    *,
    targets: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    layers: str | Iterable[int] | None = None,
    samples: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 4,
    max_tokens: int | None = None,
    cov_norm: Literal["max", "none"] = "max",
    cov_dtype: Literal["fp32", "fp64"] = "fp32",
    max_memory: str | int | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
    device: str | None = None,
) -> CalibPlan:
    """Validate every input and decide modules, samples and module groups (no forward pass).

    Arguments are those of :func:`calibrate`.

    Raises:
        SurgeryError: listing every problem found (bad options, bad lines, unknown targets).
    """
    from .targets import module_of, select

    ckpt = src if isinstance(src, Checkpoint) else Checkpoint.open(src)
    problems: list[str] = []
    if cov_norm not in ("max", "none"):
        problems.append(f"--cov-norm must be 'max' or 'none', got {cov_norm!r}")
    cov_dtype = {"float32": "fp32", "float64": "fp64"}.get(str(cov_dtype), str(cov_dtype))
    if cov_dtype not in ("fp32", "fp64"):
        problems.append(f"--cov-dtype must be 'fp32' or 'fp64', got {cov_dtype!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"--batch-size must be a positive integer, got {batch_size!r}")
    _raise_problems("invalid calibration options:", problems)
    dev = _torch_device(device)
    budget_opt = parse_memory(max_memory)

    cfg = _load_config(ckpt, config)
    model, to_ckpt = build_model(ckpt, config=config, load=False)
    linears = _linear_modules(model)
    by_ckpt = {to_ckpt(n): n for n in linears}  # ckpt module name -> model module name

    # Targets: surgery.targets semantics on checkpoint names, then restricted to Linear/Conv1D.
    chosen = [module_of(n) for n in select(ckpt, targets, exclude, layers)]
    explicit = bool(targets) and targets != "all-linear"
    modules = [m for m in chosen if m in by_ckpt]
    not_linear = [m for m in chosen if m not in by_ckpt]
    if explicit and not_linear:
        problems += [
            f"{m}: matched --targets but is not an nn.Linear/Conv1D in "
            f"{type(model).__name__} (only linear layers get covariances)"
            for m in not_linear
        ]
    elif not_linear:
        log.debug("all-linear: skipping non-linear 2-D weights %s", not_linear[:5])
    if not modules and not problems:
        problems.append(
            f"no nn.Linear/Conv1D module matches targets={targets!r} "
            f"exclude={exclude!r} layers={layers!r}"
        )
    # Model call order = named_modules order; keep it so groups follow the forward.
    order = {m: i for i, m in enumerate(by_ckpt)}
    modules.sort(key=lambda m: order[m])
    in_features = {m: _in_features(linears[by_ckpt[m]]) for m in modules}

    # Sequence length: never beyond the model's position table.
    max_pos = None
    for k in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(cfg.get(k), int) and cfg[k] > 0:
            max_pos = cfg[k]
            break
    if seq_len is None:
        seq_len = min(max_pos or 2048, 2048)
    elif max_pos is not None and seq_len > max_pos:
        problems.append(
            f"--seq-len {seq_len} exceeds the model's {max_pos} positions "
            f"(config.json); use --seq-len {max_pos} or less"
        )
    _raise_problems(f"cannot calibrate {ckpt.source}:", problems)

    tok_dir = (
        Path(tokenizer).expanduser() if tokenizer else (ckpt.root if ckpt.root.is_dir() else None)
    )
    loader = (lambda: load_tokenizer(tok_dir)) if tok_dir is not None else None
    vocab = cfg.get("vocab_size")
    data = Path(calib).expanduser()
    samples_l = read_calib(
        data,
        tokenizer_loader=loader,
        samples=samples,
        seq_len=seq_len,
        max_tokens=max_tokens,
        vocab_size=vocab if isinstance(vocab, int) else None,
    )
    uses_tok = _needs_tokenizer(data, samples_l)

    options = {
        "targets": modules,
        "samples": samples,
        "seq_len": seq_len,
        "max_tokens": max_tokens,
        "cov_norm": cov_norm,
        "cov_dtype": cov_dtype,
        "n_samples": len(samples_l),
        "tokenizer": str(tok_dir) if (uses_tok and tok_dir) else None,
    }
    fp = _fingerprint(
        ckpt, cfg, data, tok_dir, uses_tok, {k: v for k, v in options.items() if k != "tokenizer"}
    )

    # Memory: covariances of one group must fit in the budget.
    model_bytes = sum(
        ckpt.info(ck).nbytes for ck in (to_ckpt(k) for k in model.state_dict()) if ck in ckpt
    )
    if budget_opt is None:
        free = _available_memory(dev)
        # The weights are not loaded yet; they will take model_bytes of the same memory.
        budget = max(int(0.8 * (free - model_bytes)), 0)
    else:
        budget = budget_opt
    groups, too_big = _group_modules(modules, in_features, cov_dtype, budget)
    _raise_problems(
        "the memory budget is too small for some covariances (raise --max-memory):", too_big
    )
    plan = CalibPlan(
        ckpt=ckpt,
        samples=samples_l,
        modules=modules,
        in_features=in_features,
        groups=groups,
        cov_dtype=cov_dtype,
        cov_norm=cov_norm,
        batch_size=batch_size,
        seq_len=seq_len,
        device=dev,
        model_bytes=model_bytes,
        budget=budget,
        fingerprint=fp,
        options=options,
        model_class=type(model).__name__,
        tokenizer_path=options["tokenizer"],
        data_path=data,
        _model_map={m: by_ckpt[m] for m in modules},
        config_path=None if config is None else str(config),
    )
    if len(groups) > 1:
        log.warning(
            "covariances (%.2f GiB) exceed the memory budget (%.2f GiB): %d passes over "
            "the data, one per module group",
            plan.cov_bytes() / 2**30,
            budget / 2**30,
            len(groups),
        )
    return plan


def _needs_tokenizer(data: Path, samples: list[Sample]) -> bool:
    """True when some used line is not an ``input_ids`` line (so the tokenizer shaped the data)."""
    used = {s.line for s in samples}
    with open(data, "rb") as f:
        for no, raw in enumerate(f, start=1):
            if no in used:
                try:
                    if "input_ids" not in json.loads(raw):
                        return True
                except ValueError:
                    return True
    return False


def _group_modules(
    modules: list[str],
    in_features: dict[str, int],
    cov_dtype: str,
    budget: int,
    alias: dict[str, str] | None = None,
) -> tuple[list[list[str]], list[str]]:
    """Split ``modules`` (forward order) greedily into groups whose covariances fit ``budget``.

    A module in ``alias`` (it takes the very same input as its root: q/k/v, gate/up) costs
    nothing when its root is in the same group: the two share one accumulator.

    Returns:
        The groups, and one problem line per covariance that alone exceeds the budget.
    """
    item = 8 if cov_dtype == "fp64" else 4
    alias = alias or {}
    groups: list[list[str]] = []
    cur: list[str] = []
    cur_b = 0
    too_big = []
    for m in modules:
        b = 0 if alias.get(m) in cur else in_features[m] ** 2 * item
        if b > budget:
            too_big.append(
                f"{m}: its [{in_features[m]}, {in_features[m]}] {cov_dtype} covariance "
                f"needs {b / 2**20:.1f} MiB, over --max-memory {budget / 2**20:.1f} MiB"
            )
            continue
        if cur and cur_b + b > budget:
            groups.append(cur)
            cur, cur_b = [], 0
        cur.append(m)
        cur_b += b
    if cur:
        groups.append(cur)
    return groups, too_big


def _input_of(args: tuple, kwargs: dict) -> Any:
    """A hooked Linear/Conv1D call's input tensor (positional, or the first tensor keyword)."""
    import torch

    return args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))


def _shared_inputs(plan: CalibPlan, model: nn.Module) -> dict[str, str]:
    """``module → root`` for target modules whose input *is* the previous hooked module's input.

    One forward of a short sample with a hook on every target finds them: in a Llama layer
    ``k_proj`` and ``v_proj`` get the very tensor ``q_proj`` got, ``up_proj`` the one
    ``gate_proj`` got, so their covariances are identical and one accumulator (and one stored
    tensor) serves the set: 28 → 22 GB of fp32 covariances for a 7B. Only modules called once
    per forward take part; the calibration passes check the identity again on every batch.
    """
    import torch

    mods = dict(model.named_modules())
    calls: dict[str, int] = {}
    order: list[tuple[str, Any]] = []  # (module, input), inputs kept alive: `is` stays sound

    def make(m: str):
        def hook(mod, args, kwargs, output):
            x = _input_of(args, kwargs)
            calls[m] = calls.get(m, 0) + 1
            order.append((m, x))

        return hook

    handles = [
        mods[plan._model_map[m]].register_forward_hook(make(m), with_kwargs=True)
        for m in plan.modules
    ]
    sample = min(plan.samples, key=lambda s: len(s.ids))
    ids = torch.tensor([sample.ids[:8]], dtype=torch.long)
    dev = next(iter(model.parameters())).device
    try:
        with torch.inference_mode():
            _forward_fn(model, plan)(ids.to(dev), torch.ones_like(ids).to(dev))
    finally:
        for h in handles:
            h.remove()
    alias: dict[str, str] = {}
    for (prev, px), (m, x) in zip(order, order[1:]):
        if x is px and calls[m] == 1 and calls[prev] == 1:
            alias[m] = alias.get(prev, prev)
    return alias


# ----------------------------------------------------------------------------------------------
# The hooks
# ----------------------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by the last hook of a pass to skip the rest of the forward."""


class _Collector:
    """Accumulates ``Σ X̃ᵀX̃`` per module; one instance per module group."""

    def __init__(
        self,
        plan: CalibPlan,
        group: list[str],
        model: nn.Module,
        device: str,
        alias: dict[str, str] | None = None,
    ):
        import torch

        self.plan = plan
        self.dtype = torch.float64 if plan.cov_dtype == "fp64" else torch.float32
        # module → root sharing the root's accumulator (its input is the root's very tensor)
        self.alias = {m: r for m, r in (alias or {}).items() if m in group and r in group}
        self.acc = {
            m: torch.zeros(
                plan.in_features[m], plan.in_features[m], dtype=self.dtype, device=device
            )
            for m in group
            if m not in self.alias
        }
        self.samples = dict.fromkeys(group, 0)
        self.tokens = dict.fromkeys(group, 0)
        self.handles = []
        self.order: list[str] = []  # hook call order in the first forward
        self.stop_after: str | None = None
        self.step = 0
        self.lines: list[int] = []
        self.mask = None  # [B, T] bool, True for real tokens
        self.row_sample = None  # [n_valid] sample index of every real token (row-major)
        # (x, step, XᵀX, n_samples, n_tokens) of the last hooked call; x is kept alive, so
        # `is` cannot match a new tensor at a recycled address (inference tensors carry no
        # version counter, and Linear/Conv1D never modify their input)
        self._last: tuple[Any, int, Any, int, int, str] | None = None  # ..., the module
        mods = dict(model.named_modules())
        for m in group:
            h = mods[plan._model_map[m]].register_forward_hook(self._make_hook(m), with_kwargs=True)
            self.handles.append(h)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def set_batch(self, mask: torch.Tensor, lines: list[int]) -> None:
        self.mask = mask
        self.flat_mask = mask.reshape(-1)
        self.row_sample = mask.nonzero()[:, 0]
        self.lines = lines
        self._last = None

    def end_batch(self) -> None:
        if self.step == 0 and self.order:
            last = self.order[-1]
            # Stop early only when the last hooked module runs exactly once per forward.
            if self.order.count(last) == 1:
                self.stop_after = last
        self._last = None  # drop the reference to the last activation
        self.step += 1

    def _rows(self, x: torch.Tensor, module: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Real-token rows ``[n, in]``, their sample index ``[n]`` and the number of samples."""
        import torch

        b, t = self.mask.shape
        lead = tuple(x.shape[:-1])
        flat = x.reshape(-1, x.shape[-1])
        if lead == (b, t) or lead == (b * t,):
            return flat[self.flat_mask], self.row_sample, b
        if lead == (b,):  # one token per sample (e.g. a pooler on the first token)
            return flat, torch.arange(b, device=x.device), b
        if b == 1:  # no padding in a batch of one: every row belongs to the sample
            return flat, torch.zeros(flat.shape[0], dtype=torch.long, device=x.device), 1
        raise SurgeryError(
            f"{module}: its input has shape {list(x.shape)}, which cannot be matched to the batch "
            f"[{b}, {t}] to mask padding; rerun with --batch-size 1"
        )

    def _make_hook(self, module: str):

        def hook(mod, args, kwargs, output):
            x = _input_of(args, kwargs)
            if self.step == 0:
                self.order.append(module)
            last = self._last
            same = last is not None and last[0] is x and last[1] == self.step
            if module in self.alias:
                if not same or last[5] != self.alias[module]:
                    raise SurgeryError(
                        f"{module}: shares {self.alias[module]}'s input in the first forward "
                        "but not on the batch starting at line "
                        f"{self.lines[0] if self.lines else '?'}; the model's forward depends on "
                        "the data, which the shared covariances cannot follow: please report it"
                    )
                # One accumulator for the set: the root already added this XᵀX.
                n_s, n_t = last[3], last[4]
            else:
                if same:
                    # Same input tensor as the previous hooked module: reuse XᵀX.
                    _, _, inc, n_s, n_t, _ = last
                else:
                    inc, n_s, n_t = self._increment(x, module)
                self._last = (x, self.step, inc, n_s, n_t, module)
                self.acc[module].add_(inc)
            self.samples[module] += n_s
            self.tokens[module] += n_t
            if module == self.stop_after:
                raise _Stop

        return hook

    def _increment(self, x: torch.Tensor, module: str) -> tuple[torch.Tensor, int, int]:
        import torch

        rows, sample_of, n_s = self._rows(x.detach(), module)
        xv = rows.to(self.dtype)  # upcast copy: [n, in]
        finite = torch.isfinite(xv).all(dim=1)
        if not bool(finite.all()):
            s = int(sample_of[~finite][0])
            raise SurgeryError(
                f"{module}: non-finite activation (NaN/Inf) in its input for the sample on line "
                f"{self.lines[s]} of {self.plan.data_path.name}; the model overflows on this "
                "input (fp16 weights?) — check the sample or the checkpoint"
            )
        if self.plan.cov_norm == "max":
            # Per-sample signed maximum over that sample's real tokens, then |·| (CorDA/PEFT).
            row_max = xv.amax(dim=1)
            smax = torch.full((n_s,), float("-inf"), dtype=self.dtype, device=xv.device)
            smax.scatter_reduce_(0, sample_of, row_max, reduce="amax", include_self=True)
            denom = smax.abs()
            zero = denom == 0
            if bool(zero.any()):
                # A sample whose input is all zeros adds nothing; a zero signed max with negative
                # entries would divide by zero (PEFT raises there too).
                row_any = (xv != 0).any(dim=1)
                nonzero_s = torch.zeros(n_s, dtype=torch.bool, device=xv.device)
                nonzero_s.index_put_((sample_of,), row_any, accumulate=True)
                bad = zero & nonzero_s
                if bool(bad.any()):
                    s = int(bad.nonzero()[0, 0])
                    raise SurgeryError(
                        f"{module}: the signed maximum of its input is 0 for the sample on line "
                        f"{self.lines[s]} (all entries ≤ 0), so the per-sample normalisation "
                        "divides by zero; use --cov-norm none"
                    )
                denom = torch.where(zero, torch.ones_like(denom), denom)
            xv.mul_((1.0 / denom)[sample_of].unsqueeze(1))
        inc = xv.T @ xv  # [in, in]
        if not bool(torch.isfinite(inc).all()):
            raise SurgeryError(
                f"{module}: the covariance overflowed on the batch starting at line "
                f"{self.lines[0]}; rerun with --cov-dtype fp64"
            )
        return inc, n_s, int(xv.shape[0])

    def result(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` per stats entry, module by module.

        Each covariance is divided in place and its accumulator released once yielded, so no
        second copy of the group's covariances is ever made.
        """
        import torch

        for m in list(self.samples):
            n = self.samples[m] if self.plan.cov_norm == "max" else self.tokens[m]
            if n == 0:
                raise SurgeryError(
                    f"{m}: never called during calibration (0 samples reached it); exclude it "
                    "with --exclude or check the model's forward"
                )
            if m not in self.alias:  # an alias's covariance is its root's, stored once
                acc = self.acc.pop(m)
                yield f"{m}.cov", acc.div_(n).cpu()
                del acc
            yield f"{m}.samples", torch.tensor([self.samples[m]], dtype=torch.int64)
            yield f"{m}.tokens", torch.tensor([self.tokens[m]], dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# The forward loop
# ----------------------------------------------------------------------------------------------
def _forward_fn(model: nn.Module, plan: CalibPlan) -> Callable[..., Any]:
    """The module to call and its keyword arguments for one batch."""
    # Skip the output head (a vocab-sized GEMM) unless a target lives outside the base model.
    prefix = getattr(model, "base_model_prefix", "") or ""
    base = getattr(model, prefix, None) if prefix else None
    run = model
    if base is not None and base is not model:
        inside = all(plan._model_map[m].startswith(prefix + ".") for m in plan.modules)
        if inside:
            run = base
    params = inspect.signature(run.forward).parameters
    enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))

    def call(ids, mask):
        kw: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if "use_cache" in params:
            kw["use_cache"] = False
        if enc_dec and "decoder_input_ids" in params:
            # Encoder-decoders: the sample feeds both sides (the decoder sees it teacher-forced).
            kw["decoder_input_ids"] = ids
            if "decoder_attention_mask" in params:
                kw["decoder_attention_mask"] = mask
        return run(**kw)

    return call


def _batches(samples: list[Sample], batch_size: int) -> list[list[Sample]]:
    # Longest first: similar lengths share a batch (little padding) and OOM shows up at once.
    order = sorted(samples, key=lambda s: -len(s.ids))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _run_group(
    plan: CalibPlan,
    model: nn.Module,
    group: list[str],
    gi: int,
    device: str,
    progress: Callable[[CalibProgress], None] | None,
    sink: Callable[[str, torch.Tensor], None],
    alias: dict[str, str] | None = None,
) -> None:
    """One pass over the data with hooks on ``group``; its stats go to ``sink`` as they are done."""
    import torch

    pad = 0
    col = _Collector(plan, group, model, device, alias)
    call = _forward_fn(model, plan)
    total_tokens = plan.tokens
    done_s = done_t = 0
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for batch in _batches(plan.samples, plan.batch_size):
                width = max(len(s.ids) for s in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for i, s in enumerate(batch):  # right padding: real tokens keep positions 0..L-1
                    ids[i, : len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
                    mask[i, : len(s.ids)] = 1
                ids, mask = ids.to(device), mask.to(device)
                col.set_batch(mask.bool(), [s.line for s in batch])
                try:
                    call(ids, mask)
                except _Stop:
                    pass
                col.end_batch()
                done_s += len(batch)
                done_t += int(mask.sum())
                if progress is not None:
                    progress(
                        CalibProgress(
                            gi + 1,
                            len(plan.groups),
                            done_s,
                            len(plan.samples),
                            done_t,
                            total_tokens,
                            time.perf_counter() - t0,
                        )
                    )
    finally:
        col.remove()
    dt = time.perf_counter() - t0
    log.info(
        "calibration pass %d/%d: %d samples, %d tokens in %.1fs (%.1f samples/s, %.0f tokens/s)",
        gi + 1,
        len(plan.groups),
        done_s,
        done_t,
        dt,
        done_s / max(dt, 1e-9),
        done_t / max(dt, 1e-9),
    )
    for name, t in col.result():
        sink(name, t)


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------
def _cache_dir(cache_dir: str | os.PathLike[str] | bool | None) -> Path | None:
    if cache_dir is False:
        return None
    if cache_dir is None or cache_dir is True:
        env = os.environ.get("SURGERY_CACHE_DIR")
        if env:
            return Path(env).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "surgery"
    return Path(cache_dir).expanduser()


def _matches(path: Path, fp: str) -> bool:
    try:
        return path.is_file() and Stats.open(path).fingerprint == fp
    except SurgeryError:
        return False


def _cache_lookup(cdir: Path | None, fp: str) -> Path | None:
    if cdir is None:
        return None
    try:
        index = json.loads((cdir / "calib-index.json").read_text())
    except (OSError, ValueError):
        return None
    p = index.get(fp)
    return Path(p) if p and _matches(Path(p), fp) else None


def _cache_record(cdir: Path | None, fp: str, path: Path) -> None:
    """Remember where the stats for ``fp`` live (the index stores paths, never copies)."""
    if cdir is None:
        return
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        f = cdir / "calib-index.json"
        try:
            index = json.loads(f.read_text())
        except (OSError, ValueError):
            index = {}
        # Drop entries whose file is gone, then record this one.
        index = {k: v for k, v in index.items() if Path(v).is_file()}
        index[fp] = str(path.resolve())
        tmp = f.with_name(f".{f.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, f)
    except OSError as e:  # a read-only cache is not worth failing the run
        log.debug("cannot update the calibration cache index in %s: %s", cdir, e)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
def calibrate(
    src: Checkpoint | str | os.PathLike[str],
    calib: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    targets: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    layers: str | Iterable[int] | None = None,
    samples: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 4,
    max_tokens: int | None = None,
    cov_norm: Literal["max", "none"] = "max",
    cov_dtype: Literal["fp32", "fp64"] = "fp32",
    max_memory: str | int | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
    device: str | None = None,
    progress: Callable[[CalibProgress], None] | None = None,
    cache_dir: str | os.PathLike[str] | bool | None = None,
    plan: CalibPlan | None = None,
) -> Path:
    """Compute per-module input covariances from a JSONL file and write a stats file.

    Args:
        src: checkpoint (folder, file, Hub id or an open :class:`Checkpoint`) with config.json.
        calib: JSONL file; lines ``{"text"}``, ``{"messages"}``, ``{"prompt", "completion"}`` or
            ``{"input_ids"}``. One line is one sample.
        out: stats file to write (default: ``<cache_dir>/stats-<fingerprint>.safetensors``).
        targets, exclude, layers: module selection (:func:`surgery.targets.select` semantics,
            default ``all-linear``), restricted to ``nn.Linear``/``Conv1D`` modules.
        samples: use the first N samples (default: all lines).
        seq_len: truncate samples to L tokens (default: min(model positions, 2048)).
        batch_size: samples per forward; the result does not depend on it.
        max_tokens: stop after T tokens in total.
        cov_norm: ``max`` (official/PEFT per-sample ``|max|`` normalisation, ``/ n_samples``) or
            ``none`` (token-weighted, ``/ n_tokens``).
        cov_dtype: accumulate in ``fp32`` or ``fp64``.
        max_memory: bytes (or ``"24GB"``) allowed for covariances; when exceeded the modules are
            processed in groups, one pass over the data per group. Default: 80 % of free memory.
        tokenizer: tokenizer folder (default: the checkpoint folder).
        config: config.json (file or folder) when the checkpoint folder has none.
        device: ``auto`` (CUDA when torch sees one), ``cpu`` or ``cuda``.
        progress: called after every batch with a :class:`CalibProgress`.
        cache_dir: where the fingerprint index lives (``False`` disables the cache; default
            ``$SURGERY_CACHE_DIR`` or ``~/.cache/surgery``).
        plan: a plan from :func:`plan_calibration` (skips re-validation).

    Returns:
        The path of the stats file (``out`` when given).

    Raises:
        SurgeryError: for any bad input, before any forward pass; NaN/Inf activations naming the
            module and the sample's line.
    """
    if plan is None:
        plan = plan_calibration(
            src,
            calib,
            targets=targets,
            exclude=exclude,
            layers=layers,
            samples=samples,
            seq_len=seq_len,
            batch_size=batch_size,
            max_tokens=max_tokens,
            cov_norm=cov_norm,
            cov_dtype=cov_dtype,
            max_memory=max_memory,
            tokenizer=tokenizer,
            config=config,
            device=device,
        )
    fp = plan.fingerprint
    cdir = _cache_dir(cache_dir)
    dest = Path(out).expanduser() if out is not None else None
    if dest is None:
        if cdir is None:
            raise SurgeryError("calibrate: give an output path (-o) when the cache is disabled")
        dest = cdir / f"stats-{fp[:16]}.safetensors"
    # Cache: the destination itself, or any earlier output with the same fingerprint.
    if _matches(dest, fp):
        log.info(
            "calibration cache hit: %s already holds these stats (fingerprint %s)", dest, fp[:12]
        )
        _cache_record(cdir, fp, dest)
        return dest
    hit = _cache_lookup(cdir, fp)
    if hit is not None:
        log.info("calibration cache hit: reusing %s (fingerprint %s)", hit, fp[:12])
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
        try:
            # Stats files are replaced, never modified in place, so a hard link is safe (and
            # free for the 28 GB of a 7B model); other filesystems get a copy.
            os.link(hit, tmp)
        except OSError:
            shutil.copyfile(hit, tmp)
        os.replace(tmp, dest)
        return dest

    options = dict(
        plan.options,
        batch_size=plan.batch_size,
        source=str(plan.ckpt.source),
        data=str(plan.data_path),
        model_class=plan.model_class,
    )
    # The file's layout is known from the plan: each group's covariances are written as soon as
    # its pass ends, so memory holds one group's accumulators, never all of them.
    cov_dt = "F64" if plan.cov_dtype == "fp64" else "F32"
    model, _ = build_model(plan.ckpt, config=plan.config_path, device=plan.device)
    writer = None
    try:
        # Modules fed the very same tensor (q/k/v, gate/up) share one accumulator and one stored
        # covariance (the file maps them to it in its ``cov_alias`` metadata): fewer bytes in
        # memory and on disk, and maybe fewer passes than the plan's conservative grouping.
        shared = _shared_inputs(plan, model)
        groups, _ = _group_modules(plan.modules, plan.in_features, plan.cov_dtype, plan.budget,
                                   shared)  # fmt: skip
        plan = replace(plan, groups=groups)
        group_of = {m: gi for gi, g in enumerate(groups) for m in g}
        alias = {m: r for m, r in shared.items() if group_of.get(m) == group_of.get(r)}
        if alias:
            saved = sum(plan.in_features[m] ** 2 for m in alias) * (8 if cov_dt == "F64" else 4)
            log.info(
                "%d covariances shared with the module fed the same input (%s saved); "
                "%d pass(es) over the data", len(alias), _fmt_bytes(saved), len(groups),
            )  # fmt: skip
        entries = []
        for m in plan.modules:
            n = plan.in_features[m]
            if m not in alias:
                entries.append(Entry(f"{m}.cov", cov_dt, (n, n)))
            entries += [Entry(f"{m}.samples", "I64", (1,)), Entry(f"{m}.tokens", "I64", (1,))]
        meta = {"cov_alias": json.dumps(alias, sort_keys=True)} if alias else None
        writer = StatsWriter(dest, entries, fingerprint=fp, convention=plan.cov_norm,
                             options=options, extra_meta=meta)  # fmt: skip
        for gi, group in enumerate(plan.groups):
            _run_group(plan, model, group, gi, plan.device, progress, writer.write, alias)
        writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()  # nothing half-written
        raise
    finally:
        del model
        if plan.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
    _cache_record(cdir, fp, dest)
    return dest


def stats_path_for(out: str | os.PathLike[str]) -> Path:
    """Where ``decompose --calib`` keeps the stats of output ``OUT``: ``OUT.stats.safetensors``.

    Beside the output folder rather than inside it, so that the covariances (as large as the model
    in fp32) are not pushed to the Hub with the model, and the folder can still be written
    atomically.
    """
    p = Path(out).expanduser()
    return p.with_name(p.name + ".stats.safetensors")


def calibrate_beside(
    src: str | os.PathLike[str],
    calib: str | os.PathLike[str],
    out: str | os.PathLike[str] | None,
    *,
    method: str,
    dry_run: bool = False,
    no_cache: bool = False,
    **kw: Any,
) -> tuple[Path | None, list[str]]:
    """Calibrate for ``decompose --calib``: stats beside the output, when the method needs them.

    Args:
        src: checkpoint.
        calib: JSONL file.
        out: the decompose output folder (``None``: the stats go to the cache).
        method: the decompose method; methods without a ``cov`` parameter need no stats.
        dry_run: plan only (no forward pass).
        no_cache: recompute even when matching stats exist.
        **kw: :func:`calibrate` options (targets, samples, batch_size, progress, …).

    Returns:
        ``(stats path or None, plan lines)``; the path is ``None`` for a dry run or a method that
        takes no covariance.
    """
    from .methods import get

    fn = get(method, "decompose").fn
    if "cov" not in inspect.signature(fn).parameters:
        return None, []
    progress = kw.pop("progress", None)
    plan = plan_calibration(src, calib, **kw)
    lines = ["calibration: " + line for line in plan.describe()]
    if dry_run:
        return None, lines
    dest = stats_path_for(out) if out is not None else None
    path = calibrate(
        src,
        calib,
        out=dest,
        plan=plan,
        progress=progress,
        cache_dir=False if (no_cache and dest is not None) else None,
    )
    return path, lines
