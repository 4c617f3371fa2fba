"""Conversion speed and memory: ``trtlm convert`` against ``cp -r`` of the same checkpoint.

Creates once (cached under ``--work-dir``, default /tmp/trtlm-bench) a ~1.5 GB
sharded bf16 checkpoint of the Mistral architecture with random weights
(hidden 2048, 14 layers, 16 heads / 4 KV heads, intermediate 5632, vocab 32000;
safetensors shards written directly, no transformers needed), then measures,
interleaved over ``--repeat`` rounds:

* ``cp``: ``cp -r`` of the checkpoint's files, then ``fsync`` of every copied
  file (the converter fsyncs its rank files before its atomic rename, so both
  sides include getting the bytes to disk);
* ``convert``: ``trtlm convert --tp-size 2 --dtype bfloat16`` (and ``--workers 2``)
  as a fresh process, as a user runs it.

Cache method: the page cache cannot be dropped without privileges, so instead
every measurement starts *warm*: the source files are read once (to
/dev/null) right before it, and the previous output is deleted.  Both sides
therefore read from memory and write through the page cache to disk.

Memory: while the convert process runs, ``/proc/<pid>/status`` is polled every
2 ms for ``RssAnon`` (anonymous resident memory: tensors, Python, torch; not
the page cache and not the mmapped safetensors pages) and ``VmHWM`` (the
kernel's own high-water mark of the whole RSS, file-backed pages included).
The child's ``ru_maxrss`` (from ``wait4``) is reported too: it equals VmHWM
at exit and so is an upper bound that counts mmapped source pages.

Targets: peak RssAnon <= 0.5 x checkpoint size + 0.6 GB; convert time <= 3 x cp time.

``--disk-speed`` measures instead the goal of the torch-free path (docs/benchmarks.md,
"Conversion at disk speed"): a 2.5 GB two-shard bf16 checkpoint (25 layers) converted to tp2
against ``dd bs=16M`` of the same shard files, ``sync`` before each run, source warm, best of
``--repeat``; the 1-minute load average before each run is recorded.  Target: convert <= 2 x dd.

    python bench/convert_bench.py                      # JSON on stdout
    python bench/convert_bench.py --repeat 5 --work-dir /data/trtlm-bench
    python bench/convert_bench.py --disk-speed         # 2.5 GB, 2 shards, tp2 vs dd bs=16M
    python bench/convert_bench.py --quant int8-wo      # the torch writer: quantized weights, the rest copied
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

GB = 1e9

CONFIG = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000, "hidden_size": 2048,
    "intermediate_size": 5632, "num_hidden_layers": 14, "num_attention_heads": 16, "num_key_value_heads": 4,
    "head_dim": 128, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "sliding_window": 4096, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    "dtype": "bfloat16",
}
SHARD_BYTES = 400_000_000


def hf_tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """HF Mistral tensor names and shapes for ``cfg``."""
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    D, heads, kv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (heads * D, H), p + "self_attn.k_proj.weight": (kv * D, H),
            p + "self_attn.v_proj.weight": (kv * D, H), p + "self_attn.o_proj.weight": (H, heads * D),
            p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I),
        })
    shapes["model.norm.weight"] = (H,)
    shapes["lm_head.weight"] = (V, H)
    return shapes


def make_checkpoint(model_dir: Path, cfg: dict, shard_bytes: int = SHARD_BYTES) -> None:
    """Write random bf16 shards + index + config.json, shard by shard (bounded memory)."""
    import torch
    from safetensors.torch import save_file

    tmp = model_dir.with_name(model_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in hf_tensor_shapes(cfg).items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if size and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = None  # placeholder: filled when the shard is written
        size += nbytes
    shapes = hf_tensor_shapes(cfg)
    weight_map, total = {}, 0
    for n, names in enumerate(shards, 1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            shape = shapes[name]
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            weight_map[name] = fname
            total += tensors[name].numel() * 2
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tmp.rename(model_dir)


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def warm_read(d: Path) -> None:
    """Read every file once so the measurement starts with the source in the page cache."""
    buf = bytearray(16 << 20)
    for f in sorted(d.iterdir()):
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def fsync_tree(d: Path) -> None:
    for f in sorted(d.rglob("*")):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def rusage_cpu(ru) -> float:
    return ru.ru_utime + ru.ru_stime


def time_cp(src: Path, dst: Path) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    warm_read(src)
    t0 = time.perf_counter()
    proc = subprocess.Popen(["cp", "-r", str(src), str(dst)])
    _, status, ru = os.wait4(proc.pid, 0)
    t_copy = time.perf_counter() - t0
    fsync_tree(dst)
    t_total = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("cp failed")
    return {"wall_s": t_total, "wall_without_fsync_s": t_copy, "cpu_s": rusage_cpu(ru)}


class StatusPoller(threading.Thread):
    """Polls /proc/<pid>/status for the peak RssAnon and VmHWM (kB) of a running process."""

    def __init__(self, pid: int, interval: float = 0.002):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_anon_kb = 0
        self.hwm_kb = 0
        self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        path = f"/proc/{self.pid}/status"
        while not self.stop.is_set():
            try:
                with open(path) as f:
                    text = f.read()
            except OSError:
                return
            for line in text.splitlines():
                if line.startswith("RssAnon:"):
                    self.peak_anon_kb = max(self.peak_anon_kb, int(line.split()[1]))
                elif line.startswith("VmHWM:"):
                    self.hwm_kb = max(self.hwm_kb, int(line.split()[1]))
            self.samples += 1
            time.sleep(self.interval)


def trtlm_cmd() -> list[str]:
    script = Path(sys.executable).parent / "trtlm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "trtlm.cli"]


def convert_args(tp: int, workers: int, quant: str | None) -> list[str]:
    quantize = ["--quant", quant] if quant else []
    return ["--tp-size", str(tp), "--dtype", "bfloat16", "--workers", str(workers), *quantize]


def time_convert(src: Path, dst: Path, tp: int, workers: int, quant: str | None = None) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    warm_read(src)
    cmd = trtlm_cmd() + ["convert", "--model-dir", str(src), "--output-dir", str(dst),
                         *convert_args(tp, workers, quant)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    poller = StatusPoller(proc.pid)
    poller.start()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    poller.stop.set()
    poller.join()
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"convert failed: {err.strip()}")
    return {"wall_s": wall, "cpu_s": rusage_cpu(ru), "peak_rss_anon_gb": poller.peak_anon_kb * 1024 / GB,
            "vm_hwm_gb": poller.hwm_kb * 1024 / GB, "ru_maxrss_gb": ru.ru_maxrss * 1024 / GB,
            "polls": poller.samples, "stdout": out.strip()}


def time_startup() -> float:
    """Fixed cost inside every convert run: a fresh interpreter importing torch and the pipeline."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import trtlm.convert.pipeline, trtlm.plugins; "
                    "trtlm.plugins.get_registry()"], check=True)
    return time.perf_counter() - t0


