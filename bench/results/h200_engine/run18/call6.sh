# run 18, call 6: the GEMM with x's windows copied by cp.async: kernel tests; against call 4's GEMM (x through registers) over window sizes and configurations
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
timeout 200 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_quant_kernels.py -k "w4 or int4 or one_row" > $OUT/w4_tests.txt 2>&1
grep -E "^(FAILED|ERROR)|passed|failed|Error" $OUT/w4_tests.txt | tail -8
timeout 300 python3 bench/results/h200_engine/run18/gemm_async.py $OUT/gemm_async.json 2>&1 | tee $OUT/gemm_async.txt
