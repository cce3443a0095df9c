"""Configs: Python files with `get_config()`, command-line overrides, one validation pass.

A config file returns an `ml_collections.ConfigDict` built on `base_config()`, which declares
every key with a one-line comment. `load_config` applies `"a.b=value"` overrides, locks the
dict (unknown keys are errors) and validates every value before anything compiles. Every error
names the key, the bad value and what is accepted.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import os
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections

from mtp_jax.checks import (
    Check,
    ConfigError,
    boolean,
    choice,
    fail,
    integer,
    mesh_axis,
    number,
    string,
    weights,
)
from mtp_jax.model.config import ModelConfig, MoEConfig, RopeScalingConfig

ConfigDict = ml_collections.ConfigDict

SCHEDULES = ("cosine", "wsd", "constant")
DATA_SOURCES = ("store", "synthetic")
OBJECTIVES = ("ce", "distill", "tv")  # loss.mtp_objective (mtp_jax.loss.mtp_loss)
TRAINABLE = ("all", "mtp")  # train.trainable

__all__ = ["ConfigDict", "ConfigError", "base_config", "load_config", "validate"]


def base_config() -> ConfigDict:
    """Every key mtp_jax understands, with its default and what it means."""
    c = ConfigDict()
    c.seed = 0  # PRNG seed: parameter init, data order

    # model.*: declared once, with defaults, meanings and checks, in mtp_jax/model/config.py
    c.model = ConfigDict(ModelConfig.defaults())

    lo = c.loss = ConfigDict()
    lo.mtp_lambda = 0.3  # weight lambda of every MTP depth's loss (L = L0 + sum_k lambda_k L^k)
    lo.mtp_lambda_per_depth = ()  # optional tuple of D weights; overrides mtp_lambda
    lo.mtp_lambda_final = -1.0  # lambda after the switch (e.g. 0.1); < 0 keeps lambda constant
    lo.mtp_lambda_switch_step = -1  # step of the switch; -1 = when the LR starts to decay
    # e.g. ((0.0, (0.5, 0.25)), (0.3333, (0.5, 0.0)), (0.6667, (0.0, 0.0))): MTP early, NTP last
    lo.mtp_lambda_schedule = ()  # (fraction, (lambda_1..lambda_D)) points, linear between; () = off
    lo.mtp_detach_trunk = False  # depths' loss stops at h^0 and their embeddings: drafter-only
    lo.chunk_size = 128  # sequence chunk of the remat'ed logits/loss; 0 = full [B, S, V] logits
    lo.mtp_objective = "ce"  # depths' loss: ce (data tokens) | distill (KL from trunk) | tv (Bebop)

    d = c.data = ConfigDict()
    d.source = "store"  # 'store' (tensorstore token store) or 'synthetic' (random tokens)
    d.path = ""  # store directory (local or gs://); '' = a cache dir named after the corpus
    d.mixture = ()  # weighted stores instead of data.path: (('STORE_A', 0.8), ('STORE_B', 0.2))
    d.mixture_schedule = ()  # phases of weights: ((0.0, (0.8, 0.2)), (0.5, (0.5, 0.5))); () = fixed
    d.corpus = "stdlib"  # text to prepare when the store is missing: 'stdlib', dir, glob, .jsonl
    d.text_field = "text"  # JSONL field holding the document text
    d.tokenizer = "byte"  # 'byte', a SentencePiece .model or a HF tokenizer.json
    d.val_fraction = 0.02  # fraction of documents held out for eval (by document)
    d.verify_tokens = 1 << 28  # tokens per store split scanned at start (ids, chunks); 0 = none
    d.seq_len = 128  # S, positions scored per example (windows hold S + D + 1 tokens)
    d.batch_size = 16  # global batch (examples per step, over all processes)
    d.shuffle = True  # globally shuffle windows each epoch (seeded)
    d.worker_count = 0  # Grain worker processes per host (0 = in-process)
    d.prefetch = 2  # batches prefetched per host

    t = c.train = ConfigDict()
    t.steps = 300  # optimizer steps
    t.lr = 3e-3  # peak learning rate
    t.min_lr_ratio = 0.1  # final LR as a fraction of the peak
    t.warmup_steps = 30  # linear warmup steps
    t.schedule = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    t.decay_fraction = 0.2  # wsd: fraction of the steps spent decaying
    t.weight_decay = 0.1  # AdamW weight decay (not applied to norms and biases)
    t.b1 = 0.9  # AdamW beta1
    t.b2 = 0.95  # AdamW beta2
    t.eps = 1e-8  # AdamW epsilon
    t.grad_clip = 1.0  # global-norm gradient clipping; 0 = off
    t.microbatches = 1  # gradient accumulation: microbatches per step
    t.log_every = 25  # steps between logged metrics
    t.eval_every = 100  # steps between evals on the validation split; 0 = never
    t.eval_steps = 4  # batches per eval
    t.peak_flops = 0.0  # per-device peak FLOP/s for MFU; 0 = known chip table / measured
    t.on_nonfinite = "stop"  # NaN/inf loss: stop | skip (that update) | rollback (past the batch)
    t.max_nonfinite = 3  # skip: stop after this many bad steps in a row; rollback: after this many
    t.nan_batches = ()  # fault drill: batches (1 = the first served) whose loss is made NaN
    t.trainable = "all"  # all | mtp: only the MTP depths train, the trunk (embed, head) is frozen

    k = c.checkpoint = ConfigDict()
    k.every = 100  # steps between checkpoints; 0 = only at the end
    k.keep = 2  # most recent checkpoints kept
    k.keep_every = 0  # additionally keep every M-th step; 0 = none
    k.async_save = True  # save in the background while training goes on

    ms = c.mesh = ConfigDict()
    ms.data = -1  # data-parallel axis size; -1 = the devices left over
    ms.fsdp = 1  # parameter-sharding (ZeRO-3) axis size
    ms.tensor = 1  # tensor-parallel axis size
    ms.expert = 1  # expert-parallel axis size (MoE experts split over it; it splits the batch too)
    ms.max_replicated_fraction = 0.1  # fsdp x tensor > 1: most param bytes every device holds

    i = c.init = ConfigDict()
    i.from_hf = ""  # start from a HF safetensors dir (Llama / DeepSeek-V3 naming); new depths fresh
    i.from_workdir = ""  # start from another run's newest checkpoint (parameters only)
    return c


# ------------------------------------------------------------------------------ loading


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> ConfigDict:
    """Loads `get_config()` from a Python file, applies overrides, locks and validates.

    Args:
      path: a config file such as `configs/smoke.py`.
      overrides: strings `"model.mtp_depth=3"` (a leading `--config.` is accepted too).
    Raises:
      ConfigError naming the key, value and what is accepted; FileNotFoundError for `path`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_mtp_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config()")
    config = module.get_config()
    _check_keys_known(config, base_config(), where=path)
    config = merge_into_base(config)
    apply_overrides(config, overrides)
    config.lock()
    validate(config)
    return config


