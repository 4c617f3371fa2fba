"""Finding family plugins: the ``trtlm.families`` entry points, read and loaded safely.

* Entry points load in a stable order (by name, then distribution), each
  inside its own error boundary.  A plugin that fails to import, declares
  another plugin API version, implements a hook that matches no spec or
  claims an architecture another plugin already owns is recorded as
  *broken* with its error and skipped; the rest keep working.
  ``TRTLM_STRICT_PLUGINS=1`` turns any such failure into an error.
* ``TRTLM_PLUGINS`` is an allow-list (unset: all, empty: none);
  ``TRTLM_DISABLE_PLUGINS`` names plugins to skip.  Skipped plugins are
  listed with status ``disabled`` (nothing of them is imported).
* Entry points are read from the ``*.dist-info`` / ``*.egg-info``
  directories on ``sys.path`` directly, with the rules of
  :mod:`importlib.metadata` (first distribution of a name on ``sys.path``
  wins); importing :mod:`importlib.metadata` itself costs more than the rest
  of ``trtlm plugins``.  Unusual environments (zip files on ``sys.path``,
  extra distribution finders) use :mod:`importlib.metadata`.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

from trtlm.errors import PluginError
from trtlm.registry import BUILTIN_NAME, PluginRecord, Registry, describe_error

ENTRY_POINT_GROUP = "trtlm.families"

def _names(value: str) -> set[str]:
    return {p.strip() for p in value.split(",") if p.strip()}


def skip_reason(name: str) -> str | None:
    """Why plugin ``name`` is not to be loaded (``None``: load it)."""
    allow = os.environ.get("TRTLM_PLUGINS")
    if allow is not None and name not in _names(allow):
        return f"not in TRTLM_PLUGINS={allow!r}"
    if name in _names(os.environ.get("TRTLM_DISABLE_PLUGINS", "")):
        return "disabled by TRTLM_DISABLE_PLUGINS"
    return None


def strict_mode() -> bool:
    return os.environ.get("TRTLM_STRICT_PLUGINS", "") not in ("", "0", "false", "no")


@dataclass(frozen=True)
class PluginEntryPoint:
    """One ``trtlm.families`` entry point and the distribution declaring it."""

    name: str
    value: str  #: ``module`` or ``module:attr.path`` (extras in brackets ignored)
    dist: str
    version: str

    def load(self) -> Any:
        module, _, attr = self.value.partition("[")[0].strip().partition(":")
        obj = importlib.import_module(module.strip())
        for part in filter(None, attr.strip().split(".")):
            obj = getattr(obj, part)
        return obj


_SECTION = re.compile(r"^\[(?P<name>.+)\]$")


def _parse_entry_points(text: str, group: str) -> list[tuple[str, str]]:
    """``(name, value)`` pairs of one group in an ``entry_points.txt`` (importlib.metadata's rules:
    blank lines and ``#`` comments skipped, ``name = value`` split at the first ``=``)."""
    pairs, section = [], None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _SECTION.match(line)
        if match:
            section = match.group("name").strip()
        elif section == group and "=" in line:
            name, _, value = line.partition("=")
            pairs.append((name.strip(), value.strip()))
    return pairs


def _name_version(dist_dir: str) -> tuple[str, str]:
    """``Name`` and ``Version`` from the headers of METADATA (dist-info) or PKG-INFO (egg-info)."""
    found: dict[str, str] = {}
    for fname in ("METADATA", "PKG-INFO"):
        try:
            with open(os.path.join(dist_dir, fname), encoding="utf-8") as fh:
                for line in fh:
                    if not line.strip():
                        break  # end of the headers
                    key, sep, value = line.partition(":")
                    if sep and key in ("Name", "Version") and key not in found:
                        found[key] = value.strip()
            break
        except OSError:
            continue
    return found.get("Name", "?"), found.get("Version", "?")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _dist_dirs() -> list[tuple[str, str]] | None:
    """``(normalized name, metadata dir)`` of every distribution on ``sys.path``, in
    importlib.metadata's order; ``None`` when the environment needs importlib.metadata."""
    from importlib.machinery import PathFinder

    for finder in sys.meta_path:  # another finder may know distributions that no directory shows
        if finder is not PathFinder and hasattr(finder, "find_distributions"):
            return None
    found = []
    for entry in sys.path:
        root = entry or "."
        if os.path.isfile(root):  # a zip file on sys.path
            return None
        try:
            children = os.listdir(root)
        except OSError:
            continue
        is_egg = os.path.basename(root).lower().endswith(".egg")
        for child in children:
            low = child.lower()
            if low.endswith((".dist-info", ".egg-info")):
                stem = low.rpartition(".")[0].partition("-")[0]
            elif is_egg and low == "egg-info":
                stem = os.path.basename(root).lower().rpartition(".")[0].partition("-")[0]
            else:
                continue
            path = os.path.join(root, child)
            if os.path.isdir(path):
                found.append((_normalize(stem), path))
    return found


def _scan_entry_points(group: str) -> list[PluginEntryPoint] | None:
    dirs = _dist_dirs()
    if dirs is None:
        return None
    result, seen = [], set()
    for key, path in dirs:
        if key in seen:  # shadowed by the same distribution earlier on sys.path
            continue
        seen.add(key)
        try:
            with open(os.path.join(path, "entry_points.txt"), encoding="utf-8") as fh:
                text = fh.read()
        except OSError:
            continue
        if f"[{group}]" not in text:
            continue
        pairs = _parse_entry_points(text, group)
        if pairs:
            dist, version = _name_version(path)
            result += [PluginEntryPoint(name, value, dist, version) for name, value in pairs]
    return result


def _metadata_entry_points(group: str) -> list[PluginEntryPoint]:
    from importlib import metadata

    result = []
    for ep in metadata.entry_points(group=group):
        dist, version = (ep.dist.name, ep.dist.version) if ep.dist is not None else ("?", "?")
        result.append(PluginEntryPoint(ep.name, ep.value, dist, version))
    return result


def discover_entry_points(group: str = ENTRY_POINT_GROUP, fast: bool = True) -> list[PluginEntryPoint]:
    """The group's entry points, in load order: by entry-point name, then distribution.

    ``fast=False`` asks :mod:`importlib.metadata` (the tests check both agree).
    """
    eps = _scan_entry_points(group) if fast else None
    if eps is None:
        eps = _metadata_entry_points(group)
    unique = {(ep.name, ep.dist): ep for ep in reversed(eps)}  # one distribution found twice counts once
    return [unique[k] for k in sorted(unique)]


def load_registry() -> Registry:
    """Build a fresh registry from the installed entry points."""
    registry = Registry()
    builtin = importlib.import_module("trtlm.builtin")
    from trtlm import __version__

    registry.add_plugin(builtin, BUILTIN_NAME, "trtlm", __version__)
    for ep in discover_entry_points():
        reason = skip_reason(ep.name)
        if reason is not None:
            registry.records.append(PluginRecord(ep.name, ep.dist, ep.version, status="disabled", error=reason,
                                                 module=ep.value))
            continue
        try:
            plugin = ep.load()
        except BaseException as exc:  # import errors, missing deps, even SystemExit in a plugin
            if isinstance(exc, KeyboardInterrupt):
                raise
            registry.records.append(PluginRecord(ep.name, ep.dist, ep.version, status="broken",
                                                 error=describe_error(exc), module=ep.value))
            continue
        registry.add_plugin(plugin, ep.name, ep.dist, ep.version)
    if strict_mode():
        broken = [r for r in registry.records if r.status == "broken"]
        if broken:
            r = broken[0]
            raise PluginError(f"plugin {r.name!r} ({r.distribution} {r.version}) failed to load: {r.error} "
                              f"[TRTLM_STRICT_PLUGINS is set]")
    return registry
