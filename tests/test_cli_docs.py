"""docs/cli.md covers every command of ``trtlm`` and every option of each.

The reference is generated from the click commands by scripts/gen_docs.py;
this fails when a command or option was added (or renamed) without
regenerating it, so the reference cannot silently fall behind the CLI.
"""
from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from trtlm.cli import COMMANDS, cli

REPO = Path(__file__).resolve().parent.parent
CLI_MD = REPO / "docs" / "cli.md"
REGENERATE = "regenerate it with: python scripts/gen_docs.py"


def section(name: str) -> str:
    text = CLI_MD.read_text()
    match = re.search(rf"(?ms)^## `trtlm {re.escape(name)}`\n(.*?)(?=^## |\Z)", text)
    assert match, f"docs/cli.md has no section for `trtlm {name}`; {REGENERATE}"
    return match.group(1)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_and_option_is_documented(name):
    ctx = click.Context(cli, info_name="trtlm")
    cmd = cli.get_command(ctx, name)
    body = section(name)
    for param in cmd.params:
        if isinstance(param, click.Option):
            for opt in [*param.opts, *param.secondary_opts]:
                assert f"`{opt}`" in body, f"trtlm {name} {opt} is not in docs/cli.md; {REGENERATE}"
        else:
            assert f"`{param.human_readable_name}`" in body, f"trtlm {name} {param.human_readable_name}; {REGENERATE}"


def test_no_section_for_a_command_that_does_not_exist():
    documented = set(re.findall(r"(?m)^## `trtlm ([\w-]+)`", CLI_MD.read_text()))
    assert documented <= set(COMMANDS), f"docs/cli.md documents removed commands: {documented - set(COMMANDS)}"
