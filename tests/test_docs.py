"""The README's promises that a test can hold it to."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    """The two commands of the README's quick start: the first code block after its heading."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Quick start"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readmes_two_commands_literally():
    commands = quick_start_commands()
    assert len(commands) == 2
    assert commands[0].endswith("gvae-train") and "pip install -e" in commands[0]
    assert "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-2:] == commands  # the last thing CI does is exactly what a new user types


def test_every_test_that_docs_robustness_names_exists():
    doc = (ROOT / "docs" / "robustness.md").read_text()
    named = set(re.findall(r"`(test_\w+)`", doc))
    defined = {m for f in (ROOT / "tests").glob("test_*.py")
               for m in re.findall(r"^def (test_\w+)", f.read_text(), re.M)}
    assert len(named) >= 20
    assert named <= defined, sorted(named - defined)


def test_the_readmes_headline_table_is_the_committed_records_rendered():
    # the README quotes Table 1 at a glance; the numbers must be the committed record's, as rendered
    results = (ROOT / "docs" / "results" / "table1" / "results.md").read_text()
    section = results[results.index("## At a glance"):]
    glance = [line for line in section.split("\n\n")[2].splitlines() if line.startswith("|")]
    assert len(glance) == 2 + 2 * 4  # the paper's four rows, each with gvae's below it
    readme = (ROOT / "README.md").read_text()
    assert "\n".join(glance) in readme
