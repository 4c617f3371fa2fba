"""Output directories that are written atomically and never replace what they should not.

Every command that writes a directory (convert, build, new-plugin, quickstart, triton-repo, the
``run --model-dir`` cache) goes through :func:`atomic_dir`: the output is written into a temporary
sibling and renamed into place at the end, so a failed run leaves nothing half-written.

``--force`` replaces an existing directory, which makes it the one way a typo destroys data
(``--output-dir .`` or ``--output-dir MODEL``).  :func:`check_output_dir` is the single place that
decides whether a directory may be replaced: never an input of the command, the current directory
or one of its parents, the home directory or a filesystem root, and only a directory that looks
like trtlm's own earlier output (it holds :data:`MARKER`, which :func:`atomic_dir` writes into every
output, or a TensorRT-LLM checkpoint/engine ``config.json``) unless it is empty.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator, Mapping

from trtlm.errors import UserError

#: Written into every directory trtlm creates; its presence makes the directory replaceable by --force.
MARKER = ".trtlm-output"

#: ``{"--model-dir": path, ...}``: the inputs of a command, by the option that names them (None = not given).
Inputs = Mapping[str, "Path | str | None"]


def _resolve(p: Path | str) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(p)))).resolve()


def _within(child: Path, parent: Path) -> bool:
    """``child`` is ``parent`` or lies below it (both resolved)."""
    return child == parent or parent in child.parents


#: What an output's content says wrote it, for the TensorRT-LLM formats (checked before the marker:
#: a checkpoint written by TensorRT-LLM's own tools has no marker but is still convert's kind).
_KIND_NAMES = {"convert": "a TensorRT-LLM checkpoint (trtlm convert)", "build": "an engine (trtlm build)"}


def output_kind(path: Path) -> str | None:
    """Which command's output ``path`` is: ``"build"`` (an engine config.json), ``"convert"`` (a
    TensorRT-LLM checkpoint config.json), else the ``command`` its :data:`MARKER` names, else None."""
    cfg = path / "config.json"
    if cfg.is_file():
        try:
            data = json.loads(cfg.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            data = None
        if isinstance(data, dict):
            if "build_config" in data and "pretrained_config" in data:
                return "build"
            if "architecture" in data and "mapping" in data:
                return "convert"
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return marker.get("command") if isinstance(marker, dict) else None


def looks_like_output(path: Path) -> bool:
    """The directory holds trtlm's marker, or a TensorRT-LLM checkpoint/engine ``config.json``."""
    return (path / MARKER).is_file() or output_kind(path) in ("convert", "build")


def _refusal(out: Path, inputs: Inputs, empty: bool) -> str | None:
    """Why replacing (or writing into) the existing directory ``out`` would destroy something, or None.
    An empty directory inside an input may be written (nothing of the input is lost)."""
    if out.parent == out or os.path.ismount(out):
        return "is a filesystem root"
    cwd = _resolve(os.getcwd())
    if out == cwd:
        return "is the current directory"
    if _within(cwd, out):
        return f"contains the current directory {cwd}"
    home = _resolve(Path.home())
    if out == home:
        return "is the home directory"
    if _within(home, out):
        return f"contains the home directory {home}"
    for flag, given in inputs.items():
        if given is None or str(given) == "":
            continue
        inp = _resolve(given)
        if out == inp:
            return f"is the input {flag} {given}"
        if _within(inp, out):
            return f"contains the input {flag} {given}"
        if _within(out, inp) and not empty:
            return f"lies inside the input {flag} {given}"
    return None


