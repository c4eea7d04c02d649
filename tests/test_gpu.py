"""GPU paths (ops/cuda.py): CPU-side checks everywhere, CPU/GPU agreement on a CUDA device.

Without a GPU (CI): importing surgery/ops/cli never imports cupy, ``--device gpu`` fails with one
clear error, the Gram-route SVD and its conditioning gate (pure xp) are checked on numpy against
LAPACK, and a numpy replay of the fused merge kernel's operation order must equal ``ops.merge``
bit for bit. With a GPU (``@pytest.mark.gpu``): every registered method on cupy equals numpy.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import cli
from ops import cuda, merge
from ops.backend import gpu_available, host_rng
from surgery import demo

ROOT = Path(__file__).resolve().parents[1]
NO_GPU_MSG = (
    "Error: --device gpu was requested but CuPy sees no usable CUDA device; install the GPU extra "
    "(pip install 'ckpt-surgery[gpu]') on a machine with a GPU, or use --device cpu"
)


def _spectrum_matrix(m: int, n: int, s: np.ndarray, seed: int = 0) -> np.ndarray:
    """``U diag(s) Vᵀ`` with Haar-random orthonormal factors, float64 (m, n)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, len(s))))
    v, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
    return (u * s) @ v.T


# --------------------------------------------------------------------------- no GPU needed


def test_importing_surgery_ops_cli_never_imports_cupy():
    code = (
        "import sys\n"
        "import surgery, surgery.api, ops, ops.merge, ops.decompose, ops.linalg, ops.cuda, cli\n"
        "from click.testing import CliRunner\n"
        "r = CliRunner().invoke(cli.cli, ['methods'])\n"
        "assert r.exit_code == 0, r.output\n"
        "bad = sorted(m for m in sys.modules if m == 'cupy' or m.startswith(('cupy.', 'cupyx')))\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(gpu_available(), reason="checks the error shown when no GPU exists")
def test_device_gpu_without_gpu_is_one_clear_error(tmp_path):
    base = demo.tiny_llama(tmp_path / "base", layers=1, hidden=16, inter=32, vocab=32)
    ft = demo.finetune(base, tmp_path / "ft", seed=1)
    runs = {
        "decompose": [
            "decompose", str(base), "-m", "pissa", "-r", "2", "-o", str(tmp_path / "d"),
            "--device", "gpu",
        ],
        "merge": [
            "merge", str(ft), "--base", str(base), "-m", "ties", "-o", str(tmp_path / "m"),
            "--device", "gpu",
        ],
    }  # fmt: skip
    for verb, args in runs.items():
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 1, (verb, r.output)
        assert r.output.strip() == NO_GPU_MSG, (verb, r.output)
        assert not (tmp_path / verb[0]).exists()


def test_gram_limit_reproduces_the_spec_table():
    # PERFORMANCE.md §2.3: fp32 Gram fine at κ = 64, every small σ lost at κ = 2.6e5.
    lim32 = cuda.gram_limit(np.float32, np.float32)
    assert 64 < lim32 < 2.6e5
    # fp64 Gram for fp32 results: no worse than fp32 gesvd up to κ = √(ε32/ε64) ≈ 2.3e4.
    assert cuda.gram_limit(np.float64, np.float32) == pytest.approx(2.3e4, rel=0.05)
    lam = np.array([1.0, 1e-2, 1e-6])
    assert cuda.gram_ok(lam, 2, 20.0) and not cuda.gram_ok(lam, 3, 20.0)
    assert cuda.gram_ok(np.zeros(3), 3, 20.0)  # a zero matrix has nothing to lose
    assert not cuda.gram_ok(np.array([1.0, -1e-9]), 2, 1e6)


@pytest.mark.parametrize("shape", [(120, 80), (80, 120)])
def test_gram_svd_matches_lapack_when_the_gate_accepts(shape):
    m, n = shape
    k = min(m, n)
    s_true = np.geomspace(1.0, 1e-3, k)  # κ = 1e3 < 2.3e4: accepted in fp64
    w = _spectrum_matrix(m, n, s_true).astype(np.float32)
    res = cuda.gram_svd(w)
    assert res is not None
    u, s, vh = res
    assert u.shape == (m, k) and s.shape == (k,) and vh.shape == (k, n)
    assert u.dtype == s.dtype == vh.dtype == np.float32
    u0, s0, vh0 = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    # Every σ, the smallest included, to fp32 accuracy relative to σ_1 (as fp32 gesvd).
    assert np.max(np.abs(s - s0)) <= 1e-6 * s0[0]
    ref32 = np.linalg.svd(w, compute_uv=False)  # LAPACK in fp32: the accuracy to match
    assert np.max(np.abs(s - s0) / s0) <= 10 * np.max(np.abs(ref32 - s0) / s0) + 1e-6
    assert np.linalg.norm((u * s) @ vh - w) <= 1e-5 * np.linalg.norm(w)
    assert np.abs(u.T @ u - np.eye(k)).max() < 1e-4
    assert np.abs(vh @ vh.T - np.eye(k)).max() < 1e-5
    # Sign-canonical like ops.linalg.svd, so the factors themselves agree.
    from ops.linalg import svd

    ul, sl, vhl = svd(w)
    top = 20  # well-separated top components: vectors comparable
    assert np.abs(u[:, :top] - ul[:, :top]).max() < 1e-3
    assert np.abs(vh[:top] - vhl[:top]).max() < 1e-3


def test_gram_route_is_refused_where_it_would_lose_the_spectrum():
    k = 200
    steep = np.arange(1, k + 1, dtype=np.float64) ** -2.5  # κ = 200^2.5 ≈ 5.7e5
    w = _spectrum_matrix(300, k, steep, seed=3).astype(np.float32)
    assert cuda.gram_svd(w) is None  # fp64 gate: κ > 2.3e4
    assert cuda.gram_svd(w, 20) is not None  # the top 20 (κ_20 ≈ 1.8e3) are fine
    # The gate is needed: forcing the fp32 Gram route loses the small σ (spec §2.3)...
    forced = cuda.gram_svd(w, gram_dtype=np.float32, check=False)
    s0 = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    rel = np.abs(forced[1] - s0) / s0
    assert rel[-20:].max() > 0.5
    # ...and the gated fp32 route refuses it, while accepting the κ ≤ 92 top.
    assert cuda.gram_svd(w, gram_dtype=np.float32) is None
    assert cuda.gram_svd(w, 5, gram_dtype=np.float32) is not None  # κ_5 = 5^2.5 ≈ 56


def test_svd_batched_equals_per_matrix_svd():
    rng = np.random.default_rng(5)
    ws = rng.standard_normal((3, 40, 24)).astype(np.float32)
    ws[2] = _spectrum_matrix(40, 24, np.arange(1, 25.0) ** -5.0, seed=9)  # κ ≈ 7.6e6: fallback
    for stack, k in ((ws, None), (np.ascontiguousarray(ws.transpose(0, 2, 1)), 7)):
        u, s, vh = cuda.svd_batched(stack, k)
        for i in range(stack.shape[0]):
            from ops.linalg import svd

            ui, si, vhi = svd(stack[i])
            kk = s.shape[1]
            np.testing.assert_allclose(s[i], si[:kk], rtol=2e-5, atol=2e-6 * si[0])
            rec = (u[i] * s[i]) @ vh[i]
            ref = (ui[:, :kk] * si[:kk]) @ vhi[:kk]
            assert np.linalg.norm(rec - ref) <= 1e-4 * np.linalg.norm(ref)


def test_accumulate_cov_equals_xtx():
    rng = np.random.default_rng(1)
    c = np.zeros((16, 16), np.float32)
    xs = [rng.standard_normal((n, 16)).astype(np.float32) for n in (5, 9)]
    for x in xs:
        cuda.accumulate_cov(c, x)
    x = np.concatenate(xs).astype(np.float64)
    np.testing.assert_allclose(c, x.T @ x, rtol=1e-5, atol=1e-5)


def _replay_gta(deltas, keeps, scales, weights, consensus, normalize, lambda_):
    """numpy replay of ops/cuda.py's _GTA_OP, statement by statement, vectorised over entries."""
    dt = deltas.dtype.type
    k = deltas.shape[0]

    def term(j):
        t = deltas[j] * dt(scales[j])
        return t * keeps[j].astype(deltas.dtype) if keeps[0] is not None else t

    def np_max(a, b):  # the kernel's np_max: NaN propagates, ties give the second operand
        return np.where(np.isnan(a), a, np.where(np.isnan(b), b, np.where(a > b, a, b)))

    acc = np.zeros(deltas.shape[1:], deltas.dtype)
    for j in range(k):
        acc = acc + term(j)
    mixed = acc
    if consensus:
        g = np.copysign(dt(1), acc)
        m = np.zeros_like(acc)
        dv = np.zeros_like(acc)
        for j in range(k):
            t = term(j) * g
            agree = (t > 0).astype(deltas.dtype)
            t = np_max(t, np.zeros_like(t))
            m = m + t
            dv = dv + (agree if dt(weights[j]) == 1 else agree * dt(weights[j]))
        mixed = m * g
        dv = np.where(dv == 0, dt(1), dv)
        if normalize:
            mixed = mixed / dv
    elif normalize:
        total = float(sum(weights))
        mixed = mixed / dt(total if abs(total) >= 1e-8 else 1.0)
    return mixed * dt(lambda_) if lambda_ != 1 else mixed


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_fused_merge_order_replays_ops_merge_bitwise(method, monkeypatch):
    """The fused kernel's statement order reproduces the numpy merge exactly (zeros, ±0, ties)."""
    rng = np.random.default_rng(11)
    k, n = 3, 4000
    d = rng.standard_normal((k, n)).astype(np.float32)
    d[:, :200] = 0.0  # untouched entries
    d[1, 200:300] = -0.0
    d[2, 300:400] = -d[0, 300:400]  # exact sign conflicts
    weights = [1.0, 0.7, -0.3]
    captured = {}

    def spy(deltas, keeps, scales, wh, *, consensus, normalize, lambda_):
        captured.update(keeps=keeps, scales=scales, wh=wh, c=consensus, nz=normalize, lam=lambda_)
        return _replay_gta(deltas, keeps, scales, wh, consensus, normalize, lambda_)

    params = {"lambda_": 1.3}
    if method != "task_arithmetic":
        params["density"] = 0.4
    if method == "task_arithmetic":
        params["normalize"] = True
    ref = getattr(merge, method)(d, np.asarray(weights, np.float32), **params)
    # Route the same call through the GPU dispatch, with numpy standing in for the kernel.
    monkeypatch.setattr(cuda, "gta", spy)
    monkeypatch.setattr(merge, "np", _NotNumpy(np))
    got = getattr(merge, method)(d, np.asarray(weights, np.float32), **params)
    assert captured, "the GPU dispatch was not taken"
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))  # bit for bit, ±0 included


class _NotNumpy:
    """A stand-in for the ``np`` name in ops.merge so that ``xp is not np`` holds on numpy."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)


# --------------------------------------------------------------------------- on a GPU


gpu = pytest.mark.gpu


def _cp():
    import cupy

    return cupy


def _registry_inputs():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 64)).astype(np.float32)
    x = rng.standard_normal((200, 64)).astype(np.float32)
    cov = (x.T @ x).astype(np.float32)
    return w, cov


@gpu
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_merges_bit_identical(method, dtype):
    cp = _cp()
    rng = np.random.default_rng(2)
    d = rng.standard_normal((3, 257, 129)).astype(dtype)
    d[:, :5] = 0
    d[1, 5:9] = -0.0
    w = np.asarray([1.0, 0.5, -0.25], dtype)
    extra = {} if method == "task_arithmetic" else {"density": 0.3}
    if method.startswith("dare"):
        extra["rescale"] = "density"  # l1 sums in a different order on the GPU (see below)
    rngs = lambda: [host_rng(0, "t", i) for i in range(3)]  # noqa: E731
    ref = getattr(merge, method)(d, w, rng=rngs(), lambda_=0.9, **extra)
    got = getattr(merge, method)(cp.asarray(d), cp.asarray(w), rng=rngs(), lambda_=0.9, **extra)
    assert np.array_equal(cp.asnumpy(got), ref)


@gpu
def test_gpu_dare_l1_rescale_within_float64_rounding():
    cp = _cp()
    d = np.random.default_rng(3).standard_normal((2, 5000)).astype(np.float32)
    w = np.ones(2, np.float32)
    ref = merge.dare_ties(d, w, rng=[host_rng(0, "x", i) for i in range(2)], density=0.2)
    rngs = [host_rng(0, "x", i) for i in range(2)]
    got = merge.dare_ties(cp.asarray(d), cp.asarray(w), rng=rngs, density=0.2)
    np.testing.assert_allclose(cp.asnumpy(got), ref, rtol=2e-7, atol=0)


def _pcb_close(got: np.ndarray, ref: np.ndarray) -> None:
    """PCB on two devices: equal to a few ulps except at entries on the drop threshold.

    CUDA's ``exp``/``tanh`` differ from numpy's by an ulp or two, so a balance score within ulps
    of the threshold may be dropped on one device and kept (with a tiny weight) on the other;
    when it is the only kept task of that entry the merged value jumps between 0 and ``λ·T_c``.
    Such entries must be rare (≤ 0.1 %); every other entry agrees to 1e-5.
    """
    far = ~np.isclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    assert far.mean() <= 1e-3, f"{far.sum()} of {far.size} PCB entries differ"


@gpu
@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_gpu_pcb_matches_cpu(scope):
    cp = _cp()
    d = np.random.default_rng(4).standard_normal((3, 4096)).astype(np.float32)
    w = np.ones(3, np.float32)
    stats = merge.pcb_reduce(lambda: [d], density=0.2) if scope == "model" else None
    ref = merge.pcb(d, w, density=0.2, scope=scope, stats=stats)
    got = merge.pcb(cp.asarray(d), cp.asarray(w), density=0.2, scope=scope, stats=stats)
    _pcb_close(cp.asnumpy(got), ref)
    bal = merge.pcb_balance(d, [0.1] * 3, [2.0] * 3)
    np.testing.assert_allclose(
        cp.asnumpy(merge.pcb_balance(cp.asarray(d), [0.1] * 3, [2.0] * 3)), bal, rtol=1e-5,
        atol=1e-6,
    )  # fmt: skip


@gpu
def test_gpu_every_registered_method_matches_cpu():
    """Each method in the registry, same inputs and seeds on both devices."""
    cp = _cp()
    from surgery.methods import METHODS, names

    names()  # build the registry
    w, cov = _registry_inputs()
    rng = np.random.default_rng(8)
    d = rng.standard_normal((3, 96, 64)).astype(np.float32)
    wts = np.ones(3, np.float32)
    direction = rng.standard_normal(64).astype(np.float32)
    out_dir = rng.standard_normal(96).astype(np.float32)
    uncovered = []
    for m in METHODS:
        if m.kind == "merge":
            kw = {"rng": [host_rng(0, m.name, i) for i in range(3)]}
            ref = m.fn(d, wts, **kw)
            kw = {"rng": [host_rng(0, m.name, i) for i in range(3)]}
            got = cp.asnumpy(m.fn(cp.asarray(d), cp.asarray(wts), **kw))
            if m.name == "pcb":  # exp/tanh ulps (see _pcb_close)
                _pcb_close(got, ref)
                continue
            # DARE: the l1 factor's float64 sum order differs; the rest is bit-exact.
            tol = 1e-6 if m.name.startswith("dare") else 0
            np.testing.assert_allclose(got, ref, rtol=tol, atol=tol, err_msg=m.name)
        elif m.kind == "decompose":
            kw = {"rank": 8, "rng": host_rng(0, m.name)}
            extra = {"cov": cov} if m.name == "corda" else {}
            r_ref, lr_ref = m.fn(w, **kw, **extra)
            kw = {"rank": 8, "rng": host_rng(0, m.name)}
            extra = {"cov": cp.asarray(cov)} if m.name == "corda" else {}
            r_got, lr_got = m.fn(cp.asarray(w), **kw, **extra)
            scale = np.abs(w).max()
            np.testing.assert_allclose(
                cp.asnumpy(lr_got.delta()), lr_ref.delta(), atol=2e-4 * scale, err_msg=m.name
            )
            if r_ref is not None:
                np.testing.assert_allclose(
                    cp.asnumpy(r_got), r_ref, atol=2e-4 * scale, err_msg=m.name
                )
        elif m.name in ("probe", "project_out"):
            if m.name == "probe":
                ref = m.fn(w, direction=direction, rows=5)
                got = m.fn(cp.asarray(w), direction=cp.asarray(direction), rows=5)
                assert np.array_equal(cp.asnumpy(got), ref), m.name  # same rows, same adds
            else:
                ref = m.fn(w, direction=out_dir)
                got = m.fn(cp.asarray(w), direction=cp.asarray(out_dir))
                np.testing.assert_allclose(cp.asnumpy(got), ref, atol=1e-5, err_msg=m.name)
        else:
            uncovered.append(m.name)
    assert not uncovered, f"add GPU agreement coverage for {uncovered}"


@gpu
def test_gpu_svd_paths_match_cpu():
    cp = _cp()
    from ops.linalg import svd, svd_topk

    w = _spectrum_matrix(300, 200, np.geomspace(10, 0.01, 200), seed=2).astype(np.float32)
    u0, s0, vh0 = svd(w)
    u, s, vh = (cp.asnumpy(a) for a in svd(cp.asarray(w)))  # gated Gram route
    np.testing.assert_allclose(s, s0, atol=1e-5 * s0[0])
    assert np.linalg.norm((u * s) @ vh - w) <= 2e-5 * np.linalg.norm(w)
    u, s, vh = (cp.asnumpy(a) for a in svd_topk(cp.asarray(w), 16, niter=0))
    np.testing.assert_allclose(s, s0[:16], rtol=1e-5)
    np.testing.assert_allclose((u * s) @ vh, (u0[:, :16] * s0[:16]) @ vh0[:16], atol=1e-4)
    # Batched stack equals the per-matrix SVD on the device too.
    ws = np.stack([w, w[::-1].copy(), 2 * w])
    ub, sb, vhb = cuda.svd_batched(cp.asarray(ws))
    for i in range(3):
        np.testing.assert_allclose(cp.asnumpy(sb[i]), np.linalg.svd(ws[i], compute_uv=False),
                                   rtol=1e-4, atol=1e-6 * s0[0] * 2)  # fmt: skip
    # An ill-conditioned matrix falls back to gesvd and still reconstructs.
    bad = _spectrum_matrix(120, 80, np.arange(1, 81.0) ** -4.0, seed=4).astype(np.float32)
    ub, sb, vhb = (cp.asnumpy(a) for a in svd(cp.asarray(bad)))
    assert np.linalg.norm((ub * sb) @ vhb - bad) <= 1e-5 * np.linalg.norm(bad)


@gpu
def test_gpu_cholesky_raises_on_indefinite():
    cp = _cp()
    with pytest.raises(np.linalg.LinAlgError):
        cuda.cholesky(cp.asarray(np.diag([1.0, -1.0, 2.0])))


@gpu
def test_gpu_dlpack_zero_copy_and_transfers():
    import torch

    cp = _cp()
    from ops.backend import to_torch, to_xp

    if torch.cuda.is_available():
        t = torch.arange(12, dtype=torch.float32, device="cuda").reshape(3, 4)
        x = to_xp(t, "gpu")
        assert x.data.ptr == t.data_ptr()  # shared memory, no copy
        x[0, 0] = 42
        assert float(t[0, 0]) == 42
    # Host bf16 → device fp32 (widened on the device) equals torch's exact widening.
    h = (torch.randn(3000, 700) * 3).to(torch.bfloat16)  # 4 MB: one synchronous copy
    got = cp.asnumpy(to_xp(h, "gpu"))
    assert np.array_equal(got, h.float().numpy())
    big = torch.randn(9000, 4000).to(torch.bfloat16)  # 72 MB raw: several pinned chunks
    assert np.array_equal(cp.asnumpy(to_xp(big, "gpu")), big.float().numpy())
    # Device → bf16/fp16 narrowing equals torch's CPU rounding bit for bit (NaN, inf, ties).
    f = np.random.default_rng(0).standard_normal(100_000).astype(np.float32) * 1e3
    f[:4] = [np.nan, np.inf, -np.inf, 1.00390625]  # a bf16 rounding tie
    for dt in (torch.bfloat16, torch.float16):
        ref = torch.from_numpy(f).to(dt)
        got = to_torch(cp.asarray(f), dt)
        assert got.dtype == dt
        assert torch.equal(got.view(torch.int16), ref.view(torch.int16))
    _numpy_transfers_equal_host_casts(f, big.view(torch.int16).numpy().view(np.uint16))


@gpu
def test_gpu_memory_pool_release():
    cp = _cp()
    from ops.backend import release_memory

    pool = cp.get_default_memory_pool()
    x = cp.ones((4096, 4096), cp.float32)
    pinned_block = cuda.to_host(x)  # a download buffer from the pinned pool
    del x
    assert pool.total_bytes() - pool.used_bytes() >= 4096 * 4096 * 4  # cached, not freed
    release_memory()
    assert pool.total_bytes() == pool.used_bytes()
    pinned = cp.get_default_pinned_memory_pool()
    del pinned_block
    assert pinned.n_free_blocks() >= 1  # kept between tensors (cudaHostAlloc is slow)
    release_memory(pinned=True)  # the end of a run
    assert pinned.n_free_blocks() == 0


@gpu
@pytest.mark.parametrize("verb", ["merge", "decompose"])
def test_gpu_cli_end_to_end_equals_cpu(tmp_path, verb):
    from safetensors.numpy import load_file

    base = demo.tiny_llama(tmp_path / "base", layers=2, hidden=64, inter=128, vocab=64)
    ft = demo.finetune(base, tmp_path / "ft", seed=1)
    ft2 = demo.finetune(base, tmp_path / "ft2", seed=2)
    outs = {}
    for dev in ("cpu", "gpu"):
        out = tmp_path / f"{verb}_{dev}"
        if verb == "merge":
            args = ["merge", str(ft), str(ft2), "--base", str(base), "-m", "ties"]
        else:
            args = ["decompose", str(base), "-m", "pissa", "-r", "4"]
        r = CliRunner().invoke(cli, [*args, "-o", str(out), "--device", dev])
        assert r.exit_code == 0, r.output
        assert json.loads((out / "surgery.json").read_text())["device"] == dev
        outs[dev] = out
    a = {f.name: load_file(str(f)) for f in outs["cpu"].glob("*.safetensors")}
    b = {f.name: load_file(str(f)) for f in outs["gpu"].glob("*.safetensors")}
    assert a.keys() == b.keys()
    for f in a:
        for name in a[f]:
            x, y = a[f][name], b[f][name]
            if verb == "merge":  # TIES: bit-identical on both devices
                assert np.array_equal(x.view(np.uint16), y.view(np.uint16)), name
            else:  # bf16 residuals: equal up to one bf16 ulp where the SVDs round differently
                np.testing.assert_allclose(
                    x.astype(np.float32), y.astype(np.float32), rtol=1e-2, atol=1e-3
                )


# --------------------------------------------------------------------------- simulated device
#
# A CPU stand-in for cupy: arrays wrap numpy but refuse implicit host conversion (``np.asarray``,
# scipy on device arrays) and host/device mixing, as cupy does; reductions return 0-d arrays;
# the ops/cuda.py kernels run as numpy replays of their CUDA bodies (same statement order, so
# merges must stay bit-identical to the numpy code). Running the kernels and the CLI verbs with
# ``--device gpu`` on it catches host conversions and wrong dispatch before a GPU is at hand.


class _HostConversion(TypeError):
    pass


def _unwrap(x):
    if isinstance(x, _FakeArray):
        return x._a
    if isinstance(x, (tuple, list)):
        return type(x)(_unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _wrap(x):
    if isinstance(x, np.ndarray):
        return _FakeArray(x)
    if isinstance(x, np.generic):  # cupy reductions return 0-d arrays, not scalars
        return _FakeArray(np.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _no_host_arrays(args, what):
    for v in args if isinstance(args, (tuple, list)) else [args]:
        if isinstance(v, np.ndarray) and v.ndim > 0:
            raise _HostConversion(f"{what}: a host numpy array {v.shape} mixed with device arrays")
        if isinstance(v, (tuple, list)):
            _no_host_arrays(v, what)


class _FakeArray:
    """numpy-backed array that behaves like a cupy array where it matters for host safety."""

    __array_priority__ = 100

    def __init__(self, a):
        self._a = a

    def __array__(self, *a, **k):
        raise _HostConversion("Implicit conversion to a NumPy array is not allowed (use .get())")

    def get(self, stream=None, order="C", out=None, blocking=True):
        if out is not None:
            out[...] = self._a
            return out
        return self._a.copy()

    def set(self, arr, stream=None):
        self._a[...] = arr

    def __array_ufunc__(self, ufunc, method, *inputs, **kw):
        _no_host_arrays(inputs, ufunc.__name__)
        return _wrap(getattr(ufunc, method)(*_unwrap(inputs), **_unwrap(kw)))

    def __array_function__(self, func, types, args, kwargs):
        _no_host_arrays(args, func.__name__)
        return _wrap(func(*_unwrap(args), **_unwrap(kwargs)))

    def __getattr__(self, name):
        if name.startswith("__"):  # no __array_interface__ / buffer back doors to the host data
            raise AttributeError(name)
        v = getattr(self._a, name)
        if callable(v):
            return lambda *a, **k: _wrap(v(*_unwrap(a), **_unwrap(k)))
        return _wrap(v)

    def __getitem__(self, idx):
        _no_host_arrays(idx if isinstance(idx, tuple) else (idx,), "indexing")
        return _wrap(self._a[_unwrap(idx)])

    def __setitem__(self, idx, v):
        _no_host_arrays((idx if isinstance(idx, tuple) else idx, v), "assignment")
        self._a[_unwrap(idx)] = _unwrap(v)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(v) for v in self._a)

    def __bool__(self):
        return bool(self._a)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __index__(self):
        return self._a.__index__()

    def __repr__(self):
        return f"fakecupy.{self._a!r}"

    @property
    def T(self):
        return _FakeArray(self._a.T)

    @property
    def shape(self):
        return self._a.shape

    @property
    def dtype(self):
        return self._a.dtype


_FakeArray.__module__ = "cupy._fake"  # what ops.backend's device test looks at


def _binop(name):
    def op(self, other):
        _no_host_arrays((other,), name)
        r = getattr(self._a, name)(_unwrap(other))
        return NotImplemented if r is NotImplemented else _wrap(r)

    def iop(self, other):
        _no_host_arrays((other,), name)
        getattr(self._a, name.replace("__", "__i", 1))(_unwrap(other))
        return self

    return op, iop


for _n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or",
           "xor", "lshift", "rshift"):  # fmt: skip
    _op, _iop = _binop(f"__{_n}__")
    setattr(_FakeArray, f"__{_n}__", _op)
    setattr(_FakeArray, f"__i{_n}__", _iop)
    setattr(_FakeArray, f"__r{_n}__", _binop(f"__r{_n}__")[0])
for _n in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(_FakeArray, f"__{_n}__", _binop(f"__{_n}__")[0])
for _n in ("neg", "pos", "abs", "invert"):
    setattr(_FakeArray, f"__{_n}__", (lambda n: lambda self: _wrap(getattr(self._a, n)()))(
        f"__{_n}__"))  # fmt: skip


class _FakeModule:
    """Module facade over numpy/scipy: functions take device arrays only and return them."""

    _allow_host = {"asarray", "array", "asanyarray", "zeros", "ones", "empty", "eye", "arange",
                   "full", "linspace", "geomspace"}  # fmt: skip

    def __init__(self, real, extra=None):
        self._real = real
        self._extra = extra or {}

    def __getattr__(self, name):
        if name in self._extra:
            return self._extra[name]
        v = getattr(self._real, name)
        if isinstance(v, type(np)):
            return _FakeModule(v)
        if callable(v) and not isinstance(v, type):
            allow = name in self._allow_host

            def f(*a, **k):
                if not allow:
                    _no_host_arrays(a, name)
                return _wrap(v(*_unwrap(a), **_unwrap(k)))

            return f
        return v


def _sim_kernel(name):
    """numpy replays of ops/cuda.py's CUDA kernels, by kernel name."""

    def bf16_f32(x, *out):
        return _FakeArray((x._a.astype(np.uint32) << np.uint32(16)).view(np.float32))

    def f32_bf16(x, *out):
        u = x._a.view(np.uint32)
        r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        return _FakeArray(np.where(np.isnan(x._a), 0xFFFF, r).astype(np.uint16))

    def f32_f16(x, *out):
        with np.errstate(over="ignore"):
            w = x._a.view(np.uint32)
            u32 = np.uint32
            shl1, sign = w + w, w & u32(0x80000000)
            to_inf, to_zero = np.array([0x77800000, 0x08800000], np.uint32).view(np.float32)
            base = (np.abs(x._a) * to_inf) * to_zero
            bias = np.maximum(shl1 & u32(0xFF000000), u32(0x71000000))
            base = ((bias >> u32(1)) + u32(0x07800000)).view(np.float32) + base
            bits = base.view(np.uint32)
            nonsign = ((bits >> u32(13)) & u32(0x7C00)) + (bits & u32(0xFFF))
            y = (sign >> u32(16)) | np.where(shl1 > u32(0xFF000000), u32(0x7E00), nonsign)
        return _FakeArray(y.astype(np.uint16))

    def gta(d, keep, sc, wt, k, has_keep, consensus, normalize, tdiv, lam, scale_out, out):
        d, keep, sc, wt = d._a, keep._a, sc._a, wt._a
        keeps = [keep[j] for j in range(int(k))] if has_keep else [None]
        res = _replay_gta(d, keeps, list(sc), list(wt), consensus, normalize, 1.0)
        if normalize and not consensus:  # the replay recomputes the divisor from the weights
            res = _replay_gta(d, keeps, list(sc), list(wt), consensus, False, 1.0) / tdiv
        out._a[...] = res * lam if scale_out else res
        return out

    def pcb_rows(t, lo, hi, mmin, safe, live, k, c):
        tv = t[:, c]  # (k, b)
        cs = np.zeros_like(tv[0])
        for j in range(k):
            cs = cs + tv[j]
        a = np.abs(tv)
        a = np.maximum(a, lo[:, None])
        a = np.minimum(a, hi[:, None])
        a = ((a - mmin[:, None]) / safe[:, None]) * live[:, None]
        a = np.exp((a * a) * t.dtype.type(k))
        return a * np.tanh(tv * cs), tv

    def pcb_balance(t, lo, hi, mmin, safe, live, k, m, out):
        bal, _ = pcb_rows(t._a, lo._a, hi._a, mmin._a, safe._a, live._a, int(k), slice(None))
        out._a[...] = bal
        return out

    def pcb_merge(t, lo, hi, mmin, safe, live, thr, spn, dead, lam, k, out):
        t, lo, hi, thr, spn, dead, lam = (x._a for x in (t, lo, hi, thr, spn, dead, lam))
        a, tv = pcb_rows(t, lo, hi, mmin._a, safe._a, live._a, int(k), slice(None))
        a = (np.maximum(a, thr[:, None]) - thr[:, None]) / spn[:, None]
        a[dead] = 1
        c = np.minimum(np.maximum(np.abs(tv), lo[:, None]), hi[:, None]) * np.sign(tv)
        c = (c * lam[:, None]) * a
        num, den = np.zeros_like(c[0]), np.zeros_like(a[0])
        for j in range(int(k)):
            num, den = num + c[j], den + a[j]
        out._a[...] = num / np.maximum(den, t.dtype.type(1e-12))
        return out

    def l1(x):
        return _FakeArray(np.asarray(np.abs(x._a).sum(dtype=np.float64)))

    def l1_kept(x, keep):
        return _FakeArray(np.asarray(np.abs(x._a).sum(dtype=np.float64, where=keep._a)))

    table = {
        "surgery_bf16_f32": bf16_f32,
        "surgery_f32_bf16": f32_bf16,
        "surgery_f32_f16": f32_f16,
        "surgery_gta": gta,
        "surgery_pcb_balance": pcb_balance,
        "surgery_pcb_merge": pcb_merge,
        "surgery_l1": l1,
        "surgery_l1_kept": l1_kept,
    }
    return table[name]


