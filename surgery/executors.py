"""Executors beyond one process: a local process pool and a Ray cluster.

The loop's unit of work is a picklable ``task(name) -> TensorResult`` (a ``functools.partial`` of a
top-level function whose :class:`~surgery.checkpoint.Checkpoint` arguments re-open their files by
path on the worker). The executors here only decide *where* each call runs; the driver alone
writes shards, adapter and manifest, at offsets fixed in advance, so the output bytes do not depend
on the executor or on the completion order.

Ray (the optional extra ``ray``):

- no address: a local instance with ``--workers`` CPUs (all cores when ``--workers`` is 1);
  ``auto`` or ``HOST:PORT``: connect to a running cluster (``ray start --head``) and check that it
  answers *before* any output is created; ``ray://`` (Ray Client) is refused because every
  result would stream through the client at ~0.16 GB/s.
- the task is ``ray.put`` once and passed by reference (not re-serialised per call); workers read
  their tensors from the checkpoint paths (a shared filesystem or the Hub cache on every node) and
  return only results.
- largest tensors first (LPT), at most ``2 × slots`` tasks in flight (``ray.wait``), results fetched
  one at a time so the object store never holds more than the in-flight results.
- failures: a lost worker or node is retried by Ray (``max_retries``), as are ``OSError`` and
  ``MemoryError`` raised by a task; errors in the inputs (``SurgeryError``) are not retried. When
  retries run out the run stops with :class:`Interrupted`: finished tensors stay in the journal
  and ``--resume`` continues from them.
- ``device == "gpu"``: one long-lived actor per GPU (``num_gpus=1``) keeps its CUDA context,
  cuSOLVER handle and memory pool across tasks; each actor gets two tasks at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .errors import SurgeryError

if TYPE_CHECKING:
    from .run import TensorResult

__all__ = [
    "map_ray", "connect", "Interrupted", "worker_threads", "thread_env", "scoped_env",
    "init_pool_worker", "EXECUTORS",
]  # fmt: skip

log = logging.getLogger("surgery")
EXECUTORS = ("serial", "thread", "process", "ray")
# Exceptions raised inside a task that are worth retrying on another worker (flaky shared
# filesystem, a node short of memory); anything else is deterministic and fails at once.
RETRY_EXCEPTIONS: list[type[BaseException]] = [OSError, MemoryError]
MIN_THREADS = 2  # see worker_threads


class Interrupted(SurgeryError):
    """The run stopped for a reason unrelated to its inputs (lost workers, retries exhausted).

    Finished tensors are kept in the temporary output folder; ``--resume`` continues from them.
    """

    resumable = True


def worker_threads(workers: int, cores: int | None = None) -> int:
    """BLAS threads per worker: the cores split between workers, but never fewer than 2.

    OpenBLAS's single-threaded sgemm rounds differently from its threaded one (bit patterns
    differ; any count ≥ 2 agrees with any other), and the driver's serial run is threaded. Two
    threads per worker keeps every executor's bytes equal to the serial run's.
    """
    return max(MIN_THREADS, (cores or os.cpu_count() or 1) // max(1, workers))


def thread_env(n: int) -> dict[str, str]:
    """Environment that fixes BLAS/OpenMP threads to ``n`` in a process started with it."""
    return {var: str(n) for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


@contextlib.contextmanager
def scoped_env(env: dict[str, str]) -> Iterator[None]:
    """Set environment variables while a pool spawns its workers, then restore them.

    Spawned workers import numpy before any initializer runs, so BLAS thread counts must be in
    their environment from the start.
    """
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def init_pool_worker(threads: int, parent: int) -> None:
    """Process-pool initializer: cap torch threads, and exit when the driver dies.

    A driver killed with SIGKILL cannot stop its pool; a worker blocked handing a result back
    (torch passes tensors through shared memory) would otherwise live on as an orphan.
    """
    import threading
    import time

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="surgery-parent-watch", daemon=True).start()


def _ray():
    try:
        import ray
    except ImportError:
        raise SurgeryError(
            "--executor ray needs Ray: pip install 'ckpt-surgery[ray]' (or pip install ray)"
        ) from None
    return ray


def _probe(address: str) -> None:
    """Fail fast (3 s) with a clear message when ``HOST:PORT`` does not accept connections."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SurgeryError(
            f"--ray-address {address!r} is not auto or HOST:PORT (e.g. 10.0.0.1:6379)"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=3):
            pass
    except OSError as e:
        raise SurgeryError(
            f"cannot reach the Ray cluster at {address} ({e.strerror or e}); start it with "
            f"`ray start --head --port {port}` on that machine, or fix --ray-address; "
            "nothing was written"
        ) from None


