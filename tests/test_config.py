"""Configs: every shipped config loads and builds abstractly; bad overrides fail clearly."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from conftest import CONFIGS

import mtp_jax
from mtp_jax.config import ConfigError, base_config, config_from_dict, load_config

SHIPPED = sorted(CONFIGS.glob("*.py"))


def test_there_are_shipped_configs():
    names = {p.name for p in SHIPPED}
    assert {"smoke.py", "gpu_125m.py", "gpu_1b.py", "tpu_7b.py"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_config_builds_abstractly(path):
    config = load_config(path)
    model = mtp_jax.Model(config.model)
    depth = config.model.mtp_depth
    tokens = jax.ShapeDtypeStruct((1, config.data.seq_len + depth), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
    n = sum(x.size for x in jax.tree.leaves(nn.unbox(variables)))
    assert n == mtp_jax.param_count(config)
    out = jax.eval_shape(model.apply, variables, tokens)
    assert out.logits.shape == (depth + 1, 1, config.data.seq_len, config.model.vocab_size)
    assert path.read_text().lstrip().startswith('"""'), "config docstring gives the command"


def test_overrides_apply_with_types():
    c = load_config(
        CONFIGS / "smoke.py",
        [
            "model.mtp_depth=3",
            "--config.train.lr=1e-3",
            "model.mtp_layout=parallel",
            "data.shuffle=false",
            "loss.mtp_lambda_per_depth=(0.3, 0.2, 0.1)",
        ],
    )
    assert c.model.mtp_depth == 3 and c.train.lr == 1e-3
    assert c.model.mtp_layout == "parallel" and c.data.shuffle is False
    assert c.loss.mtp_lambda_per_depth == (0.3, 0.2, 0.1)
    with pytest.raises(AttributeError):
        c.model.not_a_key = 1  # locked


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("model.mtp_dept=2", r"unknown config key 'model.mtp_dept'.*'model.mtp_depth'"),
        ("mtp_depth=2", r"unknown config key 'mtp_depth'.*'model.mtp_depth'"),
        ("model.mtp_depth=two", r"'model.mtp_depth'.*'two'.*int"),
        (
            "model.mtp_depth=-1",
            r"'model.mtp_depth' has value -1; accepted: an integer in \[0, 16\]",
        ),
        ("model.mtp_layout=diagonal", r"'model.mtp_layout'.*'diagonal'.*'sequential', 'parallel'"),
        ("model.n_kv_heads=3", r"'model.n_kv_heads' has value 3.*divisor of model.n_heads=4"),
        ("model.dtype=float64", r"'model.dtype'.*'float64'"),
        ("loss.chunk_size=100", r"'loss.chunk_size'.*divisor of data.seq_len=128"),
        ("loss.mtp_lambda_per_depth=(0.3,)", r"exactly model.mtp_depth=2 weights"),
        ("train.microbatches=3", r"'train.microbatches'.*divisor of data.batch_size=16"),
        ("train.lr=0", r"'train.lr' has value 0.0; accepted: a number > 0"),
        ("data.shuffle=maybe", r"'data.shuffle'.*'maybe'"),
        ("mesh.data=0", r"'mesh.data'.*-1"),
        ("model.d_model", r"not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(CONFIGS / "smoke.py", [override])


def test_unknown_key_in_config_file(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from mtp_jax.config import base_config\n"
        "def get_config():\n"
        "    c = base_config()\n"
        "    c.unlock()\n"
        "    c.model.n_layer = 3\n"
        "    return c\n"
    )
    with pytest.raises(ConfigError, match=r"'model.n_layer'.*bad.py.*'model.n_layers'"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config(tmp_path / "nope.py")


def test_config_round_trips_through_dict():
    c = load_config(CONFIGS / "smoke.py", ["loss.mtp_lambda_per_depth=(0.5, 0.25)"])
    again = config_from_dict(c.to_dict())
    assert again.to_dict() == c.to_dict()
    assert again.loss.mtp_lambda_per_depth == (0.5, 0.25)


def test_every_base_key_has_a_comment_and_a_rule():
    import inspect
    import re

    from mtp_jax.config import RULES, all_keys
    from mtp_jax.model import ModelConfig
    from mtp_jax.model.config import MoEConfig, RopeScalingConfig

    source = inspect.getsource(base_config)
    declared = ModelConfig.declared()
    for key in all_keys(base_config()):
        assert key in RULES, key
        section, leaf = key.rsplit(".", 1) if "." in key else ("", key)
        if section == "model":  # declared once, in ModelConfig, with a meaning and a check
            assert declared[leaf].metadata["doc"] and RULES[key] is declared[leaf].metadata["check"]
            continue
        if section in ("model.moe", "model.rope_scaling"):  # declared once, in their classes
            f = {"model.moe": MoEConfig, "model.rope_scaling": RopeScalingConfig}[section]
            f = f.declared()[leaf]
            assert f.metadata["doc"] and RULES[key] is f.metadata["check"]
            continue
        lines = re.findall(rf"^\s+\w+\.{leaf} = (?!ConfigDict).*$", source, re.M)
        assert lines and all("  # " in ln for ln in lines), key


def test_model_settings_are_declared_once():
    """The config's model section, its rules and ModelConfig come from one declaration."""
    from mtp_jax.model import ModelConfig

    assert base_config().model.to_dict() == ModelConfig.defaults()
    assert ModelConfig.from_any(base_config().model) == ModelConfig()
    with pytest.raises(ConfigError, match="'model.n_kv_heads'.*divisor of model.n_heads=4"):
        load_config(CONFIGS / "smoke.py", ["model.n_kv_heads=3"])
    with pytest.raises(ConfigError, match="'model.mtp_layout' has value 'diagonal'"):
        load_config(CONFIGS / "smoke.py", ["model.mtp_layout=diagonal"])
