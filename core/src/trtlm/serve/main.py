"""``trtlm serve``'s entry: the HTTP process, which starts the engine's rank processes."""
from __future__ import annotations

import os
from pathlib import Path

from trtlm.errors import UserError
from trtlm.serve.server import ServeConfig, run_server


def serve_main(config: ServeConfig, launch: str = "auto") -> None:
    """``trtlm serve``: HTTP in this process, the engine in one process per rank (``--launch single``:
    a multi-rank engine merged into one)."""
    config.validate()
    if config.engine_dir is not None:
        from trtlm.runtime.launch import engine_world_size

        world = engine_world_size(Path(config.engine_dir))
    else:
        world = 1
    if launch == "multi" and world == 1:
        raise UserError("--launch multi: this engine has one rank")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_server(config, world_size=1 if launch == "single" else world)
