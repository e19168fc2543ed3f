"""Ray start-up shared by every command: connect to a cluster or start (and stop) a local one.

``--address`` / ``RAY_ADDRESS`` picks a cluster (``ray job submit`` sets it for the driver). Otherwise a
local Ray is started for the command with the dashboard off and everything bound to loopback, and
stopped when the command ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    import ray

    if ray.is_initialized():  # already inside a driver (tests, notebooks): reuse it
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kw: dict = {"log_to_driver": True, "logging_level": logging.WARNING}
    if address:
        kw["address"] = address
    else:
        kw |= {"num_cpus": num_cpus or os.cpu_count(), "include_dashboard": False,
               "_node_ip_address": "127.0.0.1"}
    t0 = time.time()
    ray.init(**kw)
    log.info("ray ready in %.1fs: %s", time.time() - t0, ray.cluster_resources())
    try:
        yield
    finally:
        ray.shutdown()


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))
