"""The fault matrix (benchmarks/faults.py) with fewer trials: real mtp-train processes killed,
signalled, starved of disk, refused a workdir, fed corrupt stores and NaN batches; fuzzed
inputs (tests/fuzz_properties.py) with a few examples each."""

import importlib.util
import json
import os
import random
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, tiny_train_config

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location("faults", REPO / "benchmarks" / "faults.py")
faults = sys.modules["faults"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(faults)

needs_namespaces = pytest.mark.skipif(
    not faults.namespaces_work(), reason="no private mount namespaces (unshare) on this machine"
)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def store(tmp) -> str:
    return faults.make_store(tmp)


@pytest.fixture(scope="module")
def reference(tmp, store) -> str:
    return faults.reference_run(tmp, store)


def _all_survived(row):
    assert row.trials and row.survived == row.trials, (row.fault, row.note)
    assert row.data_lost == 0, (row.fault, row.note)
    assert row.identical == row.compared, (row.fault, row.note)


def test_sigkill_mid_save_and_at_a_random_step_resume_bit_identical(reference, store, tmp):
    step = random.Random().randint(1, faults.STEPS - 1)
    row = faults.kill_trials(reference, store, tmp, ["kill@6:save", f"kill@{step}:step"])
    _all_survived(row)
    assert "1 during an async checkpoint write" in row.note or "2 during" in row.note, row.note


@pytest.mark.parametrize("phase", ["eval", "save"])
def test_sigterm_during_eval_or_save_exits_0_with_a_complete_checkpoint(
    reference, store, tmp, phase
):
    _all_survived(faults.sigterm_trial(reference, store, tmp, phase))


@needs_namespaces
def test_disk_full_during_a_save_names_the_path_keeps_the_last_checkpoint_and_resumes(
    reference, store, tmp
):
    _all_survived(faults.disk_full_trial(reference, store, tmp))


@needs_namespaces
def test_read_only_workdir_is_refused_before_compiling(store, tmp):
    _all_survived(faults.unwritable_trial(store, tmp))


def test_second_run_on_a_workdir_is_refused_naming_the_first(store, tmp):
    _all_survived(faults.lock_trial(store, tmp))


def test_corrupt_stores_are_named_before_the_first_step(store, tmp):
    _all_survived(faults.corrupt_store_trials(store, tmp))


def test_nan_batch_under_stop_skip_and_rollback(reference, store, tmp):
    rows = faults.nonfinite_trials(reference, store, tmp)
    for row in rows:
        _all_survived(row)

    def losses(workdir):
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return {r["step"]: r for r in map(json.loads, f)}

    # The rolled-back run's first 4 steps are the reference's; from step 5 on it trains on
    # batch 6 where the reference trained on batch 5.
    ref, rolled = losses(reference), losses(os.path.join(tmp, "nan_rollback"))
    assert [rolled[s]["loss"] for s in range(1, 5)] == [ref[s]["loss"] for s in range(1, 5)]
    assert rolled[5]["loss"] != ref[5]["loss"]
    assert rolled[faults.STEPS]["nonfinite/rollback"] == 1
    assert losses(os.path.join(tmp, "nan_skip"))[faults.STEPS]["nonfinite/skip"] == 1


def test_skip_leaves_params_and_optimizer_state_exactly_as_they_were(code_store):
    from mtp_jax.model import Model
    from mtp_jax.train.state import init_state, make_optimizer
    from mtp_jax.train.step import make_train_step
    from mtp_jax.window import WindowSpec

    config = tiny_train_config(
        code_store, "train.on_nonfinite=skip", "train.nan_batches=(1,)", "train.warmup_steps=0"
    )
    model, tx = Model(config.model), make_optimizer(config)
    state = init_state(config, model, tx, None)
    spec = WindowSpec.from_config(config)
    rng = np.random.default_rng(0)
    batch = {
        "tokens": jnp.asarray(rng.integers(0, 256, (8, spec.length)), jnp.int32),
        "segment_ids": jnp.ones((8, spec.length), jnp.int32),
    }
    step = jax.jit(make_train_step(config, model, tx))
    bad, m_bad = step(state, {**batch, "poison": jnp.full((8,), jnp.nan)})
    good, m_good = step(state, {**batch, "poison": jnp.ones((8,))})
    assert int(m_bad["nonfinite"]) == 1 and int(m_good["nonfinite"]) == 0
    assert int(bad.step) == int(state.step) + 1
    for a, b in zip(jax.tree.leaves(bad.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(bad.opt_state), jax.tree.leaves(state.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(good.params), jax.tree.leaves(state.params), strict=True)
    ]
    assert all(changed)


def test_fuzzed_config_overrides_give_named_errors():
    import fuzz_properties

    fuzz_properties.check_config_overrides(60)


def test_fuzzed_store_manifests_give_named_errors(tmp):
    import fuzz_properties

    fuzz_properties.check_manifests(60, fuzz_properties.make_store(tmp + "/fuzz_store"))


def test_fuzzed_generate_prompts_and_flags_give_named_errors(tmp):
    import fuzz_properties

    fuzz_properties.check_generate(25, fuzz_properties.make_trained_run(tmp))
