"""surgery: model surgery on safetensors checkpoints.

The public API (the CLI is a thin layer over it). Heavy modules are imported lazily so that
``import surgery`` and ``surgery --help`` stay fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import SurgeryError

# The verbs live in ``surgery.api`` (``import surgery.api as api; api.merge(...)``). The ones whose
# names do not collide with a submodule (``surgery.merge`` is the merge module) are re-exported
# here lazily, so importing the package stays cheap for the CLI's --help.
_API = (
    "open_checkpoint",
    "inspect",
    "extract",
    "apply",
    "port",
    "convert",
    "merge_adapters",
    "push",
    "plot_spectra",
    "plot_report",
)
# ``apply_adapter`` is the name DESIGN.md gives ``apply``.
_ALIASES = {"apply_adapter": "apply"}

__all__ = ["SurgeryError", "__version__", *_API, *_ALIASES]


def __getattr__(name: str):
    if name in _API or name in _ALIASES:
        from . import api

        return getattr(api, _ALIASES.get(name, name))
    raise AttributeError(f"module 'surgery' has no attribute {name!r}")
