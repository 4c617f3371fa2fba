#!/usr/bin/env bash
# The engine on a GPU: GPU tests, then benchmarks (see docs/benchmarks.md, "The engine on the H200").
# Needs wheels of core + plugins in dist_gpu/:
#   pip wheel --no-deps -w dist_gpu ./core ./plugins/mistral ./plugins/mixtral ./plugins/mpt
# STAGE=tests|latency|offline|mixtral|all (default all); writes JSON and logs under $OUT (default bench/results/).
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
STAGE=${STAGE:-all}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
B="trtlm bench --dummy-weights --dtype bfloat16 --device cuda --json"
run() { local name=$1 t=$2; shift 2; echo "== $name: $*"; timeout "$t" "$@" --output "$OUT/$name.json" 2>&1 | grep -v '^ \|^{\|^}' ; echo "rc=${PIPESTATUS[0]}"; }
if [[ $STAGE == tests || $STAGE == all ]]; then
  echo "== GPU tests"
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_paged_kernels.py \
      tests/test_quant_kernels.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
fi
if [[ $STAGE == latency || $STAGE == all ]]; then
  run mistral_7b_latency 300 $B --family mistral --preset 7b --mode latency --batch-size 1,8,64 \
      --input-len 128 --output-len 256 --compare-hf --hf-batch-size 1
fi
if [[ $STAGE == offline || $STAGE == all ]]; then
  run mistral_7b_offline 420 $B --family mistral --preset 7b --mode offline --num-requests 1000 \
      --input-range 128-1024 --output-range 128-512 --max-batch-size 256 --max-num-tokens 8192
fi
if [[ $STAGE == mixtral || $STAGE == all ]]; then
  run mixtral_8x7b_latency 300 $B --family mixtral --preset 8x7b --mode latency --batch-size 1,8 \
      --input-len 128 --output-len 256
fi
