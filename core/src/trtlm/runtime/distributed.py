"""Placing a network on one rank of a (tp, pp) mapping, and running ranks as processes.

A checkpoint converted with ``tp x pp`` (and ``moe_tp x moe_ep`` inside the
tensor-parallel ranks) runs as ``world_size = tp * pp`` processes, each
loading only its own ``rank{r}.safetensors``, talking through
``torch.distributed`` (gloo on CPU, NCCL on GPU):

* tensor parallel: :class:`TorchDistComm` over the stage's tp group provides
  the ``all_reduce`` after row-parallel products (attention ``dense``, MLP
  ``proj``, the vocabulary-parallel embedding, MoE) and ``all_gather_last``
  for the vocabulary-parallel ``lm_head``.  MoE layers reduce over the same
  group: with ``tp = moe_tp * moe_ep`` every tp rank holds one (expert
  block, intermediate slice) and contributes a partial sum, so the sum over
  all tp ranks is the layer's output;
* pipeline parallel: each stage receives the hidden states from the same tp
  rank of the previous stage and sends its own to the next
  (:func:`trtlm.runtime.executor.run_step`);
* the engine (scheduler, sampling) runs on rank 0 only and broadcasts each
  step; the last stage's logits are sent to rank 0
  (:class:`trtlm.runtime.executor.DistributedExecutor`).

The process group is created by :func:`init_rank` from torchrun's
environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``) or
from the store address :mod:`trtlm.runtime.launch` gives its workers.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from trtlm.config import as_checkpoint_config
from trtlm.errors import UserError
from trtlm.mapping import Mapping
from trtlm.runtime.comm import LocalComm
from trtlm.runtime.launch import STORE_ENV, STORE_FD_ENV, RankEnv, rank_env  # noqa: F401 - RankEnv re-exported

#: Environment of the test-only fault injection (see :func:`maybe_inject_fault`).
FAULT_ENV = "TRTLM_TEST_FAULT"
DEFAULT_TIMEOUT_S = 300.0
#: Least time joining the job may take (imports and weight loading differ between ranks).
RENDEZVOUS_TIMEOUT_S = 900.0


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
    layers = mapping.stage_layers(pp_rank, as_checkpoint_config(config).num_hidden_layers)
    comm = comm or ShapeComm(mapping.tp_size, tp_rank)
    return factory(comm=comm, mapping=mapping, layers=layers, first=pp_rank == 0,
                   last=pp_rank == mapping.pp_size - 1, device=device, dtype=dtype)


# -- environment ---------------------------------------------------------------------------
def rank_device(device: str | torch.device, local_rank: int) -> torch.device:
    """``cuda`` without an index means this rank's own GPU (``LOCAL_RANK``)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        count = torch.cuda.device_count()
        if count == 0:
            raise UserError("--device cuda: no GPU is visible to this process")
        device = torch.device("cuda", local_rank % count)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def default_backend(device: torch.device) -> str:
    return os.environ.get("TRTLM_DIST_BACKEND") or ("nccl" if device.type == "cuda" else "gloo")


# -- collectives ---------------------------------------------------------------------------
class TorchDistComm:
    """Collectives over one pipeline stage's tensor-parallel group."""

    def __init__(self, group: Any, tp_size: int, tp_rank: int):
        self.group = group
        self.tp_size = tp_size
        self.tp_rank = tp_rank

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return x
        x = x.contiguous()
        torch.distributed.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dimension (rank order),
        as the vocabulary-parallel ``lm_head`` needs."""
        if self.tp_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        torch.distributed.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)


@dataclass
class RankState:
    """One rank's place in the job, its groups and neighbours."""

    mapping: Mapping
    rank: int
    device: torch.device
    comm: Any
    group: Any = None  #: all ranks, with the collective timeout (pipeline send/recv, token broadcast)
    backend: str = "gloo"

    @property
    def p2p_via_cpu(self) -> bool:
        """gloo sends and receives only CPU tensors (its collectives do take CUDA tensors)."""
        return self.backend == "gloo" and self.device.type != "cpu"

    @property
    def world_size(self) -> int:
        return self.mapping.world_size

    @property
    def tp_rank(self) -> int:
        return self.mapping.tp_rank(self.rank)

    @property
    def pp_rank(self) -> int:
        return self.mapping.pp_rank(self.rank)

    @property
    def first(self) -> bool:
        return self.pp_rank == 0

    @property
    def last(self) -> bool:
        return self.pp_rank == self.mapping.pp_size - 1

    @property
    def prev_rank(self) -> int:
        """Same tp rank, previous stage (its hidden states are this rank's input)."""
        return self.rank - self.mapping.tp_size

    @property
    def next_rank(self) -> int:
        return self.rank + self.mapping.tp_size

    @property
    def sampling_rank(self) -> int:
        """Tp rank 0 of the last stage: the one rank that samples."""
        return (self.mapping.pp_size - 1) * self.mapping.tp_size

    def ready(self) -> None:
        """Wait (with the long rendezvous timeout) until every rank has loaded its
        weights, so the collective timeout measures generation, not start-up skew."""
        import torch.distributed as dist

        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()