def merge_into_base(config: ConfigDict) -> ConfigDict:
    """A full config: `base_config()` with the values of `config` (a partial one) on top."""
    full = base_config()
    full.update(config)
    return full


def config_from_dict(values: dict) -> ConfigDict:
    """Rebuilds a validated, locked config from `to_dict()` output (e.g. a checkpoint's JSON)."""
    _check_keys_known(ConfigDict(values), base_config(), where="saved config")
    config = merge_into_base(ConfigDict(values))
    for key, value in _flatten(config.to_dict()):
        if isinstance(value, list):
            _set(config, key, _tuples(value))
    config.lock()
    validate(config)
    return config


def _tuples(value: Any) -> Any:
    """JSON lists back to the (nested) tuples of the config, e.g. data.mixture's pairs."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


def all_keys(config: ConfigDict | None = None) -> list[str]:
    """Every dotted key of `config` (default: the base config)."""
    return [k for k, _ in _flatten((config or base_config()).to_dict())]


def _unknown_key_error(key: str, valid: Sequence[str], where: str = "") -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    leaf = key.rsplit(".", 1)[-1]
    close += [k for k in valid if k.endswith("." + leaf) and k not in close][:2]
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    src = f" (in {where})" if where else ""
    return ConfigError(f"unknown config key {key!r}{src}{hint}")


def _check_keys_known(config: ConfigDict, base: ConfigDict, where: str) -> None:
    valid = all_keys(base)
    valid_groups = {k.rsplit(".", 1)[0] for k in valid if "." in k}
    for key, _ in _flatten(config.to_dict()):
        if key not in valid and key not in valid_groups:
            raise _unknown_key_error(key, valid, where)


def _get(config: ConfigDict, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _set(config: ConfigDict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


def _coerce(key: str, raw: str, current: Any) -> Any:
    """Parses the text of an override into the type of the key's current value."""
    text = raw.strip()
    try:
        literal = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        literal = text
    bad = ConfigError(
        f"config key {key!r}: cannot use {raw!r}, expected {type(current).__name__} "
        f"(current value {current!r})"
    )
    if isinstance(current, bool):
        if isinstance(literal, bool):
            return literal
        low = text.lower()
        if low in ("true", "yes", "1"):
            return True
        if low in ("false", "no", "0"):
            return False
        raise bad
    if isinstance(current, int):
        if isinstance(literal, int) and not isinstance(literal, bool):
            return literal
        if isinstance(literal, float) and literal.is_integer():
            return int(literal)
        raise bad
    if isinstance(current, float):
        if isinstance(literal, int | float) and not isinstance(literal, bool):
            return float(literal)
        raise bad
    if isinstance(current, str):
        return literal if isinstance(literal, str) else text
    if isinstance(current, tuple):
        if isinstance(literal, list | tuple):
            return tuple(literal)
        if isinstance(literal, int | float):
            return (literal,)
        raise bad
    return literal


