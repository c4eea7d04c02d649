"""Executors and --resume: byte-identical outputs whatever runs the per-tensor work.

A real local Ray cluster (``ray.init(num_cpus=2)``, once per module) and a real spawn process pool
run the same picklable tasks as the serial loop; outputs are compared file by file. Resume is
tested by SIGKILLing a real run mid-way and continuing it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from ops.backend import host_rng
from ops.linalg import svd_topk
from ops.lowrank import split_factors
from surgery import demo
from surgery.checkpoint import Checkpoint
from surgery.errors import SurgeryError
from surgery.manifest import Manifest
from surgery.run import RunOptions, TensorResult, call, execute, load, map_tasks, store
from surgery.targets import select
from surgery.writer import JOURNAL, Journal, OutputDir

ROOT = Path(__file__).resolve().parents[1]
N = 14  # computed tensors of the test model (2 layers × 7 linears)


# -- a small verb: rank-r SVD per weight, residual into the model, factors into an adapter --------
def _svd_task(ckpt: Checkpoint, rank: int, seed: int, marker: str | None, name: str):
    if marker is not None and name.endswith("layers.0.mlp.down_proj.weight"):
        m = Path(marker)
        if not m.exists():  # first attempt only: the worker dies as if the node were lost
            m.write_text(str(os.getpid()))
            os._exit(1)
    w = load(ckpt, name)  # (out, in) fp32
    u, s, vh = call(svd_topk, name, ckpt.shape(name), w, rank, rng=host_rng(seed, name))
    lr = split_factors(u, s, vh)
    res = w - lr.delta()
    out = store(ckpt, name, res, "F32")  # fp32 out: last-bit differences stay visible
    report = {"sigma1": float(s[0]), "residual_norm": float(np.linalg.norm(res))}
    return TensorResult(name, tensor=out, lowrank=lr, report=report)


def _bad_task(ckpt: Checkpoint, name: str, f32: bool = False):
    if name.endswith("up_proj.weight"):
        raise SurgeryError(f"{name}: refused by the test")
    return TensorResult(name, tensor=ckpt.raw(name).float() if f32 else ckpt.raw(name))


def _write_adapter(lowranks, folder: Path, manifest) -> None:
    t = {}
    for module, lr in lowranks.items():
        t[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(lr.A)
        t[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(lr.B)
    save_file(t, str(folder / "adapter_model.safetensors"))
    (folder / "modules.json").write_text(json.dumps(list(lowranks)))  # order-sensitive on purpose


def svd_job(src: Path, out: Path, rank: int = 16, marker: Path | None = None, **options):
    ckpt = Checkpoint.open(src)
    opts = RunOptions.of(dict(out=out, **options))
    names = select(ckpt, opts.targets, opts.exclude, opts.layers)
    man = Manifest("svdtest", method="svd_topk", params={"rank": rank}, seed=opts.seed)
    man.add_input("src", ckpt)
    task = functools.partial(_svd_task, ckpt, rank, opts.seed, str(marker) if marker else None)
    return opts.job(
        "svdtest",
        man,
        names,
        task,
        template=ckpt,
        out_dtypes=dict.fromkeys(names, "F32"),
        finish_adapter=_write_adapter,
        adapter_subdir="adapter",
    )


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file; surgery.json and the card without their timing figures."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        rel = str(p.relative_to(folder))
        data = p.read_bytes()
        if p.name == "surgery.json":
            d = json.loads(data)
            d.pop("summary", None)
            data = json.dumps(d, sort_keys=True).encode()
        elif p.name == "README.md":
            keep = [ln for ln in data.decode().splitlines() if "seconds" not in ln]
            keep = [ln for ln in keep if "resumed_tensors" not in ln]
            data = "\n".join(keep).encode()
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    """One real local Ray cluster for the module (2 CPUs, like CI)."""
    ray = pytest.importorskip("ray")
    import ray.cloudpickle as cp

    # Tasks defined in this test module travel by value (workers cannot import it by name).
    cp.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()
    cp.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # bf16, 2 shards, an int buffer copied through: every writer path is exercised. The MLP
    # weights (384×128) are large enough for OpenBLAS to thread the rank-16 sgemm, which rounds
    # differently from its single-threaded path (a 1-thread worker would break byte identity:
    # see executors.worker_threads).
    d = tmp_path_factory.mktemp("m")
    return demo.tiny_llama(
        d / "base", layers=2, hidden=128, inter=384, dtype="bfloat16", shards=2, int_buffer=True
    )


@pytest.fixture(scope="module")
def serial_out(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial") / "out"
    execute(svd_job(model, out, shard_size="300KB"))
    return out


# -- byte identity --------------------------------------------------------------------------------
@pytest.mark.ray
def test_ray_output_is_byte_identical_to_serial(ray_cluster, model, serial_out, tmp_path):
    out = tmp_path / "out"  # same folder name: the card names it
    execute(svd_job(model, out, shard_size="300KB", executor="ray", workers=2))
    got, want = digest(out), digest(serial_out)
    assert len(want) >= 6 and "model.safetensors.index.json" in want  # sharded + adapter + card
    assert got == want
    man = json.loads((out / "surgery.json").read_text())
    assert len(man["tensors"]) == N and man["outputs"] == {"model": True, "adapter": True}


@pytest.mark.slow
def test_process_output_is_byte_identical_to_serial(model, serial_out, tmp_path):
    out = tmp_path / "out"
    execute(svd_job(model, out, shard_size="300KB", executor="process", workers=2))
    assert digest(out) == digest(serial_out)


_ONE_THREAD = """
import sys
sys.path.insert(0, {tests!r})
from test_executors import svd_job
from surgery.run import execute
execute(svd_job({src!r}, {out!r}, shard_size="300KB"))
"""


@pytest.mark.slow
def test_the_model_is_sensitive_to_single_threaded_blas(model, serial_out, tmp_path):
    """Negative control: a 1-thread OpenBLAS run changes bytes, so the identity tests can fail."""
    from surgery.executors import thread_env, worker_threads

    assert worker_threads(8, cores=2) == 2 and worker_threads(2, cores=16) == 8
    out = tmp_path / "out"
    script = _ONE_THREAD.format(tests=str(ROOT / "tests"), src=str(model), out=str(out))
    env = {**os.environ, **thread_env(1)}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    got, want = digest(out), digest(serial_out)
    assert got["adapter/adapter_model.safetensors"] == want["adapter/adapter_model.safetensors"]
    assert got != want  # the residuals (sgemm) differ in their last bits


@pytest.mark.ray
@pytest.mark.slow
def test_ray_survives_a_lost_worker(ray_cluster, model, serial_out, tmp_path):
    """A worker process dies mid-task; Ray retries the task and the bytes are unchanged."""
    marker = tmp_path / "died"
    out = tmp_path / "out"  # same folder name: the card names it
    execute(svd_job(model, out, marker=marker, shard_size="300KB", executor="ray", workers=2))
    assert marker.exists(), "the worker never died: the test did not test anything"
    assert int(marker.read_text()) != os.getpid()  # it was a Ray worker that died
    assert digest(out) == digest(serial_out)


@pytest.mark.ray
def test_ray_task_error_is_the_users_error_and_writes_nothing(ray_cluster, model, tmp_path):
    ckpt = Checkpoint.open(model)
    out = tmp_path / "out"
    opts = RunOptions.of(dict(out=out, executor="ray", workers=2))
    job = opts.job(
        "t", Manifest("t"), select(ckpt), functools.partial(_bad_task, ckpt), template=ckpt
    )
    with pytest.raises(SurgeryError, match="refused by the test"):
        execute(job)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.ray
@pytest.mark.slow
def test_ray_long_lived_actors_path(ray_cluster, model):
    """The per-GPU actor dispatch, exercised on CPU actors: every name once, same numbers."""
    from surgery.executors import map_ray

    ckpt = Checkpoint.open(model)
    names = select(ckpt)
    task = functools.partial(_svd_task, ckpt, 16, 0, None)
    got = list(map_ray(task, names, actors=2))
    assert sorted(r.name for r in got) == sorted(names)
    ref = {n: task(n) for n in names}
    for r in got:
        assert np.array_equal(r.tensor, ref[r.name].tensor), r.name


@pytest.mark.gpu
@pytest.mark.ray
def test_ray_gpu_actors_match_a_serial_gpu_run(ray_cluster, model, tuned, tmp_path):
    if not ray_cluster.cluster_resources().get("GPU"):
        pytest.skip("the Ray cluster sees no GPU")
    a = _verb("decompose", model, tuned, tmp_path / "a" / "out", device="gpu")
    b = _verb("decompose", model, tuned, tmp_path / "b" / "out", device="gpu", executor="ray")
    assert json.loads((b / "surgery.json").read_text())["device"] == "gpu"
    assert digest(a) == digest(b)


# -- bad addresses --------------------------------------------------------------------------------
_RUN_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from click.testing import CliRunner
from cli import cli
from surgery.errors import SurgeryError
from surgery.merge import merge
for addr in {addrs!r}:
    try:
        merge([{src!r}], base={src!r}, method="ties", out={out!r}, executor="ray",
              ray_address=addr)
        print("NO ERROR for", addr)
    except SurgeryError as e:
        print("ERROR:", e)
r = CliRunner().invoke(cli, ["merge", {src!r}, "--base", {src!r}, "-m", "ties", "-o", {out!r},
                             "--executor", "ray", "--ray-address", "127.0.0.1:1"])
print("CLI", r.exit_code, r.output)
"""


