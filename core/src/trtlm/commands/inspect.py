"""``trtlm inspect``."""
from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def inspect_cmd(path: Path, as_json: bool) -> None:
    """Identify a HF / TensorRT-LLM checkpoint / engine / FT directory and its family.

    Prints the format, the architecture and the family and plugin (with its
    distribution) that handle it, the parameter count (for a checkpoint or
    engine: merged across tensor-parallel ranks), dtype, size on disk and
    parallel layout.  Reads file headers only.  An architecture no installed
    plugin handles is an error naming it, the installed families and, where
    known, the plugin to pip install.
    """
    from trtlm.inspect import inspect_path

    info = inspect_path(path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        click.echo(f"{key:<22} {value}")
