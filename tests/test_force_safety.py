"""``--force`` never destroys data: the real commands on real directories.

``--force`` replaces an existing output directory.  It must refuse (one ``error:`` line saying
what and why, nothing touched) a directory that is, contains or lies inside an input of the
command, the current directory or one of its parents, the home directory, a filesystem root, or
any non-empty directory that is not an earlier trtlm output; and it must still replace an earlier
output.  Every refusal is checked by fingerprinting the whole tree before and after.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from conftest import copy_model, run_cli

from trtlm.errors import UserError
from trtlm.fsutil import MARKER, check_output_dir


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below ``root`` (and every directory, as "dir")."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_refused(res, *needles: str) -> str:
    assert res.exit_code == 1, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr_lines) == 1, res.stderr
    line = res.stderr_lines[0]
    assert line.startswith("error: refusing to "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


@pytest.fixture
def work(tiny_mistral_dir, tmp_path, monkeypatch) -> Path:
    """A working directory holding a model, a script and an engine-like folder; cwd is set to it."""
    w = tmp_path / "work"
    w.mkdir()
    copy_model(tiny_mistral_dir, w / "model")
    (w / "train.py").write_text("print('my script')\n")
    (w / "notes").mkdir()
    (w / "notes" / "todo.txt").write_text("keep me\n")
    monkeypatch.chdir(w)
    return w


def convert(model, out, *extra):
    return run_cli("convert", "--model-dir", model, "--output-dir", out, "--dtype", "float32", *extra)


# ---------------------------------------------------------------------------------------------- convert
def test_output_is_the_model_dir(work):
    before = tree(work)
    line = assert_refused(convert("model", "model", "--force"), "is the input --model-dir")
    assert str(work / "model") in line
    assert tree(work) == before


def test_output_is_a_symlink_to_the_model_dir(work):
    os.symlink(work / "model", work / "link")
    before = tree(work)
    assert_refused(convert("model", "link", "--force"), "is the input --model-dir")
    assert tree(work) == before and (work / "link").is_symlink()


def test_output_is_the_current_directory(work):
    """The reported case: `--output-dir .` wiped the working directory."""
    before = tree(work)
    assert_refused(convert("model", ".", "--force"), "--output-dir", str(work))
    assert tree(work) == before


def test_output_is_the_current_directory_without_inputs_in_the_way(work, tmp_path):
    """The model lies elsewhere: `.` is still refused because it is the current directory."""
    model = copy_model(work / "model", tmp_path / "elsewhere")
    before = tree(work)
    assert_refused(convert(model, ".", "--force"), "is the current directory")
    assert tree(work) == before


def test_output_contains_the_current_directory(work, tmp_path):
    model = copy_model(work / "model", tmp_path / "elsewhere")
    os.chdir(work / "notes")
    before = tree(work)
    assert_refused(convert(model, "..", "--force"), "contains the current directory")
    assert tree(work) == before


def test_output_contains_the_model(work, tmp_path):
    os.chdir(tmp_path)
    before = tree(work)
    assert_refused(convert(work / "model", work, "--force"), "contains the input --model-dir")
    assert tree(work) == before


def test_output_inside_the_model(work):
    inner = work / "model" / "sub"
    inner.mkdir()
    (inner / "extra.bin").write_bytes(b"\x00" * 10)
    (inner / MARKER).write_text("{}")  # even an earlier trtlm output is not replaced inside an input
    before = tree(work)
    assert_refused(convert("model", inner, "--force"), "lies inside the input --model-dir")
    assert tree(work) == before


def test_output_contains_the_calibration_file(work, tmp_path):
    out = tmp_path / "old-output"
    out.mkdir()
    (out / MARKER).write_text("{}")
    (out / "calib.txt").write_text("def f():\n    return 1\n")
    before = tree(out)
    assert_refused(convert(work / "model", out, "--quant", "fp8", "--calib-data", out / "calib.txt", "--force"),
                   "contains the input --calib-data")
    assert tree(out) == before


def test_output_is_the_home_directory(work, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export X=1\n")
    (home / MARKER).write_text("{}")  # looking like an output does not make $HOME replaceable
    monkeypatch.setenv("HOME", str(home))
    before = tree(home)
    assert_refused(convert(work / "model", home, "--force"), "is the home directory")
    assert_refused(convert(work / "model", tmp_path, "--force"), "--output-dir")  # holds cwd and $HOME
    assert tree(home) == before


def test_output_is_a_filesystem_root(work):
    # The check first, on its own: if it ever let "/" through, the command below must not run.
    with pytest.raises(UserError, match="filesystem root"):
        check_output_dir(Path("/"), True, {"--model-dir": work / "model"})
    assert_refused(convert(work / "model", "/", "--force"), "is a filesystem root")


def test_non_empty_directory_that_is_not_trtlm_output(work):
    before = tree(work)
    for force in ([], ["--force"]):
        res = convert("model", "notes", *force)
        assert res.exit_code == 1 and len(res.stderr_lines) == 1, res.stderr
        assert "not an earlier trtlm output" in res.stderr and "notes" in res.stderr
    assert tree(work) == before


def test_earlier_output_is_replaced_with_force(work):
    assert convert("model", "ckpt", "--tp-size", "2").exit_code == 0
    assert (work / "ckpt" / MARKER).is_file()
    (work / "ckpt" / "stale.txt").write_text("from before")
    res = convert("model", "ckpt")
    assert res.exit_code == 1 and "--force" in res.stderr and len(res.stderr_lines) == 1
    res = convert("model", "ckpt", "--force")
    assert res.exit_code == 0, res.stderr
    assert not (work / "ckpt" / "stale.txt").exists() and (work / "ckpt" / "rank0.safetensors").is_file()
    assert json.loads((work / "ckpt" / "config.json").read_text())["mapping"]["tp_size"] == 1
    leftovers = [p.name for p in work.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no .tmp / .old sibling


def test_checkpoint_config_without_marker_is_replaceable(work):
    """A checkpoint written by another tool (TensorRT-LLM's own config.json, no marker) counts as an output."""
    out = work / "theirs"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"architecture": "MistralForCausalLM", "mapping": {"tp_size": 1}}))
    (out / "rank0.safetensors").write_bytes(b"old")
    assert convert("model", out, "--force").exit_code == 0
    assert (out / "rank0.safetensors").stat().st_size > 3


