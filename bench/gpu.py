"""Benchmark: the GPU paths of ops/ (CuPy) against torch on the same GPU and against the CPU.

One run measures, per operation, the time with CuPy (our ``ops`` kernels on cupy arrays), with
torch on the same GPU (the obvious torch implementation), and with numpy on the CPU, plus the
fraction of the GPU's peak FLOP/s (SVD, CorDA, covariance) or bandwidth (merges, transfers)
that the CuPy path reaches (peaks from PERFORMANCE.md §0/§6, picked from the device name).

Operations (``--ops``, comma-separated; default all but ``pissa7b`` and ``merge_cli``):

* ``svd4096`` / ``svd11008``: full thin SVD, 4096² and 11008×4096 fp32. CuPy rows:
  ``ops.linalg.svd`` (gated fp64 Gram route, ops/cuda.py) and ``cupy.linalg.svd`` (gesvd); torch:
  ``torch.linalg.svd`` (default driver) and ``driver="gesvd"``; CPU: LAPACK gesdd.
* ``rsvd128``: randomized top-128 of 11008×4096 (ℓ = 138, 4 power iterations); torch
  ``svd_lowrank(q=138, niter=4)``.
* ``corda``: CorDA IPM rank 128 of a 4096² weight with a 4096² covariance (``ops.decompose.corda``;
  torch: the same math with ``cholesky``/``cholesky_solve``/``svd_lowrank``).
* ``ties`` / ``pcb``: merge kernels over 3 task vectors of 1 B parameters each (resident in device
  memory; scaled down to fit the free memory), GB/s against HBM bandwidth.
* ``cov``: covariance accumulation ``C += XᵀX`` over 4 batches of 8192 tokens, d = 4096.
* ``h2d``: host→device of a 1 GiB bf16 tensor: pinned staging (``ops.cuda``), pageable
  ``cupy.asarray``, torch ``.cuda()`` and pinned ``non_blocking``; fraction of one pinned memcpy.
* ``merge_io``: TIES of 3 bf16 fine-tunes of an 11008×4096 tensor *from host memory* (upload,
  widen, merge, narrow, download), against the PCIe floor (bytes / pinned memcpy bandwidth).
* ``merge_cli``: ``surgery merge -m ties`` end to end (CLI subprocess) over a base and 3 dense
  fine-tunes of ``--layers / 8`` 7B-shaped layers (≈1 B parameters each at the default 32), files
  in the page cache, ``--device gpu`` vs ``cpu``, against the PCIe floor of its bytes.
* ``pissa7b``: ``surgery decompose -m pissa -r 128`` end to end (CLI subprocess, I/O included) on a
  synthetic LLaMA-2-7B-shaped bf16 checkpoint (224 matrices), ``--device gpu`` vs ``cpu``.

``--scale s`` multiplies every matrix dimension by ``s`` (ranks too, at least 8) and parameter
counts by ``s²``, so a quick CPU-only check runs in seconds (``--scale 0.125``). Without a GPU
the CuPy and torch columns read ``n/a``. Results go to ``--json`` (default
``bench/_work/gpu/results.json``).

Usage::

    python bench/gpu.py                       # full sizes (on an H100: a few minutes)
    python bench/gpu.py --scale 0.125 --ops svd4096,ties,cov
    python bench/gpu.py --ops pissa7b         # the 7B end-to-end target (< 60 s on an H100)
    python bench/gpu.py --ops merge_cli       # merges at >= 70 % of the PCIe floor
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ALL_OPS = ["svd4096", "svd11008", "rsvd128", "corda", "ties", "pcb", "cov", "h2d", "merge_io"]
EXTRA_OPS = ["pissa7b", "merge_cli"]

# PERFORMANCE.md §0/§6 [R]: dense peaks (FLOP/s) and memory/PCIe bandwidth (B/s).
PEAKS = {
    "H100 SXM": {"fp32": 66.9e12, "fp64": 66.9e12, "hbm": 3.35e12, "pcie": 64e9},
    "H100 PCIe": {"fp32": 51.0e12, "fp64": 51.0e12, "hbm": 2.0e12, "pcie": 64e9},
    "H200": {"fp32": 66.9e12, "fp64": 66.9e12, "hbm": 4.8e12, "pcie": 64e9},
}


# --------------------------------------------------------------------------- devices and timing


class Env:
    """What this machine has: cupy on a GPU, torch on CUDA, the GPU's peaks."""

    def __init__(self, reps: int) -> None:
        import torch

        from ops.backend import gpu_available

        self.reps = reps
        self.cupy = None
        if gpu_available():
            import cupy

            self.cupy = cupy
        self.torch_cuda = torch.cuda.is_available()
        self.name = "none"
        self.peaks: dict[str, float] | None = None
        if self.cupy is not None:
            props = self.cupy.cuda.runtime.getDeviceProperties(0)
            self.name = (
                props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            )
            self.peaks = _peaks_for(self.name)

    def gpu_free(self) -> int:
        """Free device memory in bytes (0 without a GPU)."""
        if self.cupy is None:
            return 0
        self.cupy.get_default_memory_pool().free_all_blocks()
        return int(self.cupy.cuda.runtime.memGetInfo()[0])

    def sync_cupy(self) -> None:
        self.cupy.cuda.Device().synchronize()

    def sync_torch(self) -> None:
        import torch

        torch.cuda.synchronize()