@pytest.mark.ray
def test_unreachable_ray_address_is_one_clear_error_and_writes_nothing(model, tmp_path):
    """A fresh interpreter (no Ray running): each bad address fails fast, before OUT exists."""
    pytest.importorskip("ray")
    out = tmp_path / "out"
    cases = {
        "127.0.0.1:1": "cannot reach the Ray cluster at 127.0.0.1:1",
        "nohost": "is not auto or HOST:PORT",
        "ray://10.0.0.1:10001": "Ray Client",
    }
    script = _RUN_SCRIPT.format(
        tests=str(ROOT / "tests"), src=str(model), out=str(out), addrs=list(cases)
    )
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    errors = [ln for ln in r.stdout.splitlines() if ln.startswith("ERROR:")]
    assert len(errors) == 3, r.stdout
    for line, msg in zip(errors, cases.values()):
        assert msg in line
    assert "nothing was written" in errors[0]
    assert "CLI 1 Error: cannot reach the Ray cluster at 127.0.0.1:1" in r.stdout
    assert not out.exists() and not any(p.name.startswith(".out.") for p in tmp_path.iterdir())
    assert time.perf_counter() - t0 < 120


# -- resume --------------------------------------------------------------------------------
_SLOW_SCRIPT = """
import functools, sys, time
sys.path.insert(0, {tests!r})
import test_executors as t
from surgery.run import execute

job = t.svd_job({src!r}, {out!r}, shard_size="300KB", executor={executor!r}, workers=2)
job.task = functools.partial(t._slow, job.task)
execute(job)
"""


