"""Plan a pod run from a laptop: compile the real train step for a TPU slice, ahead of time.

`plan(config, "v5p:4x4x4")` asks libtpu for the slice's devices (no TPU needed: the compiler
runs on this host), builds the mesh over them with `make_mesh(config.mesh, devices)`, and
lowers and compiles the same train and eval steps that `mtp-train` runs
(`abstract_state` + `compile_steps`). The report gives, per device (one device per chip on
v5p/v5e/v6e; libtpu lists v4 chips as two devices, so a v4 device is half a chip):

- parameter and optimizer-state bytes: the per-device shard sizes of the abstract state;
- argument / output / temporary bytes and their total, from the compiler's memory analysis
  (the total counts the donated state once: argument + output - alias + temp + code);
- the device's HBM capacity (a table by TPU generation) and whether the step fits;
- FLOPs per step: the compiler's count per device (`cost_analysis()`; XLA counts the body of
  a while loop / scan once, so this undercounts scanned layers) and the model's
  (`model_flops(config) * batch * seq_len`, all devices, everything that runs);
- the expected step time at 100% and 50% MFU against the bf16 peak in `train/mfu.py`.

A step that does not fit HBM fails inside the TPU compiler ("Ran out of memory in memory
space hbm"); the plan catches that and reports the compiler's own usage and shortfall. When
it is the eval step that runs out (mtp-train compiles both; eval takes the batch in the same
`train.microbatches` slices), the train step is compiled alone and reported, marked as not
fitting.

From the command line:
    mtp-train --config configs/tpu_7b.py --workdir /tmp/plan --compile_only --topology v5p:4x4x4
Needs libtpu (`pip install 'mtp_jax[tpu]'`); it is only a compiler here, no TPU is used.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math
import os
import re
import time
import warnings
from typing import Any

import jax
import numpy as np

from mtp_jax.config import ConfigError
from mtp_jax.model.config import ModelConfig
from mtp_jax.model.flops import activated_param_count, model_flops, param_count
from mtp_jax.model.layers import attention_impl
from mtp_jax.model.model import Model
from mtp_jax.sharding import make_mesh
from mtp_jax.train.mfu import bandwidth_for_kind, peak_for_kind

GiB = 2**30

# HBM per chip by `device_kind` prefix (longest prefix wins), from the TPU system docs.
# v5p reports "TPU v5", v5e "TPU v5 lite", v6e "TPU v6 lite".
HBM_BYTES_PER_CHIP = {
    "TPU v4": 32 * GiB,
    "TPU v5 lite": 16 * GiB,
    "TPU v5e": 16 * GiB,
    "TPU v5": 95 * GiB,
    "TPU v5p": 95 * GiB,
    "TPU v6 lite": 32 * GiB,
    "TPU v6e": 32 * GiB,
}

TOPOLOGY_EXAMPLES = (
    "v5p:2x2x1 (4 chips), v5p:4x4x4 (64 chips, a v5p-128), v5p:8x8x8 (512 chips), "
    "v5e:2x2 (4 chips), v5e:4x4 (16 chips, a v5litepod-16), v4:2x2x2 (8 chips, a v4-16), "
    "v6e:4x4 (16 chips)"
)
_TOPOLOGY_RE = re.compile(r"^(v\d+[a-z]*):(\d+(x\d+)+)$")

_TPU_EXTRA_HINT = (
    "planning for a TPU slice needs libtpu (used as a compiler only, no TPU required): "
    "pip install 'mtp_jax[tpu]' (or: pip install 'jax[tpu]')"
)


class PlanError(ConfigError):
    """The plan cannot be made: libtpu is missing or the topology name is not understood."""


# ------------------------------------------------------------------------------ the report


@dataclasses.dataclass
class PlanReport:
    """What one train step of `config` needs on each device of a TPU slice.

    All byte counts are per device. `total_bytes` is what the compiled train step holds at
    its peak (state + batch + outputs not aliased to the donated state + temporaries + code);
    `shortfall_bytes` = max(0, total_bytes - hbm_bytes). FLOP counts are per step.
    """

    topology: str
    device_kind: str
    num_devices: int
    num_chips: int
    mesh: dict[str, int]
    global_batch: int
    seq_len: int
    param_count: int
    param_bytes: int  # parameter shards per device
    opt_state_bytes: int  # optimizer-state shards per device (Adam mu and nu, counters)
    argument_bytes: int  # all inputs of the train step per device: state + batch
    output_bytes: int  # outputs per device: new state + metrics
    alias_bytes: int  # outputs written in place of donated inputs
    temp_bytes: int  # the compiler's scratch (activations, gradients, buffers) per device
    code_bytes: int  # generated code per device
    total_bytes: int  # peak per device (see the class docstring)
    hbm_bytes: int  # HBM capacity per device
    fits: bool
    shortfall_bytes: int  # bytes missing per device; 0 if it fits
    compiled_flops: float  # per device, from cost_analysis (scan / while bodies counted once)
    model_flops: float  # per step, all devices: model_flops(config) * batch * seq_len
    peak_flops: float  # bf16 peak per device (FLOP/s)
    step_time_100: float  # seconds per step at 100% MFU
    step_time_50: float  # seconds per step at 50% MFU
    compile_seconds: float
    attention_impl: str = "xla"  # the trunk's training attention: 'splash' (Pallas) or 'xla'
    bytes_accessed: float = 0.0  # per device, from cost_analysis (scan bodies counted once)
    hbm_bandwidth: float = 0.0  # bytes/s per device (chip table)
    flops_per_step: float = 0.0  # per device: what the roofline uses (see flops_source)
    flops_source: str = ""  # 'compiled' or 'model_flops' (when the compiled count is lower)
    roofline_step_seconds: float = 0.0  # max(flops / peak, bytes / bandwidth): a lower bound
    mfu_bound: float = 0.0  # model FLOPs per device / peak / roofline step time: an upper bound
    compiler_message: str = ""  # the TPU compiler's out-of-memory message, if it failed
    notes: list[str] = dataclasses.field(default_factory=list)
    activated_param_count: int = 0  # parameters one token uses (MoE: top_k routed experts)

    @property
    def devices_per_chip(self) -> int:
        return max(self.num_devices // max(self.num_chips, 1), 1)

    @property
    def bytes_per_chip(self) -> int:
        return self.total_bytes * self.devices_per_chip

    @property
    def hbm_per_chip(self) -> int:
        return self.hbm_bytes * self.devices_per_chip

    def to_dict(self) -> dict[str, Any]:
        """All fields plus `devices_per_chip`, `bytes_per_chip` and `hbm_per_chip`,
        JSON-serialisable (what `--plan_json` writes)."""
        out = dataclasses.asdict(self)
        out["devices_per_chip"] = self.devices_per_chip
        out["bytes_per_chip"] = self.bytes_per_chip
        out["hbm_per_chip"] = self.hbm_per_chip
        return out

    def to_text(self) -> str:
        """A readable table: memory per device against HBM, FLOPs and step times."""
        per = "device" if self.devices_per_chip == 1 else f"device (1/{self.devices_per_chip} chip)"
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        tokens = self.global_batch * self.seq_len
        used = 100 * self.total_bytes / max(self.hbm_bytes, 1)
        rows: list[tuple[str, str]] = [
            ("slice", f"{self.topology}: {self.num_chips} chips, {self.num_devices} devices"),
            ("device kind", self.device_kind),
            ("mesh", mesh),
            ("parameters", _params(self.param_count, self.activated_param_count)),
            ("batch", f"{self.global_batch} x {self.seq_len} = {tokens:,} tokens/step"),
            ("", ""),
            (f"memory per {per}", ""),
            ("  parameters", _gib(self.param_bytes)),
            ("  optimizer state", _gib(self.opt_state_bytes)),
            (
                "  batch + other inputs",
                _gib(self.argument_bytes - self.param_bytes - self.opt_state_bytes),
            ),
            ("  outputs not aliased", _gib(self.output_bytes - self.alias_bytes)),
            ("  temporaries", _gib(self.temp_bytes)),
            ("  generated code", _gib(self.code_bytes)),
            ("  total", f"{_gib(self.total_bytes)}  ({used:.0f}% of HBM)"),
            ("  HBM", _gib(self.hbm_bytes)),
            ("  fits", _fits(self)),
            ("", ""),
            ("FLOPs per step", ""),
            ("  model (all devices)", f"{self.model_flops:.4g}"),
            ("  model per device", f"{self.model_flops / self.num_devices:.4g}"),
            (
                "  compiled per device",
                f"{self.compiled_flops:.4g} (scan bodies counted once)"
                if self.compiled_flops
                else "- (not compiled)",
            ),
            ("  peak per device", f"{self.peak_flops / 1e12:.1f} TFLOP/s (bf16)"),
            ("step time at 100% MFU", _seconds(self.step_time_100)),
            ("step time at 50% MFU", _seconds(self.step_time_50)),
            (
                "tokens/s at 50% MFU",
                f"{tokens / self.step_time_50:,.0f}" if self.step_time_50 else "-",
            ),
            ("compile time", f"{self.compile_seconds:.1f} s"),
            ("", ""),
            ("roofline per device", f"(attention: {self.attention_impl})"),
            ("  FLOPs", f"{self.flops_per_step:.4g} ({self.flops_source})"),
            ("  bytes accessed", f"{self.bytes_accessed:.4g} (compiled; scan bodies once)"),
            ("  HBM bandwidth", f"{self.hbm_bandwidth / 1e9:,.0f} GB/s"),
            ("  step time at least", _seconds(self.roofline_step_seconds)),
            ("  MFU at most", f"{100 * self.mfu_bound:.1f}%" if self.mfu_bound else "-"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}".rstrip() for k, v in rows]
        if self.compiler_message:
            lines += ["", "TPU compiler: " + self.compiler_message]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fits(r: PlanReport) -> str:
    if r.fits:
        return "yes"
    if not r.shortfall_bytes:  # the train step fits; the eval step ran out (compiler_message)
        return "NO: the train step fits, the eval step does not"
    return f"NO: short by {_gib(r.shortfall_bytes)}"


def _gib(n: float) -> str:
    """Bytes as GiB, or MiB below 1 GiB."""
    return f"{n / GiB:8.2f} GiB" if abs(n) >= GiB else f"{n / 2**20:8.2f} MiB"


def _seconds(s: float) -> str:
    if not s:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _params(total: int, activated: int) -> str:
    """The parameter count; with MoE (fewer activated than total) both."""
    if not activated or activated == total:
        return _count(total)
    return f"{_count(total)} total, {_count(activated)} activated per token"


# ------------------------------------------------------------------------------ the slice


def _prefix_lookup(table: dict[str, float], kind: str) -> float | None:
    matches = [k for k in table if kind.startswith(k)]
    return table[max(matches, key=len)] if matches else None


def hbm_per_chip(device_kind: str) -> int | None:
    """HBM bytes per chip for a TPU `device_kind`, or None if unknown."""
    value = _prefix_lookup(HBM_BYTES_PER_CHIP, device_kind)
    return None if value is None else int(value)


def topology_devices(topology: str) -> list:
    """The devices of a TPU slice named like 'v5p:4x4x4', from libtpu (no TPU needed)."""
    name = topology.strip()
    if not _TOPOLOGY_RE.match(name):
        hint = ""
        accel = re.match(r"^(v\d+[a-z]*)-(\d+)$", name)
        if accel:
            hint = (
                f" ('{name}' looks like an accelerator type; give the chip topology instead, "
                "e.g. v5p-128 -> v5p:4x4x4, v5litepod-16 -> v5e:4x4)"
            )
        raise PlanError(
            f"unknown TPU topology {topology!r}{hint}; expected GENERATION:AxB[xC], "
            f"for example {TOPOLOGY_EXAMPLES}"
        )
    if importlib.util.find_spec("libtpu") is None:
        raise PlanError(_TPU_EXTRA_HINT)
    # libtpu takes /tmp/libtpu_lockfile so that one process owns the TPU; only its compiler
    # is used here, so let plans run beside each other (parallel tests, a second terminal).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # noqa: BLE001 - libtpu reports bad names as runtime errors
        raise PlanError(
            f"libtpu does not know the TPU topology {topology!r} ({_first_line(e)}); "
            f"examples: {TOPOLOGY_EXAMPLES}"
        ) from e
    return list(desc.devices)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _num_chips(devices: list) -> int:
    coords = {tuple(getattr(d, "coords", None) or (d.id,)) for d in devices}
    return len(coords)


# ------------------------------------------------------------------------------ the plan


def _shard_bytes(abstract: Any, shardings: Any) -> int:
    """Bytes one device holds of a tree of abstract arrays laid out by `shardings`."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True):
        shard = sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


