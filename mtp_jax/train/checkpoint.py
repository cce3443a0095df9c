"""Checkpoints: one Orbax CheckpointManager saving the train state, the Grain iterator state
and the config together, asynchronously; restore onto any mesh; fallback past bad checkpoints.

Layout: WORKDIR/checkpoints/<step>/{state, data, config}.

The Grain iterator state is saved as JSON (`iterator.get_state()`, written by the primary
host). The pipeline makes it the same on every process — the position in the global order —
so a checkpoint written by N processes restores into M processes and the global batches go on
exactly where they stopped (Grain's own handler writes one file per process and could not).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from mtp_jax.config import ConfigDict, config_from_dict

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was required."""


class StorageError(CheckpointError):
    """A write to the workdir failed (a full disk, a lost mount); the message names the path
    and, for a checkpoint, the newest complete one, which is intact."""


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind `e` (Orbax and tensorstore wrap them), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        text = str(e)
        if "No space left on device" in text or "Read-only file system" in text:
            return OSError(text)
        e = e.__cause__ or e.__context__
    return None


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
    """WORKDIR/checkpoints, absolute (Orbax needs absolute paths; URLs such as gs:// stay)."""
    workdir = os.fspath(workdir)
    if "://" not in workdir:
        workdir = os.path.abspath(workdir)
    return epath.Path(workdir) / "checkpoints"


