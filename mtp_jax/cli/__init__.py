"""The command-line entry points: the only package that imports across train, inference and
data (and nothing imports it).

| command | module |
|---|---|
| `mtp-train` | `mtp_jax.cli.train` |
| `mtp-generate` | `mtp_jax.cli.generate` |
| `mtp-prepare` | `mtp_jax.cli.prepare` |

Each also runs as `python -m mtp_jax.cli.NAME`.
"""
