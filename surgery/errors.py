"""``SurgeryError``: the only user-facing exception, and ``did_you_mean`` for unknown names."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["SurgeryError", "did_you_mean", "unknown_name"]


class SurgeryError(Exception):
    """A user mistake or bad input. The CLI prints ``Error: <message>`` and exits with 1.

    Messages say what failed, where (tensor/module name and shape), what was observed, and how
    to fix it.
    """


def did_you_mean(name: str, choices: Iterable[str]) -> str | None:
    """Return the closest choice to ``name`` (difflib ratio ≥ 0.6), or ``None``."""
    best = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return best[0] if best else None


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> SurgeryError:
    """Build the standard error for an unknown name.

    Example: ``unknown merge method 'tie'; did you mean 'ties'? choices: dare_linear, ties``.
    """
    choices = sorted(choices)
    hint = did_you_mean(name, choices)
    msg = f"unknown {kind} {name!r}"
    if hint:
        msg += f"; did you mean {hint!r}?"
    return SurgeryError(f"{msg} choices: {', '.join(choices)}")
