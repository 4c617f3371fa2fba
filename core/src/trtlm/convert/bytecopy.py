"""Unquantized conversion as byte copies, without torch.

An unquantized conversion to the checkpoint's own dtype changes no byte: every output tensor
is a source tensor taken as is or several concatenated along rows (fused qkv), then replicated
or indexed along one dimension per rank (column-parallel rows, row-parallel columns, q/k/v
heads with KV repetition, vocabulary rows with zero padding, whole experts).  Row-major bytes
make each rank's part a list of byte ranges of the sources, so the job is what ``dd`` does:
read each source tensor once into a reused buffer (``preadv``, 16 MB at a time: a short read
means the file shrank while converting, a one-line error rather than the ``SIGBUS`` a memory
map would raise), check it for NaN/Inf on that buffer (:mod:`numpy`, in L2-sized
chunks), and write each rank's ranges out of it with ``pwritev`` at the offsets the
precomputed safetensors headers fix (:class:`~trtlm.convert.writer.RankFileWriter`).

Importing torch costs more than copying a 2.5 GB checkpoint, so nothing here imports it: the
plan, split rules and safetensors headers are torch-free, and the rows a rank takes come from
the split rule's own :meth:`~trtlm.layout.SplitRule.index` (no layout knowledge is repeated).
:func:`plan_copies` returns ``None`` when any tensor needs building (a dtype cast, a transform
or finalize step, a split that is not an index along one dimension, a source that is not a
safetensors file); the pipeline then uses the torch writer (:mod:`trtlm.convert.execute`).
"""
from __future__ import annotations

import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtlm import dtypes
from trtlm.convert.plan import ConversionPlan, RankPlan, TensorSpec, concat_rows, take_first
from trtlm.convert.writer import RankFileWriter
from trtlm.errors import UserError
from trtlm.mapping import Mapping

#: Elements per NaN/Inf check step: small enough that the scratch array stays in L2.
_CHECK_CHUNK = 1 << 16
#: Bytes of a tensor read, checked and written at a time (one such buffer per worker): 16 MB, as
#: `dd bs=16M`; a buffer half the size of L3 keeps the two copies cache-friendly (64 MB was slower).
WINDOW = 16 << 20


@dataclass
class RankPart:
    """One rank's part of a tensor: its name in the rank file and where its bytes come from."""

    rank: int
    name: str
    shape: tuple[int, ...]
    pieces: list[tuple[int, int, int]]  #: (offset in the part, offset in the full tensor, nbytes)


@dataclass
class TensorCopy:
    """One output tensor: its sources' byte spans, concatenated, and every rank's ranges of them."""

    spec: TensorSpec
    dtype: dtypes.DType
    sources: list[tuple[str, Path, int, int]]  #: (HF name, file, offset, nbytes)
    parts: list[RankPart] = field(default_factory=list)


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """``(first, count)`` of each run of consecutive indices (``-1`` runs are padding)."""
    if not indices:
        return []
    first = indices[0]
    if first != -1 and indices == list(range(first, first + len(indices))):  # one run (compared in C)
        return [(first, len(indices))]
    runs: list[tuple[int, int]] = []
    start, count = first, 1
    for i in indices[1:]:
        if (i == -1 and start == -1) or (i != -1 and start != -1 and i == start + count):
            count += 1
        else:
            runs.append((start, count))
            start, count = i, 1
    runs.append((start, count))
    return runs


