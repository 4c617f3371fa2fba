# run 17, call 11: call 10's failed test again, its assertion corrected (AWQ's fc and gate need not stack)
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_gpu.py -k "(quantized_engine_gpu_path or programmatic) and int4" > $OUT/gpu_tests.txt 2>&1
grep -E "^(FAILED|ERROR)|passed|failed|Error" $OUT/gpu_tests.txt | tail -8
