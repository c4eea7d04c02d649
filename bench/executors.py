"""Benchmark: the same decomposition run by the serial, process and Ray executors.

The bench writes a checkpoint of a few dozen bf16 matrices between 1024 and 4096 on a side
(default: 12 × 1024², 8 × 4096×1024, 8 × 1024×4096, 4 × 2048²), then runs one job on it with each
executor: per matrix a full SVD (``ops.linalg.svd``, fp32), the top-``rank`` factors into an
adapter and the residual into the model, written by the ordinary streaming loop (``execute``).
It reports, per executor:

* wall time, speed-up over serial, and speed-up per worker (1.0 = perfect scaling);
* the per-task compute time measured inside the task (wall and CPU seconds), and the overhead per
  task: ``(wall × slots − Σ task wall) / tasks`` (scheduling, pickling results back, idle tail);
* the bare per-task round trip of each executor (a no-op task over ``--noop`` names), and its
  start-up (pool spawn, Ray instance);
* whether the output bytes equal the serial run's (they must).

It then fits one effective flop rate to ``t = (6·m·n² + 20·n³) / rate`` (R-SVD flops, ``m ≥ n``)
over the per-task CPU seconds of the pool/Ray workers (two BLAS threads each: see
``surgery.executors.worker_threads``) and writes a scaling estimate for the 560 linear weights of
a Llama-2-70B on N nodes: an LPT schedule of the predicted task times over N × cores slots
(core-seconds on cores), the critical path (the largest SVD), and the floor set by the driver
receiving every residual (the driver alone writes the output). CPU seconds include OpenBLAS
spin-waiting when the machine is oversubscribed; the load average is printed so that a noisy run
can be recognised. Usage::

    python bench/executors.py [--workers 2] [--executors serial,process,ray] [--small]
        [--cores-per-node 32] [--driver-gbps 1.25] [--json bench/_work/executors.json]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import heapq
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from surgery.checkpoint import Checkpoint  # noqa: E402
from surgery.manifest import Manifest  # noqa: E402
from surgery.run import RunOptions, TensorResult, execute, load, map_tasks, store  # noqa: E402
from surgery.targets import select  # noqa: E402

# Llama-2-70B linear weights per layer (out, in): GQA with 8 KV heads of 128.
LLAMA70B = {
    "q_proj": (8192, 8192), "k_proj": (1024, 8192), "v_proj": (1024, 8192),
    "o_proj": (8192, 8192), "gate_proj": (28672, 8192), "up_proj": (28672, 8192),
    "down_proj": (8192, 28672),
}  # fmt: skip
LLAMA70B_LAYERS = 80


# -- the job -------------------------------------------------------------------------------------
def build_checkpoint(folder: Path, small: bool) -> Path:
    """Write the bench checkpoint (bf16 Gaussian matrices, 2 shards)."""
    import torch

    from surgery.demo import save_checkpoint

    d = 4 if small else 1
    shapes = [(1024, 1024)] * 12 + [(4096, 1024)] * 8 + [(1024, 4096)] * 8 + [(2048, 2048)] * 4
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, (o, n) in enumerate(shapes):
        w = torch.randn(o // d, n // d, generator=g) / (n // d) ** 0.5
        tensors[f"model.layers.{i}.mlp.proj.weight"] = w.to(torch.bfloat16)
    return save_checkpoint(tensors, folder, {"model_type": "bench"}, shards=2)


def svd_task(ckpt: Checkpoint, rank: int, name: str) -> TensorResult:
    """Full SVD of one weight: top-``rank`` factors out, residual back (a PiSSA-like split)."""
    from ops.linalg import svd
    from ops.lowrank import split_factors

    t0, c0 = time.perf_counter(), time.process_time()
    w = load(ckpt, name)  # (out, in) fp32
    u, s, vh = svd(w)
    lr = split_factors(u[:, :rank], s[:rank], vh[:rank])
    out = store(ckpt, name, w - lr.delta(), ckpt.dtype(name))
    report = {
        "shape": list(w.shape),
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
        "pid": os.getpid(),
    }
    return TensorResult(name, tensor=out, lowrank=lr, report=report)


def noop_task(name: str) -> TensorResult:
    return TensorResult(name)


def write_adapter(lowranks, folder: Path, manifest) -> None:
    from safetensors.numpy import save_file

    t = {}
    for m, lr in lowranks.items():
        t[f"{m}.lora_A.weight"] = np.ascontiguousarray(lr.A)
        t[f"{m}.lora_B.weight"] = np.ascontiguousarray(lr.B)
    save_file(t, str(folder / "adapter_model.safetensors"))


def run_job(src: Path, out: Path, rank: int, executor: str, workers: int) -> tuple[float, dict]:
    ckpt = Checkpoint.open(src)
    opts = RunOptions.of(dict(out=out, executor=executor, workers=workers, shard_size="200MB"))
    names = select(ckpt)
    man = Manifest("bench", method="svd", params={"rank": rank})
    man.add_input("src", ckpt)
    job = opts.job(
        "bench",
        man,
        names,
        functools.partial(svd_task, ckpt, rank),
        template=ckpt,
        finish_adapter=write_adapter,
        adapter_subdir="adapter",
    )
    t0 = time.perf_counter()
    execute(job)
    wall = time.perf_counter() - t0
    return wall, json.loads((out / "surgery.json").read_text())


def output_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.safetensors")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def noop_overhead(executor: str, workers: int, n: int) -> tuple[float, float]:
    """(start-up seconds, per-task round trip seconds) of an executor, from no-op tasks."""
    names = [f"t{i}" for i in range(n)]

    def run(k: int) -> float:
        t0 = time.perf_counter()
        for _ in map_tasks(noop_task, names[:k], executor=executor, workers=workers):
            pass
        return time.perf_counter() - t0

    one = run(1)
    many = run(n)
    return one, max(0.0, (many - one) / (n - 1))


# -- the scaling model ---------------------------------------------------------------------------
def svd_flops(m: int, n: int) -> float:
    """Flops of a thin SVD with vectors, R-SVD: ``6·m·n² + 20·n³`` (``m ≥ n``; Golub & Van Loan
    Table 8.6.1)."""
    m, n = max(m, n), min(m, n)
    return 6.0 * m * n * n + 20.0 * n**3


def fit_cost(rows: list[tuple[int, int, float]]) -> float:
    """Effective flop rate per core (flop per core-second) over (m, n, core-seconds) rows."""
    return sum(svd_flops(m, n) for m, n, _ in rows) / sum(t for _, _, t in rows)


def predict(rate: float, m: int, n: int) -> float:
    return svd_flops(m, n) / rate


def lpt(times: list[float], slots: int) -> float:
    """Makespan of largest-first list scheduling over ``slots`` identical workers."""
    heap = [0.0] * slots
    for t in sorted(times, reverse=True):
        heapq.heapreplace(heap, heap[0] + t)
    return max(heap)


def estimate_70b(
    rate: float, cores: int, driver_gbps: float, nodes: list[int]
) -> tuple[list[str], dict]:
    times, out_bytes, read_bytes = [], 0, 0
    for m, n in LLAMA70B.values():
        t = predict(rate, m, n)
        times += [t] * LLAMA70B_LAYERS
        out_bytes += LLAMA70B_LAYERS * m * n * 2  # bf16 residual shipped back to the driver
        read_bytes += LLAMA70B_LAYERS * m * n * 2
    total = sum(times)
    crit = max(times)
    floor = out_bytes / (driver_gbps * 1e9)
    lines = [
        f"70B model: {len(times)} SVD tasks, predicted work {total / 3600:.1f} "
        f"core-hours, largest task (28672×8192) {crit / 60:.1f} min",
        f"driver ingress floor: {out_bytes / 1e9:.0f} GB of residuals at {driver_gbps} GB/s "
        f"= {floor / 60:.1f} min (the driver alone writes the output)",
        f"{'nodes':>6} {'slots':>6} {'LPT compute':>12} {'+ I/O floor':>12} {'speed-up':>9}",
    ]
    rows = {}
    for nn in nodes:
        slots = nn * cores
        mk = lpt(times, slots)
        est = max(mk, floor)  # the driver writes while workers compute: the slower one bounds
        rows[nn] = {"slots": slots, "lpt_s": mk, "estimate_s": est}
        lines.append(
            f"{nn:>6} {slots:>6} {mk / 60:>10.1f} m {est / 60:>10.1f} m "
            f"{rows[nodes[0]]['estimate_s'] / est:>8.1f}×"
        )
    return lines, {"total_s": total, "critical_s": crit, "io_floor_s": floor, "nodes": rows}


# -- main ----------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--executors", default="serial,process,ray")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--small", action="store_true", help="Matrices ÷4 (a quick smoke run).")
    ap.add_argument("--noop", type=int, default=200, help="No-op tasks for the round-trip cost.")
    ap.add_argument("--cores-per-node", type=int, default=32)
    ap.add_argument("--driver-gbps", type=float, default=1.25, help="Driver NIC, GB/s (10 GbE).")
    ap.add_argument("--nodes", default="1,2,4,8,16,32")
    ap.add_argument("--json", default=None, help="Also write the figures here.")
    args = ap.parse_args()
    executors = args.executors.split(",")
    nodes = [int(x) for x in args.nodes.split(",")]

    print(f"cpus: {os.cpu_count()}  load average at start: {os.getloadavg()}")
    results: dict = {"workers": args.workers, "load_start": os.getloadavg(), "executors": {}}
    with tempfile.TemporaryDirectory(prefix="bench-exec-") as tmp:
        src = build_checkpoint(Path(tmp) / "src", args.small)
        n_tasks = len(select(Checkpoint.open(src)))
        print(f"checkpoint: {n_tasks} matrices, full fp32 SVD each, rank {args.rank} kept")
        ref_digest = None
        serial_wall = None
        for ex in executors:
            w = 1 if ex == "serial" else args.workers
            start = 0.0
            if ex == "ray":
                from surgery.executors import connect

                t0 = time.perf_counter()
                connect(None, w)  # a local instance, started once and reused below
                start = time.perf_counter() - t0
            wall, man = run_job(src, Path(tmp) / f"out-{ex}", args.rank, ex, w)
            dig = output_digest(Path(tmp) / f"out-{ex}")
            ref_digest = ref_digest or dig
            tasks = man["tensors"]
            task_wall = sum(t["wall_s"] for t in tasks)
            task_cpu = sum(t["cpu_s"] for t in tasks)
            slots = w
            serial_wall = serial_wall or wall
            up1, rt = noop_overhead(ex, w, args.noop)
            r = {
                "wall_s": wall,
                "speedup": serial_wall / wall,
                "speedup_per_worker": serial_wall / wall / w,
                "task_wall_s": task_wall,
                "task_cpu_s": task_cpu,
                "overhead_per_task_s": (wall * slots - task_wall) / len(tasks),
                "noop_startup_s": up1 + start,
                "noop_roundtrip_s": rt,
                "digest": dig,
                "identical_to_first": dig == ref_digest,
                "pids": len({t["pid"] for t in tasks}),
                "tasks": [(t["shape"][0], t["shape"][1], t["cpu_s"], t["wall_s"]) for t in tasks],
            }
            results["executors"][ex] = r
            print(
                f"{ex:>8} ×{w}: wall {wall:7.2f} s  speed-up {r['speedup']:.2f} "
                f"({r['speedup_per_worker']:.2f}/worker)  Σtask {task_wall:7.2f} s wall, "
                f"{task_cpu:7.2f} s cpu  overhead/task {r['overhead_per_task_s'] * 1e3:7.1f} ms  "
                f"no-op round trip {rt * 1e3:6.2f} ms, start-up {r['noop_startup_s']:.2f} s  "
                f"bytes {'=' if r['identical_to_first'] else '≠'} serial"
            )
    results["load_end"] = os.getloadavg()
    print(f"load average at end: {os.getloadavg()}")

    # Per-task costs in core-seconds, from the pool/Ray workers.
    rows = []
    for ex in ("process", "ray"):
        if ex in results["executors"]:
            rows += [(m, n, cpu) for m, n, cpu, _ in results["executors"][ex]["tasks"]]
    if not rows and "serial" in results["executors"]:
        rows = [(m, n, cpu) for m, n, cpu, _ in results["executors"]["serial"]["tasks"]]
    if args.small:
        print("(--small: per-task costs too small to extrapolate; scaling estimate skipped)")
    elif rows:
        rate = fit_cost(rows)
        print(
            f"\nfull-SVD cost model: t = (6·m·n² + 20·n³) / rate, rate = {rate / 1e9:.2f} "
            "GFLOP per core-second (fitted)"
        )
        for shape in sorted({(m, n) for m, n, _ in rows}):
            got = [c for m, n, c in rows if (m, n) == shape]
            print(
                f"  {shape[0]}×{shape[1]}: measured {np.median(got):.2f} core-s (median of "
                f"{len(got)}, {svd_flops(*shape) / np.median(got) / 1e9:.2f} GFLOP/s), "
                f"model {predict(rate, *shape):.2f} s"
            )
        lines, est = estimate_70b(rate, args.cores_per_node, args.driver_gbps, nodes)
        print(f"\nscaling estimate (1 task per core, {args.cores_per_node} cores per node):")
        print("\n".join("  " + ln for ln in lines))
        results["fit"] = {"flop_per_core_s": rate}
        results["estimate_70b"] = est
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
