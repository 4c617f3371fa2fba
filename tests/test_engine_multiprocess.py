"""The engine across processes: tensor (TP2), pipeline (PP2) and expert (EP2) parallel ranks.

One ``torchrun`` job of two processes runs three engines in turn (Mistral tp2, Mistral pp2,
Mixtral tp2 x ep2; one job because each process start costs seconds on a small machine).
Rank 0 owns each :class:`~trtlm.runtime.engine.Engine` (``DistributedLLM``) and drives it
with :func:`engine_driver.drive` exactly as ``test_engine.py`` does: requests arrive staggered,
prompts are chunked (16 tokens per step), the KV pool is small enough that
``max_utilization`` preempts and recomputes, one request shares another's prefix blocks,
one has ``n = 2`` (its partial block is copied on every rank) and one is aborted mid-decode.
The other rank executes what rank 0 broadcasts.  Everything rank 0 saw — tokens of every
completion, finish reasons, cached prompt tokens, preemptions, chunked steps — must equal the
same engine run in one process with its ranks merged, and the greedy tokens transformers'.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli, transformers_greedy
from engine_driver import drive

from trtlm.runtime.engine import Engine, EngineConfig
from trtlm.runtime.sampling import SamplingParams

pytestmark = [pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                 reason="torch built without torch.distributed / gloo"),
              pytest.mark.multiprocess]

TESTS = Path(__file__).resolve().parent
BLOCK = 8
POOL_BLOCKS = 12
#: (model type, HF model arguments as in test_multiprocess.py, convert mapping)
JOBS = {"tp2": ("mistral", dict(tokenizer=True), dict(tp_size=2)),
        "pp2": ("mistral", dict(tokenizer=True), dict(pp_size=2)),
        "ep2": ("mixtral", dict(), dict(tp_size=2, moe_ep_size=2))}

_g = torch.Generator().manual_seed(3)
PROMPTS = [torch.randint(3, 1001, (n,), generator=_g).tolist() for n in (20, 26, 5, 12, 17, 9, 0, 30)]
PROMPTS[6] = PROMPTS[1][:2 * BLOCK] + [7, 8, 9, 10]  # shares request 1's first two blocks
MAX_TOKENS = [10, 12, 6, 8, 12, 4, 9, 7]
N = [1, 1, 1, 2, 1, 1, 1, 1]
ARRIVALS = [0, 0, 0, 2, 2, 4, 5, 7]
ABORTS = {0: 6}  # request 0 (10 tokens to go) is cancelled at step 6, mid-decode
CONFIG = dict(block_size=BLOCK, max_num_tokens=16, capacity_policy="max_utilization")

SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[2])
from engine_driver import drive
from trtlm.api import DistributedLLM
from trtlm.runtime.engine import EngineConfig
from trtlm.runtime.executor import follow
from trtlm.runtime.sampling import SamplingParams

jobs = json.loads(open(sys.argv[1]).read())
results = []
for job in jobs:
    llm = DistributedLLM(job["engine"], engine_config=EngineConfig(**job["config"]))
    if llm.rank == 0:
        requests = [(p, SamplingParams(**k)) for p, k in zip(job["prompts"], job["params"])]
        run = drive(llm.engine, requests, job["arrivals"], {int(k): v for k, v in job["aborts"].items()})
        assert llm.engine.allocator.all_free()
        results.append(dict(run.summary(), num_blocks=llm.engine.allocator.num_blocks))
        llm.engine.executor.release(None)  # the other rank leaves its follower loop
    else:
        kind, _ = follow(llm.model, llm.state, llm._pool_box)
        assert kind == "done", kind
    if job is not jobs[-1]:
        continue
    if llm.rank == 0:
        open(sys.argv[3], "w").write(json.dumps(results))
    llm.close()
"""


def params() -> list[dict]:
    return [dict(max_tokens=m, n=n) for m, n in zip(MAX_TOKENS, N, strict=True)]


