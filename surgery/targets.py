"""Which tensors a verb touches: ``--targets``, ``--exclude``, ``--layers`` with PEFT semantics.

* ``all-linear`` (the default): every 2-D float ``*.weight`` except embeddings and the output head
  (``lm_head``), like PEFT's ``target_modules="all-linear"``.
* a comma list (``q_proj,v_proj`` or ``mlp.down_proj``): a module matches when its name equals an
  entry or ends with ``"." + entry`` (PEFT's list semantics).
* a regex (any of ``*+?[](){}|^$\\``): ``re.fullmatch`` on the module name (PEFT's str rule).
* ``--layers 0,2,5-7``: keep modules whose layer index (the number after ``layers.``, ``h.``,
  ``layer.``, ``blocks.``) is listed.

A module name is the tensor name without its ``.weight`` suffix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .checkpoint import Checkpoint
from .errors import SurgeryError

__all__ = ["select", "module_of", "layer_of", "parse_layers", "matcher", "is_embedding", "is_head"]

_REGEX_CHARS = set("*+?[](){}|^$\\")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)\.")
_EMBED = re.compile(
    r"(embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|"
    r"(^|\.)shared$|(^|\.)tok_embeddings$)"
)
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out|output|score|classifier|qa_outputs)$")


def module_of(name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` → ``model.layers.0.mlp.up_proj``."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


def layer_of(name: str) -> int | None:
    """The transformer block index in a tensor name, or ``None``."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def is_embedding(module: str) -> bool:
    return bool(_EMBED.search(module.rsplit(".", 1)[-1]) or _EMBED.search(module))


def is_head(module: str) -> bool:
    return bool(_HEAD.search(module))


def parse_layers(spec: str | Iterable[int] | None) -> set[int] | None:
    """``"0,2,5-7"`` → ``{0, 2, 5, 6, 7}``."""
    if spec is None:
        return None
    if not isinstance(spec, str):
        return {int(i) for i in spec}
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                out.update(range(int(a), int(b) + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise SurgeryError(f"--layers: cannot parse {part!r}; use e.g. 0,2,5-7") from None
    return out


def matcher(spec: str | list[str]):
    """Return a predicate on module names (list → suffixes, str → regex or comma list)."""
    if isinstance(spec, str) and any(c in _REGEX_CHARS for c in spec):
        try:
            rx = re.compile(spec)
        except re.error as e:
            raise SurgeryError(f"--targets/--exclude: invalid regex {spec!r} ({e})") from None
        return lambda m: rx.fullmatch(m) is not None
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    return lambda m: any(m == s or m.endswith("." + s) for s in items)


def select(
    ckpt: Checkpoint,
    targets: str | list[str] | None = "all-linear",
    exclude: str | list[str] | None = None,
    layers: str | Iterable[int] | None = None,
    *,
    include_embeddings: bool = False,
    require: bool = True,
) -> list[str]:
    """Return the tensor names (``*.weight``, 2-D) selected by the options, in checkpoint order.

    Args:
        ckpt: the checkpoint to select from (headers only).
        targets: ``all-linear``, a comma list of suffixes, or a regex.
        exclude: same syntax, removed from the selection.
        layers: layer indices to keep.
        include_embeddings: with ``all-linear``, also select embeddings and the output head.
        require: raise when nothing matches.

    Raises:
        SurgeryError: when the selection is empty (and ``require``), listing some module names.
    """
    layer_set = parse_layers(layers)
    targets = targets or "all-linear"
    all_linear = targets == "all-linear"
    match = None if all_linear else matcher(targets)
    skip = matcher(exclude) if exclude else (lambda m: False)
    out = []
    for name in ckpt.names():
        if not name.endswith(".weight") or len(ckpt.info(name).shape) != 2:
            continue
        mod = module_of(name)
        if all_linear:
            if not ckpt.info(name).computable:
                continue
            if (is_embedding(mod) or is_head(mod)) and not include_embeddings:
                continue
        elif not match(mod):
            continue
        if skip(mod):
            continue
        if layer_set is not None and layer_of(name) not in layer_set:
            continue
        out.append(name)
    if require and not out:
        examples = [module_of(n) for n in ckpt.names() if n.endswith(".weight")][:6]
        raise SurgeryError(
            f"targets {targets!r} (exclude={exclude!r}, layers={layers!r}) match no 2-D weight in "
            f"{ckpt.source}; module names look like: {', '.join(examples)}"
        )
    return out
