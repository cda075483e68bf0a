"""The README's two commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)[:2]
    assert len(commands) == 2
    for command in commands:
        for line in command.splitlines():
            if line and not line.startswith("#"):
                assert line in ci.splitlines(), f"README command not run by .ci/run: {line}"
    assert "python -m pytest" in commands[1]
