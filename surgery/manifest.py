"""``Manifest``: what was done, from what. Becomes ``surgery.json``, the card and the commit."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .checkpoint import HUB_ID, Checkpoint

__all__ = ["Manifest", "input_record", "versions", "hub_id_of"]


def versions() -> dict[str, str]:
    """Versions of the libraries that shape the numbers (recorded for reproducibility).

    Read from the installed distributions' metadata, not by importing them: importing torch alone
    costs about 1.5 s, which a numpy-only verb (extract, PiSSA, merges) would otherwise pay.
    """
    from importlib import metadata

    out = {"surgery": __version__, "python": platform.python_version()}
    for dist in ("torch", "numpy", "scipy", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def hub_id_of(ckpt: Checkpoint) -> str | None:
    """The Hub id a checkpoint came from: the input id, or ``_name_or_path`` when it is a Hub id."""
    if ckpt.revision is not None:
        return ckpt.source
    guess = ckpt.config.get("_name_or_path") or ckpt.config.get("base_model_name_or_path")
    if isinstance(guess, str) and HUB_ID.match(guess) and not Path(guess).exists():
        return guess
    return None


def input_record(role: str, ckpt: Checkpoint) -> dict[str, Any]:
    """One ``inputs`` entry: role, source, Hub id, resolved revision, header digest."""
    return {
        "role": role,
        "source": str(ckpt.source),
        "hub_id": hub_id_of(ckpt),
        "revision": ckpt.revision,
        "header_digest": ckpt.header_digest(),
    }


@dataclass
class Manifest:
    """Everything needed to reproduce and describe a run. Written as ``surgery.json``."""

    verb: str
    method: str | None = None
    method_reference: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = "cpu"
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, bool] = field(default_factory=lambda: {"model": False, "adapter": False})
    dtypes: dict[str, Any] = field(default_factory=dict)
    tensors: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    surgery_version: str = __version__
    versions: dict[str, str] = field(default_factory=versions)

    def add_input(self, role: str, ckpt: Checkpoint) -> None:
        self.inputs.append(input_record(role, ckpt))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tensors"] = sorted(d["tensors"], key=lambda t: t.get("name", ""))
        return d

    def write(self, folder: Path) -> Path:
        """Write ``surgery.json`` (sorted keys, JSON-safe floats) into ``folder``."""
        path = Path(folder) / "surgery.json"
        d = self.to_dict()
        for item in d["inputs"]:
            # surgery.json travels to the Hub: local inputs are named by folder/file name only
            # (the header digest identifies them); Hub inputs keep their id.
            if item.get("revision") is None and item.get("source"):
                item["source"] = Path(str(item["source"])).name
        path.write_text(json.dumps(_jsonable(d), indent=2, sort_keys=True) + "\n")
        return path

    def describe(self) -> str:
        """One line for commit messages: what was done, from what."""
        src = ", ".join(i.get("hub_id") or Path(i["source"]).name for i in self.inputs)
        m = f" {self.method}" if self.method else ""
        return f"surgery {self.verb}{m} of {src}"


def _jsonable(x: Any) -> Any:
    import math

    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 1) == 0:
        return _jsonable(x.item())
    if isinstance(x, Path):
        return str(x)
    return x
