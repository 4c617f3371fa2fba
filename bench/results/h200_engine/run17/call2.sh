# run 17, call 2: the GEMV with bulk copies (cp.async.bulk + mbarrier) and x staged by cp.async; tests; sweep
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_quant_kernels.py -k "w4" -x > $OUT/w4_tests.txt 2>&1
grep -E "^(FAILED|ERROR)|passed|failed|Error|assert" $OUT/w4_tests.txt | tail -15
timeout 300 python3 bench/results/h200_engine/run17/gemv_sweep.py $OUT/gemv_sweep.json sweep 230 2>&1 | tee $OUT/gemv_sweep.txt
