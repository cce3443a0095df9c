"""Training in-process: 8 devices == 1 device, gradient accumulation, restore onto other
meshes, checkpoint fallback, schedules, non-finite stop, the smoke config, CLI errors."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS, tiny_train_config

import mtp_jax
from mtp_jax.cli.train import main as train_main
from mtp_jax.config import ConfigDict, load_config
from mtp_jax.model import Model
from mtp_jax.sharding import make_mesh, with_shardings
from mtp_jax.train import Checkpointer, CheckpointError, NonFiniteLossError, load_checkpoint, train
from mtp_jax.train.metrics import read_metrics
from mtp_jax.train.state import (
    abstract_state,
    init_state,
    lambda_schedule,
    lr_schedule,
    make_optimizer,
)
from mtp_jax.train.step import make_train_step


def _leaves_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_eight_devices_equal_one_device(code_store, tmp_path):
    assert len(jax.devices()) == 8
    config = tiny_train_config(
        code_store, "train.steps=4", "checkpoint.every=0", "model.vocab_size=260"
    )
    one = train(config, str(tmp_path / "one"), devices=jax.devices()[:1], progress=False)
    config8 = tiny_train_config(
        code_store,
        "train.steps=4",
        "checkpoint.every=0",
        "model.vocab_size=260",
        "mesh.data=2",
        "mesh.fsdp=2",
        "mesh.tensor=2",
    )
    eight = train(config8, str(tmp_path / "eight"), progress=False)
    # Parameters are really sharded on the 8-device mesh.
    emb = eight.state.params["embed"]["embedding"]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert not emb.sharding.is_fully_replicated
    up = eight.state.params["trunk"]["layers"]["block"]["mlp"]["up"]["kernel"]
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert one.metrics["loss"] != 0
    for key in ("loss", "loss/depth_0", "loss/depth_2", "accuracy/depth_1"):
        np.testing.assert_allclose(one.metrics[key], eight.metrics[key], rtol=1e-5)
    _leaves_close(one.state.params, eight.state.params)
    np.testing.assert_allclose(
        [r["loss"] for r in read_metrics(str(tmp_path / "one"))],
        [r["loss"] for r in read_metrics(str(tmp_path / "eight"))],
        rtol=1e-5,
    )


def _state_and_batch(config, seed=0):
    model = Model(config.model)
    tx = make_optimizer(config)
    mesh = make_mesh(ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1])
    abstract, shardings = abstract_state(config, model, tx, mesh)
    state = init_state(config, model, tx, shardings)
    shape = (config.data.batch_size, config.data.seq_len + config.model.mtp_depth + 1)
    tokens = jax.random.randint(jax.random.key(seed), shape, 0, 259)
    segments = jnp.cumsum(jax.random.bernoulli(jax.random.key(seed + 1), 0.05, shape), 1) + 1
    return model, tx, state, {"tokens": tokens, "segment_ids": segments.astype(jnp.int32)}


def test_gradient_accumulation_equals_full_batch(code_store):
    import optax

    config = tiny_train_config(code_store, "train.warmup_steps=0")
    model, _, state, batch = _state_and_batch(config)
    # SGD(1): the parameter change is exactly the gradient (Adam's first step is about
    # lr * sign(g) and would amplify summation-order noise in near-zero gradients).
    tx = optax.sgd(1.0)
    state = state.replace(opt_state=tx.init(state.params))
    full_step = jax.jit(make_train_step(config, model, tx))
    config4 = tiny_train_config(code_store, "train.warmup_steps=0", "train.microbatches=4")
    micro_step = jax.jit(make_train_step(config4, model, tx))
    s1, m1 = full_step(state, batch)
    s4, m4 = micro_step(state, batch)
    assert not np.allclose(s1.params["final_norm"]["scale"], state.params["final_norm"]["scale"])
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    for key in ("loss_sum", "correct", "count", "grad_norm"):
        np.testing.assert_allclose(m1[key], m4[key], rtol=1e-5)
    _leaves_close(s1.params, s4.params, rtol=1e-5, atol=1e-7)


def test_restore_onto_other_meshes(code_store, tmp_path):
    config = tiny_train_config(
        code_store,
        "train.steps=2",
        "checkpoint.every=2",
        "mesh.data=2",
        "mesh.fsdp=2",
        "mesh.tensor=2",
    )
    result = train(config, str(tmp_path), progress=False)
    saved = jax.device_get(result.state)
    model, tx = Model(config.model), make_optimizer(config)
    for shape, devices in (((4, 2, 1), jax.devices()), ((1, 1, 1), jax.devices()[:1])):
        mesh = make_mesh(ConfigDict(dict(zip(("data", "fsdp", "tensor"), shape))), devices)
        abstract, shardings = abstract_state(config, model, tx, mesh)
        fresh = init_state(config, model, tx, shardings)
        # A fresh state differs from the saved one, so the equality below proves the restore.
        assert int(fresh.step) == 0
        assert not np.array_equal(
            fresh.params["embed"]["embedding"], saved.params["embed"]["embedding"]
        )
        restored, step = Checkpointer(str(tmp_path), config).restore(
            with_shardings(abstract, shardings)
        )
        assert step == 2 and int(restored.step) == 2
        for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
            np.testing.assert_array_equal(np.asarray(x), y)
        emb = restored.params["embed"]["embedding"]
        expected = {**dict(zip(("data", "fsdp", "tensor"), shape)), "expert": 1}
        assert emb.sharding.mesh.shape == expected
    cfg, params = load_checkpoint(str(tmp_path))
    assert cfg.to_dict() == config.to_dict()
    np.testing.assert_array_equal(params["embed"]["embedding"], saved.params["embed"]["embedding"])


def test_corrupted_newest_checkpoint_falls_back_to_previous(code_store, tmp_path, caplog):
    config = tiny_train_config(code_store, "train.steps=6", "checkpoint.every=3")
    result = train(config, str(tmp_path), devices=jax.devices()[:1], progress=False)
    assert Checkpointer(str(tmp_path), config).all_steps() == [3, 6]
    # Corrupt step 6: truncate every file of its state item.
    for f in (tmp_path / "checkpoints" / "6" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    model, tx = Model(config.model), make_optimizer(config)
    mesh = make_mesh(ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1])
    abstract, shardings = abstract_state(config, model, tx, mesh)
    with caplog.at_level(logging.WARNING):
        state, step = Checkpointer(str(tmp_path), config).restore(
            with_shardings(abstract, shardings)
        )
    assert step == 3 and int(state.step) == 3
    assert "checkpoint step 6 is unreadable" in caplog.text
    assert result.step == 6


def test_schedules():
    config = load_config(
        CONFIGS / "smoke.py",
        [
            "train.steps=100",
            "train.warmup_steps=10",
            "train.schedule=wsd",
            "train.decay_fraction=0.2",
            "train.lr=1.0",
            "train.min_lr_ratio=0.1",
            "loss.mtp_lambda=0.3",
            "loss.mtp_lambda_final=0.1",
        ],
    )
    lr = lr_schedule(config)
    np.testing.assert_allclose(
        [lr(0), lr(5), lr(10), lr(50), lr(80), lr(90), lr(100)],
        [0.0, 0.5, 1.0, 1.0, 1.0, 0.55, 0.1],
        rtol=1e-5,
        atol=1e-6,
    )
    lam = lambda_schedule(config)
    np.testing.assert_allclose(lam(79), [0.3, 0.3], rtol=1e-6)
    np.testing.assert_allclose(lam(80), [0.1, 0.1], rtol=1e-6)  # switches when LR decays
    cos = lr_schedule(load_config(CONFIGS / "smoke.py", ["train.lr=1.0"]))
    assert float(cos(30)) == pytest.approx(1.0) and float(cos(300)) == pytest.approx(0.1)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(code_store, tmp_path):
    config = tiny_train_config(code_store, "train.steps=3", "checkpoint.every=3")
    train(config, str(tmp_path), devices=jax.devices()[:1], progress=False)
    exploding = tiny_train_config(
        code_store,
        "train.steps=9",
        "checkpoint.every=3",
        "train.lr=1e30",
        "train.warmup_steps=0",
        "train.log_every=3",
    )
    with pytest.raises(NonFiniteLossError, match=r"steps 4\.\.\d.*last good checkpoint: step 3"):
        train(exploding, str(tmp_path), devices=jax.devices()[:1], progress=False)
    assert Checkpointer(str(tmp_path), config).all_steps() == [3]
    # A config whose optimizer state has another structure cannot resume: a clear error,
    # and the checkpoints stay.
    other = tiny_train_config(code_store, "train.steps=9", "train.grad_clip=0")
    with pytest.raises(CheckpointError, match="could be restored.*original config"):
        train(other, str(tmp_path), devices=jax.devices()[:1], progress=False)
    assert Checkpointer(str(tmp_path), config).all_steps() == [3]


def test_full_disk_at_the_metrics_file_names_the_intact_checkpoint(
    code_store, tmp_path, monkeypatch
):
    """A full disk may hit metrics.jsonl before the async checkpoint save reports it: the
    error names the file and, like a failed save, the newest complete checkpoint."""
    import errno

    from mtp_jax.train.checkpoint import StorageError
    from mtp_jax.train.metrics import MetricWriter, storage_error

    config = tiny_train_config(
        code_store, "train.steps=6", "checkpoint.every=2", "train.log_every=2"
    )
    write = MetricWriter.write

    def full_after_step_4(self, step, record):
        if step > 4:
            raise storage_error("metrics to", self.path, OSError(errno.ENOSPC, "No space"))
        write(self, step, record)

    monkeypatch.setattr(MetricWriter, "write", full_after_step_4)
    with pytest.raises(StorageError, match=r"metrics\.jsonl.*No space.*step 4, intact"):
        train(config, str(tmp_path), devices=jax.devices()[:1], progress=False)


def test_smoke_config_trains_and_logs_every_depth(code_store, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workdir = "smoke"  # relative, as in README's quickstart
    code = train_main(
        [
            "--config",
            str(CONFIGS / "smoke.py"),
            "--workdir",
            workdir,
            f"--config.data.path={code_store}",
            "--config.train.steps=60",
            "--config.train.log_every=10",
            "--config.train.eval_every=60",
            "--config.train.warmup_steps=10",
            "--config.checkpoint.every=30",
        ]
    )
    assert code == 0
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    assert records[-1]["loss/depth_0"] < records[0]["loss/depth_0"] - 1.0
    for k in range(3):
        for key in (f"loss/depth_{k}", f"accuracy/depth_{k}", f"eval/loss/depth_{k}"):
            assert key in records[-1], key
    for key in (
        "eval/agreement/depth_1",
        "eval/agreement/depth_2",
        "tokens_per_sec",
        "mfu",
        "lr",
        "lambda/depth_1",
        "grad_norm",
        "param_norm",
        "update_norm",
        "step_time",
    ):
        assert key in records[-1], key
    assert 0 < records[-1]["mfu"] < 1
    assert list((tmp_path / "smoke" / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (tmp_path / "smoke" / "checkpoints").iterdir()) == ["30", "60"]
    assert "sample" in capsys.readouterr().out

    # mtp-generate reads the checkpoint this run wrote.
    import json

    from mtp_jax.cli.generate import main as generate_main

    code = generate_main(
        ["--workdir", workdir, "--prompt", "def ", "--max-new-tokens", "12", "--json"]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err  # 4 + 12 tokens fit the context of 128
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert 0 < len(out["new_tokens"]) <= 12
    assert out["tokens"] == [100, 101, 102, 32] + out["new_tokens"]  # "def " + new
    from mtp_jax.data import ByteTokenizer

    assert out["text"] == ByteTokenizer().decode(out["new_tokens"])
    assert len(out["acceptance"]) == 2
    assert out["tokens_per_sec"] > 0 and out["mean_accepted"] >= 1

    # The context is data.seq_len = 128 tokens: a longer prompt is refused, one that leaves too
    # little room for the new tokens is decoded with a warning.
    assert generate_main(["--workdir", workdir, "--prompt", "x" * 129]) == 2
    err = capsys.readouterr().err
    assert "129 tokens, more than the model's context of 128" in err and "Traceback" not in err
    code = generate_main(["--workdir", workdir, "--prompt", "x" * 120, "--max-new-tokens", "9"])
    assert code == 0
    assert "120 tokens + --max-new-tokens 9 run past the model's context of 128" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("--config.model.n_layer=3", "unknown config key 'model.n_layer'"),
        ("--config.train.steps=ten", "'train.steps'"),
        ("--config.mesh.tensor=3", "'mesh.tensor'.*8 are available"),
        ("--config.data.batch_size=12", "'data.batch_size' has value 12.*data-parallel size 8"),
    ],
)
def test_bad_overrides_fail_before_compiling(override, pattern, tmp_path, capsys, monkeypatch):
    import mtp_jax.train.loop as loop

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled despite a bad config")

    monkeypatch.setattr(loop, "compile_steps", no_compile)
    code = train_main(
        [
            "--config",
            str(CONFIGS / "smoke.py"),
            "--workdir",
            str(tmp_path),
            "--config.data.source=synthetic",
            override,
        ]
    )
    assert code == 2
    import re

    assert re.search(pattern, capsys.readouterr().err)


def test_compile_only_reports_memory(tmp_path, capsys):
    code = train_main(
        [
            "--config",
            str(CONFIGS / "smoke.py"),
            "--workdir",
            str(tmp_path),
            "--config.data.source=synthetic",
            "--compile_only",
        ]
    )
    assert code == 0
    import json

    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["temp_bytes"] > 0 and report["argument_bytes"] > 4 * mtp_jax.param_count(
        load_config(CONFIGS / "smoke.py")
    )
    assert not (tmp_path / "checkpoints").exists()
    # The roofline of the local compile: the compiled count or the model's FLOPs, whichever is
    # higher; a CPU has a measured peak only through train.peak_flops and no bandwidth entry.
    assert report["flops_per_step"] > 0 and report["bytes_accessed"] > 0
    assert report["flops_source"] in ("compiled", "model_flops")
