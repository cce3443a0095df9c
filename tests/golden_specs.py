"""Golden partition specs: every parameter's and optimizer-state leaf's shape and mesh
partition spec for each shipped config, as JSON under tests/golden/ (like MaxText's sharding
dumps). `tests/test_golden_specs.py` diffs them; after an intended change of the parameter
tree or the logical rules, regenerate them with

    python tests/golden_specs.py

and review the diff (a changed tree also changes what old checkpoints restore into).

Each config is laid out on the mesh it names, resolved over the devices it is meant for
(`DEVICES`); specs are computed from shapes alone (`jax.eval_shape`), no devices needed.
"""

from __future__ import annotations

import json
import pathlib
import sys
import types

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
# config -> the device count it is laid out for (its docstring's target)
DEVICES = {"smoke": 8, "gpu_125m": 1, "gpu_1b": 8, "tpu_7b": 64}


def specs(name: str) -> dict:
    """{'mesh': {...}, 'params': {path: [shape, spec]}, 'opt_state': {...}} for configs/NAME.py."""
    from mtp_jax.config import load_config
    from mtp_jax.model import Model
    from mtp_jax.sharding import LOGICAL_RULES, _fit_spec, mesh_shape
    from mtp_jax.train.state import _init_fn, make_optimizer
    from mtp_jax.window import WindowSpec

    config = load_config(REPO / "configs" / f"{name}.py")
    shape = dict(zip(("data", "fsdp", "tensor"), mesh_shape(config.mesh, DEVICES[name])))
    mesh = types.SimpleNamespace(shape=shape)  # `_fit_spec` reads only the axis sizes
    init = _init_fn(
        Model(config.model), make_optimizer(config), WindowSpec.from_config(config).example_input()
    )
    boxed = jax.eval_shape(init, jax.random.key(0))
    mesh_specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), LOGICAL_RULES)
    shapes = nn.unbox(boxed)

    def table(spec_tree, shape_tree) -> dict:
        out = {}
        leaves = jax.tree_util.tree_leaves_with_path(
            spec_tree, is_leaf=lambda x: isinstance(x, PartitionSpec)
        )
        for (path, spec), leaf in zip(leaves, jax.tree.leaves(shape_tree), strict=True):
            spec = spec if isinstance(spec, PartitionSpec) else PartitionSpec()
            fitted = _fit_spec(spec, leaf.shape, mesh, "", [])
            axes = [list(a) if isinstance(a, tuple) else a for a in fitted]
            axes += [None] * (len(leaf.shape) - len(axes))
            out[jax.tree_util.keystr(path)] = [list(leaf.shape), axes]
        return out

    return {
        "mesh": shape,
        "params": table(mesh_specs.params, shapes.params),
        "opt_state": table(mesh_specs.opt_state, shapes.opt_state),
    }


def path(name: str) -> pathlib.Path:
    return GOLDEN / f"{name}.json"


def dumps(table: dict) -> str:
    """JSON with one line per leaf (`"path": [shape, spec]`), so diffs read leaf by leaf."""
    parts = [f'{{\n "mesh": {json.dumps(table["mesh"], sort_keys=True)}']
    for part in ("params", "opt_state"):
        rows = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(table[part].items())]
        parts.append(f' "{part}": {{\n' + ",\n".join(rows) + "\n }")
    return ",\n".join(parts) + "\n}\n"


def main() -> int:
    GOLDEN.mkdir(exist_ok=True)
    for name in DEVICES:
        path(name).write_text(dumps(specs(name)))
        print(f"wrote {path(name).relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
