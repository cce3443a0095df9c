"""Training: state and optimizer, the jitted steps, checkpoints, the loop and `mtp-train`."""

from mtp_jax.train.checkpoint import Checkpointer, CheckpointError, load_checkpoint
from mtp_jax.train.loop import NonFiniteLossError, TrainResult, train
from mtp_jax.train.state import TrainState, make_optimizer

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "NonFiniteLossError",
    "TrainResult",
    "TrainState",
    "load_checkpoint",
    "make_optimizer",
    "train",
]
