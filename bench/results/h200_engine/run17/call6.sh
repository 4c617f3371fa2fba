# run 17, call 6: the int4-awq batch-1 step with the GEMV's configurations varied in the engine, and run 16's GEMV
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
timeout 300 python3 bench/results/h200_engine/run17/engine_variants.py $OUT/engine_variants.json int4-awq 2>&1 | grep -v Warning | tail -8