class _Kernel:
    def __init__(self, *args, **kw):
        self.fn = _sim_kernel(args[-1] if isinstance(args[-1], str) else kw["name"])

    def __call__(self, *args):
        return self.fn(*args)


@pytest.fixture
def fake_cupy(monkeypatch):
    """Install the simulated cupy/cupyx for one test (kernel caches cleared around it)."""
    import contextlib
    import types

    import scipy
    import scipy.linalg

    class _Pool:
        def free_all_blocks(self):
            pass

    class _Stream:
        def __init__(self, *a, **k):
            pass

        def record(self):
            return types.SimpleNamespace(synchronize=lambda: None)

        def synchronize(self):
            pass

    cuda_ns = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, memGetInfo=lambda: (8 << 30,) * 2),
        Stream=_Stream,
        get_current_stream=_Stream,
        alloc_pinned_memory=lambda n: bytearray(max(int(n), 1)),
        Device=lambda *a: types.SimpleNamespace(synchronize=lambda: None),
    )

    def bincount(x, *a, **k):  # cupy takes int(max(x)) + 1: an empty input fails
        if x.size == 0:
            raise ValueError("zero-size array to reduction operation cupy_max")
        return _wrap(np.bincount(_unwrap(x), *a, **k))

    def searchsorted(a, v, *args, **k):  # cupy < 14: "Only int or ndarray are supported for v"
        if not isinstance(v, (_FakeArray, int)):
            raise NotImplementedError("Only int or ndarray are supported for v")
        return _wrap(np.searchsorted(_unwrap(a), _unwrap(v), *args, **k))

    fake = _FakeModule(np, {
        "bincount": bincount, "searchsorted": searchsorted,
        "ndarray": _FakeArray, "cuda": cuda_ns, "ElementwiseKernel": _Kernel,
        "ReductionKernel": _Kernel, "asnumpy": lambda x: x.get(),
        "get_default_memory_pool": _Pool, "get_default_pinned_memory_pool": _Pool,
        "from_dlpack": lambda t: _FakeArray(t.numpy()), "__name__": "cupy",
    })  # fmt: skip
    fake_scipy = _FakeModule(scipy, {"linalg": _FakeModule(scipy.linalg)})
    fakex = types.SimpleNamespace(
        errstate=lambda **k: contextlib.nullcontext(),
        empty_pinned=lambda shape, dtype=float: np.empty(shape, dtype),
        scipy=fake_scipy,
    )
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "cupyx", fakex)
    monkeypatch.setitem(sys.modules, "cupyx.scipy", fake_scipy)
    monkeypatch.setitem(sys.modules, "cupyx.scipy.linalg", fake_scipy.linalg)
    caches = [cuda._gta_kernel, cuda._pcb_balance_kernel, cuda._pcb_merge_kernel,
              cuda._l1_kernels, cuda._widen_bf16_kernel, cuda._narrow_bf16_kernel,
              cuda._narrow_f16_kernel, cuda._staging]  # fmt: skip
    for c in caches:
        c.cache_clear()
    yield fake
    for c in caches:
        c.cache_clear()


