"""The method registry: one explicit list, one line per method.

A method's user-tunable schema is its kernel's keyword-only parameters (after ``*``) with their
annotations and defaults. The loop supplies the reserved names itself (``rng``, ``rank``, ``scale``,
``cov``, ``direction``, …); everything else is settable with ``-p key=value``.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from .errors import SurgeryError, did_you_mean, unknown_name

__all__ = [
    "Method",
    "METHODS",
    "KINDS",
    "RESERVED",
    "get",
    "names",
    "schema",
    "parse_params",
    "describe",
    "Param",
]

KINDS = ("merge", "decompose", "edit")
# Supplied by the loop, never by the user. Stats keys (cov, direction) come from --stats files.
RESERVED = frozenset(
    {"rng", "rank", "scale", "cov", "direction", "stats", "probe", "weights", "selected"}
)


@dataclass(frozen=True)
class Method:
    """A registry record: name (paper acronym, snake_case), kind, kernel and paper link."""

    name: str
    kind: str
    fn: Callable[..., Any]
    reference: str

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.fn) or ""
        return doc.splitlines()[0] if doc else ""


METHODS: list[Method] = []


def _registry() -> list[Method]:
    if not METHODS:
        METHODS.extend(_build())
    return METHODS


def _build() -> list[Method]:
    """The registry itself: one line per method."""
    import importlib

    out: list[Method] = []
    # Kernels are imported on first use so that `surgery --help` never pays for them.
    for mod_name, fn_name, name, kind, ref in _ENTRIES:
        out.append(Method(name, kind, getattr(importlib.import_module(mod_name), fn_name), ref))
    return out


# (module, function, name, kind, reference) — add one line per method.
_ENTRIES: list[tuple[str, str, str, str, str]] = [
    ("ops.compress", "compress", "compress", "decompose", "https://arxiv.org/abs/2307.07705"),
    ("ops.decompose", "pissa", "pissa", "decompose", "https://arxiv.org/abs/2404.02948"),
    ("ops.decompose", "corda", "corda", "decompose", "https://arxiv.org/abs/2406.05223"),
    ("ops.decompose", "kasa", "kasa", "decompose", "https://arxiv.org/abs/2412.06071"),
    ("ops.decompose", "svd_extract", "svd_extract", "decompose", "https://arxiv.org/abs/0909.4061"),
    ("ops.edit", "probe_edit", "probe", "edit", "https://arxiv.org/abs/2407.08770"),
    ("ops.edit", "project_out", "project_out", "edit", "https://arxiv.org/abs/2004.07667"),
    (
        "ops.merge",
        "task_arithmetic",
        "task_arithmetic",
        "merge",
        "https://arxiv.org/abs/2212.04089",
    ),
    ("ops.merge", "ties", "ties", "merge", "https://arxiv.org/abs/2306.01708"),
    ("ops.merge", "dare_linear", "dare_linear", "merge", "https://arxiv.org/abs/2311.03099"),
    ("ops.merge", "dare_ties", "dare_ties", "merge", "https://arxiv.org/abs/2311.03099"),
    ("ops.merge", "pcb", "pcb", "merge", "https://arxiv.org/abs/2410.02396"),
]


def names(kind: str | None = None) -> list[str]:
    return [m.name for m in _registry() if kind is None or m.kind == kind]


def get(name: str, kind: str | None = None) -> Method:
    """Look a method up by name (and kind).

    Raises:
        SurgeryError: ``unknown merge method 'tie'; did you mean 'ties'? choices: …``.
    """
    for m in _registry():
        if m.name == name and (kind is None or m.kind == kind):
            return m
    raise unknown_name(f"{kind} method" if kind else "method", name, names(kind))


@dataclass(frozen=True)
class Param:
    """One user-settable parameter of a method."""

    name: str  # the kernel's name (``lambda_``)
    cli: str  # the name users type (``lambda``)
    annotation: Any
    default: Any  # inspect.Parameter.empty when required

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    def type_name(self) -> str:
        a = self.annotation
        if typing.get_origin(a) is Literal:
            return "|".join(str(x) for x in typing.get_args(a))
        return getattr(a, "__name__", str(a))


def schema(method: Method) -> dict[str, Param]:
    """The user-settable keyword-only parameters of ``method``, keyed by their CLI names."""
    sig = inspect.signature(method.fn)
    hints = typing.get_type_hints(method.fn)
    out: dict[str, Param] = {}
    for p in sig.parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name in RESERVED:
            continue
        cli = p.name.rstrip("_")
        out[cli] = Param(p.name, cli, hints.get(p.name, str), p.default)
    return out


def _coerce(param: Param, value: Any, method: str) -> Any:
    a = param.annotation
    args = typing.get_args(a)
    if typing.get_origin(a) is Literal:
        if value in args:
            return value
        raise unknown_name(
            f"value for {method} parameter {param.cli!r}:", str(value), [str(x) for x in args]
        )
    # Optional[X] / X | None
    if type(None) in args:
        if value in (None, "none", "None", "null"):
            return None
        a = next(x for x in args if x is not type(None))
    if not isinstance(value, str):
        if a is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, a):
            return value
        raise SurgeryError(
            f"{method}: parameter {param.cli!r} expects {param.type_name()}, got {value!r}"
        )
    try:
        if a is bool:
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if a is int:
            return int(value)
        if a is float:
            return float(value)
        return value
    except ValueError:
        raise SurgeryError(
            f"{method}: parameter {param.cli!r} expects {param.type_name()}, got {value!r}"
        ) from None


def parse_pairs(given: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    """``["density=0.2", "lambda=1"]`` (the CLI's ``-p``) or a dict → a dict of raw values.

    Raises:
        SurgeryError: an item without ``=``.
    """
    if not isinstance(given, list):
        return dict(given or {})
    pairs: dict[str, Any] = {}
    for item in given:
        if "=" not in item:
            raise SurgeryError(f"-p expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        pairs[k.strip()] = v.strip()
    return pairs


def parse_params(method: Method, given: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    """Validate and coerce user parameters (``["density=0.2"]`` or a dict) against the schema.

    Returns:
        ``{kernel_param_name: value}`` with defaults filled in.

    Raises:
        SurgeryError: unknown key (with the valid list), bad value, malformed ``key=value``.
    """
    sch = schema(method)
    pairs = parse_pairs(given)
    out: dict[str, Any] = {}
    for k, v in pairs.items():
        p = sch.get(k) or sch.get(k.rstrip("_"))
        if p is None:
            valid = ", ".join(sorted(sch)) or "(none)"
            hint = did_you_mean(k, sch)
            extra = f"; did you mean {hint!r}?" if hint else ""
            raise SurgeryError(
                f"unknown parameter {k!r} for {method.kind} method "
                f"{method.name!r}{extra} valid: {valid}"
            )
        out[p.name] = _coerce(p, v, method.name)
    for p in sch.values():
        if p.name not in out:
            if p.required:
                raise SurgeryError(
                    f"{method.name}: parameter {p.cli!r} is required; pass -p {p.cli}=…"
                )
            out[p.name] = p.default
    return out


def describe(kind: str | None = None) -> list[dict[str, Any]]:
    """Registry listing for ``surgery methods`` and the README table."""
    rows = []
    for m in _registry():
        if kind is not None and m.kind != kind:
            continue
        params = {p.cli: (None if p.required else p.default) for p in schema(m).values()}
        rows.append(
            {
                "name": m.name,
                "kind": m.kind,
                "summary": m.summary,
                "params": params,
                "types": {p.cli: p.type_name() for p in schema(m).values()},
                "reference": m.reference,
            }
        )
    return rows


def markdown_table() -> str:
    """The README's method table, generated from the registry."""
    lines = [
        "| method | kind | what it does | parameters (defaults) | paper |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in sorted(describe(), key=lambda r: (r["kind"], r["name"])):
        params = ", ".join(f"`{k}={v}`" for k, v in r["params"].items()) or "—"
        lines.append(
            f"| `{r['name']}` | {r['kind']} | {r['summary']} | {params} | "
            f"[link]({r['reference']}) |"
        )
    return "\n".join(lines)


def update_readme(path: str = "README.md") -> bool:
    """Rewrite the table between the ``methods-table`` markers; True when the file changed."""
    from pathlib import Path

    p = Path(path)
    text = p.read_text()
    start, end = "<!-- methods-table:start -->", "<!-- methods-table:end -->"
    a, b = text.index(start) + len(start), text.index(end)
    new = text[:a] + "\n" + markdown_table() + "\n" + text[b:]
    if new != text:
        p.write_text(new)
    return new != text


if __name__ == "__main__":  # python -m surgery.methods  (refreshes README.md's table)
    update_readme()
