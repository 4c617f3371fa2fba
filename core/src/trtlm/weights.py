"""Lazy tensor sources: the one interface every weight reader implements.

A converter must never hold a whole model in memory, so weights travel as a
*source* that knows every tensor's name, shape and dtype up front and reads
one tensor's data only when asked.  Safetensors files, FasterTransformer
``.bin`` directories, pickle checkpoints and dummy (random) weights all
implement :class:`TensorSource`; everything downstream (mapping, quantizing,
sharding, writing) sees only this protocol.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    import torch


@runtime_checkable
class TensorSource(Protocol):
    """Read-only, lazy mapping from tensor name to tensor."""

    def keys(self) -> list[str]:
        """All tensor names, in a stable order."""

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of ``name`` without reading its data."""

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of ``name`` without reading its data."""

    def get(self, name: str) -> torch.Tensor:
        """Read ``name`` (a fresh CPU tensor the caller may keep)."""


def iter_tensors(source: TensorSource) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` pairs one at a time."""
    for name in source.keys():
        yield name, source.get(name)


class LoadedModel:
    """A model opened by ``trtlm_load_weights``: its HF config and a lazy source.

    :param hf_config: the Hugging Face ``config.json`` dict.
    :param source: tensors by Hugging Face name.
    :param origin: a human-readable description (path, "dummy", ...), used in
        messages and in the cache key of ``trtlm run --model-dir``.
    """

    def __init__(self, hf_config: dict, source: TensorSource, origin: str) -> None:
        self.hf_config = hf_config
        self.source = source
        self.origin = origin

    def __repr__(self) -> str:
        return f"LoadedModel({self.origin!r}, {len(self.source.keys())} tensors)"

    def require(self, shapes: Iterable[tuple[str, Sequence[int], str]]) -> None:
        """Every ``(name, shape, needed_for)`` is a tensor of the source with that shape (the shape
        config.json implies); else the one-line :class:`~trtlm.errors.UserError` naming the tensor."""
        from trtlm.errors import UserError

        have = set(self.source.keys())
        for name, shape, needed_for in shapes:
            if name not in have:
                raise UserError(f"{self.origin}: tensor {name} is missing (needed for {needed_for})")
            actual = tuple(self.source.shape(name))
            if actual != tuple(shape):
                raise UserError(f"{self.origin}: tensor {name} has shape {list(actual)} but config.json "
                                f"implies {list(shape)}; the config and the weights do not match")
