"""Planning a TPU pod run on this CPU host: the real train step compiled for a TPU slice.

These tests need libtpu (the TPU compiler; no TPU is used). It comes with the test extra;
on a machine without it they skip, unless MTP_JAX_REQUIRE_LIBTPU=1 makes that a failure.
"""

import dataclasses
import importlib.util
import json
import math
import os

import pytest
from conftest import CONFIGS

from mtp_jax.cli.train import plan_main
from mtp_jax.config import ConfigError, load_config
from mtp_jax.model import model_flops, param_count
from mtp_jax.model.flops import activated_param_count
from mtp_jax.train import plan as plan_mod
from mtp_jax.train.plan import GiB, PlanError, plan

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
if not HAVE_LIBTPU and os.environ.get("MTP_JAX_REQUIRE_LIBTPU") == "1":
    raise RuntimeError("MTP_JAX_REQUIRE_LIBTPU=1 but libtpu is not installed")
needs_libtpu = pytest.mark.skipif(
    not HAVE_LIBTPU,
    reason="libtpu is not installed (pip install 'mtp_jax[tpu]' or the test extra); "
    "the TPU ahead-of-time plan needs its compiler",
)

SMOKE = str(CONFIGS / "smoke.py")
# The smoke config widened to ~1.2 B parameters (two layers, two MTP depths) and replicated
# over 4 v5e chips of 16 GiB: float32 parameters, gradients and Adam moments alone are
# ~19 GiB per chip, so it cannot fit; two scanned layers keep the compile quick.
TOO_BIG = [
    "model.d_model=4096",
    "model.n_heads=32",
    "model.n_kv_heads=8",
    "model.head_dim=128",
    "model.mlp_dim=16384",
    "data.seq_len=256",
    "mesh.data=-1",
]


@pytest.fixture(scope="module")
def smoke_fsdp():
    """smoke with its 4 chips on the fsdp axis, so every parameter is split 4 ways."""
    return load_config(SMOKE, ["mesh.data=1", "mesh.fsdp=-1"])


@pytest.fixture(scope="module")
def smoke_report(smoke_fsdp):
    return plan(smoke_fsdp, "v5p:2x2x1")


@needs_libtpu
def test_smoke_plan_on_v5p_slice(smoke_report, smoke_fsdp):
    r = smoke_report
    assert (r.num_devices, r.num_chips) == (4, 4)
    assert r.mesh == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 1}
    assert r.device_kind.startswith("TPU v5") and "lite" not in r.device_kind
    assert r.hbm_bytes == 95 * GiB
    assert r.fits and r.shortfall_bytes == 0

    # Parameters (float32) are split 4 ways; only norm scales are replicated.
    n = param_count(smoke_fsdp)
    assert r.param_count == n
    assert n * 4 / 4 <= r.param_bytes <= 1.05 * n * 4 / 4
    # Adam: two moments of the parameters' size (+ scalar counters).
    assert 1.95 * r.param_bytes <= r.opt_state_bytes <= 2.05 * r.param_bytes
    # The state is an argument of the step (donated, so aliased to the output).
    assert r.argument_bytes >= r.param_bytes + r.opt_state_bytes
    assert r.alias_bytes >= r.param_bytes + r.opt_state_bytes
    assert r.temp_bytes > 0
    assert r.total_bytes == (
        r.argument_bytes + r.output_bytes - r.alias_bytes + r.temp_bytes + r.code_bytes
    )
    assert r.total_bytes < 2 * GiB

    # FLOPs: the model count for the whole step; the compiler's per-device count is positive
    # (and below the model's, since XLA counts each scanned layer / depth once).
    assert r.model_flops == model_flops(smoke_fsdp) * 16 * 128
    assert 0 < r.compiled_flops < r.model_flops / r.num_devices
    assert r.peak_flops == 459e12
    assert math.isclose(r.step_time_100, r.model_flops / (4 * 459e12))
    assert math.isclose(r.step_time_50, 2 * r.step_time_100)


@needs_libtpu
def test_report_text_and_dict(smoke_report):
    text = smoke_report.to_text()
    for needle in (
        "v5p:2x2x1",
        "TPU v5",
        "parameters",
        "optimizer state",
        "temporaries",
        "HBM",
        "fits",
        "50% MFU",
    ):
        assert needle in text, needle
    d = smoke_report.to_dict()
    assert json.loads(json.dumps(d))["fits"] is True
    assert d["devices_per_chip"] == 1


@needs_libtpu
def test_plan_main_fits_returns_0(smoke_fsdp, smoke_report, capsys, monkeypatch):
    monkeypatch.setattr(plan_mod, "plan", lambda config, topology: smoke_report)
    assert plan_main(smoke_fsdp, "configs/smoke.py", "v5p:2x2x1") == 0
    out = capsys.readouterr().out
    assert smoke_report.to_text() in out
    assert "configs/smoke.py fits v5p:2x2x1" in out


