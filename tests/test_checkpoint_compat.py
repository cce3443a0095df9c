"""Parameters-only loading: old checkpoints still load, the optimizer state is never read, and
parameters land in their training shardings on any mesh, also through mtp-generate."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO

import mtp_jax
from mtp_jax.cli import generate as generate_cli
from mtp_jax.config import ConfigDict
from mtp_jax.model import Model
from mtp_jax.sharding import make_mesh, with_shardings
from mtp_jax.train import Checkpointer, CheckpointError, load_params, make_optimizer
from mtp_jax.train.checkpoint import checkpoint_dir, saved_config
from mtp_jax.train.state import abstract_state

OLD_RUN = REPO / "tests" / "data" / "run_0_1_4"  # written by mtp_jax 0.1.4 (D=2, one layer)


def test_a_checkpoint_written_by_0_1_4_still_loads():
    expected = np.load(OLD_RUN / "expected.npz")
    config, params = mtp_jax.load_checkpoint(OLD_RUN)
    logits = Model(config.model).apply({"params": params}, jnp.asarray(expected["tokens"])).logits
    np.testing.assert_array_equal(np.asarray(logits), expected["logits"])
    # ... and the whole train state (optimizer included) restores for a resume.
    mesh = make_mesh(ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1])
    abstract, shardings = abstract_state(config, Model(config.model), make_optimizer(config), mesh)
    state, step = Checkpointer(OLD_RUN, config).restore(with_shardings(abstract, shardings))
    assert step == 2 and int(state.step) == 2
    assert float(optax_count(state.opt_state)) == 2


def optax_count(opt_state):
    """The Adam step count inside the optimizer state."""
    counts = [x for p, x in jax.tree_util.tree_leaves_with_path(opt_state) if "count" in str(p)]
    return counts[-1]


def _copy_without_optimizer_state(dst):
    """A copy of OLD_RUN whose checkpoint holds the step and the parameters only."""
    config, step = saved_config(OLD_RUN)
    params = load_params(OLD_RUN)
    manager = ocp.CheckpointManager(
        checkpoint_dir(dst),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        },
    )
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave({"step": jnp.int32(step), "params": params}),
            config=ocp.args.JsonSave(config.to_dict()),
        ),
    )
    manager.wait_until_finished()
    manager.close()
    return config, params


def test_load_params_reads_no_optimizer_state(tmp_path):
    config, params = _copy_without_optimizer_state(tmp_path)
    again = load_params(tmp_path)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The full restore needs the optimizer state, which is not there: the copy really lacks it.
    mesh = make_mesh(ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1])
    abstract, shardings = abstract_state(config, Model(config.model), make_optimizer(config), mesh)
    with pytest.raises(CheckpointError):
        Checkpointer(tmp_path, config).restore(with_shardings(abstract, shardings))


def test_load_params_into_mesh_shardings():
    mesh = make_mesh(ConfigDict({"data": 2, "fsdp": 4, "tensor": 1}))
    params = load_params(OLD_RUN, mesh=mesh)
    query = params["trunk"]["layers"]["block"]["attn"]["query"]  # [layers, E, N, H]
    assert query.sharding.mesh.shape == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}
    assert query.sharding.spec[1] == "fsdp"
    assert query.addressable_shards[0].data.shape[1] == query.shape[1] // 4
    with pytest.raises(CheckpointError, match="no checkpoint at step 7"):
        load_params(OLD_RUN, step=7)


def test_mtp_generate_on_a_mesh_gives_the_tokens_of_one_device(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    outs = []
    for mesh in (["--config.mesh.data=1"], ["--config.mesh.fsdp=4", "--config.mesh.data=2"]):
        for extra in ([], ["--no-speculative"]):
            args = ["--workdir", str(run), "--prompt", "def f(", "--max-new-tokens", "6"]
            assert generate_cli.main([*args, "--json", *mesh, *extra]) == 0
            outs.append(json.loads(capsys.readouterr().out))
    assert len({tuple(o["new_tokens"]) for o in outs}) == 1
    assert outs[0]["speculative"] and not outs[1]["speculative"]
    # Only mesh keys may be overridden at generation.
    with pytest.raises(SystemExit):
        generate_cli.main(["--workdir", str(run), "--prompt", "x", "--config.model.d_model=8"])
    assert "only the mesh can be overridden" in capsys.readouterr().err
