"""GPU-specific implementations behind the pure-xp kernels (CuPy only where it pays).

Every public kernel in ``ops/`` is plain xp code that runs unchanged on cupy arrays. This module
holds the few places where the GPU deserves its own code path, each reached through a one-line
dispatch (``if xp is not numpy: from .cuda import ...``) in the generic kernel:

* **Transfers** (:func:`upload`, :func:`download`, :func:`to_host`, and for torch callers
  :func:`torch_to_device`, :func:`to_torch`): zero-copy DLPack for CUDA tensors; otherwise the
  *stored* bytes (bf16/fp16, half of fp32) go through double-buffered
  pinned host buffers and are widened on the device; results are narrowed to bf16/fp16 on the
  device (the same round-to-nearest-even as torch, bit for bit) and copied back into pinned memory.
* **Fused merges** (:func:`gta`, :func:`pcb_merge`, :func:`pcb_balance`, :func:`l1_norms`):
  ``cupy.ElementwiseKernel`` / ``ReductionKernel`` versions of the TIES/DARE/task-arithmetic core
  and of PCB: one pass over the ``(k, n)`` task vectors, no ``(k, n)`` float temporaries. The
  merge kernels replay the numpy code's operations in the same order with ``__f*_rn`` intrinsics
  (no FMA contraction), so task arithmetic, TIES and DARE give bit-identical results on both
  devices; PCB uses ``exp``/``tanh`` and agrees to a few ulps.
* **SVD** (:func:`svd`, :func:`svd_topk_exact`, :func:`svd_batched`, :func:`gram_svd`): cuSOLVER's
  ``gesvd`` (what ``cupy.linalg.svd`` calls) is QR iteration and slow. The Gram route ``eigh(AᵀA)``
  is GEMM + ``syevd`` and far cheaper, but it squares the condition number (PERFORMANCE.md §2.3:
  fp32 Gram loses every σ below ≈√ε·σ_max). It is used only when :func:`gram_ok` accepts the
  computed spectrum, in float64, and falls back to ``gesvd`` otherwise.
* :func:`cholesky` (cuSOLVER ``potrf`` with its ``devInfo`` checked), :func:`accumulate_cov`
  (``C += XᵀX`` on the device); the memory pools are freed by ``ops.backend.release_memory``.

The module imports cupy lazily (:func:`cp`), so importing it, or ``ops``, never imports cupy. The
Gram-route functions are pure xp code and are tested on numpy (tests/test_gpu.py runs the rest
on a GPU).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from .backend import Array, OpError, array_namespace, solver_checked
from .linalg import canonicalize_signs as _canonical
from .linalg import gram_limit, gram_ok, gram_svd

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "cp",
    "upload",
    "upload_from",
    "download",
    "torch_to_device",
    "to_host",
    "to_torch",
    "gta",
    "pcb_balance",
    "pcb_merge",
    "l1_norms",
    "gram_limit",
    "gram_ok",
    "gram_svd",
    "svd",
    "svd_topk_exact",
    "svd_batched",
    "cholesky",
    "accumulate_cov",
]

log = logging.getLogger("surgery")

_CHUNK = 64 << 20  # bytes per pinned staging buffer (two of them: copy and DMA overlap)
_STAGING_LOCK = threading.Lock()


def cp() -> ModuleType:
    """Import and return cupy (raises OpError with the install hint when it is missing)."""
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise OpError(
            f"cupy is not installed ({e}); pip install 'ckpt-surgery[gpu]' on a CUDA machine"
        ) from None
    return cupy


# --------------------------------------------------------------------------- transfers


@functools.cache
def _staging() -> tuple[np.ndarray, np.ndarray]:
    """The two pinned staging buffers (``_CHUNK`` bytes each), allocated once per process.

    Kept for the life of the process: ``cudaHostAlloc`` is slow and synchronising, so they are
    never handed back to the pinned pool (``ops.backend.release_memory`` frees only unused blocks).
    """
    cupy = cp()
    return tuple(
        np.ndarray((_CHUNK,), dtype=np.uint8, buffer=cupy.cuda.alloc_pinned_memory(_CHUNK))
        for _ in range(2)
    )


def upload_from(
    read: Callable[[int, np.ndarray], None],
    shape: tuple[int, ...],
    stored: Any,
    dtype: str | None = None,
    bf16: bool = False,
) -> Array:
    """Stream a tensor's stored bytes through two pinned staging buffers onto the device.

    ``read(offset, buf)`` fills the uint8 array ``buf`` with bytes ``[offset, offset + buf.size)``
    (a file read: the kernel copies the page cache straight into pinned memory, the only host
    copy). Filling one buffer overlaps with the asynchronous DMA of the other, so a load runs at
    the slower of the read and PCIe, not at their sum, and no host copy of the whole tensor is
    made. The copies run on the *current* stream: the pool block they fill may have been freed
    on that stream by a kernel still queued there, and a copy on another (non-blocking) stream
    could overwrite it before that kernel reads it.

    Args:
        read: the byte source (e.g. :meth:`surgery.checkpoint.Checkpoint.byte_reader`).
        shape: the stored shape.
        stored: the stored numpy dtype (bfloat16 as uint16 with ``bf16=True``).
        dtype: widen to this float dtype on the device (``None``: keep the stored dtype).
        bf16: the bytes are bfloat16 (widened exactly by a 16-bit shift on the device).

    Returns:
        A cupy array of ``shape``. Device memory: the tensor in its stored and its wide dtype.
    """
    cupy = cp()
    stored = np.dtype(stored)
    nbytes = int(np.prod(shape, dtype=np.int64)) * stored.itemsize
    dev = cupy.empty(nbytes, dtype=cupy.uint8)
    if nbytes <= _CHUNK // 4:  # small tensors: one pageable copy is cheaper than staging
        buf = np.empty(nbytes, np.uint8)
        read(0, buf)
        dev.set(buf)
    else:
        done: list = [None, None]
        stream = cupy.cuda.get_current_stream()
        staging = _staging()
        with _STAGING_LOCK:  # one process-wide pair of buffers
            try:
                for n, start in enumerate(range(0, nbytes, _CHUNK)):
                    b = n % 2
                    if done[b] is not None:
                        done[b].synchronize()  # the DMA out of this buffer has finished
                    size = min(_CHUNK, nbytes - start)
                    read(start, staging[b][:size])
                    dev[start : start + size].set(staging[b][:size], stream=stream)
                    done[b] = stream.record()
            finally:
                stream.synchronize()  # the staging buffers are reused by the next call
    out = dev.view(stored).reshape(shape)
    if bf16:
        out = _widen_bf16_kernel()(out)
    return out if dtype is None else out.astype(dtype, copy=False)


@functools.cache
def _widen_bf16_kernel():
    return cp().ElementwiseKernel(
        "uint16 x", "float32 y", "y = __uint_as_float(((unsigned int)x) << 16)", "surgery_bf16_f32"
    )


@functools.cache
def _narrow_bf16_kernel():
    # torch's CPU cast (ATen's vectorised cvtfp32_bf16): NaN → 0xFFFF, else round to nearest
    # even on the top 16 bits (measured: torch 2.13 gives 0xFFFF for every NaN position).
    return cp().ElementwiseKernel(
        "float32 x",
        "uint16 y",
        """
        unsigned int u = __float_as_uint(x);
        if (isnan(x)) { y = 0xFFFF; }
        else { y = (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16); }
        """,
        "surgery_f32_bf16",
    )


@functools.cache
def _narrow_f16_kernel():
    # c10's fp16_ieee_from_fp32_value (torch's CPU cast; F16C gives the same bits): round to
    # nearest even with subnormals and overflow to inf by two exact power-of-two scalings;
    # NaN → sign | 0x7E00. __f*_rn keep the compiler from fusing the steps into an FMA.
    return cp().ElementwiseKernel(
        "float32 x",
        "uint16 y",
        """
        const unsigned int w = __float_as_uint(x);
        const unsigned int shl1 = w + w;
        const unsigned int sign = w & 0x80000000u;
        const float to_inf = __uint_as_float(0x77800000u), to_zero = __uint_as_float(0x08800000u);
        float base = __fmul_rn(__fmul_rn(fabsf(x), to_inf), to_zero);  // 2^112, then 2^-110
        unsigned int bias = shl1 & 0xFF000000u;
        if (bias < 0x71000000u) bias = 0x71000000u;
        base = __fadd_rn(__uint_as_float((bias >> 1) + 0x07800000u), base);
        const unsigned int bits = __float_as_uint(base);
        const unsigned int nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
        y = (unsigned short)((sign >> 16) | (shl1 > 0xFF000000u ? 0x7E00u : nonsign));
        """,
        "surgery_f32_f16",
    )


def upload(host: np.ndarray, dtype: str = "float32", bf16: bool = False) -> Array:
    """A host array in its *stored* dtype → a cupy array of ``dtype`` (``float32``/``float64``).

    The stored bytes cross PCIe (bf16/fp16: half of fp32) through the pinned staging buffers and
    are widened on the device. ``bf16=True`` says ``host`` holds bfloat16 bit patterns as uint16
    (numpy has no bfloat16; :meth:`surgery.checkpoint.Checkpoint.array` returns them so). Widening
    is exact, so the values equal the host path's ``ops.backend.bf16_to_f32`` / ``astype``.
    """
    host = np.ascontiguousarray(host)
    raw = host.reshape(-1).view(np.uint8)

    def read(offset: int, buf: np.ndarray) -> None:
        buf[...] = raw[offset : offset + buf.size]

    return upload_from(read, host.shape, host.dtype, dtype, bf16)


def download(x: Array, dtype: str) -> np.ndarray:
    """A float cupy array → a host numpy array in ``dtype``, narrowed *on the device*.

    ``dtype`` is ``bfloat16`` (returned as uint16 bit patterns), ``float16``, ``float32`` or
    ``float64``. The bf16/fp16 rounding is round-to-nearest-even, bit for bit as torch's CPU cast
    and ``ops.backend.f32_to_bf16`` (every NaN → ``0xFFFF`` for bf16), and only the narrow bytes
    cross PCIe.
    """
    cupy = cp()
    if dtype in ("bfloat16", "float16") and x.dtype in (cupy.float32, cupy.float64):
        kernel = _narrow_bf16_kernel() if dtype == "bfloat16" else _narrow_f16_kernel()
        bits = to_host(kernel(x.astype(cupy.float32, copy=False)))
        return bits if dtype == "bfloat16" else bits.view(np.float16)
    return to_host(x.astype(dtype, copy=False))


def torch_to_device(t: torch.Tensor, dtype: str = "float32") -> Array:
    """Move a torch tensor to a cupy array of ``dtype`` (``float32`` or ``float64``).

    A CUDA tensor is shared zero-copy through DLPack (cast first in torch when needed). A host
    tensor goes through :func:`upload` in its stored dtype (bf16 as raw 16-bit words).
    """
    import torch

    cupy = cp()
    tdt = {"float32": torch.float32, "float64": torch.float64}[dtype]
    t = t.detach()
    if t.is_cuda:
        return cupy.from_dlpack((t if t.dtype == tdt else t.to(tdt)).contiguous())
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return upload(t.view(torch.int16).numpy().view(np.uint16), dtype, bf16=True)
    if t.dtype in (torch.float16, torch.float32, torch.float64):
        return upload(t.numpy(), dtype)
    return upload(t.to(tdt).numpy(), dtype)


def to_host(x: Array) -> np.ndarray:
    """Copy a cupy array into pinned host memory (numpy view); D2H at full PCIe speed."""
    import cupyx

    if x.size == 0:
        return x.get()
    x = cp().ascontiguousarray(x)  # get(out=) needs matching C layouts
    out = cupyx.empty_pinned(x.shape, dtype=x.dtype)
    x.get(out=out)
    return out


def to_torch(x: Array, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A cupy array → CPU torch tensor, narrowed to bf16/fp16 on the device (:func:`download`)."""
    import torch

    cupy = cp()
    names = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
    if dtype in names and x.dtype in (cupy.float32, cupy.float64):
        host = download(x, names[dtype])
        return torch.from_numpy(host.view(np.int16)).view(dtype)
    t = torch.from_numpy(to_host(x))
    return t.to(dtype) if dtype is not None and t.dtype != dtype else t