def apply_overrides(config: ConfigDict, overrides: Iterable[str]) -> None:
    """Applies `"a.b=value"` strings in order; unknown keys and unparsable values raise."""
    valid = all_keys(config)
    for item in overrides:
        text = item[len("--config.") :] if item.startswith("--config.") else item
        if "=" not in text:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = text.split("=", 1)
        key = key.strip()
        if key not in valid:
            raise _unknown_key_error(key, valid)
        _set(config, key, _coerce(key, raw, _get(config, key)))


# ------------------------------------------------------------------------------ validation

RULES: dict[str, Check] = {
    "seed": integer(0),
    **{
        f"model.{n}": f.metadata["check"]
        for n, f in ModelConfig.declared().items()
        if n not in ("moe", "rope_scaling")
    },
    **{f"model.moe.{n}": f.metadata["check"] for n, f in MoEConfig.declared().items()},
    **{
        f"model.rope_scaling.{n}": f.metadata["check"]
        for n, f in RopeScalingConfig.declared().items()
    },
    "loss.mtp_lambda": number(0),
    "loss.mtp_lambda_per_depth": weights(),
    "loss.mtp_lambda_final": number(),
    "loss.mtp_lambda_switch_step": integer(-1),
    "loss.mtp_lambda_schedule": (
        lambda v: isinstance(v, tuple),
        "a tuple of (training fraction, (one lambda per MTP depth)) points",
    ),
    "loss.mtp_detach_trunk": boolean(),
    "loss.chunk_size": integer(0),
    "loss.mtp_objective": choice(OBJECTIVES),
    "data.source": choice(DATA_SOURCES),
    "data.path": string(),
    "data.mixture": (
        lambda v: isinstance(v, tuple),
        "a tuple of (store path, weight) or (store path, weight, name) entries",
    ),
    "data.mixture_schedule": (
        lambda v: isinstance(v, tuple),
        "a tuple of (start fraction, (one weight per data.mixture source)) entries",
    ),
    "data.corpus": string(),
    "data.text_field": string(),
    "data.tokenizer": string(),
    "data.val_fraction": number(0, 0.5),
    "data.verify_tokens": integer(0),
    "data.seq_len": integer(1),
    "data.batch_size": integer(1),
    "data.shuffle": boolean(),
    "data.worker_count": integer(0),
    "data.prefetch": integer(0),
    "train.steps": integer(1),
    "train.lr": number(0, open_lo=True),
    "train.min_lr_ratio": number(0, 1),
    "train.warmup_steps": integer(0),
    "train.schedule": choice(SCHEDULES),
    "train.decay_fraction": number(0, 1, open_lo=True),
    "train.weight_decay": number(0),
    "train.b1": number(0, 1),
    "train.b2": number(0, 1),
    "train.eps": number(0, open_lo=True),
    "train.grad_clip": number(0),
    "train.microbatches": integer(1),
    "train.log_every": integer(1),
    "train.eval_every": integer(0),
    "train.eval_steps": integer(1),
    "train.peak_flops": number(0),
    "train.on_nonfinite": choice(("stop", "skip", "rollback")),
    "train.max_nonfinite": integer(1),
    "train.nan_batches": (
        lambda v: isinstance(v, tuple) and all(isinstance(x, int) and x >= 1 for x in v),
        "a tuple of batch numbers >= 1",
    ),
    "train.trainable": choice(TRAINABLE),
    "checkpoint.every": integer(0),
    "checkpoint.keep": integer(1),
    "checkpoint.keep_every": integer(0),
    "checkpoint.async_save": boolean(),
    "mesh.data": mesh_axis(),
    "mesh.fsdp": mesh_axis(),
    "mesh.tensor": mesh_axis(),
    "mesh.expert": mesh_axis(),
    "mesh.max_replicated_fraction": number(0, 1),
    "init.from_hf": string(),
    "init.from_workdir": string(),
}