def test_simulated_device_refuses_host_conversion(fake_cupy):
    x = fake_cupy.asarray(np.ones(3))
    with pytest.raises(_HostConversion):
        np.asarray(x)
    with pytest.raises(_HostConversion):
        x + np.ones(3)
    assert float(x.sum()) == 3.0 and isinstance(x.sum(), _FakeArray)


def test_simulated_device_every_registered_method_matches_cpu(fake_cupy):
    """Every method on simulated device arrays: merges bit-identical, the rest to fp32 rounding."""
    from surgery.methods import METHODS, names

    names()
    cp = fake_cupy
    rng = np.random.default_rng(8)
    w, cov = _registry_inputs()
    d = rng.standard_normal((3, 96, 64)).astype(np.float32)
    d[:, :3] = 0
    wts = np.asarray([1.0, 0.6, -0.2], np.float32)
    direction = rng.standard_normal(64).astype(np.float32)
    out_dir = rng.standard_normal(96).astype(np.float32)
    uncovered = []
    for m in METHODS:
        if m.kind == "merge":
            ref = m.fn(d, wts, rng=[host_rng(0, m.name, i) for i in range(3)])
            rngs = [host_rng(0, m.name, i) for i in range(3)]
            got = m.fn(cp.asarray(d), cp.asarray(wts), rng=rngs)
            assert isinstance(got, _FakeArray), m.name
            assert np.array_equal(got.get().view(np.uint32), ref.view(np.uint32)), m.name
        elif m.kind == "decompose":
            extra = {"cov": cov} if m.name == "corda" else {}
            r_ref, lr_ref = m.fn(w, rank=8, rng=host_rng(0, m.name), **extra)
            extra = {"cov": cp.asarray(cov)} if m.name == "corda" else {}
            r_got, lr_got = m.fn(cp.asarray(w), rank=8, rng=host_rng(0, m.name), **extra)
            assert isinstance(lr_got.A, _FakeArray), m.name
            tol = 2e-4 * np.abs(w).max()
            np.testing.assert_allclose(lr_got.delta().get(), lr_ref.delta(), atol=tol,
                                       err_msg=m.name)  # fmt: skip
            if r_ref is not None:
                np.testing.assert_allclose(r_got.get(), r_ref, atol=tol, err_msg=m.name)
        elif m.name == "probe":
            ref = m.fn(w, direction=direction, rows=5)
            got = m.fn(cp.asarray(w), direction=cp.asarray(direction), rows=5)
            assert np.array_equal(got.get(), ref), m.name
        elif m.name == "project_out":
            ref = m.fn(w, direction=out_dir)
            got = m.fn(cp.asarray(w), direction=cp.asarray(out_dir))
            np.testing.assert_allclose(got.get(), ref, atol=1e-5, err_msg=m.name)
        else:
            uncovered.append(m.name)
    assert not uncovered, f"add device coverage for {uncovered}"


