"""Metric summaries and writers: WORKDIR/metrics.jsonl and TensorBoard event files."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np


def depth_summary(prefix: str, loss_sum, correct, count) -> dict[str, float]:
    """Exact per-depth means from sums: {prefix}loss/depth_k and {prefix}accuracy/depth_k."""
    out = {}
    for k, (ls, c, n) in enumerate(zip(loss_sum, correct, count, strict=True)):
        n = max(float(n), 1.0)
        out[f"{prefix}loss/depth_{k}"] = float(ls) / n
        out[f"{prefix}accuracy/depth_{k}"] = float(c) / n
    return out


def train_summary(acc: dict[str, np.ndarray], steps: int) -> dict[str, float]:
    """Means over `steps` accumulated train metrics (sums of per-step sums)."""
    out = {"loss": float(acc["loss"]) / steps}
    out.update(depth_summary("", acc["loss_sum"], acc["correct"], acc["count"]))
    for key in ("grad_norm", "update_norm", "param_norm"):
        out[key] = float(acc[key]) / steps
    return out


def eval_summary(acc: dict[str, np.ndarray]) -> dict[str, float]:
    out = depth_summary("eval/", acc["loss_sum"], acc["correct"], acc["count"])
    for k, (a, n) in enumerate(zip(acc["agree"], acc["agree_count"], strict=True), start=1):
        out[f"eval/agreement/depth_{k}"] = float(a) / max(float(n), 1.0)
    return out


class MetricWriter:
    """Writes one JSON object per logged step to metrics.jsonl and scalars to TensorBoard.

    Only process 0 writes; other processes' writers are no-ops.
    """

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        self._tb = None
        self._file = None
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self.active:
            self._file.close()
            self._tb.close()


def _plain(v: Any) -> Any:
    if isinstance(v, np.ndarray | jax.Array):
        v = np.asarray(v)
        return v.item() if v.ndim == 0 else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of WORKDIR/metrics.jsonl (for notebooks and tests)."""
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