def time_dd(src: Path, dst: Path, fsync: bool = False) -> float:
    """``dd bs=16M`` of every shard file (a user-space copy of the same bytes), as one timed run;
    ``fsync``: ``conv=fsync``, the bytes on disk before dd exits, as the converter's rank files are."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    t0 = time.perf_counter()
    for f in sorted(src.glob("*.safetensors")):
        subprocess.run(["dd", f"if={f}", f"of={dst / f.name}", "bs=16M", "status=none",
                        *(["conv=fsync"] if fsync else [])], check=True)
    return time.perf_counter() - t0


def convert_imports_torch(model: Path, out: Path, tp: int) -> bool:
    """Whether the same conversion, run in a fresh interpreter, imported torch (it must not)."""
    shutil.rmtree(out, ignore_errors=True)
    code = ("import sys\nfrom trtlm.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    assert not e.code\nprint('torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code, "convert", "--model-dir", str(model), "--output-dir",
                           str(out), "--tp-size", str(tp), "--dtype", "bfloat16"], capture_output=True, text=True,
                          check=True)
    shutil.rmtree(out, ignore_errors=True)
    return proc.stdout.strip().splitlines()[-1] == "True"


def disk_speed(args) -> dict:
    """2.5 GB two-shard bf16 -> tp2 against dd bs=16M; sync + warm source before each run; best of N."""
    cfg = dict(CONFIG, num_hidden_layers=25)
    model = args.work_dir / "mistral-bf16-h2048-l25-2shards"
    total = sum(2 * int(__import__("math").prod(s)) for s in hf_tensor_shapes(cfg).values())
    if not (model / "config.json").exists():
        print(f"creating {model} ...", file=sys.stderr)
        make_checkpoint(model, cfg, shard_bytes=total // 2 + (1 << 20))
    runs: dict[str, list[dict]] = {"dd": [], "dd_fsync": [], "convert": []}
    kinds = list(runs)
    for i in range(args.repeat):
        # Rotate the order each round: on this VM whichever command runs first after the previous
        # round's outputs were deleted was slow (re-faulting freed memory), whatever it was.
        for kind in kinds[i % 3:] + kinds[:i % 3]:
            out = args.work_dir / f"{kind}-out"
            shutil.rmtree(out, ignore_errors=True)
            warm_read(model)
            subprocess.run(["sync"], check=True)
            load = os.getloadavg()[0]
            if kind.startswith("dd"):
                wall = time_dd(model, out, fsync=kind == "dd_fsync")
                runs[kind].append({"wall_s": wall, "load1": load})
            else:
                r = time_convert(model, out, args.tp_size, 1)
                runs[kind].append({"wall_s": r["wall_s"], "load1": load, "peak_rss_anon_gb": r["peak_rss_anon_gb"],
                                   "cpu_s": r["cpu_s"]})
            shutil.rmtree(out, ignore_errors=True)
        print(f"round {i + 1}/{args.repeat}: dd {runs['dd'][-1]['wall_s']:.2f}s, "
              f"dd conv=fsync {runs['dd_fsync'][-1]['wall_s']:.2f}s, "
              f"convert {runs['convert'][-1]['wall_s']:.2f}s (load {runs['convert'][-1]['load1']:.2f})",
              file=sys.stderr)
    best = {k: min(r["wall_s"] for r in v) for k, v in runs.items()}
    median = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    return {
        "checkpoint": {"path": str(model), "bytes": dir_bytes(model),
                       "shards": len(list(model.glob("*.safetensors")))},
        "command": f"trtlm convert --model-dir MODEL --output-dir OUT --tp-size {args.tp_size} --dtype bfloat16 "
                   f"--workers 1",
        "baseline": "for f in MODEL/*.safetensors: dd if=$f of=OUT/$f bs=16M [conv=fsync]",
        "method": f"source read once before each run, `sync` before each run, order rotated each round, "
                  f"best (and median) of {args.repeat}",
        "best_s": best, "ratio": best["convert"] / best["dd"], "target_ratio_max": 2.0,
        "ratio_vs_dd_fsync": best["convert"] / best["dd_fsync"],
        "median_s": median, "median_ratio": median["convert"] / median["dd"],
        "median_ratio_vs_dd_fsync": median["convert"] / median["dd_fsync"],
        "convert_imports_torch": convert_imports_torch(model, args.work_dir / "probe-out", args.tp_size),
        "peak_rss_anon_gb": max(r["peak_rss_anon_gb"] for r in runs["convert"]),
        "runs": runs, "loadavg_at_end": os.getloadavg(),
    }


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/trtlm-bench"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tp-size", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"])
    ap.add_argument("--quant", help="Convert with --quant (a weight-only format: no calibration), e.g. int8-wo")
    ap.add_argument("--disk-speed", action="store_true", help="2.5 GB two-shard checkpoint, tp2, against dd bs=16M")
    args = ap.parse_args(argv)
    if args.disk_speed:
        print(json.dumps(disk_speed(args), indent=2))
        return

    cfg = dict(CONFIG, num_hidden_layers=args.layers)
    work = args.work_dir
    model = work / f"mistral-bf16-h{cfg['hidden_size']}-l{cfg['num_hidden_layers']}"
    created = False
    if not (model / "config.json").exists():
        print(f"creating {model} ...", file=sys.stderr)
        make_checkpoint(model, cfg)
        created = True
    size = dir_bytes(model)

    cp_runs: list[dict] = []
    conv_runs: dict[int, list[dict]] = {w: [] for w in args.workers}
    startup = []
    for i in range(args.repeat):
        cp_runs.append(time_cp(model, work / "cp-out"))
        for w in args.workers:
            conv_runs[w].append(time_convert(model, work / "convert-out", args.tp_size, w, args.quant))
        startup.append(time_startup())
        print(f"round {i + 1}/{args.repeat}: cp {cp_runs[-1]['wall_s']:.2f}s, convert "
              + ", ".join(f"w{w} {conv_runs[w][-1]['wall_s']:.2f}s" for w in args.workers), file=sys.stderr)
    out_size = dir_bytes(work / "convert-out")
    shutil.rmtree(work / "cp-out", ignore_errors=True)
    shutil.rmtree(work / "convert-out", ignore_errors=True)

    cp_s = median_of(cp_runs, "wall_s")
    mem_target = 0.5 * size / GB + 0.6
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_at_end": os.getloadavg()},
        "checkpoint": {"path": str(model), "bytes": size, "gb": size / GB, "created_now": created,
                       "config": {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                      "vocab_size", "num_attention_heads", "num_key_value_heads")}},
        "method": "warm source (read once before each run), previous output deleted, medians of "
                  f"{args.repeat} interleaved rounds; cp = cp -r + fsync of copied files; convert = fresh "
                  "`trtlm convert` process (fsyncs its rank files); memory polled from /proc/<pid>/status every 2 ms",
        "cp": {"median_wall_s": cp_s, "median_wall_without_fsync_s": median_of(cp_runs, "wall_without_fsync_s"),
               "runs": cp_runs},
        "startup_import_s": statistics.median(startup),
        "convert": {},
        # the time target is for byte-moving conversions; quantizing is compute on top of that
        "targets": {"peak_rss_anon_gb_max": mem_target, "time_ratio_max": None if args.quant else 3.0},
        "output_bytes": out_size,
    }
    for w, runs in conv_runs.items():
        wall = median_of(runs, "wall_s")
        peak = max(r["peak_rss_anon_gb"] for r in runs)
        result["convert"][f"workers={w}"] = {
            "command": " ".join(["trtlm", "convert", "--model-dir", "MODEL", "--output-dir", "OUT",
                                 *convert_args(args.tp_size, w, args.quant)]),
            "median_wall_s": wall, "median_cpu_s": median_of(runs, "cpu_s"),
            "time_ratio_vs_cp": wall / cp_s,
            "peak_rss_anon_gb": peak, "max_vm_hwm_gb": max(r["vm_hwm_gb"] for r in runs),
            "max_ru_maxrss_gb": max(r["ru_maxrss_gb"] for r in runs),
            "meets_time_target": None if args.quant else wall <= 3.0 * cp_s, "meets_memory_target": peak <= mem_target,
            "runs": [{k: v for k, v in r.items() if k != "stdout"} for r in runs],
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