def rank0_kv_gb(engine_dir: Path, blocks: int) -> float:
    """``kv_cache_gb`` that gives rank 0 of this engine ``blocks`` KV blocks (its own layers and
    KV heads; every rank's pool has the same blocks, since rank 0's scheduler assigns them)."""
    cfg = json.loads((engine_dir / "config.json").read_text())["pretrained_config"]
    m = cfg["mapping"]
    layers = cfg["num_hidden_layers"] // m.get("pp_size", 1)
    kv_heads = max(1, cfg["num_key_value_heads"] // m.get("tp_size", 1))
    per_block = 2 * layers * BLOCK * kv_heads * cfg["head_size"] * 4  # float32
    return (blocks + 0.5) * per_block / 2 ** 30


def single_process(engine_dir: Path) -> dict:
    """The same run in one process (ranks merged), with a pool of the same number of blocks."""
    from trtlm.runtime.kv_cache import KVPool

    probe = Engine.from_engine_dir(engine_dir, config=EngineConfig(**CONFIG))
    spec = probe.executor.kv_cache_spec()
    gb = (POOL_BLOCKS + 0.5) * KVPool.bytes_per_block(spec["num_layers"], BLOCK, spec["kv_heads"],
                                                      spec["head_size"], 4) / 2 ** 30
    eng = Engine.from_engine_dir(engine_dir, config=EngineConfig(**CONFIG, kv_cache_gb=gb))
    assert eng.allocator.num_blocks == POOL_BLOCKS
    run = drive(eng, [(p, SamplingParams(**k)) for p, k in zip(PROMPTS, params(), strict=True)], ARRIVALS, ABORTS)
    assert eng.allocator.all_free()
    return dict(run.summary(), num_blocks=POOL_BLOCKS)


def test_tp2_pp2_ep2_ranks_equal_one_process_and_transformers(make_tiny_hf, make_engine, tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TRTLM_TEST_FAULT"):
        monkeypatch.delenv(var, raising=False)
    hf = {name: make_tiny_hf(model, **kw) for name, (model, kw, _) in JOBS.items()}
    engines = {name: make_engine(hf[name], **mapping) for name, (_, _, mapping) in JOBS.items()}
    jobs = [dict(engine=str(engines[name]), config=dict(CONFIG, kv_cache_gb=rank0_kv_gb(engines[name], POOL_BLOCKS)),
                 prompts=PROMPTS, params=params(), arrivals=ARRIVALS, aborts=ABORTS) for name in JOBS]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "job.py").write_text(SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                           str(tmp_path / "job.py"), str(tmp_path / "jobs.json"), str(TESTS),
                           str(tmp_path / "results.json")],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[:6000]
    results = dict(zip(JOBS, json.loads((tmp_path / "results.json").read_text()), strict=True))

    for name in JOBS:
        got, want = results[name], single_process(engines[name])
        assert got == want, name
        assert got["preemptions"] > 0 and got["partial_prefill_steps"] > 0, name
        assert got["num_cached_tokens"][6] == 2 * BLOCK, name
        assert got["finish_reasons"][0] == "abort" and 0 < len(got["token_ids"][0]) < MAX_TOKENS[0], name
        keep = [i for i in range(len(PROMPTS)) if i not in ABORTS]
        ref = transformers_greedy(hf[name], [PROMPTS[i] for i in keep], [MAX_TOKENS[i] for i in keep])
        assert [got["token_ids"][i] for i in keep] == ref, name
        assert got["completions"][3][0] == got["completions"][3][1]  # n = 2, greedy: the same twice


def test_trtlm_run_queues_more_prompts_than_the_batch_across_ranks(make_tiny_hf, make_engine, monkeypatch):
    """``trtlm run`` (its launcher starts the ranks) with 12 prompts, ``--max-batch-size 3``,
    ``--max-num-tokens 16`` and ``max_utilization`` on a 5-block pool (16-token blocks: rank 0
    holds 2 of the 4 layers), so rank 0's engine queues, chunks and runs short of blocks: every
    prompt still gets transformers' greedy tokens (pp2: rank 0 samples from logits the last
    stage sends back)."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TRTLM_TEST_FAULT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    model, kw, mapping = JOBS["pp2"]
    hf = make_tiny_hf(model, **kw)
    engine = make_engine(hf, **mapping)
    prompts = [torch.randint(3, 1001, (3 + 2 * i,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(12)]
    args = [a for p in prompts for a in ("--input-ids", ",".join(map(str, p)))]
    rank0_block = 2 * 2 * 16 * 2 * 16 * 4  # K and V x 2 layers x 16 tokens x 2 KV heads x 16 dims x float32
    res = run_cli("run", "--engine-dir", engine, *args, "--max-output-len", 6, "--json", "--max-batch-size", 3,
                  "--max-num-tokens", 16, "--capacity-policy", "max_utilization",
                  "--kv-cache-gb", 5.5 * rank0_block / 2 ** 30)
    assert res.exit_code == 0, res.stderr
    got = [o["output_ids"] for o in json.loads(res.stdout)["outputs"]]
    assert got == transformers_greedy(hf, prompts, 6)