@needs_libtpu
def test_too_big_for_slice_returns_1(capsys, monkeypatch):
    config = load_config(SMOKE, TOO_BIG)
    assert param_count(config) > 1e9
    reports = []
    real_plan = plan_mod.plan
    monkeypatch.setattr(
        plan_mod, "plan", lambda c, t: reports.append(real_plan(c, t)) or reports[-1]
    )
    assert plan_main(config, "configs/smoke.py", "v5e:2x2") == 1
    out = capsys.readouterr().out
    assert "configs/smoke.py does NOT fit v5e:2x2" in out
    assert "short by" in out
    (report,) = reports
    assert not report.fits
    assert report.hbm_bytes == 16 * GiB
    # Replicated float32 parameters and Adam moments alone overflow the 16 GiB.
    state = report.param_bytes + report.opt_state_bytes
    assert report.param_bytes == param_count(config) * 4
    assert report.shortfall_bytes >= state - 16 * GiB
    assert report.total_bytes >= report.hbm_bytes + report.shortfall_bytes - 0.1 * GiB
    assert "short by" in report.to_text()


@needs_libtpu
@pytest.mark.parametrize(
    "name, expected",
    [
        ("bogus", "unknown TPU topology 'bogus'"),
        ("v5p-128", "looks like an accelerator type"),
        ("v9x:2x2", "libtpu does not know the TPU topology 'v9x:2x2'"),
    ],
)
def test_unknown_topology(name, expected):
    config = load_config(SMOKE)
    with pytest.raises(PlanError, match="v5p:4x4x4") as info:
        plan(config, name)
    assert expected in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_unknown_topology_plan_main_returns_2(capsys):
    assert plan_main(load_config(SMOKE), "configs/smoke.py", "v5p-128") == 2
    assert "v5p:4x4x4" in capsys.readouterr().err


def test_missing_libtpu_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        plan_mod.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "libtpu" else real(name, *a),
    )
    with pytest.raises(PlanError, match=r"pip install 'mtp_jax\[tpu\]'"):
        plan(load_config(SMOKE), "v5p:2x2x1")


def test_hbm_table_by_device_kind():
    assert plan_mod.hbm_per_chip("TPU v5") == 95 * GiB
    assert plan_mod.hbm_per_chip("TPU v5 lite") == 16 * GiB
    assert plan_mod.hbm_per_chip("TPU v4") == 32 * GiB
    assert plan_mod.hbm_per_chip("TPU v6 lite") == 32 * GiB
    assert plan_mod.hbm_per_chip("NVIDIA H100") is None


