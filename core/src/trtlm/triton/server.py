"""Find and start a ``tritonserver`` for a model repository trtlm wrote.

Two installs are understood:

* a Triton image or install with ``tritonserver`` on ``PATH`` (backends in
  ``/opt/tritonserver/backends``); its Python backend runs the image's own
  Python, in which trtlm and the family plugins must be installed;
* the ``nvidia-pytriton`` wheel (``pip install 'trtlm[triton]'``), which ships
  a real ``tritonserver`` (Triton 2.51), its libraries and one Python-backend
  stub per Python version.  Its stub is linked against ``libpython3.X`` and
  runs the Python backend models in an embedded interpreter, so the wheel is
  made usable here by (1) a backend directory holding the stub built for
  *this* Python's version, and (2) an environment that makes the stub's
  interpreter take a chosen Python's prefix (:func:`python_stub_env`).

Triton 2.51's Python backend needs numpy < 2 in that interpreter (with numpy
2 the stub fails on string tensors): :func:`stub_venv` makes a venv holding
numpy < 2 in front of this Python's packages, for a Python that has numpy 2.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from trtlm.errors import UserError

INSTALL_HINT = ("tritonserver not found: run inside a Triton image (nvcr.io/nvidia/tritonserver:<yy.mm>-py3, "
                "with trtlm installed in its Python), or `pip install 'trtlm[triton]'` for the tritonserver "
                "that the nvidia-pytriton wheel ships")


@dataclass
class TritonInstall:
    """Where a ``tritonserver`` binary and its backends lie, and what its processes need in their environment."""

    server: Path
    backend_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    origin: str = ""

    def command(self, repo: Path, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                extra: Sequence[str] = ()) -> list[str]:
        return [str(self.server), f"--model-repository={repo}", f"--backend-directory={self.backend_dir}",
                f"--http-port={http_port}", f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}",
                *extra]


def python_stub_env(python: str | Path = sys.executable) -> dict[str, str]:
    """Environment in which a Python-backend stub runs its models with ``python``'s packages.

    The stub embeds the ``libpython`` it was linked against, with an isolated
    configuration (``PYTHONPATH``/``PYTHONHOME`` are ignored): the interpreter
    takes its prefix from the first ``python3`` on ``PATH``, a virtual
    environment's ``pyvenv.cfg`` included.  So ``python``'s directory goes
    first on ``PATH``, and this Python's own shared ``libpython`` (when it has
    one) first on ``LD_LIBRARY_PATH``, so that standard library and
    interpreter are of one build.
    """
    env = {"PATH": os.pathsep.join([str(Path(python).parent), os.environ.get("PATH", "")])}
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    soname = sysconfig.get_config_var("INSTSONAME") or ""
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and soname and (Path(libdir) / soname).exists():
        env["LD_LIBRARY_PATH"] = libdir
    return env


def stub_venv(dest: Path, pip_args: Sequence[str] = ()) -> Path:
    """A virtual environment for Triton 2.51's Python backend: numpy < 2 over this Python's packages.

    Triton 2.51's stub fails on string tensors with numpy 2.  Where this
    Python has numpy >= 2, ``dest`` becomes a venv of this interpreter holding
    only numpy < 2 (installed by pip), and a ``.pth`` file that adds this
    Python's site-packages (trtlm, plugins, torch...) behind it.  Made once;
    returns its ``python``.
    """
    import site

    python = dest / "bin" / "python3"
    ready = dest / ".trtlm-ready"
    if ready.exists():
        return python
    shutil.rmtree(dest, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    site_dir = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   check=True, capture_output=True, text=True).stdout.strip())
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           "--target", str(site_dir), "numpy<2", *pip_args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"{dest}: could not pip-install numpy<2 for Triton's Python backend: "
                        f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    parents = [p for p in site.getsitepackages() if os.path.isdir(p)]
    (site_dir / "trtlm_parent_env.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in parents))
    ready.write_text("ok\n")
    return python


def pytriton_install(root: Path, work_dir: Path, python: str | Path = sys.executable) -> TritonInstall:
    """The ``tritonserver`` of an installed or unpacked nvidia-pytriton wheel (``root`` holds ``pytriton/``).

    A backend directory under ``work_dir`` gets the wheel's Python backend
    with the stub built for this Python's version (the wheel keeps one per
    version aside, in ``python_backend_stubs/3.X``).
    """
    tree = root / "pytriton" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = tree / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not (tree / "bin" / "tritonserver").exists():
        raise UserError(f"{root}: no pytriton/tritonserver/bin/tritonserver (not an nvidia-pytriton install)")
    if not stub.exists():
        raise UserError(f"{stub.parent.parent}: the nvidia-pytriton wheel has no Python-backend stub for Python "
                        f"{version}; run trtlm with Python 3.8-3.13")
    import hashlib

    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    backends = work_dir / f"backends-{key}-py{version}"
    python_backend = backends / "python"
    python_backend.mkdir(parents=True, exist_ok=True)
    for f in (tree / "backends" / "python").iterdir():
        if not (python_backend / f.name).exists():
            os.symlink(f, python_backend / f.name)
    target = python_backend / "triton_python_backend_stub"
    if not target.exists():  # the stub finds its libraries relative to its own (real) path: link, not copy
        os.symlink(stub, target)
    env = python_stub_env(python)
    libs = [str(root / "nvidia_pytriton.libs")] + ([env["LD_LIBRARY_PATH"]] if "LD_LIBRARY_PATH" in env else [])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [os.environ.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    return TritonInstall(tree / "bin" / "tritonserver", backends, env, origin=f"nvidia-pytriton at {root}")


def stub_python(cache_dir: Path) -> str:
    """The Python the wheel's stub should take: this one with numpy < 2, else a :func:`stub_venv` over it
    (one per environment: its ``.pth`` points at this environment's site-packages)."""
    import hashlib
    import importlib.metadata

    try:
        major = int(importlib.metadata.version("numpy").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        major = 0
    if major < 2:
        return sys.executable
    key = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    return str(stub_venv(cache_dir / f"stub-venv-py{sys.version_info[0]}{sys.version_info[1]}-{key}"))


def pytriton_root() -> Path | None:
    """An nvidia-pytriton tree: ``$TRTLM_PYTRITON_DIR`` (an unpacked wheel) or the installed package."""
    import importlib.util

    env = os.environ.get("TRTLM_PYTRITON_DIR")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]).parent
    return None


