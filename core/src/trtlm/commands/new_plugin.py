"""``trtlm new-plugin``."""
from __future__ import annotations

from pathlib import Path

import click


@click.command("new-plugin")
@click.argument("name")
@click.option("--directory", type=click.Path(path_type=Path), default=Path("."), show_default=True,
              help="Where to create trtlm-plugin-NAME/.")
@click.option("--hf-architecture", help="The HF architecture it handles (default: <Name>ForCausalLM).")
@click.option("--force", is_flag=True, help="Overwrite an existing directory.")
def new_plugin_cmd(name: str, directory: Path, hf_architecture: str | None, force: bool) -> None:
    """Scaffold a family plugin distribution (installable, with conformance tests)."""
    from trtlm.scaffold import new_plugin

    root = new_plugin(name, directory, hf_architecture, force)
    click.echo(f"wrote {root}\nnext: pip install -e {root} && trtlm plugins && python -m pytest {root}/tests")
