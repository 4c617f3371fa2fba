"""``python -m trtlm.runtime.worker REQUEST.json``: one rank started by :mod:`trtlm.runtime.launch`.

The rank comes from the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``TRTLM_STORE``), the work from the request file (what ``trtlm run`` was
asked).  On failure the rank writes ``{"message", "peer"}`` to
``$TRTLM_ERROR_FILE`` so the launcher can report it in one line, prints a
traceback only for unexpected errors (bugs), and exits 1.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path


def _die_with_launcher() -> None:
    """Linux: get SIGKILL when the launcher dies, so no rank outlives it."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    launcher = os.environ.get("TRTLM_LAUNCHER_PID")
    if launcher and os.getppid() != int(launcher):  # it died before prctl took effect
        os._exit(1)


def _report(exc: BaseException, peer: bool) -> None:
    path = os.environ.get("TRTLM_ERROR_FILE")
    if not path:
        return
    from trtlm.errors import UserError

    message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    message = " ".join(message.split())  # one line
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps({"message": message, "peer": peer}))
    tmp.replace(path)


def fail(exc: BaseException) -> int:
    """A rank's end on any failure: the one-line report for the launcher, a traceback on stderr only
    for unexpected errors (bugs) that are not a consequence of a peer going away; exit status 1."""
    from trtlm.errors import UserError

    peer = False
    try:
        from trtlm.runtime.distributed import is_peer_failure

        peer = is_peer_failure(exc)
    except Exception:  # noqa: BLE001 - report the original error regardless
        pass
    _report(exc, peer)
    if not isinstance(exc, UserError) and not peer:
        rank = os.environ.get("RANK", "?")
        sys.stderr.write(f"[rank {rank}] " + "".join(traceback.format_exception(exc)))
    sys.stderr.flush()
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _die_with_launcher()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    from trtlm.errors import UserError

    try:
        from trtlm.job import RunRequest, run_rank
        from trtlm.runtime.distributed import rank_env

        if len(argv) != 1:
            raise UserError("usage: python -m trtlm.runtime.worker REQUEST.json (started by trtlm run)")
        env = rank_env()
        if env is None:
            raise UserError("RANK and WORLD_SIZE are not set: trtlm.runtime.worker is started by trtlm run")
        request = RunRequest.from_dict(json.loads(Path(argv[0]).read_text()))
        run_rank(request, env)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the launcher
        return fail(exc)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
