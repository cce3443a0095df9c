"""README's quickstart is what CI runs, and its commands name real entry points."""

import configparser
import re

from conftest import REPO


def _quickstart_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line for b in blocks for line in b.splitlines() if line and not line.startswith("#")]


def test_quickstart_is_two_commands_and_ci_runs_the_test_command():
    train_cmd, test_cmd = _quickstart_commands()
    assert "mtp-train --config configs/smoke.py" in train_cmd
    assert "pip install -e ." in train_cmd
    ci = (REPO / ".ci" / "run").read_text()
    assert test_cmd in ci, "README's test command and .ci/run differ"


def test_console_scripts_in_readme_exist():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    scripts = {
        line.split("=")[0].strip()
        for line in cfg["options.entry_points"]["console_scripts"].splitlines()
        if line.strip()
    }
    readme = (REPO / "README.md").read_text()
    for name in re.findall(r"\b(mtp-[a-z]+)\b", readme):
        assert name in scripts, name
