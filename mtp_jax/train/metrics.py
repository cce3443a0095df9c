"""Metric summaries and writers: WORKDIR/metrics.jsonl and TensorBoard event files."""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import jax
import numpy as np

from mtp_jax.train.checkpoint import StorageError


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
    out.update(objective_summary("", acc))
    # MoE routing (moe/layer_<i>/load_max, ...): means over the logged steps
    out.update({key: float(v) / steps for key, v in acc.get("moe", {}).items()})
    return out


def objective_summary(prefix: str, acc: dict[str, np.ndarray]) -> dict[str, float]:
    """{prefix}objective/depth_k (k >= 1) of loss.mtp_objective distill / tv: the mean KL,
    or 1 - P(drafts 1..k all accepted); {} without them (ce: loss/depth_k is the objective)."""
    if "objective_sum" not in acc:
        return {}
    pairs = list(zip(acc["objective_sum"], acc["objective_count"], strict=True))[1:]
    return {
        f"{prefix}objective/depth_{k}": float(s) / max(float(n), 1.0)
        for k, (s, n) in enumerate(pairs, start=1)
    }


def eval_summary(acc: dict[str, np.ndarray]) -> dict[str, float]:
    out = depth_summary("eval/", acc["loss_sum"], acc["correct"], acc["count"])
    for k, (a, n) in enumerate(zip(acc["agree"], acc["agree_count"], strict=True), start=1):
        out[f"eval/agreement/depth_{k}"] = float(a) / max(float(n), 1.0)
    if "accept_sum" in acc:  # simulated greedy tokens per verify step (loss.accept_length)
        out["eval/accept_len"] = float(acc["accept_sum"]) / max(float(acc["accept_count"]), 1.0)
    if "accept_walk_sum" in acc:  # the same at the positions a decoder drafts from (accept_walk)
        out["eval/accept_len_walk"] = float(acc["accept_walk_sum"]) / max(
            float(acc["accept_walk_count"]), 1.0
        )
    out.update(objective_summary("eval/", acc))
    return out


def storage_error(what: str, path: str, error: OSError) -> StorageError:
    return StorageError(f"cannot write {what} {path}: {error.strerror or error}")


class MetricWriter:
    """Writes one JSON object per logged step to metrics.jsonl and scalars to TensorBoard.

    Only process 0 writes; other processes' writers are no-ops. `resume_step`: the step the
    run (re)starts from; records of later steps, written by the run that was interrupted and
    about to be re-run, are dropped from metrics.jsonl and purged from TensorBoard, so that
    every step appears once. Events are written synchronously (no writer thread): a failed
    write (a full disk) raises `StorageError` naming the file, at the step that caused it.
    """

    def __init__(self, workdir: str, resume_step: int = 0):
        self.active = jax.process_index() == 0
        self._tb = None
        self._file = None
        self.path = os.path.join(workdir, "metrics.jsonl")
        if not self.active:
            return
        try:
            os.makedirs(workdir, exist_ok=True)
            self.dropped = _drop_records_after(self.path, resume_step)
            self._file = open(self.path, "a")  # noqa: SIM115
            from tensorboardX.event_file_writer import EventsWriter

            tb_dir = os.path.join(workdir, "tensorboard")
            os.makedirs(tb_dir, exist_ok=True)
            self._tb = EventsWriter(os.path.join(tb_dir, "events"))
            if resume_step or self.dropped:
                self._purge_after(resume_step)
        except OSError as e:
            raise storage_error("metrics to", workdir, e) from e

    def rewind(self, step: int) -> None:
        """Forgets the records of steps > `step` (a rollback re-runs them)."""
        if not self.active:
            return
        try:
            self._file.close()
            _drop_records_after(self.path, step)
            self._file = open(self.path, "a")  # noqa: SIM115
            self._purge_after(step)
        except OSError as e:
            raise storage_error("metrics to", self.path, e) from e

    def _purge_after(self, step: int) -> None:
        """TensorBoard hides events of steps > `step` written before (a restart marker)."""
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self._tb.write_event(
            Event(
                wall_time=time.time(),
                step=step + 1,
                session_log=SessionLog(status=SessionLog.START),
            )
        )
        self._tb.flush()

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.active:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        record = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:
            raise storage_error("metrics to", self.path, e) from e
        try:
            now = time.time()
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    event = Event(wall_time=now, step=int(step), summary=scalar(key, value))
                    self._tb.write_event(event)
            self._tb.flush()
        except OSError as e:
            raise storage_error("TensorBoard events to", self._tb._file_name, e) from e

    def close(self) -> None:
        """Closes the files; errors of a full disk were raised by `write` already."""
        if not self.active:
            return
        for f in (self._file, self._tb):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


def _drop_records_after(path: str, step: int) -> int:
    """Rewrites `path` (metrics.jsonl) without records of steps > `step`; returns how many
    it dropped. The new file replaces the old one atomically."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    keep = [ln for ln in lines if 0 <= _step_of(ln) <= step]
    if len(keep) == len(lines):
        return 0
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)
    return len(lines) - len(keep)


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1  # a torn last line (killed mid-write): dropped


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
