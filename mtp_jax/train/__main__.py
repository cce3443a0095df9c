"""`python -m mtp_jax.train` = `mtp-train`."""

import sys

from mtp_jax.train.cli import entry

if __name__ == "__main__":
    sys.exit(entry())
