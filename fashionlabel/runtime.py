"""Ray start-up shared by every command: connect to a cluster or start (and stop) a local one.

``--address`` / ``RAY_ADDRESS`` picks a cluster (``ray job submit`` sets it for the driver). Otherwise a
local Ray is started for the command with the dashboard off and everything bound to loopback, and
stopped when the command ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

from fashionlabel.raywatch import LocalRayWatch

log = logging.getLogger(__name__)

# Set by ray_session: True while a local Ray it started runs, False while connected to a cluster.
_STARTED_HERE: bool | None = None


@contextlib.contextmanager
def ray_session(
    address: str | None = None, num_cpus: int | None = None, name: str = "fashionlabel"
) -> Iterator[None]:
    """Ray for the duration of the block: connect to ``address`` (or ``RAY_ADDRESS``), else start a local
    Ray; ``ray.shutdown()`` when the block ends. A Ray already initialised is used and left running.

    A local Ray is watched while the block runs: should its raylet or GCS server die under the command
    (``kill -9``, the out-of-memory killer), the command ends within a second, printing one line that
    starts with ``name`` (see :class:`fashionlabel.raywatch.LocalRayWatch`).

    Args:
        num_cpus: CPUs of a local Ray (default: all of this machine's); ignored for a cluster.
        name: how the command is named in that line (``fashionlabel shard``).

    Raises ConnectionError when nothing listens at ``address`` or it is a dashboard (http) address.
    """
    import ray

    if ray.is_initialized():  # already inside a driver (tests, notebooks): reuse it
        yield
        return
    global _STARTED_HERE
    address = address or os.environ.get("RAY_ADDRESS")
    kw: dict = {"log_to_driver": True, "logging_level": logging.WARNING}
    if address:
        _check_reachable(address)
        kw["address"] = address
    else:
        kw |= {
            "num_cpus": num_cpus or os.cpu_count(),
            "include_dashboard": False,
            "runtime_env": {"worker_process_setup_hook": "fashionlabel.runtime.setup_local_worker"},
        }
        _single_node_loopback()
    t0 = time.time()
    local = not address
    watch: LocalRayWatch | None = None
    try:  # a failed or interrupted start stops what it had started, too
        with _interrupts_after_start(local):
            ray.init(**kw)
            _STARTED_HERE = local
            log.info("ray ready in %.1fs: %s", time.time() - t0, ray.cluster_resources())
        if local:  # a cluster's processes are not ours to watch: Ray reports a lost cluster itself
            watch = LocalRayWatch.start(name)
        with sigterm_as_interrupt(local):
            yield
    except Exception as e:  # not an interrupt: Ctrl-C and SIGTERM end as "interrupted", exit 130
        if watch:  # Ray's symptom of its own loss ("The task's local raylet died"): name the loss
            watch.report_if_lost(wait=2.0 if _is_ray_error(e) else 0.0)
        raise
    finally:
        if watch:  # from here on the local Ray is stopped on purpose
            watch.stop()
        _STARTED_HERE = None
        ray.shutdown()


def _is_ray_error(e: BaseException) -> bool:
    """An error of Ray's own (a task's raylet or worker lost, an object lost), as opposed to the job's own,
    which a task raising it wraps in a RayTaskError: only Ray's own are worth waiting on a raylet for."""
    import ray.exceptions

    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:  # a job may re-raise it as its own, from it
        if isinstance(cause, ray.exceptions.RayError):
            return not isinstance(cause, ray.exceptions.RayTaskError)
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


