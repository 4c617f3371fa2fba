"""Generate docs/hooks.md (from the hookspecs) and docs/cli.md (from the click commands).

Both references are written from the code they describe, so they cannot
drift: the hook reference from :mod:`trtlm.hookspecs` (signatures,
docstrings, ``firstresult``) and :mod:`trtlm.builtin` (the defaults), the
CLI reference from the real click command objects listed in
``trtlm.cli.COMMANDS`` (every option, its type, default and help).

    python scripts/gen_docs.py            # rewrite docs/hooks.md and docs/cli.md
    python scripts/gen_docs.py --check    # exit 1 if either file is out of date

tests/test_hook_docs.py fails when a hookspec is missing from docs/hooks.md
or documented with another signature; rerun this script after changing a
hook or a command.
"""
from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
HOOKS_MD = REPO / "docs" / "hooks.md"
CLI_MD = REPO / "docs" / "cli.md"

# --------------------------------------------------------------------------- reST -> Markdown
_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):`(~?)([^`]+)`")


def _inline(text: str) -> str:
    text = _ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)
    return text.replace("``", "`")


def _fields(doc: str) -> tuple[str, list[tuple[str, str, str]]]:
    """Split a docstring into its prose and its ``:param x:`` / ``:return:`` / ``:raises X:`` fields."""
    prose, fields = [], []
    current: list[Any] | None = None
    for line in doc.splitlines():
        match = re.match(r"^:(param|return|returns|raises)\s*([^:]*):\s*(.*)$", line)
        if match:
            current = [match.group(1), match.group(2).strip(), match.group(3).strip()]
            fields.append(current)
        elif current is not None and line.startswith((" ", "\t")) and line.strip():
            current[2] += " " + line.strip()
        else:
            current = None
            prose.append(line)
    return "\n".join(prose).strip(), [tuple(f) for f in fields]


def rst_to_md(doc: str) -> str:
    """Prose of a docstring as Markdown: inline roles, literals and ``::`` code blocks."""
    out: list[str] = []
    lines = doc.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::"):
            head = line.rstrip()[:-2].rstrip()
            if head:
                out.append(_inline(head) + ":")
            i += 1
            block = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            while block and not block[0].strip():
                block.pop(0)
            out += ["", "```text", *inspect.cleandoc("\n".join(block)).splitlines(), "```", ""]
            continue
        out.append(_inline(line))
        i += 1
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


# --------------------------------------------------------------------------- hooks.md
#: When the core calls each hook (who calls it, at which step).  A new hook without an
#: entry here is documented from its docstring alone.
HOOK_CALLERS = {
    "trtlm_families": "Once per process, while plugins load (`trtlm.plugins.load_registry`, reached through "
                      "`get_registry()` by every command that needs a family and by every worker rank). "
                      "Called on the plugin object directly, not through the per-family dispatch.",
    "trtlm_load_weights": "`trtlm convert` (and `trtlm run --model-dir`, `LLM(model_dir=...)`), first step of "
                          "`trtlm.convert.pipeline.convert`, after the model directory was resolved to a family. "
                          "Not called for `--preset` with `--dummy-weights` (the preset is the config).",
    "trtlm_map_layers": "`trtlm convert`, after loading and before any tensor is read; the plan it returns "
                        "drives validation, dummy weights, quantization, sharding and writing.",
    "trtlm_quantize": "`trtlm convert`, after the sources were validated against the plan and before "
                      "sharding (also without `--quant`: the default then returns the plan unchanged).",
    "trtlm_shard": "`trtlm convert`, after quantization; the rank plans it returns are written one "
                   "`rank{r}.safetensors` per rank.",
    "trtlm_export": "`trtlm convert --to FMT` with FMT other than `trtllm`, instead of map/quantize/shard. "
                    "The default writes `--to mcore`; for other formats without an implementation the "
                    "command fails with one line.",
    "trtlm_mcore_layout": "`trtlm convert --to mcore` (to write every rank file) and `trtlm convert` / "
                          "`trtlm run --model-dir MCORE_CKPT` (to read one), after `trtlm_mcore_config`.",
    "trtlm_mcore_config": "`trtlm convert` / `trtlm run --model-dir MCORE_CKPT`, first step on a Megatron "
                          "checkpoint: its `args` become the Hugging Face config the conversion starts from.",
    "trtlm_build_network": "`trtlm build` (on the meta device, to check every rank file against the "
                           "network's parameters) and every runtime that loads an engine (`trtlm run`, "
                           "`LLM`, each rank of a multi-process run), once per rank.",
}


def hook_specs() -> list[tuple[str, Callable[..., Any]]]:
    """The hookspecs in definition order."""
    from trtlm import hookspecs

    return [(name, fn) for name, fn in vars(hookspecs).items()
            if name.startswith("trtlm_") and callable(fn) and hasattr(fn, "trtlm_spec")]


