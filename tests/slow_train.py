"""`mtp-train` slowed down for tests that signal or kill a run mid-way.

    python tests/slow_train.py SECONDS_PER_STEP [mtp-train arguments ...]

The delay goes in through `train(on_step=...)`, a callback, so the library holds no test hook.
"""

import sys
import time

from mtp_jax.cli.train import main

if __name__ == "__main__":
    delay = float(sys.argv[1])
    hook = (lambda step: time.sleep(delay)) if delay > 0 else None
    sys.exit(main(sys.argv[2:], on_step=hook))
