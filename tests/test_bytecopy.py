"""The torch-free conversion path (trtlm.convert.bytecopy).

An unquantized same-dtype conversion is byte copying, so it must not pay for importing torch
(docs/benchmarks.md, "Conversion").  These tests check that it really imports no torch, that
what it writes is byte for byte what the torch writer writes for the same plan (tensor, pipeline
and expert layouts, KV-head repetition, vocabulary padding), that every split rule's torch-free
``index`` selects exactly what its ``take`` selects, and that bad sources still end in one line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import copy_model, edit_safetensors, run_cli
from trtlm.convert import bytecopy
from trtlm.convert.execute import write_checkpoint as torch_write_checkpoint
from trtlm.convert.options import ConvertOptions
from trtlm.convert.plan import by_spec
from trtlm.convert.pipeline import load, resolve_model
from trtlm.errors import UserError
from trtlm.layout import ExpertSplit, QKVSplit, Replicate, Split
from trtlm.mapping import Mapping
from trtlm.plugins import get_registry


def read_rank(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def plans(model_dir: Path, options: ConvertOptions):
    entry, _ = resolve_model(model_dir, None)
    hooks = get_registry().hooks(entry)
    loaded = load(hooks, model_dir, None, options)
    plan = hooks.trtlm_map_layers(hf_config=loaded.hf_config, options=options)
    plan = hooks.trtlm_quantize(plan=plan, loaded=loaded, options=options, hooks=hooks) or plan
    mapping = Mapping(options.tp_size, options.pp_size, options.moe_tp_size or 0, options.moe_ep_size or 0)
    return loaded, plan, mapping, hooks.trtlm_shard(plan=plan, mapping=mapping)


def test_unquantized_convert_imports_no_torch(tiny_mistral_dir, tmp_path):
    # A fresh interpreter runs the CLI's convert in-process, then reports what it imported.
    code = ("import sys\nfrom trtlm.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n")
    out = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, "-c", code, "convert", "--model-dir", str(tiny_mistral_dir),
                           "--output-dir", str(out), "--tp-size", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "NO-TORCH", proc.stdout
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == ["rank0.safetensors", "rank1.safetensors"]
    # The same command with a cast (float32 -> float16) needs torch, and takes the torch writer.
    proc = subprocess.run([sys.executable, "-c", code, "convert", "--model-dir", str(tiny_mistral_dir),
                           "--output-dir", str(tmp_path / "f16"), "--dtype", "float16"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "TORCH"


@pytest.mark.parametrize("layout", [
    dict(tp_size=1), dict(tp_size=2), dict(tp_size=4), dict(tp_size=2, pp_size=2),
    dict(tp_size=2, use_parallel_embedding=False),
])
@pytest.mark.parametrize("window,kernel_copy_min", [(bytecopy.WINDOW, bytecopy._KERNEL_COPY_MIN), (1000, 0),
                                                    (1000, 1 << 40)])
def test_byte_copies_equal_the_torch_writer(make_tiny_mistral, tmp_path, monkeypatch, layout, window,
                                            kernel_copy_min):
    # kernel_copy_min 0: every range copied file to file; 1 << 40: every range written from the mapping.
    monkeypatch.setattr(bytecopy, "_KERNEL_COPY_MIN", kernel_copy_min)
    # vocab 1001 does not divide by tp: lm_head and the parallel embedding get zero padding rows;
    # tp=4 > 2 KV heads: each KV head is repeated on two ranks.  A 1000-byte window cuts through
    # rows, pieces and the sources of fused qkv (tensors are read and written a window at a time).
    model_dir = make_tiny_mistral(max_shard_size=200_000)  # several shards
    assert len(list(model_dir.glob("*.safetensors"))) > 1
    options = ConvertOptions(**layout)
    loaded, plan, mapping, rank_plans = plans(model_dir, options)
    copies = bytecopy.plan_copies(plan, rank_plans, mapping, loaded.source, "float32")
    assert copies is not None
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    n_a, bytes_a = bytecopy.write_checkpoint(copies, mapping.world_size, tmp_path / "a", loaded.origin, workers=2,
                                             window=window)
    n_b, bytes_b = torch_write_checkpoint(plan, rank_plans, mapping, loaded, "float32", tmp_path / "b",
                                          copy_bytes=False)  # every tensor built by torch: the reference
    assert (n_a, bytes_a) == (n_b, bytes_b)
    for r in range(mapping.world_size):
        a, b = (tmp_path / d / f"rank{r}.safetensors" for d in "ab")
        assert a.read_bytes() == b.read_bytes(), f"rank{r} differs"


@pytest.mark.parametrize("quant", ["int8-wo", "int4-wo"])
def test_the_torch_writer_copies_what_it_need_not_build(tiny_mistral_dir, tmp_path, quant):
    # A weight-only quantized conversion builds the quantized linear weights and their scales with
    # torch, and copies the rest (embeddings, norms): the result is byte for byte what building
    # every tensor gives.
    from trtlm import dtypes

    loaded, plan, mapping, rank_plans = plans(tiny_mistral_dir, ConvertOptions(tp_size=2, quant=quant, awq_group_size=32))
    targets = by_spec(rank_plans)
    copied = {spec.name for spec in plan.tensors
              if bytecopy.tensor_copy(spec, targets[spec.name], loaded.source, mapping, dtypes.get("float32"))}
    assert {"transformer.vocab_embedding.weight", "transformer.ln_f.weight", "lm_head.weight"} <= copied
    assert "transformer.layers.0.attention.qkv.weight" not in copied  # quantized: built
    for d, copy_bytes in (("a", True), ("b", False)):
        (tmp_path / d).mkdir()
        torch_write_checkpoint(plan, rank_plans, mapping, loaded, "float32", tmp_path / d, workers=2,
                               copy_bytes=copy_bytes)
    for r in range(mapping.world_size):
        a, b = (tmp_path / d / f"rank{r}.safetensors" for d in "ab")
        assert a.read_bytes() == b.read_bytes(), f"rank{r} differs"


def test_dtype_cast_and_other_sources_fall_back(make_tiny_mistral):
    model_dir = make_tiny_mistral()
    loaded, plan, mapping, rank_plans = plans(model_dir, ConvertOptions())
    assert bytecopy.plan_copies(plan, rank_plans, mapping, loaded.source, "float16") is None  # a cast
    from trtlm.sources import StateDictSource

    in_memory = StateDictSource({n: loaded.source.get(n) for n in loaded.source.keys()})
    assert bytecopy.plan_copies(plan, rank_plans, mapping, in_memory, "float32") is None


RULES = [
    (Replicate(), (10, 3)), (Split(0), (8, 3)), (Split(0, pad=True), (10, 3)), (Split(1), (5, 8)),
    (Split(0, pad=True), (7,)), (QKVSplit(4, 2, 2), (16, 3)), (QKVSplit(4, 4, 2), (24, 5)),
    (QKVSplit(8, 1, 2), (20, 3)), (ExpertSplit(None), (4, 6, 3)), (ExpertSplit(1, halves=2), (4, 8, 3)),
]


@pytest.mark.parametrize("rule,shape", RULES)
@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 1), (4, 1), (2, 2), (4, 2)])
def test_split_index_selects_what_take_selects(rule, shape, tp, ep):
    mapping = Mapping(tp_size=tp, moe_ep_size=ep)
    # Distinct values (1-based, so the zero padding is distinguishable) laid out in the full shape.
    full = torch.arange(1, torch.Size(shape).numel() + 1).view(shape)
    for tp_rank in range(tp):
        try:
            expected = rule.take(full, mapping, tp_rank)
        except ValueError:  # index() raises too, or leaves the tensor to take() (None)
            try:
                assert rule.index(shape, mapping, tp_rank) is None
            except ValueError:
                pass
            continue
        index = rule.index(shape, mapping, tp_rank)
        if index is None:  # not an index along one dim: the torch writer builds it
            assert isinstance(rule, ExpertSplit) and mapping.moe_tp_size > 1
            continue
        dim, indices = index
        padded = torch.cat([full, torch.zeros_like(full.narrow(dim, 0, 1))], dim=dim)
        got = padded.index_select(dim, torch.tensor([i if i >= 0 else shape[dim] for i in indices]))
        assert torch.equal(got, expected), (rule, shape, tp_rank)


def test_nan_in_a_source_is_one_line(make_tiny_mistral, tmp_path):
    model_dir = copy_model(make_tiny_mistral(dtype=torch.bfloat16), tmp_path / "m")
    shard = next(model_dir.glob("*.safetensors"))
    edit_safetensors(shard, lambda t: t["model.layers.1.mlp.up_proj.weight"].view(-1).__setitem__(7, float("inf")))
    res = run_cli("convert", "--model-dir", model_dir, "--output-dir", tmp_path / "out", "--tp-size", "2")
    assert res.exit_code == 1
    assert res.stderr_lines == [f"error: {model_dir}: tensor model.layers.1.mlp.up_proj.weight contains NaN or Inf "
                                f"values"]
    assert not (tmp_path / "out").exists()


def test_all_finite_finds_each_special_value():
    from trtlm import dtypes

    for name in ("bfloat16", "float16", "float32"):
        entry = dtypes.get(name)
        t = torch.randn(300_000).to(getattr(torch, name))
        data = memoryview(t.view(torch.uint8).numpy())
        assert bytecopy.all_finite(data, entry, {})
        for bad in (float("nan"), float("inf"), float("-inf")):
            u = t.clone()
            u[200_123] = bad  # past the first check chunk
            assert not bytecopy.all_finite(memoryview(u.view(torch.uint8).numpy()), entry, {}), (name, bad)
        largest = t.clone()
        largest[5] = torch.finfo(t.dtype).max
        largest[6] = -torch.finfo(t.dtype).max
        assert bytecopy.all_finite(memoryview(largest.view(torch.uint8).numpy()), entry, {})


def test_shard_truncated_while_converting_is_one_line(make_tiny_mistral, tmp_path):
    model_dir = copy_model(make_tiny_mistral(), tmp_path / "m")
    loaded, plan, mapping, rank_plans = plans(model_dir, ConvertOptions(tp_size=2))
    copies = bytecopy.plan_copies(plan, rank_plans, mapping, loaded.source, "float32")
    shard = next(model_dir.glob("*.safetensors"))
    os.truncate(shard, shard.stat().st_size // 2)  # after the headers were read
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match=r"truncated while converting .* re-download it") as err:
        bytecopy.write_checkpoint(copies, mapping.world_size, tmp_path / "out", loaded.origin)
    assert str(shard) in str(err.value) and "\n" not in str(err.value)


def test_bytecopy_config_and_files_match_cli(tiny_mistral_dir, tmp_path):
    res = run_cli("convert", "--model-dir", tiny_mistral_dir, "--output-dir", tmp_path / "out", "--tp-size", "2",
                  "--workers", "2")
    assert res.exit_code == 0, res.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["mapping"]["tp_size"] == 2
    rank0 = read_rank(tmp_path / "out" / "rank0.safetensors")
    assert rank0["transformer.vocab_embedding.weight"].shape == (501, 64)  # 1001 rows padded to 1002, split


@pytest.mark.parametrize("flags", [[], ["--dtype", "float16"]], ids=["byte-copies", "torch-writer"])
def test_output_that_cannot_be_created_is_one_line(tiny_mistral_dir, tmp_path, flags):
    # A file size limit stands in for a full disk: creating a rank file at its full size fails; the
    # conversion ends in one line naming the rank file of --output-dir (not the temporary directory
    # it is written in), and leaves no output directory -- on both writing paths.
    import resource
    import signal

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "trtlm.cli", "convert", "--model-dir", str(tiny_mistral_dir),
                           "--output-dir", str(out), *flags], capture_output=True, text=True, timeout=300,
                          preexec_fn=limit_file_size)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {out / 'rank0.safetensors'}: cannot create (File too large)"), lines[0]
    assert not out.exists()
