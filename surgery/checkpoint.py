"""``Checkpoint``: a lazy, read-only view over safetensors checkpoints.

Accepted sources: a single ``.safetensors`` file, a folder with ``model.safetensors``, a sharded
folder with ``model.safetensors.index.json``, any folder of ``*.safetensors`` files, or a Hub id
``org/name[@revision]`` (resolved to a local snapshot by :mod:`surgery.hub`).

Names, shapes, dtypes and byte sizes come from the headers alone, parsed here (the first
``8 + N`` bytes of each file), so opening and planning never read tensor data. Tensors are loaded
one at a time, in their stored dtype, by reading their byte range directly; at most one
file is touched at a time, with positional reads (no mmap, so resident memory is bounded by the
tensors in flight).

GPT-2 style ``Conv1D`` weights are stored ``(in, out)``; this view presents them as ``(out, in)``
(:meth:`Checkpoint.shape`, :meth:`Checkpoint.get`) and :meth:`Checkpoint.to_stored` turns a computed
``(out, in)`` tensor back into the stored layout.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SurgeryError

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "Checkpoint",
    "TensorInfo",
    "COMPUTABLE_DTYPES",
    "st_dtype",
    "NP_DTYPES",
    "DTYPE_SIZES",
    "PICKLE_SUFFIXES",
    "AUX_FILES",
    "read_header",
    "is_conv1d",
    "torch_dtype",
]

# Bytes per element of every safetensors dtype (spec: huggingface/safetensors format).
DTYPE_SIZES: dict[str, float] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
    "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 0.5,
    "F6_E2M3": 0.75, "F6_E3M2": 0.75, "C64": 8,
}  # fmt: skip
COMPUTABLE_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Non-weight files copied beside every full-model output.
AUX_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "spiece.model", "sentencepiece.bpe.model",
)  # fmt: skip
# Architectures whose linear layers are transformers.pytorch_utils.Conv1D, stored (in, out).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "decision_transformer", "imagegpt"})
CONV1D_LEAVES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})
_TORCH_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32",
    "U64": "uint64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip
# numpy dtypes of the stored bytes; BF16 travels as its uint16 bit pattern (numpy has no bfloat16).
NP_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
    "I16": "<i2", "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "?",
}  # fmt: skip
_DTYPE_NAMES = {
    "F64": "F64", "F32": "F32", "F16": "F16", "BF16": "BF16", "FP64": "F64", "FP32": "F32",
    "FP16": "F16", "FLOAT64": "F64", "FLOAT32": "F32", "FLOAT16": "F16", "BFLOAT16": "BF16",
}  # fmt: skip
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")


@dataclass(frozen=True)
class TensorInfo:
    """Header facts about one stored tensor (no data read)."""

    name: str
    shape: tuple[int, ...]  # as stored
    dtype: str  # safetensors dtype string, e.g. "BF16"
    file: Path
    offsets: tuple[int, int]  # byte range inside the file's data section

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def computable(self) -> bool:
        return self.dtype in COMPUTABLE_DTYPES


def st_dtype(name: str) -> str:
    """Map a safetensors dtype (``BF16``) or a CLI name (``bf16``) to the safetensors name."""
    try:
        return _DTYPE_NAMES[name.upper()]
    except KeyError:
        raise SurgeryError(f"unknown dtype {name!r}; choices: fp32, fp16, bf16, fp64") from None


def torch_dtype(name: str) -> torch.dtype:
    """Map a safetensors dtype string (``BF16``) or a CLI name (``bf16``) to a torch dtype."""
    import torch

    return getattr(torch, _TORCH_DTYPES[st_dtype(name)])


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """Parse one safetensors header, validating sizes against the file without reading data.

    Returns:
        ``(metadata, {name: TensorInfo})``.

    Raises:
        SurgeryError: for a truncated, corrupt or absurd header, naming the file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SurgeryError(
                    f"{path}: not a safetensors file ({size} bytes, the 8-byte header length is "
                    "missing); re-download or re-export the checkpoint"
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n + 8 > size:
                raise SurgeryError(
                    f"{path}: corrupt safetensors header (claims {n} header bytes in a {size}-byte "
                    "file); the file is truncated or not safetensors — re-download it"
                )
            raw = f.read(n)
    except OSError as e:
        raise SurgeryError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise SurgeryError(f"{path}: corrupt safetensors header ({e}); re-download it") from None
    meta = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for name, h in header.items():
        try:
            dtype, shape, (b, e) = h["dtype"], tuple(int(d) for d in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SurgeryError(f"{path}: corrupt header entry for tensor {name!r}") from None
        numel = 1
        for d in shape:
            if d < 0:
                raise SurgeryError(f"{path}: tensor {name!r} has a negative dimension {shape}")
            numel *= d
        item = DTYPE_SIZES.get(dtype)
        if item is None:
            raise SurgeryError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if not (0 <= b <= e <= data_size) or int(numel * item + 0.999) != e - b:
            raise SurgeryError(
                f"{path}: tensor {name!r} {list(shape)} {dtype} claims bytes [{b}, {e}) but the "
                f"data section holds {data_size} bytes; the file is truncated or corrupt — "
                "re-download it"
            )
        infos[name] = TensorInfo(name, shape, dtype, path, (int(b), int(e)))
    return meta, infos


def is_conv1d(name: str, shape: tuple[int, ...], model_type: str | None) -> bool:
    """True for a GPT-2 style ``Conv1D`` weight (stored ``(in, out)``), from header facts only.

    With a ``config.json`` the model type decides; without one, the leaf names do.
    """
    if len(shape) != 2 or not name.endswith(".weight"):
        return False
    leaf = name[: -len(".weight")].rsplit(".", 1)[-1]
    if model_type is not None:
        return model_type in CONV1D_MODEL_TYPES and leaf in CONV1D_LEAVES
    return leaf in CONV1D_LEAVES


def _refuse_pickle(path: Path) -> SurgeryError:
    return SurgeryError(
        f"{path} is a pickle checkpoint; surgery never loads pickle files (they can run code). "
        "Convert it to safetensors first, e.g. in Python: "
        "AutoModel.from_pretrained(dir).save_pretrained(out, safe_serialization=True)"
    )


class Checkpoint:
    """Lazy read-only mapping ``name → torch.Tensor`` over safetensors files.

    Use :meth:`open`. Iteration order is ``(file, offset)``: the order the bytes lie on disk.
    """

    def __init__(self, files: list[Path], root: Path, source: str, revision: str | None = None):
        self.root = root
        self.source = source  # what the user typed (path or Hub id)
        self.revision = revision  # resolved commit hash for Hub inputs
        self.files = files
        self._infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, dict[str, Any]] = {}
        for f in files:
            meta, infos = read_header(f)
            self.metadata[f.name] = meta
            for name, info in infos.items():
                if name in self._infos:
                    raise SurgeryError(
                        f"tensor {name!r} appears in both {self._infos[name].file.name} and "
                        f"{f.name}; remove the stray file from {root}"
                    )
                self._infos[name] = info
        self._order = sorted(
            self._infos, key=lambda k: (files.index(self._infos[k].file), self._infos[k].offsets[0])
        )
        cfg = root / "config.json" if root.is_dir() else None
        self.config: dict[str, Any] = {}
        if cfg is not None and cfg.is_file():
            try:
                self.config = json.loads(cfg.read_text())
            except ValueError as e:
                raise SurgeryError(f"{cfg}: invalid JSON ({e})") from None
        self._handle: tuple[Path, int] | None = None  # (file, data start) of the last file read

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def open(cls, src: str | os.PathLike[str]) -> Checkpoint:
        """Open a checkpoint from a path or a Hub id (``org/name[@revision]``).

        Raises:
            SurgeryError: missing path, pickle files, no safetensors, a broken index.
        """
        s = os.fspath(src)
        path = Path(s).expanduser()
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise _refuse_pickle(path)
        if not path.exists():
            if HUB_ID.match(s) and not s.startswith((".", "/", "~")):
                from .hub import download

                repo, _, rev = s.partition("@")
                local, commit = download(repo, rev or None)
                ckpt = cls._open_path(local, source=repo)
                ckpt.revision = commit
                return ckpt
            raise SurgeryError(
                f"{s}: no such file or folder (expected a safetensors checkpoint "
                "file/folder or a Hub id org/name[@revision])"
            )
        return cls._open_path(path, source=s)

    @classmethod
    def _open_path(cls, path: Path, source: str) -> Checkpoint:
        if path.is_file():
            if path.suffix != ".safetensors":
                raise SurgeryError(f"{path}: not a .safetensors file")
            return cls([path], path.parent, source)
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise SurgeryError(f"{index}: invalid index ({e!s}); re-download it") from None
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (path / n).is_file()]
            if missing:
                raise SurgeryError(
                    f"{index} lists shard(s) that are missing: "
                    f"{', '.join(missing[:5])}; re-download the checkpoint"
                )
            ckpt = cls([path / n for n in names], path, source)
            absent = sorted(set(weight_map) - set(ckpt._infos))
            if absent:
                raise SurgeryError(
                    f"{index} maps {len(absent)} tensor(s) absent from the shards, "
                    f"e.g. {absent[0]!r}; re-download the checkpoint"
                )
            return ckpt
        single = path / "model.safetensors"
        if single.is_file():
            return cls([single], path, source)
        files = sorted(
            p for p in path.glob("*.safetensors") if p.name != "adapter_model.safetensors"
        )
        if files:
            return cls(files, path, source)
        pickles = [p for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles:
            raise _refuse_pickle(pickles[0])
        raise SurgeryError(
            f"{path}: no .safetensors files found (expected model.safetensors or "
            "model.safetensors.index.json)"
        )

    # -- header-only queries --------------------------------------------------------------------
    def names(self) -> list[str]:
        """All tensor names in on-disk order."""
        return list(self._order)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self):
        return iter(self._order)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise SurgeryError(f"tensor {name!r} not found in {self.source}") from None

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    def is_conv1d(self, name: str) -> bool:
        """True for a GPT-2 style ``Conv1D`` weight (stored ``(in, out)``)."""
        return is_conv1d(name, self.info(name).shape, self.model_type)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape as presented to kernels: ``(out, in)`` for every 2-D weight, Conv1D included."""
        s = self.info(name).shape
        return (s[1], s[0]) if self.is_conv1d(name) else s

    def dtype(self, name: str) -> str:
        """The stored safetensors dtype string (``F32``, ``BF16``, ``I64``…)."""
        return self.info(name).dtype

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    @property
    def num_params(self) -> int:
        return sum(i.numel for i in self._infos.values())

    # -- data ---------------------------------------------------------------------------------
    def _data_start(self, path: Path) -> int:
        # Header length is cached per file; tensors are read with plain positional reads rather than
        # mmap so that resident memory stays bounded by the tensors in flight, not the file size.
        if self._handle is None or self._handle[0] != path:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
            self._handle = (path, 8 + n)
        return self._handle[1]

    def read_bytes(self, name: str, chunk: int = 64 << 20):
        """Yield the stored bytes of one tensor in chunks (for byte-identical copy-through)."""
        info = self.info(name)
        start = self._data_start(info.file) + info.offsets[0]
        with open(info.file, "rb") as f:
            f.seek(start)
            left = info.nbytes
            while left > 0:
                b = f.read(min(chunk, left))
                if not b:
                    raise SurgeryError(f"{info.file}: unexpected end of file in tensor {name!r}")
                left -= len(b)
                yield b

    def raw(self, name: str) -> torch.Tensor:
        """Load one tensor exactly as stored (stored dtype and layout).

        Raises:
            SurgeryError: for dtypes torch cannot represent (copy those with :meth:`read_bytes`).
        """
        import torch

        info = self.info(name)
        tdt = _TORCH_DTYPES.get(info.dtype)
        if tdt is None or not hasattr(torch, tdt):
            raise SurgeryError(
                f"tensor {name!r} is {info.dtype}, which torch cannot load; surgery "
                "only copies it through"
            )
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        self._read_into(info, buf.numpy())
        return buf.view(getattr(torch, tdt)).reshape(info.shape)

    def _read_into(self, info: TensorInfo, buf: Any) -> None:
        """Fill a writable byte buffer of ``info.nbytes`` with the tensor's stored bytes."""
        with open(info.file, "rb") as f:
            f.seek(self._data_start(info.file) + info.offsets[0])
            got = f.readinto(buf) if info.nbytes else 0
        if got != info.nbytes:
            raise SurgeryError(f"{info.file}: unexpected end of file in tensor {info.name!r}")

    @contextlib.contextmanager
    def byte_reader(self, name: str) -> Iterator[Callable[[int, Any], None]]:
        """A ``read(offset, buf)`` filling ``buf`` with the tensor's stored bytes from ``offset``.

        For streaming a tensor straight into pinned staging buffers (the GPU load path): no host
        copy of the whole tensor. The file stays open for the ``with`` block.
        """
        info = self.info(name)
        start = self._data_start(info.file) + info.offsets[0]
        with open(info.file, "rb") as f:

            def read(offset: int, buf: Any) -> None:
                n = memoryview(buf).nbytes
                if offset < 0 or offset + n > info.nbytes:
                    raise SurgeryError(f"internal: read past the end of tensor {name!r}")
                f.seek(start + offset)
                if n and f.readinto(buf) != n:
                    raise SurgeryError(f"{info.file}: unexpected end of file in tensor {name!r}")

            yield read

    def array(self, name: str, oriented: bool = True) -> np.ndarray:
        """Load one tensor as a numpy array of its stored bytes, Conv1D weights as ``(out, in)``
        (in their stored ``(in, out)`` with ``oriented=False``).

        BF16 comes back as uint16 bit patterns (numpy has no bfloat16; widen with
        ``ops.backend.bf16_to_f32``). This path never imports torch, which saves the ~1.5 s import
        for the numpy-only verbs. Memory: one tensor (two for a transposed Conv1D weight).

        Raises:
            SurgeryError: for dtypes numpy cannot hold (float8): copy those with :meth:`read_bytes`.
        """
        import numpy as np

        info = self.info(name)
        npdt = NP_DTYPES.get(info.dtype)
        if npdt is None:
            raise SurgeryError(
                f"tensor {name!r} is {info.dtype}, which surgery does not compute on; it is "
                "only copied through"
            )
        arr = np.empty(info.shape, dtype=npdt)
        self._read_into(info, arr.reshape(-1).view(np.uint8))
        return np.ascontiguousarray(arr.T) if oriented and self.is_conv1d(name) else arr

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor in its stored dtype, Conv1D weights transposed to ``(out, in)``."""
        t = self.raw(name)
        return t.T.contiguous() if self.is_conv1d(name) else t

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get(name)

    def to_stored(self, name: str, t: Any) -> Any:
        """Inverse of :meth:`get`'s orientation: ``(out, in)`` back to the stored layout.

        ``t`` is a torch tensor or a numpy array; the result is of the same kind.
        """
        if not self.is_conv1d(name):
            return t
        if type(t).__module__.split(".")[0] == "numpy":
            import numpy as np

            return np.ascontiguousarray(t.T)
        return t.T.contiguous()

    def close(self) -> None:
        self._handle = None

    def aux_files(self) -> list[Path]:
        """Config and tokenizer files beside the weights (copied to full-model outputs)."""
        if not self.root.is_dir():
            return []
        return [self.root / n for n in AUX_FILES if (self.root / n).is_file()]

    def header_digest(self) -> str:
        """SHA-256 over the raw headers of every file: names the checkpoint without its data."""
        import hashlib

        h = hashlib.sha256()
        for f in self.files:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                h.update(f.name.encode())
                h.update(fh.read(n))
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r}, {len(self)} tensors, {len(self.files)} file(s))"
