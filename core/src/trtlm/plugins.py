"""The process-wide plugin registry, and the public names of the plugin machinery.

Three modules, one job each: :mod:`trtlm.discovery` finds and loads the
``trtlm.families`` entry points (each inside its own error boundary, honouring
``TRTLM_PLUGINS`` / ``TRTLM_DISABLE_PLUGINS`` / ``TRTLM_STRICT_PLUGINS``),
:mod:`trtlm.registry` holds the loaded plugins and routes a model to its family,
and this module keeps the one registry a process uses: loading is idempotent and
cheap (no torch), so every worker process of a multi-process run calls
:func:`get_registry` and gets the same plugins.  The names of the other two modules
are re-exported here, so ``from trtlm.plugins import Registry`` keeps working.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

from trtlm.discovery import (  # noqa: F401  (re-exported)
    ENTRY_POINT_GROUP,
    PluginEntryPoint,
    discover_entry_points,
    load_registry,
    skip_reason,
    strict_mode,
)
from trtlm.registry import (  # noqa: F401  (re-exported)
    BUILTIN_NAME,
    KNOWN_FAMILIES,
    FamilyEntry,
    FamilyHooks,
    PluginRecord,
    Registry,
    describe_error,
)

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
