"""Streaming safetensors writer.

The header of a safetensors file lists every tensor's dtype, shape and byte
range.  A conversion plan knows all of these before reading any weight, so
each rank file is created at its final size with its header in place, and
tensors are then written at their offsets (``os.pwrite``) in any order, by
any number of worker threads, one tensor in memory per worker.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

ST_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


class RankFileWriter:
    """One ``rank{r}.safetensors`` being written at precomputed offsets."""

    def __init__(self, path: Path, layout: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None) -> None:
        header: dict[str, object] = {}
        offset = 0
        self._offsets: dict[str, tuple[int, int, tuple[int, ...], torch.dtype]] = {}
        for name in sorted(layout):
            shape, dtype = layout[name]
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": ST_DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._offsets[name] = (offset, nbytes, shape, dtype)
            offset += nbytes
        if metadata:
            header["__metadata__"] = metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._base = 8 + len(blob)
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, len(blob).to_bytes(8, "little") + blob, 0)
        os.ftruncate(self._fd, self._base + offset)
        self._pending = set(layout)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        offset, nbytes, shape, dtype = self._offsets[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise AssertionError(f"{name}: planned {shape} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data)
        written = 0
        while written < nbytes:
            written += os.pwrite(self._fd, view[written:], self._base + offset + written)
        self._pending.discard(name)

    def close(self) -> None:
        if self._pending:
            raise AssertionError(f"{self.path}: tensors never written: {sorted(self._pending)[:3]}")
        os.fsync(self._fd)
        os.close(self._fd)
