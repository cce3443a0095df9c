"""`mtp-generate`: sample from a training run's newest (or a chosen) checkpoint.

    mtp-generate --workdir runs/smoke --prompt "def main(" --max-new-tokens 64
    mtp-generate --workdir runs/smoke --prompt "import " --temperature 0.8 --top-p 0.95 --json
    mtp-generate --workdir runs/big --prompt "x" --config.mesh.fsdp=4 --config.mesh.data=-1

The parameters are loaded alone (no optimizer state) straight into their training shardings
on the mesh of the saved config, or of `--config.mesh.*` overrides (the same keys as
mtp-train's; the rest of the saved config is kept), and decoding runs on that mesh.

Decoding is self-speculative (the MTP depths draft, the trunk verifies) unless the model has
no MTP depths or `--no-speculative` is given; greedy output is identical either way.
Errors a user can fix (no workdir, no checkpoint, a prompt longer than the training context)
print one line and exit with status 2. A prompt that fits but leaves too little room for
--max-new-tokens only warns: the tokens past the training context come from positions the
model never trained on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from mtp_jax.xla_cpu import reexec_with_tuned_malloc

PROG = "mtp-generate"


class UsageError(Exception):
    """A problem with the command line or the workdir, reported without a traceback."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="the training run's directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--no-speculative", action="store_true", help="plain decoding with the trunk")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args, rest = p.parse_known_args(argv)
    args.overrides = []
    for item in rest:
        if not item.startswith("--config.mesh."):
            p.error(
                f"unrecognised argument {item!r} (only the mesh can be overridden here: "
                "--config.mesh.data=..., --config.mesh.fsdp=..., --config.mesh.tensor=...)"
            )
        args.overrides.append(item)
    return args


def _load(workdir: str, step: int | None, overrides: list[str]) -> tuple[Any, Any]:
    """(config, params on the config's mesh) of the checkpoint, or UsageError."""
    if "://" not in workdir and not os.path.isdir(workdir):
        raise UsageError(f"workdir {workdir!r} does not exist")
    from mtp_jax.config import ConfigDict, ConfigError, apply_overrides, validate
    from mtp_jax.sharding import make_mesh
    from mtp_jax.train.checkpoint import CheckpointError, load_params, saved_config

    try:
        config, step = saved_config(workdir, step)
        config = ConfigDict(config.to_dict())
        apply_overrides(config, overrides)
        validate(config)
        mesh = make_mesh(config.mesh, allow_subset=True)
        return config, load_params(workdir, step, mesh)
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e


def _context_length(config: Any) -> int:
    """The longest prompt the model was trained for: data.seq_len positions."""
    return int(config.data.seq_len)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Loads the checkpoint, generates, and returns the JSON-able result."""
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not -(2**63) <= args.seed < 2**63:
        raise UsageError(f"--seed must fit in 64 bits (a signed integer), got {args.seed}")
    config, params = _load(args.workdir, args.step, args.overrides)

    import jax
    import numpy as np

    from mtp_jax.data import get_tokenizer
    from mtp_jax.inference import generate, speculative_generate
    from mtp_jax.model import Model

    tokenizer = get_tokenizer(config.data.tokenizer)
    ids = tokenizer.encode(args.prompt)
    context = _context_length(config)
    if not ids:
        raise UsageError("the prompt is empty; give at least one character")
    if len(ids) > context:
        raise UsageError(
            f"the prompt has {len(ids)} tokens, more than the model's context of {context}"
        )
    if len(ids) + args.max_new_tokens > context:
        print(
            f"{PROG}: warning: the prompt's {len(ids)} tokens + --max-new-tokens "
            f"{args.max_new_tokens} run past the model's context of {context}; tokens past "
            "it come from positions the model never trained on",
            file=sys.stderr,
        )
    speculative = bool(config.model.mtp_depth) and not args.no_speculative
    fn = speculative_generate if speculative else generate
    try:
        result = fn(
            Model(config.model),
            params,
            np.asarray([ids], np.int32),
            np.asarray([len(ids)], np.int32),
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_id=tokenizer.eos_id if tokenizer.eos_id >= 0 else None,
            rng=jax.random.key(args.seed),
        )
    except ValueError as e:  # bad sampling settings
        raise UsageError(str(e)) from e
    new = result.as_lists()[0]
    stats = result.stats
    return {
        "text": tokenizer.decode(new),
        "prompt": args.prompt,
        "tokens": ids + new,
        "new_tokens": new,
        "tokens_per_sec": stats["tokens_per_sec"],
        "acceptance": stats.get("acceptance", []),
        "mean_accepted": stats.get("mean_accepted", 1.0),
        "speculative": speculative,
    }


def entry() -> int:
    """The `mtp-generate` console script: `main` in a process with tuned malloc (`xla_cpu`)."""
    reexec_with_tuned_malloc("mtp-generate")
    return main()


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mtp-generate`; returns the exit status (2 on a usage error)."""
    args = parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's read-only notices
    try:
        out = run(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out))
    else:
        print(args.prompt + out["text"])
    return 0


if __name__ == "__main__":
    sys.exit(entry())
