"""Sinks for full models: ``ShardWriter`` (HF-standard safetensors shards) and ``OutputDir``.

``ShardWriter`` is told every output tensor's name, dtype and shape up front (all known from the
input headers), so it lays the shards out before any data exists: it writes each file's header
first and then places every tensor's bytes at its final offset as results arrive. Memory is
bounded by the tensor being written (nothing is buffered), results may arrive in any order, and the
bytes are identical whatever the order or executor.

``OutputDir`` writes into a temporary folder beside ``OUT`` and renames it at the very end, so an
interrupted or failed run never leaves a half-written ``OUT``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import DTYPE_SIZES
from .errors import SurgeryError

if TYPE_CHECKING:
    import torch

__all__ = ["ShardWriter", "OutputDir", "parse_size", "TORCH_TO_ST", "Entry"]

TORCH_TO_ST = {
    "torch.float64": "F64", "torch.float32": "F32", "torch.float16": "F16",
    "torch.bfloat16": "BF16", "torch.int64": "I64", "torch.int32": "I32", "torch.int16": "I16",
    "torch.int8": "I8", "torch.uint8": "U8", "torch.bool": "BOOL",
    "torch.float8_e4m3fn": "F8_E4M3", "torch.float8_e5m2": "F8_E5M2",
}  # fmt: skip
DEFAULT_SHARD_SIZE = 5 * 10**9  # transformers' "5GB"


def parse_size(s: str | int) -> int:
    """``"5GB"`` → 5·10⁹, ``"2GiB"`` → 2·2³⁰, ``"500MB"``, plain integers (bytes)."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", s.upper().replace("IB", "iB"), re.I)
    if not m:
        raise SurgeryError(f"cannot parse size {s!r}; use e.g. 5GB, 500MB, 2GiB or a byte count")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary else 1000
    return int(num * base ** "_KMGT".index(unit or "_"))


@dataclass(frozen=True)
class Entry:
    """One output tensor: name, safetensors dtype and stored shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return int(n * DTYPE_SIZES[self.dtype] + 0.999)


class ShardWriter:
    """Write a full model as HF shards under ``shard_size``, with a pre-computed layout.

    Tensors are laid out in sorted-name order. One shard is written as ``model.safetensors``;
    several as ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``
    (``metadata.total_size``, sorted ``weight_map``). Metadata is ``{"format": "pt"}``.

    Args:
        folder: where the shards go (the temporary output folder).
        entries: every output tensor.
        shard_size: byte cap per shard (a single tensor larger than the cap gets its own shard).
    """

    def __init__(
        self, folder: Path, entries: Iterable[Entry], shard_size: int = DEFAULT_SHARD_SIZE
    ):
        self.folder = Path(folder)
        entries = sorted(entries, key=lambda e: e.name)
        groups: list[list[Entry]] = [[]]
        size = 0
        for e in entries:
            if groups[-1] and size + e.nbytes > shard_size:
                groups.append([])
                size = 0
            groups[-1].append(e)
            size += e.nbytes
        n = len(groups)
        self.files: list[Path] = []
        self._where: dict[str, tuple[Path, int, Entry]] = {}
        self.total_size = sum(e.nbytes for e in entries)
        self._written: set[str] = set()
        for i, group in enumerate(groups):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path = self.folder / fname
            header: dict[str, object] = {"__metadata__": {"format": "pt"}}
            off = 0
            for e in group:
                header[e.name] = {
                    "dtype": e.dtype,
                    "shape": list(e.shape),
                    "data_offsets": [off, off + e.nbytes],
                }
                off += e.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-(8 + len(raw)) % 8)  # data section starts 8-byte aligned
            start = 8 + len(raw)
            with open(path, "wb") as f:
                f.write(struct.pack("<Q", len(raw)))
                f.write(raw)
                f.truncate(start + off)  # sparse until the data arrives
            for e in group:
                self._where[e.name] = (path, start + header[e.name]["data_offsets"][0], e)
            self.files.append(path)

    def _slot(self, name: str) -> tuple[Path, int, Entry]:
        try:
            return self._where[name]
        except KeyError:
            raise SurgeryError(
                f"internal: tensor {name!r} was not planned for this output"
            ) from None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Place one tensor (already in its stored layout and output dtype)."""
        path, pos, e = self._slot(name)
        got = TORCH_TO_ST.get(str(tensor.dtype))
        if got != e.dtype or tuple(tensor.shape) != e.shape:
            raise SurgeryError(
                f"internal: {name} planned as {e.dtype} {list(e.shape)} but got {got} "
                f"{list(tensor.shape)}"
            )
        data = tensor.detach().contiguous().reshape(-1).view(__import__("torch").uint8).numpy()
        with open(path, "r+b") as f:
            f.seek(pos)
            f.write(memoryview(data))
        self._written.add(name)

    def write_bytes(self, name: str, chunks: Iterable[bytes]) -> None:
        """Place one tensor from raw stored bytes (byte-identical copy-through)."""
        path, pos, e = self._slot(name)
        n = 0
        with open(path, "r+b") as f:
            f.seek(pos)
            for b in chunks:
                f.write(b)
                n += len(b)
        if n != e.nbytes:
            raise SurgeryError(f"internal: {name} expected {e.nbytes} bytes, copied {n}")
        self._written.add(name)

    def close(self) -> list[Path]:
        """Check every planned tensor was written; write the index when sharded."""
        missing = sorted(set(self._where) - self._written)
        if missing:
            raise SurgeryError(
                f"internal: {len(missing)} planned tensor(s) never written, e.g. {missing[0]!r}"
            )
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {k: self._where[k][0].name for k in sorted(self._where)},
            }
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return self.files


class OutputDir:
    """A temporary folder beside ``out`` that becomes ``out`` only on :meth:`commit`.

    Use as a context manager: an exception (or Ctrl-C) removes the temporary folder and leaves
    ``out`` untouched.

    Raises:
        SurgeryError: when ``out`` exists and ``force`` is False.
    """

    def __init__(self, out: str | os.PathLike[str], force: bool = False):
        self.out = Path(out)
        if self.out.exists() and not force:
            raise SurgeryError(
                f"{self.out} already exists; choose another -o or pass --force to replace it"
            )
        if self.out.exists() and not self.out.is_dir():
            raise SurgeryError(f"{self.out} exists and is not a folder")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.surgery-tmp-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self.committed = False

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self.committed:
            self.abort()

    def commit(self) -> Path:
        """Atomically replace ``out`` with the finished temporary folder."""
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.surgery-old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.committed = True
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
