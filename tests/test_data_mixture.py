"""Weighted mixtures of token stores (`data.mixture`, `data.mixture_schedule`)."""

import json
import os
import shutil
import sys

import grain
import numpy as np
import pytest
from test_data import data_config, prepared, take

from mtp_jax.config import ConfigError, load_config
from mtp_jax.data import DataError, make_dataset
from mtp_jax.data.mixture import MixtureOrder

S, D, B = 16, 1, 8


def lettered_docs(letters: str, n: int, seed: int) -> dict[str, str]:
    """`n` documents written with `letters` only, so a window names its store."""
    rng = np.random.default_rng(seed)
    alphabet = np.array(list(letters))
    return {
        f"doc{i:04d}.txt": "".join(rng.choice(alphabet, size=int(rng.integers(20, 80))))
        for i in range(n)
    }


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, str]:
    """Three byte stores whose documents use disjoint letters (a-h, i-p, q-x)."""
    root = tmp_path_factory.mktemp("mixture")
    return {
        name: prepared(root, lettered_docs(letters, 60, seed), name=name, val_fraction=0.2)
        for seed, (name, letters) in enumerate(
            [("prose", "abcdefgh"), ("code", "ijklmnop"), ("math", "qrstuvwx")]
        )
    }


def mixture_cfg(stores, weights, **overrides):
    mix = tuple((stores[name], w) for name, w in weights.items())
    return data_config("", mixture=mix, batch_size=B, **overrides)


def source_of_rows(tokens: np.ndarray) -> list[str]:
    """Which store each window [b, W] came from, by its letters (byte ids; EOS ignored)."""
    out = []
    for row in tokens:
        letters = {chr(t) for t in row if t < 256}
        (name,) = {
            n
            for n, ls in (("prose", "a-h"), ("code", "i-p"), ("math", "q-x"))
            if letters <= set(map(chr, range(ord(ls[0]), ord(ls[2]) + 1)))
        }
        out.append(name)
    return out


def dataset(cfg, **kwargs):
    return make_dataset(cfg, seq_len=S, mtp_depth=D, seed=0, **kwargs)


# ------------------------------------------------------------------------------ the order


def test_order_counts_equal_a_brute_force_count_and_grain_mix():
    schedule = [(0, (0.5, 0.3, 0.2)), (3, (0.0, 0.5, 0.5)), (5, (0.1, 0.6, 0.3))]
    order = MixtureOrder([10, 7, 5], ["a", "b", "c"], schedule, 4, seed=0, split="train")
    picks = [order[g] for g in range(80)]
    for n in range(81):
        brute = np.bincount([k for k, _ in picks[:n]], minlength=3)
        np.testing.assert_array_equal(order.counts_before(n), brute)
    assert {k for k, _ in picks[12:20]} == {1, 2}  # phase 2 leaves source 0 out
    # Inside a phase the sources follow Grain's own mixing of the same weights.
    single = MixtureOrder([10, 7, 5], ["a", "b", "c"], schedule[:1], 4, seed=0, split="train")
    tagged = [grain.MapDataset.range(sys.maxsize).map(lambda i, k=k: k) for k in range(3)]
    reference = grain.MapDataset.mix(tagged, [0.5, 0.3, 0.2])
    assert [single.source_of(g) for g in range(200)] == [reference[g] for g in range(200)]
    # Each source continues its own permutation across phases: its first 7 windows are
    # 7 distinct ones (one epoch), wherever the phase boundaries fall.
    of_b = [w for k, w in picks if k == 1][:7]
    assert sorted(of_b) == list(range(7))


# ------------------------------------------------------------------------------ the pipeline


def test_proportions_hold_within_3_percent_over_200_batches(stores):
    cfg = mixture_cfg(stores, {"prose": 0.8, "code": 0.2})
    batches = take(dataset(cfg), 200)
    rows = [name for b in batches for name in source_of_rows(b["tokens"])]
    share = rows.count("prose") / len(rows)
    assert abs(share - 0.8) <= 0.03, share
    counts = batches[-1]["mixture_counts"]
    np.testing.assert_array_equal(counts, [rows.count("prose"), rows.count("code")])
    # Every window of 20 batches holds the proportion too, not just the whole run.
    for t in range(0, 200, 20):
        window = [n for b in batches[t : t + 20] for n in source_of_rows(b["tokens"])]
        assert abs(window.count("prose") / len(window) - 0.8) <= 0.03


def test_resume_mid_run_gives_the_batches_of_an_uninterrupted_run(stores):
    cfg = mixture_cfg(stores, {"prose": 0.5, "code": 0.3, "math": 0.2})
    straight = take(dataset(cfg), 30)
    it = iter(dataset(cfg))
    for _ in range(12):
        next(it)
    state = it.get_state()
    resumed = iter(dataset(cfg))
    resumed.set_state(state)
    for want in straight[12:]:
        got = next(resumed)
        for key in ("tokens", "segment_ids", "mixture_counts"):
            np.testing.assert_array_equal(got[key], want[key])


