#!/usr/bin/env bash
# The engine on a GPU: GPU tests, then benchmarks (see docs/benchmarks.md, "The engine on the H200").
# Needs wheels of core + plugins in dist_gpu/:
#   pip wheel --no-deps -w dist_gpu ./core ./plugins/mistral ./plugins/mixtral ./plugins/mpt
# and, for STAGE=serve, the server's dependencies (fastapi, uvicorn, pydantic...) in dist_gpu/extra/.
# STAGE=tests|latency|offline|mixtral|serve|quant|all (default: tests,latency,offline,mixtral), comma-separated;
# QUANTS / MIXTRAL_QUANTS pick the formats of STAGE=quant; TESTS the test files of STAGE=tests.
# writes JSON and logs under $OUT (default bench/results/).
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
STAGE=${STAGE:-all}
[[ $STAGE == all ]] && STAGE=tests,latency,offline,mixtral
has() { [[ ",$STAGE," == *",$1,"* ]]; }
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
if has serve; then  # the server's extra, from wheels carried in dist_gpu/extra (the GPU machine has no network)
  python3 -m pip install -q --no-index --find-links dist_gpu/extra fastapi uvicorn httptools uvloop 2>&1 | tail -2
  python3 -c "import fastapi, uvicorn, httptools, uvloop" || { echo "serve stage: fastapi/uvicorn/httptools/uvloop missing from dist_gpu/extra"; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
B="trtlm bench --dummy-weights --dtype bfloat16 --device cuda --json"
run() { local name=$1 t=$2; shift 2; echo "== $name: $*"; timeout "$t" "$@" --output "$OUT/$name.json" 2>&1 | grep -v '^ \|^{\|^}' ; echo "rc=${PIPESTATUS[0]}"; }
if has tests; then
  echo "== GPU tests"
  timeout 300 python3 -m pytest -q -p no:cacheprovider -rfEs ${TESTS:-tests/test_gpu.py tests/test_fused_kernels.py \
      tests/test_paged_kernels.py tests/test_quant_kernels.py} > "$OUT/gpu_tests.txt" 2>&1
  grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/gpu_tests.txt"
fi
if has latency; then
  run mistral_7b_latency 300 $B --family mistral --preset 7b --mode latency --batch-size 1,8,64 \
      --input-len 128 --output-len 256 --compare-hf --hf-batch-size 1
fi
if has offline; then
  run mistral_7b_offline 420 $B --family mistral --preset 7b --mode offline --num-requests 1000 \
      --input-range 128-1024 --output-range 128-512 --max-batch-size 256 --max-num-tokens 8192
fi
if has mixtral; then
  run mixtral_8x7b_latency 300 $B --family mixtral --preset 8x7b --mode latency --batch-size 1,8 \
      --input-len 128 --output-len 256
fi
if has quant; then  # every format against bf16, same shapes, same run (issue 15's targets)
  for q in ${QUANTS-none fp8 int4-awq int4-wo int8-wo int8-sq}; do
    extra=(); [[ $q != none ]] && extra=(--quant "$q")
    run "quant_mistral_7b_$q" 150 $B --family mistral --preset 7b "${extra[@]}" --mode latency --batch-size 1,64 \
        --input-len 128 --output-len 128 --reps 2
  done
  for q in ${MIXTRAL_QUANTS-none fp8}; do
    extra=(); [[ $q != none ]] && extra=(--quant "$q")
    run "quant_mixtral_8x7b_$q" 200 $B --family mixtral --preset 8x7b "${extra[@]}" --mode latency --batch-size 1 \
        --input-len 128 --output-len 128 --reps 2
  done
fi
if has serve; then  # trtlm bench serve against trtlm serve, and the engine offline on the same requests
  W=/tmp/trtlm_serve_bench; rm -rf $W; mkdir -p $W
  python3 bench/serve_inputs.py $W --vocab 32000 --num-requests 1000 --input-range 128-1024 --output-range 128-512
  ( cd $W && time trtlm convert --family mistral --preset 7b --dummy-weights --dtype bfloat16 --output-dir ckpt \
    && trtlm build --checkpoint-dir ckpt --output-dir engine --max-batch-size 256 --max-input-len 1024 \
       --max-seq-len 1536 ) 2>&1 | tail -3
  # a Triton cache of its own for each of the server and the offline run (both compile cold, before
  # they are ready; a kernel compiled mid-load shows as a new cache entry)
  TRITON_CACHE_DIR=$W/triton_serve trtlm serve --engine-dir $W/engine --tokenizer-dir $W/tokenizer --device cuda --port 8000 --max-batch-size 256 \
      --max-queue-size 4096 > "$OUT/serve_server.log" 2>&1 &
  SERVER=$!
  for i in $(seq 240); do curl -sf localhost:8000/health >/dev/null && break; kill -0 $SERVER || break; sleep 1; done
  echo "server ready after ${i}s; Triton cache entries: $(ls $W/triton_serve 2>/dev/null | wc -l)"
  S="trtlm bench serve --base-url http://127.0.0.1:8000 --dataset $W/requests.jsonl --json"
  # what the server does under the unlimited load: running/waiting every 0.5 s, CPU of each process,
  # and (where py-spy was carried in dist_gpu/extra) 20 s profiles of the API and engine processes
  ENGINE_PID=$(pgrep -f "trtlm.serve.ranks" | head -1)
  ( for i in $(seq 160); do echo "t=$i $(curl -s localhost:8000/metrics | grep -E '^trtlm:num_requests_(running|waiting)' | awk '{printf "%s ", $2}') \
      $(ps -o times= -p $SERVER,$ENGINE_PID | tr '\n' ' ')"; sleep 0.5; done > "$OUT/serve_load_timeline.txt" ) &
  TIMELINE=$!
  if python3 -m pip install -q --no-index --find-links dist_gpu/extra py-spy 2>/dev/null && command -v py-spy >/dev/null; then
    ( sleep 10; py-spy record --nonblocking -p $SERVER -d 20 -r 100 -f raw -o "$OUT/serve_api_profile.txt" >/dev/null 2>&1 ) &
    PROFILERS="$!"
    ( sleep 10; py-spy record --nonblocking -p $ENGINE_PID -d 20 -r 100 -f raw -o "$OUT/serve_engine_profile.txt" >/dev/null 2>&1 ) &
    PROFILERS="$PROFILERS $!"
  fi
  run serve_unlimited 240 $S --num-prompts 1000 --request-rate inf
  kill $TIMELINE 2>/dev/null; wait $TIMELINE $PROFILERS  # not a bare `wait`: that would wait for the server too
  echo "Triton cache entries after the unlimited load: $(ls $W/triton_serve 2>/dev/null | wc -l)"
  # one file for the diagnostics: the device tool brings back at most 8 files
  ( cd "$OUT" && tar czf serve_diagnostics.tar.gz --remove-files serve_load_timeline.txt serve_*_profile.txt 2>/dev/null )
  run serve_concurrency64 240 $S --num-prompts 1000 --max-concurrency 64
  curl -s localhost:8000/metrics | grep -E "^trtlm:(num_requests|kv_cache|prompt_tokens|generation_tokens|request_success)" | head -30 > "$OUT/serve_metrics.txt"
  kill -TERM $SERVER; wait $SERVER; echo "server exit $?"
  TRITON_CACHE_DIR=$W/triton_offline run serve_offline_same_requests 240 trtlm bench --engine-dir $W/engine --device cuda --json --mode offline \
      --dataset $W/requests.jsonl --max-batch-size 256 --no-static-baseline
fi
