"""Bad inputs to ``trtlm convert``, through the real command line.

Every case must fail the same clean way: a non-zero exit, exactly one line on
stderr starting with ``error:`` that names the problem (file, tensor or flag),
no traceback, and nothing left in the output's parent directory: neither the
output directory nor the ``.NAME.tmp-*`` sibling the pipeline writes into
before its final rename.

Most cases call ``trtlm.cli.main`` in this process (:func:`conftest.run_cli`,
which turns an escaping exception into a traceback on stderr); two run the
installed console script in a subprocess to check the real process's stderr.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import copy_model, edit_safetensors, run_cli
from safetensors.torch import load_file


@pytest.fixture
def outs(tmp_path) -> Path:
    """The parent of every output directory: must stay empty after a failure."""
    (tmp_path / "outs").mkdir()
    return tmp_path / "outs"


def assert_clean_failure(res, outs: Path, *needles: str) -> str:
    assert res.exit_code != 0, res.stdout
    assert "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr_lines) == 1, res.stderr
    line = res.stderr_lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert sorted(p.name for p in outs.iterdir()) == [], "output or temporary directory left behind"
    return line


def convert_args(model: Path, out: Path, *extra) -> list:
    return ["convert", "--model-dir", model, "--output-dir", out, "--dtype", "float32", *extra]


@pytest.fixture
def model(tiny_mistral_dir, tmp_path) -> Path:
    """A writable copy of the tiny Mistral (single model.safetensors)."""
    return copy_model(tiny_mistral_dir, tmp_path / "hf")


# --------------------------------------------------------------------------------------------
# Directories and files
# --------------------------------------------------------------------------------------------
def test_missing_model_dir(tmp_path, outs):
    missing = tmp_path / "nowhere"
    res = run_cli(*convert_args(missing, outs / "ckpt"))
    assert_clean_failure(res, outs, str(missing), "no such directory")


def test_missing_config_json(model, outs):
    (model / "config.json").unlink()
    res = run_cli(*convert_args(model, outs / "ckpt"))
    assert_clean_failure(res, outs, str(model), "config.json")


def test_invalid_config_json(model, outs):
    (model / "config.json").write_text('{"architectures": ["MistralForCausalLM"],')
    res = run_cli(*convert_args(model, outs / "ckpt"))
    assert_clean_failure(res, outs, "config.json", "not valid JSON")


@pytest.mark.parametrize("keep", [4, 1000, 0.5], ids=["shorter-than-length", "inside-header", "half"])
def test_truncated_safetensors(keep, model, outs):
    path = model / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])
    res = run_cli(*convert_args(model, outs / "ckpt"))
    line = assert_clean_failure(res, outs, str(path))
    assert "truncated" in line or "shorter than 8 bytes" in line


@pytest.mark.parametrize("how", ["garbage-json", "huge-length"])
def test_corrupt_safetensors_header(how, model, outs):
    path = model / "model.safetensors"
    data = bytearray(path.read_bytes())
    if how == "garbage-json":
        data[8:40] = b"\xff" * 32
    else:
        data[0:8] = (1 << 60).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    res = run_cli(*convert_args(model, outs / "ckpt"))
    assert_clean_failure(res, outs, str(path), "corrupt safetensors header")


def test_missing_shard_listed_in_index(make_tiny_mistral, tmp_path, outs):
    model = copy_model(make_tiny_mistral(max_shard_size="60KB"), tmp_path / "hf")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (model / shard).unlink()
    res = run_cli(*convert_args(model, outs / "ckpt"))
    assert_clean_failure(res, outs, shard, "missing", "model.safetensors.index.json")


def test_index_lists_tensor_absent_from_shard(make_tiny_mistral, tmp_path, outs):
    model = copy_model(make_tiny_mistral(max_shard_size="60KB"), tmp_path / "hf")
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.0.self_attn.q_proj.weight"] = first
    index_path.write_text(json.dumps(index))
    res = run_cli(*convert_args(model, outs / "ckpt"))
    assert_clean_failure(res, outs, first, "model.layers.0.self_attn.q_proj.weight")


# --------------------------------------------------------------------------------------------
# Tensors against config.json
# --------------------------------------------------------------------------------------------
def rewrite(model: Path, edit) -> None:
    edit_safetensors(model / "model.safetensors", edit)


def test_missing_tensor(model, outs):
    rewrite(model, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    res = run_cli(*convert_args(model, outs / "ckpt"))
    assert_clean_failure(res, outs, "model.layers.1.mlp.up_proj.weight", "missing")


def test_shape_contradicts_config(model, outs):
    cfg = json.loads((model / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (model / "config.json").write_text(json.dumps(cfg))
    res = run_cli(*convert_args(model, outs / "ckpt"))
    assert_clean_failure(res, outs, "model.layers.0.mlp.gate_proj.weight", "[128, 64]", "[96, 64]", "config.json")


def test_nan_weights_name_the_tensor(model, outs):
    def poison(t):
        t["model.layers.1.self_attn.v_proj.weight"][3, 5] = float("nan")

    rewrite(model, poison)
    for workers in ("1", "2"):
        res = run_cli(*convert_args(model, outs / "ckpt", "--workers", workers, "--tp-size", "2"))
        assert_clean_failure(res, outs, "model.layers.1.self_attn.v_proj.weight", "NaN")


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------
def test_tp_not_dividing_heads(tiny_mistral_dir, outs):
    res = run_cli(*convert_args(tiny_mistral_dir, outs / "ckpt", "--tp-size", "3"))
    assert_clean_failure(res, outs, "--tp-size 3", "4 attention heads")


def test_pp_larger_than_layers(tiny_mistral_dir, outs):
    res = run_cli(*convert_args(tiny_mistral_dir, outs / "ckpt", "--pp-size", "5"))
    assert_clean_failure(res, outs, "--pp-size 5", "4 layers")


def test_unknown_dtype(tiny_mistral_dir, outs):
    res = run_cli("convert", "--model-dir", tiny_mistral_dir, "--output-dir", outs / "ckpt", "--dtype", "float8")
    assert_clean_failure(res, outs, "--dtype", "float8")


def test_existing_output_dir_needs_force(tiny_mistral_dir, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run_cli(*convert_args(tiny_mistral_dir, out))
    assert res.exit_code != 0 and "Traceback" not in res.stderr
    assert len(res.stderr_lines) == 1 and res.stderr_lines[0].startswith("error: ")
    assert str(out) in res.stderr and "--force" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary sibling

    res = run_cli(*convert_args(tiny_mistral_dir, out, "--force"))
    assert res.exit_code == 0, res.stderr
    assert "keep.txt" not in {p.name for p in out.iterdir()} and (out / "rank0.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .old / .tmp sibling either


# --------------------------------------------------------------------------------------------
# Pickle checkpoints
# --------------------------------------------------------------------------------------------
@pytest.fixture
def pickle_model(tiny_mistral_dir, tmp_path) -> Path:
    model = tmp_path / "pickle"
    model.mkdir()
    shutil.copy(tiny_mistral_dir / "config.json", model / "config.json")
    torch.save(load_file(str(tiny_mistral_dir / "model.safetensors")), model / "pytorch_model.bin")
    return model


def test_pickle_refused_without_allow_pickle(pickle_model, outs):
    res = run_cli(*convert_args(pickle_model, outs / "ckpt"))
    assert_clean_failure(res, outs, str(pickle_model / "pytorch_model.bin"), "--allow-pickle")


def test_pickle_converts_with_allow_pickle(pickle_model, tiny_mistral_dir, tmp_path):
    res = run_cli(*convert_args(pickle_model, tmp_path / "from-pickle", "--allow-pickle", "--tp-size", "2"))
    assert res.exit_code == 0, res.stderr
    res = run_cli(*convert_args(tiny_mistral_dir, tmp_path / "from-st", "--tp-size", "2"))
    assert res.exit_code == 0, res.stderr
    for r in range(2):
        a = load_file(str(tmp_path / "from-pickle" / f"rank{r}.safetensors"))
        b = load_file(str(tmp_path / "from-st" / f"rank{r}.safetensors"))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``; ``weights_only=True`` must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_allow_pickle_still_runs_no_code(tiny_mistral_dir, tmp_path, outs):
    model = tmp_path / "evil"
    model.mkdir()
    shutil.copy(tiny_mistral_dir / "config.json", model / "config.json")
    marker = tmp_path / "payload-ran"
    tensors = load_file(str(tiny_mistral_dir / "model.safetensors"))
    torch.save({**tensors, "model.norm.weight": _Payload(marker)}, model / "pytorch_model.bin")
    res = run_cli(*convert_args(model, outs / "ckpt", "--allow-pickle"))
    assert_clean_failure(res, outs, str(model / "pytorch_model.bin"), "weights_only=True")
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# The console script itself
# --------------------------------------------------------------------------------------------
def console_script() -> list[str]:
    script = Path(sys.executable).parent / "trtlm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "trtlm.cli"]


def test_console_script_prints_one_line(model, outs):
    rewrite(model, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    needle = "model.layers.0.self_attn.k_proj.weight"
    proc = subprocess.run(console_script() + [str(a) for a in convert_args(model, outs / "ckpt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert list(outs.iterdir()) == []
