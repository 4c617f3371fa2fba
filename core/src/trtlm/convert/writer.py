"""Streaming safetensors writer.

The header of a safetensors file lists every tensor's dtype, shape and byte
range.  A conversion plan knows all of these before reading any weight, so
each rank file is created at its final size with its header in place, and
tensors are then written at their offsets (``os.pwrite``) in any order, by
any number of worker threads, one tensor in memory per worker.  Tensors that
are plain byte ranges of source files are copied inside the kernel instead
(:meth:`RankFileWriter.write_gather`).
"""
from __future__ import annotations

import errno
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from trtlm import dtypes
from trtlm.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch


class RankFileWriter:
    """One ``rank{r}.safetensors`` being written at precomputed offsets."""

    def __init__(self, path: Path, layout: dict[str, tuple[tuple[int, ...], Any]],
                 metadata: dict[str, str] | None = None) -> None:
        """:param layout: tensor name -> (shape, dtype); a dtype is a torch dtype or a
            :mod:`trtlm.dtypes` name (the torch-free path writes by name)."""
        header: dict[str, object] = {}
        offset = 0
        self._offsets: dict[str, tuple[int, int, tuple[int, ...], Any]] = {}
        for name in sorted(layout):
            shape, dtype = layout[name]
            entry = dtypes.get(dtype)
            nbytes = math.prod(shape) * entry.itemsize
            header[name] = {"dtype": entry.st, "shape": list(shape),
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
        self._flusher: ThreadPoolExecutor | None = None

    def planned(self, name: str) -> tuple[tuple[int, ...], Any]:
        """Shape and dtype the header promises for ``name``."""
        _offset, _nbytes, shape, dtype = self._offsets[name]
        return tuple(shape), dtype

    def write(self, name: str, tensor: torch.Tensor) -> None:
        offset, nbytes, shape, dtype = self._offsets[name]
        if tuple(tensor.shape) != tuple(shape) or dtypes.get(tensor.dtype) != dtypes.get(dtype):
            raise AssertionError(f"{name}: planned {shape} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
        import torch

        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.write_bytes(name, memoryview(data))

    def write_bytes(self, name: str, data: memoryview, start: int = 0, last: bool = True) -> None:
        """Write raw bytes of tensor ``name`` at byte ``start`` of it (``last``: the tensor is complete)."""
        offset, nbytes, _shape, _dtype = self._offsets[name]
        if start + len(data) > nbytes:
            raise AssertionError(f"{name}: planned {nbytes} bytes, writing up to {start + len(data)}")
        pos, written = self._base + offset + start, 0
        while written < len(data):
            written += os.pwrite(self._fd, data[written:], pos + written)
        if last:
            self._written(offset, nbytes)
            self._pending.discard(name)

    def write_gather(self, name: str, pieces: Sequence[tuple[int, memoryview | tuple[int, int, int]]],
                     last: bool = True) -> None:
        """Fill tensor ``name`` from ``(byte offset in the tensor, data)`` pieces sorted by offset,
        ``data`` being bytes in memory or ``(fd, file offset, nbytes)`` of another file; bytes not
        covered stay zero (the file was created zero-filled at its full size).  Runs of adjacent
        in-memory pieces go out in one ``pwritev`` (up to ``IOV_MAX`` buffers per call), file
        ranges through :func:`copy_range` (``copy_file_range``: copied inside the kernel).
        ``last``: the tensor is complete (a tensor may be written in several calls)."""
        offset, nbytes, _shape, _dtype = self._offsets[name]
        base = self._base + offset
        i = 0
        while i < len(pieces):
            start, data = pieces[i]
            if isinstance(data, tuple):
                fd, src, n = data
                if start + n > nbytes:
                    raise AssertionError(f"{name}: planned {nbytes} bytes, writing up to {start + n}")
                copy_range(fd, src, self._fd, base + start, n)
                i += 1
                continue
            j, end = i, start
            while j < len(pieces) and pieces[j][0] == end and not isinstance(pieces[j][1], tuple):
                end += len(pieces[j][1])
                j += 1
            if end > nbytes:
                raise AssertionError(f"{name}: planned {nbytes} bytes, writing up to {end}")
            bufs = [p[1] for p in pieces[i:j]]
            if len(bufs) > _GATHER_MAX:
                # Many short ranges (the rows of a row-parallel split): joined in memory and written
                # once; the kernel's per-segment cost made pwritev of 4 KB iovecs ~3x slower.
                bufs = [memoryview(b"".join(bufs))]
            done = os.pwritev(self._fd, bufs, base + start) if _PWRITEV else 0
            if done < end - start:  # short write: finish piece by piece
                self._finish(base + start, bufs, done)
            i = j
        if last:
            self._written(offset, nbytes)
            self._pending.discard(name)

    def _finish(self, pos: int, bufs: list[memoryview], done: int) -> None:
        """Complete a short ``pwritev`` that wrote ``done`` bytes of ``bufs`` at ``pos``."""
        for buf in bufs:
            n = len(buf)
            if done < n:
                view, at = buf[done:], pos + done
                while len(view):
                    w = os.pwrite(self._fd, view, at)
                    view, at = view[w:], at + w
                done = 0
            else:
                done -= n
            pos += n

    def _written(self, offset: int, nbytes: int) -> None:
        """Start writing a finished tensor's pages to disk now, while the next ones are
        converted, so the final ``fsync`` has little left to wait for and a large
        conversion does not pile up gigabytes of dirty page cache.  ``posix_fadvise``
        (``DONTNEED`` starts writeback of dirty pages) blocks while it queues the I/O,
        so it runs on this file's own background thread."""
        if not _FADVISE or nbytes < 1 << 20:
            return
        if self._flusher is None:
            self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trtlm-writeback")
        self._flusher.submit(os.posix_fadvise, self._fd, self._base + offset, nbytes, os.POSIX_FADV_DONTNEED)

    def _stop_flusher(self) -> None:
        if self._flusher is not None:
            self._flusher.shutdown(wait=True)
            self._flusher = None

    def close(self) -> None:
        if self._pending:
            raise AssertionError(f"{self.path}: tensors never written: {sorted(self._pending)[:3]}")
        self._stop_flusher()
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1

    def discard(self) -> None:
        """Close without checks (the conversion failed; the directory is being removed)."""
        self._stop_flusher()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def open_rank_files(out: Path, layouts: dict[int, dict[str, tuple[tuple[int, ...], Any]]],
                    shown_as: Path | None = None) -> dict[int, RankFileWriter]:
    """``rank{r}.safetensors`` in ``out`` for each rank's layout, each created at its full size.

    A file that cannot be created (a full disk, a file size limit) is the one-line error, naming it
    in ``shown_as`` (the directory the user named; ``out`` is the temporary one renamed into place
    at the end), with the files already created closed."""
    writers: dict[int, RankFileWriter] = {}
    for rank, layout in sorted(layouts.items()):
        path = out / f"rank{rank}.safetensors"
        try:
            writers[rank] = RankFileWriter(path, layout, metadata={"format": "pt"})
        except OSError as exc:
            for w in writers.values():
                w.discard()
            raise cannot_write(exc, path, shown_as, "create") from None
    return writers


def cannot_write(exc: OSError, path: Path, shown_as: Path | None = None, verb: str = "write") -> UserError:
    """The one-line error for a rank file ``path`` that could not be created or written (named in
    ``shown_as``, the directory the user gave)."""
    return UserError(f"{(shown_as or path.parent) / path.name}: cannot {verb} ({exc.strerror or exc}); "
                     f"free space on that filesystem or choose another --output-dir")


_COPY_FILE_RANGE = hasattr(os, "copy_file_range")
_GATHER_MAX = 16  #: more adjacent in-memory pieces than this are joined and written with one call
_PWRITEV = hasattr(os, "pwritev")
_FADVISE = hasattr(os, "posix_fadvise")


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int) -> None:
    """Copy ``nbytes`` between two files at the given offsets (``copy_file_range``, else pread/pwrite)."""
    global _COPY_FILE_RANGE
    done = 0
    while done < nbytes and _COPY_FILE_RANGE:
        try:
            n = os.copy_file_range(src_fd, dst_fd, nbytes - done, src_offset + done, dst_offset + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
            _COPY_FILE_RANGE = False
            break
        if n == 0:
            raise OSError(errno.EIO, f"unexpected end of file copying {nbytes} bytes at offset {src_offset}")
        done += n
    while done < nbytes:
        chunk = os.pread(src_fd, min(nbytes - done, 16 << 20), src_offset + done)
        if not chunk:
            raise OSError(errno.EIO, f"unexpected end of file copying {nbytes} bytes at offset {src_offset}")
        view, written = memoryview(chunk), 0
        while written < len(chunk):
            written += os.pwrite(dst_fd, view[written:], dst_offset + done + written)
        done += len(chunk)
