"""pytest plugin (``pytest11`` entry point ``trtlm``): fixtures for plugin authors.

* ``trtlm_registry`` — a registry built from the installed entry points, fresh for the test.
* ``isolated_registry`` — a registry with only the built-in defaults (no autoload); made the
  process-wide registry for the duration of the test.
* ``register_plugin`` — ``register_plugin(obj, name="acme")`` adds a plugin object (a module or
  class instance with hookimpls) to that isolated registry for one test and returns its record.
* ``tiny_model`` — ``tiny_model("mistral", **config_overrides)`` writes a tiny model directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest


@pytest.fixture
def trtlm_registry():
    from trtlm.plugins import load_registry

    return load_registry()


@pytest.fixture
def isolated_registry():
    import importlib

    from trtlm import __version__, plugins

    registry = plugins.Registry()
    registry.add_plugin(importlib.import_module("trtlm.builtin"), plugins.BUILTIN_NAME, "trtlm", __version__)
    with plugins.use_registry(registry):
        yield registry


@pytest.fixture
def register_plugin(isolated_registry) -> Callable[..., Any]:
    def register(plugin: object, name: str = "test-plugin", distribution: str = "test", version: str = "0"):
        record = isolated_registry.add_plugin(plugin, name, distribution, version)
        if record.status != "ok":
            raise AssertionError(f"plugin {name} failed to register: {record.error}")
        return record

    return register


@pytest.fixture
def tiny_model(tmp_path) -> Callable[..., Path]:
    from trtlm.testing.models import make_tiny_model

    counter = [0]

    def make(family: str, **overrides: Any) -> Path:
        counter[0] += 1
        return make_tiny_model(family, tmp_path / f"{family}-{counter[0]}", overrides or None)

    return make
