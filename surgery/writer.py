"""Sinks for full models: ``ShardWriter`` (HF-standard safetensors shards) and ``OutputDir``.

``ShardWriter`` is told every output tensor's name, dtype and shape up front (all known from the
input headers), so it lays the shards out before any data exists: it writes each file's header
first and then places every tensor's bytes at its final offset as results arrive. Memory is
bounded by the tensor being written (nothing is buffered), results may arrive in any order, and the
bytes are identical whatever the order or executor.

``OutputDir`` writes into a temporary folder beside ``OUT`` and renames it at the very end, so an
interrupted or failed run never leaves a half-written ``OUT``. The temporary folder's name depends
only on ``OUT`` (``.OUT.surgery-tmp``) and a lock file beside it (``.OUT.surgery-lock``, holding the
writer's pid and host) refuses a second concurrent run on the same ``OUT``. A :class:`Journal` in
the temporary folder records every finished tensor (its manifest row and adapter factors), so an
interrupted run can be continued with ``--resume``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import DTYPE_SIZES, NP_DTYPES
from .errors import SurgeryError

if TYPE_CHECKING:
    from ops.lowrank import LowRank

__all__ = [
    "ShardWriter",
    "group_shards",
    "OutputDir",
    "Journal",
    "parse_size",
    "TORCH_TO_ST",
    "Entry",
]

log = logging.getLogger("surgery")

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


def group_shards(entries: Iterable[Entry], shard_size: int) -> list[list[Entry]]:
    """Split entries (in sorted-name order) into shards of at most ``shard_size`` bytes.

    The one layout rule: :class:`ShardWriter` writes it and ``--dry-run`` reports it. A tensor
    larger than the cap gets a shard of its own.
    """
    groups: list[list[Entry]] = [[]]
    size = 0
    for e in sorted(entries, key=lambda e: e.name):
        if groups[-1] and size + e.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += e.nbytes
    return groups


class ShardWriter:
    """Write a full model as HF shards under ``shard_size``, with a pre-computed layout.

    Tensors are laid out in sorted-name order. One shard is written as ``model.safetensors``;
    several as ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``
    (``metadata.total_size``, sorted ``weight_map``). Metadata is ``{"format": "pt"}``.

    Args:
        folder: where the shards go (the temporary output folder).
        entries: every output tensor.
        shard_size: byte cap per shard (a single tensor larger than the cap gets its own shard).
        resume: reopen shard files an interrupted run laid out (same header, same size) instead
            of recreating them; tensors already in them are declared with :meth:`mark_written`.
        metadata: extra ``__metadata__`` strings (besides ``format``) for every shard.
        name: the file stem: ``{name}.safetensors``, ``{name}-0000i-of-0000N.safetensors``.

    Raises:
        SurgeryError: with ``resume``, when an existing shard does not match the layout.
    """

    def __init__(
        self,
        folder: Path,
        entries: Iterable[Entry],
        shard_size: int = DEFAULT_SHARD_SIZE,
        resume: bool = False,
        metadata: Mapping[str, str] | None = None,
        name: str = "model",
    ):
        self.folder = Path(folder)
        entries = sorted(entries, key=lambda e: e.name)
        groups = group_shards(entries, shard_size)
        n = len(groups)
        self.files: list[Path] = []
        self._where: dict[str, tuple[Path, int, Entry]] = {}
        self.total_size = sum(e.nbytes for e in entries)
        self._written: set[str] = set()
        for i, group in enumerate(groups):
            fname = f"{name}-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else f"{name}.safetensors"
            path = self.folder / fname
            header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
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
            head = struct.pack("<Q", len(raw)) + raw
            if resume and path.is_file():
                # The layout is a pure function of the entries: an interrupted run of the same job
                # wrote exactly this header, and its finished tensors already sit at their offsets.
                with open(path, "rb") as f:
                    same = f.read(len(head)) == head
                if not same or path.stat().st_size != start + off:
                    raise SurgeryError(
                        f"cannot resume: {path} does not match this run's layout; "
                        "rerun without --resume to start over"
                    )
            else:
                with open(path, "wb") as f:
                    f.write(head)
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

    def write(self, name: str, tensor: Any) -> None:
        """Place one tensor (already in its stored layout and output dtype).

        ``tensor`` is a torch tensor or a numpy array; a BF16 entry takes numpy uint16 bit patterns.
        """
        path, pos, e = self._slot(name)
        if type(tensor).__module__.split(".")[0] == "numpy":
            import numpy as np

            got = next(
                (k for k, v in NP_DTYPES.items() if k != "BF16" and np.dtype(v) == tensor.dtype),
                str(tensor.dtype),
            )
            if got == "U16" and e.dtype == "BF16":
                got = "BF16"  # bfloat16 travels as its bit pattern (numpy has no bfloat16)
            data = np.ascontiguousarray(tensor).reshape(-1).view(np.uint8)
        else:
            got = TORCH_TO_ST.get(str(tensor.dtype))
            data = tensor.detach().contiguous().reshape(-1).view(__import__("torch").uint8).numpy()
        if got != e.dtype or tuple(tensor.shape) != e.shape:
            raise SurgeryError(
                f"internal: {name} planned as {e.dtype} {list(e.shape)} but got {got} "
                f"{list(tensor.shape)}"
            )
        with open(path, "r+b") as f:
            f.seek(pos)
            f.write(memoryview(data))
        self._written.add(name)

    def mark_written(self, name: str) -> None:
        """Declare a tensor an interrupted run already placed (``--resume``)."""
        self._slot(name)
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


JOURNAL = ".surgery-journal.jsonl"
FACTORS = ".surgery-resume"


def _json_default(x: object) -> object:
    # numpy/cupy scalars in per-tensor reports; paths.
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        return x.item()
    return str(x)


class Journal:
    """Per-tensor checkpointing in the temporary output folder (what ``--resume`` reads back).

    ``.surgery-journal.jsonl`` starts with ``{"fingerprint": ...}`` (a digest of the job: inputs,
    method, parameters, seed, plan) and gets one line per finished tensor, appended only after
    its bytes are in the shard: ``{"name", "report", "module", "factors", "wrote"}``. Adapter
    factors go to ``.surgery-resume/NNNNNN.safetensors`` (written to a temporary name, then
    renamed). A line torn by a kill is ignored, so its tensor is simply computed again. Both are
    removed before the folder becomes ``OUT``. Survives a killed process; after a power loss,
    start over.
    """

    def __init__(self, folder: Path, fingerprint: str | None = None):
        self.folder = Path(folder)
        self.path = self.folder / JOURNAL
        self.fingerprint = fingerprint
        self.entries: dict[str, dict[str, object]] = {}
        self._next: int | None = None

    @staticmethod
    def fingerprint_of(folder: Path) -> str | None:
        """The fingerprint an interrupted run recorded in ``folder`` (None: no journal)."""
        try:
            with open(Path(folder) / JOURNAL, encoding="utf-8") as f:
                return json.loads(f.readline()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            return None

    def load(self) -> None:
        """Read the finished tensors back (a torn last line is skipped)."""
        if not self.path.is_file():
            return
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().split("\n")[1:]
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # the line a kill cut short: recompute that tensor
            if rec.get("factors") and not (self.folder / FACTORS / rec["factors"]).is_file():
                continue
            self.entries[rec["name"]] = rec

    def start(self) -> None:
        """Write the header line of a fresh journal (keep an existing one when resuming)."""
        if not self.path.is_file():
            self.path.write_text(json.dumps({"fingerprint": self.fingerprint}) + "\n")

    def record(
        self,
        name: str,
        report: dict[str, object],
        module: str | None,
        lowrank: LowRank | None,
        wrote: bool = True,
    ) -> None:
        """Append one finished tensor (call after its bytes are written; ``wrote``: it has some)."""
        factors = None
        if lowrank is not None:
            import numpy as np
            from safetensors.numpy import save_file

            from ops.backend import to_host

            d = self.folder / FACTORS
            d.mkdir(exist_ok=True)
            if self._next is None:  # after files a torn line may have orphaned
                self._next = len(list(d.glob("*.safetensors")))
            factors = f"{self._next:06d}.safetensors"
            self._next += 1
            tmp = d / (factors + ".part")
            arrays = {"A": np.asarray(to_host(lowrank.A)), "B": np.asarray(to_host(lowrank.B))}
            save_file(arrays, str(tmp), metadata={"scale": repr(float(lowrank.scale))})
            os.replace(tmp, d / factors)
        rec = {"name": name, "report": report, "module": module, "factors": factors, "wrote": wrote}
        line = json.dumps(rec, default=_json_default, allow_nan=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")  # one write per line: a kill tears at most the last one
        self.entries[name] = json.loads(line)

    def restored(
        self,
    ) -> Iterator[tuple[str, dict[str, object], str | None, LowRank | None, bool]]:
        """Yield ``(name, report, module, lowrank, wrote)`` per finished tensor (journal order)."""
        from safetensors import safe_open

        from ops.lowrank import LowRank

        for name, rec in self.entries.items():
            lowrank = None
            if rec.get("factors"):
                path = self.folder / FACTORS / str(rec["factors"])
                with safe_open(str(path), framework="numpy") as f:
                    scale = float(f.metadata()["scale"])
                    lowrank = LowRank(A=f.get_tensor("A"), B=f.get_tensor("B"), scale=scale)
            report = dict(rec.get("report") or {})  # type: ignore[call-overload]
            yield name, report, rec.get("module"), lowrank, bool(rec.get("wrote"))  # type: ignore[misc]

    def remove(self) -> None:
        """Delete the journal and the saved factors (the run is complete)."""
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.folder / FACTORS, ignore_errors=True)


def _lock_holder(lock: Path) -> tuple[int, str] | None:
    try:
        pid, host = lock.read_text().split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None


def _alive(pid: int, host: str) -> bool:
    if host != socket.gethostname():
        return True  # another machine on a shared filesystem: cannot check, assume it runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputDir:
    """A temporary folder beside ``out`` that becomes ``out`` only on :meth:`commit`.

    Use as a context manager. On an error in the run's inputs (a :class:`SurgeryError`) or when
    nothing was finished yet, the temporary folder is removed; on an interruption (Ctrl-C, a lost
    worker, a crash) with finished tensors in the journal it is kept, to be continued with
    ``resume=True``. ``out`` is untouched in every case.

    Args:
        out: the final output folder.
        force: replace an existing ``out`` on commit.
        resume: continue the interrupted run found in the temporary folder (when its journal's
            fingerprint equals ``fingerprint``); otherwise any leftover is discarded.
        fingerprint: digest of the job, recorded in the journal.

    Raises:
        SurgeryError: ``out`` exists and ``force`` is False; another live run holds the lock;
            ``resume`` with a leftover from a different job.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        force: bool = False,
        *,
        resume: bool = False,
        fingerprint: str | None = None,
    ):
        self.out = Path(out)
        if self.out.exists() and not force:
            raise SurgeryError(
                f"{self.out} already exists; choose another -o or pass --force to replace it"
            )
        if self.out.exists() and not self.out.is_dir():
            raise SurgeryError(f"{self.out} exists and is not a folder")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        # Deterministic names, so that a resumed run finds the folder of the interrupted one.
        self.tmp = self.out.parent / f".{self.out.name}.surgery-tmp"
        self.lock = self.out.parent / f".{self.out.name}.surgery-lock"
        self.committed = False
        self._locked = False
        self._acquire()
        try:
            self.journal = Journal(self.tmp, fingerprint)
            self._prepare(resume, fingerprint)
        except BaseException:
            self._release()
            raise

    def _acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _lock_holder(self.lock)
                if holder is not None and _alive(*holder):
                    raise SurgeryError(
                        f"another surgery run (pid {holder[0]} on {holder[1]}) is writing "
                        f"{self.out}; wait for it to finish, or delete {self.lock} if that "
                        "process is gone"
                    ) from None
                # A stale lock from a killed run (or one still being written): take it over.
                self.lock.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
            self._locked = True
            return
        raise SurgeryError(f"could not lock {self.lock}; delete it if no surgery run is active")

    def _release(self) -> None:
        if self._locked:
            self.lock.unlink(missing_ok=True)
            self._locked = False

    def _prepare(self, resume: bool, fingerprint: str | None) -> None:
        if self.tmp.exists() and resume:
            found = Journal.fingerprint_of(self.tmp)
            if found is not None and found == fingerprint:
                self.journal.load()
                n = len(self.journal.entries)
                log.info("resuming %s: %d tensor(s) already finished", self.out, n)
                self.journal.start()
                return
            if found is not None:
                raise SurgeryError(
                    f"cannot resume {self.out}: the unfinished run in {self.tmp} used different "
                    "inputs or options; rerun it with the same command, or drop --resume to "
                    "start over"
                )
        if self.tmp.exists():
            if not resume:
                log.warning("discarding the unfinished run in %s (--resume continues it)", self.tmp)
            shutil.rmtree(self.tmp)
        elif resume:
            log.warning("nothing to resume for %s; starting from the beginning", self.out)
        self.tmp.mkdir()
        self.journal.start()

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.committed:
            return
        # An error in the inputs will recur on a rerun: clean up. An interruption keeps what
        # was finished so that --resume can continue from it.
        user_error = isinstance(exc, SurgeryError) and not getattr(exc, "resumable", False)
        if exc_type is not None and not user_error and self.journal.entries:
            log.warning(
                "interrupted after %d finished tensor(s); kept in %s: rerun the same command "
                "with --resume to continue",
                len(self.journal.entries),
                self.tmp,
            )
            self._release()
            return
        self.abort()

    def commit(self) -> Path:
        """Atomically replace ``out`` with the finished temporary folder."""
        self.journal.remove()
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.surgery-old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.committed = True
        self._release()
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._release()