def test_simulated_device_pcb_model_scope_and_stats(fake_cupy):
    cp = fake_cupy
    d = np.random.default_rng(4).standard_normal((3, 5000)).astype(np.float32)
    w = np.ones(3, np.float32)
    chunks = lambda: [d[:, :3000], d[:, 3000:]]  # noqa: E731
    ref_stats = merge.pcb_reduce(chunks, density=0.3)
    stats = merge.pcb_reduce(lambda: [cp.asarray(c) for c in chunks()], density=0.3)
    for f in ("lo", "hi", "thr", "top"):
        assert np.array_equal(getattr(stats, f), getattr(ref_stats, f)), f
    ref = merge.pcb(d, w, density=0.3, stats=ref_stats)
    got = merge.pcb(cp.asarray(d), cp.asarray(w), density=0.3, stats=stats)
    assert np.array_equal(got.get(), ref)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # 3e38 → fp16 inf, on purpose
def test_simulated_device_transfers_round_trip_bitwise(fake_cupy):
    import torch

    from ops.backend import to_host, to_torch, to_xp

    f = np.random.default_rng(0).standard_normal(50_000).astype(np.float32) * 1e3
    f[:6] = [np.nan, np.inf, -np.inf, 1.00390625, -1.01171875, 3e38]  # ties, overflow to inf
    f[6:16] = [-np.nan, 65520.0, 65519.0, 1e-8, -3e-5, 6e-8, 2.98e-8, 1e-45, -0.0, 0.5 + 2**-12]
    f[16:1016] = np.random.default_rng(1).standard_normal(1000) * 1e-5  # fp16 subnormals
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        t = torch.from_numpy(f).to(dt)
        x = to_xp(t, "gpu")
        assert isinstance(x, _FakeArray) and x.dtype == np.float32
        assert np.array_equal(to_host(x), t.float().numpy(), equal_nan=True)
        back = to_torch(cuda.cp().asarray(f), dt)
        assert torch.equal(back.view(torch.int16 if dt != torch.float32 else torch.int32),
                           t.view(torch.int16 if dt != torch.float32 else torch.int32))  # fmt: skip
    big = torch.randn(40 << 20).to(torch.bfloat16)  # 80 MB: the double-buffered pinned path
    assert np.array_equal(to_host(to_xp(big, "gpu")), big.float().numpy())
    _numpy_transfers_equal_host_casts(f, big.view(torch.int16).numpy().view(np.uint16))