def _peaks_for(name: str) -> dict[str, float] | None:
    if "H200" in name:
        return PEAKS["H200"]
    if "H100" in name:
        return PEAKS["H100 PCIe"] if "PCIe" in name else PEAKS["H100 SXM"]
    return None


def host_available() -> int:
    """MemAvailable from /proc/meminfo in bytes (a large default elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 << 30


def timeit(fn: Callable[[], Any], sync: Callable[[], None] | None, reps: int) -> float:
    """Median wall time of ``fn()`` over ``reps`` runs after one warm-up (compiles, handles)."""
    fn()
    if sync:
        sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _try(fn: Callable[[], float]) -> float | str:
    """Run one measurement; an out-of-memory or driver error becomes its message, not a crash."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - report and continue with the other columns
        return f"error: {type(e).__name__}: {str(e)[:80]}"


# --------------------------------------------------------------------------- operations


def dims(s: float) -> tuple[int, int, int]:
    """(hidden, intermediate, rank) scaled by ``s``."""
    return max(16, round(4096 * s)), max(32, round(11008 * s)), max(8, round(128 * s))


def _matrix(m: int, n: int, seed: int = 0) -> np.ndarray:
    """A weight-like fp32 matrix: Gaussian (a square Gaussian can be very ill-conditioned)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((m, n), dtype=np.float32) / math.sqrt(n)).astype(np.float32)


def _spectral(m: int, n: int, seed: int = 0) -> np.ndarray:
    """``U diag(σ) Vᵀ`` with σ_i ∝ i^-0.5 (PERFORMANCE.md §2.4's flat spectrum, κ = √min(m,n))."""
    rng = np.random.default_rng(seed)
    k = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, k), dtype=np.float32))
    v, _ = np.linalg.qr(rng.standard_normal((n, k), dtype=np.float32))
    s = (np.arange(1, k + 1, dtype=np.float32) ** -0.5).astype(np.float32)
    return ((u * s) @ v.T).astype(np.float32)