@contextlib.contextmanager
def _interrupts_after_start(local: bool) -> Iterator[None]:
    """Hold a Ctrl-C that arrives while a local Ray starts until it has started (a second one is not held).

    Interrupted half-way, ``ray.init`` has started processes that ``ray.shutdown`` cannot reach yet: its
    agents outlived the command by a minute, and the interpreter could crash at exit (SIGSEGV instead of
    exit 130). Raised once Ray is up, the interrupt stops it whole, as at any later moment.
    """
    # SIGINT ignored (a background job of a script) or handled by the caller: left as it is
    if (
        not local
        or threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: object) -> None:
        if held:  # asked twice: do not wait for the start
            raise KeyboardInterrupt
        held.append(signum)
        log.warning("interrupted: stopping once Ray has started (Ctrl-C again to stop now)")

    before = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is hold:
            signal.signal(signal.SIGINT, before)
    if held:
        raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt(local: bool = True) -> Iterator[None]:
    """A SIGTERM (``kill``, ``timeout``, a scheduler) stops the command as Ctrl-C does. ``local``: the
    command runs no Ray, or one it started (a cluster's job is stopped by Ray's own means).

    Left to Ray, a SIGTERM to the command's process group while it labels killed the driver with SIGABRT
    (Ray's own signal handler, its raylet gone), no message, the local Ray's processes left running.
    Raised as KeyboardInterrupt, it stops the job where it is, and the local Ray is shut down whole.
    """
    if not local or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail at once, by name, when nothing listens at a cluster's ``host:port``: on a refused port Ray's
    own connect retries for minutes, printing only its GCS timeouts. ("auto", "local" and addresses
    without a port are left to Ray.)"""
    if address.startswith(("http://", "https://")):
        raise ConnectionError(
            f"{address} is a Ray job API (dashboard) address, the one `ray job submit` takes; a command "
            "connects to the cluster itself (host:6379). Submit it as a job (`ray job submit -- python -m "
            "jobs.<command> …`), give --address HOST:6379, or unset RAY_ADDRESS to run on a local Ray"
        )
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(
            f"no Ray cluster answers at {address} ({e.strerror or e}); check --address / RAY_ADDRESS, "
            "or leave both unset to run on a local Ray"
        ) from None


def setup_local_worker() -> None:
    """Runs in every worker of a local Ray (``worker_process_setup_hook``).

    Without the dashboard there is no State API, so Ray Train's placement-group cleaner (which removes
    the workers' placement group should the train controller die) logs a failed query every second for
    the whole run. A local Ray is stopped with the command, which removes its placement groups anyway.
    """
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(
        logging.ERROR
    )
    # That cleaner finds its cluster by looking for Ray's processes on the machine. With another Ray
    # running too (a `ray start` cluster beside a local command), it cannot tell which is its own and its
    # thread dies with a "multiple active Ray instances" traceback in the command's output: name it.
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def _single_node_loopback() -> None:
    """Make a local Ray listen on loopback only.

    On Linux Ray turns a ``127.0.0.1`` node address into the machine's routable address and its gRPC
    servers (GCS, raylet, workers) listen on every interface. A local Ray serves only this machine, so we
    take Ray's own single-node setting (its macOS/Windows default): the node address is loopback and
    every server binds to it. The variable is inherited by the processes Ray starts.
    """
    import ray._private.ray_constants as ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def cluster_cpus() -> float:
    """CPUs of the connected Ray cluster (1 if it reports none)."""
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def may_span_nodes() -> bool:
    """Whether tasks of this driver may run on another node: on a cluster it connected to (which has, or
    may autoscale to, other nodes), or wherever more than one node is alive now."""
    import ray

    return _STARTED_HERE is False or sum(1 for n in ray.nodes() if n.get("Alive")) > 1


def cluster_gpus() -> float:
    """GPUs of the connected Ray cluster (0 if it has none)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def node_cpus_now() -> list[float]:
    """CPUs of each alive node of the connected Ray cluster."""
    import ray

    return [float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")]


def worker_cpus(workers: int, node_cpus: list[float] | None = None) -> float:
    """CPUs for each of ``workers`` CPU workers or actors: the cluster's CPUs shared equally, but never
    more than Ray can place, one bundle per worker, on the nodes there are. A share of the whole cluster
    can exceed every node (two nodes of 2 CPUs, one worker: 4), and Ray Train then waits for ever for a
    worker group it cannot place.

    Args:
        node_cpus: CPUs of each node (default: the alive nodes of the connected Ray cluster).
    """
    nodes = [n for n in (node_cpus if node_cpus is not None else node_cpus_now()) if n > 0] or [1.0]
    share = sum(nodes) / workers

    def places(c: float) -> bool:
        return sum(int(n / c + 1e-9) for n in nodes) >= workers

    # the largest share that places every worker is a node's CPUs split k ways, for some k
    return max(
        c for c in {n / k for n in nodes for k in range(1, workers + 1)} | {share} if c <= share and places(c)
    )