def _numpy_transfers_equal_host_casts(f, big_bits):
    """run.widen/narrow on the device (upload/download, no torch) equal the host casts bitwise."""
    from ops.backend import bf16_to_f32, f32_to_bf16, to_host
    from surgery.run import narrow, widen

    bits = f32_to_bf16(f)
    assert (bits[np.isnan(f)] == 0xFFFF).all()
    for dt, host in (("BF16", bits), ("F16", f.astype(np.float16)), ("F32", f)):
        dev = widen(host, dt, "gpu")
        assert type(dev).__module__.startswith("cupy") and dev.dtype == np.float32
        ref = bf16_to_f32(host) if dt == "BF16" else host.astype(np.float32)
        assert np.array_equal(to_host(dev).view(np.uint32), ref.view(np.uint32))
        back = narrow(cuda.cp().asarray(f), dt)
        assert isinstance(back, np.ndarray) and back.dtype == host.dtype, dt
        assert np.array_equal(back.view(np.uint8), host.view(np.uint8)), dt
    dev = widen(big_bits, "BF16", "gpu", "float64")
    assert dev.dtype == np.float64
    assert np.array_equal(to_host(dev), bf16_to_f32(big_bits).astype(np.float64))


@pytest.mark.parametrize("verb", ["merge", "decompose"])
def test_simulated_device_cli_equals_cpu(tmp_path, fake_cupy, verb):
    """``--device gpu`` end to end on the simulated device: same bytes as ``--device cpu``."""
    import torch
    from safetensors.torch import load_file

    base = demo.tiny_llama(tmp_path / "base", layers=2, hidden=32, inter=64, vocab=48,
                           dtype="bfloat16")  # fmt: skip
    ft = demo.finetune(base, tmp_path / "ft", seed=1)
    ft2 = demo.finetune(base, tmp_path / "ft2", seed=2)
    got = {}
    for dev in ("cpu", "gpu"):
        out = tmp_path / f"{verb}_{dev}"
        if verb == "merge":
            args = ["merge", str(ft), str(ft2), "--base", str(base), "-m", "dare_ties",
                    "-p", "density=0.5"]  # fmt: skip
        else:
            args = ["decompose", str(base), "-m", "pissa", "-r", "4"]
        r = CliRunner().invoke(cli, [*args, "-o", str(out), "--device", dev])
        assert r.exit_code == 0, r.output
        assert json.loads((out / "surgery.json").read_text())["device"] == dev
        got[dev] = {n: t for f in sorted(out.rglob("*.safetensors")) for n, t in
                    load_file(str(f)).items()}  # fmt: skip
    assert got["cpu"].keys() == got["gpu"].keys()
    for name, x in got["cpu"].items():
        y = got["gpu"][name]
        assert x.dtype == y.dtype, name
        if verb == "merge":  # DARE-TIES with host masks: the same bytes on both devices
            assert torch.equal(x.view(torch.int16), y.view(torch.int16)), name
        else:  # Gram route vs LAPACK: residuals agree to bf16 rounding
            torch.testing.assert_close(x.float(), y.float(), rtol=2e-2, atol=2e-3, msg=name)