def connect(address: str | None = None, workers: int = 1):
    """Connect to (or start) Ray once per process and return the ``ray`` module.

    Args:
        address: ``None`` (a local instance; ``RAY_ADDRESS`` is honoured when set), ``auto`` (the
            cluster this machine belongs to) or ``HOST:PORT`` (a head node's GCS port).
        workers: CPUs of a local instance (``≤ 1``: all cores).

    Raises:
        SurgeryError: Ray missing, a Ray Client address, or an unreachable cluster. Raised before
            any output exists when called from :func:`surgery.run.execute`.
    """
    ray = _ray()
    if ray.is_initialized():
        return ray  # reuse: one connection per process (tests start theirs once per module)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith("ray://"):
        raise SurgeryError(
            f"--ray-address {address}: Ray Client streams every tensor through the client "
            "(~0.16 GB/s); run surgery on a cluster node with --ray-address auto instead"
        )
    quiet = logging.WARNING
    if not address or address == "local":
        cpus = workers if workers > 1 else (os.cpu_count() or 1)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=quiet)
        log.info("started a local Ray instance with %d CPU(s)", cpus)
        return ray
    if address != "auto":
        _probe(address)
    try:
        ray.init(address=address, logging_level=quiet)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        hint = "`ray start --head` on this machine" if address == "auto" else "the head node"
        raise SurgeryError(
            f"cannot connect to the Ray cluster at {address!r} ({e}); start {hint} or fix "
            "--ray-address; nothing was written"
        ) from None
    log.info("connected to Ray at %s: %s", address, ray.cluster_resources())
    return ray


def _call(task: Callable[[str], TensorResult], name: str) -> TensorResult:
    # Top-level so that Ray pickles it by reference; the task arrives already resolved from
    # its ObjectRef (ray.put once on the driver, not once per call).
    from ops.backend import release_memory

    try:
        return task(name)
    finally:
        release_memory()


class _Worker:
    """A long-lived actor; one per GPU: the CUDA context, cuSOLVER handle and memory pool live
    as long as the run instead of being set up per task."""

    def __init__(self, device: str) -> None:
        from ops.backend import select_device

        # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU before it starts.
        self.device = select_device(device)

    def run(self, task: Callable[[str], TensorResult], name: str) -> TensorResult:
        return _call(task, name)


def _slots(ray, workers: int, resource: str) -> int:
    have = int(ray.cluster_resources().get(resource, 0))
    if workers > 1:
        return min(workers, have) if have else workers
    return max(1, have)


