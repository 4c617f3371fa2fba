"""Unquantized conversion as byte copies, without torch.

An unquantized conversion to the checkpoint's own dtype changes no byte: every output tensor
is a source tensor taken as is or several concatenated along rows (fused qkv), then replicated
or indexed along one dimension per rank (column-parallel rows, row-parallel columns, q/k/v
heads with KV repetition, vocabulary rows with zero padding, whole experts).  Row-major bytes
make each rank's part a list of byte ranges of the sources, so the job is what ``dd`` does, with
one copy instead of two: each shard is memory-mapped (populated up front: its page-cache pages,
no anonymous memory), each tensor is checked for NaN/Inf on the mapping (:mod:`numpy`, in
L2-sized chunks), and its ranks' ranges are copied file to file inside the kernel
(``os.copy_file_range``, what ``cp`` does) or, when short (the rows of a row-parallel split),
gathered from the mapping into one ``pwritev``, at the offsets the precomputed safetensors
headers fix (:class:`~trtlm.convert.writer.RankFileWriter`), 16 MB of the tensor at a time.
Measured on this 2-core VM (docs/benchmarks.md): reading into a buffer first as ``dd`` does, or
writing everything from an unpopulated mapping, cost 2-3x the CPU (page faults are expensive
under virtualization).
A mapped page past a shrunk file's end would be ``SIGBUS``, so each tensor's span is checked
against the file's size first: a shard overwritten while converting is the one-line error.

Importing torch costs more than copying a 2.5 GB checkpoint, so nothing here imports it: the
plan, split rules and safetensors headers are torch-free, and the rows a rank takes come from
the split rule's own :meth:`~trtlm.layout.SplitRule.index` (no layout knowledge is repeated).
:func:`plan_copies` returns ``None`` when any tensor needs building (a dtype cast, a transform
or finalize step, a split that is not an index along one dimension, a source that is not a
safetensors file); the pipeline then uses the torch writer (:mod:`trtlm.convert.execute`), which
still copies each tensor it need not build (:func:`tensor_copy`, :class:`CopyWriter`).
"""
from __future__ import annotations

import math
import mmap
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtlm import dtypes
from trtlm.convert.parallel import for_each_bounded
from trtlm.convert.plan import ConversionPlan, RankPlan, TensorSpec, by_spec, concat_rows, take_first
from trtlm.convert.writer import RankFileWriter, cannot_write, open_rank_files
from trtlm.errors import UserError
from trtlm.mapping import Mapping

#: Elements per NaN/Inf check step: small enough that the scratch array stays in L2.
_CHECK_CHUNK = 1 << 16
#: Ranges at least this long are copied file to file inside the kernel (``copy_file_range``);
#: shorter ones are gathered from the mapping into one ``pwritev``.
_KERNEL_COPY_MIN = 64 << 10
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
#: Bytes of a tensor checked and written at a time: 16 MB (as `dd bs=16M`), half the L3 cache of the
#: measuring machine, so the bytes the check just read are still cached when written.
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


def tensor_copy(spec: TensorSpec, targets: list[tuple[RankPlan, Any]], source: Any, mapping: Mapping,
                dtype: dtypes.DType) -> TensorCopy | None:
    """``spec``'s rank parts (``targets``: each rank's plan and its tensor of ``spec``) as byte ranges
    of its safetensors sources, or ``None`` when building it changes bytes: a cast, a transform or
    finalize step, a combination other than taking or row-concatenating, a split that is not an
    index along one dimension, or a source that is not a safetensors file."""
    if not all(hasattr(source, attr) for attr in ("span", "dtype_name")):
        return None
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
    targets = by_spec(rank_plans)
    entry = dtypes.get(dtype)
    copies = []
    for spec in plan.tensors:
        if spec.name not in targets:
            continue
        copy = tensor_copy(spec, targets[spec.name], source, mapping, entry)
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


class _Maps:
    """The source files, each opened and memory-mapped (read-only, shared with the page cache) once.

    ``populate``: map every page of a file up front (one system call instead of a fault per page:
    the right choice when every byte of it is copied)."""

    def __init__(self, populate: bool = True) -> None:
        self._flags = mmap.MAP_SHARED | (_POPULATE if populate else 0)
        self._maps: dict[Path, tuple[int, mmap.mmap, memoryview]] = {}
        self._lock = threading.Lock()

    def get(self, path: Path) -> tuple[int, memoryview]:
        with self._lock:
            entry = self._maps.get(path)
            if entry is None:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as exc:
                    raise UserError(f"{path}: cannot read ({exc.strerror})") from None
                try:
                    mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ, flags=self._flags)
                except (OSError, ValueError) as exc:
                    os.close(fd)
                    raise UserError(f"{path}: cannot read ({exc})") from None
                entry = self._maps[path] = (fd, mm, memoryview(mm))
            return entry[0], entry[2]

    def close(self) -> None:
        for fd, mm, view in self._maps.values():
            view.release()
            try:
                mm.close()
            except BufferError:  # a slice still referenced (an exception's traceback): the GC unmaps it
                pass
            os.close(fd)
        self._maps.clear()


def _require(fd: int, path: Path, name: str, end: int) -> None:
    """The file still holds ``name``'s bytes: touching a mapped page past a shrunk file's end is
    ``SIGBUS`` (the process dies without a message), so a re-download overwriting the shard while
    it converts must be seen first and be the one-line error."""
    size = os.fstat(fd).st_size
    if size < end:
        raise UserError(f"{path}: truncated while converting (tensor {name} ends at byte {end}, the file has "
                        f"{size}); re-download it")


