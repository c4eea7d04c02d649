"""Benchmark: LoRA extraction and PiSSA init, surgery vs mergekit and PEFT, on one bf16 Llama pair.

(a) ``surgery extract BASE TUNED -r R`` vs ``mergekit-extract-lora --max-rank R`` (mergekit 0.1.5
    from ``bench/_work/venv-mergekit``; embeddings/norms excluded with ``-e`` so both write only
    the linear LoRA): wall time of each CLI (fresh process, imports included) and the relative
    Frobenius error ``√(Σ‖δ − ΔW‖²) / √(Σ‖δ‖²)`` over all linear modules, next to the optimum
    (Eckart–Young from a float64 SVD of every task vector).
(b) PiSSA init of every linear module: ``surgery decompose BASE -m pissa -r R`` vs PEFT
    ``init_lora_weights="pissa"`` and ``"pissa_niter_4"`` (``get_peft_model`` on the bf16 model):
    wall time (PEFT: model load, init, and save of residual + adapter, with the init alone
    reported too), the principal error ``√(Σ‖W − s·BA‖²) / ‖W‖`` against its optimum, and the
    reconstruction error of ``W_res(bf16) + s·BA`` against ``W``.

Every tool runs in its own subprocess limited to ``--threads`` BLAS/torch threads (default 2, the CI
machine's size). On a machine shared with other jobs, multi-threaded OpenBLAS degrades badly (a
2048×42 QR measured 160 ms with 2 threads against 3-15 ms with 1 under a load average of 10), so
``--threads 1`` gives the comparable figures there.
The pair: ``surgery.demo.tiny_llama`` (hidden 768, intermediate 2048, 8 layers, vocab 32000:
≈107M parameters, bf16) and a fine-tune whose linear task vectors are a rank-64 component plus a
dense floor (a decaying-then-flat spectrum, like real fine-tunes); embeddings and norms unchanged.

Usage::

    python bench/decompose.py [--rank 32] [--threads 1|2] [--work bench/_work/decompose]

Measured 2026-11-23 on the idle 2-core dev box (load average 0.8-1.6), 99.5M parameters, r = 32,
``--threads 2`` (wall seconds of each CLI, start-up included; ``surgery`` never imports torch on
these paths since the numpy data path, which took 1.3-1.5 s of each run before):

=====================================  =======  =================================================
run                                    seconds  error (relative Frobenius)
=====================================  =======  =================================================
surgery extract -r 32                    2.11   0.63086 (optimum 0.62785: +0.48 %)
mergekit-extract-lora --max-rank 32     14.01   0.62785 (exact SVD)            → surgery 6.6×
surgery decompose -m pissa -r 32         2.42   principal 0.92033 (optimum 0.91720), recon 1.5e-3
PEFT pissa_niter_4 (load+init+save)      9.05   principal 0.92220, recon 1.8e-3 (init alone 0.96 s)
                                                                               → surgery 3.7×
PEFT pissa (full SVD)                   14.29   principal 0.91720, recon 1.8e-3 (init 6.66 s)
=====================================  =======  =================================================

Before the numpy data path (same box, same day): extract 4.66 s (2.78×), PiSSA 4.66 s (1.65×).
On a box shared with other jobs multi-threaded OpenBLAS stalls (every time grew 3-30× at load
average 7-11); use ``--threads 1`` there. ``recon`` is the bf16 rounding of the stored residual.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MERGEKIT = ROOT / "bench" / "_work" / "venv-mergekit" / "bin" / "mergekit-extract-lora"
THREADS = os.environ.get("BENCH_THREADS", "2")
ENV: dict[str, str] = {}


def set_threads(n: int) -> None:
    """BLAS/OpenMP/torch threads of every tool's subprocess (BENCH_THREADS reaches PEFT's too)."""
    global THREADS, ENV
    THREADS = str(n)
    ENV = dict(os.environ, OMP_NUM_THREADS=THREADS, OPENBLAS_NUM_THREADS=THREADS,
               MKL_NUM_THREADS=THREADS, BENCH_THREADS=THREADS, HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")  # fmt: skip


set_threads(int(THREADS))


def linear_names(ckpt) -> list[str]:
    return [n for n in ckpt.names() if n.endswith("_proj.weight")]


def build_pair(work: Path, a: argparse.Namespace) -> tuple[Path, Path]:
    """Base (demo Llama, bf16) and a fine-tune: rank-64 task vectors plus a dense floor."""
    import torch
    from safetensors.torch import load_file

    from surgery import demo

    base, tuned = work / "base", work / "tuned"
    if (tuned / "model.safetensors").is_file():
        return base, tuned
    demo.tiny_llama(base, layers=a.layers, hidden=a.hidden, inter=a.inter, vocab=a.vocab,
                    heads=12, kv_heads=4, dtype="bfloat16", seed=0)  # fmt: skip
    t = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    for k in sorted(t):
        if not k.endswith("_proj.weight"):
            continue
        w = t[k].float()
        o, i = w.shape
        low = torch.randn(o, 64, generator=g) @ torch.randn(64, i, generator=g) / 8.0
        d = low + 0.3 * torch.randn(o, i, generator=g)
        t[k] = (w + 0.02 * w.std() * d / d.std()).to(torch.bfloat16)
    demo.save_checkpoint(t, tuned, json.loads((base / "config.json").read_text()))
    return base, tuned


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0 or "Traceback" in r.stderr and "OfflineModeIsEnabled" not in r.stderr:
        print(r.stdout[-2000:], r.stderr[-4000:], file=sys.stderr)
        if r.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}")
    return dt


def spectra(base: Path, tuned: Path, work: Path) -> dict[str, dict[str, np.ndarray]]:
    """float64 singular values of every W and δ (cached): the Eckart–Young optima."""
    from surgery.checkpoint import Checkpoint

    cache = work / "spectra.npz"
    if cache.is_file():
        z = np.load(cache)
        out: dict[str, dict[str, np.ndarray]] = {"w": {}, "d": {}}
        for k in z.files:
            kind, name = k.split(":", 1)
            out[kind][name] = z[k]
        return out
    b, t = Checkpoint.open(base), Checkpoint.open(tuned)
    out = {"w": {}, "d": {}}
    for n in linear_names(b):
        w0 = b.get(n).double().numpy()
        w1 = t.get(n).double().numpy()
        out["w"][n] = np.linalg.svd(w0, compute_uv=False)
        out["d"][n] = np.linalg.svd(w1 - w0, compute_uv=False)
    np.savez(cache, **{f"{k}:{n}": v for k in out for n, v in out[k].items()})
    return out


def adapter_error(adapter: Path, base: Path, tuned: Path) -> float:
    """``√(Σ‖δ − ΔW‖²_F) / √(Σ‖δ‖²_F)`` over the linear modules, ΔW read with PEFT's rules."""
    from surgery.adapter import Adapter
    from surgery.checkpoint import Checkpoint

    ad = Adapter.load(adapter)
    b, t = Checkpoint.open(base), Checkpoint.open(tuned)
    err2 = tot2 = 0.0
    for n in linear_names(b):
        d = t.get(n).double() - b.get(n).double()
        dw = ad.delta(n[: -len(".weight")]).double()
        err2 += float(((d - dw) ** 2).sum())
        tot2 += float((d**2).sum())
    return math.sqrt(err2 / tot2)