def test_empty_directory_is_written(work):
    (work / "empty").mkdir()
    assert convert("model", "empty").exit_code == 0
    assert (work / "empty" / "rank0.safetensors").is_file()


def test_python_api_refuses_too(work):
    """convert() called from Python refuses the model dir as the CLI does (it names the input)."""
    from trtlm.convert.options import ConvertOptions
    from trtlm.convert.pipeline import convert as api_convert

    before = tree(work)
    with pytest.raises(UserError, match="it is the input --model-dir"):
        api_convert(work / "model", work / "model", ConvertOptions(force=True))
    with pytest.raises(UserError, match="current directory"):
        api_convert(work / "model", Path("."), ConvertOptions(force=True))
    assert tree(work) == before


# ---------------------------------------------------------------------------------------------- build
@pytest.fixture
def ckpt(work) -> Path:
    assert convert("model", "ckpt").exit_code == 0
    return work / "ckpt"


def test_build_output_is_the_checkpoint(work, ckpt):
    before = tree(work)
    assert_refused(run_cli("build", "--checkpoint-dir", ckpt, "--output-dir", ckpt, "--force"),
                   "is the input --checkpoint-dir")
    assert_refused(run_cli("build", "--checkpoint-dir", ckpt, "--output-dir", work, "--force"), "--output-dir")
    assert tree(work) == before


def test_build_replaces_its_earlier_engine(work, ckpt):
    assert run_cli("build", "--checkpoint-dir", ckpt, "--output-dir", "engine").exit_code == 0
    res = run_cli("build", "--checkpoint-dir", ckpt, "--output-dir", "engine", "--force", "--max-batch-size", "3")
    assert res.exit_code == 0, res.stderr
    assert json.loads((work / "engine" / "config.json").read_text())["build_config"]["max_batch_size"] == 3