@contextlib.contextmanager
def _quiet_absl():
    """Orbax warns through absl that a read-only manager is read-only; say nothing of it."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _manager(
    workdir,
    keep: int | None = None,
    keep_every: int = 0,
    async_save: bool = True,
    read_only: bool = False,
) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        keep_period=keep_every or None,
        enable_async_checkpointing=async_save,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(
        checkpoint_dir(workdir),
        options=options,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        },
    )


class Checkpointer:
    """Saves and restores (state, data iterator, config) for one training run."""

    def __init__(self, workdir: str | os.PathLike, config: ConfigDict):
        c = config.checkpoint
        self.config = config
        self.manager = _manager(workdir, c.keep, c.keep_every, c.async_save)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any | None = None, force: bool = False):
        """Starts an (async) save of step `step`; returns whether a save was started.

        A failed write (this save's, or the previous async one's) raises `StorageError`.
        """
        items = {
            "state": ocp.args.StandardSave(state),
            "config": ocp.args.JsonSave(self.config.to_dict()),
        }
        if data_iter is not None:
            items["data"] = ocp.args.JsonSave(data_iter.get_state())
        self.check()
        with self._storage_errors(step):
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def check(self) -> None:
        """Raises `StorageError` now if the last async save failed (cheap: no wait)."""
        with self._storage_errors(None):
            self.manager.check_for_errors()

    def wait(self) -> None:
        with self._storage_errors(None):
            self.manager.wait_until_finished()

    def complete_steps(self) -> list[int]:
        """Steps whose checkpoint directory is committed (Orbax renames a finished save's
        temporary directory to the bare step number)."""
        directory = os.fspath(self.manager.directory)
        if "://" in directory or not os.path.isdir(directory):
            return self.all_steps()
        return sorted(int(d) for d in os.listdir(directory) if d.isdigit())

    @contextlib.contextmanager
    def _storage_errors(self, step: int | None):
        try:
            yield
        except Exception as e:  # noqa: BLE001 - only storage failures are translated
            os_error = _os_error(e)
            if os_error is None:
                raise
            which = f"of step {step} " if step is not None else ""
            raise StorageError(
                f"checkpoint save {which}to {os.fspath(self.manager.directory)} failed: "
                f"{os_error.strerror or os_error}. {self.resume_hint()}"
            ) from e

    def resume_hint(self) -> str:
        """What a user whose storage failed can resume from (any failed write: a full disk
        may hit the metrics file before the checkpoint save reports it)."""
        done = self.complete_steps()
        newest = f"step {done[-1]}, intact" if done else "none"
        return (
            f"Newest complete checkpoint: {newest}. Free space (or fix the mount) and run the "
            "same command again to resume from it."
        )

    def restore(self, target: Any, data_iter: Any | None = None, step: int | None = None):
        """Restores the newest readable checkpoint (or `step`) onto `target`'s shardings.

        target: a tree of `jax.ShapeDtypeStruct`s with shardings (any mesh). The data iterator,
        when given, is set to its saved position in place. Returns (state, step), or
        (None, None) when there is no checkpoint. A checkpoint that fails to restore is
        reported and the previous one tried.
        """
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        errors = []
        for s in steps:
            items = {"state": ocp.args.StandardRestore(target)}
            if data_iter is not None:
                items["data"] = ocp.args.JsonRestore()
            try:
                restored = self.manager.restore(s, args=ocp.args.Composite(**items))
                if data_iter is not None:
                    data_iter.set_state(restored["data"])
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back
                if step is not None:
                    raise CheckpointError(f"checkpoint step {s} could not be restored: {e}") from e
                first_line = (str(e).splitlines() or [""])[0][:300]
                errors.append(f"step {s}: {type(e).__name__}: {first_line}")
                log.warning(
                    "checkpoint step %d is unreadable (%s); trying the previous one", s, errors[-1]
                )
                continue
            return restored["state"], s
        if steps:
            # Never start over silently next to checkpoints that exist: that would lose them.
            raise CheckpointError(
                f"none of the checkpoints in {os.fspath(self.manager.directory)} could be "
                f"restored ({'; '.join(errors)}). If the config changed the state's structure "
                "(model shape, optimizer, clipping), use the original config or a new --workdir."
            )
        return None, None

    def close(self) -> None:
        """Waits for the last save (`StorageError` if it failed) and closes the manager."""
        try:
            self.wait()
        finally:
            with contextlib.suppress(Exception):
                self.manager.close()


def saved_config(workdir: str | os.PathLike, step: int | None = None) -> tuple[ConfigDict, int]:
    """The config stored with a checkpoint (default: the newest) and that step."""
    if not os.path.isdir(os.fspath(workdir)) and "://" not in os.fspath(workdir):
        raise CheckpointError(f"workdir {os.fspath(workdir)!r} does not exist")
    with _quiet_absl():
        manager = _manager(workdir, read_only=True)
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise CheckpointError(
            f"no checkpoint in {os.fspath(checkpoint_dir(workdir))!r}; "
            "train first with mtp-train --workdir ..."
        )
    step = steps[0] if step is None else step
    if step not in steps:
        raise CheckpointError(
            f"no checkpoint at step {step} in {os.fspath(workdir)!r}; available: {sorted(steps)}"
        )
    values = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    manager.close()
    return config_from_dict(values["config"]), step


def load_params(
    workdir: str | os.PathLike, step: int | None = None, mesh: Any | None = None
) -> Any:
    """The model parameters of a run's checkpoint (default: the newest), and nothing else.

    An Orbax partial restore: no optimizer is built and no optimizer moments are read. The
    parameters land straight in their training shardings on `mesh` (a `jax.sharding.Mesh`
    with axes ('data', 'fsdp', 'tensor'); default: the first device alone).
    """
    config, step = saved_config(workdir, step)
    return _restore_params(workdir, config, step, mesh)


def _restore_params(workdir: str | os.PathLike, config: ConfigDict, step: int, mesh: Any) -> Any:
    """`load_params` for a checkpoint whose config and step are known."""
    from mtp_jax.sharding import make_mesh
    from mtp_jax.train.state import abstract_params

    if mesh is None:
        mesh = make_mesh(ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1])
    item = {"params": abstract_params(config, mesh)}
    with _quiet_absl():
        manager = ocp.CheckpointManager(
            checkpoint_dir(workdir),
            options=ocp.CheckpointManagerOptions(read_only=True, create=False),
            item_handlers={"state": ocp.PyTreeCheckpointHandler()},
        )
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=item,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                    partial_restore=True,
                )
            ),
        )
    except Exception as e:  # noqa: BLE001 - name the checkpoint, keep the cause
        raise CheckpointError(
            f"the parameters of checkpoint step {step} in {os.fspath(workdir)!r} could not be "
            f"read: {(str(e).splitlines() or [''])[0][:300]}"
        ) from e
    finally:
        manager.close()
    return restored["state"]["params"]


def load_checkpoint(
    workdir: str | os.PathLike, step: int | None = None, mesh: Any | None = None
) -> tuple[ConfigDict, Any]:
    """(config, params) of a training run's checkpoint (default: the newest): `saved_config`
    and `load_params` (parameters only, in their shardings on `mesh`, default one device).

    For notebooks and inference: `config, params = mtp_jax.load_checkpoint("runs/smoke")`,
    then `mtp_jax.Model(config.model).apply({"params": params}, tokens)`.
    """
    config, step = saved_config(workdir, step)
    return config, _restore_params(workdir, config, step, mesh)