def op_svd(env: Env, m: int, n: int) -> dict[str, Any]:
    import torch

    from ops.linalg import svd

    w = _spectral(m, n)
    k = min(m, n)
    flops = 14.0 * max(m, n) * k * k + 8.0 * k**3  # textbook U, S, V (PERFORMANCE.md §6)
    row: dict[str, Any] = {"size": f"{m}x{n} fp32", "work": flops, "unit": "flop", "peak": "fp32"}
    row["cpu"] = _try(lambda: timeit(lambda: svd(w), None, 1))
    if env.cupy is not None:
        cp = env.cupy
        wd = cp.asarray(w)
        row["cupy"] = _try(lambda: timeit(lambda: svd(wd), env.sync_cupy, env.reps))
        row["cupy_gesvd"] = _try(
            lambda: timeit(lambda: cp.linalg.svd(wd, full_matrices=False), env.sync_cupy, env.reps)
        )
        u, s, vh = svd(wd)
        row["cupy_rel_err"] = float(cp.linalg.norm((u * s) @ vh - wd) / cp.linalg.norm(wd))
        s_ref = cp.linalg.svd(wd, compute_uv=False)
        row["cupy_sigma_vs_gesvd"] = float(cp.max(cp.abs(s - s_ref)) / s_ref[0])
        del wd, u, s, vh, s_ref
    if env.torch_cuda:
        wt = torch.from_numpy(w).cuda()
        row["torch"] = _try(
            lambda: timeit(
                lambda: torch.linalg.svd(wt, full_matrices=False), env.sync_torch, env.reps
            )
        )
        row["torch_gesvd"] = _try(
            lambda: timeit(
                lambda: torch.linalg.svd(wt, full_matrices=False, driver="gesvd"),
                env.sync_torch,
                env.reps,
            )
        )
        del wt
    return row


def op_rsvd(env: Env, m: int, n: int, r: int) -> dict[str, Any]:
    import torch

    from ops.linalg import randomized_svd

    w = _matrix(m, n, 1)
    ell, q = r + 10, 4
    # (2q + 2) products with W of width ℓ, plus the QRs and the small SVD.
    flops = (2 * q + 2) * 2.0 * m * n * ell + (2 * q + 1) * 4.0 * max(m, n) * ell**2
    row: dict[str, Any] = {"size": f"{m}x{n} r{r}", "work": flops, "unit": "flop", "peak": "fp32"}
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    row["cpu"] = _try(lambda: timeit(lambda: randomized_svd(w, r, niter=q, rng=rng()), None, 1))
    if env.cupy is not None:
        wd = env.cupy.asarray(w)
        row["cupy"] = _try(
            lambda: timeit(
                lambda: randomized_svd(wd, r, niter=q, rng=rng()), env.sync_cupy, env.reps
            )
        )
        del wd
    if env.torch_cuda:
        wt = torch.from_numpy(w).cuda()
        row["torch"] = _try(
            lambda: timeit(lambda: torch.svd_lowrank(wt, q=ell, niter=q), env.sync_torch, env.reps)
        )
        del wt
    return row


def _torch_corda(w, c, r: int, lam: float = 0.01):
    """CorDA IPM in torch on the GPU: the same math as ``ops.decompose.corda`` (fp64 factor)."""
    import torch

    c64 = c.double()
    c64 = (c64 + c64.T) / 2
    c64 /= torch.diagonal(c64).mean()
    c_fix = c64 + lam * torch.eye(c.shape[0], dtype=torch.float64, device=c.device)
    lo = torch.linalg.cholesky(c_fix)
    mat = (w.double() @ c_fix).float()
    u, s, v = torch.svd_lowrank(mat, q=r + 10, niter=4)
    x = torch.cholesky_solve(v[:, :r].double(), lo)  # (in, r): C_fix⁻¹ V_r
    return w - (u[:, :r] * s[:r]) @ x.T.float()


def op_corda(env: Env, n: int, r: int) -> dict[str, Any]:
    import torch

    from ops.decompose import corda

    w = _matrix(n, n, 2)
    x = np.random.default_rng(3).standard_normal((2 * n, n), dtype=np.float32)
    c = (x.T @ x).astype(np.float32)
    ell = r + 10
    # W·C (fp64 GEMM), potrf n³/3, randomized top-r (as rsvd), r-column solves 2n²r.
    flops = 2.0 * n**3 + n**3 / 3 + 10 * 2.0 * n * n * ell + 2.0 * n * n * r
    row: dict[str, Any] = {"size": f"{n}x{n} r{r}", "work": flops, "unit": "flop", "peak": "fp64"}
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    row["cpu"] = _try(lambda: timeit(lambda: corda(w, rank=r, cov=c, rng=rng()), None, 1))
    if env.cupy is not None:
        cp = env.cupy
        wd, cd = cp.asarray(w), cp.asarray(c)
        row["cupy"] = _try(
            lambda: timeit(lambda: corda(wd, rank=r, cov=cd, rng=rng()), env.sync_cupy, env.reps)
        )
        del wd, cd
    if env.torch_cuda:
        wt, ct = torch.from_numpy(w).cuda(), torch.from_numpy(c).cuda()
        row["torch"] = _try(lambda: timeit(lambda: _torch_corda(wt, ct, r), env.sync_torch, 3))
        del wt, ct
    return row


