"""The collective operations the runtime needs, for one process or many.

The model calls ``comm.all_reduce`` after row-parallel products and
``comm.all_gather`` for vocabulary-parallel logits.  In one process these
are identities; :mod:`trtlm.runtime.distributed` provides the
torch.distributed implementation.
"""
from __future__ import annotations

import torch


class LocalComm:
    """World of one: every collective is the identity."""

    tp_size = 1
    tp_rank = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        return x
