"""Multi-process runtime: tensor, pipeline and expert parallel ranks as processes (gloo on CPU).

Each engine converted with tp/pp/ep runs as that many processes, each loading
only its own rank file (trtlm.runtime.launch starts them for ``trtlm run``;
torchrun works too).  Greedy tokens must equal the single-process engine's
(ranks merged in one process) and transformers'.  Faults are injected with the
test-only ``TRTLM_TEST_FAULT=RANK:CALL:MODE`` hook of trtlm.runtime.distributed.

Kept small: tiny models, 2-4 processes, one thread each, a few tokens.  Tests that start
processes are marked ``multiprocess`` (``-m "not multiprocess"`` leaves them out).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_cli, transformers_greedy

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch built without torch.distributed / gloo")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [15, 16, 17]]  # different lengths: left padding
NEW = 6
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread_per_rank(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("TRTLM_TEST_FAULT", raising=False)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)


# -- models and engines --------------------------------------------------------------------------------
HF_MODELS = {
    # the default tiny Mistral: GQA 4/2, sliding window 8 (shorter than prompt + output), 4 layers
    "mistral": dict(tokenizer=True),
    # 4 experts, top 2; tp 4 = moe_tp 2 x moe_ep 2 also duplicates the 2 KV heads
    "mixtral": dict(),
    # ALiBi, clip_qkv, LayerNorm, GELU; a wider init so greedy decoding does not repeat one token
    "mpt": dict(initializer_range=0.2),
}


@pytest.fixture(scope="module")
def hf_dir(make_tiny_hf):
    return lambda model_type: make_tiny_hf(model_type, **HF_MODELS[model_type])


@pytest.fixture(scope="module")
def engine(hf_dir, make_engine):
    """``engine(model_type, tp_size=, pp_size=, moe_tp_size=, moe_ep_size=)`` -> engine dir (cached)."""
    return lambda model_type, **mapping: make_engine(hf_dir(model_type), **mapping)


def single_process(engine_dir: Path, prompts=PROMPTS, new: int = NEW) -> list[list[int]]:
    """The same engine with its ranks merged into this process (what --launch single does)."""
    from trtlm.api import LLM

    return [o["output_ids"] for o in LLM(engine_dir).generate(prompts, max_new_tokens=new)]


def ids_args(prompts=PROMPTS) -> list[str]:
    args: list[str] = []
    for p in prompts:
        args += ["--input-ids", ",".join(map(str, p))]
    return args


def run_multi(engine_dir: Path, *extra) -> list[list[int]]:
    """``trtlm run --json`` on a multi-rank engine (default launch: one process per rank)."""
    res = run_cli("run", "--engine-dir", engine_dir, *ids_args(), "--max-output-len", NEW, "--json", *extra)
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 1, res.stdout  # one document: rank 0 prints, the others do not
    return [o["output_ids"] for o in json.loads(lines[0])["outputs"]]


def live_workers(launcher_pid: int) -> list[int]:
    """Processes started by the launcher ``launcher_pid`` that still exist (zombies excluded)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if f"TRTLM_LAUNCHER_PID={launcher_pid}".encode() not in (d / "environ").read_bytes().split(b"\0"):
                continue
            if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
        except OSError:
            continue
        found.append(int(d.name))
    return found


# -- tensor / pipeline parallel --------------------------------------------------------------------------
@pytest.mark.parametrize("mapping", [dict(tp_size=2), dict(pp_size=2), dict(tp_size=2, pp_size=2)],
                         ids=["tp2", "pp2", "tp2xpp2"])
@pytest.mark.multiprocess
def test_mistral_ranks_match_single_process_and_transformers(engine, hf_dir, mapping):
    eng = engine("mistral", **mapping)
    got = run_multi(eng)
    assert got == single_process(eng)
    assert got == transformers_greedy(hf_dir("mistral"), PROMPTS, NEW)
    assert got == single_process(engine("mistral"))  # and the tp1 engine


@pytest.mark.multiprocess
def test_streaming_text_is_printed_by_rank0_as_in_one_process(engine):
    """Streaming decodes text on rank 0 (pp2: rank 0 is not the rank that samples)."""
    eng = engine("mistral", pp_size=2)
    args = ("run", "--engine-dir", eng, "--input-text", "The quick brown", "--max-output-len", NEW, "--streaming")
    multi, single = run_cli(*args), run_cli(*args, "--launch", "single")
    assert multi.exit_code == 0 and single.exit_code == 0, multi.stderr + single.stderr
    assert multi.stdout == single.stdout
    assert multi.stdout.strip()


