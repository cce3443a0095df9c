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
# # What the MTP depths learn
#
# A model trained with `configs/smoke.py` (byte-level, a D=2 sequential MTP chain): its
# per-depth learning curves, the loss of every depth at every position of held-out code, the
# tokens that all depths find hard ("choice points"), how often each depth agrees with the
# next-token head, and a self-speculative decoding run with the accepted drafts highlighted.
#
# Only the public API is used: `mtp_jax.load_config`, `train`, `load_checkpoint`,
# `read_metrics`, `Model`, `get_tokenizer`, `generate`, `speculative_generate`.

# %% tags=["parameters"]
import os

# A workdir with checkpoints; if it has none, the smoke config is trained there first.
WORKDIR = os.environ.get("MTP_NOTEBOOK_WORKDIR", "../runs/smoke")
TRAIN_STEPS = int(os.environ.get("MTP_NOTEBOOK_STEPS", "300"))
CONFIG = os.environ.get("MTP_NOTEBOOK_CONFIG", "../configs/smoke.py")

# %%
import html
import pathlib
import time

import jax
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import HTML, display

import mtp_jax

if not (pathlib.Path(WORKDIR) / "checkpoints").exists():
    cfg = mtp_jax.load_config(CONFIG, [f"train.steps={TRAIN_STEPS}"])
    mtp_jax.train(cfg, WORKDIR, progress=False)
config, params = mtp_jax.load_checkpoint(WORKDIR)
model = mtp_jax.Model(config.model)
tokenizer = mtp_jax.get_tokenizer(config.data.tokenizer)
D = config.model.mtp_depth
print(f"{mtp_jax.param_count(config):,} parameters, D={D} ({config.model.mtp_layout})")

# %% [markdown]
# ## Learning curves per depth

# %%
records = mtp_jax.read_metrics(WORKDIR)
train_rec = [r for r in records if "loss" in r]
eval_rec = [r for r in records if "eval/loss/depth_0" in r]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for k in range(D + 1):
    steps = [r["step"] for r in train_rec]
    axes[0].plot(steps, [r[f"loss/depth_{k}"] for r in train_rec], label=f"depth {k}")
    axes[1].plot(steps, [r[f"accuracy/depth_{k}"] for r in train_rec], label=f"depth {k}")
    if eval_rec:
        ev_steps = [r["step"] for r in eval_rec]
        axes[0].scatter(ev_steps, [r[f"eval/loss/depth_{k}"] for r in eval_rec], marker="x")
axes[0].set(title="loss (lines: train, x: eval)", xlabel="step")
axes[1].set(title="top-1 accuracy", xlabel="step")
axes[0].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Every depth on held-out code
#
# The held-out text is this project's own source, which is not in the training corpus. Depth
# `k` at position `i` predicts token `i + k + 1`; so token `j` is a target of depth `k` at
# position `j - k - 1`, for every `k`. A *choice point* is a token whose prediction error
# recurs across all the depths that target it.

# %%
text = pathlib.Path(mtp_jax.__file__).with_name("loss.py").read_text()[:1200]
ids = np.asarray(tokenizer.encode(text), np.int32)
S = min(len(ids) - D - 1, 1024)
window = ids[: S + D + 1]
logits = model.apply({"params": params}, window[None, : S + D]).logits[:, 0]  # [D+1, S, V]
logp = jax.nn.log_softmax(logits, axis=-1)
targets = np.stack([window[k + 1 : S + k + 1] for k in range(D + 1)])  # [D+1, S]
loss = -np.take_along_axis(np.asarray(logp), targets[..., None], -1)[..., 0]  # [D+1, S]

# loss_by_token[k, j]: depth k's loss on token j (NaN where no position of depth k targets j).
loss_by_token = np.full((D + 1, S + D + 1), np.nan)
for k in range(D + 1):
    loss_by_token[k, k + 1 : S + k + 1] = loss[k]
print("mean loss per depth:", np.round(loss.mean(1), 3))

fig, ax = plt.subplots(figsize=(11, 2.5))
im = ax.imshow(loss_by_token[:, 1:200], aspect="auto", cmap="magma")
ax.set(xlabel="target token j", ylabel="depth k", title="loss of depth k on token j")
plt.colorbar(im)
plt.show()

