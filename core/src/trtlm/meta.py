"""``cat`` and ``stack`` that stay cheap on the meta device.

Conversion plans compute every output shape on the meta device before any
weight is read.  Most meta kernels are C++, but ``torch.cat`` and
``torch.stack`` are implemented in Python (``torch._meta_registrations``),
and their first use imports ``torch._dynamo``, ``torch._decomp`` and sympy:
3-5 s of every ``trtlm convert`` (measured on a 2-core machine), for a
shape that is a sum.  These helpers compute that shape directly for meta
tensors and call torch for real ones, so they can replace ``torch.cat`` /
``torch.stack`` in any code that runs on both.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _result_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    import torch

    return functools.reduce(torch.promote_types, (t.dtype for t in tensors))


def cat(tensors: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """``torch.cat``; on meta tensors the result's shape and dtype without torch's Python meta kernel."""
    import torch

    tensors = list(tensors)
    if not tensors or not all(t.is_meta for t in tensors):
        return torch.cat(tensors, dim=dim)
    ref = tensors[0]
    d = dim % ref.dim()
    for t in tensors:
        if t.dim() != ref.dim() or any(a != b for i, (a, b) in enumerate(zip(t.shape, ref.shape)) if i != d):
            return torch.cat(tensors, dim=dim)  # let torch raise its own error
    shape = list(ref.shape)
    shape[d] = sum(t.shape[d] for t in tensors)
    return torch.empty(shape, dtype=_result_dtype(tensors), device="meta")


def stack(tensors: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """``torch.stack``; cheap on meta tensors like :func:`cat`."""
    import torch

    tensors = list(tensors)
    if not tensors or not all(t.is_meta for t in tensors):
        return torch.stack(tensors, dim=dim)
    ref = tensors[0]
    if any(t.shape != ref.shape for t in tensors):
        return torch.stack(tensors, dim=dim)
    shape = list(ref.shape)
    shape.insert(dim % (ref.dim() + 1), len(tensors))
    return torch.empty(shape, dtype=_result_dtype(tensors), device="meta")