# --------------------------------------------------------------------------- fused merges

# Exactly rounded float ops without contraction into FMAs, so the device replays numpy's rounding.
_PREAMBLE = r"""
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
// numpy's maximum / minimum: a NaN operand propagates; ties (+0 vs -0) return the second.
template <typename T> __device__ __forceinline__ T np_max(T a, T b) {
  return isnan(a) ? a : (isnan(b) ? b : (a > b ? a : b));
}
template <typename T> __device__ __forceinline__ T np_min(T a, T b) {
  return isnan(a) ? a : (isnan(b) ? b : (a < b ? a : b));
}
#define SURGERY_CACHE_K 8
template <typename T> __device__ __forceinline__ T np_sign(T a) {
  return a > (T)0 ? (T)1 : (a < (T)0 ? (T)-1 : (isnan(a) ? a : (T)0));
}
"""

_GTA_OP = r"""
T cache[SURGERY_CACHE_K];
T acc = 0;
for (int j = 0; j < k; ++j) {
  const ptrdiff_t ix[2] = {j, (ptrdiff_t)i};
  T t = mul_rn(d[ix], sc[j]);
  if (has_keep) t = mul_rn(t, (T)keep[ix]);
  if (j < SURGERY_CACHE_K) cache[j] = t;
  acc = add_rn(acc, t);
}
T mixed = acc;
if (consensus) {
  const T g = copysign((T)1, acc);
  T m = 0, dv = 0;
  for (int j = 0; j < k; ++j) {
    T t;
    if (j < SURGERY_CACHE_K) {
      t = cache[j];
    } else {
      const ptrdiff_t ix[2] = {j, (ptrdiff_t)i};
      t = mul_rn(d[ix], sc[j]);
      if (has_keep) t = mul_rn(t, (T)keep[ix]);
    }
    t = mul_rn(t, g);
    const bool agree = t > (T)0;
    t = np_max(t, (T)0);
    m = add_rn(m, t);
    dv = add_rn(dv, wt[j] == (T)1 ? (T)agree : mul_rn((T)agree, wt[j]));
  }
  mixed = mul_rn(m, g);
  if (dv == (T)0) dv = (T)1;
  if (normalize) mixed = div_rn(mixed, dv);
} else if (normalize) {
  mixed = div_rn(mixed, tdiv);
}
out = scale_out ? mul_rn(mixed, lam) : mixed;
"""


@functools.cache
def _gta_kernel():
    return cp().ElementwiseKernel(
        "raw T d, raw bool keep, raw T sc, raw T wt, int32 k, bool has_keep, bool consensus, "
        "bool normalize, T tdiv, T lam, bool scale_out",
        "T out",
        _GTA_OP,
        "surgery_gta",
        preamble=_PREAMBLE,
    )


def gta(
    deltas: Array,
    keeps: list[Array | None],
    scales: list[float],
    weights: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> Array:
    """The fused core of task arithmetic / TIES / DARE (``ops.merge._generalized_task_arithmetic``).

    One pass per output entry over the ``k`` task vectors: ``t_i = (τ_i·c_i)·keep_i`` with
    ``c_i = w_i·factor_i``; ``γ = copysign(1, Σ t_i)``; under consensus ``δ = γ·Σ max(γ t_i, 0) /
    Σ w_i[γ t_i > 0]`` (divisor 0 → 1), else ``Σ t_i / D``; then ``× λ``. Same operations, order
    and rounding as the numpy code: bit-identical output.

    Args:
        deltas: ``(k, *shape)`` cupy task vectors (float32/float64).
        keeps: per model a ``(*shape)`` bool keep-mask or ``None`` (all kept; all or none given).
        scales: per model ``w_i·factor_i`` (already rounded to the deltas' dtype by the caller).
        weights: per model ``w_i`` (the consensus divisor's terms).
        consensus: elect a sign and keep the agreeing entries (TIES, DARE-TIES).
        normalize: divide by the summed (agreeing) weights.
        lambda_: final scale.

    Returns:
        ``(*shape)`` merged task vector.
    """
    cupy = cp()
    k = int(deltas.shape[0])
    shape = deltas.shape[1:]
    dt = deltas.dtype
    d2 = deltas.reshape(k, -1)  # (k, n); a view of the contiguous stack
    has_keep = keeps[0] is not None
    if has_keep:
        keep = cupy.stack([kp.reshape(-1) for kp in keeps])  # (k, n) bool: k·n bytes
    else:
        keep = cupy.zeros((1, 1), dtype=bool)  # never read
    total = float(sum(weights))
    tdiv = dt.type(total if abs(total) >= 1e-8 else 1.0)
    out = cupy.empty(d2.shape[1], dtype=dt)
    _gta_kernel()(
        d2,
        keep,
        cupy.asarray(np.asarray(scales, dtype=dt)),
        cupy.asarray(np.asarray(weights, dtype=dt)),
        np.int32(k),
        bool(has_keep),
        bool(consensus),
        bool(normalize),
        tdiv,
        dt.type(lambda_),
        bool(lambda_ != 1),
        out,
    )
    return out.reshape(shape)


# PCB per column c, rows j: the numpy code's order of operations (ops/merge.py pcb_balance,
# pcb_scale, pcb), with sums (((0 + t_0) + t_1) + …) as numpy's axis-0 reduction.
_PCB_BAL = r"""
template <typename T, typename A>
__device__ __forceinline__ T pcb_bal(const A& t, ptrdiff_t j, ptrdiff_t c, T cs, int k,
                                     T lo, T hi, T mmin, T safe, T live) {
  const ptrdiff_t ix[2] = {j, c};
  const T tv = t[ix];
  T a = fabs(tv);
  a = np_max(a, lo);
  a = np_min(a, hi);
  a = sub_rn(a, mmin);
  a = div_rn(a, safe);
  a = mul_rn(a, live);
  a = mul_rn(a, a);
  a = mul_rn(a, (T)k);
  a = exp(a);
  T b = tanh(mul_rn(tv, cs));
  return mul_rn(a, b);
}
template <typename T, typename A>
__device__ __forceinline__ T pcb_colsum(const A& t, ptrdiff_t c, int k) {
  T cs = 0;  // numpy's add.reduce starts from +0 (the sign of an all-zero sum is +)
  for (int j = 0; j < k; ++j) {
    const ptrdiff_t ix[2] = {j, c};
    cs = add_rn(cs, t[ix]);
  }
  return cs;
}
"""


@functools.cache
def _pcb_balance_kernel():
    return cp().ElementwiseKernel(
        "raw T t, raw T lo, raw T hi, raw T mmin, raw T safe, raw T live, int32 k, int64 m",
        "T bal",
        """
        const ptrdiff_t j = i / m, c = i % m;
        const T cs = pcb_colsum<T>(t, c, k);
        bal = pcb_bal<T>(t, j, c, cs, k, lo[j], hi[j], mmin[j], safe[j], live[j]);
        """,
        "surgery_pcb_balance",
        preamble=_PREAMBLE + _PCB_BAL,
    )


@functools.cache
def _pcb_merge_kernel():
    return cp().ElementwiseKernel(
        "raw T t, raw T lo, raw T hi, raw T mmin, raw T safe, raw T live, raw T thr, "
        "raw T spn, raw bool dead, raw T lam, int32 k",
        "T out",
        """
        const T cs = pcb_colsum<T>(t, i, k);
        T num = 0, den = 0;
        for (int j = 0; j < k; ++j) {
          T a = pcb_bal<T>(t, j, i, cs, k, lo[j], hi[j], mmin[j], safe[j], live[j]);
          a = np_max(a, thr[j]);
          a = sub_rn(a, thr[j]);
          a = div_rn(a, spn[j]);
          if (dead[j]) a = (T)1;
          const ptrdiff_t ix[2] = {j, (ptrdiff_t)i};
          const T tv = t[ix];
          T c = np_min(np_max(fabs(tv), lo[j]), hi[j]);
          c = mul_rn(c, np_sign(tv));
          c = mul_rn(c, lam[j]);
          c = mul_rn(c, a);
          num = add_rn(num, c);
          den = add_rn(den, a);
        }
        den = np_max(den, (T)1e-12);
        out = div_rn(num, den);
        """,
        "surgery_pcb_merge",
        preamble=_PREAMBLE + _PCB_BAL,
    )


def _pcb_rows(t: Array, lo: Any, hi: Any) -> tuple[Array, ...]:
    """Per-task ``lo, hi, min M, safe span, live`` on the device, as ``pcb_balance`` has them."""
    cupy = cp()
    k = t.shape[0]
    lo = cupy.asarray(lo, dtype=t.dtype).reshape(k)
    hi = cupy.asarray(hi, dtype=t.dtype).reshape(k)
    mmin = cupy.minimum(lo, hi)
    span = hi - mmin
    safe = cupy.where(span > 0, span, 1).astype(t.dtype)
    live = (span > 0).astype(t.dtype)
    return lo, hi, mmin, safe, live


def pcb_balance(t: Array, lo: Any, hi: Any) -> Array:
    """Fused ``ops.merge.pcb_balance`` for a cupy ``(k, m)`` slice: one kernel, no temporaries."""
    cupy = cp()
    k, m = (int(s) for s in t.shape)
    rows = _pcb_rows(t, lo, hi)
    out = cupy.empty((k, m), dtype=t.dtype)
    _pcb_balance_kernel()(t, *rows, np.int32(k), np.int64(max(m, 1)), out)
    return out


def pcb_merge(t: Array, stats: Any, weights: Array, lambda_: float) -> Array:
    """Fused PCB merge of a cupy ``(k, d)`` task-vector matrix given the statistics.

    Per column: balance scores, the clipped drop-and-rescale ``scale_i``, the clipped task vectors
    and ``Σ_i λ w_i T_c,i scale_i / max(Σ_i scale_i, 1e-12)``, in one pass (``ops.merge.pcb``).

    Returns:
        ``(d,)`` merged task vector.
    """
    cupy = cp()
    k = int(t.shape[0])
    dt = t.dtype
    rows = _pcb_rows(t, stats.lo, stats.hi)
    thr = cupy.asarray(stats.thr, dtype=dt).reshape(k)
    top = cupy.asarray(stats.top, dtype=dt).reshape(k)
    span = top - thr
    spn = cupy.where(span > 0, span, 1).astype(dt)
    lam = weights.reshape(k).astype(dt) * dt.type(lambda_)  # the numpy code's (k, 1) product
    out = cupy.empty(t.shape[1], dtype=dt)
    _pcb_merge_kernel()(t, *rows, thr, spn, span <= 0, lam, np.int32(k), out)
    return out


@functools.cache
def _l1_kernels():
    cupy = cp()
    full = cupy.ReductionKernel(
        "T x", "float64 s", "fabs((double)x)", "a + b", "s = a", "0", "surgery_l1"
    )
    kept = cupy.ReductionKernel(
        "T x, bool keep",
        "float64 s",
        "keep ? fabs((double)x) : 0.0",
        "a + b",
        "s = a",
        "0",
        "surgery_l1_kept",
    )
    return full, kept


def l1_norms(x: Array, keep: Array) -> tuple[float, float]:
    """``(‖x‖₁, ‖x ⊙ keep‖₁)`` in float64 by two fused reductions (no ``|x|`` temporary).

    The summation order differs from numpy's pairwise sum, so DARE's ``rescale=l1`` factor agrees
    with the CPU's to float64 rounding (≈1e-16 relative), not bit for bit.
    """
    full, kept = _l1_kernels()
    return float(full(x)), float(kept(x, keep))


# --------------------------------------------------------------------------- SVD / eigh

# The Gram route (gram_limit, gram_ok, gram_svd) lives in ops.linalg: it is pure xp.


def _driver() -> str:
    d = os.environ.get("SURGERY_GPU_SVD", "auto")
    if d not in ("auto", "gram", "gesvd"):
        raise OpError(f"SURGERY_GPU_SVD must be auto, gram or gesvd, got {d!r}")
    return d


def _gesvd(w: Array) -> tuple[Array, Array, Array]:
    """The direct SVD (cuSOLVER ``gesvd`` through ``cupy.linalg.svd``), canonical signs."""
    xp = array_namespace(w)
    with solver_checked(xp):
        u, s, vh = xp.linalg.svd(w, full_matrices=False)
    u, vh = _canonical(u, vh)
    return u, s, vh


def svd(w: Array) -> tuple[Array, Array, Array]:
    """Thin SVD on the device: the fp64 Gram route when :func:`gram_ok` allows, else ``gesvd``.

    ``SURGERY_GPU_SVD=gesvd`` forces cuSOLVER ``gesvd`` (``cupy.linalg.svd``), ``gram`` the Gram
    route whatever the conditioning (for benchmarks only); ``auto`` (default) decides per matrix.
    The result has canonical signs, as :func:`ops.linalg.svd`.
    """
    drv = _driver()
    if drv != "gesvd":
        res = gram_svd(w, check=drv == "auto")
        if res is not None:
            return res
        log.debug("svd %s: Gram route refused (ill-conditioned), using gesvd", tuple(w.shape))
    return _gesvd(w)


def svd_topk_exact(w: Array, k: int) -> tuple[Array, Array, Array]:
    """The exact top-``k`` triplets on the device (``svd_topk(..., niter=0)``).

    Only ``κ_k = σ_1/σ_k`` matters for the top of the spectrum, so the Gram route applies far
    more often than for the full SVD (PiSSA/extraction); otherwise the full ``gesvd`` is sliced.
    """
    drv = _driver()
    if drv != "gesvd":
        res = gram_svd(w, k, check=drv == "auto")
        if res is not None:
            return res
    u, s, vh = _gesvd(w)
    return u[:, :k], s[:k], vh[:k]


def svd_batched(ws: Array, k: int | None = None) -> tuple[Array, Array, Array]:
    """Thin SVDs of a stack of same-shape matrices ``ws (b, m, n)``.

    The Gram matrices and the ``U = A V / σ`` products are single batched GEMMs (``matmul`` over
    the stack); ``eigh`` is cuSOLVER's batched Jacobi (``syevjBatched``, what cupy calls for any
    stacked input) up to 32 columns and ``syevd`` per matrix above, where Jacobi is slow and has
    known failures (cupy#4847, #7261); numpy loops LAPACK. Matrices whose spectrum the Gram route
    cannot carry
    (:func:`gram_ok`) are redone one by one with the direct SVD. Pure xp.

    Args:
        ws: ``(b, m, n)`` float32/float64 stack.
        k: components per matrix (``None``: ``min(m, n)``).

    Returns:
        ``u (b, m, k)``, ``s (b, k)``, ``vh (b, k, n)``, each slice equal to :func:`svd` of
        ``ws[i]`` up to rounding, with canonical signs.
    """
    xp = array_namespace(ws)
    if ws.ndim != 3:
        raise OpError(f"svd_batched expects a (b, m, n) stack, got shape {tuple(ws.shape)}")
    b, m, n = (int(d) for d in ws.shape)
    kk = min(m, n) if k is None else int(k)
    if not 0 < kk <= min(m, n):
        raise OpError(f"rank must be in [1, {min(m, n)}], got {k}")
    transpose = m < n
    n_short = min(m, n)
    a = (xp.swapaxes(ws, 1, 2) if transpose else ws).astype(xp.float64)  # (b, M, N)
    g = xp.matmul(xp.swapaxes(a, 1, 2), a)  # (b, N, N)
    with solver_checked(xp):
        if xp is np or n_short <= 32:
            lam, v = xp.linalg.eigh(g)  # (b, N), (b, N, N) ascending
        else:  # cupy's batched eigh is Jacobi (syevjBatched), built for tiny N: syevd each
            pairs = [xp.linalg.eigh(g[i]) for i in range(b)]
            lam, v = xp.stack([p[0] for p in pairs]), xp.stack([p[1] for p in pairs])
    lam, v = lam[:, ::-1][:, :kk], v[:, :, ::-1][:, :, :kk]
    s = xp.sqrt(xp.maximum(lam, 0))  # (b, k)
    u = xp.matmul(a, v) / xp.where(s > 0, s, 1)[:, None, :]  # (b, M, k)
    u, s, vh = u.astype(ws.dtype), s.astype(ws.dtype), xp.swapaxes(v, 1, 2).astype(ws.dtype)
    if transpose:
        u, vh = xp.swapaxes(vh, 1, 2), xp.swapaxes(u, 1, 2)
    u, vh = xp.ascontiguousarray(u), xp.ascontiguousarray(vh)
    limit = gram_limit(np.float64, ws.dtype)
    lam_h = lam.get() if hasattr(lam, "get") and not isinstance(lam, np.ndarray) else lam
    for i in range(b):
        if gram_ok(lam_h[i], kk, limit):
            u[i], vh[i] = _canonical(u[i], vh[i])
        else:  # this matrix is too ill-conditioned for the Gram route
            ui, si, vhi = _gesvd(ws[i])
            u[i], s[i], vh[i] = ui[:, :kk], si[:kk], vhi[:kk]
    return u, s, vh


def cholesky(c: Array) -> Array:
    """cuSOLVER ``potrf`` with its ``devInfo`` checked.

    ``cupy.linalg.cholesky`` ignores ``devInfo`` by default and returns a partly factored matrix
    for a non-positive-definite input (no exception, often no NaN); here it raises
    ``numpy.linalg.LinAlgError`` as numpy does, so CorDA's damping loop sees the failure.
    """
    import cupyx

    cupy = cp()
    with cupyx.errstate(linalg="raise"):
        return cupy.linalg.cholesky(c)


def accumulate_cov(c: Array, x: Array) -> Array:
    """``C += XᵀX`` in place for a batch of activations ``x (tokens, in)``; ``c (in, in)``.

    One GEMM into the accumulator (``matmul`` with ``out=`` would overwrite, so the product is
    added with ``+=``; cuBLAS ``syrk`` would halve the FLOPs but CuPy's wrapper writes only one
    triangle, which the symmetric caller would have to mirror). Works on numpy too.
    """
    array_namespace(c, x)  # refuses mixed devices
    if c.shape != (x.shape[1], x.shape[1]):
        raise OpError(f"covariance {tuple(c.shape)} does not match activations {tuple(x.shape)}")
    xc = x.astype(c.dtype, copy=False)  # (tokens, in)
    c += xc.T @ xc
    return c