# The TPU compiler's out-of-memory messages (sizes in binary units, e.g. 15.75G):
#   "Ran out of memory in memory space hbm. Used 30.53G of 15.75G hbm. Exceeded hbm capacity
#    by 14.78G."                                  (everything, arguments included)
#   "Ran out of memory on HBM, the total memory required for HLO temporaries (18.27G) exceeds
#    available HBM (15.75G)."                     (temporaries only)
_SIZE = r"([\d.]+)\s*([KMGT]?)i?B?"
_OOM_USED = re.compile(rf"Used\s+{_SIZE}\s+of\s+{_SIZE}\s+hbm", re.I)
_OOM_TEMPS = re.compile(rf"temporaries\s*\({_SIZE}\)\s*exceeds available HBM", re.I)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _size(value: str, unit: str) -> int:
    return int(float(value) * _UNITS[unit.upper()])


def _is_hbm_oom(e: BaseException) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def _oom_summary(text: str) -> str:
    """The lines of the compiler's message that give sizes (or its first line)."""
    keys = ("Ran out of memory", "Used ", "Exceeded", "exceeds")
    lines = [line.strip() for line in text.splitlines() if any(k in line for k in keys)]
    return " ".join(lines) if lines else _first_line(RuntimeError(text))


def plan(config: Any, topology: str) -> PlanReport:
    """Compiles `config`'s train step for the TPU slice `topology` and reports what it needs.

    Raises PlanError (a ConfigError) if libtpu is missing or the topology is unknown, and
    ConfigError if the config does not suit the slice (mesh or batch not dividing).
    """
    from mtp_jax.train.loop import check_batch, memory_report
    from mtp_jax.train.state import abstract_state, make_optimizer
    from mtp_jax.train.step import compile_steps

    devices = topology_devices(topology)
    kind = devices[0].device_kind
    num_chips = _num_chips(devices)
    per_chip = max(len(devices) // num_chips, 1)
    notes: list[str] = []

    hbm_chip = hbm_per_chip(kind)
    if hbm_chip is None:
        raise PlanError(
            f"no HBM size known for device kind {kind!r}; known: {', '.join(HBM_BYTES_PER_CHIP)}"
        )
    hbm = hbm_chip // per_chip
    peak_chip = config.train.peak_flops or peak_for_kind(kind) or 0.0
    peak = peak_chip / per_chip if not config.train.peak_flops else peak_chip
    if per_chip > 1:
        notes.append(
            f"libtpu lists each {kind} chip as {per_chip} devices; memory and peak are per "
            "device (a share of the chip)"
        )

    mesh = make_mesh(config.mesh, devices)
    check_batch(config, mesh)
    model = Model(config.model)
    tx = make_optimizer(config)
    abstract, shardings = abstract_state(config, model, tx, mesh)
    param_bytes = _shard_bytes(abstract.params, shardings.params)
    opt_bytes = _shard_bytes(abstract.opt_state, shardings.opt_state)

    batch, seq = config.data.batch_size, config.data.seq_len
    flops_model = model_flops(config) * batch * seq
    bandwidth = (bandwidth_for_kind(kind) or 0.0) / per_chip
    with jax.set_mesh(mesh):  # what the compiled trunk's attention will be on this slice
        attention = attention_impl(
            ModelConfig.from_any(config.model), seq, cached=False, masked=True
        )
    step_100 = flops_model / (peak * len(devices)) if peak else 0.0

    start = time.perf_counter()
    compiler_message = ""
    eval_oom = False
    # Executables compiled for a topology (no client) cannot be read back from JAX's
    # persistent compilation cache: keep them out of it (no writes; a stale entry only warns).
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Error reading persistent compilation cache")
            train_c, _ = compile_steps(config, model, tx, mesh, shardings, abstract)
    except Exception as e:  # noqa: BLE001 - the TPU compiler reports OOM as a runtime error
        if not _is_hbm_oom(e):
            raise
        train_c = None
        compiler_message = _oom_summary(str(e))
        # compile_steps compiles the train step, then the eval step: which one ran out?
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Error reading persistent compilation cache")
                train_c = _compile_train_step(config, model, tx, mesh, shardings, abstract)
        except Exception as e2:  # noqa: BLE001 - as above
            if not _is_hbm_oom(e2):
                raise
        if train_c is not None:
            eval_oom = True
            compiler_message = "eval step: " + compiler_message
            notes.append(
                "the sizes above are the train step's; the eval step (the batch in "
                "train.microbatches slices, no gradients) ran out of HBM, and mtp-train "
                "compiles both"
            )
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
    compile_seconds = time.perf_counter() - start

    if train_c is not None:
        mem = memory_report(train_c)
        code = int(getattr(train_c.memory_analysis(), "generated_code_size_in_bytes", 0))
        cost = train_c.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        compiled_flops = float((cost or {}).get("flops", 0.0))
        bytes_accessed = float((cost or {}).get("bytes accessed", 0.0))
        arg, out, alias = mem["argument_bytes"], mem["output_bytes"], mem["alias_bytes"]
        temp = mem["temp_bytes"]
        total = arg + out - alias + temp + code
        shortfall = max(0, total - hbm)
    else:
        # The compiler refused: take its own accounting.
        state_bytes = param_bytes + opt_bytes
        used = _OOM_USED.search(compiler_message)
        temps = _OOM_TEMPS.search(compiler_message)
        if used:
            total = _size(*used.group(1, 2))
            temp = max(total - state_bytes, 0)
        elif temps:
            temp = _size(*temps.group(1, 2))
            total = state_bytes + temp
        else:  # an unknown message: at least the state, and more than fits
            temp = 0
            total = max(state_bytes, hbm + 1)
        total = max(total, hbm + 1)
        shortfall = total - hbm
        arg, out, alias, code = state_bytes, 0, 0, 0
        compiled_flops = bytes_accessed = 0.0
        notes.append(
            "the TPU compiler stopped at its memory check: the sizes above are the state's "
            "shards plus the compiler's figure; the real need may be larger"
        )

    roof = roofline(compiled_flops, flops_model / len(devices), bytes_accessed, peak, bandwidth)
    if roof["flops_source"] == "model_flops":
        notes.append(
            "roofline FLOPs from model_flops: the compiled count is lower (XLA counts a scan "
            "body once"
            + (", and not the splash kernel's FLOPs at all" if attention == "splash" else "")
            + ")"
        )
    return PlanReport(
        topology=topology,
        device_kind=kind,
        num_devices=len(devices),
        num_chips=num_chips,
        mesh={k: int(v) for k, v in mesh.shape.items()},
        global_batch=batch,
        seq_len=seq,
        param_count=param_count(config),
        activated_param_count=activated_param_count(config),
        param_bytes=param_bytes,
        opt_state_bytes=opt_bytes,
        argument_bytes=arg,
        output_bytes=out,
        alias_bytes=alias,
        temp_bytes=temp,
        code_bytes=code,
        total_bytes=total,
        hbm_bytes=hbm,
        fits=shortfall == 0 and not eval_oom,
        shortfall_bytes=shortfall,
        compiled_flops=compiled_flops,
        model_flops=flops_model,
        peak_flops=peak,
        step_time_100=step_100,
        step_time_50=2 * step_100,
        compile_seconds=compile_seconds,
        compiler_message=compiler_message,
        notes=notes,
        attention_impl=attention,
        bytes_accessed=bytes_accessed,
        hbm_bandwidth=bandwidth,
        **roof,
    )


def _compile_train_step(config: Any, model: Model, tx, mesh, shardings: Any, abstract: Any):
    """The train step alone, compiled as `compile_steps` compiles it (to tell, after an
    out-of-memory error there, whether the train or the eval step ran out)."""
    import jax.numpy as jnp

    from mtp_jax.sharding import batch_sharding, replicated, with_shardings
    from mtp_jax.train.step import make_train_step, mesh_context
    from mtp_jax.window import WindowSpec

    rows = batch_sharding(mesh)
    batch = dict(WindowSpec.from_config(config).abstract_batch(rows))
    if config.train.nan_batches:
        poison = jax.ShapeDtypeStruct((config.data.batch_size,), jnp.float32, sharding=rows)
        batch["poison"] = poison
    step = jax.jit(
        make_train_step(config, model, tx),
        in_shardings=(shardings, {k: rows for k in batch}),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=0,
    )
    with mesh_context(mesh):
        return step.lower(with_shardings(abstract, shardings), batch).compile()


def roofline(
    compiled_flops: float, model_flops: float, bytes_accessed: float, peak: float, bandwidth: float
) -> dict[str, Any]:
    """The step-time lower bound and MFU upper bound of one device.

    FLOPs are the compiled count unless the model's own count (`model_flops`, per device) is
    higher: XLA's cost analysis counts a scan body once and never sees inside Pallas kernels.
    step >= max(FLOPs / peak, bytes accessed / HBM bandwidth); MFU <= (model FLOPs / peak) /
    that step time.
    """
    flops, source = compiled_flops, "compiled"
    if model_flops > compiled_flops:
        flops, source = model_flops, "model_flops"
    compute = flops / peak if peak else 0.0
    memory = bytes_accessed / bandwidth if bandwidth else 0.0
    step = max(compute, memory)
    mfu = (model_flops / peak) / step if peak and step else 0.0
    return {
        "flops_per_step": flops,
        "flops_source": source,
        "roofline_step_seconds": step,
        "mfu_bound": mfu,
    }


def plan_verdict(config: Any, config_path: str, report: PlanReport) -> str:
    """One line: whether `config` fits the slice and, if not, what to try."""
    need, hbm = _gib(report.total_bytes).strip(), _gib(report.hbm_bytes).strip()
    if report.fits:
        return f"{config_path} fits {report.topology}: {need} of {hbm} per device"
    if not report.shortfall_bytes:
        return (
            f"{config_path} does NOT fit {report.topology}: the train step needs {need} of "
            f"{hbm} per device, but the eval step runs out of HBM ({report.compiler_message}). "
            f"Try: a smaller data.batch_size (now {config.data.batch_size}; eval runs it whole)"
            + ("" if report.mesh.get("expert", 1) == 1 else "; a smaller mesh.expert")
            + "; a bigger slice."
        )
    return (
        f"{config_path} does NOT fit {report.topology}: each device needs {need} of {hbm} HBM, "
        f"short by {_gib(report.shortfall_bytes).strip()}. "
        f"Try: {'; '.join(_remedies(config, report))}."
    )


def _remedies(config: Any, report: PlanReport) -> list[str]:
    """What could make the step fit, given what the config already does."""
    out = []
    sharded = report.mesh["fsdp"] * report.mesh.get("expert", 1) * report.mesh["tensor"]
    if sharded < report.num_devices:  # mesh.data > 1 replicates the whole state
        out.append("shard the state over more devices (mesh.fsdp=-1 or mesh.tensor)")
    experts, ep = config.model.moe.num_experts, report.mesh.get("expert", 1)
    if experts and any(
        n > ep and experts % n == 0 and report.num_devices % n == 0 for n in range(2, experts + 1)
    ):
        out.append(
            f"shard the experts over more devices (mesh.expert, now {ep}; a divisor of "
            f"model.moe.num_experts={experts})"
        )
    if config.model.remat_policy != "full":
        out.append("model.remat_policy=full")
    out.append(f"more train.microbatches (now {config.train.microbatches})")
    out.append(f"a smaller data.batch_size (now {config.data.batch_size})")
    out.append("a bigger slice")
    return out


# ------------------------------------------------------------------------------ the search


@dataclasses.dataclass
class Candidate:
    """One layout tried by `search`: its overrides and its plan (None if it failed)."""

    overrides: dict[str, Any]
    report: PlanReport | None
    error: str = ""


def candidate_overrides(config: Any, num_devices: int, limit: int = 12) -> list[dict[str, Any]]:
    """A small set of layouts for `num_devices` devices: (fsdp, expert, tensor) splits of the
    slice (tensor dividing the attention heads: the key/value heads of GQA, every head of MLA;
    expert > 1 only with MoE layers, dividing model.moe.num_experts) x remat policies x
    microbatches that divide the batch, ordered by how many settings differ from the config's
    own (so that a short list still varies every setting). At most `limit`."""
    m, batch = config.model, config.data.batch_size
    heads = m.n_heads if m.get("attention", "gqa") == "mla" else m.n_kv_heads
    experts = int(m.moe.num_experts) if "moe" in m else 0
    splits = [
        (expert, tensor)
        for expert in (1, 2, 4, 8, 16, 32, 64)
        if expert == 1 or (experts and experts % expert == 0)
        for tensor in (1, 2, 4, 8)
        if heads % tensor == 0 and num_devices % (expert * tensor) == 0
    ]
    remats = list(dict.fromkeys([m.remat_policy, "dots_no_batch", "full"]))
    micros = [
        n
        for n in dict.fromkeys([config.train.microbatches, 1, 2, 4])
        if batch % n == 0 and (batch // n) % num_devices == 0
    ] or [config.train.microbatches]
    own = {
        "mesh.tensor": config.mesh.tensor if config.mesh.tensor > 0 else None,
        "mesh.expert": config.mesh.get("expert", 1),
        "model.remat_policy": m.remat_policy,
        "train.microbatches": config.train.microbatches,
    }
    out = [
        {
            "mesh.data": 1,
            "mesh.fsdp": num_devices // (expert * tensor),
            "mesh.expert": expert,
            "mesh.tensor": tensor,
            "model.remat_policy": remat,
            "train.microbatches": micro,
        }
        for remat, micro, (expert, tensor) in itertools.product(remats, micros, splits)
    ]
    out.sort(key=lambda o: sum(o[k] != v for k, v in own.items()))  # stable: keeps the order
    return out[:limit]


def search(config: Any, topology: str, limit: int = 12, progress: Any = None) -> list[Candidate]:
    """Plans each of `candidate_overrides` on the slice; returns them ranked: those that fit
    by roofline step time, then those that do not (by memory), then failures."""
    from mtp_jax.config import ConfigDict, validate

    devices = topology_devices(topology)
    found = []
    for overrides in candidate_overrides(config, len(devices), limit):
        c = ConfigDict(config.to_dict())
        for key, value in overrides.items():
            section, leaf = key.split(".")
            c[section][leaf] = value
        try:
            validate(c)
            found.append(Candidate(overrides, plan(c, topology)))
        except ConfigError as e:
            found.append(Candidate(overrides, None, str(e)))
        if progress is not None:
            progress(found[-1])

    def rank(c: Candidate):
        r = c.report
        if r is None:
            return (2, 0.0)
        return (0, r.roofline_step_seconds) if r.fits else (1, r.total_bytes)

    return sorted(found, key=rank)


def search_table(candidates: list[Candidate]) -> str:
    """The ranked candidates as a markdown table."""
    rows = [
        "| rank | mesh (data x fsdp x expert x tensor) | remat | microbatches | fits "
        "| GiB per chip | step >= | MFU <= | compile s |",
        "|---:|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for i, c in enumerate(candidates, start=1):
        o = c.overrides
        mesh = (
            f"{o['mesh.data']} x {o['mesh.fsdp']} x {o.get('mesh.expert', 1)} x {o['mesh.tensor']}"
        )
        head = f"| {i} | {mesh} | {o['model.remat_policy']} | {o['train.microbatches']} "
        r = c.report
        if r is None:
            rows.append(head + f"| error: {c.error[:60]} | | | | |")
            continue
        fits = "yes" if r.fits else f"NO (short {r.shortfall_bytes / GiB:.1f} GiB)"
        mfu = f"{100 * r.mfu_bound:.0f}%" if r.mfu_bound else "-"
        rows.append(
            head + f"| {fits} | {r.bytes_per_chip / GiB:.2f} | {_seconds(r.roofline_step_seconds)} "
            f"| {mfu} | {r.compile_seconds:.1f} |"
        )
    return "\n".join(rows)
