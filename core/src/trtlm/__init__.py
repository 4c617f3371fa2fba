"""trtlm: Hugging Face LLM checkpoints to TensorRT-LLM checkpoints and engines.

The core is small on purpose: hook specifications (:mod:`trtlm.hookspecs`),
plugin discovery (:mod:`trtlm.plugins`), the conversion pipeline, a portable
PyTorch runtime and the ``trtlm`` command line.  Model families live in
separate distributions registered under the ``trtlm.families`` entry point.

Importing this package is cheap: nothing here imports torch until a
conversion or a runtime object is actually used.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

__version__ = "0.1.0"

#: Version of the plugin API.  A plugin declares the version it was written
#: against (``TRTLM_PLUGIN_API = 1`` in its entry-point module); the loader
#: refuses plugins whose major version differs.  See docs/plugin-guide.md.
PLUGIN_API_VERSION = 1

hookimpl = pluggy.HookimplMarker("trtlm")

from trtlm.family import Capabilities, Family  # noqa: E402  (cheap, no torch)

if TYPE_CHECKING:  # pragma: no cover
    from trtlm.api import LLM

__all__ = ["Capabilities", "Family", "LLM", "PLUGIN_API_VERSION", "__version__", "hookimpl"]


def __getattr__(name: str) -> Any:
    # LLM pulls in torch; load it only when someone asks for it.
    if name == "LLM":
        from trtlm.api import LLM

        return LLM
    raise AttributeError(f"module 'trtlm' has no attribute {name!r}")