def render_signature(name: str, fn: Callable[..., Any]) -> str:
    """``name(arg: Type, ...) -> Return`` with the annotations as written in the source."""
    sig = inspect.signature(fn)

    def ann(a: Any) -> str:
        return a if isinstance(a, str) else inspect.formatannotation(a)

    params = ", ".join(p.name if p.annotation is inspect.Parameter.empty else f"{p.name}: {ann(p.annotation)}"
                       for p in sig.parameters.values())
    ret = "" if sig.return_annotation is inspect.Signature.empty else f" -> {ann(sig.return_annotation)}"
    return f"{name}({params}){ret}"


def is_firstresult(fn: Callable[..., Any]) -> bool:
    return bool(getattr(fn, "trtlm_spec", {}).get("firstresult"))


def default_impl(name: str) -> str:
    from trtlm import builtin

    impl = getattr(builtin, name, None)
    if impl is None or not hasattr(impl, "trtlm_impl"):
        return "none in the core"
    doc = inspect.getdoc(impl) or ""
    first = doc.split("\n\n")[0].replace("\n", " ").strip()
    opts = getattr(impl, "trtlm_impl", {})
    where = f"`trtlm.builtin.{name}`" + (" (`trylast`)" if opts.get("trylast") else "")
    return f"{where}: {_inline(first)}" if first else where


def hooks_markdown() -> str:
    from trtlm import PLUGIN_API_VERSION, hookspecs

    specs = hook_specs()
    out = [
        "# Hook reference",
        "",
        "<!-- Generated by scripts/gen_docs.py from trtlm.hookspecs and trtlm.builtin: edit the docstrings, "
        "then rerun it. tests/test_hook_docs.py checks that every hookspec is documented here. -->",
        "",
        f"Plugin API version: **{PLUGIN_API_VERSION}** (a plugin's entry-point module sets "
        f"`TRTLM_PLUGIN_API = {PLUGIN_API_VERSION}`; other values are refused at load).",
        "",
        rst_to_md(inspect.getdoc(hookspecs) or ""),
        "",
        "## Dispatch rules",
        "",
        "- A plugin implements a hook by defining a function of the same name decorated with "
        "`trtlm.hookimpl` in its entry-point module. Argument names must be names of the spec "
        "(a subset is fine: pluggy passes only what the implementation asks for); a `trtlm_*` "
        "function matching no spec makes the plugin *broken* (`trtlm plugins` shows why).",
        "- Per-family hooks are called through `Registry.hooks(entry)`: only the resolved family's "
        "plugin and the built-in defaults take part, with `family=` filled in.",
        "- `firstresult` hooks stop at the first implementation returning something other than "
        "`None`; the family plugin's implementation runs before the `trylast` default, so "
        "returning `None` means \"use the default\".",
        "",
        "| Hook | firstresult | Default |",
        "| --- | --- | --- |",
    ]
    for name, fn in specs:
        default = "—" if default_impl(name) == "none in the core" else "`trtlm.builtin`"
        out.append(f"| [`{name}`](#{name}) | {'yes' if is_firstresult(fn) else 'no'} | {default} |")
    out.append("")
    for name, fn in specs:
        prose, fields = _fields(inspect.getdoc(fn) or "")
        prose = re.sub(r"(?m)^``firstresult``: stops at the first non-``None`` value\.\s*$", "", prose).strip()
        out += [f"## {name}", "", "```python", render_signature(name, fn), "```", "", rst_to_md(prose), ""]
        if name in HOOK_CALLERS:
            out += [f"**When it runs:** {HOOK_CALLERS[name]}", ""]
        params = [(n, t) for kind, n, t in fields if kind == "param"]
        sig_params = list(inspect.signature(fn).parameters)
        if sig_params:
            out += ["**Parameters:**", ""]
            described = dict(params)
            for p in sig_params:
                out.append(f"- `{p}`: {_inline(described.get(p, '(undocumented)'))}")
            out.append("")
        returns = [t for kind, _, t in fields if kind in ("return", "returns")]
        if returns:
            out += [f"**Returns:** {_inline(returns[0])}", ""]
        raises = [(n, t) for kind, n, t in fields if kind == "raises"]
        for exc, text in raises:
            out += [f"**Raises:** `{exc}` {_inline(text)}", ""]
        if is_firstresult(fn):
            out += ["**firstresult:** yes. The first implementation that returns something other than `None` "
                    "wins; the rest are not called.", ""]
        else:
            out += ["**firstresult:** no. Every registered implementation is called and the results are "
                    "collected.", ""]
        out += [f"**Default implementation:** {default_impl(name)}", ""]
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------- cli.md
ENVIRONMENT = [
    ("TRTLM_PLUGINS", "Comma-separated allow-list of plugin (entry-point) names. Unset: every installed "
                      "plugin; empty: none (only the built-in defaults). Others are listed as `disabled`."),
    ("TRTLM_DISABLE_PLUGINS", "Comma-separated plugin names not to load (listed as `disabled`)."),
    ("TRTLM_STRICT_PLUGINS", "`1`: a plugin that fails to load (import error, unknown hook, plugin API "
                             "version, architecture conflict) is an error (one line, exit 1) instead of "
                             "being skipped."),
    ("TRTLM_CACHE", "Where `trtlm run --model-dir` keeps converted engines (default `~/.cache/trtlm`)."),
    ("TRTLM_DIST_BACKEND", "torch.distributed backend of multi-process runs (default: `nccl` on CUDA, "
                           "`gloo` on CPU)."),
    ("TRTLM_API_KEY", "`trtlm serve --api-key` (and `trtlm bench serve --api-key`) when the flag is not given."),
]