def test_simulated_device_order_statistics_with_empty_chunks(fake_cupy):
    """kth_smallest refining on the device with chunks lacking the target bin (and empty ones)."""
    from ops.lowrank import rank_for_energy
    from ops.sparsify import kth_smallest

    rng = np.random.default_rng(3)
    big = rng.standard_normal((2, 6000)).astype(np.float32)
    chunks = [big[:, :3000], np.full((2, 50), 1e30, np.float32), big[:, 3000:],
              np.zeros((2, 0), np.float32)]  # fmt: skip
    ref = kth_smallest(lambda: iter(chunks), [10, 3000, 6049], gather_cap=16)
    dev = [fake_cupy.asarray(c) for c in chunks]
    got = kth_smallest(lambda: iter(dev), [10, 3000, 6049], gather_cap=16)
    assert np.array_equal(got, ref)
    s = np.sort(np.abs(big[0]))[::-1].copy()
    assert rank_for_energy(fake_cupy.asarray(s), 0.9) == rank_for_energy(s, 0.9)


def test_simulated_device_svd_batched_loops_syevd(fake_cupy):
    rng = np.random.default_rng(5)
    ws = rng.standard_normal((3, 80, 48)).astype(np.float32)
    u, s, vh = cuda.svd_batched(fake_cupy.asarray(ws), 10)
    for i in range(3):
        ur, sr, vr = cuda.gram_svd(ws[i], 10)
        np.testing.assert_allclose(s.get()[i], sr, rtol=1e-5)
        np.testing.assert_allclose((u.get()[i] * s.get()[i]) @ vh.get()[i], (ur * sr) @ vr,
                                   atol=1e-4)  # fmt: skip


def test_simulated_device_load_streams_file_bytes(tmp_path, fake_cupy):
    """run.load on the device (file → pinned chunks → device, widened and transposed there)
    equals the host load bit for bit: a multi-chunk bf16 tensor, fp16, and GPT-2 Conv1D."""
    import torch

    from surgery.checkpoint import Checkpoint
    from surgery.run import load

    rng = np.random.default_rng(2)
    bits = rng.integers(0, 1 << 16, size=(9000, 4500), dtype=np.uint16)  # 81 MB: two chunks
    bits[(bits & 0x7F80) == 0x7F80] = 0  # no NaN/inf patterns: compare with array_equal
    t = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    ck = Checkpoint.open(demo.save_checkpoint({"big.weight": t}, tmp_path / "bf16"))
    assert ck.dtype("big.weight") == "BF16" and np.array_equal(ck.array("big.weight"), bits)
    for prec in ("float32", "float64"):
        got = load(ck, "big.weight", "gpu", prec)
        assert isinstance(got, _FakeArray) and got.dtype == np.dtype(prec)
        assert np.array_equal(got.get(), load(ck, "big.weight", "cpu", prec))
    for dtype in ("float16", "float32"):
        g = Checkpoint.open(demo.tiny_gpt2(tmp_path / f"g_{dtype}", dtype=dtype))
        for n in g.names():
            if g.dtype(n) in ("F16", "F32"):
                got = load(g, n, "gpu")
                assert got.shape == g.shape(n), n
                assert np.array_equal(got.get(), load(g, n, "cpu")), n


# Raw (indexed) arrays with 2 dimensions, and the parameters each kernel gets as scalars: what the
# callers in ops/cuda.py pass (CuPy types a kernel's code by its call-time arguments).
_RAW_2D = {"surgery_gta": {"d", "keep"}, "surgery_pcb_balance": {"t"}, "surgery_pcb_merge": {"t"}}
_SCALARS = {
    "surgery_gta": {"k", "has_keep", "consensus", "normalize", "tdiv", "lam", "scale_out"},
    "surgery_pcb_balance": {"k", "m"},
    "surgery_pcb_merge": {"k"},
    "surgery_bf16_f32": set(), "surgery_f32_bf16": set(), "surgery_f32_f16": set(),
    "surgery_l1": set(), "surgery_l1_kept": set(),
}  # fmt: skip


