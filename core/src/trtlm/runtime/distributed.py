"""Placing a network on one rank of a (tp, pp) mapping."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trtlm.convert.mapping import Mapping
from trtlm.runtime.comm import LocalComm


@dataclass
class ShapeComm(LocalComm):
    """A rank's identity without collectives: enough to give modules their local shapes."""

    tp_size: int = 1
    tp_rank: int = 0


def rank_network(hooks, config: dict[str, Any], mapping: Mapping, rank: int, options: Any,
                 device: Any = "meta", comm: Any = None, dtype: Any = None):
    """The torch network of ``rank``: its tensor-parallel shapes and its pipeline stage's layers."""
    factory = hooks.trtlm_build_network(config=config, backend="torch", options=options)
    tp_rank, pp_rank = mapping.tp_rank(rank), mapping.pp_rank(rank)
    layers = mapping.stage_layers(pp_rank, int(config["num_hidden_layers"]))
    comm = comm or ShapeComm(mapping.tp_size, tp_rank)
    return factory(comm=comm, mapping=mapping, layers=layers, first=pp_rank == 0,
                   last=pp_rank == mapping.pp_size - 1, device=device, dtype=dtype)
