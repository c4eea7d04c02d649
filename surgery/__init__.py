"""surgery: model surgery on safetensors checkpoints.

The public API (the CLI is a thin layer over it). Heavy modules are imported lazily so that
``import surgery`` and ``surgery --help`` stay fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import SurgeryError

__all__ = ["SurgeryError", "__version__"]
