"""Shared fixtures. Tests run on the CPU; meshes use 8 fake devices."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return REPO


def tiny_model_config(**overrides):
    """A small ModelConfig for unit tests (vocab 97 so no other axis can match it)."""
    from mtp_jax.model import ModelConfig

    values = dict(
        vocab_size=97,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        mlp_dim=64,
        mtp_depth=2,
        mtp_layout="sequential",
    )
    values.update(overrides)
    return ModelConfig(**values)