def validate(config: ConfigDict) -> None:
    """Checks every key's value and the relations between keys; raises ConfigError."""
    for key, value in _flatten(config.to_dict()):
        if key not in RULES:
            raise _unknown_key_error(key, list(RULES))
        if isinstance(value, list):
            value = tuple(value)
        ok, accepted = RULES[key]
        if not ok(value):
            fail(key, value, accepted)

    m, lo, d, t = config.model, config.loss, config.data, config.train
    ModelConfig.validate(m.to_dict())
    if lo.mtp_lambda_per_depth and len(lo.mtp_lambda_per_depth) != m.mtp_depth:
        fail(
            "loss.mtp_lambda_per_depth",
            lo.mtp_lambda_per_depth,
            f"exactly model.mtp_depth={m.mtp_depth} weights, or an empty tuple",
        )
    _validate_lambda_schedule(lo, m.mtp_depth)
    for key, value, plain in (
        ("train.trainable", t.trainable, "all"),
        ("loss.mtp_objective", lo.mtp_objective, "ce"),
        ("loss.mtp_detach_trunk", lo.mtp_detach_trunk, False),
    ):
        if value != plain and m.mtp_depth == 0:
            fail(key, value, f"{plain!r} with model.mtp_depth=0 ({value!r} needs MTP depths)")
    if m.attention_impl == "splash" and d.seq_len % 128:
        fail(
            "model.attention_impl",
            m.attention_impl,
            f"'splash' only with data.seq_len a multiple of 128 (it is {d.seq_len}); or 'auto'",
        )
    if lo.chunk_size and d.seq_len % lo.chunk_size:
        fail(
            "loss.chunk_size",
            lo.chunk_size,
            f"0 or a divisor of data.seq_len={d.seq_len}",
        )
    if d.batch_size % t.microbatches:
        fail(
            "train.microbatches",
            t.microbatches,
            f"a divisor of data.batch_size={d.batch_size}",
        )
    _validate_mixture(d, t.steps)
    if config.init.from_hf and config.init.from_workdir:
        fail("init.from_workdir", config.init.from_workdir, "'' when init.from_hf is set")
    ms = config.mesh
    if sum(v == -1 for v in (ms.data, ms.fsdp, ms.expert, ms.tensor)) > 1:
        fail("mesh.fsdp", ms.fsdp, "-1 on at most one of mesh.data/fsdp/expert/tensor")
    experts = m.moe.num_experts
    if ms.expert != 1 and (experts == 0 or ms.expert == -1 or experts % ms.expert):
        fail(
            "mesh.expert",
            ms.expert,
            f"1, or a divisor of model.moe.num_experts={experts} (each device holds "
            "num_experts / mesh.expert experts)",
        )