def init_rank(mapping: Mapping, env: RankEnv, device: str | torch.device = "cpu",
              timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None) -> RankState:
    """Join the job's process group and create its groups.

    ``timeout_s`` bounds every collective of generation: a rank that stops
    answering makes the others fail after that long instead of hanging.
    Joining (and :meth:`RankState.ready`) waits up to ``RENDEZVOUS_TIMEOUT_S``
    (or ``timeout_s`` when longer): ranks start and load weights at different
    speeds, and a rank that dies meanwhile is the launcher's (or torchrun's) to notice.
    """
    import torch.distributed as dist

    if env.world_size != mapping.world_size:
        raise UserError(f"the engine has world_size {mapping.world_size} (tp {mapping.tp_size} x pp "
                        f"{mapping.pp_size}) but {env.world_size} processes were started "
                        f"(use torchrun --nproc-per-node {mapping.world_size})")
    dev = rank_device(device, env.local_rank)
    backend = backend or default_backend(dev)
    timeout = timedelta(seconds=timeout_s)
    rendezvous = timedelta(seconds=max(timeout_s, RENDEZVOUS_TIMEOUT_S))
    if not dist.is_initialized():
        store = None
        if os.environ.get(STORE_ENV):  # started by trtlm.runtime.launch: rank 0 serves on the launcher's socket
            host, port = os.environ[STORE_ENV].rsplit(":", 1)
            fd = os.environ.get(STORE_FD_ENV)
            if fd is not None:
                store = dist.TCPStore(host, int(port), env.world_size, True, rendezvous, master_listen_fd=int(fd))
            else:
                store = dist.TCPStore(host, int(port), env.world_size, False, rendezvous)
        kwargs: dict[str, Any] = {"store": store} if store is not None else {"init_method": "env://"}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=rendezvous, **kwargs)
    # Groups with the collective timeout; every rank creates every group, in the same order.
    world = dist.new_group(list(range(env.world_size)), timeout=timeout)
    tp = mapping.tp_size
    group = None
    for stage in range(mapping.pp_size):
        ranks = list(range(stage * tp, (stage + 1) * tp))
        g = world if mapping.pp_size == 1 else (dist.new_group(ranks, timeout=timeout) if tp > 1 else None)
        if env.rank in ranks:
            group = g
    comm = TorchDistComm(group, tp, mapping.tp_rank(env.rank))
    return RankState(mapping, env.rank, dev, comm, world, backend)


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class RemoteError(UserError):
    """An error another rank raised and shared (this rank fails as a consequence)."""


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    """``obj`` of rank ``src`` on every rank (requests are small: prompts and settings)."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` means another rank went away (a consequence, not the cause)."""
    import torch.distributed as dist

    if isinstance(exc, (dist.DistError, RemoteError)):
        return True
    if isinstance(exc, UserError):
        return False
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out",
                            "timed out", "NCCL", "gloo"))


# -- test-only fault injection ---------------------------------------------------------------
def maybe_inject_fault(rank: int, call: int) -> None:
    """Test-only: ``TRTLM_TEST_FAULT=RANK:CALL:MODE`` makes rank ``RANK`` fail at its
    ``CALL``-th forward (1 = prefill) with MODE ``kill`` (SIGKILL itself), ``exit``
    (exit code 3 without a word), ``raise`` (a RuntimeError) or ``hang`` (sleep, so
    the others hit the collective timeout).  It exists to test that a failing rank
    stops the whole job; nothing sets it outside tests."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    try:
        r, c, mode = spec.split(":")
        r, c = int(r), int(c)
    except ValueError:
        raise UserError(f"{FAULT_ENV}={spec!r}: expected RANK:CALL:MODE (test-only)") from None
    if r != rank or c != call:
        return
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "exit":
        os._exit(3)
    elif mode == "raise":
        raise RuntimeError(f"injected fault at forward call {call} ({FAULT_ENV})")
    elif mode == "hang":
        import sys

        sys.stderr.write(f"rank {rank}: hanging at forward call {call} ({FAULT_ENV})\n")
        sys.stderr.flush()
        while True:
            time.sleep(3600)
    else:
        raise UserError(f"{FAULT_ENV}={spec!r}: MODE must be kill, exit, raise or hang")
