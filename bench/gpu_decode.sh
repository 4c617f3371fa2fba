#!/usr/bin/env bash
# GPU decode benchmarks + GPU tests, as run on the lent H100 (see docs/benchmarks.md, "GPU decode").
# Needs: wheels of core + plugins in dist_gpu/ (pip wheel --no-deps -w dist_gpu ./core ./plugins/mistral
# ./plugins/mixtral); writes JSON and logs under $OUT (default bench/results/).
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
B="trtlm bench --dummy-weights --input-len 128 --output-len 256 --dtype bfloat16 --device cuda --json"
run() { local name=$1 t=$2; shift 2; echo "== $name: $*"; timeout "$t" "$@" --output "$OUT/$name.json" >/dev/null; echo "rc=$?"; }
run mistral_7b 270 $B --family mistral --preset 7b --batch-size 1,8,64 --mode ${MODES:-graph,compile} \
    --compare-hf --hf-batch-size 1
run mixtral_8x7b_16layers 180 $B --family mixtral --preset 8x7b --layers 16 --batch-size 1,8,64 --mode ${MODES:-graph,compile}
echo "== GPU tests"
timeout 100 python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider -k "cuda or gpu" 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