@pytest.mark.multiprocess
def test_torchrun_runs_the_cli_as_ranks(engine):
    eng = engine("mistral", tp_size=2)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--standalone", "-m", "trtlm.cli", "run", "--engine-dir", str(eng), *ids_args(),
                           "--max-output-len", str(NEW), "--json"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    assert [o["output_ids"] for o in json.loads(lines[0])["outputs"]] == single_process(eng)


API_SCRIPT = """
import json, sys, torch
from trtlm.api import DistributedLLM
llm = DistributedLLM(sys.argv[1])
prompts = json.loads(sys.argv[2]) if llm.rank == 0 else None  # only rank 0's arguments count
out = llm.generate(prompts, max_new_tokens=int(sys.argv[3]), keep_logits=True)
gen = llm.last_generation
rec = {"rank": llm.rank, "outputs": [o["output_ids"] for o in out]}
if llm.rank == 0:
    torch.save({"prompt": gen.prompt_logits, "steps": gen.step_logits}, sys.argv[4] + "/logits.pt")
open(sys.argv[4] + f"/rank{llm.rank}.json", "w").write(json.dumps(rec))
llm.close()
"""


@pytest.mark.multiprocess
def test_distributed_llm_api_under_torchrun_keeps_logits_on_rank0(engine, tmp_path):
    """Python API: every rank returns the same outputs; with pp2 the logits reach rank 0
    (a first-stage rank) and equal the single-process engine's."""
    from trtlm.api import LLM

    eng = engine("mistral", pp_size=2)
    script = tmp_path / "api.py"
    script.write_text(API_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--standalone", str(script), str(eng), json.dumps(PROMPTS), str(NEW), str(tmp_path)],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    recs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    llm = LLM(eng)
    want = llm.generate(PROMPTS, max_new_tokens=NEW, keep_logits=True)
    assert recs[0]["outputs"] == recs[1]["outputs"] == [o["output_ids"] for o in want]
    logits = torch.load(tmp_path / "logits.pt")
    ref = llm.last_generation
    torch.testing.assert_close(logits["prompt"], ref.prompt_logits, rtol=1e-5, atol=1e-5)
    assert len(logits["steps"]) == len(ref.step_logits)
    for got, exp in zip(logits["steps"], ref.step_logits):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)


# -- mixture of experts, MPT --------------------------------------------------------------------------
@pytest.mark.parametrize("mapping", [dict(tp_size=2, moe_ep_size=2), dict(tp_size=2, moe_tp_size=2),
                                     dict(tp_size=4, moe_tp_size=2, moe_ep_size=2)],
                         ids=["ep2", "moe_tp2", "moe_tp2xep2"])
@pytest.mark.multiprocess
def test_mixtral_expert_parallel_ranks(engine, hf_dir, mapping):
    eng = engine("mixtral", **mapping)
    cfg = json.loads((eng / "config.json").read_text())["pretrained_config"]["mapping"]
    assert (cfg["moe_tp_size"], cfg["moe_ep_size"]) == (mapping.get("moe_tp_size", 1), mapping.get("moe_ep_size", 1))
    got = run_multi(eng)
    assert got == single_process(eng)
    assert got == transformers_greedy(hf_dir("mixtral"), PROMPTS, NEW)


@pytest.mark.multiprocess
def test_mpt_tp2(engine, hf_dir):
    eng = engine("mpt", tp_size=2)
    got = run_multi(eng)
    assert got == single_process(eng)
    assert got == transformers_greedy(hf_dir("mpt"), PROMPTS, NEW)
    assert len(set(got[0])) > 1  # not a degenerate repetition


# -- faults ------------------------------------------------------------------------------------------------
def run_faulty(monkeypatch, eng: Path, fault: str, *extra):
    monkeypatch.setenv("TRTLM_TEST_FAULT", fault)
    res = run_cli("run", "--engine-dir", eng, *ids_args(), "--max-output-len", NEW, "--json", *extra)
    assert live_workers(os.getpid()) == []  # nothing left behind
    return res


@pytest.mark.multiprocess
def test_killed_rank_stops_the_job_with_its_error(engine, monkeypatch):
    res = run_faulty(monkeypatch, engine("mistral", tp_size=2, pp_size=2), "1:3:kill")
    assert res.exit_code == 1
    assert res.stderr_lines == ["error: rank 1 failed: killed by signal SIGKILL"]
    assert res.stdout == ""


