"""Shared fixtures. Tests run on the CPU; meshes use 8 fake devices."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiled programs are cached on disk and shared by the test processes (xdist workers and
# the mtp-train subprocesses): the same small steps are compiled many times otherwise.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(__import__("tempfile").gettempdir(), "mtp_jax_test_compilation_cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

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


@pytest.fixture(scope="session")
def code_store(tmp_path_factory) -> str:
    """A token store of a few stdlib packages (~1 MB of real code), prepared once."""
    import shutil
    import sysconfig

    from mtp_jax.data import prepare

    root = tmp_path_factory.mktemp("code_corpus")
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for package in ("json", "email", "collections", "concurrent", "importlib"):
        for f in sorted((stdlib / package).rglob("*.py")):
            if "test" not in f.parts:
                rel = f.relative_to(stdlib)
                (root / rel.parent).mkdir(parents=True, exist_ok=True)
                shutil.copy(f, root / rel)
    out = tmp_path_factory.mktemp("code_store") / "store"
    prepare(str(root), str(out), val_fraction=0.1, progress=False)
    return str(out)


TINY_TRAIN = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.head_dim=16",
    "model.mlp_dim=64",
    "data.seq_len=16",
    "data.batch_size=8",
    "loss.chunk_size=8",
    "train.steps=6",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.eval_every=0",
    "checkpoint.every=3",
    "checkpoint.async_save=false",
]


def tiny_train_config(store: str, *overrides: str):
    """The smoke config shrunk for tests, reading `store`."""
    from mtp_jax.config import load_config

    return load_config(CONFIGS / "smoke.py", [*TINY_TRAIN, f"data.path={store}", *overrides])


def assert_every_depth_causal(model, params, tokens, layout: str, vocab: int) -> None:
    """Perturbing token j of `tokens` [1, S+D] moves depth k's logits at position i iff
    j <= i + k (sequential chain: depth k reads t[i+k]) or j <= i (parallel heads)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    depth = model.config.mtp_depth
    n = tokens.shape[1]
    seq = n - depth
    # Row j of the batch has token j replaced; row n is the unperturbed input.
    perturbed = jnp.tile(tokens, (n + 1, 1))
    perturbed = perturbed.at[jnp.arange(n), jnp.arange(n)].set((tokens[0] + 1) % vocab)
    logits = jax.jit(model.apply)({"params": params}, perturbed).logits  # [D+1, n+1, S, V]
    moved = np.asarray(jnp.abs(logits[:, :n] - logits[:, n:]).max(-1) > 1e-6)  # [D+1, j, i]
    for k in range(depth + 1):
        for j in range(n):
            for i in range(seq):
                allowed = j <= i + k if layout == "sequential" else j <= i
                assert moved[k, j, i] == allowed, (k, j, i, allowed)