def pissa_errors(residual: dict, lowrank: dict, base: Path) -> tuple[float, float]:
    """(principal ``√Σ‖W − sBA‖² / ‖W‖``, reconstruction ``√Σ‖W_res + sBA − W‖² / ‖W‖``)."""
    from surgery.checkpoint import Checkpoint

    b = Checkpoint.open(base)
    p2 = r2 = tot2 = 0.0
    for n in linear_names(b):
        w = b.get(n).double()
        dw = lowrank[n].double()
        p2 += float(((w - dw) ** 2).sum())
        r2 += float(((residual[n].double() + dw - w) ** 2).sum())
        tot2 += float((w**2).sum())
    return math.sqrt(p2 / tot2), math.sqrt(r2 / tot2)


def ours_pissa(out: Path, base: Path) -> tuple[float, float]:
    from surgery.adapter import Adapter
    from surgery.checkpoint import Checkpoint

    ad = Adapter.load(out / "adapter")
    res = Checkpoint.open(out)
    names = linear_names(res)
    return pissa_errors({n: res.get(n) for n in names},
                        {n: ad.delta(n[: -len(".weight")]) for n in names}, base)  # fmt: skip


def peft_pissa(base: str, init: str, rank: int, out: str) -> None:
    """Subprocess body: PEFT PiSSA init of all linears; prints timings and errors as JSON."""
    import torch

    torch.set_num_threads(int(THREADS))
    t0 = time.perf_counter()
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    t1 = time.perf_counter()
    cfg = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear",
                          init_lora_weights=init)  # fmt: skip
    pm = peft.get_peft_model(model, cfg)
    t2 = time.perf_counter()
    residual, lowrank = {}, {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            key = name.replace("base_model.model.", "", 1) + ".weight"
            s = mod.scaling["default"]
            with torch.no_grad():
                ba = mod.lora_B["default"].weight.float() @ mod.lora_A["default"].weight.float()
            lowrank[key] = ba * s
            residual[key] = mod.base_layer.weight.detach().clone()
    # Save what `surgery decompose` writes: the adapter and the residual model.
    t3 = time.perf_counter()
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(out + "/adapter")
    pm.unload().save_pretrained(out, safe_serialization=True)
    t4 = time.perf_counter()
    p, r = pissa_errors(residual, lowrank, Path(base))
    print(json.dumps({"load_s": t1 - t0, "init_s": t2 - t1, "save_s": t4 - t3,
                      "total_s": (t2 - t0) + (t4 - t3), "principal": p, "recon": r}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "_work" / "decompose")
    ap.add_argument("--skip", default="", help="comma list of: mergekit, pissa, niter4")
    ap.add_argument("--threads", type=int, default=2, help="BLAS/torch threads per tool (2)")
    ap.add_argument("--peft-pissa", nargs=4, metavar=("BASE", "INIT", "RANK", "OUT"),
                    help=argparse.SUPPRESS)  # fmt: skip
    a = ap.parse_args()
    if a.peft_pissa:
        b, init, r, o = a.peft_pissa
        return peft_pissa(b, init, int(r), o)
    set_threads(a.threads)
    skip = set(filter(None, a.skip.split(",")))
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    base, tuned = build_pair(work, a)
    from surgery.checkpoint import Checkpoint

    ck = Checkpoint.open(base)
    n_params = sum(ck.info(n).numel for n in ck.names())
    spec = spectra(base, tuned, work)
    r = a.rank
    opt_d = math.sqrt(sum((s[r:] ** 2).sum() for s in spec["d"].values())
                      / sum((s**2).sum() for s in spec["d"].values()))  # fmt: skip
    opt_w = math.sqrt(sum((s[r:] ** 2).sum() for s in spec["w"].values())
                      / sum((s**2).sum() for s in spec["w"].values()))  # fmt: skip
    res: dict = {"model_params": n_params, "rank": r, "threads": int(THREADS),
                 "load_avg_start": os.getloadavg()[0]}  # fmt: skip
    surgery_cli = [sys.executable, "-c", "import cli; cli.main()"]

    # (a) extraction
    out = work / "extract_surgery"
    t = timed(surgery_cli + ["extract", str(base), str(tuned), "-r", str(r), "-o", str(out),
                             "--force", "-q"])  # fmt: skip
    ours = {"seconds": t, "rel_error": adapter_error(out, base, tuned)}
    res["extract"] = {"optimal_rel_error": opt_d, "surgery": ours}
    if "mergekit" not in skip and MERGEKIT.is_file():
        out = work / "extract_mergekit"
        shutil.rmtree(out, ignore_errors=True)
        t = timed([str(MERGEKIT), "--model", str(tuned), "--base-model", str(base),
                   "--out-path", str(out), "--max-rank", str(r),
                   "-e", ".*(embed_tokens|lm_head|norm).*"])  # fmt: skip
        res["extract"]["mergekit"] = {"seconds": t, "rel_error": adapter_error(out, base, tuned)}
    print(json.dumps(res["extract"], indent=1), flush=True)

    # (b) PiSSA init
    out = work / "pissa_surgery"
    t = timed(surgery_cli + ["decompose", str(base), "-m", "pissa", "-r", str(r), "-o", str(out),
                             "--force", "-q"])  # fmt: skip
    p, rec = ours_pissa(out, base)
    res["pissa"] = {"optimal_principal": opt_w,
                    "surgery": {"seconds": t, "principal": p, "recon": rec}}  # fmt: skip
    for init, key in (("pissa_niter_4", "niter4"), ("pissa", "pissa")):
        if key in skip:
            continue
        out = work / f"pissa_peft_{key}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--peft-pissa", str(base), init, str(r),
                               str(out)], env=ENV, capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["seconds"] = time.perf_counter() - t0
        res["pissa"][f"peft_{init}"] = row
    res["load_avg_end"] = os.getloadavg()[0]
    (work / "results.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
