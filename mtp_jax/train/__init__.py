"""Training: state and optimizer, the jitted steps, checkpoints, the loop and plans."""

from mtp_jax.train.checkpoint import Checkpointer, CheckpointError, load_checkpoint, load_params
from mtp_jax.train.loop import NonFiniteLossError, TrainResult, train
from mtp_jax.train.state import TrainState, make_optimizer

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "NonFiniteLossError",
    "TrainResult",
    "TrainState",
    "load_checkpoint",
    "load_params",
    "make_optimizer",
    "train",
]
