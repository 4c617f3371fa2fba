# run 17, call 7: the GEMV's configuration per shape chosen by the engine's batch-1 int4-awq step
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
timeout 380 python3 bench/results/h200_engine/run17/engine_sweep.py $OUT/engine_sweep.json 330 2>&1 | grep "step "