def _slow(inner, name):
    time.sleep(0.3)
    return inner(name)


def _kill_midway(model: Path, out: Path, executor: str = "serial", at: int = 5) -> int:
    """Run the job in a subprocess and SIGKILL it once ``at`` tensors are journaled."""
    script = _SLOW_SCRIPT.format(
        tests=str(ROOT / "tests"), src=str(model), out=str(out), executor=executor
    )
    p = subprocess.Popen([sys.executable, "-c", script])
    journal = out.parent / f".{out.name}.surgery-tmp" / JOURNAL
    done = 0
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if journal.exists():
            done = len(journal.read_text().splitlines()) - 1
            if done >= at:
                break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed"
    kids = _children(p.pid)
    assert kids or executor == "serial", "no pool workers found"
    p.send_signal(signal.SIGKILL)
    p.wait()
    # Pool workers notice the dead driver and exit instead of lingering as orphans.
    deadline = time.time() + 10
    while time.time() < deadline and any(_running(k) for k in kids):
        time.sleep(0.1)
    assert not any(_running(k) for k in kids), kids
    return done


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_resume_after_kill_gives_the_clean_bytes(model, serial_out, tmp_path):
    out = tmp_path / "out"
    done = _kill_midway(model, out)
    tmp = tmp_path / ".out.surgery-tmp"
    assert not out.exists() and tmp.is_dir() and 5 <= done < N
    lock = tmp_path / ".out.surgery-lock"
    assert lock.exists()  # stale: its pid is dead, the next run takes it over
    calls: list[str] = []
    job = svd_job(model, out, shard_size="300KB", resume=True)
    inner = job.task
    job.task = lambda n: (calls.append(n), inner(n))[1]
    execute(job)
    assert digest(out) == digest(serial_out)
    assert 0 < len(calls) <= N - done  # only the unfinished tensors were computed again
    man = json.loads((out / "surgery.json").read_text())
    assert man["summary"]["resumed_tensors"] >= done and len(man["tensors"]) == N
    assert not tmp.exists() and not lock.exists()
    assert not (out / JOURNAL).exists() and not (out / ".surgery-resume").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_resume_on_ray_after_a_killed_process_run(ray_cluster, model, serial_out, tmp_path):
    out = tmp_path / "out"
    _kill_midway(model, out, executor="process", at=4)  # also: its pool workers exit
    execute(svd_job(model, out, shard_size="300KB", resume=True, executor="ray", workers=2))
    assert digest(out) == digest(serial_out)


