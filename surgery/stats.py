"""``Stats``: per-module calibration tensors (``<module>.cov`` …) in one safetensors file.

Layout of a stats file (readable with plain ``safetensors``):

* ``<module>.cov``      ``[in, in]`` F32 (or F64): the input covariance of module ``<module>``
  (the checkpoint's tensor name without ``.weight``), already divided by its count.
* ``<module>.samples``  ``[1]`` I64: samples (forward calls × batch rows) that reached the module.
* ``<module>.tokens``   ``[1]`` I64: tokens that reached the module.
* other ``<module>.<key>`` tensors (e.g. ``direction`` for probe edits) are kept as they are.
* metadata (all strings): ``fingerprint`` (hex), ``convention`` (``max`` — the official/PEFT
  per-sample normalisation — or ``none``: token-weighted), ``options`` (JSON), ``format=pt``,
  and ``cov_alias`` (JSON ``{module: root}``, optional): modules fed the very same input tensor
  as ``root`` (``k_proj``/``v_proj`` → ``q_proj``, ``up_proj`` → ``gate_proj``) have no ``.cov``
  of their own; their covariance is the root's, stored once. :class:`Stats` resolves it.

Tensors are read lazily, one module at a time; writing goes through a temporary file and an atomic
rename, so a crashed run never leaves a half-written stats file behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import read_header
from .errors import SurgeryError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .checkpoint import Checkpoint
    from .writer import Entry

__all__ = ["Stats", "StatsWriter", "write_stats", "STAT_KEYS"]

# Suffixes that make a tensor name ``<module>.<key>`` (longest names first is not needed: keys are
# single dotted components).
STAT_KEYS = ("cov", "samples", "tokens", "direction")


def _split(name: str) -> tuple[str, str]:
    """``model.layers.0.mlp.up_proj.cov`` → (``model.layers.0.mlp.up_proj``, ``cov``)."""
    mod, _, key = name.rpartition(".")
    return mod, key


class Stats:
    """Lazy read-only view of a stats safetensors file. Use :meth:`open`."""

    def __init__(
        self, path: Path, meta: dict[str, str], names: list[str], shapes: dict[str, tuple]
    ):
        self.path = path
        self._meta_raw = meta
        self._names = names
        self._shapes = shapes
        self._handle: Any = None
        self._reader: Any = None  # a Checkpoint on the same file, for numpy reads
        try:
            alias = json.loads(meta.get("cov_alias", "{}"))
        except ValueError:
            raise SurgeryError(f"{path}: its cov_alias metadata is not JSON") from None
        # module → root, for covariances stored once for modules fed the same input
        self._alias = {str(m): str(r) for m, r in alias.items() if f"{r}.cov" in shapes}

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Stats:
        """Open a stats file (reads only the header).

        Raises:
            SurgeryError: missing, pickle or corrupt file.
        """
        p = Path(path).expanduser()
        if p.suffix.lower() in (".pt", ".pth", ".bin", ".pkl", ".pickle"):
            raise SurgeryError(
                f"{p}: stats must be a .safetensors file; surgery never loads pickles (a PEFT "
                "covariance_file is a torch pickle: convert it with safetensors.torch.save_file, "
                "naming each tensor '<module>.cov')"
            )
        if not p.is_file():
            raise SurgeryError(f"{p}: no such stats file; create one with `surgery calibrate`")
        meta, infos = read_header(p)
        names = list(infos)
        shapes = {n: i.shape for n, i in infos.items()}
        return cls(p, {str(k): str(v) for k, v in meta.items()}, names, shapes)

    # -- metadata -------------------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        """Metadata with ``options`` decoded from JSON (other values are strings)."""
        out: dict[str, Any] = dict(self._meta_raw)
        for k in ("options",):
            if k in out:
                try:
                    out[k] = json.loads(out[k])
                except ValueError:
                    pass  # a user-written file may hold a plain string; keep it
        return out

    @property
    def fingerprint(self) -> str | None:
        return self._meta_raw.get("fingerprint")

    @property
    def convention(self) -> str | None:
        return self._meta_raw.get("convention")

    # -- header-only queries ----------------------------------------------------------------------
    def names(self) -> list[str]:
        """All tensor names in the file."""
        return list(self._names)

    def _key(self, module: str, key: str) -> str:
        """The tensor holding ``<module>.<key>`` (a shared covariance: its root's)."""
        name = f"{module}.{key}"
        if key == "cov" and name not in self._shapes and module in self._alias:
            return f"{self._alias[module]}.cov"
        return name

    def modules(self, key: str = "cov") -> list[str]:
        """Modules that have a ``<module>.<key>`` tensor (or share one), in file order."""
        out = []
        for n in self._names:
            mod, k = _split(n)
            if k == key or (key == "cov" and k == "samples" and mod in self._alias):
                out.append(mod)
        return out

    def shared(self, module: str) -> str | None:
        """The module whose stored covariance ``module`` shares (``None``: its own, or none)."""
        return self._alias.get(module) if f"{module}.cov" not in self._shapes else None

    def has(self, module: str, key: str = "cov") -> bool:
        return self._key(module, key) in self._shapes

    def shape(self, module: str, key: str = "cov") -> tuple[int, ...]:
        try:
            return self._shapes[self._key(module, key)]
        except KeyError:
            raise self._missing(module, key) from None

    def __contains__(self, module: object) -> bool:
        return isinstance(module, str) and self.has(module)

    def __len__(self) -> int:
        return len(self.modules())

    # -- data -------------------------------------------------------------------------------------
    def get(self, module: str, key: str = "cov") -> torch.Tensor:
        """Load ``<module>.<key>`` (stored dtype, CPU)."""
        name = self._key(module, key)
        if name not in self._shapes:
            raise self._missing(module, key)
        if self._handle is None:
            from safetensors import safe_open

            try:
                self._handle = safe_open(str(self.path), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises several types
                raise SurgeryError(f"{self.path}: cannot open as safetensors ({e})") from None
        return self._handle.get_tensor(name)

    def cov_array(self, module: str) -> np.ndarray:
        """``<module>.cov`` as a float64 numpy array, read without torch (for the numpy verbs)."""
        import numpy as np

        from ops.backend import bf16_to_f32

        from .checkpoint import Checkpoint

        name = self._key(module, "cov")
        if name not in self._shapes:
            raise self._missing(module, "cov")
        if self._reader is None:
            self._reader = Checkpoint.open(self.path)
        a = self._reader.array(name)
        return (bf16_to_f32(a) if self._reader.dtype(name) == "BF16" else a).astype(np.float64)

    def cov(self, module: str) -> torch.Tensor:
        """The ``[in, in]`` covariance of ``module`` (stored dtype: float32 or float64)."""
        return self.get(module, "cov")

    def count(self, module: str, key: str = "samples") -> int:
        """``samples`` or ``tokens`` seen by ``module`` (0 when the file does not record it)."""
        if not self.has(module, key):
            return 0
        return int(self.get(module, key).reshape(-1)[0])

    def close(self) -> None:
        self._handle = self._reader = None

    def _missing(self, module: str, key: str) -> SurgeryError:
        from .errors import did_you_mean

        hint = did_you_mean(module, self.modules(key))
        extra = f"; did you mean {hint!r}?" if hint else ""
        return SurgeryError(
            f"{self.path}: no {key!r} for module {module!r}{extra} ({len(self.modules(key))} "
            f"modules have one); run `surgery calibrate` with targets that include it"
        )

    # -- validation -------------------------------------------------------------------------------
    def check(self, ckpt: Checkpoint, modules: Iterable[str], key: str = "cov") -> list[str]:
        """Return every problem (empty when fine) for using these stats with ``ckpt``'s ``modules``.

        Checks, per module: the stats hold ``<module>.<key>``, the checkpoint holds
        ``<module>.weight``, and the covariance is ``[in, in]`` for the weight's ``(out, in)``
        (Conv1D weights are compared in their ``(out, in)`` orientation).
        """
        problems: list[str] = []
        for m in modules:
            m = m[: -len(".weight")] if m.endswith(".weight") else m
            wname = f"{m}.weight"
            if not self.has(m, key):
                problems.append(
                    f"{m}: no '{m}.{key}' in {self.path.name}; run `surgery calibrate` with "
                    "targets that include this module"
                )
                continue
            if wname not in ckpt:
                problems.append(f"{m}: stats present but the checkpoint has no tensor {wname!r}")
                continue
            wshape = ckpt.shape(wname)
            cshape = self.shape(m, key)
            if key == "cov":
                if len(wshape) != 2:
                    problems.append(f"{m}: weight {wname} has shape {list(wshape)}, not 2-D")
                elif cshape != (wshape[1], wshape[1]):
                    problems.append(
                        f"{m}: covariance is {list(cshape)} but weight {wname} {list(wshape)} "
                        f"(out, in) needs [{wshape[1]}, {wshape[1]}]; the stats were computed for "
                        "another model — recalibrate"
                    )
        return problems

    def __repr__(self) -> str:
        return f"Stats({str(self.path)!r}, {len(self)} modules, convention={self.convention!r})"


class StatsWriter:
    """Stream a stats file: the layout is fixed up front, tensors are placed as they are ready.

    ``calibrate`` writes each module group's covariances as soon as its pass over the data ends,
    so the finished groups are not held in memory. The file is written beside ``path`` under a
    temporary name and renamed by :meth:`commit`; :meth:`abort` removes it.

    Args:
        path: destination ``.safetensors``.
        entries: every tensor of the file (name, safetensors dtype, shape).
        fingerprint, convention, options, extra_meta: as :func:`write_stats`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        entries: Iterable[Entry],
        *,
        fingerprint: str = "",
        convention: str = "",
        options: Mapping[str, Any] | None = None,
        extra_meta: Mapping[str, str] | None = None,
    ):
        from .writer import DEFAULT_SHARD_SIZE, ShardWriter

        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "fingerprint": fingerprint,
            "convention": convention,
            "options": json.dumps(dict(options or {}), sort_keys=True),
        }
        meta.update({str(k): str(v) for k, v in (extra_meta or {}).items()})
        entries = list(entries)
        stem = f".{self.path.stem}.tmp{os.getpid()}"
        size = max(DEFAULT_SHARD_SIZE, sum(e.nbytes for e in entries) + 1)  # always one file
        self._writer = ShardWriter(self.path.parent, entries, size, metadata=meta, name=stem)
        self._tmp = self.path.parent / f"{stem}.safetensors"

    def write(self, name: str, tensor: Any) -> None:
        """Place one tensor (a torch tensor or a numpy array of the planned dtype and shape)."""
        self._writer.write(name, tensor)

    def commit(self) -> Path:
        """Check every tensor was written, then rename the file into place."""
        self._writer.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Remove the temporary file (after an error)."""
        self._tmp.unlink(missing_ok=True)


def write_stats(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Any],
    *,
    fingerprint: str = "",
    convention: str = "",
    options: Mapping[str, Any] | None = None,
    extra_meta: Mapping[str, str] | None = None,
) -> Path:
    """Write a stats file atomically (temporary file in the same folder, then ``os.replace``).

    Args:
        path: destination ``.safetensors``.
        tensors: ``{"<module>.<key>": torch tensor}``.
        fingerprint: hex digest identifying the inputs (used as a cache key).
        convention: ``max`` or ``none`` (see the module docstring).
        options: JSON-serialisable options recorded in the metadata.
        extra_meta: more string metadata.

    Returns:
        The written path.
    """
    from .writer import TORCH_TO_ST, Entry

    entries = [Entry(k, TORCH_TO_ST[str(v.dtype)], tuple(v.shape)) for k, v in tensors.items()]
    w = StatsWriter(path, entries, fingerprint=fingerprint, convention=convention,
                    options=options, extra_meta=extra_meta)  # fmt: skip
    try:
        for k, v in tensors.items():
            w.write(k, v)
        return w.commit()
    except BaseException:
        w.abort()
        raise
