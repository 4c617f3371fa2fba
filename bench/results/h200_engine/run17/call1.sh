# run 17, call 1: GPU tests of run 16's last commits and of the streamed GEMV; the GEMV sweep
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_quant_kernels.py -k "w4 or int4 or one_row" -x > $OUT/w4_tests.txt 2>&1
grep -E "^(FAILED|ERROR)|passed|failed|Error" $OUT/w4_tests.txt | tail -15
timeout 260 python3 bench/results/h200_engine/run17/gemv_sweep.py $OUT/gemv_sweep.json sweep 200 2>&1 | tee $OUT/gemv_sweep.txt | grep -v "^   " 
grep "^   " $OUT/gemv_sweep.txt | sort -t' ' -k1,1 | head -0
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_gpu.py -k "(quantized_engine_gpu_path or programmatic) and int4" > $OUT/engine_tests.txt 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" $OUT/engine_tests.txt | tail -8