def _merge_size(env: Env, params: int, k: int, per_elem: int, host_share: float = 0.5) -> int:
    """Parameters per model that fit: ``per_elem`` bytes per parameter, 60 % of free memory."""
    n = params
    if env.cupy is not None:
        n = min(n, int(0.6 * env.gpu_free() / per_elem))
    n = min(n, int(host_share * host_available() / per_elem))
    return max(1 << 16, n)


def _torch_ties(t, w, density: float):
    """TIES in torch (mergekit's per-tensor rule with an exact kthvalue threshold)."""
    import torch

    k, n = t.shape
    keep = max(1, int(density * n))
    mixed = torch.zeros(n, device=t.device)
    parts = []
    for i in range(k):
        thr = torch.kthvalue(t[i].abs(), n - keep + 1).values
        parts.append(t[i] * (t[i].abs() >= thr) * w[i])
    total = sum(parts)
    gamma = torch.where(total >= 0, 1.0, -1.0)
    div = torch.zeros(n, device=t.device)
    for i, p in enumerate(parts):
        agree = torch.sign(p) == gamma
        mixed += p * agree
        div += agree * w[i]
    return mixed / torch.where(div == 0, 1.0, div)


def _torch_pcb(t, density: float, clip: float = 1e-4):
    """PCB (official formula, per-tensor statistics) in torch."""
    import torch

    k, n = t.shape
    a = t.abs()
    lo = torch.kthvalue(a, int(n * clip) + 1, dim=1).values[:, None]
    hi = torch.kthvalue(a, int(n * (1 - clip) - 1) + 1, dim=1).values[:, None]
    mclip = torch.minimum(torch.maximum(a, lo), hi)
    del a
    mm = (mclip - lo) / (hi - lo)
    bal = torch.exp(k * mm**2) * torch.tanh(t * t.sum(0, keepdim=True))
    del mm
    thr = torch.kthvalue(bal, int(n * (1 - density)) + 1, dim=1).values[:, None]
    top = bal.max(dim=1, keepdim=True).values
    scale = (torch.maximum(bal, thr) - thr) / (top - thr)
    del bal
    tc = mclip * torch.sign(t) * scale
    return tc.sum(0) / scale.sum(0).clamp_min(1e-12)


def op_merge(env: Env, which: str, params: int, k: int = 3) -> dict[str, Any]:
    import torch

    from ops import merge

    # Bytes per parameter: deltas (k·4) + masks/temporaries; PCB's torch reference is the hungriest.
    per = k * 4 + k + 16 if which == "ties" else k * 4 * 6 + 16
    n = _merge_size(env, params, k, per)
    rng = np.random.default_rng(4)
    d = np.empty((k, n), np.float32)
    for i in range(k):
        d[i] = rng.standard_normal(n, dtype=np.float32)
    wts = np.ones(k, np.float32)
    moved = (k + 1) * n * 4  # read every task vector once, write the merge
    row: dict[str, Any] = {
        "size": f"{k}x{n / 1e6:.0f}M fp32",
        "work": moved,
        "unit": "byte",
        "peak": "hbm",
        "params_per_model": n,
    }
    if which == "ties":
        fn = lambda x, w: merge.ties(x, w, density=0.2)  # noqa: E731
        tfn = lambda x, w: _torch_ties(x, w, 0.2)  # noqa: E731
    else:
        fn = lambda x, w: merge.pcb(x, w, density=0.2, scope="tensor")  # noqa: E731
        tfn = lambda x, w: _torch_pcb(x, 0.2)  # noqa: E731
    row["cpu"] = _try(lambda: timeit(lambda: fn(d, wts), None, 1))
    if env.cupy is not None:
        dd, wd = env.cupy.asarray(d), env.cupy.asarray(wts)
        row["cupy"] = _try(lambda: timeit(lambda: fn(dd, wd), env.sync_cupy, env.reps))
        del dd, wd
        env.gpu_free()
    if env.torch_cuda:
        dt, wt = torch.from_numpy(d).cuda(), torch.from_numpy(wts).cuda()
        row["torch"] = _try(lambda: timeit(lambda: tfn(dt, wt), env.sync_torch, env.reps))
        del dt, wt
        torch.cuda.empty_cache()
    return row


