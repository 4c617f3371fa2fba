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


def commands_by_name() -> dict[str, click.Command]:
    """Every command and subcommand (``bench serve``) by the words that invoke it."""
    ctx = click.Context(cli, info_name="trtlm")
    found = {}
    for name in cli.list_commands(ctx):
        cmd = cli.get_command(ctx, name)
        found[name] = cmd
        if isinstance(cmd, click.Group):
            for sub in cmd.list_commands(ctx):
                found[f"{name} {sub}"] = cmd.get_command(ctx, sub)
    return found


def option_names(cmd: click.Command) -> set[str]:
    return {"--help", *(o for p in cmd.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts))}


def test_the_flags_the_docs_write_exist():
    """Every ``--flag`` the README and docs/ write after ``trtlm COMMAND`` (on the same line or a line
    it continues with a backslash, up to the end of that command: a backtick, ``&&``, ``|``, ``;``) is
    an option of that command, so a renamed flag cannot live on in an example.  benchmarks.md is a
    record of past runs and is left out."""
    commands = commands_by_name()
    wrong = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        if doc.name == "benchmarks.md":
            continue
        text = re.sub(r"\\\n\s*", " ", doc.read_text())  # a shell line continued with a backslash: one line
        for line in text.splitlines():
            for segment in re.split(r"`|&&|\|\||\||;", line):
                words = segment.split()
                if len(words) < 2 or words[0] != "trtlm":
                    continue
                name = " ".join(words[1:3]) if " ".join(words[1:3]) in commands else words[1]
                if name not in commands:
                    continue
                for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", segment):
                    if flag not in option_names(commands[name]):
                        wrong.append(f"{doc.relative_to(REPO)}: trtlm {name} has no {flag}: {segment.strip()[:100]}")
    assert not wrong, "\n".join(wrong)