def find_triton(work_dir: Path, python: str | Path | None = None) -> TritonInstall:
    """``tritonserver`` on PATH, else the nvidia-pytriton wheel's (its stub running ``python``, by default
    :func:`stub_python`); :class:`UserError` saying how to install when there is neither."""
    on_path = shutil.which("tritonserver")
    if on_path:
        server = Path(on_path).resolve()
        backends = Path(os.environ.get("TRITON_BACKEND_DIR") or server.parent.parent / "backends")
        return TritonInstall(server, backends, {}, origin=str(server))
    root = pytriton_root()
    if root is None:
        raise UserError(INSTALL_HINT)
    return pytriton_install(root, work_dir, python or stub_python(work_dir))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """A running ``tritonserver`` process on a repository; a context manager that always stops it.

    :param log_path: where the server's stdout/stderr go (read by :meth:`log`).
    """

    def __init__(self, install: TritonInstall, repo: Path, log_path: Path, http_port: int | None = None,
                 extra_args: Sequence[str] = ()):
        self.install, self.repo, self.log_path = install, Path(repo), Path(log_path)
        self.http_port = http_port or free_port()
        self.grpc_port, self.metrics_port = free_port(), free_port()
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> "TritonServer":
        env = {**os.environ, **self.install.env}
        cmd = self.install.command(self.repo, self.http_port, self.grpc_port, self.metrics_port, self.extra_args)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Poll ``/v2/health/ready`` until 200; :class:`RuntimeError` with the log's tail if it exits or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"tritonserver not ready after {timeout_s:.0f} s:\n{self.log()[-4000:]}")

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the server (it unloads its models), SIGKILL its process group if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        finally:
            self._log.close()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