def op_cov(env: Env, d: int, tokens: int = 8192, batches: int = 4) -> dict[str, Any]:
    import torch

    from ops.cuda import accumulate_cov

    xs = [np.random.default_rng(i).standard_normal((tokens, d), dtype=np.float32) for i in range(2)]
    flops = 2.0 * tokens * d * d * batches
    row: dict[str, Any] = {
        "size": f"{batches}x{tokens}x{d}",
        "work": flops,
        "unit": "flop",
        "peak": "fp32",
    }

    def run(arrs, c):
        for b in range(batches):
            accumulate_cov(c, arrs[b % 2])

    row["cpu"] = _try(lambda: timeit(lambda: run(xs, np.zeros((d, d), np.float32)), None, 1))
    if env.cupy is not None:
        cp = env.cupy
        xd = [cp.asarray(x) for x in xs]
        cd = cp.zeros((d, d), cp.float32)
        row["cupy"] = _try(lambda: timeit(lambda: run(xd, cd), env.sync_cupy, env.reps))
        del xd, cd
    if env.torch_cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32, as the covariance is accumulated
        xt = [torch.from_numpy(x).cuda() for x in xs]
        ct = torch.zeros(d, d, device="cuda")

        def trun():
            for b in range(batches):
                ct.addmm_(xt[b % 2].T, xt[b % 2])

        row["torch"] = _try(lambda: timeit(trun, env.sync_torch, env.reps))
        del xt, ct
    return row


def _pinned_floor(env: Env, nbytes: int) -> tuple[float, float]:
    """(H2D, D2H) bandwidth of one pinned ↔ device memcpy of ``nbytes``: the PCIe floor."""
    cp = env.cupy
    host = np.ndarray((nbytes,), np.uint8, buffer=cp.cuda.alloc_pinned_memory(nbytes))
    host[:] = 1
    dev = cp.empty(nbytes, cp.uint8)
    up = timeit(lambda: dev.set(host), env.sync_cupy, env.reps)
    down = timeit(lambda: dev.get(out=host), env.sync_cupy, env.reps)
    return nbytes / up, nbytes / down


def op_h2d(env: Env, nbytes: int) -> dict[str, Any]:
    import torch

    n = nbytes // 2
    t = torch.randn(n).to(torch.bfloat16)  # pageable host memory, as a safetensors load gives
    row: dict[str, Any] = {"size": f"{nbytes / 2**20:.0f} MiB bf16", "work": nbytes,
                           "unit": "byte", "peak": "pcie"}  # fmt: skip
    row["cpu"] = _try(lambda: timeit(lambda: t.float(), None, 1))  # the CPU path's widening
    if env.cupy is not None:
        from ops.cuda import upload

        cp = env.cupy
        h2d, _ = _pinned_floor(env, nbytes)
        row["pinned_floor_GBps"] = h2d / 1e9
        raw = t.view(torch.int16).numpy().view(np.uint16)  # what Checkpoint.array() returns
        row["cupy"] = _try(lambda: timeit(lambda: upload(raw, bf16=True), env.sync_cupy, env.reps))
        row["cupy_pageable"] = _try(lambda: timeit(lambda: cp.asarray(raw), env.sync_cupy, 3))
    if env.torch_cuda:
        row["torch"] = _try(lambda: timeit(lambda: t.cuda(), env.sync_torch, env.reps))
        row["torch_pinned"] = _try(
            lambda: timeit(lambda: t.pin_memory().cuda(non_blocking=True), env.sync_torch, 3)
        )
    return row


