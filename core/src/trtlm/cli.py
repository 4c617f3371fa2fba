"""The ``trtlm`` command line.

Commands live in :mod:`trtlm.commands` modules that import only click at
module level; each command imports torch and the rest of trtlm inside its
body, so ``trtlm --help``, ``--version`` and ``plugins`` start fast.  A
:class:`~trtlm.errors.UserError` prints as one ``error:`` line and exits 1.
"""
from __future__ import annotations

import importlib
import sys

import click

from trtlm import __version__

#: command name -> "module:attribute"; a command module per job.
COMMANDS = {
    "plugins": "trtlm.commands.plugins:plugins",
    "inspect": "trtlm.commands.inspect:inspect_cmd",
    "convert": "trtlm.commands.convert:convert_cmd",
    "build": "trtlm.commands.build:build_cmd",
    "run": "trtlm.commands.run:run_cmd",
    "serve": "trtlm.commands.serve:serve_cmd",
    "quickstart": "trtlm.commands.quickstart:quickstart_cmd",
    "eval": "trtlm.commands.eval:eval_cmd",
    "bench": "trtlm.commands.bench:bench_cmd",
    "new-plugin": "trtlm.commands.new_plugin:new_plugin_cmd",
    "triton-repo": "trtlm.commands.triton_repo:triton_repo_cmd",
    "cache": "trtlm.commands.cache:cache_cmd",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="trtlm")
def cli() -> None:
    """Convert Hugging Face LLM checkpoints to TensorRT-LLM checkpoints, build and run them.

    Model families come from plugins (`trtlm plugins` lists them).
    """


def main(argv: list[str] | None = None) -> None:
    from trtlm.errors import UserError

    try:
        cli.main(args=argv, prog_name="trtlm", standalone_mode=False)
    except UserError as exc:
        # Always one line: messages quoting other libraries' errors may hold newlines.
        click.echo("error: " + " ".join(line.strip() for line in str(exc).splitlines() if line.strip()), err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        # One line too (exit 2): the option and value click rejected, and where the options are listed.
        where = exc.ctx.command_path if exc.ctx is not None else "trtlm"
        message = " ".join(line.strip() for line in exc.format_message().splitlines() if line.strip())
        click.echo(f"error: {message} (see: {where} --help)", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
