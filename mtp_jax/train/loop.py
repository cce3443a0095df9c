"""The training loop, in phases: mesh -> data -> model and optimizer -> sharded init ->
compile -> restore -> loop (metrics, eval, checkpoints, preemption, non-finite stop)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from mtp_jax.config import ConfigDict, ConfigError
from mtp_jax.distributed import barrier, topology
from mtp_jax.model.flops import activated_param_count, model_flops
from mtp_jax.model.model import Model
from mtp_jax.sharding import (
    batch_sharding,
    check_sharded_enough,
    data_parallel_size,
    make_mesh,
    with_shardings,
)
from mtp_jax.train.checkpoint import Checkpointer, StorageError
from mtp_jax.train.metrics import MetricWriter, eval_summary, train_summary
from mtp_jax.train.mfu import device_peak_flops
from mtp_jax.train.state import abstract_state, init_state, make_optimizer
from mtp_jax.train.step import compile_steps
from mtp_jax.train.warm_start import warm_start
from mtp_jax.train.workdir import check_writable, workdir_lock

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without saving the bad state."""


@dataclasses.dataclass
class TrainResult:
    """What a call of `train` did: final step, status, last logged metrics, the state."""

    step: int
    status: str  # 'completed' | 'preempted' | 'compiled'
    metrics: dict[str, float]
    state: Any = None
    memory: dict[str, int] | None = None
    compile_seconds: float = 0.0
    roofline: dict[str, Any] | None = None  # compile_only: `local_roofline`


class _Preemption:
    """Turns SIGTERM / SIGINT into a flag checked between steps."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        log.warning("received %s: saving a checkpoint and exiting", signal.Signals(signum).name)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def should_stop(self, step: int, every: int) -> bool:
        """Whether to checkpoint and stop after `step`.

        With several processes, they must agree (each may see the signal at another step):
        they compare flags every `every` steps, and all stop if any was signalled.
        """
        if jax.process_count() == 1:
            return self.requested
        if step % every:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray([self.requested], np.int32))
        return bool(np.asarray(flags).any())


def check_batch(config: ConfigDict, mesh) -> None:
    """The global batch (and each microbatch) must split evenly over the data-parallel axes."""
    dp = data_parallel_size(mesh)
    batch, micro = config.data.batch_size, config.train.microbatches
    if batch % dp:
        raise ConfigError(
            f"config key 'data.batch_size' has value {batch}; accepted: a multiple of the "
            f"data-parallel size {dp} (mesh.data x mesh.fsdp x mesh.expert = {dict(mesh.shape)})"
        )
    if (batch // micro) % dp:
        raise ConfigError(
            f"config key 'train.microbatches' has value {micro}; each microbatch "
            f"({batch // micro} examples) must be a multiple of the data-parallel size {dp}"
        )
    if batch % jax.process_count():
        raise ConfigError(
            f"config key 'data.batch_size' has value {batch}; accepted: a multiple of the "
            f"number of processes {jax.process_count()}"
        )


def make_datasets(config: ConfigDict):
    """(train dataset, val datasets) of per-process batches.

    The val datasets are {'': val split} for one store, {source name: its val split} for a
    `data.mixture` (each source is evaluated on its own), {} with evals off.
    """
    from mtp_jax.data import ensure_store, make_dataset
    from mtp_jax.data.pipeline import mixture_names, source_config

    d, m = config.data, config.model
    if d.source == "store" and not d.mixture:
        # Process 0 prepares a missing store; the others wait, then open it.
        if jax.process_index() == 0:
            ensure_store(d, vocab_size=m.vocab_size)
        barrier("mtp_jax_store_ready", timeout_s=3600)
        path = ensure_store(d, vocab_size=m.vocab_size)
        d = ConfigDict(d.to_dict())
        d.path = path
    kwargs = dict(
        seq_len=d.seq_len, mtp_depth=m.mtp_depth, seed=config.seed, vocab_size=m.vocab_size
    )
    train_ds = make_dataset(d, split="train", total_steps=config.train.steps, **kwargs)
    val_ds = {}
    if config.train.eval_every:
        for name in mixture_names(d) or [""]:
            src = source_config(d, name) if name else d
            val_ds[name] = make_dataset(src, split="val", shuffle=False, **kwargs)
    return train_ds, val_ds


def memory_report(compiled) -> dict[str, int]:
    """Per-device bytes of the compiled step: arguments, outputs, temporaries."""
    try:
        mem = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports memory
        return {}
    if mem is None:
        return {}
    return {
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "alias_bytes": int(getattr(mem, "alias_size_in_bytes", 0)),
    }


def local_roofline(config: ConfigDict, compiled, mesh) -> dict[str, Any]:
    """The roofline of a step compiled for this host's devices (`plan.roofline`): FLOPs and
    bytes accessed per device from `cost_analysis()`, peak and HBM bandwidth from the chip
    tables (`train.peak_flops` overrides the peak; a CPU has no bandwidth entry)."""
    from mtp_jax.train.mfu import bandwidth_for_kind, peak_for_kind
    from mtp_jax.train.plan import roofline

    kind = mesh.devices.flat[0].device_kind
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list | tuple) else cost) or {}
    model = model_flops(config) * config.data.batch_size * config.data.seq_len / mesh.size
    peak = config.train.peak_flops or peak_for_kind(kind) or 0.0
    bandwidth = bandwidth_for_kind(kind) or 0.0
    bytes_accessed = float(cost.get("bytes accessed", 0.0))
    out = roofline(float(cost.get("flops", 0.0)), model, bytes_accessed, peak, bandwidth)
    return {
        "device_kind": kind,
        "peak_flops": peak,
        "hbm_bandwidth": bandwidth,
        "bytes_accessed": bytes_accessed,
        **out,
    }


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


def train(
    config: ConfigDict,
    workdir: str,
    *,
    devices: list | None = None,
    compile_only: bool = False,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Trains `config` in `workdir`, resuming from its newest checkpoint if there is one.

    `on_step(step)` is called after every train step (after its metrics are queued, before
    any checkpoint of that step): progress hooks, tests that signal a run mid-way.
    """
    # ---- mesh (and the checks that need no compile)
    mesh = make_mesh(config.mesh, devices)
    check_batch(config, mesh)
    if config.data.source == "store":
        from mtp_jax.data.tokenizer import check_vocab_size

        check_vocab_size(config.data.tokenizer, config.model.vocab_size)
    log.info("%s", topology())
    log.info(
        "mesh %s over %d devices (%s), process %d of %d",
        dict(mesh.shape),
        mesh.size,
        jax.devices()[0].device_kind,
        jax.process_index(),
        jax.process_count(),
    )
    if compile_only:  # writes nothing to the workdir
        return _train(config, workdir, mesh, True, progress, on_step)
    check_writable(workdir)
    with workdir_lock(workdir):
        return _train(config, workdir, mesh, False, progress, on_step)