def op_merge_io(env: Env, m: int, n: int, k: int = 3, tensors: int = 4) -> dict[str, Any]:
    """TIES of ``tensors`` bf16 tensors from host memory: the whole per-tensor GPU pipeline."""
    import torch

    from ops import merge
    from surgery.run import narrow, widen  # the data path of run.load/run.store (numpy bytes)

    g = torch.Generator().manual_seed(0)
    base = [torch.randn(m, n, generator=g).to(torch.bfloat16) for _ in range(tensors)]
    fts = [[b + 0.01 * torch.randn(m, n, generator=g).to(torch.bfloat16) for _ in range(k)]
           for b in base]  # fmt: skip
    bits = lambda t: t.view(torch.int16).numpy().view(np.uint16)  # noqa: E731 - what .array() gives
    base_np = [bits(b) for b in base]
    fts_np = [[bits(f) for f in ft] for ft in fts]
    up, down = (k + 1) * m * n * 2, m * n * 2  # bf16 bytes over PCIe per tensor
    row: dict[str, Any] = {"size": f"{tensors}x({k}+1)x{m}x{n} bf16", "work": tensors * (up + down),
                           "unit": "byte", "peak": "pcie"}  # fmt: skip

    def pipeline(device: str) -> None:
        for b, ft in zip(base_np, fts_np, strict=True):
            b32 = widen(b, "BF16", device)
            xp = np if device == "cpu" else env.cupy
            d = xp.stack([widen(f, "BF16", device) - b32 for f in ft])
            out = merge.ties(d, xp.ones(k, xp.float32), density=0.2)
            out += b32
            narrow(out, "BF16")

    row["cpu"] = _try(lambda: timeit(lambda: pipeline("cpu"), None, 1))
    if env.cupy is not None:
        h2d, d2h = _pinned_floor(env, 1 << 30)
        floor = tensors * (up / h2d + down / d2h)
        row["pcie_floor_s"] = floor
        row["cupy"] = _try(lambda: timeit(lambda: pipeline("gpu"), env.sync_cupy, env.reps))
        if isinstance(row["cupy"], float):
            row["frac_of_pcie_floor"] = floor / row["cupy"]
    if env.torch_cuda:

        def tpipe():
            for b, ft in zip(base, fts, strict=True):
                bt = b.cuda().float()
                d = torch.stack([f.cuda().float() - bt for f in ft]).reshape(k, -1)
                out = _torch_ties(d, torch.ones(k, device="cuda"), 0.2).reshape(m, n) + bt
                out.to(torch.bfloat16).cpu()

        row["torch"] = _try(lambda: timeit(tpipe, env.sync_torch, env.reps))
    return row


