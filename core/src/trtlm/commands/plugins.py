"""``trtlm plugins``: what loaded, what failed and why."""
from __future__ import annotations

import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
def plugins(as_json: bool) -> None:
    """List family plugins: distribution, version, families, hooks, status."""
    from trtlm.plugins import get_registry

    records = get_registry().records
    if as_json:
        click.echo(json.dumps({"plugins": [r.as_dict() for r in records]}, indent=2))
        return
    for r in records:
        status = click.style("ok", fg="green") if r.status == "ok" else click.style(r.status, fg="red")
        click.echo(f"{r.name:<12} {r.distribution} {r.version}  [{status}]")
        if r.families:
            click.echo(f"  families:      {', '.join(r.families)}")
            click.echo(f"  architectures: {', '.join(r.architectures)}")
        if r.hooks:
            click.echo(f"  hooks:         {', '.join(r.hooks)}")
        if r.error:
            click.echo(f"  error:         {r.error}")