@pytest.mark.multiprocess
def test_rank_exception_is_reported_in_one_line(engine, monkeypatch):
    res = run_faulty(monkeypatch, engine("mistral", tp_size=2), "1:2:raise")
    assert res.exit_code == 1
    assert res.stderr_lines == ["error: rank 1 failed: RuntimeError: injected fault at forward call 2 "
                                "(TRTLM_TEST_FAULT)"]


@pytest.mark.multiprocess
def test_hung_rank_ends_at_the_collective_timeout(engine, monkeypatch):
    res = run_faulty(monkeypatch, engine("mistral", tp_size=2), "1:2:hang", "--dist-timeout", "5")
    assert res.exit_code == 1
    [line] = res.stderr_lines
    assert line.startswith("error: rank 0 failed: ") and "imed out" in line, line


@pytest.mark.multiprocess
def test_rank0_refusal_reaches_every_rank(engine):
    res = run_cli("run", "--engine-dir", engine("mistral", tp_size=2), "--input-ids", "5,6", "--max-output-len",
                  "5000")
    assert res.exit_code == 1
    assert res.stderr_lines == ["error: rank 0 failed: prompt (2 tokens) + max_tokens (5000) = 5002 exceeds the "
                                "engine's max_seq_len 512"]
    assert live_workers(os.getpid()) == []


@pytest.mark.multiprocess
def test_killed_launcher_leaves_no_rank_behind(engine):
    """The ranks die with their launcher (PR_SET_PDEATHSIG), even while blocked in a collective."""
    eng = engine("mistral", tp_size=2)
    env = dict(os.environ, OMP_NUM_THREADS="1", TRTLM_TEST_FAULT="1:1:hang")
    launcher = subprocess.Popen([sys.executable, "-m", "trtlm.cli", "run", "--engine-dir", str(eng), *ids_args(),
                                 "--json", "--dist-timeout", "600"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in launcher.stderr:  # rank 1 hangs in its first forward; rank 0 waits in a collective
            if "hanging at forward call 1" in line:
                break
        else:
            pytest.fail("the ranks did not start")
        assert len(live_workers(launcher.pid)) == 2
    finally:
        launcher.kill()
        launcher.wait()
        launcher.stderr.close()
    deadline = time.monotonic() + 60
    while live_workers(launcher.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert live_workers(launcher.pid) == []


# -- launching checks that need no second process ----------------------------------------------------------
def test_torchrun_world_size_must_match_the_engine(engine, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    res = run_cli("run", "--engine-dir", engine("mistral", tp_size=2), "--input-ids", "5,6")
    assert res.exit_code == 1
    assert res.stderr_lines == ["error: rank 0: the engine has world_size 2 (tp 2 x pp 1) but 3 processes were "
                                "started (use torchrun --nproc-per-node 2)"]


def test_distributed_llm_needs_a_job(engine):
    from trtlm.api import DistributedLLM
    from trtlm.errors import UserError

    with pytest.raises(UserError, match="torchrun"):
        DistributedLLM(engine("mistral", tp_size=2))


def test_single_process_launch_merges_ranks(engine):
    eng = engine("mistral", tp_size=2, pp_size=2)
    res = run_cli("run", "--engine-dir", eng, *ids_args(), "--max-output-len", NEW, "--json", "--launch", "single")
    assert res.exit_code == 0, res.stderr
    assert [o["output_ids"] for o in json.loads(res.stdout)["outputs"]] == single_process(engine("mistral"))


# -- trtlm build --workers -----------------------------------------------------------------------------------
def test_build_workers_prepare_ranks_in_parallel(engine, tmp_path):
    """--workers N checks and places the ranks on a thread pool: same engine as one worker,
    and a bad rank file still fails with its name."""
    from safetensors.torch import load_file, save_file

    ckpt = engine("mistral", tp_size=2, pp_size=2).parent / "ckpt"
    outs = {}
    for workers in (1, 4):
        out = tmp_path / f"w{workers}"
        res = run_cli("build", "--checkpoint-dir", ckpt, "--output-dir", out, "--workers", workers)
        assert res.exit_code == 0, res.stderr
        outs[workers] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert outs[1] == outs[4]
    assert {"config.json", *(f"rank{r}.safetensors" for r in range(4))} <= set(outs[4])

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ckpt.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(bad / "rank2.safetensors"))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(bad / "rank2.safetensors"))
    res = run_cli("build", "--checkpoint-dir", bad, "--output-dir", tmp_path / "out", "--workers", 4)
    assert res.exit_code == 1
    assert res.stderr_lines == [f"error: {bad / 'rank2.safetensors'}: tensor {dropped} is missing "
                                f"(the network needs it)"]
