"""The model card (``README.md``) written beside every output, built from its ``surgery.json``.

The front matter is what the Hub reads to draw the model tree: ``base_model`` (Hub ids only, never a
local path, so no ``base_model: []`` as mergekit writes for local inputs), ``base_model_relation``
(``merge`` | ``adapter`` | ``finetune`` | ``quantized``), ``library_name`` (``transformers`` or
``peft``) and ``tags``. The body says what was done: the method with its paper link, the
parameters, the inputs, and the per-layer summary from the manifest.

Hub ids come from, in order: an input's ``hub_id`` (set when it was downloaded), an input source
that is a Hub id with a resolved revision, and for a local folder the ``_name_or_path`` of its
``config.json`` or the ``base_model_name_or_path`` of its ``adapter_config.json`` when those are Hub
ids. Nothing here touches the network; metadata is checked locally with ``huggingface_hub``'s
``ModelCardData``/``ModelCard`` and by the Hub itself at push time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from .errors import SurgeryError

__all__ = ["MAX_ROWS", "RELATIONS", "base_models", "is_hub_id", "relation", "write_card"]

logger = logging.getLogger("surgery")

RELATIONS = ("merge", "adapter", "finetune", "quantized")
MAX_ROWS = 50  # per-layer table rows in the card; surgery.json keeps them all
_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}/[\w.\-]{1,96}$")
# Verb → what the output is relative to its base, for a full-model output.
_VERB_RELATION = {
    "merge": "merge",
    "decompose": "finetune",
    "edit": "finetune",
    "apply": "finetune",
    "port": "finetune",  # port --merge: the adapter folded into the new base
    "convert": "finetune",
    "extract": "finetune",
    "calibrate": "finetune",
}
# Methods whose residual is a quantized weight (compression with low-rank recovery).
_QUANT_HINTS = ("compress", "quant", "nf4", "int4", "int8", "gptq", "awq")


def is_hub_id(value: Any) -> bool:
    """True when ``value`` is a Hub model id (``org/name``, optional ``@rev``), not a local path.

    A string that exists on disk, starts with ``.``, ``/`` or ``~``, or has more than one ``/`` is
    a path. No network call is made (mergekit's ``repo_exists`` check needs the network).
    """
    if not isinstance(value, str) or not value:
        return False
    s = value.split("@", 1)[0]
    if s.startswith((".", "/", "~")) or "\\" in s or s.endswith((".safetensors", ".json")):
        return False
    return bool(_ID.match(s)) and not os.path.exists(s)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _local_dir(source: Any) -> Path | None:
    if not isinstance(source, str):
        return None
    p = Path(source).expanduser()
    if p.is_file():
        p = p.parent
    return p if p.is_dir() else None


def _ids_of_folder(folder: Path | None) -> list[str]:
    """Hub ids recorded inside a local folder by transformers (config) or PEFT (adapter config)."""
    if folder is None:
        return []
    out = []
    for name, key in (("config.json", "_name_or_path"),
                      ("adapter_config.json", "base_model_name_or_path")):  # fmt: skip
        value = _read_json(folder / name).get(key)
        if is_hub_id(value):
            out.append(value.split("@", 1)[0])
    return out[:1]


def _input_id(item: dict[str, Any]) -> str | None:
    """The Hub id of one manifest input, if it has one."""
    hub_id = item.get("hub_id")
    if is_hub_id(hub_id):
        return hub_id.split("@", 1)[0]
    source = item.get("source")
    # A Hub source always has a resolved revision in the manifest; a bare "a/b" without one may
    # be a local folder that has since moved, so it is not trusted.
    if item.get("revision") and is_hub_id(source):
        return source.split("@", 1)[0]
    ids = _ids_of_folder(_local_dir(source))
    return ids[0] if ids else None


def _outputs(manifest: dict[str, Any], out_dir: Path | None) -> tuple[bool, bool]:
    outs = manifest.get("outputs") or {}
    model, adapter = outs.get("model"), outs.get("adapter")
    if out_dir is not None:  # fall back to what is on disk
        if model is None:
            model = (
                any(out_dir.glob("*.safetensors"))
                and not (out_dir / "adapter_model.safetensors").is_file()
            )
        if adapter is None:
            adapter = (out_dir / "adapter_config.json").is_file() or (
                out_dir / "adapter" / "adapter_config.json"
            ).is_file()
    return bool(model), bool(adapter)


def relation(manifest: dict[str, Any], out_dir: Path | None = None) -> str:
    """The ``base_model_relation`` for an output: merge, adapter, finetune or quantized.

    An output that is only an adapter is ``adapter``; a merge is ``merge``; compression
    (a ``compress``/quantizing method) is ``quantized``; everything else (residual models,
    edits, adapters folded into a base) is ``finetune``.
    """
    verb = str(manifest.get("verb") or "")
    method = str(manifest.get("method") or "").lower()
    model, adapter = _outputs(manifest, out_dir)
    if adapter and not model:
        return "adapter"
    if verb == "merge":
        return "merge"
    if any(h in method for h in _QUANT_HINTS):
        return "quantized"
    return _VERB_RELATION.get(verb, "finetune")


def base_models(manifest: dict[str, Any], out_dir: Path | None = None) -> list[str]:
    """Hub ids for ``base_model``, in input order, without duplicates (never local paths).

    Which inputs count depends on the relation: every model of a merge; the base an adapter
    applies to (``new_base`` for a port, ``base`` for an extract, the adapter's own base for a
    conversion); the source model of a fine-tune, edit or compression.
    """
    rel = relation(manifest, out_dir)
    inputs = [i for i in manifest.get("inputs") or [] if isinstance(i, dict)]
    by_role: dict[str, list[dict[str, Any]]] = {}
    for item in inputs:
        # Roles may be numbered ("model0", "model1"): group them by their stem.
        role = re.sub(r"\d+$", "", str(item.get("role") or "model"))
        by_role.setdefault(role, []).append(item)

    def ids(roles: tuple[str, ...]) -> list[str]:
        return [x for r in roles for item in by_role.get(r, []) if (x := _input_id(item))]

    if rel == "merge":
        found = ids(("model", "src", "base"))
    elif rel == "adapter":
        found = ids(("new_base",)) or ids(("base",))
        if not found:  # convert / decompose: the adapter's own base, or the decomposed model
            found = [x for item in by_role.get("adapter", [])
                     for x in _ids_of_folder(_local_dir(item.get("source")))]  # fmt: skip
            found = found or ids(("src", "model"))
    else:
        found = ids(("new_base",)) or ids(("src", "model")) or ids(("base",))
    if not found and out_dir is not None:
        # The output's own config/adapter config carries the base's id when the base came from
        # the Hub through a local copy.
        found = _ids_of_folder(out_dir) or _ids_of_folder(out_dir / "adapter")
    return list(dict.fromkeys(found))


def _licenses(manifest: dict[str, Any]) -> list[str]:
    """Licenses declared by the inputs' own cards (local or cached Hub snapshots, no network)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.repocard import metadata_load

    found = []
    for item in manifest.get("inputs") or []:
        if not isinstance(item, dict):
            continue
        card: Path | None = None
        local = _local_dir(item.get("source"))
        if local is not None and (local / "README.md").is_file():
            card = local / "README.md"
        elif is_hub_id(item.get("hub_id") or item.get("source")) and item.get("revision"):
            repo = str(item.get("hub_id") or item.get("source")).split("@", 1)[0]
            try:
                from .hub import _cache_dir

                hit = try_to_load_from_cache(
                    repo, "README.md", revision=item["revision"], cache_dir=_cache_dir()
                )
            except Exception:  # noqa: BLE001 - a cache miss must never break card writing
                hit = None
            card = Path(hit) if isinstance(hit, str) else None
        if card is None:
            continue
        try:
            lic = (metadata_load(card) or {}).get("license")
        except Exception:  # noqa: BLE001 - a malformed input card is not our problem
            lic = None
        # "other" needs license_name/license_link as well; not worth guessing: leave it out.
        if isinstance(lic, str) and lic != "other":
            found.append(lic)
    return found


def _cell(value: Any) -> str:
    """One markdown table cell: short numbers, escaped pipes, no newlines."""
    if isinstance(value, bool) or value is None:
        text = str(value) if value is not None else ""
    elif isinstance(value, float):
        text = "nan" if math.isnan(value) else f"{value:.4g}"
    elif isinstance(value, (list, tuple)):
        text = (
            "×".join(str(v) for v in value)
            if all(isinstance(v, int) for v in value)
            else (", ".join(_cell(v) for v in value))
        )
    elif isinstance(value, dict):
        text = json.dumps(value, sort_keys=True)
    else:
        text = str(value)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return out


def _layer_table(tensors: list[dict[str, Any]]) -> list[str]:
    """The per-tensor report as a table of at most ``MAX_ROWS`` rows.

    Small models get one row per tensor. Larger ones get one row per tensor group (layer index
    replaced by ``*``) with the mean of each numeric metric, so a 32-layer model still fits.
    """
    metrics: list[str] = []
    for t in tensors:
        for k, v in t.items():
            if k not in ("name", "action") and k not in metrics and not isinstance(v, dict):
                metrics.append(k)
    metrics = metrics[:6]  # keep the table readable; surgery.json has every field
    if len(tensors) <= MAX_ROWS:
        rows = [[t.get("name", ""), t.get("action", ""), *(t.get(m) for m in metrics)]
                for t in tensors]  # fmt: skip
        return _table(["tensor", "action", *metrics], rows)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for t in tensors:
        key = (re.sub(r"\.\d+\.", ".*.", str(t.get("name", ""))), str(t.get("action", "")))
        groups.setdefault(key, []).append(t)
    rows = []
    for (pattern, action), members in groups.items():
        row: list[Any] = [pattern, action, len(members)]
        for m in metrics:
            vals = [t.get(m) for t in members]
            nums = [
                float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)
            ]
            if len(nums) == len(vals):
                row.append(sum(nums) / len(nums))  # mean over the group
            else:
                distinct = {_cell(v) for v in vals}
                row.append(vals[0] if len(distinct) == 1 else "mixed")
        rows.append(row)
    out = _table(["tensor group", "action", "count", *metrics], rows[:MAX_ROWS])
    if len(rows) > MAX_ROWS:
        out += ["", f"… and {len(rows) - MAX_ROWS} more groups; see `surgery.json`."]
    out += [
        "",
        f"{len(tensors)} tensors in {len(rows)} groups (numbers are group means); "
        "every tensor is in `surgery.json`.",
    ]
    return out


