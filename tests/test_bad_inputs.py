"""Bad inputs to ``trtlm convert`` (and, in one table, bad invocations of every command), through
the real command line.

Every case must fail the same clean way: a non-zero exit, exactly one line on
stderr starting with ``error:`` that names the problem (file, tensor or flag),
no traceback, and nothing left in the output's parent directory: neither the
output directory nor the ``.NAME.tmp-*`` sibling the pipeline writes into
before its final rename.

Most cases call ``trtlm.cli.main`` in this process (:func:`conftest.run_cli`,
which turns an escaping exception into a traceback on stderr); a representative
subset runs the installed console script in a subprocess to check the real
process's stderr.  ``BAD_INVOCATIONS`` is the table: out-of-range numbers
(rejected by click's types at the CLI boundary, exit 2), impossible
combinations, missing or wrong paths, unavailable devices, token ids outside
the vocabulary and prompts longer than the engine allows (exit 1).
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
    for force in ([], ["--force"]):  # not an earlier trtlm output: refused even with --force
        res = run_cli(*convert_args(tiny_mistral_dir, out, *force))
        assert res.exit_code != 0 and "Traceback" not in res.stderr
        assert len(res.stderr_lines) == 1 and res.stderr_lines[0].startswith("error: ")
        assert str(out) in res.stderr and "not an earlier trtlm output" in res.stderr
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # untouched
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary sibling

    (out / "keep.txt").unlink()
    assert run_cli(*convert_args(tiny_mistral_dir, out)).exit_code == 0  # empty: written
    (out / "keep.txt").write_text("mine")
    res = run_cli(*convert_args(tiny_mistral_dir, out))  # an earlier output: needs --force
    assert res.exit_code != 0 and len(res.stderr_lines) == 1 and "--force" in res.stderr
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


# --------------------------------------------------------------------------------------------
# Bad invocations of every command: one table
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_engine(tmp_path_factory, make_tiny_mistral) -> dict[str, Path]:
    """A tiny Mistral (vocab 1001, with tokenizer) converted and built with --max-batch-size 2
    --max-input-len 8, and the paths the table refers to."""
    root = tmp_path_factory.mktemp("bad-invocations")
    model = make_tiny_mistral(tokenizer=True)
    ckpt, engine = root / "ckpt", root / "engine"
    assert run_cli("convert", "--model-dir", model, "--output-dir", ckpt, "--dtype", "float32").exit_code == 0
    res = run_cli("build", "--checkpoint-dir", ckpt, "--output-dir", engine, "--max-batch-size", "2",
                  "--max-input-len", "8")
    assert res.exit_code == 0, res.stderr
    (root / "a-file").write_text("not a directory\n")
    (root / "data.txt").write_text("def f():\n    return 1\n" * 20)
    return {"model": model, "ckpt": ckpt, "engine": engine, "file": root / "a-file", "data": root / "data.txt",
            "missing": root / "no-such-dir"}


def _cuda_case() -> tuple[str, str]:
    """`--device cuda` where no GPU is visible; a GPU index past the visible ones otherwise."""
    if not torch.cuda.is_available():
        return "cuda", "use --device cpu"
    return f"cuda:{torch.cuda.device_count()}", "CUDA GPU(s) visible"


CUDA_DEVICE, CUDA_NEEDLE = _cuda_case()
NINE_IDS = ",".join(str(i) for i in range(10, 19))

#: (id, argv with {placeholders}, needles the one error line must contain)
BAD_INVOCATIONS: list[tuple[str, list[str], list[str]]] = [
    # convert: numbers at the CLI boundary
    ("convert-tp-0", ["convert", "--model-dir", "{model}", "--output-dir", "{out}", "--tp-size", "0"], ["--tp-size", "0"]),
    ("convert-pp-negative", ["convert", "--model-dir", "{model}", "--output-dir", "{out}", "--pp-size", "-1"],
     ["--pp-size", "-1"]),
    ("convert-moe-ep-0", ["convert", "--model-dir", "{model}", "--output-dir", "{out}", "--moe-ep-size", "0"],
     ["--moe-ep-size", "0"]),
    ("convert-moe-tp-0", ["convert", "--model-dir", "{model}", "--output-dir", "{out}", "--moe-tp-size", "0"],
     ["--moe-tp-size"]),
    ("convert-moe-ep-not-dividing", ["convert", "--model-dir", "{model}", "--output-dir", "{out}", "--tp-size", "2",
                                     "--moe-ep-size", "3"], ["--moe-ep-size 3", "--tp-size 2", "valid --moe-ep-size: 1, 2"]),
    ("convert-moe-product", ["convert", "--model-dir", "{model}", "--output-dir", "{out}", "--tp-size", "4",
                             "--moe-tp-size", "3", "--moe-ep-size", "2"],
     ["--moe-tp-size 3 x --moe-ep-size 2 = 6", "--tp-size 4", "4x1, 2x2, 1x4"]),
    ("convert-workers-0", ["convert", "--model-dir", "{model}", "--output-dir", "{out}", "--workers", "0"], ["--workers"]),
    ("convert-calib-size-0", ["convert", "--model-dir", "{model}", "--output-dir", "{out}", "--quant", "fp8",
                              "--calib-size", "0"], ["--calib-size"]),
    ("convert-calib-seq-0", ["convert", "--model-dir", "{model}", "--output-dir", "{out}", "--calib-max-seq-len", "0"],
     ["--calib-max-seq-len"]),
    ("convert-group-0", ["convert", "--model-dir", "{model}", "--output-dir", "{out}", "--quant", "int4-wo",
                         "--awq-group-size", "0"], ["--awq-group-size"]),
    ("convert-alpha-above-1", ["convert", "--model-dir", "{model}", "--output-dir", "{out}", "--quant", "int8-sq",
                               "--smoothquant-alpha", "1.5"], ["--smoothquant-alpha", "1.5"]),
    ("convert-alpha-negative", ["convert", "--model-dir", "{model}", "--output-dir", "{out}",
                                "--smoothquant-alpha", "-0.1"], ["--smoothquant-alpha"]),
    ("convert-tp-not-a-number", ["convert", "--model-dir", "{model}", "--output-dir", "{out}", "--tp-size", "two"],
     ["--tp-size", "two"]),
    ("convert-unknown-quant", ["convert", "--model-dir", "{model}", "--output-dir", "{out}", "--quant", "int3"],
     ["--quant", "int3"]),
    ("convert-unknown-option", ["convert", "--model-dir", "{model}", "--output-dir", "{out}", "--tp", "2"],
     ["--tp", "trtlm convert --help"]),
    ("convert-no-output-dir", ["convert", "--model-dir", "{model}"], ["--output-dir"]),
    ("convert-output-below-a-file", ["convert", "--model-dir", "{model}", "--output-dir", "{file}/ckpt"],
     ["a-file", "is a file"]),
    ("convert-output-unwritable", ["convert", "--model-dir", "{model}", "--output-dir", "/proc/trtlm-no/ckpt"],
     ["--output-dir", "/proc/trtlm-no"]),
    ("convert-preset-and-model", ["convert", "--model-dir", "{model}", "--output-dir", "{out}", "--preset", "tiny"],
     ["--preset"]),
    ("convert-missing-model", ["convert", "--model-dir", "{missing}", "--output-dir", "{out}"],
     ["no-such-dir", "no such directory"]),
    # build
    ("build-batch-0", ["build", "--checkpoint-dir", "{ckpt}", "--output-dir", "{out}", "--max-batch-size", "0"],
     ["--max-batch-size"]),
    ("build-input-len-0", ["build", "--checkpoint-dir", "{ckpt}", "--output-dir", "{out}", "--max-input-len", "0"],
     ["--max-input-len"]),
    ("build-seq-len-0", ["build", "--checkpoint-dir", "{ckpt}", "--output-dir", "{out}", "--max-seq-len", "0"],
     ["--max-seq-len"]),
    ("build-workers-0", ["build", "--checkpoint-dir", "{ckpt}", "--output-dir", "{out}", "--workers", "0"],
     ["--workers"]),
    ("build-input-longer-than-seq", ["build", "--checkpoint-dir", "{ckpt}", "--output-dir", "{out}",
                                     "--max-input-len", "64", "--max-seq-len", "32"],
     ["--max-input-len 64", "--max-seq-len 32"]),
    ("build-from-hf-dir", ["build", "--checkpoint-dir", "{model}", "--output-dir", "{out}"],
     ["config.json", "not a TensorRT-LLM checkpoint"]),
    ("build-output-below-a-file", ["build", "--checkpoint-dir", "{ckpt}", "--output-dir", "{file}/engine"],
     ["is a file"]),
    # run
    ("run-id-outside-vocab", ["run", "--engine-dir", "{engine}", "--input-ids", "1,2,99999"],
     ["99999", "vocabulary", "[0, 1001)"]),
    ("run-negative-id", ["run", "--engine-dir", "{engine}", "--input-ids", "1,-1"], ["--input-ids", "negative"]),
    ("run-id-not-a-number", ["run", "--engine-dir", "{engine}", "--input-ids", "1,x"], ["--input-ids", "'x'"]),
    ("run-prompt-too-long", ["run", "--engine-dir", "{engine}", "--input-ids", NINE_IDS],
     ["9 tokens", "max_input_len 8"]),
    ("run-text-prompt-too-long", ["run", "--engine-dir", "{engine}", "--launch", "single", "--input-text",
                                  "The quick brown fox jumps over the lazy dog. " * 3], ["max_input_len 8"]),
    ("run-max-output-negative", ["run", "--engine-dir", "{engine}", "--input-ids", "1,2", "--max-output-len", "-3"],
     ["--max-output-len", "-3"]),
    ("run-max-output-0", ["run", "--engine-dir", "{engine}", "--input-ids", "1,2", "--max-output-len", "0"],
     ["--max-output-len"]),
    ("run-negative-temperature", ["run", "--engine-dir", "{engine}", "--input-ids", "1", "--temperature", "-1"],
     ["--temperature", "-1"]),
    ("run-top-p-above-1", ["run", "--engine-dir", "{engine}", "--input-ids", "1", "--top-p", "1.5"], ["--top-p"]),
    ("run-negative-top-k", ["run", "--engine-dir", "{engine}", "--input-ids", "1", "--top-k", "-2"], ["--top-k"]),
    ("run-misspelled-device", ["run", "--engine-dir", "{engine}", "--input-ids", "1", "--device", "cdua"],
     ["--device", "cdua", "did you mean 'cuda'"]),
    ("run-unavailable-cuda", ["run", "--engine-dir", "{engine}", "--input-ids", "1", "--launch", "single",
                              "--device", CUDA_DEVICE], ["--device", CUDA_NEEDLE]),
    ("run-no-prompt", ["run", "--engine-dir", "{engine}"], ["--input-text", "--input-ids"]),
    ("run-streaming-batch", ["run", "--engine-dir", "{engine}", "--input-text", "a", "--input-text", "b",
                             "--streaming"], ["--streaming", "got 2"]),
    ("run-streaming-json", ["run", "--engine-dir", "{engine}", "--input-text", "a", "--streaming", "--json"],
     ["--streaming", "--json"]),
    ("run-missing-engine", ["run", "--engine-dir", "{missing}", "--input-ids", "1"], ["--engine-dir", "no such directory"]),
    ("run-hf-dir-as-engine", ["run", "--engine-dir", "{model}", "--input-ids", "1"],
     ["--engine-dir", "Hugging Face checkpoint", "trtlm build"]),
    ("run-missing-input-file", ["run", "--engine-dir", "{engine}", "--input-file", "{missing}"], ["--input-file"]),
    ("run-dist-timeout-0", ["run", "--engine-dir", "{engine}", "--input-ids", "1", "--dist-timeout", "0"],
     ["--dist-timeout"]),
    ("run-no-cache-with-engine", ["run", "--engine-dir", "{engine}", "--input-ids", "1", "--no-cache"], ["--no-cache"]),
    # eval
    ("eval-missing-engine", ["eval", "--engine-dir", "{missing}", "--dataset", "{data}"], ["--engine-dir"]),
    ("eval-missing-dataset", ["eval", "--engine-dir", "{engine}", "--dataset", "{missing}"], ["--dataset"]),
    ("eval-seq-len-1", ["eval", "--engine-dir", "{engine}", "--dataset", "{data}", "--max-seq-len", "1"],
     ["--max-seq-len"]),
    ("eval-misspelled-device", ["eval", "--engine-dir", "{engine}", "--dataset", "{data}", "--device", "gpu"],
     ["--device", "'gpu'"]),
    # quickstart, inspect, new-plugin, cache, the group itself
    ("quickstart-tp-0", ["quickstart", "--work-dir", "{out}", "--tp-size", "0"], ["--tp-size"]),
    ("quickstart-output-0", ["quickstart", "--work-dir", "{out}", "--max-output-len", "0"], ["--max-output-len"]),
    ("quickstart-missing-model", ["quickstart", "--model-dir", "{missing}", "--work-dir", "{out}"],
     ["--model-dir", "no such directory"]),
    ("inspect-missing", ["inspect", "{missing}"], ["no-such-dir"]),
    ("new-plugin-installed-name", ["new-plugin", "mistral", "--directory", "{out}"],
     ["mistral", "trtlm-plugin-mistral", "already"]),
    ("new-plugin-bad-name", ["new-plugin", "Bad-Name", "--directory", "{out}"], ["Bad-Name"]),
    ("new-plugin-bad-architecture", ["new-plugin", "zeta", "--hf-architecture", "1Bad", "--directory", "{out}"],
     ["--hf-architecture"]),
    ("cache-clear-unknown-key", ["cache", "clear", "0123456789abcdef"], ["0123456789abcdef", "trtlm cache list"]),
    ("bench-batch-0", ["bench", "--engine-dir", "{engine}", "--device", "cpu", "--batch-size", "0"], ["--batch-size"]),
    ("bench-serve-prompts-0", ["bench", "serve", "--base-url", "http://127.0.0.1:1", "--num-prompts", "0"],
     ["--num-prompts", "0"]),
    ("bench-serve-timeout-negative", ["bench", "serve", "--base-url", "http://127.0.0.1:1", "--timeout", "-1"],
     ["--timeout", "-1"]),
    ("bench-serve-rate-not-a-number", ["bench", "serve", "--base-url", "http://127.0.0.1:1", "--request-rate",
                                       "fast"], ["--request-rate", "fast"]),
    # serve, triton-repo
    ("serve-port-out-of-range", ["serve", "--engine-dir", "{engine}", "--port", "70000"], ["--port", "70000"]),
    ("serve-request-timeout-0", ["serve", "--engine-dir", "{engine}", "--request-timeout", "0"],
     ["--request-timeout"]),
    ("triton-repo-batch-0", ["triton-repo", "--engine-dir", "{engine}", "--output-dir", "{out}", "--max-batch-size",
                             "0"], ["--max-batch-size"]),
    ("plugins-unknown-option", ["plugins", "--bogus"], ["--bogus", "trtlm plugins --help"]),
    ("unknown-command", ["conver"], ["conver"]),
]

#: run through the installed console script in a subprocess (the rest in this process)
SUBPROCESS = {"convert-tp-0", "convert-moe-ep-not-dividing", "build-batch-0", "run-id-outside-vocab",
              "run-misspelled-device", "convert-output-below-a-file", "new-plugin-installed-name"}


def test_help_describes_every_option():
    """`--help` of convert, build and run says what each option does."""
    import click

    from trtlm.cli import cli

    ctx = click.Context(cli, info_name="trtlm")
    for name in ("convert", "build", "run"):
        for param in cli.get_command(ctx, name).params:
            if isinstance(param, click.Option):
                assert param.help and len(param.help) > 10, f"trtlm {name} {param.opts[0]} has no help text"


def test_the_table_is_big_enough():
    assert len(BAD_INVOCATIONS) >= 30
    assert len({case[0] for case in BAD_INVOCATIONS}) == len(BAD_INVOCATIONS)
    commands = {argv[0] for _, argv, _ in BAD_INVOCATIONS}
    assert {"convert", "build", "run", "eval", "bench", "quickstart", "inspect", "plugins", "new-plugin",
            "cache"} <= commands


@pytest.mark.parametrize("case_id,argv,needles", BAD_INVOCATIONS, ids=[c[0] for c in BAD_INVOCATIONS])
def test_bad_invocation(case_id, argv, needles, small_engine, outs, tmp_path, monkeypatch):
    monkeypatch.setenv("TRTLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    paths = {**{k: str(v) for k, v in small_engine.items()}, "out": str(outs / "target")}
    args = [a.format(**paths) for a in argv]
    before = sorted(p.name for p in small_engine["engine"].parent.iterdir())
    if case_id in SUBPROCESS:
        proc = subprocess.run(console_script() + args, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, TRTLM_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1"))
        assert proc.stdout == "", proc.stdout
        from conftest import CliResult

        res = CliResult(proc.returncode, proc.stdout, proc.stderr)
    else:
        res = run_cli(*args)
    line = assert_clean_failure(res, outs, *needles)
    assert res.exit_code in (1, 2), line  # 2: click rejected the value (a usage error), 1: the input
    # nothing written next to the inputs either (no temporary or output directory)
    assert sorted(p.name for p in small_engine["engine"].parent.iterdir()) == before


# --------------------------------------------------------------------------------------------
# A shard truncated while it is being converted
# --------------------------------------------------------------------------------------------
def test_shard_truncated_after_its_header_was_read(model):
    """The header said the data is there; then the file shrank (a re-download overwriting it).
    Reading a tensor past the new end through the memory map would be SIGBUS (the process dies with
    no message): it must be the one-line error instead."""
    from trtlm.errors import UserError
    from trtlm.sources import SafetensorsSource, read_safetensors_header

    path = model / "model.safetensors"
    source = SafetensorsSource.from_dir(model)
    header = read_safetensors_header(path)
    last = max(header, key=lambda n: header[n]["data_offsets"][1])  # its bytes will lie past the end
    first = source.get("model.embed_tokens.weight").clone()  # readable before
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(UserError, match="truncated while converting") as info:
        source.get(last).sum()
    assert str(path) in str(info.value) and last in str(info.value) and "\n" not in str(info.value)
    assert first.numel() > 0


def test_placeholder_paths_are_one_line_errors():
    """README's snippet with its placeholder path: the check LLM calls before touching the path."""
    from trtlm.errors import UserError
    from trtlm.modeldir import check_model_path

    with pytest.raises(UserError, match=r"^model_dir path/to/hf-checkpoint: no such directory \(expected a Hugging"):
        check_model_path("path/to/hf-checkpoint", "model", "model_dir")
    with pytest.raises(UserError, match="engine_dir path/to/engine: no such directory.*trtlm build"):
        check_model_path("path/to/engine", "engine", "engine_dir")