# %%
covered = ~np.isnan(loss_by_token).any(0)
recurring = np.zeros(S + D + 1)  # the loss of the depth that finds token j easiest
recurring[covered] = loss_by_token[:, covered].min(axis=0)
top = np.argsort(-recurring)[:15]
print("choice points (token: min loss over depths):")
print(", ".join(f"{tokenizer.decode([int(window[j])])!r}: {recurring[j]:.1f}" for j in top))


def shade(j: int) -> str:
    """Token j of the window, coloured by its loss at the depth that finds it easiest."""
    ch = html.escape(tokenizer.decode([int(window[j])]))
    alpha = min(recurring[j] / 6.0, 1.0) if covered[j] else 0.0
    return f'<span style="background: rgba(230,60,30,{alpha:.2f})">{ch}</span>'


display(HTML("<pre>" + "".join(shade(j) for j in range(1, 600)) + "</pre>"))

# %% [markdown]
# ## Would the depths' drafts be accepted?
#
# Depth `k`'s argmax at position `i` and the next-token head's argmax at `i + k` predict the
# same token. How often they agree is the acceptance a greedy drafter would see; here by
# position and by the kind of token being predicted.

# %%
pred = np.asarray(logits.argmax(-1))  # [D+1, S]
kinds = {
    "letter": str.isalpha,
    "digit": str.isdigit,
    "space": str.isspace,
    "punct": lambda c: not c.isalnum() and not c.isspace(),
}
agree = np.zeros((D, len(kinds)))
for k in range(1, D + 1):
    same = pred[k, : S - k] == pred[0, k:]
    chars = [tokenizer.decode([int(window[i + k + 1])])[:1] or " " for i in range(S - k)]
    for c, check in enumerate(kinds.values()):
        sel = np.array([check(ch) for ch in chars])
        agree[k - 1, c] = same[sel].mean() if sel.any() else np.nan
fig, axes = plt.subplots(1, 2, figsize=(11, 3))
im = axes[0].imshow(agree, vmin=0, vmax=1, cmap="viridis")
axes[0].set(
    xticks=range(len(kinds)),
    xticklabels=list(kinds),
    yticks=range(D),
    yticklabels=[f"depth {k}" for k in range(1, D + 1)],
    title="agreement by token kind",
)
plt.colorbar(im, ax=axes[0])
for k in range(1, D + 1):
    same = (pred[k, : S - k] == pred[0, k:]).astype(float)
    run = np.convolve(same, np.ones(32) / 32, mode="valid")
    axes[1].plot(run, label=f"depth {k}")
axes[1].set(title="agreement over positions (32-token mean)", xlabel="position", ylim=(0, 1))
axes[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Self-speculative decoding
#
# The MTP depths draft, the trunk verifies. Greedy speculative decoding must give exactly the
# tokens of plain greedy decoding; the highlighted tokens were drafted by the MTP depths and
# accepted.

# %%
prompt = "def __init__(self"
prompt_ids = np.asarray([tokenizer.encode(prompt)], np.int32)
lengths = np.asarray([prompt_ids.shape[1]], np.int32)
kwargs = dict(max_new_tokens=160, eos_id=tokenizer.eos_id)
plain = mtp_jax.generate(model, params, prompt_ids, lengths, **kwargs)  # compile
spec = mtp_jax.speculative_generate(model, params, prompt_ids, lengths, **kwargs)
timings = {}
for name, fn in (("plain", mtp_jax.generate), ("speculative", mtp_jax.speculative_generate)):
    start = time.perf_counter()
    result = fn(model, params, prompt_ids, lengths, **kwargs)
    timings[name] = time.perf_counter() - start
assert plain.as_lists() == spec.as_lists(), "speculative greedy must equal greedy"

tokens = spec.as_lists()[0]
drafted = spec.stats.get("drafted", [[False] * len(tokens)])[0]
pieces = [html.escape(prompt)]
for tok, was_draft in zip(tokens, drafted, strict=False):
    ch = html.escape(tokenizer.decode([tok]))
    pieces.append(f'<span style="background:#b8f0b8">{ch}</span>' if was_draft else ch)
display(HTML("<pre>" + "".join(pieces) + "</pre>"))
print("acceptance per draft position:", np.round(spec.stats["acceptance"], 3))
print(f"mean tokens per verify step: {spec.stats['mean_accepted']:.2f}")
print(
    f"plain {timings['plain']:.3f} s, speculative {timings['speculative']:.3f} s, "
    f"speedup {timings['plain'] / timings['speculative']:.2f}x"
)
