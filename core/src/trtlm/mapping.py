"""Parallel layout of a checkpoint, as TensorRT-LLM's ``Mapping`` defines it.

Used by conversion (sharding), quantization (group checks), the runtime (which rank holds
what) and plugins (split rules), so it lives at the top of the package, not in ``convert``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trtlm.errors import UserError


@dataclass(frozen=True)
class Mapping:
    """World = tp * pp ranks; rank r has ``tp_rank = r % tp`` and ``pp_rank = r // tp``.

    Inside MoE layers the tp ranks are further viewed as ``moe_tp x moe_ep``
    (``tp == moe_tp * moe_ep``): ``moe_ep_rank = tp_rank % moe_ep`` and
    ``moe_tp_rank = tp_rank // moe_ep``, as in TensorRT-LLM's mapping.py.
    """

    tp_size: int = 1
    pp_size: int = 1
    moe_tp_size: int = 0  #: 0 means "tp_size" (TensorRT-LLM's default)
    moe_ep_size: int = 0  #: 0 means 1

    def __post_init__(self) -> None:
        if self.tp_size < 1 or self.pp_size < 1:
            raise UserError(f"--tp-size and --pp-size must be >= 1 (got tp={self.tp_size}, pp={self.pp_size})")
        ep = self.moe_ep_size or (1 if not self.moe_tp_size else self.tp_size // self.moe_tp_size)
        mtp = self.moe_tp_size or self.tp_size // ep
        if mtp * ep != self.tp_size:
            raise UserError(
                f"--moe-tp-size {mtp} x --moe-ep-size {ep} must equal --tp-size {self.tp_size}"
            )
        object.__setattr__(self, "moe_tp_size", mtp)
        object.__setattr__(self, "moe_ep_size", ep)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp_size

    def pp_rank(self, rank: int) -> int:
        return rank // self.tp_size

    def moe_ep_rank(self, tp_rank: int) -> int:
        return tp_rank % self.moe_ep_size

    def moe_tp_rank(self, tp_rank: int) -> int:
        return tp_rank // self.moe_ep_size

    def stage_layers(self, pp_rank: int, num_layers: int) -> range:
        """Layers of a pipeline stage, ``torch.tensor_split`` style: the first
        ``num_layers % pp`` stages get one extra layer."""
        base, extra = divmod(num_layers, self.pp_size)
        start = pp_rank * base + min(pp_rank, extra)
        return range(start, start + base + (1 if pp_rank < extra else 0))

    def to_config(self, moe: bool = False) -> dict[str, Any]:
        cfg: dict[str, Any] = {"world_size": self.world_size, "tp_size": self.tp_size, "pp_size": self.pp_size}
        if moe:
            cfg.update(moe_tp_size=self.moe_tp_size, moe_ep_size=self.moe_ep_size)
        return cfg

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Mapping":
        m = config.get("mapping") or {}
        return cls(tp_size=int(m.get("tp_size", 1)), pp_size=int(m.get("pp_size", 1)),
                   moe_tp_size=int(m.get("moe_tp_size") or 0), moe_ep_size=int(m.get("moe_ep_size") or 0))
