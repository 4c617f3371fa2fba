"""Device names: ``cpu``, ``cuda``, ``cuda:N``.

A misspelled device (``--device cdua``) or one this machine lacks (``--device cuda`` without a
visible GPU, ``cuda:3`` on a two-GPU host) is a one-line :class:`~trtlm.errors.UserError` naming it
and what is available, instead of torch's ``RuntimeError``/``AssertionError`` from deep inside
loading.  :func:`check_device_name` does not import torch (the CLI checks spelling while parsing);
:func:`resolve_device` does, and is what the runtime calls before placing anything.
"""
from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING

from trtlm.errors import UserError

if TYPE_CHECKING:
    import torch

KNOWN = ("cpu", "cuda")
_NAME = re.compile(r"^(?P<type>[a-z]+)(?::(?P<index>\d+))?$")


def check_device_name(name: str, flag: str = "--device") -> str:
    """``name`` normalised (``"CUDA:0"`` -> ``"cuda:0"``) if it is spelled as a device trtlm runs on."""
    text = str(name).strip().lower()
    m = _NAME.match(text)
    if m is None or m.group("type") not in KNOWN or (m.group("type") == "cpu" and m.group("index")):
        guess = difflib.get_close_matches((m.group("type") if m else text), KNOWN, n=1)
        hint = f"did you mean {guess[0]!r}? " if guess else ""
        raise UserError(f"{flag} {name!r}: not a device; {hint}use cpu, cuda or cuda:N")
    return text


def resolve_device(name: "str | torch.device", flag: str = "--device") -> "torch.device":
    """The ``torch.device`` for ``name``, checked to exist on this machine.

    :raises UserError: misspelled name, no visible CUDA GPU, or a GPU index beyond the visible ones.
    """
    import torch

    if isinstance(name, torch.device):
        name = str(name)
    text = check_device_name(name, flag)
    dev = torch.device(text)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UserError(f"{flag} {name}: {why} (torch {torch.__version__}); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise UserError(f"{flag} {name}: only {count} CUDA GPU(s) visible (cuda:0..cuda:{count - 1})")
    return dev

