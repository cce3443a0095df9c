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
# # Sequential chain vs parallel heads vs no MTP
#
# Three runs from the same seed on the same batches: a plain next-token model (D=0),
# DeepSeek-V3's sequential MTP chain and Meta's parallel heads (both D=2). We compare the
# next-token loss they reach and how often each MTP depth's argmax agrees with the
# next-token head (the acceptance a self-speculative drafter would see).

# %% tags=["parameters"]
import os

WORKDIR = os.environ.get("MTP_NOTEBOOK_WORKDIR", "../runs/compare")
TRAIN_STEPS = int(os.environ.get("MTP_NOTEBOOK_STEPS", "300"))
CONFIG = os.environ.get("MTP_NOTEBOOK_CONFIG", "../configs/smoke.py")

# %%
import pathlib

import matplotlib.pyplot as plt
import numpy as np

import mtp_jax

RUNS = {
    "D=0": ["model.mtp_depth=0"],
    "sequential D=2": ["model.mtp_depth=2", "model.mtp_layout=sequential"],
    "parallel D=2": ["model.mtp_depth=2", "model.mtp_layout=parallel"],
}
common = [
    f"train.steps={TRAIN_STEPS}",
    f"train.eval_every={TRAIN_STEPS}",
    f"checkpoint.every={TRAIN_STEPS}",
]
metrics = {}
for name, overrides in RUNS.items():
    workdir = pathlib.Path(WORKDIR) / name.replace(" ", "_").replace("=", "")
    if not (workdir / "checkpoints").exists():
        mtp_jax.train(mtp_jax.load_config(CONFIG, common + overrides), str(workdir), progress=False)
    metrics[name] = mtp_jax.read_metrics(str(workdir))

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for name, recs in metrics.items():
    train = [r for r in recs if "loss/depth_0" in r]
    axes[0].plot([r["step"] for r in train], [r["loss/depth_0"] for r in train], label=name)
axes[0].set(title="next-token (depth 0) training loss", xlabel="step")
axes[0].legend()

width = 0.35
for i, name in enumerate(n for n in metrics if n != "D=0"):
    final = [r for r in metrics[name] if "eval/agreement/depth_1" in r][-1]
    agreement = [final[f"eval/agreement/depth_{k}"] for k in (1, 2)]
    axes[1].bar(np.arange(2) + i * width, agreement, width, label=name)
axes[1].set(
    title="eval agreement with the next-token head",
    xticks=np.arange(2) + width / 2,
    xticklabels=["depth 1", "depth 2"],
    ylim=(0, 1),
)
axes[1].legend()
plt.tight_layout()
plt.show()

# %%
rows = []
for name, recs in metrics.items():
    final = [r for r in recs if "eval/loss/depth_0" in r][-1]
    extra = {k: v for k, v in final.items() if k.startswith("eval/")}
    rows.append((name, final["eval/loss/depth_0"], extra))
for name, loss0, extra in rows:
    agreement = [f"{extra[k]:.2f}" for k in sorted(extra) if "agreement" in k]
    print(f"{name:16s} eval next-token loss {loss0:.3f}   agreement per depth {agreement}")
