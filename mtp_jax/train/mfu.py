"""Model FLOPs utilisation: achieved model FLOP/s over the devices' peak."""

from __future__ import annotations

import functools
import logging
import time

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

# Dense bfloat16 peak FLOP/s per device (per chip; per GPU), from the vendors' data sheets.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA L4": 121e12,
}


# HBM bandwidth per chip / GPU (bytes/s), from the same data sheets (v5p reports "TPU v5",
# v5e "TPU v5 lite"). What a roofline divides bytes accessed by.
HBM_BANDWIDTH = {
    "TPU v4": 1228e9,
    "TPU v5 lite": 819e9,
    "TPU v5e": 819e9,
    "TPU v5p": 2765e9,
    "TPU v5": 2765e9,
    "TPU v6 lite": 1640e9,
    "TPU v6e": 1640e9,
    "NVIDIA H100": 3350e9,
    "NVIDIA H200": 4800e9,
    "NVIDIA A100": 2039e9,
    "NVIDIA B200": 8000e9,
    "NVIDIA L4": 300e9,
}


def _lookup(table: dict[str, float], kind: str) -> float | None:
    matches = [k for k in table if kind.startswith(k)]
    return table[max(matches, key=len)] if matches else None


def peak_for_kind(kind: str) -> float | None:
    """Longest matching prefix of `device_kind` in PEAK_FLOPS."""
    return _lookup(PEAK_FLOPS, kind)


def bandwidth_for_kind(kind: str) -> float | None:
    """Longest matching prefix of `device_kind` in HBM_BANDWIDTH."""
    return _lookup(HBM_BANDWIDTH, kind)


@functools.cache
def measured_peak(n: int = 2048, repeats: int = 20) -> float:
    """FLOP/s of a float32 n x n matmul on one local device (the CPU's usable peak).

    The fastest of `repeats` runs: other work on the same cores only slows a run down, so
    the minimum time is the closest to the machine's peak. On a busy machine set
    `train.peak_flops` for MFU figures you report.
    """
    device = jax.local_devices()[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def device_peak_flops(configured: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s per device, where it came from)."""
    if configured > 0:
        return configured, "train.peak_flops"
    kind = jax.devices()[0].device_kind
    peak = peak_for_kind(kind)
    if peak is not None:
        return peak, f"table ({kind})"
    peak = measured_peak()
    if jax.default_backend() == "cpu":
        # Fake CPU devices share the same cores: the host's peak is split between them.
        peak /= max(jax.local_device_count(), 1)
    return peak, f"measured float32 matmul ({kind})"
