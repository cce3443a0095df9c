"""Multi-host start-up: `jax.distributed.initialize()` when a run spans several processes.

Cloud TPU pods, SLURM and Open MPI are detected by JAX itself; anything else passes
`--coordinator_address`, `--num_processes`, `--process_id` (or the environment variables
MTP_COORDINATOR_ADDRESS, MTP_NUM_PROCESSES, MTP_PROCESS_ID). Single-host runs skip it.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

ENV_PREFIX = "MTP_"


def _env_int(name: str) -> int | None:
    value = os.environ.get(ENV_PREFIX + name)
    return int(value) if value not in (None, "") else None


def _cluster_detected() -> str | None:
    """The launcher JAX can read the process layout from, when it says >1 process."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return "SLURM"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return "Cloud TPU pod"
    return None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_s: int | None = None,
    init_timeout_s: int = 300,
) -> bool:
    """Starts JAX's distributed runtime if this is a multi-process run; returns whether it did.

    A peer that stops sending heartbeats for `heartbeat_timeout_s` (env
    MTP_HEARTBEAT_TIMEOUT, default 100) makes the others exit with an error instead of
    waiting forever.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_PREFIX + "COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("PROCESS_ID")
    if heartbeat_timeout_s is None:
        heartbeat_timeout_s = _env_int("HEARTBEAT_TIMEOUT") or 100
    timeouts = dict(
        initialization_timeout=init_timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s
    )
    if coordinator_address or (num_processes or 1) > 1:
        missing = [
            name
            for name, value in (
                ("--coordinator_address", coordinator_address),
                ("--num_processes", num_processes),
                ("--process_id", process_id),
            )
            if value is None
        ]
        if missing:
            raise ValueError(
                f"a multi-process run needs {', '.join(missing)} (or the environment variables "
                f"{', '.join(ENV_PREFIX + m[2:].upper() for m in missing)})"
            )
        if num_processes == 1:
            return False
        jax.distributed.initialize(coordinator_address, num_processes, process_id, **timeouts)
        return True
    cluster = _cluster_detected()
    if cluster:
        log.info("multi-process run detected (%s)", cluster)
        jax.distributed.initialize(**timeouts)
        return True
    return False


def topology() -> str:
    """One line on hosts, processes and devices."""
    local = jax.local_devices()
    return (
        f"process {jax.process_index()} of {jax.process_count()}: {len(local)} local / "
        f"{jax.device_count()} global devices ({local[0].platform}, {local[0].device_kind})"
    )


def barrier(name: str, timeout_s: int = 600) -> None:
    """Waits for every process at `name`; raises after `timeout_s` instead of hanging."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:  # pragma: no cover - initialised by other means
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)
