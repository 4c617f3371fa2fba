# run 18, call 8: what AWQ's pre-quant scale costs the GEMM; GPU tests at the committed kernel code
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
timeout 120 python3 bench/results/h200_engine/run18/gemm_prequant.py $OUT/gemm_prequant.json 2>&1 | tee $OUT/gemm_prequant.txt
timeout 240 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_quant_kernels.py tests/test_gpu.py -k "not test_gpu or int4" > $OUT/gpu_tests.txt 2>&1
grep -E "^(FAILED|ERROR)|passed|failed|Error" $OUT/gpu_tests.txt | tail -8
