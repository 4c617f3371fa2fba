"""Plugin discovery, isolation and the family registry.

Family plugins are distributions exposing a module under the
``trtlm.families`` entry-point group.  Loading follows a few rules:

* Entry points load in a stable order (by name, then distribution), each
  inside its own error boundary.  A plugin that fails to import, declares
  another plugin API version, implements a hook that matches no spec or
  claims an architecture another plugin already owns is recorded as
  *broken* with its error and skipped; the rest keep working.
  ``TRTLM_STRICT_PLUGINS=1`` turns any such failure into an error.
* ``TRTLM_PLUGINS`` is an allow-list (unset: all, empty: none);
  ``TRTLM_DISABLE_PLUGINS`` names plugins to skip.  Skipped plugins are
  listed with status ``disabled`` (nothing of them is imported).
* Loading is idempotent and cheap (no torch): every worker process of a
  multi-process run calls :func:`get_registry` and gets the same plugins.
* Entry points are read from the ``*.dist-info`` / ``*.egg-info``
  directories on ``sys.path`` directly, with the rules of
  :mod:`importlib.metadata` (first distribution of a name on ``sys.path``
  wins); importing :mod:`importlib.metadata` itself costs more than the rest
  of ``trtlm plugins``.  Unusual environments (zip files on ``sys.path``,
  extra distribution finders) use :mod:`importlib.metadata`.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import pluggy

from trtlm import PLUGIN_API_VERSION
from trtlm import hookspecs
from trtlm.errors import PluginError, UserError
from trtlm.family import Family

ENTRY_POINT_GROUP = "trtlm.families"
BUILTIN_NAME = "builtin"

#: Family names whose plugin is published as ``trtlm-plugin-<name>``; used to
#: suggest an install command for an architecture no installed plugin handles.
KNOWN_FAMILIES: dict[str, str] = {
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
    "MptForCausalLM": "mpt",
    "MPTForCausalLM": "mpt",
    "mistral": "mistral",
    "mixtral": "mixtral",
    "mpt": "mpt",
}


@dataclass
class PluginRecord:
    """What ``trtlm plugins`` shows for one plugin."""

    name: str
    distribution: str
    version: str
    status: str = "ok"  #: "ok", "broken" or "disabled" (by TRTLM_PLUGINS / TRTLM_DISABLE_PLUGINS)
    error: str | None = None  #: one line: why a broken or disabled plugin is not in use
    families: list[str] = field(default_factory=list)
    architectures: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    module: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class FamilyEntry:
    family: Family
    plugin: str  #: plugin name (entry-point name, or "builtin")
    distribution: str


class FamilyHooks:
    """Hook callers restricted to one family's plugin plus the built-in defaults.

    ``hooks.trtlm_map_layers(hf_config=..., options=...)`` calls the hook with
    ``family=`` filled in; other family plugins do not take part.
    """

    def __init__(self, pm: pluggy.PluginManager, entry: FamilyEntry, others: list[object]):
        self.entry = entry
        self.family = entry.family
        self._pm = pm
        self._others = others

    def __getattr__(self, name: str):
        if name not in hookspecs.FAMILY_HOOKS:
            raise AttributeError(name)
        caller = self._pm.subset_hook_caller(name, remove_plugins=self._others)
        family = self.family

        def call(**kwargs: Any) -> Any:
            return caller(family=family, **kwargs)

        return call


class Registry:
    """Loaded plugins and the families they declare."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("trtlm")
        self.pm.add_hookspecs(hookspecs)
        self.records: list[PluginRecord] = []
        self.families: dict[str, FamilyEntry] = {}
        self._by_key: dict[str, FamilyEntry] = {}

    # -- lookup -----------------------------------------------------------
    def family(self, name: str) -> FamilyEntry:
        try:
            return self.families[name]
        except KeyError:
            raise UserError(self._unknown(f"family {name!r}", name)) from None

    def resolve_hf(self, hf_config: dict[str, Any], where: str = "config.json") -> FamilyEntry:
        """The family for a Hugging Face config: by architecture, then model_type."""
        archs = list(hf_config.get("architectures") or [])
        for arch in archs:
            if ("hf:" + arch) in self._by_key:
                return self._by_key["hf:" + arch]
        model_type = hf_config.get("model_type")
        if model_type and ("type:" + model_type) in self._by_key:
            return self._by_key["type:" + model_type]
        what = archs[0] if archs else (model_type or "<no architectures or model_type>")
        raise UserError(self._unknown(f"{where}: architecture {what!r}", what))

    def resolve_trtllm(self, architecture: str, where: str = "config.json") -> FamilyEntry:
        entry = self._by_key.get("trt:" + architecture)
        if entry is None:
            raise UserError(self._unknown(f"{where}: TensorRT-LLM architecture {architecture!r}", architecture))
        return entry

    def families_reading(self, fmt: str) -> list[FamilyEntry]:
        return [e for e in self.families.values() if fmt in e.family.capabilities.formats_in]

    def hooks(self, entry: FamilyEntry) -> FamilyHooks:
        others = [
            self.pm.get_plugin(r.name)
            for r in self.records
            if r.status == "ok" and r.name not in (entry.plugin, BUILTIN_NAME)
        ]
        return FamilyHooks(self.pm, entry, [p for p in others if p is not None])

    def _unknown(self, what: str, key: str) -> str:
        installed = ", ".join(sorted(self.families)) or "none"
        msg = f"{what} is not supported by any installed family plugin (installed families: {installed})"
        suggestion = KNOWN_FAMILIES.get(key) or KNOWN_FAMILIES.get(key.lower())
        if suggestion and suggestion not in self.families:
            msg += f"; install it with: pip install trtlm-plugin-{suggestion}"
        broken = [r.name for r in self.records if r.status == "broken"]
        if broken:
            msg += f"; broken plugins: {', '.join(broken)} (see `trtlm plugins`)"
        limits = [f"{v}={os.environ[v]!r}" for v in ("TRTLM_PLUGINS", "TRTLM_DISABLE_PLUGINS") if v in os.environ]
        if limits:
            msg += f"; plugins limited by {' '.join(limits)}"
        return msg

    # -- loading ----------------------------------------------------------
    def _register_families(self, record: PluginRecord, families: Iterable[Family]) -> None:
        """Claim architectures for ``record``; all-or-nothing on conflict."""
        claims: dict[str, FamilyEntry] = {}
        for fam in families:
            if not isinstance(fam, Family):
                raise PluginError(f"trtlm_families returned {type(fam).__name__}, expected trtlm.Family")
            entry = FamilyEntry(fam, record.name, record.distribution)
            keys = [f"family:{fam.name}"]
            keys += [f"hf:{a}" for a in fam.hf_architectures]
            keys += [f"type:{t}" for t in fam.hf_model_types]
            keys += [f"trt:{a}" for a in fam.trtllm_architectures]
            for key in keys:
                owner = self._by_key.get(key) or claims.get(key)
                if owner is not None and owner != entry:
                    kind, _, value = key.partition(":")
                    label = {"hf": "HF architecture", "type": "HF model_type",
                             "trt": "TensorRT-LLM architecture", "family": "family name"}[kind]
                    raise PluginError(
                        f"{label} {value!r} is claimed by both {owner.distribution} "
                        f"(plugin {owner.plugin!r}) and {record.distribution} (plugin {record.name!r}); "
                        f"uninstall one of them or disable one with TRTLM_DISABLE_PLUGINS={record.name}"
                    )
                claims[key] = entry
        self._by_key.update(claims)
        for key, entry in claims.items():
            if key.startswith("family:"):
                self.families[entry.family.name] = entry
        record.families = sorted({e.family.name for e in claims.values()})
        record.architectures = sorted({k.partition(":")[2] for k in claims if k.startswith("hf:")})

    def _check_hookimpls(self, plugin: object) -> list[str]:
        known = {name for name in dir(hookspecs) if name.startswith("trtlm_")}
        names = []
        for attr in dir(plugin):
            opts = self.pm.parse_hookimpl_opts(plugin, attr)
            if opts is None:
                continue
            if attr not in known:
                raise PluginError(f"hook implementation {attr!r} matches no trtlm hookspec")
            names.append(attr)
        return sorted(names)

    def add_plugin(self, plugin: object, name: str, distribution: str, version: str) -> PluginRecord:
        """Register one plugin object inside an error boundary (also used by tests)."""
        record = PluginRecord(name=name, distribution=distribution, version=version,
                              module=getattr(plugin, "__name__", type(plugin).__name__))
        self.records.append(record)
        try:
            api = getattr(plugin, "TRTLM_PLUGIN_API", None)
            if type(api) is not int or api != PLUGIN_API_VERSION:
                raise PluginError(
                    f"written for plugin API {api!r}, this trtlm provides API {PLUGIN_API_VERSION} "
                    f"(set TRTLM_PLUGIN_API = {PLUGIN_API_VERSION} after porting the plugin)"
                )
            record.hooks = self._check_hookimpls(plugin)
            taken = next((r for r in self.records if r.name == name and r.status == "ok" and r is not record), None)
            if taken is not None:
                raise PluginError(
                    f"plugin name {name!r} is used by both {taken.distribution} and {distribution}; "
                    f"uninstall one of them"
                )
            self.pm.register(plugin, name=name)
            try:
                families = plugin.trtlm_families() if "trtlm_families" in record.hooks else []
                self._register_families(record, families or [])
            except BaseException:
                self.pm.unregister(plugin)
                raise
        except BaseException as exc:  # the error boundary: record, never propagate (even SystemExit)
            if isinstance(exc, KeyboardInterrupt):
                raise
            record.status = "broken"
            record.error = describe_error(exc)
        return record


