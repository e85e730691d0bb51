"""`.ci/run` calls exactly the test command the README gives (one home for the command)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    commands = [line.strip() for block in blocks for line in block.splitlines() if "python -m pytest" in line
                and "setup.sh" in line]
    assert len(commands) == 1, f"the README should give one set-up-and-test command, found {commands}"
    return commands[0]


def test_ci_runs_the_readme_test_command():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.lstrip().startswith(("#", "set ", "cd ", "export "))]
    assert ci_lines == [_readme_test_command()]
