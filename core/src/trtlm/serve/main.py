"""``trtlm serve``'s entry: one server process, or one process per rank for a multi-rank engine."""
from __future__ import annotations

import os
from pathlib import Path

from trtlm.errors import UserError
from trtlm.serve.server import ServeConfig, run_server


def serve_main(config: ServeConfig, launch: str = "auto") -> None:
    """``trtlm serve``: one process, or one per rank for a multi-rank engine (rank 0 serves)."""
    config.validate()
    if config.engine_dir is not None:
        from trtlm.runtime.launch import engine_world_size

        world = engine_world_size(Path(config.engine_dir))
    else:
        world = 1
    if world > 1 and launch != "single":
        from trtlm.serve.ranks import serve_ranks  # rank 0 of those runs run_server itself

        serve_ranks(config, world)
        return
    if launch == "multi" and world == 1:
        raise UserError("--launch multi: this engine has one rank")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_server(config)