def _train(config, workdir, mesh, compile_only, progress, on_step) -> TrainResult:
    """`train` after the checks that need no compile, with the workdir held."""
    # ---- model and optimizer, abstract state and its shardings
    model = Model(config.model)
    tx = make_optimizer(config)
    abstract, shardings = abstract_state(config, model, tx, mesh)
    check_sharded_enough(
        abstract.params, shardings.params, mesh, config.mesh.max_replicated_fraction
    )

    # ---- compile before the loop
    start = time.perf_counter()
    train_step, eval_step = compile_steps(config, model, tx, mesh, shardings, abstract)
    compile_seconds = time.perf_counter() - start
    memory = memory_report(train_step)
    log.info(
        "compiled train/eval steps in %.1f s; per device: %s",
        compile_seconds,
        ", ".join(f"{k} {_gib(v)}" for k, v in memory.items()),
    )
    if compile_only:
        return TrainResult(
            0,
            "compiled",
            {},
            memory=memory,
            compile_seconds=compile_seconds,
            roofline=local_roofline(config, train_step, mesh),
        )

    # ---- data
    train_ds, val_ds = make_datasets(config)
    data_iter = iter(train_ds)

    # ---- restore or initialise
    checkpointer = Checkpointer(workdir, config)
    state, restored_step = checkpointer.restore(with_shardings(abstract, shardings), data_iter)
    if state is None:
        state = init_state(config, model, tx, shardings)
        total = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
        if config.model.moe.num_experts:
            log.info(
                "initialised a fresh state (%d parameters, %d activated per token)",
                total,
                activated_param_count(config),
            )
        else:
            log.info("initialised a fresh state (%d parameters)", total)
        params, source, fresh = warm_start(config, state.params, shardings.params)
        if source:
            state = state.replace(params=params)
            log.info("parameters from %s (%d MTP tensors left fresh)", source, fresh)
    else:
        log.info("resumed from the checkpoint at step %d", restored_step)

    # ---- loop
    run = _Run(
        config,
        mesh,
        train_step,
        eval_step,
        data_iter,
        val_ds,
        checkpointer,
        MetricWriter(workdir, resume_step=restored_step or 0),
        memory,
        compile_seconds,
        progress,
        on_step,
        restore_target=with_shardings(abstract, shardings),
    )
    try:
        result = _loop(run, state)
    except BaseException:
        run.writer.close()
        with contextlib.suppress(Exception):  # the error in flight is the one to report
            checkpointer.close()
        raise
    run.writer.close()
    checkpointer.close()
    return result


