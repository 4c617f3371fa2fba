"""Errors a user can fix.

A :class:`UserError` is printed by the CLI as one line (``error: ...``) and
exits non-zero; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the file, tensor or flag and the fix."""


class PluginError(UserError):
    """A plugin could not be loaded, or conflicts with another."""
