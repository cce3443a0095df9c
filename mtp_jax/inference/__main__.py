"""`python -m mtp_jax.inference` = `mtp-generate`."""

import sys

from mtp_jax.inference.cli import entry

if __name__ == "__main__":
    sys.exit(entry())
