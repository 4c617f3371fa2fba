"""The plugin-author kit: scaffold -> pip install -> listed -> its own tests pass; the tutorial's plugin too."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trtlm import Family, hookimpl
from trtlm.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TUTORIAL = REPO / "docs" / "examples" / "trtlm-plugin-qwen2"


def pip_install_target(project: Path, target: Path) -> None:
    """Install a distribution into ``target`` (a real dist-info with entry points) without
    touching the test environment; subprocesses see it through PYTHONPATH."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(project)]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.insert(5, "--no-build-isolation")
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)


def env_with(target: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def trtlm_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trtlm.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def run_plugin_tests(tests: Path, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=900)


@pytest.mark.slow
def test_scaffolded_plugin_installs_lists_and_passes_its_own_tests(tmp_path):
    from click.testing import CliRunner

    from trtlm.cli import cli

    result = CliRunner().invoke(cli, ["new-plugin", "acme", "--directory", str(tmp_path)])
    assert result.exit_code == 0, result.output
    project = tmp_path / "trtlm-plugin-acme"
    assert (project / "pyproject.toml").exists() and (project / "src" / "trtlm_acme" / "__init__.py").exists()
    site = tmp_path / "site"
    pip_install_target(project, site)
    env = env_with(site)
    listed = trtlm_cli("plugins", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    records = {p["name"]: p for p in json.loads(listed.stdout)["plugins"]}
    assert records["acme"]["status"] == "ok"
    assert records["acme"]["distribution"] == "trtlm-plugin-acme"
    assert records["acme"]["architectures"] == ["AcmeForCausalLM"]
    tests = run_plugin_tests(project / "tests", env, tmp_path)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout


@pytest.mark.slow
def test_tutorial_qwen2_plugin_passes_conformance_including_logits(tmp_path):
    pytest.importorskip("transformers", reason="the tutorial compares logits with transformers' Qwen2")
    site = tmp_path / "site"
    pip_install_target(TUTORIAL, site)
    tests = run_plugin_tests(TUTORIAL / "tests", env_with(site), tmp_path)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert "skipped" not in tests.stdout.splitlines()[-1], "the logits check must run, not skip"


def test_new_plugin_refuses_bad_names_and_existing_directories(tmp_path):
    from trtlm.scaffold import new_plugin

    with pytest.raises(UserError, match="lower case"):
        new_plugin("Bad-Name", tmp_path)
    new_plugin("acme", tmp_path)
    with pytest.raises(UserError, match="--force"):
        new_plugin("acme", tmp_path)
    new_plugin("acme", tmp_path, force=True)


class _InProcessFamily:
    """A family plugin object registered for one test through the pytest plugin's fixture."""

    TRTLM_PLUGIN_API = 1

    @hookimpl
    def trtlm_families(self):
        from trtlm_mistral import FAMILY

        return [Family(name="inproc", hf_architectures=("InProcForCausalLM",),
                       trtllm_architecture="InProcForCausalLM", presets={"tiny": {
                           **FAMILY.presets["tiny"], "architectures": ["InProcForCausalLM"]}})]


def test_register_plugin_fixture_routes_conversion_to_the_registered_family(register_plugin, tmp_path):
    from trtlm.convert.options import ConvertOptions
    from trtlm.convert.pipeline import convert

    record = register_plugin(_InProcessFamily(), name="inproc")
    assert record.families == ["inproc"]
    result = convert(None, tmp_path / "ckpt", ConvertOptions(dummy_weights=True), family="inproc", preset="tiny")
    assert result.family == "inproc"
    assert result.config["architecture"] == "InProcForCausalLM"


def test_isolated_registry_has_only_the_builtin_defaults(isolated_registry):
    from trtlm.plugins import get_registry

    assert get_registry() is isolated_registry
    assert [r.name for r in isolated_registry.records] == ["builtin"]
    assert isolated_registry.families == {}
