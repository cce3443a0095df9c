"""Hypothesis properties of the fault matrix: bad inputs give our own named errors (exit 2),
never a traceback. `PROPERTIES[name](examples)` runs one; tests/test_faults.py runs each with a
few examples, benchmarks/faults.py with 1000.

- config overrides: random keys (known, unknown, nested), values and types through
  `load_config`; a failing one must also make `mtp-train` exit 2 with one error line.
- mtp-generate: random prompts and flags against a trained run.
- store manifests: a store's manifest.json replaced by random JSON, mutated fields or bytes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import shutil
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.py"

_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
VALUES = st.recursive(
    _leaf,
    lambda inner: st.lists(inner, max_size=4) | st.lists(inner, max_size=4).map(tuple),
    max_leaves=6,
)


def _settings(examples: int):
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )


def _keys():
    from mtp_jax.config import all_keys

    known = all_keys()
    return (
        st.sampled_from(known)
        | st.sampled_from(known).map(lambda k: k + ".x")
        | st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.", min_size=1, max_size=24)
    )


def _value_text():
    return VALUES.map(repr) | st.text(max_size=16)


def check_config_overrides(examples: int) -> None:
    from mtp_jax.cli.train import main
    from mtp_jax.config import ConfigError, all_keys, load_config

    known = all_keys()
    workdir = tempfile.mkdtemp(prefix="fuzz_config_")

    @_settings(examples)
    @given(st.lists(st.tuples(_keys(), _value_text()), min_size=1, max_size=3))
    def prop(pairs):
        overrides = [f"{k}={v}" for k, v in pairs]
        try:
            load_config(SMOKE, overrides)
            return
        except ConfigError as e:
            message = str(e)
        named = [k for k in known if k in message] + [k for k, _ in pairs if k in message]
        assert named or "override" in message, message
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(
                [
                    "--config",
                    str(SMOKE),
                    "--workdir",
                    workdir,
                    *[f"--config.{o}" for o in overrides],
                ]
            )
        assert code == 2, (code, err.getvalue()[-500:])
        assert "mtp-train: error:" in err.getvalue() and "Traceback" not in err.getvalue()

    prop()


def make_trained_run(root: str) -> str:
    """A tiny trained workdir (2 steps) for the mtp-generate property."""
    from mtp_jax.config import load_config
    from mtp_jax.train import train

    overrides = [
        "model.d_model=32",
        "model.n_layers=1",
        "model.n_heads=2",
        "model.n_kv_heads=1",
        "model.head_dim=16",
        "model.mlp_dim=64",
        "data.source=synthetic",
        "data.seq_len=32",
        "data.batch_size=8",
        "loss.chunk_size=8",
        "train.steps=2",
        "train.warmup_steps=1",
        "train.eval_every=0",
        "checkpoint.async_save=false",
    ]
    workdir = os.path.join(root, "trained")
    train(load_config(SMOKE, overrides), workdir, progress=False)
    return workdir


def check_generate(examples: int, workdir: str | None = None) -> None:
    from mtp_jax.cli.generate import main

    workdir = workdir or make_trained_run(tempfile.mkdtemp(prefix="fuzz_generate_"))
    flags = st.fixed_dictionaries(
        {},
        optional={
            "--max-new-tokens": st.sampled_from(["-3", "0", "1", "4", "x", "1e3"]),
            "--temperature": st.sampled_from(["0", "0.7", "-1", "nan", "inf", "hot"]),
            "--top-k": st.sampled_from(["-1", "0", "5", "1000000"]),
            "--top-p": st.sampled_from(["0", "0.5", "1", "1.5", "nan"]),
            "--seed": st.sampled_from(["0", "-5", "123456789012345678901234567890"]),
            "--step": st.sampled_from(["0", "2", "999", "-1"]),
            "--config.mesh.data": st.sampled_from(["1", "0", "64", "abc"]),
        },
    )

    @_settings(examples)
    @given(
        st.text(max_size=40),
        flags,
        st.booleans(),
        st.booleans(),
        st.sampled_from(["", "--bogus", "--config.model.d_model=8"]),
    )
    def prop(prompt, options, plain, as_json, extra):
        argv = ["--workdir", workdir, "--prompt", prompt]
        for flag, value in options.items():
            argv += [f"{flag}={value}"]
        argv += ["--no-speculative"] * plain + ["--json"] * as_json + ([extra] if extra else [])
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse: bad flag types
                code = e.code
        assert code in (0, 2), (argv, code, err.getvalue()[-800:])
        assert "Traceback" not in err.getvalue(), (argv, err.getvalue()[-800:])
        if code == 2:
            assert "error" in err.getvalue(), (argv, err.getvalue()[-800:])
        elif as_json:
            json.loads(out.getvalue())

    prop()


def make_store(root: str) -> str:
    from mtp_jax.data import prepare

    corpus = os.path.join(root, "corpus")
    os.makedirs(corpus)
    for i in range(30):
        with open(os.path.join(corpus, f"d{i}.txt"), "w") as f:
            f.write(f"document {i} " * (5 + i))
    store = os.path.join(root, "store")
    prepare(corpus, store, val_fraction=0.2, progress=False)
    return store


def _mutations(manifest: dict):
    paths = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                paths.append((*path, k))
                walk(v, (*path, k))

    walk(manifest, ())
    field = st.sampled_from(paths)
    return st.one_of(
        st.tuples(st.just("set"), field, VALUES),
        st.tuples(st.just("delete"), field, st.none()),
        st.tuples(st.just("replace"), st.just(()), VALUES),
        st.tuples(st.just("bytes"), st.just(()), st.binary(max_size=40)),
    )


def check_manifests(examples: int, store: str | None = None) -> None:
    from mtp_jax.config import base_config
    from mtp_jax.data import DataError, make_dataset

    store = store or make_store(tempfile.mkdtemp(prefix="fuzz_manifest_"))
    copy = store + "_fuzzed"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(store, copy)
    path = os.path.join(copy, "manifest.json")
    with open(os.path.join(store, "manifest.json")) as f:
        original = json.load(f)

    @_settings(examples)
    @given(st.lists(_mutations(original), min_size=1, max_size=3))
    def prop(mutations):
        manifest: object = json.loads(json.dumps(original))
        raw = None
        for kind, where, value in mutations:
            if kind == "bytes":
                raw = value
            elif kind == "replace":
                manifest, raw = value, None
            elif isinstance(manifest, dict):
                node = manifest
                for k in where[:-1]:
                    node = node.get(k) if isinstance(node, dict) else None
                if isinstance(node, dict) and where:
                    if kind == "delete":
                        node.pop(where[-1], None)
                    else:
                        node[where[-1]] = value
        with open(path, "wb") as f:
            f.write(raw if raw is not None else json.dumps(manifest).encode())
        cfg = base_config().data
        cfg.path, cfg.batch_size, cfg.prefetch = copy, 2, 0
        try:
            it = iter(make_dataset(cfg, seq_len=8, mtp_depth=1, seed=0, vocab_size=300))
            next(it)
        except DataError as e:
            assert copy in str(e), str(e)

    prop()


PROPERTIES = {
    "config overrides": check_config_overrides,
    "mtp-generate prompts and flags": check_generate,
    "store manifests": check_manifests,
}