def _recorded_kernels(monkeypatch) -> list[tuple[str, tuple, dict]]:
    """Every CUDA kernel ops/cuda.py defines: its factories run against a recording ``cp()``."""
    import types

    recorded = []

    def rec(kind):
        return lambda *a, **kw: recorded.append((kind, a, kw))

    ns = types.SimpleNamespace(ElementwiseKernel=rec("elementwise"), ReductionKernel=rec("reduce"))
    factories = [f for n, f in vars(cuda).items() if "kernel" in n and hasattr(f, "cache_clear")]
    monkeypatch.setattr(cuda, "cp", lambda: ns)
    for f in factories:
        f.cache_clear()
        f()
        f.cache_clear()  # never keep the recorder's None as the real kernel
    return recorded


def _kernel_source(kind: str, a: tuple, kw: dict, t: str) -> tuple[str, str]:
    """CuPy's own generated CUDA source of one recorded kernel with ``T = t`` (no device needed)."""
    import cupy
    import cupy._core._kernel as K
    import cupy._core._reduction as R
    import cupy._core.core as core

    def arg(p, name):
        dt = np.dtype(t) if p.dtype is None else np.dtype(p.dtype)
        if p.name in _SCALARS[name] and not p.raw:
            return K._ArgInfo(3, type(dt.type(0)), dt, 0, True, True)  # ARG_KIND_SCALAR
        nd = 2 if p.name in _RAW_2D.get(name, ()) else (1 if p.raw or p.is_const else 1)
        return K._ArgInfo(1, cupy.ndarray, dt, nd, True, True)  # ARG_KIND_NDARRAY

    def indexer(nd):
        return K._ArgInfo(2, cupy._core._carray.Indexer, None, nd, True, True)

    types_ = K._TypeMap((("T", np.dtype(t)),))
    if kind == "elementwise":
        in_s, out_s, op, name = a[:4]
        ins, outs = K._get_param_info(in_s, True), K._get_param_info(out_s, False)
        params = ins + outs + (K.ParameterInfo("CIndexer _ind", False),)
        args = tuple(arg(p, name) for p in ins + outs) + (indexer(1),)
        code = K._get_elementwise_kernel_code(args, types_, params, op, name,
                                              kw.get("preamble", ""))  # fmt: skip
    else:
        in_s, out_s, map_e, red_e, post_e, ident, name = a[:7]
        ins, outs = K._get_param_info(in_s, True), K._get_param_info(out_s, False)
        params = ins + outs + (K.ParameterInfo("CIndexer _in_ind", False),
                               K.ParameterInfo("CIndexer _out_ind", False),
                               K.ParameterInfo("int32 _block_stride", False))  # fmt: skip
        args = (*(arg(p, name) for p in ins), K._ArgInfo(1, cupy.ndarray, np.dtype("float64"), 0,
                True, True), indexer(1), indexer(0),
                K._ArgInfo(3, int, np.dtype("int32"), 0, True, True))  # fmt: skip
        # CuPy types the reduction's index counter as IndexT (int32 for 32-bit indexable input).
        types_ = K._TypeMap((("T", np.dtype(t)), ("IndexT", np.dtype("int32"))))
        red = (name, 512, kw.get("reduce_type", "double"), ident, map_e, red_e, post_e)
        code = R._ReductionKernel_get_cached_function_code(
            len(ins), len(outs), params, args, types_, *red, kw.get("preamble", ""), ()
        )
    head = "".join(f"#include <{h}>\n" for h in core._cupy_header_list)
    return name, head + code


@pytest.mark.skipif(
    shutil.which("nvcc") is None or importlib.util.find_spec("cupy") is None,
    reason="needs nvcc and cupy (their code generation; no device)",
)
def test_every_cuda_kernel_compiles(tmp_path, monkeypatch):
    """Each kernel, as CuPy generates it for float32 and float64, compiles for sm_80 and sm_90.

    No GPU needed: catches CUDA syntax/type errors in ops/cuda.py where no device is lent.
    """
    from concurrent.futures import ThreadPoolExecutor

    import cupy._core.core as core

    recorded = _recorded_kernels(monkeypatch)
    names = {(a[3] if k == "elementwise" else a[6]) for k, a, _ in recorded}
    assert names == set(_SCALARS), f"update _SCALARS/_RAW_2D for {names ^ set(_SCALARS)}"
    jobs = []
    for kind, a, kw in recorded:
        for t in ("float32", "float64"):
            name, src = _kernel_source(kind, a, kw, t)
            path = tmp_path / f"{name}_{t}.cu"
            path.write_text(src)
            for arch in ("sm_80", "sm_90"):
                jobs.append((path, arch))

    def build(job):
        path, arch = job
        inc = f"-I{core._get_header_dir_path()}"
        out = str(path.with_suffix(f".{arch}.o"))
        r = subprocess.run(["nvcc", f"-arch={arch}", "-std=c++17", inc, "-c", str(path), "-o", out],
                           capture_output=True, text=True)  # fmt: skip
        return path.name, arch, r.returncode, r.stderr

    with ThreadPoolExecutor(4) as pool:
        failed = [(n, arch, err[-1500:]) for n, arch, rc, err in pool.map(build, jobs) if rc]
    assert not failed, failed


def test_cupy_without_a_driver_runs_on_the_cpu(tmp_path, fake_cupy, monkeypatch):
    """cupy installed but no usable driver: ``--device auto`` runs on the CPU and never touches
    cupy's memory pools (which raise there); ``--device gpu`` is one clear error."""

    def no_driver():
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")

    class Pool:
        def free_all_blocks(self):
            raise RuntimeError("cudaErrorInsufficientDriver (a pool touched without a device)")

    monkeypatch.setattr(fake_cupy._extra["cuda"], "runtime",
                        __import__("types").SimpleNamespace(getDeviceCount=no_driver))  # fmt: skip
    monkeypatch.setitem(fake_cupy._extra, "get_default_memory_pool", Pool)
    monkeypatch.setitem(fake_cupy._extra, "get_default_pinned_memory_pool", Pool)
    base = demo.tiny_llama(tmp_path / "base", layers=1, hidden=32, inter=64, vocab=48)
    ft = demo.finetune(base, tmp_path / "ft", seed=1)
    args = ["merge", str(ft), "--base", str(base), "-m", "ties", "-q"]
    r = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "auto")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "auto" / "surgery.json").read_text())["device"] == "cpu"
    r = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "gpu"), "--device", "gpu"])
    assert r.exit_code == 1 and "no usable CUDA device" in r.output
    assert not (tmp_path / "gpu").exists()