def test_changing_one_weight_changes_the_order_deterministically(stores):
    a = take(dataset(mixture_cfg(stores, {"prose": 0.8, "code": 0.2})), 10)
    b = take(dataset(mixture_cfg(stores, {"prose": 0.7, "code": 0.3})), 10)
    b_again = take(dataset(mixture_cfg(stores, {"prose": 0.7, "code": 0.3})), 10)
    assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(b, b_again, strict=True))
    assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, b, strict=True))
    assert b[-1]["mixture_counts"][1] > a[-1]["mixture_counts"][1]


def test_schedule_switches_weights_at_the_training_fraction(stores):
    cfg = mixture_cfg(stores, {"prose": 0.5, "code": 0.5})
    cfg.mixture_schedule = ((0.0, (0.9, 0.1)), (0.5, (0.1, 0.9)))
    batches = take(dataset(cfg, total_steps=40), 40)
    first = [n for b in batches[:20] for n in source_of_rows(b["tokens"])]
    second = [n for b in batches[20:] for n in source_of_rows(b["tokens"])]
    assert abs(first.count("prose") / len(first) - 0.9) <= 0.03
    assert abs(second.count("prose") / len(second) - 0.1) <= 0.03
    with pytest.raises(DataError, match="train.steps"):
        dataset(cfg)


def test_processes_read_disjoint_rows_of_the_same_mixed_batch(stores):
    cfg = mixture_cfg(stores, {"prose": 0.6, "code": 0.4})
    whole = take(dataset(cfg), 5)
    parts = [take(dataset(cfg, process_index=p, process_count=2), 5) for p in range(2)]
    for t in range(5):
        joined = np.concatenate([parts[0][t]["tokens"], parts[1][t]["tokens"]])
        np.testing.assert_array_equal(joined, whole[t]["tokens"])
        np.testing.assert_array_equal(parts[1][t]["mixture_counts"], whole[t]["mixture_counts"])


# ------------------------------------------------------------------------------ refusals


def test_store_with_another_tokenizer_is_refused_naming_both(stores, tmp_path):
    other = str(tmp_path / "other")
    shutil.copytree(stores["code"], other)
    manifest_path = os.path.join(other, "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    manifest.update(tokenizer="tok.json", tokenizer_sha256="ab" * 32, vocab_size=300)
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    cfg = data_config("", mixture=((stores["prose"], 0.5), (other, 0.5)), batch_size=B)
    with pytest.raises(DataError) as err:
        dataset(cfg)
    assert stores["prose"] in str(err.value) and other in str(err.value)
    missing = data_config("", mixture=((stores["prose"], 0.5), (str(tmp_path / "nope"), 0.5)))
    with pytest.raises(DataError, match="nope.*mtp-prepare"):
        dataset(missing)


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["data.mixture=(('A', 0.8), ('B', 0.2))", "data.path=/x"], "data.mixture.*data.path"),
        (["data.mixture=(('A', 0.8), ('B', -1))"], "data.mixture.*'B', -1"),
        (["data.mixture=(('A', 0.8), ('A', 0.2))"], "data.mixture.*twice"),
        (["data.mixture=(('A', 0.0), ('B', 0.0))"], "data.mixture.*sum to 0"),
        (["data.mixture_schedule=((0.0, (1.0,)),)"], "data.mixture_schedule.*only with"),
        (
            ["data.mixture=(('A', 1), ('B', 1))", "data.mixture_schedule=((0.0, (1.0,)),)"],
            "data.mixture_schedule.*2 weights",
        ),
        (
            ["data.mixture=(('A', 1), ('B', 1))", "data.mixture_schedule=((0.2, (1, 1)),)"],
            "data.mixture_schedule.*fraction 0.0",
        ),
        (["data.mixture=(('A', 1),)", "data.source=synthetic"], "data.mixture.*synthetic"),
    ],
)
def test_bad_mixture_configs_name_the_key(overrides, pattern, repo_root):
    with pytest.raises(ConfigError, match=pattern):
        load_config(repo_root / "configs" / "smoke.py", ["data.path=", *overrides])


# ------------------------------------------------------------------------------ training


def test_training_logs_tokens_and_eval_loss_per_source(stores, tmp_path):
    from conftest import tiny_train_config

    from mtp_jax.train import train
    from mtp_jax.train.metrics import read_metrics

    mix = f"(('{stores['prose']}', 0.75), ('{stores['code']}', 0.25, 'python'))"
    config = tiny_train_config(
        "",
        f"data.mixture={mix}",
        "train.steps=4",
        "train.log_every=2",
        "train.eval_every=4",
        "train.eval_steps=1",
        "checkpoint.every=0",
    )
    train(config, str(tmp_path / "run"), progress=False)
    records = read_metrics(str(tmp_path / "run"))
    last = records[-1]
    tokens = config.data.batch_size * config.data.seq_len
    assert last["data/tokens/prose"] == 3 * tokens and last["data/tokens/python"] == tokens
    assert records[0]["data/tokens/prose"] + records[0]["data/tokens/python"] == 2 * tokens
    for name in ("prose", "python"):
        assert np.isfinite(last[f"eval/loss/depth_0/{name}"])
    # The overall eval loss averages the sources' tokens.
    per_source = [last["eval/loss/depth_0/prose"], last["eval/loss/depth_0/python"]]
    assert min(per_source) <= last["eval/loss/depth_0"] <= max(per_source)