def _pieces(shape: tuple[int, ...], dim: int, indices: list[int], itemsize: int) -> list[tuple[int, int, int]]:
    """Byte ranges of a row-major tensor of ``shape`` indexed along ``dim`` by ``indices``:
    ``(offset in the part, offset in the full tensor, nbytes)``, adjacent ranges merged;
    padding (``-1``) leaves a gap in the part (zero bytes)."""
    outer = math.prod(shape[:dim])
    inner = math.prod(shape[dim + 1:]) * itemsize
    size = shape[dim]
    runs = _runs(indices)
    if len(runs) == 1 and runs[0][0] != -1:  # one block per outer row: the common split cases
        first, count = runs[0]
        n = count * inner
        if count == size or outer == 1:  # the whole tensor, or one block of rows
            return [(0, first * inner, outer * n)]
        return [(o * n, (o * size + first) * inner, n) for o in range(outer)]
    out: list[tuple[int, int, int]] = []
    pos = 0
    for o in range(outer):
        for first, count in runs:
            n = count * inner
            if first != -1:
                src = (o * size + first) * inner
                if out and out[-1][0] + out[-1][2] == pos and out[-1][1] + out[-1][2] == src:
                    last = out[-1]
                    out[-1] = (last[0], last[1], last[2] + n)
                else:
                    out.append((pos, src, n))
            pos += n
    return out


def _tensor_copy(spec: TensorSpec, targets: list[tuple[RankPlan, Any]], source: Any, mapping: Mapping,
                 dtype: dtypes.DType) -> TensorCopy | None:
    if spec.transform is not None or spec.finalize is not None:
        return None
    if spec.combine is take_first:
        names = spec.sources[:1]
    elif spec.combine is concat_rows:
        names = spec.sources
    else:
        return None
    target = dtypes.lookup(spec.dtype) if spec.dtype is not None else dtype
    if target is None or (target.is_float and target.float_bits is None):
        return None  # float8: the torch path checks it
    shapes = [tuple(source.shape(n)) for n in names]
    if any(source.dtype_name(n) != target.name for n in names):
        return None  # a cast
    if len(names) > 1 and (any(len(s) == 0 for s in shapes) or len({s[1:] for s in shapes}) != 1):
        return None
    full = (sum(s[0] for s in shapes), *shapes[0][1:]) if len(names) > 1 else shapes[0]
    copy = TensorCopy(spec, target, [(n, *source.span(n)) for n in names])
    view = full if full else (1,)
    for rp, rt in targets:
        try:
            index = rt.split.index(view, mapping, rp.tp_rank)
        except ValueError as exc:
            raise UserError(f"cannot split {spec.name} {full} for tp={mapping.tp_size}: {exc}") from None
        if index is None:
            return None
        dim, indices = index
        shape = list(view)
        shape[dim] = len(indices)
        part_shape = tuple(shape) if full else ()
        copy.parts.append(RankPart(rp.rank, rt.name, part_shape, _pieces(view, dim, indices, target.itemsize)))
    return copy


def plan_copies(plan: ConversionPlan, rank_plans: list[RankPlan], mapping: Mapping, source: Any,
                dtype: str) -> list[TensorCopy] | None:
    """Every tensor of the rank plans as byte copies, or ``None`` when one of them needs torch."""
    if not all(hasattr(source, attr) for attr in ("span", "dtype_name")):
        return None
    targets: dict[str, list[tuple[RankPlan, Any]]] = {}
    for rp in rank_plans:
        for rt in rp.tensors:
            targets.setdefault(rt.spec.name, []).append((rp, rt))
    entry = dtypes.get(dtype)
    copies = []
    for spec in plan.tensors:
        if spec.name not in targets:
            continue
        copy = _tensor_copy(spec, targets[spec.name], source, mapping, entry)
        if copy is None:
            return None
        copies.append(copy)
    return copies


def all_finite(data: memoryview, dtype: dtypes.DType, scratch: dict[str, Any]) -> bool:
    """No NaN or Inf among the elements in ``data``: the exponent bits of each element,
    masked in L2-sized chunks (``max(x & magnitude) >= exponent`` finds any all-ones exponent)."""
    if dtype.float_bits is None or not len(data):
        return True
    import numpy as np

    exponent, magnitude = dtype.float_bits
    uint = {2: np.uint16, 4: np.uint32, 8: np.uint64}[dtype.itemsize]
    values = np.frombuffer(data, dtype=uint)
    tmp = scratch.get(uint)
    if tmp is None:
        tmp = scratch[uint] = np.empty(_CHECK_CHUNK, dtype=uint)
    mask = uint(magnitude)
    for start in range(0, values.size, _CHECK_CHUNK):
        chunk = values[start:start + _CHECK_CHUNK]
        out = tmp[: chunk.size]
        np.bitwise_and(chunk, mask, out=out)
        if int(out.max()) >= exponent:
            return False
    return True


