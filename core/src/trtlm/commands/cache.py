"""``trtlm cache list | clear``: the engines ``trtlm run --model-dir`` converted and built."""
from __future__ import annotations

import json
import time

import click


@click.group("cache")
def cache_cmd() -> None:
    """The engine cache of `trtlm run --model-dir` ($TRTLM_CACHE, default ~/.cache/trtlm/engines).

    Each entry is a converted checkpoint and its engine, keyed by the model directory's files and
    the options; `trtlm run --no-cache` does not add one.
    """


@cache_cmd.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def cache_list(as_json: bool) -> None:
    """Each cached engine: key, size on disk, the model it came from; then the total."""
    from trtlm.cache import engines_root, human_size, list_entries

    entries = list_entries()
    total = sum(e.size_bytes for e in entries)
    if as_json:
        click.echo(json.dumps({"root": str(engines_root()), "total_bytes": total, "entries": [
            {"key": e.key, "path": str(e.path), "size_bytes": e.size_bytes, "model_dir": e.model_dir,
             "family": e.family, "complete": e.complete, "last_used": e.last_used} for e in entries]}, indent=2))
        return
    if not entries:
        click.echo(f"{engines_root()}: empty")
        return
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        state = "" if e.complete else "  (incomplete)"
        click.echo(f"{e.key}  {human_size(e.size_bytes):>9}  {used}  {e.family or '?':<10} {e.model_dir or '?'}{state}")
    click.echo(f"{len(entries)} engine(s), {human_size(total)} in {engines_root()}")


@cache_cmd.command("clear")
@click.argument("keys", nargs=-1)
def cache_clear(keys: tuple[str, ...]) -> None:
    """Remove the cached engines with the given KEYS (as `trtlm cache list` shows them), or all of them.

    Only directories trtlm wrote are removed, whatever $TRTLM_CACHE points at.
    """
    from trtlm.cache import engines_root, human_size, list_entries, remove_entry
    from trtlm.errors import UserError

    entries = list_entries()
    if keys:
        by_key = {e.key: e for e in entries}
        unknown = [k for k in keys if k not in by_key]
        if unknown:
            raise UserError(f"no cached engine {unknown[0]!r} in {engines_root()} (`trtlm cache list` shows the keys)")
        entries = [by_key[k] for k in keys]
    freed = 0
    for e in entries:
        remove_entry(e)
        freed += e.size_bytes
    click.echo(f"removed {len(entries)} engine(s), {human_size(freed)} freed")