# ------------------------------------------------------------------------------ data.mixture


@dataclasses.dataclass(frozen=True)
class MixtureSource:
    """One mixture component: a token store and its (normalised) weight."""

    name: str
    path: str
    weight: float


def _entries(value: Any, key: str) -> list[tuple]:
    if not isinstance(value, list | tuple):
        raise ConfigError(f"config key {key!r} must be a tuple of tuples, got {value!r}")
    out = []
    for entry in value:
        if not isinstance(entry, list | tuple):
            raise ConfigError(f"config key {key!r}: entry {entry!r} is not a tuple")
        out.append(tuple(entry))
    return out


def _weights_of(value: Any, n: int) -> bool:
    """Whether `value` is a tuple/list of `n` numbers >= 0."""
    return (
        isinstance(value, list | tuple)
        and len(value) == n
        and all(isinstance(w, int | float) and not isinstance(w, bool) and w >= 0 for w in value)
    )


def _normalised(weights: Sequence[float], key: str) -> tuple[float, ...]:
    total = float(sum(weights))
    if total <= 0:
        raise ConfigError(f"config key {key!r}: the weights {tuple(weights)} sum to 0")
    return tuple(float(w) / total for w in weights)


def _default_name(path: str) -> str:
    return os.path.basename(path.rstrip("/")) or path


def mixture_sources(mixture: Sequence) -> list[MixtureSource]:
    """The mixture's sources with normalised weights and unique names.

    Args:
      mixture: `data.mixture`: (path, weight) or (path, weight, name) entries.
    Raises:
      ConfigError naming `data.mixture` and the bad entry.
    """
    key = "data.mixture"
    entries = _entries(mixture, key)
    for e in entries:
        if not (
            len(e) in (2, 3)
            and isinstance(e[0], str)
            and e[0]
            and isinstance(e[1], int | float)
            and not isinstance(e[1], bool)
            and e[1] >= 0
            and (len(e) == 2 or (isinstance(e[2], str) and e[2]))
        ):
            raise ConfigError(
                f"config key {key!r}: entry {e!r} is not (store path, weight >= 0) or "
                "(store path, weight, name)"
            )
    weights = _normalised([e[1] for e in entries], key)
    names = [e[2] if len(e) == 3 else _default_name(e[0]) for e in entries]
    for i, n in enumerate(names):  # same basenames (e.g. two .../train stores): number them
        if names.count(n) > 1 and len(entries[i]) == 2:
            names[i] = f"{n}_{i}"
    if len(set(names)) != len(names):
        raise ConfigError(f"config key {key!r}: source names {names} are not unique")
    paths = [e[0] for e in entries]
    if len(set(paths)) != len(paths):
        raise ConfigError(f"config key {key!r}: a store appears twice in {paths}")
    return [MixtureSource(n, p, w) for n, p, w in zip(names, paths, weights, strict=True)]