@needs_libtpu
def test_moe_plan_hints_mesh_expert_and_counts_activated_parameters(smoke_report):
    """Without compiling again: the smoke plan's report relabelled as a MoE config's."""
    moe = load_config(str(CONFIGS / "moe_smoke.py"))
    total, activated = param_count(moe), activated_param_count(moe)
    assert activated < total
    short = dataclasses.replace(
        smoke_report,
        fits=False,
        shortfall_bytes=GiB,
        param_count=total,
        activated_param_count=activated,
    )
    assert "activated per token" in short.to_text()
    assert "mesh.expert, now 1" in plan_mod.plan_verdict(moe, "moe_smoke.py", short)
    assert "mesh.expert" not in plan_mod.plan_verdict(load_config(SMOKE), "smoke.py", short)
    # Every device holds a share of the state (fsdp x expert x tensor = all): no "shard the
    # state" hint; with a data axis, the state is replicated and the hint comes back.
    n = short.num_devices
    mesh = {**short.mesh, "data": 1, "fsdp": n // 2, "expert": 2, "tensor": 1}
    split = dataclasses.replace(short, mesh=mesh)
    assert "shard the state" not in plan_mod.plan_verdict(moe, "moe_smoke.py", split)
    copied = dataclasses.replace(split, mesh={**split.mesh, "data": 2, "fsdp": n // 4})
    assert "shard the state" in plan_mod.plan_verdict(moe, "moe_smoke.py", copied)
    assert "activated" not in smoke_report.to_text()  # dense: one count

    # The train step fits, the eval step (whole batch, dropless routing) does not.
    eval_oom = dataclasses.replace(short, shortfall_bytes=0, compiler_message="eval step: OOM")
    assert "the eval step does not" in eval_oom.to_text()
    verdict = plan_mod.plan_verdict(moe, "moe_smoke.py", eval_oom)
    assert "does NOT fit" in verdict and "eval step runs out of HBM" in verdict


# --------------------------------------------------------------------------- the roofline


@needs_libtpu
def test_roofline_in_the_plan_json_equals_a_hand_computation(smoke_report, tmp_path):
    """--plan_json's roofline from its own cost-analysis figures and the chip table."""
    d = json.loads(json.dumps(smoke_report.to_dict()))
    for key in (
        "fits",
        "bytes_per_chip",
        "hbm_per_chip",
        "flops_per_step",
        "bytes_accessed",
        "roofline_step_seconds",
        "mfu_bound",
        "attention_impl",
    ):
        assert key in d, key
    assert d["attention_impl"] == "splash"  # auto on a TPU slice, S=128
    assert d["hbm_bandwidth"] == 2765e9  # v5p's data sheet
    per_device_model = d["model_flops"] / d["num_devices"]
    assert d["flops_per_step"] == max(d["compiled_flops"], per_device_model)
    assert d["flops_source"] == "model_flops"  # the compiled count misses the scanned layers
    assert d["bytes_accessed"] > 0
    want = max(d["flops_per_step"] / 459e12, d["bytes_accessed"] / 2765e9)
    assert math.isclose(d["roofline_step_seconds"], want, rel_tol=1e-12)
    assert math.isclose(d["mfu_bound"], per_device_model / 459e12 / want, rel_tol=1e-12)
    assert 0 < d["mfu_bound"] <= 1
    assert d["bytes_per_chip"] == d["total_bytes"] and d["hbm_per_chip"] == 95 * GiB
    assert "roofline" in smoke_report.to_text() and "MFU at most" in smoke_report.to_text()


def test_roofline_takes_the_higher_flop_count():
    r = plan_mod.roofline(2e9, 1e9, 4e9, 1e12, 2e12)
    assert r["flops_source"] == "compiled" and r["flops_per_step"] == 2e9
    assert math.isclose(r["roofline_step_seconds"], 2e-3)  # memory-bound: 4e9 / 2e12
    assert math.isclose(r["mfu_bound"], 1e9 / 1e12 / 2e-3)
    r = plan_mod.roofline(1e9, 3e9, 1e6, 1e12, 2e12)
    assert r["flops_source"] == "model_flops" and math.isclose(r["roofline_step_seconds"], 3e-3)


TINY_PLAN = [
    "model.d_model=64",
    "model.n_layers=1",
    "model.mlp_dim=128",
    "model.mtp_depth=1",
    "data.batch_size=8",
    "mesh.data=1",
    "mesh.fsdp=-1",
]


@needs_libtpu
def test_search_ranks_candidates_and_marks_those_that_do_not_fit(monkeypatch, capsys):
    config = load_config(SMOKE, TINY_PLAN)
    found = plan_mod.search(config, "v5p:2x2x1", limit=3)
    assert len(found) == 3 and all(c.report is not None for c in found)
    assert all(c.report.fits for c in found)
    times = [c.report.roofline_step_seconds for c in found]
    assert times == sorted(times) and times[0] > 0
    assert len({tuple(sorted(c.overrides.items())) for c in found}) == 3  # distinct layouts

    # The best candidate, were it too big, drops below every candidate that fits.
    def layout(o):
        return (o["mesh.fsdp"], o["mesh.tensor"], o["model.remat_policy"], o["train.microbatches"])

    reports = {layout(c.overrides): c.report for c in found}
    reports[layout(found[0].overrides)] = dataclasses.replace(
        found[0].report, fits=False, shortfall_bytes=GiB
    )

    def replay(c, topology):  # the plans above again, without compiling
        return reports[(c.mesh.fsdp, c.mesh.tensor, c.model.remat_policy, c.train.microbatches)]

    monkeypatch.setattr(plan_mod, "plan", replay)
    again = plan_mod.search(config, "v5p:2x2x1", limit=3)
    assert [c.report.fits for c in again] == [True, True, False]
    table = plan_mod.search_table(again)
    assert table.splitlines()[-1].split("|")[5].strip().startswith("NO")


@needs_libtpu
def test_mtp_plan_cli_writes_the_plan_json(tmp_path, capsys):
    from mtp_jax.cli.plan import main as plan_cli

    out = tmp_path / "plan.json"
    code = plan_cli(
        ["--config", SMOKE, "--topology", "v5p:2x2x1", "--plan_json", str(out)]
        + [f"--config.{o}" for o in TINY_PLAN]
    )
    assert code == 0
    assert json.loads(out.read_text())["fits"] is True
    assert "MFU at most" in capsys.readouterr().out


def test_search_tries_expert_splits_for_moe_and_every_head_for_mla():
    """No compile: the layouts `search` would plan. Dense GQA (2 K/V heads): expert 1, tensor
    1 or 2. MoE + MLA (8 experts, 4 heads, no K/V heads): expert splits dividing 8, tensor up
    to 4, and every split uses the whole slice."""
    dense = plan_mod.candidate_overrides(load_config(SMOKE, TINY_PLAN), 8, limit=100)
    assert {o["mesh.expert"] for o in dense} == {1}
    assert {o["mesh.tensor"] for o in dense} == {1, 2}
    moe = load_config(str(CONFIGS / "moe_smoke.py"), ["data.batch_size=8"])
    found = plan_mod.candidate_overrides(moe, 8, limit=100)
    assert {o["mesh.expert"] for o in found} == {1, 2, 4, 8}
    assert {o["mesh.tensor"] for o in found} == {1, 2, 4}
    assert all(o["mesh.fsdp"] * o["mesh.expert"] * o["mesh.tensor"] == 8 for o in found)
    first = plan_mod.candidate_overrides(moe, 8, limit=1)[0]  # the config's own layout first
    assert (first["mesh.expert"], first["mesh.tensor"]) == (moe.mesh.expert, 1)