class _Files:
    """Read-only descriptors of the source files, opened once."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
                except OSError as exc:
                    raise UserError(f"{path}: cannot read ({exc.strerror})") from None
            return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _read(fd: int, path: Path, name: str, offset: int, into: memoryview) -> None:
    done = 0
    while done < len(into):
        n = os.preadv(fd, [into[done:]], offset + done)
        if n == 0:
            raise UserError(f"{path}: truncated while converting (tensor {name} ends at byte "
                            f"{offset + len(into)}, the file has {os.fstat(fd).st_size}); re-download it")
        done += n


def write_checkpoint(copies: list[TensorCopy], world_size: int, out: Path, origin: str, workers: int = 1,
                     check_finite: bool = True, progress: bool = False, window: int = WINDOW) -> tuple[int, int]:
    """Write ``rank{r}.safetensors`` for every rank into ``out`` (an empty directory) from the
    byte copies of :func:`plan_copies`.  Returns ``(tensors, bytes)`` written.

    Each tensor passes through one reused buffer of ``window`` bytes per worker, a window at a
    time, so memory does not grow with the size of a tensor (a 128k-vocabulary embedding)."""
    window = max(window - window % 8, 8)  # whole elements of every dtype
    layouts: list[dict[str, tuple[tuple[int, ...], str]]] = [{} for _ in range(world_size)]
    total = 0
    for copy in copies:
        for part in copy.parts:
            layouts[part.rank][part.name] = (part.shape, copy.dtype.name)
            total += math.prod(part.shape) * copy.dtype.itemsize
    writers = [RankFileWriter(out / f"rank{r}.safetensors", layouts[r], metadata={"format": "pt"})
               for r in range(world_size)]
    files = _Files()
    local = threading.local()

    def convert_one(copy: TensorCopy) -> None:
        buf: bytearray | None = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = bytearray(window)
            local.scratch = {}
        starts = [0]
        for src in copy.sources:
            starts.append(starts[-1] + src[3])
        total_bytes = starts[-1]
        for w0 in range(0, max(total_bytes, 1), window):  # the tensor's bytes, one window at a time
            w1 = min(w0 + window, total_bytes)
            view = memoryview(buf)[: w1 - w0]
            for (name, path, offset, _n), s0, s1 in zip(copy.sources, starts, starts[1:]):
                lo, hi = max(w0, s0), min(w1, s1)
                if lo >= hi:
                    continue
                chunk = view[lo - w0:hi - w0]
                _read(files.fd(path), path, name, offset + lo - s0, chunk)
                if check_finite and not all_finite(chunk, copy.dtype, local.scratch):
                    raise UserError(f"{origin}: tensor {name} contains NaN or Inf values")
            last = w1 >= total_bytes
            for part in copy.parts:
                pieces = [(at + lo - src, view[lo - w0:hi - w0]) for at, src, n in part.pieces
                          if (lo := max(src, w0)) < (hi := min(src + n, w1))]
                writers[part.rank].write_gather(part.name, pieces, last=last)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(copies), unit="tensor", desc="convert", file=sys.stderr)
    try:
        if workers <= 1:
            for copy in copies:
                convert_one(copy)
                if bar:
                    bar.update()
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                pending = []
                for copy in copies:  # bounded in flight: one buffer per worker, a few queued
                    pending.append(pool.submit(convert_one, copy))
                    if len(pending) >= 2 * workers:
                        pending.pop(0).result()
                        if bar:
                            bar.update()
                for f in pending:
                    f.result()
                    if bar:
                        bar.update()
        for w in writers:
            w.close()
    finally:
        for w in writers:
            w.discard()
        files.close()
        if bar:
            bar.close()
    return sum(len(c.parts) for c in copies), total
