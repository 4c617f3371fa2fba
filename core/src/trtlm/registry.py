"""The family registry: loaded plugins, the families they declare, and per-family hook callers.

A :class:`Registry` accepts plugin objects (:meth:`Registry.add_plugin`, each inside an error
boundary that records a broken plugin instead of raising), routes a Hugging Face config or a
TensorRT-LLM architecture to the family that claims it, and hands out :class:`FamilyHooks`:
hook callers restricted to that family's plugin plus the built-in defaults.  Finding plugins
on disk is :mod:`trtlm.discovery`; the process-wide instance is :func:`trtlm.plugins.get_registry`.
Nothing heavy is imported here (``trtlm plugins`` and ``trtlm --help`` load it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import pluggy

from trtlm import PLUGIN_API_VERSION, hookspecs
from trtlm.errors import PluginError, UserError
from trtlm.family import Family

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
            spec = opts.get("specname") or attr  # @hookimpl(specname=...) implements another name
            if spec not in known:
                raise PluginError(f"hook implementation {attr!r} matches no trtlm hookspec")
            names.append(spec)
        return sorted(set(names))

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
