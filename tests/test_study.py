"""mtp-study: the effective-speedup fit, a tiny grid end to end (files, resume, notebook)."""

import json
import math
import os

import numpy as np
import pytest
from conftest import REPO
from test_notebooks import run_notebook

from mtp_jax.study import runner
from mtp_jax.study.cli import main
from mtp_jax.study.fit import effective_speedup, fit_power_law
from mtp_jax.study.grid import GridError, load_grid

TINY = [
    "--config.model.d_model=32",
    "--config.model.n_layers=1",
    "--config.model.n_heads=2",
    "--config.model.n_kv_heads=1",
    "--config.model.head_dim=16",
    "--config.model.mlp_dim=64",
    "--config.data.seq_len=32",
    "--config.data.batch_size=8",
    "--config.loss.chunk_size=32",
    "--config.train.warmup_steps=2",
    "--config.data.val_fraction=0.2",
    "--config.checkpoint.async_save=false",
]


def test_fit_recovers_a_known_power_law_and_speedup():
    compute = np.geomspace(1e3, 1e6, 9)
    loss = 2.0 + 5.0 * compute**-0.3
    law = fit_power_law(compute, loss)
    assert law.alpha == pytest.approx(0.3, abs=0.01)
    assert law.l_inf == pytest.approx(2.0, abs=0.01)
    # A variant reaching the baseline's loss at 4e5 tokens with 1e5 tokens, at 0.8x the
    # baseline's throughput: 4 x 0.8 = 3.2 times sooner.
    target = 2.0 + 5.0 * 4e5**-0.3
    assert effective_speedup(law, target, 1e5, 0.8) == pytest.approx(3.2, rel=0.02)
    assert math.isinf(effective_speedup(law, 1.5, 1e5, 1.0))  # below L_inf: never reached
    with pytest.raises(ValueError, match="do not fall"):
        fit_power_law(compute, 2.0 + 1e-3 * np.log(compute))


def test_grid_files_are_checked(tmp_path):
    bad = tmp_path / "grid.json"
    bad.write_text('[{"name": "x y", "overrides": []}]')
    with pytest.raises(GridError, match="entry 0"):
        load_grid(str(bad))
    ok = tmp_path / "grid.py"
    ok.write_text('GRID = [{"name": "seq_d1", "overrides": ["model.mtp_depth=1"]}]\n')
    assert [r.name for r in load_grid(str(ok))] == ["ntp", "seq_d1"]  # the baseline added


def test_tiny_study_writes_everything_resumes_and_the_notebook_reads_it(
    tmp_path, code_store, monkeypatch, capsys
):
    grid = tmp_path / "grid.json"
    grid.write_text(
        json.dumps(
            [
                {"name": "ntp", "overrides": ["model.mtp_depth=0"]},
                {"name": "seq_d2", "overrides": ["model.mtp_depth=2"]},
            ]
        )
    )
    out = str(tmp_path / "study")
    argv = ["--out", out, "--grid", str(grid), "--seeds", "1", "--steps", "8", *TINY]
    argv += [f"--config.data.path={code_store}"]
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # decoding on one device, like a laptop
    assert main(argv) == 0
    for name in ("results.md", "results.json", "summary.json", "loss_vs_tokens.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    results = json.load(open(os.path.join(out, "results.json")))
    assert [r["name"] for r in results] == ["ntp", "seq_d2"]
    for r in results:
        for key in ("name", "overrides", "seed", "val_loss", "val_bpb", "tokens_per_sec"):
            assert r[key] is not None, key
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2))
        assert len(r["curve"]) == 8
    mtp = results[1]
    assert "accept_len" in mtp and "effective_speedup" in mtp
    assert mtp["greedy_tokens_identical"] and mtp["tokens_per_step"] >= 1.0

    # A second invocation re-runs nothing.
    def no_rerun(*args, **kwargs):
        raise AssertionError("a finished run was re-run")

    monkeypatch.setattr(runner, "measure_run", no_rerun)
    assert main(argv) == 0
    assert (
        json.load(open(os.path.join(out, "results.json")))[0]["val_loss"] == results[0]["val_loss"]
    )
    run_notebook(REPO / "notebooks" / "study.ipynb", {"MTP_STUDY_DIR": out, "MPLBACKEND": "Agg"})


def test_bad_override_is_named_before_anything_trains(tmp_path, capsys):
    code = main(["--out", str(tmp_path / "s"), "--steps", "8", "--config.train.lr=-1"])
    assert code == 2
    assert "run 'ntp': config key 'train.lr'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "s" / "runs")
