"""Every shipped config's parameter and optimizer-state layout equals its golden JSON (shapes
and mesh partition specs). Regenerate after an intended change: `python tests/golden_specs.py`."""

import json

import pytest
from golden_specs import DEVICES, path, specs


@pytest.mark.parametrize("name", sorted(DEVICES))
def test_partition_specs_match_golden(name):
    want = json.loads(path(name).read_text())
    got = json.loads(json.dumps(specs(name)))  # tuples -> lists, as stored
    assert got["mesh"] == want["mesh"]
    for part in ("params", "opt_state"):
        missing = sorted(set(want[part]) - set(got[part]))
        added = sorted(set(got[part]) - set(want[part]))
        assert not missing and not added, f"{part}: missing {missing[:5]}, new {added[:5]}"
        changed = {
            k: (want[part][k], got[part][k]) for k in want[part] if want[part][k] != got[part][k]
        }
        assert not changed, f"{part} changed (golden, now): {dict(list(changed.items())[:5])}"


def test_golden_files_shard_the_big_configs():
    """The golden layouts themselves say the 1B / 7B weights are sharded, not replicated."""
    for name in ("gpu_1b", "tpu_7b"):
        params = json.loads(path(name).read_text())["params"]
        matrices = [spec for key, (_, spec) in params.items() if not key.endswith("['scale']")]
        assert matrices and all(any(a is not None for a in spec) for spec in matrices), name
