"""The README is the front door: its config reference, commands and CI hook must stay true."""

from __future__ import annotations

import re

from embsum.config import config_reference
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def _block(name: str) -> str:
    m = re.search(rf"<!-- {name}:start -->\n(.*?)\n?<!-- {name}:end -->", README, re.S)
    assert m, f"README has no {name} block"
    return m.group(1).strip()


def test_config_reference_is_generated_from_the_dataclasses() -> None:
    assert _block("config-reference") == config_reference().strip(), \
        "README config reference is stale: paste the output of `embsum config --docs`"


def test_the_two_commands_and_ci_agree() -> None:
    assert "make demo" in README and "make test" in README
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M), ".ci/run must run the README's test command"
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo: .*\n\t.*embsum run$", makefile, re.M)
    assert re.search(r"^test: .*\n\t.*pytest", makefile, re.M)


def test_every_cli_command_in_the_readme_exists() -> None:
    from typer.testing import CliRunner

    from embsum.cli import app

    runner = CliRunner()
    for cmd in sorted(set(re.findall(r"`embsum ((?:[a-z]+)(?: [a-z]+)?)", README))):
        words = [w for w in cmd.split() if w.isalpha() and w.islower()]
        while words:
            r = runner.invoke(app, [*words, "--help"])
            if r.exit_code == 0:
                break
            words = words[:-1]  # "embsum serve start" vs an argument that follows a command
        assert words, f"README mentions `embsum {cmd}` but no such command exists"
