"""Long work says what it is doing: calibration progress, the engine cache, streamed output, devices.

* calibration reports each pass on stderr: a tqdm bar on a terminal, one-line updates otherwise,
  nothing with --quiet; and names the calibration data it picked when none was given;
* ``trtlm run --model-dir`` says it converts, ``trtlm cache list | clear`` show and free the cache,
  ``--no-cache`` leaves none;
* ``trtlm run --streaming`` prints exactly what the run without it prints;
* ``trtlm.devices`` turns device names into one-line errors.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from trtlm.errors import UserError


def console_script() -> list[str]:
    script = Path(sys.executable).parent / "trtlm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "trtlm.cli"]


# --------------------------------------------------------------------------------------------- calibration
def quant_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["convert", "--model-dir", str(model), "--output-dir", str(out), "--dtype", "float32",
            "--quant", "fp8", *extra]


def test_calibration_progress_lines_when_not_a_terminal(tiny_mistral_dir, tmp_path):
    proc = subprocess.run(console_script() + quant_args(tiny_mistral_dir, tmp_path / "q"), capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    # no --calib-data: which data was used is said, as the checkpoint's config records it
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert f"calibration: no --calib-data given, using {cfg['trtlm']['calibration']}" in lines
    starts = [l for l in lines if l.startswith("calibration: activation statistics: ") and "batch(es)" in l]
    ends = [l for l in lines if l.startswith("calibration: activation statistics: ") and " done in " in l]
    assert len(starts) == 1 and len(ends) == 1, proc.stderr
    n = int(starts[0].split(": ")[-1].split()[0])
    assert ends[0].split(": ")[-1].startswith(f"{n}/{n} batches done in ")
    assert "\r" not in proc.stderr  # no bar redrawing into a log file


def test_calibration_quiet(tiny_mistral_dir, tmp_path):
    proc = subprocess.run(console_script() + quant_args(tiny_mistral_dir, tmp_path / "q", "--quiet"),
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_calibration_bar_on_a_terminal(tiny_mistral_dir, tmp_path):
    """stderr is a pseudo-terminal: tqdm draws its bar (carriage returns, a percentage)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    try:
        proc = subprocess.Popen(console_script() + quant_args(tiny_mistral_dir, tmp_path / "q"),
                                stdout=subprocess.PIPE, stderr=follower, env=dict(os.environ, OMP_NUM_THREADS="1"))
        os.close(follower)
        chunks = []
        while True:
            try:
                data = os.read(leader, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=600) == 0
    finally:
        os.close(leader)
    err = b"".join(chunks).decode(errors="replace")
    assert "calibration: activation statistics" in err and "100%" in err and "\r" in err, err


def test_progress_lines_every_interval(capsys):
    """The periodic-line mode on its own (interval 0: a line per batch), the real class."""
    from trtlm.quant import calibrate as cal

    stream = io.StringIO()
    old = cal.LINE_EVERY_S
    cal.LINE_EVERY_S = 0.0
    try:
        bar = cal.Progress("calibration: test", 3, "lines", stream)
        for _ in range(3):
            bar.update()
        bar.close()
    finally:
        cal.LINE_EVERY_S = old
    lines = stream.getvalue().splitlines()
    assert lines[0] == "calibration: test: 3 batch(es)"
    assert lines[1].startswith("calibration: test: 1/3 batches (") and lines[2].startswith("calibration: test: 2/3")
    assert lines[3].startswith("calibration: test: 3/3 batches done in ") and len(lines) == 4
    cal.announce("calibration: said", "auto")
    cal.announce("calibration: not said", "off")
    assert capsys.readouterr().err == "calibration: said\n"


