"""`python -m mtp_jax.study ...` is `mtp-study ...`."""

import sys

from mtp_jax.study.cli import main

sys.exit(main())