def test_resume_refuses_a_different_job_and_keeps_its_work(model, tmp_path):
    out = tmp_path / "out"
    _kill_midway(model, out, at=2)
    tmp = tmp_path / ".out.surgery-tmp"
    before = (tmp / JOURNAL).read_text()
    with pytest.raises(SurgeryError, match="used different inputs or options"):
        execute(svd_job(model, out, shard_size="300KB", resume=True, seed=7))
    assert (tmp / JOURNAL).read_text() == before and not out.exists()
    # Without --resume the leftover is discarded and the run starts over.
    execute(svd_job(model, out, shard_size="300KB", seed=7))
    assert not tmp.exists() and (out / "model.safetensors.index.json").exists()


def test_interrupted_run_keeps_finished_tensors_and_user_errors_clean_up(model, tmp_path):
    out = tmp_path / "out"
    job = svd_job(model, out, shard_size="300KB")
    inner = job.task
    n = 0

    def flaky(name):
        nonlocal n
        n += 1
        if n == 4:
            raise KeyboardInterrupt
        return inner(name)

    job.task = flaky
    with pytest.raises(KeyboardInterrupt):
        execute(job)
    tmp = tmp_path / ".out.surgery-tmp"
    assert tmp.is_dir() and not (tmp_path / ".out.surgery-lock").exists()
    j = Journal(tmp)
    j.load()
    assert len(j.entries) == 3
    # A user error in a resumed run is deterministic: the leftover is removed.
    job = svd_job(model, out, shard_size="300KB", resume=True)
    job.task = functools.partial(_bad_task, Checkpoint.open(model), f32=True)
    with pytest.raises(SurgeryError, match="refused"):
        execute(job)
    assert not tmp.exists() and not out.exists()


def test_concurrent_run_on_the_same_out_is_refused(model, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / ".out.surgery-lock"
        lock.write_text(f"{holder.pid} {__import__('socket').gethostname()}\n")
        with pytest.raises(SurgeryError, match=f"another surgery run \\(pid {holder.pid}"):
            execute(svd_job(model, out))
        assert lock.read_text().startswith(str(holder.pid))  # not stolen
    finally:
        holder.kill()
        holder.wait()
    execute(svd_job(model, out))  # the holder is gone: its stale lock is taken over
    assert out.is_dir() and not lock.exists()


def test_journal_skips_a_torn_last_line(tmp_path):
    j = Journal(tmp_path, "fp")
    j.start()
    j.record("a", {"x": 1.5, "nan": float("nan")}, None, None)
    with open(tmp_path / JOURNAL, "a") as f:
        f.write('{"name": "b", "rep')  # killed mid-write
    assert Journal.fingerprint_of(tmp_path) == "fp"
    k = Journal(tmp_path, "fp")
    k.load()
    assert list(k.entries) == ["a"]
    ((name, report, module, lowrank, wrote),) = k.restored()
    assert name == "a" and report["x"] == 1.5 and np.isnan(report["nan"]) and wrote
    assert module is None and lowrank is None


def test_output_dir_fresh_run_discards_leftover(tmp_path):
    out = tmp_path / "o"
    tmp = tmp_path / ".o.surgery-tmp"
    tmp.mkdir()
    (tmp / "junk").write_text("x")
    with OutputDir(out) as od:
        assert not (od.tmp / "junk").exists()
        od.commit()
    assert out.is_dir() and not tmp.exists()


def test_unknown_executor_is_refused_before_writing(model, tmp_path):
    with pytest.raises(SurgeryError, match="unknown executor 'dask'"):
        execute(svd_job(model, tmp_path / "o", executor="dask"))
    assert not (tmp_path / "o").exists()


# -- the real verbs through every executor -------------------------------------------------------
@pytest.fixture(scope="module")
def tuned(model):
    t1 = demo.finetune(model, model.parent / "ft1", seed=1, scale=0.02, rank=8)
    t2 = demo.finetune(model, model.parent / "ft2", seed=2, scale=0.02)
    return t1, t2


def _verb(kind: str, model: Path, tuned: tuple[Path, Path], out: Path, **options) -> Path:
    from surgery.decompose import decompose, extract
    from surgery.merge import merge

    options = dict(out=out, shard_size="300KB", **options)
    if kind == "decompose":  # full SVD (niter=0) and randomized (the default at this size)
        return decompose(str(model), method="pissa", rank=16, params=["niter=0"], **options)
    if kind == "decompose-kasa":
        return decompose(str(model), method="kasa", rank=8, **options)
    if kind == "extract":
        return extract(str(model), str(tuned[0]), rank=8, **options)
    if kind == "extract-budget":  # a read-only pass (map_tasks) before the write pass
        return extract(str(model), str(tuned[1]), budget=40, **options)
    return merge([str(t) for t in tuned], base=str(model), method="ties", params=["density=0.5"],
                 **options)  # fmt: skip


VERBS = ["decompose", "decompose-kasa", "extract", "extract-budget", "merge"]


@pytest.fixture(scope="module")
def serial_verbs(model, tuned, tmp_path_factory):
    outs = {}
    for kind in VERBS:
        outs[kind] = _verb(kind, model, tuned, tmp_path_factory.mktemp(kind) / "out")
    return outs


@pytest.mark.ray
@pytest.mark.parametrize("kind", VERBS)
def test_real_verbs_on_ray_are_byte_identical(
    ray_cluster, model, tuned, serial_verbs, kind, tmp_path
):
    out = _verb(kind, model, tuned, tmp_path / "out", executor="ray", workers=2)
    want = digest(serial_verbs[kind])
    assert any(k.endswith(".safetensors") for k in want)
    assert digest(out) == want


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["decompose", "merge"])  # a pool start-up costs seconds each
def test_real_verbs_in_a_process_pool_are_byte_identical(
    model, tuned, serial_verbs, kind, tmp_path
):
    out = _verb(kind, model, tuned, tmp_path / "out", executor="process", workers=2)
    assert digest(out) == digest(serial_verbs[kind])


