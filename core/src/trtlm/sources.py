"""Tensor sources for Hugging Face directories: safetensors, pickle, dummy.

torch is imported only when a tensor is built (``get``): opening a safetensors checkpoint and
reading its names, shapes, dtypes and byte spans is torch-free, which is what the byte-copying
conversion (:mod:`trtlm.convert.bytecopy`) needs."""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trtlm import dtypes
from trtlm.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and sanity-check a safetensors header without reading tensor data."""
    return _read_header(path)[0]


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header (``__metadata__`` removed) and the file offset where tensor data begins."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise UserError(f"{path}: not a safetensors file (shorter than 8 bytes); re-download or re-save it")
            (n,) = struct.unpack("<Q", head)
            if n > 100 << 20:
                raise UserError(f"{path}: corrupt safetensors header (length {n}); re-download or re-save it")
            if n > size - 8:
                raise UserError(f"{path}: truncated ({size} bytes, its header alone needs {8 + n}); re-download it")
            header = json.loads(f.read(n))
        if not isinstance(header, dict) or not all(
                isinstance(v, dict) and "data_offsets" in v for k, v in header.items() if k != "__metadata__"):
            raise ValueError("not a tensor table")
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise UserError(f"{path}: corrupt safetensors header; re-download or re-save it") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise UserError(f"{path}: truncated ({size} bytes, header needs {8 + n + end}); re-download it")
    return header, 8 + n


class SafetensorsSource:
    """Tensors from one or more safetensors files, read lazily one at a time.

    Each file is memory-mapped once (private, copy-on-write) and ``get``
    returns a tensor *on the mapping*: no copy is made, reading the data
    faults in page-cache pages (file-backed memory the kernel can drop, not
    anonymous memory), and a row block of it is written out straight from the
    page cache.  Writing to a returned tensor copies only the touched pages
    and never changes the file.
    """

    def __init__(self, files: dict[str, Path]) -> None:
        """:param files: tensor name -> file holding it."""
        self._file_of = files
        self._meta: dict[str, tuple[tuple[int, ...], dtypes.DType]] = {}
        self._offset: dict[str, int] = {}
        for path in sorted(set(files.values())):
            header, base = _read_header(path)
            for name, info in header.items():
                if files.get(name) == path:
                    dt = dtypes.BY_ST.get(info["dtype"])
                    if dt is None:
                        raise UserError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
                    shape = tuple(int(d) for d in info["shape"])
                    start, end = (int(o) for o in info["data_offsets"])
                    if end - start != math.prod(shape) * dt.itemsize:
                        raise UserError(f"{path}: corrupt safetensors header: tensor {name}'s byte range "
                                        f"[{start}, {end}) does not hold {info['dtype']} {list(shape)}")
                    self._meta[name] = (shape, dt)
                    self._offset[name] = base + start
        missing = sorted(set(files) - set(self._meta))
        if missing:
            raise UserError(f"{files[missing[0]]}: tensor {missing[0]} is listed in the index but not in the file")
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_dir(cls, model_dir: Path) -> "SafetensorsSource":
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise UserError(f"{index}: not a valid safetensors index (no weight_map)") from None
            files = {name: model_dir / fname for name, fname in weight_map.items()}
            for path in sorted(set(files.values())):
                if not path.exists():
                    raise UserError(f"{path}: shard listed in {index.name} is missing")
            return cls(files)
        single = sorted(model_dir.glob("*.safetensors"))
        if not single:
            raise UserError(f"{model_dir}: no *.safetensors files")
        files: dict[str, Path] = {}
        for path in single:
            for name in read_safetensors_header(path):
                files[name] = path
        return cls(files)

    def keys(self) -> list[str]:
        return sorted(self._meta)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return dtypes.torch_dtype(self._meta[name][1])

    def dtype_name(self, name: str) -> str:
        """``name``'s dtype as :mod:`trtlm.dtypes` names it (``"bfloat16"``), without torch."""
        return self._meta[name][1].name

    def span(self, name: str) -> tuple[Path, int, int]:
        """``(file, offset, nbytes)`` of ``name``'s bytes (row-major, little-endian)."""
        shape, dt = self._meta[name]
        return self._file_of[name], self._offset[name], math.prod(shape) * dt.itemsize

    def _map(self, path: Path) -> mmap.mmap:
        with self._lock:
            mm = self._maps.get(path)
            if mm is None:
                try:
                    with open(path, "rb") as f:
                        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                except (OSError, ValueError) as exc:
                    raise UserError(f"{path}: cannot read ({exc})") from None
                self._maps[path] = mm
            return mm

    def get(self, name: str) -> torch.Tensor:
        import torch

        shape, entry = self._meta[name]
        dtype = dtypes.torch_dtype(entry)
        numel = math.prod(shape)
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        path = self._file_of[name]
        mm = self._map(path)
        end = self._offset[name] + numel * entry.itemsize
        try:  # touching mapped bytes past a shrunk file's end is SIGBUS (no Python error): check first
            size = os.stat(path).st_size
        except OSError as exc:
            raise UserError(f"{path}: cannot read while converting ({exc.strerror}); re-download it") from None
        if size < end:
            raise UserError(f"{path}: truncated while converting (tensor {name} ends at byte {end}, "
                            f"the file has {size}); re-download it")
        return torch.frombuffer(mm, dtype=dtype, count=numel, offset=self._offset[name]).view(shape)


class StateDictSource:
    """Tensors already in memory (pickle checkpoints, tests)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._t = tensors

    def keys(self) -> list[str]:
        return sorted(self._t)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._t[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._t[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self._t[name]


def load_pickle_dir(model_dir: Path) -> StateDictSource:
    """``pytorch_model*.bin`` with ``weights_only=True`` (no code runs)."""
    import torch

    files = sorted(model_dir.glob("pytorch_model*.bin"))
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            tensors.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        except Exception as exc:
            raise UserError(f"{path}: cannot load with weights_only=True ({type(exc).__name__}: "
                            f"{_pickle_reason(exc)}): it holds more than tensors; re-save it as safetensors "
                            f"where you trust it") from None
    return StateDictSource(tensors)


def _pickle_reason(exc: Exception) -> str:
    """The one informative line of torch.load's (multi-line) error, e.g.
    "Trying to load unsupported GLOBAL posix.system ..."."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported global" in line:
            return line
    return lines[0] if lines else "unreadable"


class DummySource:
    """Random weights of the shapes a plan expects, as TensorRT-LLM builds
    without a checkpoint.  Deterministic per tensor name and seed, generated on
    demand, so a 7B dummy conversion still streams."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int = 0, dtype: torch.dtype | None = None):
        self._shapes = shapes
        self._seed = seed
        self._dtype_arg = dtype

    @property
    def _dtype(self) -> torch.dtype:
        return self._dtype_arg if self._dtype_arg is not None else dtypes.torch_dtype("float32")

    def keys(self) -> list[str]:
        return sorted(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtype

    def get(self, name: str) -> torch.Tensor:
        import torch

        shape = self._shapes[name]
        if "norm" in name and len(shape) == 1:
            return torch.ones(shape, dtype=self._dtype)
        g = torch.Generator().manual_seed(self._seed * 1_000_003 + zlib.crc32(name.encode()))
        return (torch.randn(shape, generator=g) * 0.02).to(self._dtype)
