"""The study's outputs: results.json (one object per run), results.md (a table per variant,
mean ± spread over seeds) and PNG plots."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from mtp_jax.study.fit import effective_speedup, fit_power_law

log = logging.getLogger(__name__)

BASELINE = "ntp"


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _spread(values: Sequence[float | None]) -> float | None:
    """Half the range over seeds (the ± of the table)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float((max(vals) - min(vals)) / 2) if len(vals) > 1 else None


def add_effective_speedup(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Fits the baseline's L(C) (its eval curve, averaged over seeds) and sets each MTP run's
    `effective_speedup`; returns the fit (or None without a baseline)."""
    base = [r for r in results if r["name"] == BASELINE]
    if not base:
        return None
    steps = sorted({c for r in base for c, _ in r["curve"]})
    curve = [
        (c, float(np.mean([dict(map(tuple, r["curve"])).get(c) for r in base]))) for c in steps
    ]
    curve = [(c, loss) for c, loss in curve if loss is not None and c > 0]
    try:
        law = fit_power_law([c for c, _ in curve], [loss for _, loss in curve])
    except ValueError as e:
        log.warning("no power law fits the baseline's curve (%s): no effective speedup", e)
        return None
    base_tps = _mean([r.get("tokens_per_sec") for r in base])
    for r in results:
        if r["name"] == BASELINE or not r.get("tokens_per_sec") or not base_tps:
            continue
        r["effective_speedup"] = effective_speedup(
            law, r["val_loss"], r["tokens"], r["tokens_per_sec"] / base_tps
        )
    return {"l_inf": law.l_inf, "a": law.a, "alpha": law.alpha, "rms": law.rms}


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant (grid order): means and spreads over its seeds."""
    names = list(dict.fromkeys(r["name"] for r in results))
    base_tps = _mean([r.get("tokens_per_sec") for r in results if r["name"] == BASELINE])
    rows = []
    for name in names:
        runs = [r for r in results if r["name"] == name]
        row = {"name": name, "seeds": len(runs), "mtp_depth": runs[0]["mtp_depth"]}
        for key in (
            "val_loss",
            "val_bpb",
            "accept_len",
            "tokens_per_sec",
            "effective_speedup",
            "decode_speedup",
            "tokens_per_step",
        ):
            vals = [r.get(key) for r in runs]
            row[key], row[key + "_spread"] = _mean(vals), _spread(vals)
        if base_tps and row["tokens_per_sec"]:
            row["step_time_overhead"] = base_tps / row["tokens_per_sec"] - 1.0
        rows.append(row)
    return rows


def _fmt(value: float | None, spread: float | None = None, digits: int = 3) -> str:
    if value is None:
        return "–"
    if math.isinf(value):
        return "∞"
    text = f"{value:.{digits}f}"
    return f"{text} ± {spread:.{digits}f}" if spread is not None else text


def markdown(rows: list[dict[str, Any]], fit: dict[str, Any] | None, header: str) -> str:
    lines = [
        header,
        "",
        "| run | D | val loss (nats/token) | val bits/byte | accept len (sim.) | "
        "tokens/step (real) | greedy decode speedup | train tokens/s | step-time overhead | "
        "effective speedup |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        overhead = r.get("step_time_overhead")
        lines.append(
            f"| {r['name']} | {r['mtp_depth']} | {_fmt(r['val_loss'], r['val_loss_spread'])} "
            f"| {_fmt(r['val_bpb'], r['val_bpb_spread'])} "
            f"| {_fmt(r['accept_len'], r['accept_len_spread'], 2)} "
            f"| {_fmt(r['tokens_per_step'], r['tokens_per_step_spread'], 2)} "
            f"| {_fmt(r['decode_speedup'], r['decode_speedup_spread'], 2)} "
            f"| {_fmt(r['tokens_per_sec'], None, 0)} "
            f"| {'–' if overhead is None else f'{overhead:+.0%}'} "
            f"| {_fmt(r['effective_speedup'], r['effective_speedup_spread'], 2)} |"
        )
    if fit:
        lines += [
            "",
            f"Baseline fit L(C) = {fit['l_inf']:.3f} + {fit['a']:.3g} C^-{fit['alpha']:.3f} "
            f"(C = training tokens; RMS residual {fit['rms']:.4f}). Effective speedup = the "
            "tokens the baseline needs to reach the run's loss / the run's tokens x its "
            "throughput relative to the baseline (> 1: MTP reaches that loss sooner).",
        ]
    return "\n".join(lines) + "\n"


def plots(results: list[dict[str, Any]], rows: list[dict[str, Any]], out: str) -> list[str]:
    """loss_vs_tokens.png, depth_accuracy.png, speedups.png; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: results without plots (pip install matplotlib)")
        return []
    written = []
    names = [r["name"] for r in rows]

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        runs = [r for r in results if r["name"] == name]
        xs = [c for c, _ in runs[0]["curve"]]
        ys = np.mean([[loss for _, loss in r["curve"]] for r in runs], axis=0)
        ax.plot(xs, ys, marker="o", ms=3, label=name, lw=2.5 if name == BASELINE else 1.2)
    ax.set(xlabel="training tokens", ylabel="next-token val loss (nats)", xscale="log")
    ax.set_title("Next-token validation loss vs tokens (mean over seeds)")
    ax.legend(fontsize=8)
    written.append(_save(fig, out, "loss_vs_tokens.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        runs = [r for r in results if r["name"] == name]
        acc = np.mean([[a or 0.0 for a in r["accuracy"]] for r in runs], axis=0)
        ax.plot(range(len(acc)), acc, marker="o", label=name)
    ax.set(xlabel="depth k (0 = next token)", ylabel="val accuracy", title="Accuracy per depth")
    ax.legend(fontsize=8)
    written.append(_save(fig, out, "depth_accuracy.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    mtp = [r for r in rows if r["mtp_depth"]]
    x = np.arange(len(mtp))
    for i, (key, label) in enumerate(
        (
            ("accept_len", "simulated accept length"),
            ("tokens_per_step", "tokens/step (real)"),
            ("decode_speedup", "greedy decode speedup"),
            ("effective_speedup", "effective train speedup"),
        )
    ):
        vals = [r.get(key) or 0.0 for r in mtp]
        vals = [v if math.isfinite(v) else 0.0 for v in vals]
        ax.bar(x + (i - 1.5) * 0.2, vals, 0.2, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(x, [r["name"] for r in mtp], rotation=20, fontsize=8)
    ax.set_title("What MTP buys (1 = the baseline)")
    ax.legend(fontsize=8)
    written.append(_save(fig, out, "speedups.png"))
    return written


def _save(fig, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write(out: str, results: list[dict[str, Any]], header: str) -> dict[str, Any]:
    """Writes results.json, results.md and the plots into `out`; returns what it wrote."""
    fit = add_effective_speedup(results)
    rows = summarize(results)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"variants": rows, "baseline_fit": fit}, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(rows, fit, header))
    return {"rows": rows, "fit": fit, "plots": plots(results, rows, out)}


def load_study(out: str) -> dict[str, Any]:
    """A finished study's outputs: {'results': [one dict per run], 'variants': [one summary
    row per run name], 'baseline_fit': {...} or None, 'markdown': results.md}."""
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out, "results.md")) as f:
        text = f.read()
    return {"results": results, **summary, "markdown": text}