def map_ray(
    task: Callable[[str], TensorResult],
    order: list[str],
    *,
    workers: int = 1,
    address: str | None = None,
    device: str = "cpu",
    max_retries: int = 3,
    actors: int | None = None,
) -> Iterator[TensorResult]:
    """Yield ``task(name)`` for every name of ``order`` from Ray workers, in completion order.

    Args:
        task: picklable ``name -> TensorResult`` (see the module docstring).
        order: tensor names, largest first (submission order).
        workers: concurrent tasks (``≤ 1``: the whole cluster: one task per 2 CPUs, or one actor
            per GPU).
        address: see :func:`connect`.
        device: ``cpu`` (plain tasks, 2 BLAS threads each) or ``gpu`` (one actor per GPU).
        max_retries: retries of a task whose worker died or that raised ``OSError``/``MemoryError``.
        actors: run on this many long-lived actors (``num_gpus=1`` each for ``gpu``,
            ``num_cpus=1`` for ``cpu``) instead of tasks; default: actors only for ``gpu``.

    Raises:
        SurgeryError: from the task (inputs), or :class:`Interrupted` when retries run out.
    """
    ray = connect(address, workers)
    if not order:
        return
    task_ref = ray.put(task)
    if device == "gpu" or actors:
        if device == "gpu" and not ray.cluster_resources().get("GPU"):
            raise SurgeryError(
                "--device gpu with --executor ray needs GPUs in the Ray cluster, and it has none"
            )
        n = actors or _slots(ray, workers, "GPU")
        res = {"num_gpus": 1} if device == "gpu" else {"num_cpus": 1}
        actor_cls = ray.remote(_Worker).options(
            **res,
            max_restarts=max_retries,
            max_task_retries=max_retries,
            runtime_env={"env_vars": thread_env(MIN_THREADS)},
        )
        pool = [actor_cls.remote(device) for _ in range(n)]
        log.info("ray: %d %s actor(s) for %d tensors", n, device, len(order))
        load = dict.fromkeys(range(n), 0)
        owner: dict[Any, int] = {}

        def submit(name: str):
            i = min(load, key=load.__getitem__)  # the least busy actor
            load[i] += 1
            ref = pool[i].run.remote(task_ref, name)
            owner[ref] = i
            return ref

        bound = 2 * n  # one queued per actor: it never waits for the driver's round trip
    else:
        # Two CPUs and two BLAS threads per task: no oversubscription, and the threaded
        # OpenBLAS path of the serial run (see worker_threads). Own env → own worker processes.
        cpus = int(ray.cluster_resources().get("CPU", 1))
        per_task = MIN_THREADS if workers <= 1 and cpus >= MIN_THREADS else 1
        n = max(1, _slots(ray, workers, "CPU") // per_task)
        remote = ray.remote(_call).options(
            num_cpus=per_task,
            max_retries=max_retries,
            retry_exceptions=RETRY_EXCEPTIONS,
            runtime_env={"env_vars": thread_env(MIN_THREADS)},
        )
        log.info("ray: %d slot(s) for %d tensors", n, len(order))
        owner = {}
        load = {}

        def submit(name: str):
            return remote.remote(task_ref, name)

        bound = 2 * n
    pending: dict[Any, str] = {}
    it = iter(order)
    try:
        for name in it:
            pending[submit(name)] = name
            if len(pending) >= bound:
                break
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(ref)
            if ref in owner:
                load[owner.pop(ref)] -= 1
            res = _get(ray, ref, name, max_retries)
            del ref  # drop the last reference so the object store frees the result
            nxt = next(it, None)
            if nxt is not None:
                pending[submit(nxt)] = nxt
            yield res
    finally:
        for ref in pending:  # an error or an abandoned generator: stop the rest
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - best effort; the driver is unwinding anyway
                pass


def _get(ray, ref, name: str, max_retries: int) -> TensorResult:
    """``ray.get`` one result: task errors re-raised as themselves, system failures Interrupted."""
    from ray import exceptions as rex

    try:
        res = ray.get(ref)
    except rex.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, Exception) and not isinstance(cause, rex.RayError):
            raise cause from None  # the task's own error, as in a serial run
        raise Interrupted(
            f"{name}: failed on the Ray cluster after {max_retries} retries ({e}); "
            "rerun the same command with --resume to continue"
        ) from None
    except rex.RayError as e:  # worker/node/actor died and retries ran out, object lost…
        raise Interrupted(
            f"{name}: lost on the Ray cluster after {max_retries} retries "
            f"({type(e).__name__}); rerun the same command with --resume to continue"
        ) from None
    lr = res.lowrank
    flags = [getattr(x, "flags", None) for x in ((lr.A, lr.B) if lr is not None else ())]
    if flags and not all(f is None or f.writeable for f in flags):
        # numpy results come back as read-only views of the object store: own them, as a
        # serial run would (adapter writers hand them to torch.from_numpy).
        import dataclasses

        import numpy as np

        res.lowrank = dataclasses.replace(lr, A=np.array(lr.A), B=np.array(lr.B))
    return res