def _synthetic_7b(path: Path, hidden: int, inter: int, layers: int, vocab: int) -> Path:
    """A LLaMA-shaped bf16 checkpoint of random weights (no QR: fast to write at 7B)."""
    import torch

    from surgery import demo

    if (path / "config.json").is_file():
        return path
    cfg_dir = demo.tiny_llama(path.parent / "cfg_template")
    cfg = json.loads((cfg_dir / "config.json").read_text())
    heads = max(1, hidden // 128)
    cfg.update(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
               vocab_size=vocab, num_attention_heads=heads, num_key_value_heads=heads,
               torch_dtype="bfloat16")  # fmt: skip
    g = torch.Generator().manual_seed(0)
    t: dict[str, torch.Tensor] = {}

    def lin(o: int, i: int) -> torch.Tensor:
        return (torch.randn(o, i, generator=g) / math.sqrt(i)).to(torch.bfloat16)

    t["model.embed_tokens.weight"] = lin(vocab, hidden)
    for li in range(layers):
        p = f"model.layers.{li}."
        for name in ("q", "k", "v", "o"):
            t[p + f"self_attn.{name}_proj.weight"] = lin(hidden, hidden)
        t[p + "mlp.gate_proj.weight"] = lin(inter, hidden)
        t[p + "mlp.up_proj.weight"] = lin(inter, hidden)
        t[p + "mlp.down_proj.weight"] = lin(hidden, inter)
        t[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        t[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    t["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    return demo.save_checkpoint(t, path, cfg, shards=max(1, layers // 4))


def _time_cli(*args: str) -> float:
    """Wall seconds of ``surgery ARGS --force -q`` in a subprocess (start-up and I/O included)."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "cli", *args, "--force", "-q"], cwd=ROOT,
                       capture_output=True, text=True)  # fmt: skip
    if p.returncode != 0:
        raise RuntimeError(p.stderr.strip().splitlines()[-1] if p.stderr else "failed")
    return time.perf_counter() - t0


def op_pissa7b(env: Env, s: float, work: Path, layers: int) -> dict[str, Any]:
    hidden, inter, r = dims(s)
    src = _synthetic_7b(work / f"llama7b_s{s}", hidden, inter, layers, max(256, round(32000 * s)))
    row: dict[str, Any] = {"size": f"{7 * layers} mats {hidden}/{inter} r{r}", "work": None,
                           "unit": None, "peak": None}  # fmt: skip

    def run(dev: str) -> float:
        return _time_cli("decompose", str(src), "-m", "pissa", "-r", str(r), "-o",
                         str(work / f"pissa_{dev}"), "--device", dev)  # fmt: skip

    row["cpu"] = _try(lambda: run("cpu"))
    if env.cupy is not None:
        row["cupy"] = _try(lambda: run("gpu"))
    return row


def op_merge_cli(env: Env, s: float, work: Path, layers: int) -> dict[str, Any]:
    """``surgery merge -m ties`` end to end (CLI, files in the page cache) over 3 fine-tunes."""
    from surgery import demo

    hidden, inter, _ = dims(s)
    base = _synthetic_7b(work / f"merge_base_s{s}_l{layers}", hidden, inter, layers,
                         max(256, round(32000 * s)))  # fmt: skip
    fts = [base.parent / f"{base.name}_ft{i}" for i in range(3)]
    for i, f in enumerate(fts):
        if not (f / "config.json").is_file():
            demo.finetune(base, f, seed=i + 1, shards=max(1, layers // 4))
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    row: dict[str, Any] = {"size": f"3x{size / 2**30:.2f} GiB bf16", "work": 5 * size,
                           "unit": "byte", "peak": "pcie"}  # fmt: skip
    for d in (base, *fts):  # warm the page cache: the floor below is PCIe, not the disk
        for p in d.glob("*.safetensors"):
            p.read_bytes()

    def run(dev: str) -> float:
        out = str(work / f"merge_{dev}")
        return _time_cli("merge", *map(str, fts), "--base", str(base), "-m", "ties", "-p",
                         "density=0.2", "-o", out, "--device", dev)  # fmt: skip

    row["cpu"] = _try(lambda: run("cpu"))
    if env.cupy is not None:
        h2d, d2h = _pinned_floor(env, 1 << 30)
        floor = 4 * size / h2d + size / d2h  # base + 3 models up, the merge down
        row["pcie_floor_s"] = floor
        row["cupy"] = _try(lambda: run("gpu"))
        if isinstance(row["cupy"], float):
            row["frac_of_pcie_floor"] = floor / row["cupy"]
    return row


# --------------------------------------------------------------------------- report


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if v is None:
        return "n/a"
    return str(v)[:24]


def achieved(row: dict[str, Any], env: Env) -> tuple[str, str]:
    """The CuPy column's rate and its fraction of the relevant GPU peak."""
    t = row.get("cupy")
    if not isinstance(t, float) or not row.get("work"):
        return "n/a", "n/a"
    rate = row["work"] / t
    txt = f"{rate / 1e12:.2f} TFLOP/s" if row["unit"] == "flop" else f"{rate / 1e9:.1f} GB/s"
    if row.get("pinned_floor_GBps"):
        return txt, f"{100 * rate / (row['pinned_floor_GBps'] * 1e9):.0f}% of pinned"
    if row.get("frac_of_pcie_floor"):
        return txt, f"{100 * row['frac_of_pcie_floor']:.0f}% of PCIe floor"
    if env.peaks is None or row.get("peak") not in env.peaks:
        return txt, "n/a (unknown GPU)"
    return txt, f"{100 * rate / env.peaks[row['peak']]:.1f}% {row['peak']}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="Multiply matrix dims by this.")
    ap.add_argument("--ops", default=",".join(ALL_OPS), help="Comma-separated operations.")
    ap.add_argument("--reps", type=int, default=3, help="Timed GPU repetitions (median).")
    ap.add_argument("--layers", type=int, default=32, help="pissa7b: decoder layers.")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "_work" / "gpu")
    ap.add_argument("--json", type=Path, default=None, help="Results file (default: WORK/...).")
    a = ap.parse_args(argv)
    ops = [o.strip() for o in a.ops.split(",") if o.strip()]
    unknown = sorted(set(ops) - set(ALL_OPS + EXTRA_OPS))
    if unknown:
        ap.error(f"unknown ops {unknown}; choices: {', '.join(ALL_OPS + EXTRA_OPS)}")
    a.work.mkdir(parents=True, exist_ok=True)
    env = Env(a.reps)
    hidden, inter, r = dims(a.scale)
    params = max(1 << 16, int(1e9 * a.scale**2))
    runners = {
        "svd4096": lambda: op_svd(env, hidden, hidden),
        "svd11008": lambda: op_svd(env, inter, hidden),
        "rsvd128": lambda: op_rsvd(env, inter, hidden, r),
        "corda": lambda: op_corda(env, hidden, r),
        "ties": lambda: op_merge(env, "ties", params),
        "pcb": lambda: op_merge(env, "pcb", params),
        "cov": lambda: op_cov(env, hidden),
        "h2d": lambda: op_h2d(env, max(1 << 20, int((1 << 30) * a.scale**2))),
        "merge_io": lambda: op_merge_io(env, inter, hidden),
        "pissa7b": lambda: op_pissa7b(env, a.scale, a.work, a.layers),
        "merge_cli": lambda: op_merge_cli(env, a.scale, a.work, max(1, a.layers // 8)),
    }
    print(f"GPU: {env.name} (cupy: {'yes' if env.cupy else 'no'}, torch cuda: {env.torch_cuda});"
          f" scale {a.scale}; CPU threads {os.cpu_count()}")  # fmt: skip
    head = f"{'op':<9} {'size':<24} {'cupy s':>9} {'torch s':>9} {'cpu s':>9} " \
           f"{'torch/cupy':>10} {'cpu/cupy':>9}  {'cupy rate':<16} peak"  # fmt: skip
    print(head)
    print("-" * len(head))
    results = {"gpu": env.name, "scale": a.scale, "ops": {}}
    for op in ops:
        row = runners[op]()
        results["ops"][op] = row
        c, t, p = row.get("cupy"), row.get("torch"), row.get("cpu")
        ratio = lambda x, y: (
            f"{x / y:.2f}x" if isinstance(x, float) and isinstance(y, float) else "n/a"
        )  # noqa: E731, E501
        rate, frac = achieved(row, env)
        print(f"{op:<9} {row['size']:<24} {_fmt(c):>9} {_fmt(t):>9} {_fmt(p):>9} "
              f"{ratio(t, c):>10} {ratio(p, c):>9}  {rate:<16} {frac}", flush=True)  # fmt: skip
        extras = {k: v for k, v in row.items() if k.startswith(("cupy_", "torch_"))}
        if extras:
            print("          " + ", ".join(f"{k}={_fmt(v)}" for k, v in extras.items()))
    out = a.json or a.work / "results.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
