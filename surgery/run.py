"""THE streaming loop: plan → preflight (headers) → per tensor: load → compute fp32 → cast → write.

Every writing verb builds a :class:`Job` and calls :func:`execute`. The per-tensor work is a
picklable callable ``task(name) -> TensorResult`` (a pure function of one tensor name: it opens its
inputs itself, so the same task runs serially, in a process pool or on Ray). The driver alone writes
the shards, the adapter and the manifest; :class:`~surgery.writer.ShardWriter` places each result at
its pre-computed offset, so the output bytes do not depend on the executor or completion order.

Memory bound (serial executor): at most one tensor per input checkpoint is loaded at a time, plus
the fp32 working copies and outputs of the current tensor — roughly
``(inputs + 3) × 4 × numel(largest computed tensor)`` bytes on top of the interpreter, whatever the
checkpoint size; untouched tensors are copied through in 64 MiB chunks. Adapter factors of the whole
run are kept until the end (they are small: ``r·(out+in)`` floats per module). The ``thread`` and
``process`` executors multiply the per-tensor term by ``workers`` (``--dry-run`` says so).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ops.backend import OpError, release_memory, select_device, to_xp

from .checkpoint import COMPUTABLE_DTYPES, NP_DTYPES, Checkpoint, st_dtype
from .errors import SurgeryError
from .manifest import Manifest
from .targets import module_of
from .writer import (
    DEFAULT_SHARD_SIZE,
    Entry,
    OutputDir,
    ShardWriter,
    group_shards,
)

if TYPE_CHECKING:
    from ops.lowrank import LowRank

__all__ = [
    "Job", "TensorResult", "Plan", "execute", "resolve_device", "load", "store", "narrow",
    "widen", "call",
    "map_tasks", "Progress", "out_dtype_name", "RunOptions",
]  # fmt: skip

log = logging.getLogger("surgery")
Progress = Callable[[int, int, str], None]


@dataclass
class TensorResult:
    """What one task returns for one tensor name.

    Attributes:
        name: the tensor name.
        tensor: the full-model output in stored layout and output dtype, a numpy array (BF16 as
            uint16 bits) or a torch tensor (``None``: no model output).
        lowrank: adapter factors (numpy float32, PEFT orientation) for ``module_of(name)``.
        report: per-tensor figures for the manifest (errors, energies, ranks…).
    """

    name: str
    tensor: Any = None  # numpy array (BF16 as uint16 bits) or torch tensor
    lowrank: LowRank | None = None
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """What a run will do; printed by ``--dry-run``."""

    verb: str
    out: Path
    computed: int
    copied: int
    peak_memory: int
    output_bytes: int
    shards: int
    lines: list[str] = field(default_factory=list)

    def render(self) -> str:
        gib = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"  # noqa: E731
        head = [
            f"plan: surgery {self.verb} → {self.out}",
            f"  tensors computed: {self.computed}",
            f"  tensors copied through: {self.copied}",
            f"  output: {gib(self.output_bytes)} in {self.shards} file(s)",
            f"  peak memory (estimate): {gib(self.peak_memory)}",
        ]
        return "\n".join(head + [f"  {x}" for x in self.lines])


@dataclass
class Job:
    """Everything :func:`execute` needs. Verbs fill it in and stay ~20 lines.

    Attributes:
        template: the checkpoint whose layout a full-model output follows (untouched tensors are
            copied from it byte for byte, with its config/tokenizer files). ``None``: no model.
        compute: tensor names the task computes (a subset of ``template`` for model outputs).
        task: ``name -> TensorResult``; picklable for the process/ray executors.
        out_dtypes: output safetensors dtype per computed tensor (default: the stored dtype).
        finish_adapter: ``(lowranks, folder, manifest) -> None`` writes the adapter when set.
        adapter_subdir: ``""`` (adapter is the whole output) or ``"adapter"``.
        mem_per_tensor: peak bytes for computing one tensor (for the dry-run estimate).
        resume: continue the interrupted run of the same job found beside ``out`` (its journal
            lists the finished tensors; see :class:`~surgery.writer.Journal`).
    """

    verb: str
    out: Path
    manifest: Manifest
    compute: list[str]
    task: Callable[[str], TensorResult]
    template: Checkpoint | None = None
    out_dtypes: dict[str, str] = field(default_factory=dict)
    finish_adapter: Callable[[dict[str, LowRank], Path, Manifest], None] | None = None
    adapter_subdir: str = ""
    force: bool = False
    dry_run: bool = False
    shard_size: int = DEFAULT_SHARD_SIZE
    executor: str = "serial"
    workers: int = 1
    ray_address: str | None = None
    push: str | None = None
    resume: bool = False
    mem_per_tensor: Callable[[str], int] | None = None
    plan_lines: list[str] = field(default_factory=list)
    extra_files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class RunOptions:
    """The options every writing verb shares (the CLI's common flags, the API's keywords).

    Verbs accept them as keyword arguments: ``surgery.merge(models, base=..., method="ties",
    out="merged", force=True, seed=1)``.
    """

    out: str | Path | None = None
    force: bool = False
    dry_run: bool = False
    targets: str | list[str] | None = None
    exclude: str | list[str] | None = None
    layers: str | list[int] | None = None
    device: str = "auto"
    dtype: str | None = None
    seed: int = 0
    shard_size: str | int = DEFAULT_SHARD_SIZE
    executor: str = "serial"
    workers: int = 1
    ray_address: str | None = None
    push: str | None = None
    resume: bool = False
    progress: Progress | None = None

    @classmethod
    def of(cls, options: dict[str, Any]) -> RunOptions:
        """Build from keyword arguments, rejecting unknown names with the valid list."""
        import dataclasses

        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(options) - known)
        if bad:
            raise SurgeryError(
                f"unknown option(s) {', '.join(bad)}; valid: {', '.join(sorted(known))}"
            )
        opts = cls(**options)
        if opts.out is None and not opts.dry_run:
            raise SurgeryError("an output folder is required (-o OUT)")
        return opts

    def job(self, verb: str, manifest: Manifest, compute: list[str], task, **kw: Any) -> Job:
        """A :class:`Job` carrying these options."""
        from .writer import parse_size

        return Job(
            verb=verb,
            out=Path(self.out or "."),
            manifest=manifest,
            compute=compute,
            task=task,
            force=self.force,
            dry_run=self.dry_run,
            shard_size=parse_size(self.shard_size),
            executor=self.executor,
            workers=self.workers,
            ray_address=self.ray_address,
            push=self.push,
            resume=self.resume,
            **kw,
        )


def resolve_device(device: str) -> str:
    """Resolve ``auto|cpu|gpu`` to ``cpu|gpu`` (``SURGERY_DEVICE`` overrides ``auto``)."""
    import os

    if device == "auto":
        device = os.environ.get("SURGERY_DEVICE", "auto")
    try:
        chosen = select_device(device)
    except OpError as e:
        raise SurgeryError(str(e)) from None
    log.info("device: %s", chosen)
    return chosen


def out_dtype_name(dtype: str | None, stored: str) -> str:
    """The safetensors dtype a computed tensor is written in (``--dtype`` or the stored one)."""
    if dtype is None or stored not in COMPUTABLE_DTYPES:
        return stored
    return st_dtype(dtype)


def load(ckpt: Checkpoint, name: str, device: str = "cpu", precision: str = "float32"):
    """Load one tensor as an fp32 (or fp64) xp array in ``(out, in)`` orientation.

    Raises:
        SurgeryError: when the tensor is not a float dtype surgery computes on.
    """
    dt = ckpt.dtype(name)
    if dt not in COMPUTABLE_DTYPES:
        raise SurgeryError(
            f"{name} {list(ckpt.shape(name))} is {dt}; surgery computes only on F16/BF16/F32/F64 "
            "weights; exclude it with --exclude or dequantize first"
        )
    if device == "gpu":
        # File → pinned staging → device in the stored dtype (bf16: half of fp32's bytes), then
        # widened (and a Conv1D weight transposed) on the device: one host copy, overlapped.
        from ops.cuda import upload_from

        info = ckpt.info(name)
        with ckpt.byte_reader(name) as read:
            x = upload_from(read, info.shape, NP_DTYPES[dt], precision, bf16=dt == "BF16")
        return x.T.copy() if ckpt.is_conv1d(name) else x
    # numpy all the way: no torch import (about 1.5 s) for the numpy-only verbs.
    return widen(ckpt.array(name), dt, device, precision)


_NP_FLOAT = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def narrow(arr, dtype: str):
    """fp32/fp64 xp array → a host numpy array in the output dtype ``dtype`` (a safetensors name).

    BF16 comes back as uint16 bit patterns, rounded to nearest even with torch's bits. cupy input
    is rounded on the device, so only the narrow bytes cross PCIe.
    """
    if type(arr).__module__.split(".")[0] == "cupy" and dtype in _NP_FLOAT:
        from ops.cuda import download

        return download(arr, _NP_FLOAT[dtype])
    from ops.backend import f32_to_bf16, to_host

    a = to_host(arr)
    if dtype == "BF16":
        return f32_to_bf16(a)
    return a.astype(NP_DTYPES[dtype], copy=False)


def widen(t, dtype: str, device: str = "cpu", precision: str = "float32"):
    """Inverse of :func:`narrow` (exact): a host array or torch tensor in ``dtype`` → float xp."""
    if type(t).__module__.split(".")[0] == "torch":
        return to_xp(t, device, precision)
    from ops.backend import bf16_to_f32

    if device == "gpu":
        from ops.cuda import upload  # stored bytes over PCIe, widened on the device

        return upload(t, precision, bf16=dtype == "BF16")
    a = bf16_to_f32(t) if dtype == "BF16" else t
    return a.astype(precision, copy=False)


def store(ckpt: Checkpoint, name: str, arr, dtype: str):
    """xp array ``(out, in)`` → host array in the stored layout, cast to ``dtype`` (ST name).

    Always a numpy array (BF16 as uint16 bits), for either device; :class:`ShardWriter` takes it.
    """
    return ckpt.to_stored(name, narrow(arr, dtype))


def call(fn: Callable[..., Any], name: str, shape: Iterable[int], *args: Any, **kwargs: Any) -> Any:
    """Run a kernel; an ``OpError`` becomes a ``SurgeryError`` naming the tensor and its shape."""
    try:
        return fn(*args, **kwargs)
    except OpError as e:
        raise SurgeryError(f"{name} {list(shape)}: {e}") from None


def map_tasks(
    task: Callable[[str], TensorResult],
    names: list[str],
    *,
    executor: str = "serial",
    workers: int = 1,
    ray_address: str | None = None,
    cost: Callable[[str], int] | None = None,
    device: str = "cpu",
) -> Iterator[TensorResult]:
    """Yield ``task(name)`` for every name (completion order for parallel executors).

    ``serial`` runs in this process in plan order; ``thread`` runs ``workers`` tasks at once in
    this process (CPU only; for memory-bound verbs such as merges); ``process`` uses a local pool
    of ``workers``
    (BLAS threads split between them, at least 2 each); ``ray`` (extra ``ray``) fans out over a
    cluster, with one actor per GPU when ``device`` is ``gpu`` (see :mod:`surgery.executors`).
    Parallel executors schedule the largest tensors first and bound the tasks in flight to
    ``2 × workers``.
    """
    if executor == "serial":
        for n in names:
            yield task(n)
            release_memory()
        return
    order = sorted(names, key=lambda n: -(cost(n) if cost else 0))
    if executor == "thread":
        yield from _map_threads(task, order, max(1, workers), device)
    elif executor == "process":
        yield from _map_process(task, order, max(1, workers))
    elif executor == "ray":
        from .executors import map_ray

        yield from map_ray(task, order, workers=workers, address=ray_address, device=device)
    else:
        raise SurgeryError(f"unknown executor {executor!r}; choices: serial, thread, process, ray")


def _map_pool(pool, task, order: list[str], workers: int) -> Iterator[TensorResult]:
    """Feed ``order`` to an executor pool, at most ``2 × workers`` queued; completion order.

    A task's exception is raised here (and ends the run); the pool is shut down either way, with
    the queued tasks cancelled.
    """
    from concurrent.futures import FIRST_COMPLETED, wait

    pending: set = set()
    try:
        it = iter(order)
        for n in it:
            pending.add(pool.submit(task, n))
            if len(pending) >= 2 * workers:
                break
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                res = f.result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.add(pool.submit(task, nxt))
                yield res
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _map_threads(task, order: list[str], workers: int, device: str) -> Iterator[TensorResult]:
    """``workers`` tasks at once in this process's threads (numpy and file reads drop the GIL).

    Pays off for the memory-bound verbs: TIES merges ran 1.4-1.8× faster with 2 threads on 2
    cores (bench/merge.py); BLAS-bound verbs (SVDs) already use every core and get slower. Peak
    memory is up to ``workers`` × the serial run's per-tensor peak (the largest tensors start
    first, side by side). Results come in completion order, and the writer places them at fixed
    offsets, so the bytes are the serial run's.
    """
    from concurrent.futures import ThreadPoolExecutor

    if device == "gpu":
        raise SurgeryError(
            "--executor thread runs on the CPU only (one CUDA context per process): use serial, "
            "or ray with one actor per GPU"
        )
    pool = ThreadPoolExecutor(workers, thread_name_prefix="surgery")
    yield from _map_pool(pool, task, order, workers)


def _map_process(task, order: list[str], workers: int) -> Iterator[TensorResult]:
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from .executors import Interrupted, init_pool_worker, scoped_env, thread_env, worker_threads

    # spawn: torch and BLAS thread pools are not fork-safe. Each worker gets its share of the
    # cores for BLAS (at least 2: see worker_threads), so N workers do not run N × cores threads.
    threads = worker_threads(workers)
    # Workers spawn on submit: the thread environment is kept for the pool's life.
    with scoped_env(thread_env(threads)):
        pool = ProcessPoolExecutor(
            workers,
            mp_context=mp.get_context("spawn"),
            initializer=init_pool_worker,
            initargs=(threads, os.getpid()),
        )
        try:
            yield from _map_pool(pool, task, order, workers)
        except BrokenProcessPool:
            raise Interrupted(
                "a worker process died (out of memory?); finished tensors are kept: "
                "rerun the same command with --resume (and fewer --workers)"
            ) from None


def _entries(job: Job) -> list[Entry]:
    """Every tensor of the full-model output: the template's names and shapes, output dtypes."""
    t = job.template
    return [Entry(n, job.out_dtypes.get(n, t.dtype(n)), t.info(n).shape) for n in t.names()]