@pytest.mark.parametrize("kind", VERBS)
def test_real_verbs_in_threads_are_byte_identical(model, tuned, serial_verbs, kind, tmp_path):
    """Concurrent OpenBLAS calls from two threads round as the serial run does (the model is
    large enough for threaded sgemm: see the single-thread negative control)."""
    out = _verb(kind, model, tuned, tmp_path / "out", executor="thread", workers=2)
    assert digest(out) == digest(serial_verbs[kind])


def test_thread_executor_refuses_the_gpu_and_scales_the_dry_run_estimate(model, tuned, tmp_path):
    with pytest.raises(SurgeryError, match="--executor thread runs on the CPU only"):
        list(map_tasks(str, ["a"], executor="thread", workers=2, device="gpu"))
    one = _verb("merge", model, tuned, tmp_path / "a", dry_run=True)
    three = _verb("merge", model, tuned, tmp_path / "b", dry_run=True, executor="thread",
                  workers=3)  # fmt: skip
    assert three.peak_memory == 3 * one.peak_memory > 0
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_cli_resume_after_killing_surgery_decompose(tmp_path):
    """SIGKILL `surgery decompose` mid-way, rerun it with --resume: the clean run's bytes."""
    src = demo.tiny_llama(tmp_path / "m", layers=3, hidden=256, inter=512, dtype="bfloat16")
    cmd = [sys.executable, "-m", "cli", "decompose", str(src), "-m", "pissa", "-r", "16",
           "-p", "niter=0", "-q"]  # fmt: skip
    out = tmp_path / "out"
    journal = tmp_path / ".out.surgery-tmp" / JOURNAL
    p = subprocess.Popen([*cmd, "-o", str(out)], cwd=ROOT)
    done = 0
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and done < 2:
        if journal.exists():
            done = len(journal.read_text().splitlines()) - 1
        time.sleep(0.02)
    assert p.poll() is None, "decompose finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists() and done >= 2
    r = subprocess.run([*cmd, "-o", str(out), "--resume"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from surgery.decompose import decompose

    clean = decompose(str(src), method="pissa", rank=16, params=["niter=0"],
                      out=tmp_path / "clean" / "out")  # fmt: skip
    assert digest(out) == digest(clean)
    assert json.loads((out / "surgery.json").read_text())["summary"]["resumed_tensors"] >= 2