@dataclasses.dataclass
class _Run:
    """What the loop works with, prepared by the phases of `train`."""

    config: ConfigDict
    mesh: Any
    train_step: Any
    eval_step: Any
    data_iter: Any
    val_ds: Any
    checkpointer: Checkpointer
    writer: MetricWriter
    memory: dict[str, int]
    compile_seconds: float
    progress: bool
    on_step: Callable[[int], None] | None
    restore_target: Any = None  # the abstract state with shardings (rollbacks restore onto it)


def _loop(run: _Run, state) -> TrainResult:
    config, mesh, checkpointer, writer = run.config, run.mesh, run.checkpointer, run.writer
    train_step, eval_step, data_iter, val_ds = (
        run.train_step,
        run.eval_step,
        run.data_iter,
        run.val_ds,
    )
    memory, compile_seconds, progress = run.memory, run.compile_seconds, run.progress
    from mtp_jax.data import to_global_batch
    from mtp_jax.data.pipeline import mixture_names

    t, ck = config.train, config.checkpoint
    bsh = batch_sharding(mesh)
    step = int(jax.device_get(state.step))
    tokens_per_step = config.data.batch_size * config.data.seq_len
    mixture = mixture_names(config.data)
    mixture_counts = None
    flops_per_step = model_flops(config) * tokens_per_step
    peak, peak_source = device_peak_flops(t.peak_flops)
    log.info("MFU against %.1f TFLOP/s per device (%s)", peak / 1e12, peak_source)

    pending: list[dict] = []  # device metrics since the last log
    last_good = checkpointer.latest_step()
    last_checked = step
    summary: dict[str, float] = {}
    bar = tqdm(
        total=t.steps,
        initial=step,
        disable=not progress or jax.process_index() != 0,
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    timer = time.perf_counter()
    timed_steps = 0

    nan_batches = set(t.nan_batches)
    skip_batches: set[int] = set()  # rollback: batch numbers to pass over
    pending_batches: list[int] = []  # the batch number of each pending step
    bad_in_a_row = skipped = rollbacks = 0
    served = _batches_served(data_iter, step)

    def check_finite() -> bool:
        """Handles non-finite steps among `pending` by train.on_nonfinite; True when it rolled
        the run back (the caller goes on from the restored step)."""
        nonlocal last_checked, bad_in_a_row, skipped, rollbacks, state, step, served
        bad = np.asarray(jax.device_get([m["nonfinite"] for m in pending])).astype(bool)
        if not bad.any():
            bad_in_a_row = 0
            last_checked = step
            return False
        first, batch_no = last_checked + 1 + int(np.argmax(bad)), pending_batches[int(bad.argmax())]
        where = f"non-finite loss or gradient at step {first} (batch {batch_no})"
        last = f"{'step ' + str(last_good) if last_good is not None else 'none'}"
        if t.on_nonfinite == "skip":
            for b in bad:
                bad_in_a_row = bad_in_a_row + 1 if b else 0
                if bad_in_a_row >= t.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{where}: {bad_in_a_row} non-finite steps in a row (train."
                        f"max_nonfinite={t.max_nonfinite}); stopped; last checkpoint: {last}"
                    )
            skipped += int(bad.sum())
            log.warning("%s: update skipped (%d so far)", where, skipped)
            last_checked = step
            return False
        if t.on_nonfinite == "stop" or rollbacks >= t.max_nonfinite or last_good is None:
            why = (
                f"after {rollbacks} rollbacks (train.max_nonfinite={t.max_nonfinite})"
                if t.on_nonfinite == "rollback" and last_good is not None
                else "no checkpoint to roll back to"
                if t.on_nonfinite == "rollback"
                else f"checked steps {last_checked + 1}..{step}"
            )
            raise NonFiniteLossError(
                f"{where} ({why}); stopped without saving; last good checkpoint: {last}"
            )
        skip_batches.add(batch_no)
        checkpointer.wait()
        state, restored = checkpointer.restore(run.restore_target, data_iter, step=last_good)
        rollbacks += 1
        log.warning(
            "%s: rolled back to the checkpoint at step %d, passing over batch %d (rollback %d "
            "of at most %d)",
            where,
            restored,
            batch_no,
            rollbacks,
            t.max_nonfinite,
        )
        step = last_checked = restored
        served = _batches_served(data_iter, step)
        writer.rewind(step)
        pending.clear()
        pending_batches.clear()
        bar.n = step
        bar.refresh()
        return True

    with _Preemption() as preempt:
        while step < t.steps:
            checkpointer.check()  # a failed async save stops the run before more work is lost
            local = next(data_iter)
            served += 1
            if served in skip_batches:
                log.warning("passing over batch %d (it gave a non-finite loss)", served)
                continue
            if nan_batches:  # the fault drill of train.nan_batches
                factor = np.nan if served in nan_batches else 1.0
                local["poison"] = np.full(len(local["tokens"]), factor, np.float32)
            mixture_counts = local.pop("mixture_counts", None)
            batch = to_global_batch(local, bsh)
            state, metrics = train_step(state, batch)
            step += 1
            timed_steps += 1
            pending.append(metrics)
            pending_batches.append(served)
            bar.update(1)
            if run.on_step is not None:
                run.on_step(step)
            record: dict[str, float] = {}

            if step % t.log_every == 0 or step == t.steps:
                if check_finite():
                    continue
                good = [m for m in jax.device_get(pending) if not m["nonfinite"]] or pending
                acc = jax.device_get(jax.tree.map(lambda *x: sum(x), *good))
                elapsed = time.perf_counter() - timer
                summary = train_summary(acc, len(good))
                if t.on_nonfinite != "stop":
                    summary[f"nonfinite/{t.on_nonfinite}"] = skipped or rollbacks
                last = jax.device_get(pending[-1])
                step_time = elapsed / max(timed_steps, 1)
                summary.update(
                    {
                        "lr": float(last["lr"]),
                        **{
                            f"lambda/depth_{k + 1}": float(v) for k, v in enumerate(last["lambdas"])
                        },
                        "step_time": step_time,
                        "tokens_per_sec": tokens_per_step / step_time,
                        "mfu": flops_per_step / step_time / (peak * mesh.size),
                    }
                )
                if mixture_counts is not None:  # examples per source so far, the whole run
                    summary.update(
                        {
                            f"data/tokens/{name}": int(n) * config.data.seq_len
                            for name, n in zip(mixture, mixture_counts, strict=True)
                        }
                    )
                record.update(summary)
                bar.set_postfix(
                    loss=f"{summary['loss']:.3f}", tok_s=f"{summary['tokens_per_sec']:.0f}"
                )
                pending.clear()
                pending_batches.clear()
                timer, timed_steps = time.perf_counter(), 0

            if val_ds and t.eval_every and step % t.eval_every == 0:
                ev = evaluate(eval_step, state.params, val_ds, t.eval_steps, bsh)
                record.update(ev)
                summary.update(ev)
                timer, timed_steps = time.perf_counter(), 0

            if record:
                try:
                    writer.write(step, record)
                except StorageError as e:  # a full disk: say what survives
                    raise StorageError(f"{e}. {checkpointer.resume_hint()}") from e
            stop = preempt.should_stop(step, t.log_every)
            save_now = (ck.every and step % ck.every == 0) or step == t.steps or stop
            if save_now:
                if pending and check_finite():
                    continue
                checkpointer.save(step, state, data_iter, force=True)
                last_good = step
                timer, timed_steps = time.perf_counter(), 0
            if stop:
                checkpointer.wait()
                bar.close()
                log.warning("preempted: checkpoint saved at step %d", step)
                return TrainResult(step, "preempted", summary, state, memory, compile_seconds)
    bar.close()
    checkpointer.wait()
    return TrainResult(step, "completed", summary, state, memory, compile_seconds)


def _batches_served(data_iter, step: int) -> int:
    """Batches the data iterator has served so far: its position when it reports one (a
    restored run), else `step` (one batch a step)."""
    try:
        return int(data_iter.get_state()["next_index"])
    except (AttributeError, KeyError, TypeError, ValueError):
        return step


def evaluate(eval_step, params, val_ds, steps: int, bsh) -> dict[str, float]:
    """Per-depth loss/accuracy and draft agreement over the first `steps` validation batches.

    `val_ds`: one dataset, or {source name: dataset} (`make_datasets`): every source is
    evaluated on `steps` batches of its own; the eval/* means are over all of them and each
    named source adds eval/loss/depth_0/<name>.
    """
    if not isinstance(val_ds, dict):
        val_ds = {"": val_ds}
    totals, out = None, {}
    for name, ds in val_ds.items():
        sums = _eval_sums(eval_step, params, ds, steps, bsh)
        if name:
            out[f"eval/loss/depth_0/{name}"] = eval_summary(sums)["eval/loss/depth_0"]
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    return {**eval_summary(totals), **out}


def _eval_sums(eval_step, params, ds, steps: int, bsh) -> dict[str, np.ndarray]:
    from mtp_jax.data import to_global_batch

    it = iter(ds)
    totals = None
    for _ in range(steps):
        out = eval_step(params, to_global_batch(next(it), bsh))
        totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
    return jax.device_get(totals)