def _plan(job: Job) -> Plan:
    t = job.template
    compute = set(job.compute)
    out_bytes = 0
    n_files = 0
    if t is not None:
        entries = _entries(job)
        out_bytes = sum(e.nbytes for e in entries)
        n_files = len(group_shards(entries, job.shard_size))  # the writer's own layout rule
    peak = 0
    for n in job.compute:
        if job.mem_per_tensor is not None:
            peak = max(peak, job.mem_per_tensor(n))
        elif t is not None and n in t:
            peak = max(peak, 3 * 4 * t.info(n).numel)
    if job.executor in ("thread", "process"):
        peak *= max(1, job.workers)  # that many tensors in flight on this machine
    copied = len([n for n in t.names() if n not in compute]) if t is not None else 0
    return Plan(
        job.verb, job.out, len(job.compute), copied, peak, out_bytes, n_files, list(job.plan_lines)
    )


def execute(job: Job, progress: Progress | None = None) -> Path | Plan:
    """Run a job: write the output folder atomically (or return the plan for ``--dry-run``).

    Returns:
        The output path, or a :class:`Plan` when ``job.dry_run``.

    Raises:
        SurgeryError: user-facing failures; nothing is left at ``job.out``.
    """
    if job.dry_run:
        return _plan(job)
    from .executors import EXECUTORS, connect

    if job.executor not in EXECUTORS:
        raise SurgeryError(f"unknown executor {job.executor!r}; choices: {', '.join(EXECUTORS)}")
    if job.executor == "ray":
        connect(job.ray_address, job.workers)  # an unreachable cluster fails before OUT exists
    t0 = time.perf_counter()
    with OutputDir(job.out, job.force, resume=job.resume, fingerprint=_fingerprint(job)) as od:
        writer = None
        t = job.template
        journal = od.journal
        if t is not None:
            writer = ShardWriter(
                od.tmp, _entries(job), job.shard_size, resume=bool(journal.entries)
            )
            job.manifest.outputs["model"] = True
        lowranks: dict[str, LowRank] = {}
        # --resume: what the interrupted run finished is in the shards and the journal already.
        for name, report, module, lowrank, wrote in journal.restored():
            if writer is not None and wrote:
                writer.mark_written(name)
            if lowrank is not None and module is not None:
                lowranks[module] = lowrank
            job.manifest.tensors.append({"name": name, **report})
        if journal.entries:
            job.manifest.summary["resumed_tensors"] = len(journal.entries)
        todo = [n for n in job.compute if n not in journal.entries]
        total = len(job.compute)
        cost = (lambda n: t.info(n).numel) if t is not None else None
        done = total - len(todo)
        for res in map_tasks(
            job.task,
            todo,
            executor=job.executor,
            workers=job.workers,
            ray_address=job.ray_address,
            cost=cost,
            device=job.manifest.device,
        ):
            if res.tensor is not None:
                if writer is None:
                    raise SurgeryError(
                        f"internal: {res.name} produced a tensor but {job.verb} has no model output"
                    )
                writer.write(res.name, res.tensor)
            module = module_of(res.name) if res.lowrank is not None else None
            if module is not None:
                lowranks[module] = res.lowrank
            job.manifest.tensors.append({"name": res.name, **res.report})
            # Only after the bytes landed: a kill before this line recomputes the tensor.
            journal.record(res.name, res.report, module, res.lowrank, res.tensor is not None)
            done += 1
            if progress is not None:
                progress(done, total, res.name)
        release_memory(pinned=True)  # the device's download buffers (a no-op on the CPU)
        # Completion order varies with the executor; hand the adapter writer a fixed order.
        lowranks = dict(sorted(lowranks.items()))
        if writer is not None:
            computed = set(job.compute)
            for n in t.names():
                if n not in computed:
                    writer.write_bytes(n, t.read_bytes(n))  # byte-identical copy-through
            writer.close()
            for f in t.aux_files():
                shutil.copy2(f, od.tmp / f.name)
        if job.finish_adapter is not None:
            folder = od.tmp / job.adapter_subdir if job.adapter_subdir else od.tmp
            folder.mkdir(parents=True, exist_ok=True)
            job.finish_adapter(lowranks, folder, job.manifest)
            job.manifest.outputs["adapter"] = True
        for rel, data in job.extra_files.items():
            (od.tmp / rel).write_bytes(data)
        job.manifest.summary.setdefault("seconds", round(time.perf_counter() - t0, 3))
        job.manifest.write(od.tmp)
        _write_card(od.tmp, job.manifest)
        out = od.commit()
    if job.push:
        from .hub import push

        push(out, job.push, commit_message=job.manifest.describe())
    return out


def _fingerprint(job: Job) -> str:
    """Digest of everything that determines the output bytes (``--resume`` compares it).

    The manifest without its results (verb, method, parameters, seed, device, inputs by header
    digest, library versions) plus the plan (computed names, dtypes, shard size, template
    layout). The executor and worker count are left out: they do not change the bytes.
    """
    import hashlib
    import json

    m = job.manifest.to_dict()
    for k in ("tensors", "summary", "outputs"):
        m.pop(k, None)
    plan = {
        "verb": job.verb,
        "compute": list(job.compute),
        "out_dtypes": sorted(job.out_dtypes.items()),
        "shard_size": job.shard_size,
        "template": job.template.header_digest() if job.template is not None else None,
        "adapter_subdir": job.adapter_subdir,
        "extra_files": sorted(job.extra_files),
    }
    raw = json.dumps([m, plan], sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()


def _write_card(folder: Path, manifest: Manifest) -> None:
    from .card import write_card

    write_card(folder, manifest.to_dict())