def _type_text(param: Any) -> str:
    import click

    t = param.type
    if getattr(param, "is_flag", False) and not getattr(param, "secondary_opts", None):
        return "flag"
    if isinstance(t, click.Choice):
        return " \\| ".join(f"`{c}`" for c in t.choices)
    if isinstance(t, click.Path):
        return "path"
    if isinstance(t, click.types.FuncParamType):
        return "text"
    if isinstance(t, (click.IntRange, click.FloatRange)):  # e.g. "int, x>=1"
        return ("int" if isinstance(t, click.IntRange) else "float") + ", " + t._describe_range()
    return {"integer": "int", "float": "float", "text": "text", "boolean": "bool"}.get(t.name, t.name)


def _default_text(param: Any, ctx: Any) -> str:
    default = param.get_default(ctx, call=False)
    unset = type(default).__name__ == "Sentinel" or "UNSET" in repr(default)  # click >= 8.2's "no default"
    if unset or callable(default) or default is None or (getattr(param, "is_flag", False) and default is False):
        return "—"
    if isinstance(default, (tuple, list)):
        return "—" if not default else ", ".join(f"`{d}`" for d in default)
    return f"`{default}`"


def _command_section(path: str, cmd: Any, ctx: Any, level: int) -> list[str]:
    import click

    sub_ctx = click.Context(cmd, info_name=path.split()[-1], parent=ctx, terminal_width=100,
                            max_content_width=100)
    out = [f"{'#' * level} `{path}`", ""]
    if cmd.help:
        out += [inspect.cleandoc(cmd.help).replace("\b\n", ""), ""]
    usage = " ".join(cmd.collect_usage_pieces(sub_ctx))
    out += ["```text", f"{path} {usage}".rstrip(), "```", ""]
    args = [p for p in cmd.params if isinstance(p, click.Argument)]
    opts = [p for p in cmd.params if isinstance(p, click.Option)]
    if args:
        out += ["| Argument | Type | Required |", "| --- | --- | --- |"]
        out += [f"| `{a.human_readable_name}` | {_type_text(a)} | {'yes' if a.required else 'no'} |" for a in args]
        out.append("")
    if opts:
        out += ["| Option | Type | Default | Description |", "| --- | --- | --- | --- |"]
        for o in opts:
            names = ", ".join(f"`{n}`" for n in [*o.opts, *o.secondary_opts])
            extra = []
            if o.required:
                extra.append("Required.")
            if o.multiple:
                extra.append("Repeatable.")
            helptext = " ".join([(o.help or "").replace("|", "\\|").replace("\n", " "), *extra]).strip()
            out.append(f"| {names} | {_type_text(o)} | {_default_text(o, sub_ctx)} | {helptext} |")
        out.append("")
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(sub_ctx):
            out += _command_section(f"{path} {name}", cmd.get_command(sub_ctx, name), sub_ctx, level + 1)
    return out


def cli_markdown() -> str:
    import click

    from trtlm.cli import COMMANDS, cli

    ctx = click.Context(cli, info_name="trtlm", terminal_width=100, max_content_width=100)
    out = [
        "# CLI reference",
        "",
        "<!-- Generated by scripts/gen_docs.py from the click commands in trtlm.cli.COMMANDS: "
        "edit the commands' help, then rerun it. -->",
        "",
        inspect.cleandoc(cli.help or ""),
        "",
        "```text",
        "trtlm [--version] [-h | --help] COMMAND [ARGS]...",
        "```",
        "",
        "- `--version`: print `trtlm, version X.Y.Z` and exit.",
        "- `-h`, `--help`: on `trtlm` or any command.",
        "",
        "A bad input (missing file, unsupported architecture, impossible option) prints one "
        "`error: ...` line naming the file, tensor or flag and the fix, and exits 1. A usage error "
        "(unknown option, missing value) exits 2. `--help`, `--version` and `plugins` never import "
        "torch (docs/benchmarks.md, \"CLI start-up\").",
        "",
        "Commands: " + ", ".join(f"[`{n}`](#trtlm-{n})" for n in sorted(COMMANDS)),
        "",
        "## Environment",
        "",
        "| Variable | Effect |",
        "| --- | --- |",
        *[f"| `{k}` | {v} |" for k, v in ENVIRONMENT],
        "",
    ]
    for name in sorted(COMMANDS):
        out += _command_section(f"trtlm {name}", cli.get_command(ctx, name), ctx, 2)
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a file is out of date")
    ns = parser.parse_args()
    stale = []
    for path, text in ((HOOKS_MD, hooks_markdown()), (CLI_MD, cli_markdown())):
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        if ns.check:
            stale.append(path)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    if stale:
        print("out of date: " + ", ".join(str(p.relative_to(REPO)) for p in stale) +
              " (run python scripts/gen_docs.py)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
