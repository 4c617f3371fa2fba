"""pytest plugin registered through the ``pytest11`` entry point: fixtures for plugin authors."""
from __future__ import annotations