def describe_error(exc: BaseException) -> str:
    """One line for an exception: ``trtlm plugins`` rows and strict mode's error stay one line each
    (pluggy's validation errors, for one, span several lines)."""
    text = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__


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


_lock = threading.Lock()
_cached: tuple[tuple[str | None, ...], Registry] | None = None


def _after_fork_in_child() -> None:
    # A fork taken while another thread held the lock would leave it held forever in the child.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

#: A registry installed by :func:`use_registry` (tests) takes precedence over discovery.
_override: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry; loaded once per environment setting."""
    global _cached
    if _override is not None:
        return _override
    key = tuple(os.environ.get(v) for v in ("TRTLM_PLUGINS", "TRTLM_DISABLE_PLUGINS", "TRTLM_STRICT_PLUGINS"))
    with _lock:
        if _cached is None or _cached[0] != key:
            _cached = (key, load_registry())
        return _cached[1]


def reset_registry() -> None:
    """Forget the cached registry (tests, or after installing a plugin at run time)."""
    global _cached
    with _lock:
        _cached = None


@contextlib.contextmanager
def use_registry(registry: Registry) -> Iterator[Registry]:
    """Make ``registry`` the process-wide registry inside the block (tests, embedding)."""
    global _override
    previous, _override = _override, registry
    try:
        yield registry
    finally:
        _override = previous