def _label(item: dict[str, Any]) -> str:
    hub_id = _input_id(item)
    source = str(item.get("source") or "")
    if item.get("hub_id") or (item.get("revision") and is_hub_id(source)):
        return f"[{hub_id}](https://huggingface.co/{hub_id})"
    # A local path can reveal private folder names: show its last component only.
    name = Path(source.rstrip("/")).name or source
    return f"local `{name}`" + (f" (from [{hub_id}](https://huggingface.co/{hub_id}))"
                                if hub_id else "")  # fmt: skip


def _body(manifest: dict[str, Any], rel: str, bases: list[str], title: str, adapter_sub: bool,
          library: str) -> str:  # fmt: skip
    verb = manifest.get("verb") or "edit"
    method = manifest.get("method") or verb
    ref = manifest.get("method_reference")
    method_md = f"[`{method}`]({ref})" if ref else f"`{method}`"
    what = {
        "merge": "a merge of the models below",
        "adapter": "a PEFT LoRA adapter",
        "finetune": "a model derived from the base below",
        "quantized": "a compressed (quantized) version of the base below",
    }[rel]
    if rel in ("finetune", "quantized") and adapter_sub:
        what += ", with the low-rank part as a PEFT adapter in `adapter/`"
    lines = [f"# {title}", "", f"This is {what}, made with `surgery {verb}` using {method_md}."]
    lines += ["", "## Inputs", ""]
    inputs = [i for i in manifest.get("inputs") or [] if isinstance(i, dict)]
    if inputs:
        lines += _table(["role", "source", "revision"],
                        [[i.get("role", ""), _label(i), (i.get("revision") or "")[:12]]
                         for i in inputs])  # fmt: skip
    else:
        lines.append("Not recorded.")

    lines += ["", "## How to load", "", "```python"]
    base = bases[0] if bases else "<base model id>"
    if library == "peft":
        lines += ["from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{base}")',
                  'model = PeftModel.from_pretrained(base, "<this repo id>")']  # fmt: skip
    else:
        lines += ["from transformers import AutoModelForCausalLM", "",
                  'model = AutoModelForCausalLM.from_pretrained("<this repo id>")']  # fmt: skip
        if adapter_sub:
            lines += ["", "# the low-rank factors: a PEFT adapter on this residual model",
                      "from peft import PeftModel", "",
                      'model = PeftModel.from_pretrained(model, "<this repo id>", '
                      'subfolder="adapter")']  # fmt: skip
    lines.append("```")

    params = manifest.get("params") or {}
    lines += ["", "## Parameters", ""]
    rows = [[k, v] for k, v in sorted(params.items())]
    for key in ("seed", "device"):
        if manifest.get(key) is not None:
            rows.append([key, manifest[key]])
    for key, value in sorted((manifest.get("dtypes") or {}).items()):
        rows.append([f"dtype: {key}", value])
    lines += _table(["parameter", "value"], rows) if rows else ["Defaults only."]

    summary = manifest.get("summary") or {}
    if summary:
        lines += ["", "## Summary", ""]
        lines += _table(["quantity", "value"], [[k, v] for k, v in summary.items()])

    tensors = [t for t in manifest.get("tensors") or [] if isinstance(t, dict)]
    if tensors:
        lines += ["", "## Per-layer summary", ""]
        lines += _layer_table(tensors)

    versions = manifest.get("versions") or {}
    lines += ["", "## Reproduce", "",
              f"Made with surgery {manifest.get('surgery_version', '')}".rstrip() + "."
              + (" Library versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
                 + "." if versions else ""),
              "The full record (inputs with commit hashes, parameters, seed, every tensor) is "
              "in `surgery.json`."]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_card(out_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write ``out_dir/README.md``: Hub front matter and a body saying what was done.

    Args:
        out_dir: the output folder (a model or adapter directory).
        manifest: the ``surgery.json`` dict (missing keys are tolerated).

    Returns:
        The path of the card.

    Raises:
        SurgeryError: if ``out_dir`` is not a folder, or the metadata fails validation (a bug).
    """
    from huggingface_hub import ModelCard, ModelCardData

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise SurgeryError(f"{out_dir}: no such output folder to write README.md into")
    rel = relation(manifest, out_dir)
    bases = base_models(manifest, out_dir)
    model, adapter = _outputs(manifest, out_dir)
    library = "peft" if adapter and not model else "transformers"
    method = str(manifest.get("method") or manifest.get("verb") or "").strip()
    tags = ["surgery"]
    for t in (method, str(manifest.get("verb") or "")):
        if t and t not in tags:
            tags.append(t)
    if library == "peft":
        tags.append("lora")
    licenses = sorted(set(_licenses(manifest)))
    extra: dict[str, Any] = {}
    if bases:
        # The Hub needs a base_model for a relation; without Hub ids we state neither.
        extra["base_model_relation"] = rel
    data = ModelCardData(
        base_model=(bases[0] if len(bases) == 1 else bases) or None,
        library_name=library,
        license=licenses[0] if len(licenses) == 1 else None,
        tags=tags,
        **extra,
    )
    # run.py writes into ".<OUT>.surgery-tmp" (writer.OutputDir) before the atomic rename: title
    # the card <OUT>.
    name = out_dir.resolve().name
    title = re.sub(r"^\.(.+)\.surgery-tmp(?:-\d+)?$", r"\1", name) or "surgery output"
    body = _body(manifest, rel, bases, title, model and adapter, library)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    # Round-trip through the parser: what the Hub will read must be what we meant.
    parsed = card.data.to_dict()
    if parsed.get("base_model") != data.base_model or any(not is_hub_id(b) for b in (bases or [])):
        raise SurgeryError(f"internal error: card metadata for {out_dir} did not round-trip "
                           f"({parsed.get('base_model')!r})")  # fmt: skip
    path = out_dir / "README.md"
    path.write_text(str(card), encoding="utf-8")
    logger.info("wrote model card %s (base_model=%s, relation=%s)", path, bases or "-", rel)
    return path
