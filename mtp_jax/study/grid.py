"""The study's grid: named runs, each a list of config overrides on configs/smoke.py.

A `--grid FILE` is JSON, `[{"name": "seq_d2", "overrides": ["model.mtp_depth=2"]}, ...]`, or
a Python file defining `GRID` the same way. The first run named `ntp` (D = 0) is the baseline
of the effective-speedup fit; a grid without one gets it added.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    overrides: tuple[str, ...]


BASELINE = Run("ntp", ("model.mtp_depth=0",))

# modded-nanogpt's record-run curriculum: [1, .5, .25 -> 0] over the first third, then
# [1, .5 -> 0], then [1] (weights relative to the next-token loss, per depth).
CURRICULUM = "((0.0, (0.5, 0.25)), (0.333, (0.5, 0.0)), (0.667, (0.0, 0.0)), (1.0, (0.0, 0.0)))"

DEFAULT = (
    BASELINE,
    Run("seq_d1", ("model.mtp_depth=1", "model.mtp_layout=sequential")),
    Run("seq_d2", ("model.mtp_depth=2", "model.mtp_layout=sequential")),
    Run("seq_d4", ("model.mtp_depth=4", "model.mtp_layout=sequential")),
    Run("par_n2", ("model.mtp_depth=1", "model.mtp_layout=parallel")),
    Run("par_n4", ("model.mtp_depth=3", "model.mtp_layout=parallel")),
    Run(
        "shared_d4",
        ("model.mtp_depth=4", "model.mtp_layout=sequential", "model.mtp_share_depths=true"),
    ),
    Run(
        "seq_d2_curriculum",
        (
            "model.mtp_depth=2",
            "model.mtp_layout=sequential",
            f"loss.mtp_lambda_schedule={CURRICULUM}",
        ),
    ),
)


class GridError(ValueError):
    """A grid file that cannot be read; the message names the file and the entry."""


def load_grid(path: str | None) -> tuple[Run, ...]:
    """The default grid, or the runs of `path` (JSON or Python), with the baseline first."""
    if path is None:
        return DEFAULT
    if not os.path.isfile(path):
        raise GridError(f"grid file {path!r} does not exist")
    if path.endswith(".py"):
        spec = importlib.util.spec_from_file_location("_mtp_study_grid", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        entries = getattr(module, "GRID", None)
    else:
        try:
            with open(path) as f:
                entries = json.load(f)
        except json.JSONDecodeError as e:
            raise GridError(f"grid file {path!r} is not JSON: {e}") from e
    if not isinstance(entries, list) or not entries:
        raise GridError(f"grid file {path!r}: expected a non-empty list of runs")
    runs = []
    for i, e in enumerate(entries):
        ok = (
            isinstance(e, dict)
            and isinstance(e.get("name"), str)
            and e["name"].replace("_", "").replace("-", "").isalnum()
            and isinstance(e.get("overrides", []), list)
            and all(isinstance(o, str) for o in e.get("overrides", []))
        )
        if not ok:
            raise GridError(
                f"grid file {path!r}: entry {i} ({e!r}) is not "
                '{"name": "letters_digits", "overrides": ["key=value", ...]}'
            )
        runs.append(Run(e["name"], tuple(e.get("overrides", []))))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise GridError(f"grid file {path!r}: run names {names} are not unique")
    if BASELINE.name not in names:
        runs.insert(0, BASELINE)
    return tuple(runs)
