"""Megatron's ``model_optim_rng.pt`` files: written one tensor at a time, read without running code.

Megatron-LM saves each rank with ``torch.save`` (a zip archive: ``data.pkl``
holding the object structure, one ``data/<key>`` record per tensor storage).
``torch.save`` needs every tensor in memory at once; :class:`TorchFileWriter`
writes the same archive through torch's own zip writer but pickles the
structure first, from shapes and dtypes only, and then writes each storage
record as its tensor is produced, so memory holds one tensor.

:func:`load_rank_file` reads with ``torch.load(weights_only=True, mmap=True)``:
tensors stay on the memory-mapped file and the unpickler constructs nothing
but tensors, containers, primitives and the few classes allowed here, each
allowed only inside this call (``torch.serialization.safe_globals``):
``argparse.Namespace`` (Megatron's ``args``), ``io.BytesIO``/``bytes``
(Transformer Engine's ``_extra_state`` in older TE), and inert stand-ins for
``megatron.*`` globals (the enums ``args`` holds, such as
``megatron.core.enums.ModelType``): the stand-in records the name and value
and never imports or calls Megatron.  Anything else is refused in one line.
"""
from __future__ import annotations

import argparse
import io
import pickle
import sys
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trtlm.errors import UserError

#: The zip writer torch.save itself uses (torch._C.PyTorchFileWriter).
_ALIGN_RECORD = ".storage_alignment"


class MegatronGlobal(str):
    """An inert stand-in for a ``megatron.*`` global found in a checkpoint (an enum value of
    ``args``): a string such as ``"megatron.core.enums.ModelType(1)"``."""


def _standin(name: str) -> Callable[..., MegatronGlobal]:
    def make(*args: Any) -> MegatronGlobal:
        return MegatronGlobal(f"{name}({', '.join(map(repr, args))})")

    make.__name__ = name.rsplit(".", 1)[-1]
    return make


def _unsupported_global(exc: Exception) -> str | None:
    """The ``module.Name`` torch's weights-only unpickler refused, if that is the error."""
    for line in str(exc).splitlines():
        marker = "Unsupported global: GLOBAL "
        if marker in line:
            return line.split(marker, 1)[1].split()[0]
    return None


def _reason(exc: Exception) -> str:
    """The one informative line of torch.load's multi-line error (which global, or what failed)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip().split(". Please use")[0]
    for line in lines:
        if "GLOBAL" in line or "Unsupported global" in line:
            return line.rstrip(".")
    return lines[-1] if lines else type(exc).__name__


def load_rank_file(path: Path) -> dict[str, Any]:
    """``torch.load`` one Megatron rank file safely (see the module docstring); tensors are mmapped."""
    allowed: list[Any] = [argparse.Namespace, io.BytesIO, bytes]
    seen: set[str] = set()
    while True:
        try:
            with torch.serialization.safe_globals(allowed):
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            break
        except FileNotFoundError:
            raise UserError(f"{path}: missing") from None
        except pickle.UnpicklingError as exc:
            name = _unsupported_global(exc)
            if name and name.startswith("megatron.") and name not in seen and len(seen) < 64:
                seen.add(name)
                allowed.append((_standin(name), name))
                continue
            raise UserError(f"{path}: refused: it holds more than tensors and Megatron's args "
                            f"({_reason(exc)}); trtlm loads Megatron files with weights_only=True only") from None
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise UserError(f"{path}: not a readable torch checkpoint ({_reason(exc)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a Megatron checkpoint (holds a {type(data).__name__}, not a dict)")
    return data


class _StorageRef:
    """A storage that will be written later: pickled as torch.save pickles a storage."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles as a contiguous CPU tensor over a :class:`_StorageRef` (what ``Tensor.__reduce_ex__`` emits)."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol: int):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.append(acc)
            acc *= d
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, torch.Size(self.shape), tuple(reversed(stride)), False, OrderedDict()))


class TorchFileWriter:
    """A ``torch.save``-compatible file whose tensors are written one at a time.

    :param path: the file to create.
    :param obj: the object to save, where each tensor is a placeholder from
        :meth:`tensor` (call :meth:`tensor` for all of them first).
    Use: ``w = TorchFileWriter(path)``; ``ph = w.tensor(shape, dtype)`` for
    every tensor; ``w.start(obj)``; then ``w.write(ph, tensor)`` for every
    placeholder, in any order; ``w.close()`` (checks none is missing).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._refs: dict[str, _StorageRef] = {}
        self._written: set[str] = set()
        self._zip: Any = None

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> _TensorRef:
        numel = 1
        for d in shape:
            numel *= int(d)
        ref = _StorageRef(str(len(self._refs)), dtype, numel)
        self._refs[ref.key] = ref
        return _TensorRef(ref, tuple(int(d) for d in shape))

    def start(self, obj: Any) -> None:
        from torch.serialization import _get_storage_alignment

        storage_types = torch.storage._dtype_to_storage_type_map()

        class Pickler(pickle.Pickler):
            def persistent_id(self, o: Any):
                if isinstance(o, _StorageRef):
                    return ("storage", getattr(torch, storage_types[o.dtype]), o.key, "cpu", o.numel)
                return None

        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(obj)
        data = buf.getvalue()
        align = _get_storage_alignment()
        self._zip = torch._C.PyTorchFileWriter(str(self.path), True, align)
        self._zip.write_record("data.pkl", data, len(data))
        self._zip.write_record(".format_version", "1", 1)
        self._zip.write_record(_ALIGN_RECORD, str(align), len(str(align)))
        self._zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))

    def write(self, ref: _TensorRef, value: torch.Tensor) -> None:
        st = ref.storage
        if tuple(value.shape) != ref.shape or value.dtype != st.dtype:
            raise ValueError(f"{self.path}: tensor {st.key} planned as {st.dtype} {list(ref.shape)}, "
                             f"got {value.dtype} {list(value.shape)}")
        value = value.detach().to("cpu").contiguous()
        nbytes = value.numel() * value.element_size()
        storage = value.untyped_storage()
        if value.storage_offset() or storage.nbytes() != nbytes:
            value = value.clone()
            storage = value.untyped_storage()
        self._zip.write_record(f"data/{st.key}", storage, nbytes)
        self._written.add(st.key)

    def close(self) -> None:
        missing = set(self._refs) - self._written
        if missing:
            raise ValueError(f"{self.path}: {len(missing)} tensors were never written")
        self._zip.write_end_of_file()
        self._zip = None
