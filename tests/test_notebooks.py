"""Notebooks run top to bottom headless (small parameters) and use only the public API."""

import ast
import json
import os

import nbformat
import pytest
from conftest import REPO

import mtp_jax

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def _code(path) -> str:
    nb = json.loads(path.read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def test_notebooks_exist_with_outputs_stripped():
    assert {p.stem for p in NOTEBOOKS} >= {"explore", "compare_layouts"}
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert not cell.get("outputs") and cell.get("execution_count") is None, path
        assert (path.with_suffix(".py")).exists(), f"{path.name} has no jupytext pair"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_matches_its_jupytext_pair(path):
    import jupytext

    def cells(nb):
        return [(c.cell_type, c.source.strip()) for c in nb.cells]

    paired = jupytext.read(path.with_suffix(".py"))
    assert cells(nbformat.read(path, as_version=4)) == cells(paired), (
        f"{path.name} and {path.stem}.py differ: run jupytext --sync notebooks/{path.stem}.py"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_uses_only_the_public_api(path):
    tree = ast.parse(_code(path))
    public = set(mtp_jax.__all__)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mtp_jax"):
            raise AssertionError(f"{path.name}: 'from {node.module} import ...'; use mtp_jax.X")
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name == "mtp_jax" or not alias.name.startswith("mtp_jax."), (
                    f"{path.name}: import {alias.name}"
                )
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "mtp_jax"
            and node.attr not in public | {"__file__"}
        ):
            raise AssertionError(f"{path.name}: mtp_jax.{node.attr} is not in mtp_jax.__all__")


def run_notebook(path, env: dict[str, str]) -> None:
    """Executes `path` headless with `env` set; asserts no cell raised."""
    from nbclient import NotebookClient

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(
            nb,
            timeout=600,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors


@pytest.mark.slow
@pytest.mark.parametrize(
    "path", [p for p in NOTEBOOKS if p.stem != "study"], ids=lambda p: p.stem
)  # study.ipynb reads a study directory: tests/test_study.py makes one and runs it
def test_notebook_runs_headless(path, tmp_path, monkeypatch, code_store):
    from nbclient import NotebookClient

    monkeypatch.setenv("MTP_NOTEBOOK_WORKDIR", str(tmp_path / "workdir"))
    monkeypatch.setenv("MTP_NOTEBOOK_STEPS", "40")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # Small model on the small test store, so that the notebook runs in seconds.
    config = tmp_path / "config.py"
    config.write_text(
        "from mtp_jax.config import load_config\n"
        "def get_config():\n"
        f"    c = load_config({str(REPO / 'configs' / 'smoke.py')!r}, [\n"
        "        'data.seq_len=64', 'data.batch_size=8', 'loss.chunk_size=64',\n"
        f"        'data.path={code_store}', 'checkpoint.async_save=false'])\n"
        "    c.unlock()\n"
        "    return c\n"
    )
    monkeypatch.setenv("MTP_NOTEBOOK_CONFIG", str(config))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert os.path.exists(tmp_path / "workdir")