def test_force_replaces_only_the_same_commands_output(work, ckpt, tmp_path):
    """An engine is not replaced by a checkpoint, nor a checkpoint by an engine or a scaffold."""
    other = tmp_path / "other-ckpt"
    assert convert(work / "model", other).exit_code == 0
    assert run_cli("build", "--checkpoint-dir", ckpt, "--output-dir", "engine").exit_code == 0
    before = tree(tmp_path)
    assert_refused(run_cli("build", "--checkpoint-dir", ckpt, "--output-dir", other, "--force"),
                   "holds a TensorRT-LLM checkpoint", "not an earlier output of trtlm build")
    assert_refused(convert("model", "engine", "--force"), "holds an engine", "not an earlier output of trtlm convert")
    os.rename(other, tmp_path / "trtlm-plugin-acme")
    res = run_cli("new-plugin", "acme", "--directory", tmp_path, "--force")
    assert_refused(res, "holds a TensorRT-LLM checkpoint")
    os.rename(tmp_path / "trtlm-plugin-acme", other)
    assert tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------- others
def test_new_plugin_force_replaces_only_a_scaffold(tmp_path):
    mine = tmp_path / "trtlm-plugin-acme"
    mine.mkdir()
    (mine / "my_code.py").write_text("x = 1\n")
    before = tree(mine)
    res = run_cli("new-plugin", "acme", "--directory", tmp_path, "--force")
    assert res.exit_code == 1 and len(res.stderr_lines) == 1 and "not an earlier trtlm output" in res.stderr
    assert tree(mine) == before
    (mine / "my_code.py").unlink()
    assert run_cli("new-plugin", "acme", "--directory", tmp_path, "--force").exit_code == 0  # empty: written
    assert (mine / "pyproject.toml").is_file()
    (mine / "README.md").write_text("edited")
    assert run_cli("new-plugin", "acme", "--directory", tmp_path).exit_code == 1  # no --force: kept
    assert run_cli("new-plugin", "acme", "--directory", tmp_path, "--force").exit_code == 0
    assert (mine / "README.md").read_text() != "edited"


def test_quickstart_never_replaces_a_foreign_work_dir(work):
    (work / "qs" / "checkpoint").mkdir(parents=True)
    (work / "qs" / "checkpoint" / "thesis.tex").write_text("years of work")
    before = tree(work)
    res = run_cli("quickstart", "--model-dir", "model", "--work-dir", "qs")
    assert res.exit_code == 1 and len(res.stderr_lines) == 1, res.stderr
    assert "not an earlier trtlm output" in res.stderr and "--work-dir" in res.stderr
    res = run_cli("quickstart", "--model-dir", "model/x", "--work-dir", ".")
    assert res.exit_code == 1 and len(res.stderr_lines) == 1
    assert tree(work) == before


def test_quickstart_refuses_model_as_its_checkpoint(work):
    (work / "qs").mkdir()
    os.rename(work / "model", work / "qs" / "checkpoint")
    before = tree(work)
    res = run_cli("quickstart", "--model-dir", "qs/checkpoint", "--work-dir", "qs")
    assert_refused(res, "is the input --model-dir")
    assert tree(work) == before


# ---------------------------------------------------------------------------------------------- modes
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_output_directories_respect_the_umask(work, umask):
    old = os.umask(umask)
    try:
        assert convert("model", f"ckpt-{umask:o}").exit_code == 0
        assert run_cli("build", "--checkpoint-dir", f"ckpt-{umask:o}", "--output-dir", f"eng-{umask:o}").exit_code == 0
    finally:
        os.umask(old)
    for d in (work / f"ckpt-{umask:o}", work / f"eng-{umask:o}"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask, oct(d.stat().st_mode)
        assert stat.S_IMODE((d / "config.json").stat().st_mode) == 0o666 & ~umask
