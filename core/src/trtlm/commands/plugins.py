"""``trtlm plugins``: what loaded, what failed and why."""
from __future__ import annotations

import json

import click

_COLORS = {"ok": "green", "broken": "red", "disabled": "yellow"}


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
def plugins(as_json: bool) -> None:
    """List family plugins: distribution, version, families, hooks, status.

    A plugin that failed to load is listed as broken with its error (and
    skipped); one left out by TRTLM_PLUGINS / TRTLM_DISABLE_PLUGINS as
    disabled.  With TRTLM_STRICT_PLUGINS=1 a broken plugin is an error.
    """
    from trtlm.plugins import get_registry

    records = get_registry().records
    if as_json:
        click.echo(json.dumps({"plugins": [r.as_dict() for r in records]}, indent=2))
        return
    width = max(len(r.name) for r in records)
    for r in records:
        status = click.style(r.status, fg=_COLORS.get(r.status, "red"))
        click.echo(f"{r.name:<{width}}  {r.distribution} {r.version}  [{status}]")
        if r.families:
            click.echo(f"  families:      {', '.join(r.families)}")
            click.echo(f"  architectures: {', '.join(r.architectures)}")
        if r.hooks:
            click.echo(f"  hooks:         {', '.join(r.hooks)}")
        if r.error:
            click.echo(f"  {'error:' if r.status == 'broken' else 'reason:':<14} {r.error}")
