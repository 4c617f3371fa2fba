"""Starting the ranks of a multi-process job on this machine, and stopping them all on a failure.

:func:`launch_ranks` is what ``trtlm run`` does for an engine with several
ranks: it opens a listening socket on a free localhost port and hands it to
rank 0, which serves the rendezvous ``TCPStore`` on it (so no port is guessed
and none can be taken in between), starts ``world_size`` processes of
``python -m trtlm.runtime.worker REQUEST.json`` with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set as torchrun sets them, forwards rank
0's standard output, and watches the children:

* all exit 0: done;
* one fails: every other rank is killed at once (no waiting for collective
  timeouts, no orphans) and the job fails with one line,
  ``rank N failed: <that rank's error>``.  Ranks that failed only because a
  peer went away (a broken connection, a collective timeout) are reported
  only when no rank failed for its own reason;
* this process is interrupted or terminated: the children are killed too
  (and each child also dies with this process through ``PR_SET_PDEATHSIG``).

This module imports no torch: the launcher only starts and watches processes.
"""
from __future__ import annotations

import codecs
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trtlm.errors import UserError

#: How long, after the first failure seen, to look for the rank that failed
#: first when only "a peer went away" failures are visible yet.
SETTLE_S = 1.0
POLL_S = 0.02

ERROR_FILE_ENV = "TRTLM_ERROR_FILE"
LAUNCHER_PID_ENV = "TRTLM_LAUNCHER_PID"
#: ``host:port`` of the rendezvous store of a launched job.
STORE_ENV = "TRTLM_STORE"
#: rank 0 only: the inherited listening socket the store serves on.
STORE_FD_ENV = "TRTLM_STORE_FD"


@dataclass(frozen=True)
class RankEnv:
    """Who this process is in a multi-process job."""

    rank: int
    world_size: int
    local_rank: int


def rank_env() -> RankEnv | None:
    """This process's rank when started by torchrun or :func:`launch_ranks`
    (``RANK`` and ``WORLD_SIZE`` set), else ``None``."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise UserError(f"RANK={os.environ['RANK']!r} / WORLD_SIZE={os.environ['WORLD_SIZE']!r}: "
                        f"expected integers (as torchrun sets them)") from None
    return RankEnv(rank, world, local)


def engine_world_size(engine_dir: Path) -> int:
    """``tp * pp`` of an engine, read without importing torch."""
    path = Path(engine_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if "pretrained_config" not in cfg:
        raise UserError(f"{engine_dir}: not an engine directory (run `trtlm build` on a checkpoint first)")
    mapping = cfg["pretrained_config"].get("mapping") or {}
    return int(mapping.get("tp_size", 1)) * int(mapping.get("pp_size", 1))


def worker_env(rank: int, world_size: int, store_port: int, error_file: Path,
               store_fd: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
               GROUP_RANK="0", **{STORE_ENV: f"127.0.0.1:{store_port}", ERROR_FILE_ENV: str(error_file),
                                  LAUNCHER_PID_ENV: str(os.getpid())})
    env.pop(STORE_FD_ENV, None)
    if store_fd is not None:
        env[STORE_FD_ENV] = str(store_fd)
    # Each rank computes 1/world of the work: share the cores instead of oversubscribing them.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    return env


def _forward_output(stream, out) -> None:
    """Copy a child's stdout to ours as it comes (streaming output stays live)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    fd = stream.fileno()
    broken = False
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        text = decoder.decode(chunk, final=not chunk)
        if text and not broken:
            try:
                out.write(text)
                out.flush()
            except (BrokenPipeError, ValueError):  # our reader went away: keep draining the child
                broken = True
        if not chunk:
            break


def failure_of(rank: int, code: int, error_file: Path) -> tuple[str, bool]:
    """(message, peer) for a rank that exited with ``code``; ``peer`` when it
    failed only because another rank went away."""
    try:
        info = json.loads(error_file.read_text())
        return str(info["message"]), bool(info.get("peer"))
    except (OSError, ValueError, KeyError):
        pass
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"killed by signal {name}", False
    return f"exited with code {code} without an error report", False


def kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                p.kill()
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
            pass


def watch(procs: list[subprocess.Popen], error_dir: Path) -> None:
    """Wait for every rank; on the first failure kill the others and raise
    ``UserError("rank N failed: ...")`` naming the rank that caused it."""
    first_seen: float | None = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c == 0 for c in codes):
            return
        failed = {r: c for r, c in enumerate(codes) if c not in (None, 0)}
        if failed:
            now = time.monotonic()
            first_seen = first_seen if first_seen is not None else now
            reports = {r: failure_of(r, c, error_dir / f"rank{r}.json") for r, c in failed.items()}
            primary = [r for r, (_, peer) in reports.items() if not peer]
            if primary or now - first_seen >= SETTLE_S or all(c is not None for c in codes):
                kill_all(procs)
                rank = min(primary) if primary else min(reports)
                hint = "" if primary else " (while waiting for another rank)"
                raise UserError(f"rank {rank} failed: {reports[rank][0]}{hint}")
        time.sleep(POLL_S)


def launch_ranks(request: dict[str, Any], world_size: int, python: str | None = None) -> None:
    """Run ``request`` (see :func:`trtlm.job.execute`) as ``world_size``
    local processes; return when all succeeded, raise :class:`UserError` otherwise."""
    with tempfile.TemporaryDirectory(prefix="trtlm-ranks-") as tmp:
        tmpdir = Path(tmp)
        req_path = tmpdir / "request.json"
        req_path.write_text(json.dumps(request))
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(max(128, world_size))
        port = listener.getsockname()[1]
        procs: list[subprocess.Popen] = []
        forwarder = None
        previous = _on_sigterm_raise()
        try:
            for rank in range(world_size):
                fd = listener.fileno() if rank == 0 else None
                env = worker_env(rank, world_size, port, tmpdir / f"rank{rank}.json", fd)
                procs.append(subprocess.Popen(
                    [python or sys.executable, "-m", "trtlm.runtime.worker", str(req_path)], env=env,
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
                    pass_fds=(fd,) if fd is not None else ()))
                if rank == 0:
                    listener.close()  # rank 0 owns the socket now
                    forwarder = threading.Thread(target=_forward_output, args=(procs[0].stdout, sys.stdout),
                                                 daemon=True)
                    forwarder.start()
            watch(procs, tmpdir)
        finally:
            listener.close()
            kill_all(procs)
            if forwarder is not None:
                forwarder.join(timeout=5)
            if procs and procs[0].stdout is not None:
                procs[0].stdout.close()
            _restore_sigterm(previous)


def _on_sigterm_raise():
    """While ranks run, SIGTERM unwinds like Ctrl-C so the children are killed."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
