# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]

# %% [markdown]
# # Does MTP pay? Reading an `mtp-study` directory
#
# `mtp-study --out runs/study` trains a grid of runs (D = 0, sequential and parallel MTP,
# shared-weight depths, a λ curriculum) on the same data and token budget with several seeds,
# and writes `results.json`, `summary.json`, `results.md` and plots. This notebook loads such a
# directory and draws the comparisons: next-token loss against tokens, the loss each variant
# ends at, what the depths buy in decoding, and the effective (wall-clock) training speedup.

# %% tags=["parameters"]
import os

STUDY = os.environ.get("MTP_STUDY_DIR", "../runs/study")

# %%
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

import mtp_jax

study = mtp_jax.load_study(STUDY)
display(Markdown(study["markdown"]))

# %% [markdown]
# Next-token validation loss against training tokens, every seed (thin) and the mean (thick).

# %%
names = [row["name"] for row in study["variants"]]
fig, ax = plt.subplots(figsize=(8, 4))
for i, name in enumerate(names):
    runs = [r for r in study["results"] if r["name"] == name]
    color = f"C{i % 10}"
    for r in runs:
        xs, ys = zip(*r["curve"], strict=True)
        ax.plot(xs, ys, color=color, lw=0.6, alpha=0.5)
    mean = np.mean([[loss for _, loss in r["curve"]] for r in runs], axis=0)
    ax.plot([c for c, _ in runs[0]["curve"]], mean, color=color, lw=2, label=name)
ax.set(xscale="log", xlabel="training tokens", ylabel="next-token val loss (nats)")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# Where each variant ends (mean ± half the range over seeds), and what it buys: the simulated
# acceptance length (teacher-forced), the real tokens per trunk step of greedy self-speculative
# decoding, and the effective training speedup against the baseline's fitted loss curve.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
rows = study["variants"]
loss = [r["val_loss"] for r in rows]
spread = [r["val_loss_spread"] or 0.0 for r in rows]
axes[0].bar(names, loss, yerr=spread, color=[f"C{i % 10}" for i in range(len(rows))])
axes[0].set_ylim(min(loss) - 0.1, max(loss) + 0.1)
axes[0].set(ylabel="final next-token val loss")
axes[0].tick_params(axis="x", rotation=30)
mtp = [r for r in rows if r["mtp_depth"]]
x = np.arange(len(mtp))
for j, key in enumerate(["accept_len", "tokens_per_step", "effective_speedup"]):
    values = [r[key] if r[key] is not None and np.isfinite(r[key]) else 0.0 for r in mtp]
    axes[1].bar(x + (j - 1) * 0.27, values, 0.27, label=key)
axes[1].axhline(1.0, color="k", lw=0.8)
axes[1].set_xticks(x, [r["name"] for r in mtp], rotation=30)
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()