class CopyWriter:
    """Writes :class:`TensorCopy` parts into open rank files, straight from the memory-mapped sources.

    A tensor is checked for NaN/Inf and written ``window`` bytes at a time (page cache: no anonymous
    memory grows with a tensor, a 128k-vocabulary embedding included), so each window is still in
    cache when it is written.  Thread-safe: worker threads each write their own tensors."""

    def __init__(self, writers: dict[int, RankFileWriter], origin: str, *, check_finite: bool = True,
                 window: int = WINDOW, shown_as: Path | None = None, whole_files: bool = True) -> None:
        """:param origin: the model as messages name it; ``shown_as``: the output directory as
            messages name it (the files are written in a temporary one, renamed at the end).
        :param whole_files: every byte of the source files is copied, so each is mapped with all its
            pages up front (measured far cheaper than a page fault each under virtualization); when
            only some tensors are (the rest are built with torch), only their pages are touched."""
        self._writers = writers
        self._origin = origin
        self._check = check_finite
        self._window = max(window - window % 8, 8)  # whole elements of every dtype
        self._shown_as = shown_as
        self._maps = _Maps(populate=whole_files)
        self._local = threading.local()

    def write(self, copy: TensorCopy) -> None:
        for part in copy.parts:  # the header was laid out by whoever opened the files: it must agree
            planned = tuple(self._writers[part.rank].planned(part.name)[0])
            if planned != tuple(part.shape):
                raise AssertionError(f"{part.name}: rank {part.rank}'s file has room for {planned}, "
                                     f"the copy makes {part.shape}")
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = {}
        starts = [0]
        views = []  # each source's bytes, as a slice of its file's mapping
        files = []  # and as (fd, file offset)
        for name, path, offset, nbytes in copy.sources:
            fd, view = self._maps.get(path)
            _require(fd, path, name, offset + nbytes)
            views.append(view[offset:offset + nbytes])
            files.append((fd, offset))
            starts.append(starts[-1] + nbytes)
        total_bytes = starts[-1]

        def span(lo: int, hi: int) -> list[memoryview | tuple[int, int, int]]:
            """Bytes ``[lo, hi)`` of the full tensor (the sources concatenated): a large range as
            ``(fd, file offset, nbytes)`` (copied inside the kernel), a small one as mapped bytes
            (gathered with its neighbours into one ``pwritev``: a row-parallel split's rows)."""
            if len(views) == 1:  # one source: the common case, kept cheap (called per row of a split)
                fd, offset = files[0]
                return [(fd, offset + lo, hi - lo) if hi - lo >= _KERNEL_COPY_MIN else views[0][lo:hi]]
            out: list[memoryview | tuple[int, int, int]] = []
            for view, (fd, offset), s0, s1 in zip(views, files, starts, starts[1:]):
                a, b = max(lo, s0), min(hi, s1)
                if a < b:
                    out.append((fd, offset + a - s0, b - a) if b - a >= _KERNEL_COPY_MIN else view[a - s0:b - s0])
            return out

        for w0 in range(0, max(total_bytes, 1), self._window):  # the tensor's bytes, one window at a time
            w1 = min(w0 + self._window, total_bytes)
            if self._check:
                for (name, _p, _o, _n), s0, s1, view in zip(copy.sources, starts, starts[1:], views):
                    lo, hi = max(w0, s0), min(w1, s1)
                    if lo < hi and not all_finite(view[lo - s0:hi - s0], copy.dtype, scratch):
                        raise UserError(f"{self._origin}: tensor {name} contains NaN or Inf values")
            last = w1 >= total_bytes
            for part in copy.parts:
                pieces = []
                for at, src, n in part.pieces:
                    lo, hi = max(src, w0), min(src + n, w1)
                    if lo < hi:
                        pos = at + lo - src
                        for piece in span(lo, hi):
                            pieces.append((pos, piece))
                            pos += piece[2] if isinstance(piece, tuple) else len(piece)
                writer = self._writers[part.rank]
                try:
                    writer.write_gather(part.name, pieces, last=last)
                except OSError as exc:  # a source shrank under copy_file_range, or the disk is full
                    for (name, path, offset, nbytes), (fd, _o) in zip(copy.sources, files):
                        _require(fd, path, name, offset + nbytes)
                    raise cannot_write(exc, writer.path, self._shown_as) from None

    def close(self) -> None:
        """Unmap the sources."""
        self._maps.close()


def write_checkpoint(copies: list[TensorCopy], world_size: int, out: Path, origin: str, workers: int = 1,
                     check_finite: bool = True, progress: bool = False, window: int = WINDOW,
                     shown_as: Path | None = None) -> tuple[int, int]:
    """Write ``rank{r}.safetensors`` for every rank into ``out`` (an empty directory) from the
    byte copies of :func:`plan_copies`.  Returns ``(tensors, bytes)`` written.  ``shown_as``: the
    directory to name in messages (``out`` is the temporary one renamed into place at the end)."""
    layouts: dict[int, dict[str, tuple[tuple[int, ...], str]]] = {r: {} for r in range(world_size)}
    total = 0
    for copy in copies:
        for part in copy.parts:
            layouts[part.rank][part.name] = (part.shape, copy.dtype.name)
            total += math.prod(part.shape) * copy.dtype.itemsize
    writers = open_rank_files(out, layouts, shown_as)
    copier = CopyWriter(writers, origin, check_finite=check_finite, window=window, shown_as=shown_as)
    try:
        for_each_bounded(copier.write, copies, workers, len(copies), progress)
        for w in writers.values():
            w.close()
    finally:
        for w in writers.values():
            w.discard()
        copier.close()
    return sum(len(c.parts) for c in copies), total
