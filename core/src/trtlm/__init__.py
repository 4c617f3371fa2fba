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

__version__ = "0.1.0"

#: Version of the plugin API.  A plugin declares the version it was written
#: against (``TRTLM_PLUGIN_API = 1`` in its entry-point module); the loader
#: refuses plugins whose major version differs.  See docs/plugin-guide.md.
PLUGIN_API_VERSION = 1

if TYPE_CHECKING:  # pragma: no cover
    import pluggy

    from trtlm.api import LLM, DistributedLLM
    from trtlm.family import Capabilities, Family
    from trtlm.runtime.engine import Engine, EngineConfig
    from trtlm.runtime.sampling import SamplingParams

    hookimpl: pluggy.HookimplMarker

__all__ = ["Capabilities", "DistributedLLM", "Engine", "EngineConfig", "Family", "LLM", "PLUGIN_API_VERSION",
           "SamplingParams", "__version__", "hookimpl"]


def __getattr__(name: str) -> Any:
    # Everything here is loaded on first use: LLM pulls in torch, and even pluggy and the
    # Family dataclasses are measurable in `trtlm --version` (docs/benchmarks.md, "CLI start-up").
    if name in ("LLM", "DistributedLLM"):
        from trtlm import api

        return getattr(api, name)
    if name in ("Engine", "EngineConfig"):
        from trtlm.runtime import engine

        return getattr(engine, name)
    if name == "SamplingParams":
        from trtlm.runtime.sampling import SamplingParams

        return SamplingParams
    if name == "hookimpl":
        import pluggy

        globals()["hookimpl"] = marker = pluggy.HookimplMarker("trtlm")
        return marker
    if name in ("Capabilities", "Family"):
        from trtlm import family

        globals().update(Capabilities=family.Capabilities, Family=family.Family)
        return globals()[name]
    raise AttributeError(f"module 'trtlm' has no attribute {name!r}")