def check_output_dir(out: Path, force: bool, inputs: Inputs | None = None, flag: str = "--output-dir",
                     command: str | None = None) -> None:
    """Raise :class:`UserError` (one line naming ``flag`` and why) unless ``out`` may be written.

    A missing or empty directory may be written unless it is an input, the current directory,
    the home directory or a root (or contains one).  A non-empty one is replaced only with
    ``force``, and only if it looks like trtlm's own earlier output (of ``command``, when given
    and the directory says which command wrote it: :func:`output_kind`) and neither is, contains
    nor lies inside an input (``inputs``: option name -> path), the current directory or one of
    its parents, the home directory or a filesystem root.
    """
    out = _resolve(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{flag} {out}: exists and is not a directory")
    try:
        empty = not any(out.iterdir())
    except OSError as exc:
        raise UserError(f"{flag} {out}: cannot read ({exc.strerror})") from None
    why = _refusal(out, inputs or {}, empty)
    if why is not None:
        verb = "replace" if not empty else "write into"
        raise UserError(f"refusing to {verb} {flag} {out}: it {why}; choose another {flag}")
    if empty:
        return
    if not looks_like_output(out):
        raise UserError(f"refusing to replace {flag} {out}: it is not empty and not an earlier trtlm output "
                        f"(no {MARKER} marker or checkpoint/engine config.json), even with --force; "
                        f"choose another {flag} or empty it yourself")
    kind = output_kind(out)
    if command is not None and kind is not None and kind != command:
        what = _KIND_NAMES.get(kind, f"the output of trtlm {kind}")
        raise UserError(f"refusing to replace {flag} {out}: it holds {what}, not an earlier output of "
                        f"trtlm {command}; choose another {flag}")
    if not force:
        raise UserError(f"{flag} {out}: exists and is not empty; pass --force to replace it")


def _make_parents(parent: Path, flag: str) -> list[Path]:
    """Create ``parent`` and missing ancestors; return those created (deepest last) for cleanup.
    A regular file on the way, or a directory we may not write, is a one-line error."""
    missing: list[Path] = []
    p = parent
    while not p.exists():
        if p.is_symlink():
            raise UserError(f"{flag}: {p} is a dangling symbolic link")
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise UserError(f"{flag}: {p} is a file, not a directory; cannot create a directory below it")
    created = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except OSError as exc:
            _remove_created(created)
            raise UserError(f"{flag}: cannot create {d} ({exc.strerror})") from None
        created.append(d)
    return created


def _remove_created(created: list[Path]) -> None:
    for d in reversed(created):
        with contextlib.suppress(OSError):
            d.rmdir()


def _make_tmp(parent: Path, name: str, flag: str) -> Path:
    """A new temporary sibling, created with ``os.mkdir`` so that the umask applies (``mkdtemp`` is 0700)."""
    for _ in range(100):
        tmp = parent / f".{name}.tmp-{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(f"{flag}: cannot write in {parent} ({exc.strerror})") from None
    raise UserError(f"{flag}: cannot create a temporary directory in {parent}")


def write_marker(directory: Path, command: str | None = None) -> None:
    """Mark ``directory`` as trtlm's output (deterministic content: rank-parallel writers compare bytes)."""
    from trtlm import __version__

    info = {"written_by": "trtlm", "version": __version__}
    if command:
        info["command"] = command
    (directory / MARKER).write_text(json.dumps(info, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool = False, inputs: Inputs | None = None, flag: str = "--output-dir",
               command: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success it replaces ``out``.

    :func:`check_output_dir` runs first (``inputs``: the command's input paths by option name, which
    ``out`` must never replace; ``command``: the command writing, whose earlier output alone
    ``force`` replaces, recorded in the marker).  The temporary directory gets :data:`MARKER` and the umask's mode.
    On any error the temporary directory (and any parent this call created) is removed and ``out``
    is untouched, so a failed run never leaves a half-written output behind.
    """
    out = _resolve(out)
    check_output_dir(out, force, inputs, flag, command)
    created = _make_parents(out.parent, flag)
    try:
        tmp = _make_tmp(out.parent, out.name, flag)
    except BaseException:
        _remove_created(created)
        raise
    try:
        write_marker(tmp, command)
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(2)}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise
