"""Plugin discovery, isolation and the CLI skeleton (`trtlm --version`, `plugins`, `inspect`).

The plugins under test are real distributions.  The in-tree families
(mistral, mixtral, mpt) come through their installed entry points; the
test-only projects in tests/plugins/ are built and installed once per session
with pip into a temporary ``--target`` directory, which the tests put on
``sys.path`` (in-process) or ``PYTHONPATH`` (subprocesses).  importlib.metadata
then sees ordinary dist-info directories with ``entry_points.txt``, and the
environment the suite runs in is left untouched.

tests/plugins/:
  acme           trtlm-plugin-acme 0.3.1: a working Llama-compatible family (core defaults only)
  broken-import  trtlm-plugin-broken-import 0.0.2: entry points raising ImportError,
                 ModuleNotFoundError (a missing dependency) and SystemExit at import
  badhook        trtlm-plugin-badhook 1.2.3: a hookimpl ``trtlm_not_a_hook``
  oldapi         trtlm-plugin-oldapi 0.9.0: TRTLM_PLUGIN_API = 0
  conflict       trtlm-plugin-conflict 2.0.0: claims MistralForCausalLM
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import trtlm
from trtlm import PLUGIN_API_VERSION, Family, hookimpl, hookspecs
from trtlm import plugins as plugins_mod
from trtlm.cli import COMMANDS, cli
from trtlm.errors import PluginError, UserError

REPO = Path(__file__).resolve().parent.parent
TEST_PLUGINS = REPO / "tests" / "plugins"
GROUP = "trtlm.families"
ENV_VARS = ("TRTLM_PLUGINS", "TRTLM_DISABLE_PLUGINS", "TRTLM_STRICT_PLUGINS")

#: distribution -> (version, {entry-point name: value}), as tests/plugins/*/pyproject.toml declare them.
TEST_DISTS = {
    "trtlm-plugin-acme": ("0.3.1", {"acme": "trtlm_acme"}),
    "trtlm-plugin-broken-import": ("0.0.2", {"broken-import": "trtlm_broken_import.explodes",
                                             "broken-dep": "trtlm_broken_import.needs_dep",
                                             "broken-exit": "trtlm_broken_import.exits"}),
    "trtlm-plugin-badhook": ("1.2.3", {"badhook": "trtlm_badhook"}),
    "trtlm-plugin-oldapi": ("0.9.0", {"oldapi": "trtlm_oldapi"}),
    "trtlm-plugin-conflict": ("2.0.0", {"conflict": "trtlm_conflict"}),
}
TEST_MODULES = ("trtlm_acme", "trtlm_broken_import", "trtlm_badhook", "trtlm_oldapi", "trtlm_conflict")
#: the in-tree families: plugin name -> (distribution, family, an HF architecture it owns).
REAL = {
    "mistral": ("trtlm-plugin-mistral", "mistral", "MistralForCausalLM"),
    "mixtral": ("trtlm-plugin-mixtral", "mixtral", "MixtralForCausalLM"),
    "mpt": ("trtlm-plugin-mpt", "mpt", "MptForCausalLM"),
}
HOOK_NAMES = {n for n in dir(hookspecs) if n.startswith("trtlm_")}


# --------------------------------------------------------------------------- fixtures / helpers
def can_build_wheels_here() -> bool:
    """This environment's setuptools can build a wheel: setuptools >= 70.1 has bdist_wheel built
    in, older ones need the ``wheel`` package (a fresh Python 3.11 venv has setuptools 65 alone)."""
    find = importlib.util.find_spec
    try:
        return find("setuptools") is not None and (
            find("wheel") is not None or find("setuptools.command.bdist_wheel") is not None)
    except ImportError:
        return False


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """tests/plugins/* installed with pip into a fresh --target directory (built from a copy,
    so no build/ or *.egg-info litter lands in the source tree)."""
    root = tmp_path_factory.mktemp("trtlm-test-plugins")
    src, site = root / "src", root / "site"
    shutil.copytree(TEST_PLUGINS, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
           "--disable-pip-version-check", "--target", str(site)]
    if can_build_wheels_here():
        cmd += ["--no-build-isolation", "--no-index"]  # build with this environment's setuptools, offline
    # else pip builds each project in an isolated environment with setuptools from the package index
    cmd += [str(p) for p in sorted(src.iterdir()) if (p / "pyproject.toml").exists()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"pip could not install the test plugins:\n{proc.stdout}\n{proc.stderr}")
    return site


def _forget_test_modules() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in TEST_MODULES:
            del sys.modules[name]


@pytest.fixture
def clean_env(monkeypatch):
    """No TRTLM_* plugin settings, and a registry loaded afresh for (and after) the test."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    plugins_mod.reset_registry()
    yield monkeypatch
    plugins_mod.reset_registry()


@pytest.fixture
def with_test_plugins(plugin_site, clean_env):
    """The test distributions on sys.path for this test only."""
    _forget_test_modules()
    clean_env.syspath_prepend(str(plugin_site))
    yield clean_env
    _forget_test_modules()


def by_name(registry) -> dict[str, Any]:
    return {r.name: r for r in registry.records}


def trtlm_script() -> Path:
    script = Path(sys.executable).parent / ("trtlm.exe" if os.name == "nt" else "trtlm")
    if not script.exists():
        pytest.fail(f"{script}: the trtlm console script is not installed next to {sys.executable}")
    return script


def subprocess_env(site: Path | None = None, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env.update(settings)
    return env


def run_trtlm(*args: str, site: Path | None = None, **settings: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(trtlm_script()), *args], capture_output=True, text=True,
                          env=subprocess_env(site, **settings), timeout=600)


def invoke(*args: str):
    """The CLI in this process (click's CliRunner); exceptions stay in ``result.exception``."""
    return CliRunner().invoke(cli, list(args), catch_exceptions=True)


def one_line(text: str) -> bool:
    return bool(text) and "\n" not in text.strip()


def check_plugins_json(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The schema of `trtlm plugins --json`."""
    assert set(doc) == {"plugins"}
    rows = doc["plugins"]
    assert rows[0]["name"] == "builtin" and rows[0]["distribution"] == "trtlm" and rows[0]["status"] == "ok"
    for row in rows:
        assert {"name", "distribution", "version", "status", "error", "families", "architectures",
                "hooks"} <= set(row), row
        for key in ("name", "distribution", "version"):
            assert isinstance(row[key], str) and row[key], (key, row)
        for key in ("families", "architectures", "hooks"):
            assert isinstance(row[key], list) and all(isinstance(v, str) for v in row[key]), (key, row)
        assert set(row["hooks"]) <= HOOK_NAMES, row
        assert row["status"] in ("ok", "broken", "disabled"), row
        if row["status"] == "ok":
            assert row["error"] is None, row
        else:
            assert isinstance(row["error"], str) and one_line(row["error"]), row
            assert row["families"] == [] and row["architectures"] == [], row
    return rows


# --------------------------------------------------------------------------- the test distributions
def test_test_plugins_are_real_installed_distributions(with_test_plugins, plugin_site):
    for dist_name, (version, eps) in TEST_DISTS.items():
        dist = metadata.distribution(dist_name)
        assert dist.version == version
        assert Path(dist.locate_file("")).resolve() == plugin_site.resolve(), dist_name
        assert "[trtlm.families]" in dist.read_text("entry_points.txt")
        assert {ep.name: ep.value for ep in dist.entry_points if ep.group == GROUP} == eps
    declared = {ep.name: ep.value for ep in metadata.entry_points(group=GROUP)}
    for _, eps in TEST_DISTS.values():
        assert eps.items() <= declared.items()


def test_entry_point_scan_agrees_with_importlib_metadata(with_test_plugins):
    fast = plugins_mod.discover_entry_points()
    slow = plugins_mod.discover_entry_points(fast=False)
    assert fast == slow
    names = [ep.name for ep in fast]
    assert names == sorted(names)
    expected = {name for _, eps in TEST_DISTS.values() for name in eps} | set(REAL)
    assert expected <= set(names)
    for ep in fast:
        if ep.dist in TEST_DISTS:
            assert ep.version == TEST_DISTS[ep.dist][0]


def test_entry_point_scan_without_test_plugins_agrees(clean_env):
    assert plugins_mod.discover_entry_points() == plugins_mod.discover_entry_points(fast=False)


def test_a_distribution_twice_on_sys_path_counts_once(with_test_plugins, plugin_site):
    with_test_plugins.syspath_prepend(str(plugin_site))
    sys.path.append(str(plugin_site))
    try:
        eps = plugins_mod.discover_entry_points()
        assert [ep.name for ep in eps].count("acme") == 1
        assert eps == plugins_mod.discover_entry_points(fast=False)
    finally:
        sys.path.remove(str(plugin_site))


def test_zip_on_sys_path_is_read_through_importlib_metadata(clean_env, tmp_path):
    """A zip file on sys.path is beyond the fast directory scan: discovery falls back to
    importlib.metadata, which reads zipped dist-info directories."""
    archive = tmp_path / "zipped.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = "trtlm_plugin_zipped-4.5.6.dist-info"
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: trtlm-plugin-zipped\nVersion: 4.5.6\n")
        zf.writestr(f"{info}/entry_points.txt", "[trtlm.families]\nzipped = trtlm_zipped\n")
    clean_env.syspath_prepend(str(archive))
    eps = {ep.name: ep for ep in plugins_mod.discover_entry_points()}
    assert eps["zipped"] == plugins_mod.PluginEntryPoint("zipped", "trtlm_zipped", "trtlm-plugin-zipped", "4.5.6")
    registry = plugins_mod.load_registry()
    assert by_name(registry)["zipped"].status == "broken"  # the module is not in the zip
    assert "trtlm_zipped" in by_name(registry)["zipped"].error


# --------------------------------------------------------------------------- the in-tree families
def test_in_tree_families_are_discovered_through_their_entry_points(clean_env):
    registry = plugins_mod.get_registry()
    records = by_name(registry)
    assert registry.records[0].name == "builtin" and registry.records[0].status == "ok"
    assert {"trtlm_load_weights", "trtlm_map_layers", "trtlm_shard"} <= set(records["builtin"].hooks)
    for name, (dist, family, arch) in REAL.items():
        record = records.get(name)
        assert record is not None, f"plugin {name} ({dist}) is not installed / not discovered"
        assert record.status == "ok", f"{name}: {record.error}"
        assert record.distribution == dist
        assert record.version == metadata.version(dist)
        assert family in record.families and arch in record.architectures
        assert "trtlm_families" in record.hooks
        entry = registry.resolve_hf({"architectures": [arch]})
        assert (entry.plugin, entry.distribution, entry.family.name) == (name, dist, family)
        assert registry.family(family) is entry


def test_load_order_is_stable(with_test_plugins):
    first = plugins_mod.load_registry()
    names = [r.name for r in first.records]
    assert names[0] == "builtin"
    assert names[1:] == sorted(names[1:])
    second = plugins_mod.load_registry()
    assert [r.as_dict() for r in second.records] == [r.as_dict() for r in first.records]


# --------------------------------------------------------------------------- isolation
def test_broken_plugins_are_recorded_and_skipped(with_test_plugins):
    with_test_plugins.setenv("TRTLM_DISABLE_PLUGINS", "conflict")
    registry = plugins_mod.get_registry()
    records = by_name(registry)

    def broken(name: str, dist: str, *fragments: str) -> None:
        record = records[name]
        assert record.status == "broken", record
        assert (record.distribution, record.version) == (dist, TEST_DISTS[dist][0])
        assert one_line(record.error)
        for fragment in fragments:
            assert fragment in record.error, (fragment, record.error)
        assert record.families == [] and registry.pm.get_plugin(name) is None

    broken("broken-import", "trtlm-plugin-broken-import", "ImportError:", "broken on purpose")
    broken("broken-dep", "trtlm-plugin-broken-import", "ModuleNotFoundError:",
           "trtlm_test_dependency_that_is_not_installed")
    broken("broken-exit", "trtlm-plugin-broken-import", "SystemExit: 3")
    broken("badhook", "trtlm-plugin-badhook", "'trtlm_not_a_hook'", "matches no trtlm hookspec")
    broken("oldapi", "trtlm-plugin-oldapi", "plugin API 0", f"provides API {PLUGIN_API_VERSION}")
    assert records["conflict"].status == "disabled"
    # The working plugins are unaffected, and the broken ones' families do not exist.
    for name in ("acme", *REAL):
        assert records[name].status == "ok", records[name]
    assert registry.resolve_hf({"architectures": ["AcmeForCausalLM"]}).distribution == "trtlm-plugin-acme"
    for arch in ("BadhookForCausalLM", "OldapiForCausalLM"):
        with pytest.raises(UserError, match=arch):
            registry.resolve_hf({"architectures": [arch]})
    with pytest.raises(UserError, match="broken plugins: badhook, broken-dep, broken-exit, broken-import, oldapi"):
        registry.resolve_hf({"architectures": ["BadhookForCausalLM"]})


def fresh_registry() -> plugins_mod.Registry:
    registry = plugins_mod.Registry()
    registry.add_plugin(importlib.import_module("trtlm.builtin"), "builtin", "trtlm", trtlm.__version__)
    return registry


def family(name: str, *archs: str, trt: str | None = None) -> Family:
    return Family(name=name, hf_architectures=archs or (f"{name.title()}ForCausalLM",),
                  trtllm_architecture=trt or f"{name.title()}ForCausalLM")


class _Plugin:
    TRTLM_PLUGIN_API = PLUGIN_API_VERSION

    def __init__(self, *families: Family):
        self._families = list(families)

    @hookimpl
    def trtlm_families(self):
        return self._families


def test_hookimpl_whose_arguments_match_no_spec_is_broken_in_one_line():
    class WrongArguments(_Plugin):
        @hookimpl
        def trtlm_map_layers(self, family, hf_config, options, not_an_argument):
            raise AssertionError("never called")

    registry = fresh_registry()
    record = registry.add_plugin(WrongArguments(family("wrongargs")), "wrongargs", "dist-w", "1")
    assert record.status == "broken"
    assert "not_an_argument" in record.error and one_line(record.error)  # pluggy's message spans lines
    assert "wrongargs" not in registry.families and registry.pm.get_plugin("wrongargs") is None


@pytest.mark.parametrize("api", [None, 0, PLUGIN_API_VERSION + 1, str(PLUGIN_API_VERSION), True])
def test_plugin_api_version_is_checked_at_load(api):
    class Versioned(_Plugin):
        pass

    Versioned.TRTLM_PLUGIN_API = api  # None reads like a module without the attribute
    plugin = Versioned(family("versioned"))
    record = fresh_registry().add_plugin(plugin, "versioned", "dist-v", "1")
    assert record.status == "broken"
    assert f"plugin API {api!r}" in record.error and f"provides API {PLUGIN_API_VERSION}" in record.error


def test_families_hook_failures_leave_nothing_registered():
    class Raises(_Plugin):
        @hookimpl
        def trtlm_families(self):
            raise RuntimeError("cannot declare")

    class Exits(_Plugin):
        @hookimpl
        def trtlm_families(self):
            raise SystemExit(2)

    registry = fresh_registry()
    assert registry.add_plugin(Raises(), "raises", "d", "1").error == "RuntimeError: cannot declare"
    assert registry.add_plugin(Exits(), "exits", "d", "1").error == "SystemExit: 2"
    assert registry.pm.get_plugin("raises") is None
    record = registry.add_plugin(_Plugin("not a family"), "notfamily", "d", "1")
    assert record.status == "broken" and "expected trtlm.Family" in record.error
    assert [r.status for r in registry.records] == ["ok", "broken", "broken", "broken"]


def test_a_working_plugin_keeps_working_next_to_broken_ones():
    registry = fresh_registry()
    registry.add_plugin(_Plugin("bogus"), "bogus", "d", "1")
    record = registry.add_plugin(_Plugin(family("fine")), "fine", "dist-fine", "1")
    assert record.status == "ok" and record.families == ["fine"]
    assert registry.resolve_hf({"architectures": ["FineForCausalLM"]}).plugin == "fine"
    assert registry.resolve_trtllm("FineForCausalLM").distribution == "dist-fine"


# --------------------------------------------------------------------------- conflicts
def test_two_distributions_with_one_plugin_name():
    registry = fresh_registry()
    assert registry.add_plugin(_Plugin(family("one")), "same", "dist-a", "1").status == "ok"
    record = registry.add_plugin(_Plugin(family("two")), "same", "dist-b", "2")
    assert record.status == "broken"
    assert record.error == "plugin name 'same' is used by both dist-a and dist-b; uninstall one of them"
    assert registry.resolve_hf({"architectures": ["OneForCausalLM"]}).distribution == "dist-a"
    assert "two" not in registry.families


def test_conflicting_architecture_is_an_error_naming_both_distributions(with_test_plugins):
    with_test_plugins.setenv("TRTLM_PLUGINS", "conflict,mistral")
    registry = plugins_mod.get_registry()
    order = [r.name for r in registry.records if r.name in ("conflict", "mistral")]
    earlier, later = (by_name(registry)[n] for n in order)
    assert earlier.status == "ok"
    assert later.status == "broken"
    for fragment in ("'MistralForCausalLM'", "trtlm-plugin-conflict", "trtlm-plugin-mistral",
                     f"TRTLM_DISABLE_PLUGINS={later.name}"):
        assert fragment in later.error, (fragment, later.error)
    # The rejected plugin is out entirely (all-or-nothing), the earlier one owns the architecture.
    assert registry.resolve_hf({"architectures": ["MistralForCausalLM"]}).plugin == earlier.name
    assert registry.pm.get_plugin(later.name) is None
    assert set(registry.families) == set(earlier.families)


@pytest.mark.parametrize("clash", ["hf", "trt", "model_type", "family"])
def test_every_kind_of_claim_conflicts(clash):
    first = Family(name="one", hf_architectures=("OneForCausalLM",), trtllm_architecture="OneTRT",
                   hf_model_types=("one",))
    second = {
        "hf": Family(name="two", hf_architectures=("OneForCausalLM",), trtllm_architecture="TwoTRT"),
        "trt": Family(name="two", hf_architectures=("TwoForCausalLM",), trtllm_architecture="OneTRT"),
        "model_type": Family(name="two", hf_architectures=("TwoForCausalLM",), trtllm_architecture="TwoTRT",
                             hf_model_types=("one",)),
        "family": Family(name="one", hf_architectures=("TwoForCausalLM",), trtllm_architecture="TwoTRT"),
    }[clash]
    registry = fresh_registry()
    assert registry.add_plugin(_Plugin(first), "first", "dist-first", "1").status == "ok"
    record = registry.add_plugin(_Plugin(second), "second", "dist-second", "1")
    assert record.status == "broken"
    assert "dist-first" in record.error and "dist-second" in record.error
    assert registry.resolve_hf({"architectures": ["OneForCausalLM"]}).plugin == "first"
    with pytest.raises(UserError):
        registry.resolve_hf({"architectures": ["TwoForCausalLM"]})


def test_cli_keeps_working_with_a_conflict(plugin_site):
    proc = run_trtlm("plugins", site=plugin_site)
    assert proc.returncode == 0, proc.stderr
    assert "is claimed by both trtlm-plugin-conflict (plugin 'conflict') and trtlm-plugin-mistral" in proc.stdout


# --------------------------------------------------------------------------- strict mode
def test_strict_mode_is_fatal_with_one_error_line(plugin_site):
    proc = run_trtlm("plugins", site=plugin_site, TRTLM_STRICT_PLUGINS="1")
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: plugin 'badhook' (trtlm-plugin-badhook 1.2.3) failed to load: ")
    assert "trtlm_not_a_hook" in lines[0] and "TRTLM_STRICT_PLUGINS" in lines[0]


def test_strict_mode_reports_a_conflict(plugin_site):
    proc = run_trtlm("plugins", "--json", site=plugin_site, TRTLM_STRICT_PLUGINS="1",
                     TRTLM_PLUGINS="conflict,mistral")
    assert proc.returncode == 1 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert "trtlm-plugin-conflict" in line and "trtlm-plugin-mistral" in line


def test_strict_mode_passes_when_every_plugin_loads(plugin_site):
    proc = run_trtlm("plugins", "--json", site=plugin_site, TRTLM_STRICT_PLUGINS="1",
                     TRTLM_PLUGINS="acme,mistral,mixtral,mpt")
    assert proc.returncode == 0, proc.stderr
    rows = check_plugins_json(json.loads(proc.stdout))
    assert {r["name"]: r["status"] for r in rows if r["status"] != "disabled"} == {
        "builtin": "ok", "acme": "ok", "mistral": "ok", "mixtral": "ok", "mpt": "ok"}


@pytest.mark.parametrize("value,strict", [("1", True), ("true", True), ("0", False), ("", False), (None, False)])
def test_strict_mode_setting(with_test_plugins, value, strict):
    if value is not None:
        with_test_plugins.setenv("TRTLM_STRICT_PLUGINS", value)
    assert plugins_mod.strict_mode() is strict
    if strict:
        with pytest.raises(PluginError, match="TRTLM_STRICT_PLUGINS"):
            plugins_mod.get_registry()
    else:
        assert by_name(plugins_mod.get_registry())["badhook"].status == "broken"


# --------------------------------------------------------------------------- allow-list / disable
ALL_TEST_NAMES = {"acme", "badhook", "broken-dep", "broken-exit", "broken-import", "conflict", "oldapi"}


def loaded(registry) -> set[str]:
    return {r.name for r in registry.records if r.status != "disabled"} - {"builtin"}


def test_allow_list_unset_loads_everything(with_test_plugins):
    assert loaded(plugins_mod.get_registry()) >= ALL_TEST_NAMES | set(REAL)


def test_allow_list_empty_loads_nothing(with_test_plugins):
    with_test_plugins.setenv("TRTLM_PLUGINS", "")
    registry = plugins_mod.get_registry()
    assert loaded(registry) == set()
    assert set(registry.families) == set()
    records = by_name(registry)
    assert records["builtin"].status == "ok"
    assert all(records[n].error == "not in TRTLM_PLUGINS=''" for n in ALL_TEST_NAMES)
    assert not any(m.split(".")[0] in TEST_MODULES for m in sys.modules), "a disabled plugin was imported"


def test_allow_list_subset(with_test_plugins):
    with_test_plugins.setenv("TRTLM_PLUGINS", " acme , mistral ,")
    registry = plugins_mod.get_registry()
    assert loaded(registry) == {"acme", "mistral"}
    assert set(registry.families) == {"acme", "mistral"}
    assert "trtlm_oldapi" not in sys.modules and "trtlm_badhook" not in sys.modules
    with pytest.raises(UserError) as err:
        registry.resolve_hf({"architectures": ["MixtralForCausalLM"]})
    message = str(err.value)
    assert "installed families: acme, mistral" in message
    assert "pip install trtlm-plugin-mixtral" in message
    assert "TRTLM_PLUGINS=' acme , mistral ,'" in message


def test_disable_by_name(with_test_plugins):
    with_test_plugins.setenv("TRTLM_DISABLE_PLUGINS", "mpt,conflict")
    registry = plugins_mod.get_registry()
    records = by_name(registry)
    assert records["mpt"].status == "disabled" and records["mpt"].error == "disabled by TRTLM_DISABLE_PLUGINS"
    assert loaded(registry) == (ALL_TEST_NAMES | set(REAL)) - {"mpt", "conflict"}
    assert records["mistral"].status == "ok"  # with conflict disabled, mistral owns its architecture again
    assert "mpt" not in registry.families


def test_allow_list_and_disable_together(with_test_plugins):
    with_test_plugins.setenv("TRTLM_PLUGINS", "acme,mpt")
    with_test_plugins.setenv("TRTLM_DISABLE_PLUGINS", "mpt")
    assert loaded(plugins_mod.get_registry()) == {"acme"}


# --------------------------------------------------------------------------- idempotence, workers
def test_get_registry_is_loaded_once(with_test_plugins):
    first = plugins_mod.get_registry()
    assert plugins_mod.get_registry() is first
    results = []
    threads = [threading.Thread(target=lambda: results.append(plugins_mod.get_registry())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is first for r in results)
    with_test_plugins.setenv("TRTLM_DISABLE_PLUGINS", "acme")  # another setting: another registry
    other = plugins_mod.get_registry()
    assert other is not first and by_name(other)["acme"].status == "disabled"
    with_test_plugins.delenv("TRTLM_DISABLE_PLUGINS")
    plugins_mod.reset_registry()
    again = plugins_mod.get_registry()
    assert again is not first
    assert [r.as_dict() for r in again.records] == [r.as_dict() for r in first.records]


def test_a_worker_process_loads_the_same_plugins(with_test_plugins, plugin_site):
    """Every rank of a multi-process run loads the registry itself; it must come out the same."""
    code = ("import json\nfrom trtlm.plugins import get_registry\n"
            "first = get_registry()\nassert get_registry() is first\n"
            "print(json.dumps([r.as_dict() for r in first.records]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=subprocess_env(plugin_site), timeout=300)
    assert proc.returncode == 0, proc.stderr
    here = json.loads(json.dumps([r.as_dict() for r in plugins_mod.get_registry().records]))
    assert json.loads(proc.stdout) == here


# --------------------------------------------------------------------------- the CLI
def test_version_and_help_in_process():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"trtlm, version {trtlm.__version__}"
    result = invoke("--help")
    assert result.exit_code == 0
    for name in COMMANDS:
        assert f"  {name} " in result.output, name


def test_plugins_command_in_process(with_test_plugins):
    result = invoke("plugins", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in check_plugins_json(json.loads(result.stdout))}
    assert rows["acme"] == {**rows["acme"], "status": "ok", "distribution": "trtlm-plugin-acme", "version": "0.3.1",
                            "families": ["acme"], "architectures": ["AcmeForCausalLM"], "hooks": ["trtlm_families"]}
    assert rows["oldapi"]["status"] == "broken" and "plugin API 0" in rows["oldapi"]["error"]
    text = invoke("plugins")
    assert text.exit_code == 0
    lines = text.output.splitlines()
    for name, row in rows.items():
        header = next(line for line in lines if line.split()[0] == name)
        assert f"{row['distribution']} {row['version']}" in header and f"[{row['status']}]" in header
        if row["error"]:
            assert any(line.strip().endswith(row["error"]) for line in lines), name


def test_console_script(plugin_site):
    version = run_trtlm("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"trtlm, version {trtlm.__version__}"
    helped = run_trtlm("--help")
    assert helped.returncode == 0 and "Usage: trtlm" in helped.stdout
    proc = run_trtlm("plugins", "--json", site=plugin_site, TRTLM_DISABLE_PLUGINS="conflict")
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in check_plugins_json(json.loads(proc.stdout))}
    assert {n for n, r in rows.items() if r["status"] == "ok"} == {"builtin", "acme", *REAL}
    assert {n for n, r in rows.items() if r["status"] == "broken"} == ALL_TEST_NAMES - {"acme", "conflict"}
    unknown = run_trtlm("no-such-command")
    assert unknown.returncode == 2 and "No such command" in unknown.stderr


_TORCH_PROBE = """
import sys
from trtlm.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
sys.stderr.write("\\nTORCH_IMPORTED=%s\\n" % ("torch" in sys.modules))
"""


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["plugins"], ["plugins", "--json"]])
def test_fast_commands_do_not_import_torch(plugin_site, args):
    proc = subprocess.run([sys.executable, "-c", _TORCH_PROBE, *args], capture_output=True, text=True,
                          env=subprocess_env(plugin_site), timeout=300)
    assert "TORCH_IMPORTED=" in proc.stderr, proc.stderr
    assert "TORCH_IMPORTED=False" in proc.stderr, f"trtlm {' '.join(args)} imported torch"


# --------------------------------------------------------------------------- inspect
def llama_parameters(cfg: dict[str, Any]) -> int:
    """Parameter count of a Llama-style HF config (untied embeddings), from the config alone."""
    h, i, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    q, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // q
    per_layer = (q + 2 * kv) * d * h + h * q * d + 3 * i * h + 2 * h
    return 2 * v * h + n * per_layer + h


@pytest.fixture(scope="module")
def mistral_dirs(tiny_mistral_dir, tmp_path_factory) -> dict[str, Any]:
    """conftest's tiny HF Mistral (vocab 1001, 4 heads / 2 KV heads), its float16 checkpoint for
    tp4 x pp2 (vocabulary padded to 1004 rows, KV heads duplicated across ranks) and its engine."""
    root = tmp_path_factory.mktemp("inspect")
    cfg = json.loads((tiny_mistral_dir / "config.json").read_text())
    assert cfg["vocab_size"] % 4 and cfg["num_key_value_heads"] < 4, "the fixture no longer exercises padding"
    plugins_mod.reset_registry()
    convert = invoke("convert", "--model-dir", str(tiny_mistral_dir), "--output-dir", str(root / "ckpt"),
                     "--dtype", "float16", "--tp-size", "4", "--pp-size", "2")
    assert convert.exit_code == 0, (convert.output, convert.exception)
    build = invoke("build", "--checkpoint-dir", str(root / "ckpt"), "--output-dir", str(root / "engine"))
    assert build.exit_code == 0, (build.output, build.exception)
    return {"hf": tiny_mistral_dir, "ckpt": root / "ckpt", "engine": root / "engine", "config": cfg,
            "parameters": llama_parameters(cfg)}


def inspect_json(path: Path) -> dict[str, Any]:
    result = invoke("inspect", "--json", str(path))
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_inspect_hf_dir(clean_env, mistral_dirs):
    cfg = mistral_dirs["config"]
    info = inspect_json(mistral_dirs["hf"])
    assert info["format"] == "hf"
    assert (info["architecture"], info["family"], info["plugin"], info["distribution"]) == (
        "MistralForCausalLM", "mistral", "mistral", "trtlm-plugin-mistral")
    assert info["parameters"] == mistral_dirs["parameters"]
    assert info["dtype"] == "float32" and info["dtypes"] == {"F32": mistral_dirs["parameters"]}
    assert info["parallel"] == {"tp_size": 1, "pp_size": 1}
    assert info["size_bytes"] == dir_bytes(mistral_dirs["hf"])
    assert (info["layers"], info["hidden_size"]) == (cfg["num_hidden_layers"], cfg["hidden_size"])


def test_inspect_checkpoint_dir(clean_env, mistral_dirs):
    info = inspect_json(mistral_dirs["ckpt"])
    assert info["format"] == "trtllm"
    assert (info["architecture"], info["family"], info["plugin"]) == ("MistralForCausalLM", "mistral", "mistral")
    # Merged across tensor-parallel ranks the checkpoint holds exactly the HF model's parameters;
    # the raw sum also counts replicated norms and duplicated KV heads once per rank, and padding.
    assert info["parameters"] == mistral_dirs["parameters"]
    assert info["parameters_all_ranks"] > info["parameters"]
    assert info["dtype"] == "float16" and set(info["dtypes"]) == {"F16"}
    assert info["parallel"]["tp_size"] == 4 and info["parallel"]["pp_size"] == 2
    assert info["rank_files"] == [f"rank{r}.safetensors" for r in range(8)]
    assert info["size_bytes"] == dir_bytes(mistral_dirs["ckpt"])


def test_inspect_engine_dir(clean_env, mistral_dirs):
    info = inspect_json(mistral_dirs["engine"])
    assert info["format"] == "engine"
    assert (info["family"], info["plugin"], info["distribution"]) == ("mistral", "mistral", "trtlm-plugin-mistral")
    assert info["build_config"]["backend"] == "torch"
    assert info["parameters"] == mistral_dirs["parameters"]
    assert info["parallel"]["world_size"] == 8
    text = invoke("inspect", str(mistral_dirs["engine"]))
    assert text.exit_code == 0
    rows = dict(line.split(None, 1) for line in text.output.splitlines())
    assert rows["family"] == "mistral" and rows["format"] == "engine"


def test_inspect_ft_dir(clean_env, tmp_path):
    out = tmp_path / "ft"
    result = invoke("convert", "--family", "mpt", "--preset", "tiny", "--dummy-weights", "--to", "ft",
                    "--ft-allow-lossy", "--tp-size", "2", "--output-dir", str(out))
    assert result.exit_code == 0, (result.output, result.exception)
    info = inspect_json(out)
    assert (info["format"], info["family"], info["distribution"]) == ("ft", "mpt", "trtlm-plugin-mpt")
    assert info["parallel"] == {"tp_size": 2, "pp_size": 1}
    assert info["parameters"] > 0 and info["size_bytes"] == dir_bytes(out)


def write_config(directory: Path, config: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_inspect_unsupported_architecture(clean_env, tmp_path):
    model = write_config(tmp_path / "foo", {"architectures": ["FooForCausalLM"], "model_type": "foo"})
    proc = run_trtlm("inspect", str(model))
    assert proc.returncode == 1 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and "'FooForCausalLM'" in line
    installed = sorted(plugins_mod.get_registry().families)
    assert {"mistral", "mixtral", "mpt"} <= set(installed)
    assert f"installed families: {', '.join(installed)}" in line
    assert "pip install" not in line  # no plugin is known for it


def test_inspect_names_the_plugin_to_install(tmp_path):
    model = write_config(tmp_path / "mixtral", {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"})
    proc = run_trtlm("inspect", str(model), TRTLM_PLUGINS="mistral")
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert "'MixtralForCausalLM'" in line and "installed families: mistral" in line
    assert "pip install trtlm-plugin-mixtral" in line


def test_inspect_unsupported_checkpoint_architecture(clean_env, tmp_path):
    ckpt = write_config(tmp_path / "ckpt", {"architecture": "FooForCausalLM", "mapping": {"world_size": 1}})
    result = invoke("inspect", str(ckpt))
    assert isinstance(result.exception, UserError)
    assert "TensorRT-LLM architecture 'FooForCausalLM'" in str(result.exception)


def test_inspect_rejects_what_is_not_a_model_dir(tmp_path):
    missing = run_trtlm("inspect", str(tmp_path / "nope"))
    assert missing.returncode == 1 and missing.stderr.strip() == f"error: {tmp_path / 'nope'}: no such directory"
    empty = run_trtlm("inspect", str(tmp_path))
    assert empty.returncode == 1 and len(empty.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- a third-party family end to end
def build_acme_engine(tmp_path: Path) -> Path:
    ckpt, engine = tmp_path / "ckpt", tmp_path / "engine"
    result = invoke("convert", "--family", "acme", "--preset", "tiny", "--dummy-weights", "--tp-size", "2",
                    "--output-dir", str(ckpt))
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads((ckpt / "config.json").read_text())["architecture"] == "AcmeForCausalLM"
    result = invoke("build", "--checkpoint-dir", str(ckpt), "--output-dir", str(engine))
    assert result.exit_code == 0, (result.output, result.exception)
    return engine


def run_ids(engine: Path, *prompts: str) -> list[list[int]]:
    args = [a for p in prompts for a in ("--input-ids", p)]
    result = invoke("run", "--engine-dir", str(engine), *args, "--max-output-len", "4", "--json", "--launch", "single")
    assert result.exit_code == 0, (result.output, result.exception)
    return [o["output_ids"] for o in json.loads(result.stdout)["outputs"]]


def test_third_party_family_converts_builds_runs_and_inspects(with_test_plugins, tmp_path):
    with_test_plugins.setenv("TRTLM_PLUGINS", "acme")
    engine = build_acme_engine(tmp_path)
    outputs = run_ids(engine, "5,6,7", "8,9")
    assert len(outputs) == 2 and all(1 <= len(ids) <= 4 for ids in outputs)
    info = inspect_json(engine)
    assert (info["family"], info["plugin"], info["distribution"]) == ("acme", "acme", "trtlm-plugin-acme")
    from trtlm_acme import FAMILY

    assert info["parameters"] == llama_parameters(FAMILY.presets["tiny"])


@pytest.mark.multiprocess
def test_third_party_family_in_worker_processes(with_test_plugins, plugin_site, tmp_path):
    """`trtlm run --launch multi` starts one process per rank of a tp2 engine; each loads the
    registry itself and must find the acme plugin, and together they generate what one process does."""
    with_test_plugins.setenv("TRTLM_PLUGINS", "acme")
    engine = build_acme_engine(tmp_path)
    (single,) = run_ids(engine, "5,6,7")
    proc = run_trtlm("run", "--engine-dir", str(engine), "--input-ids", "5,6,7", "--max-output-len", "4",
                     "--json", "--launch", "multi", site=plugin_site, TRTLM_PLUGINS="acme")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["outputs"][0]["output_ids"] == single