# --------------------------------------------------------------------------------------------- cache
def test_run_model_dir_says_it_converts_and_cache_commands(make_tiny_mistral, tmp_path, monkeypatch):
    monkeypatch.setenv("TRTLM_CACHE", str(tmp_path / "cache"))
    model = make_tiny_mistral()
    args = ["run", "--model-dir", model, "--input-ids", "5,6,7", "--max-output-len", "3"]
    first = run_cli(*args)
    assert first.exit_code == 0, first.stderr
    assert any(l.startswith(f"converting and building {model} into the cache") for l in first.stderr_lines)
    second = run_cli(*args)
    assert second.stdout == first.stdout and "converting" not in second.stderr

    listed = run_cli("cache", "list", "--json")
    doc = json.loads(listed.stdout)
    [entry] = doc["entries"]
    assert entry["model_dir"] == str(Path(model).resolve()) and entry["family"] == "mistral" and entry["complete"]
    on_disk = sum(p.stat().st_size for p in Path(entry["path"]).rglob("*") if p.is_file() and p.stat().st_nlink == 1)
    assert entry["size_bytes"] >= on_disk > 0  # hard-linked rank files counted once
    text = run_cli("cache", "list").stdout
    assert entry["key"] in text and "1 engine(s)" in text and "MB" in text

    nocache = run_cli(*args, "--no-cache")
    assert nocache.exit_code == 0 and nocache.stdout == first.stdout
    assert "temporary directory" in nocache.stderr
    assert len(json.loads(run_cli("cache", "list", "--json").stdout)["entries"]) == 1  # --no-cache added none

    cleared = run_cli("cache", "clear")
    assert cleared.exit_code == 0 and "removed 1 engine(s)" in cleared.stdout
    assert json.loads(run_cli("cache", "list", "--json").stdout)["entries"] == []
    assert sorted(p.name for p in (tmp_path / "cache" / "engines").iterdir()) == []


def test_cache_clear_leaves_foreign_directories(tmp_path, monkeypatch):
    """$TRTLM_CACHE pointing at a directory with other things in it: only trtlm's entries go."""
    monkeypatch.setenv("TRTLM_CACHE", str(tmp_path))
    mine = tmp_path / "engines" / "photos"
    mine.mkdir(parents=True)
    (mine / "cat.jpg").write_bytes(b"\xff\xd8")
    assert run_cli("cache", "clear").stdout.startswith("removed 0 engine(s)")
    assert (mine / "cat.jpg").exists()


# --------------------------------------------------------------------------------------------- streaming
@pytest.fixture(scope="module")
def text_engine(tmp_path_factory, make_tiny_mistral) -> Path:
    root = tmp_path_factory.mktemp("stream")
    model = make_tiny_mistral(tokenizer=True, eos_token_id=None)
    assert run_cli("convert", "--model-dir", model, "--output-dir", root / "ckpt").exit_code == 0
    assert run_cli("build", "--checkpoint-dir", root / "ckpt", "--output-dir", root / "engine").exit_code == 0
    return root / "engine"


@pytest.mark.parametrize("prompt", [["--input-text", "The quick brown"], ["--input-ids", "5,6,7"]],
                         ids=["text", "ids"])
def test_streaming_prints_what_the_plain_run_prints(text_engine, prompt):
    args = ["run", "--engine-dir", text_engine, *prompt, "--max-output-len", "12", "--launch", "single"]
    plain, streamed = run_cli(*args), run_cli(*args, "--streaming")
    assert plain.exit_code == 0 and streamed.exit_code == 0, plain.stderr + streamed.stderr
    assert streamed.stdout == plain.stdout
    assert plain.stdout.startswith(prompt[1])  # the prompt is included, in both
    if prompt[0] == "--input-ids":
        ids = [int(x) for x in plain.stdout.strip().split(",")]
        assert ids[:3] == [5, 6, 7] and len(ids) == 3 + 12


# --------------------------------------------------------------------------------------------- devices
def test_resolve_device():
    from trtlm.devices import check_device_name, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert check_device_name("CUDA:1") == "cuda:1"
    with pytest.raises(UserError, match=r"--device 'cdua': not a device; did you mean 'cuda'\?"):
        resolve_device("cdua")
    with pytest.raises(UserError, match="not a device"):
        resolve_device("cpu:0")
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
        n = torch.cuda.device_count()
        with pytest.raises(UserError, match=f"only {n} CUDA GPU"):
            resolve_device(f"cuda:{n}")
    else:
        with pytest.raises(UserError, match="use --device cpu"):
            resolve_device("cuda")