def mixture_phases(
    mixture: Sequence, schedule: Sequence, total_steps: int
) -> list[tuple[int, tuple[float, ...]]]:
    """[(first step, normalised weights)] of each phase, the first at step 0.

    Args:
      mixture: `data.mixture` (its weights are the schedule when `schedule` is empty).
      schedule: `data.mixture_schedule`: (start fraction, weights) entries, fractions
        increasing from 0.0, one weight per source.
      total_steps: `train.steps`, which turns fractions into steps.
    """
    src = mixture_sources(mixture)
    if not schedule:
        return [(0, tuple(s.weight for s in src))]
    key = "data.mixture_schedule"
    out: list[tuple[int, tuple[float, ...]]] = []
    last = -1.0
    for e in _entries(schedule, key):
        ok = (
            len(e) == 2
            and isinstance(e[0], int | float)
            and 0 <= e[0] < 1
            and e[0] > last
            and _weights_of(e[1], len(src))
        )
        if not ok:
            raise ConfigError(
                f"config key {key!r}: entry {e!r} is not (start fraction in [0, 1), increasing, "
                f"({len(src)} weights >= 0, one per data.mixture source))"
            )
        last = float(e[0])
        out.append((round(last * total_steps), _normalised(e[1], key)))
    if out[0][0] != 0 or schedule[0][0] != 0:
        raise ConfigError(f"config key {key!r}: the first phase must start at fraction 0.0")
    return out


def _validate_mixture(d: ConfigDict, steps: int) -> None:
    if d.mixture_schedule and not d.mixture:
        fail("data.mixture_schedule", d.mixture_schedule, "a schedule only with data.mixture set")
    if not d.mixture:
        return
    mixture_phases(d.mixture, d.mixture_schedule, steps)
    if d.source != "store":
        fail(
            "data.mixture", d.mixture, f"a mixture only with data.source='store' (not {d.source!r})"
        )
    if d.path:
        fail(
            "data.mixture",
            d.mixture,
            f"either data.mixture or data.path (it is {d.path!r}), not both: set data.path=''",
        )


def lambda_points(schedule: Sequence, depth: int) -> list[tuple[float, tuple[float, ...]]]:
    """`loss.mtp_lambda_schedule` checked: [(training fraction, (lambda_1..lambda_D))].

    Fractions lie in [0, 1] and never decrease; two points at one fraction make a jump.
    Raises ConfigError naming the key and the bad entry.
    """
    key, out, last = "loss.mtp_lambda_schedule", [], 0.0
    for e in _entries(schedule, key):
        ok = (
            len(e) == 2
            and isinstance(e[0], int | float)
            and not isinstance(e[0], bool)
            and last <= e[0] <= 1
            and _weights_of(e[1], depth)
        )
        if not ok:
            raise ConfigError(
                f"config key {key!r}: entry {e!r} is not (fraction in [0, 1], not decreasing, "
                f"(model.mtp_depth={depth} lambdas >= 0))"
            )
        last = float(e[0])
        out.append((last, tuple(float(w) for w in e[1])))
    return out


def _validate_lambda_schedule(lo: ConfigDict, depth: int) -> None:
    if not lo.mtp_lambda_schedule:
        return
    if not depth:
        fail(
            "loss.mtp_lambda_schedule",
            lo.mtp_lambda_schedule,
            "() with model.mtp_depth=0 (a schedule of MTP weights needs MTP depths)",
        )
    lambda_points(lo.mtp_lambda_schedule, depth)
    clashes = {  # key: (set, what is accepted with a schedule)
        "mtp_lambda_final": (lo.mtp_lambda_final >= 0, "< 0"),
        "mtp_lambda_switch_step": (lo.mtp_lambda_switch_step != -1, "-1"),
        "mtp_lambda_per_depth": (bool(lo.mtp_lambda_per_depth), "()"),
    }
    for other, (is_set, accepted) in clashes.items():
        if is_set:
            fail(
                "loss." + other,
                lo[other],
                f"{accepted} when loss.mtp_lambda_schedule is set (the schedule gives every "
                "depth's lambda at every step)",
            )


def mtp_lambdas(config: ConfigDict) -> tuple[float, ...]:
    """The D per-depth weights lambda_1..lambda_D before any schedule."""
    lo, depth = config.loss, config.model.mtp_depth
    if lo.mtp_lambda_per_depth:
        return tuple(float(x) for x in lo.mtp_lambda_per_depth)
    return (float(lo.mtp_lambda),) * depth
