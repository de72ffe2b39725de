#!/usr/bin/env bash
# Ninth session (nvidia-h100-x1): why the CLI master-weights run on a GPU leaves the fp32-weight run (probe 2 and
# the model-level GPU test); then stage 2 (--master_weights 1, Lightning) at activation budgets 0.5 / 0.65 / 0.8.
# Carry [".whl", ".kcache", ".devrun"].
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl .whl/pytest*.whl .whl/pluggy*.whl .whl/iniconfig*.whl .whl/pygments*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do tar xJf $k; done
touch /tmp/marker
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/s2.txt
timeout -k 5 100 python3 -m pytest -q -s --tb=short -p no:cacheprovider .devrun/gpu_mw_probe2.py "tests/test_master_weights.py::test_bf16_linear_weights_same_loss_and_gradients_under_autocast" < /dev/null > $OUT/gpu_test.txt 2>&1
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --steps 20 --warmup 3 --master_weights 1 --lightning"
for b in 0.5 0.65 0.8 0.5; do
  echo "## act_budget $b" >> $OUT/s2.txt
  timeout -k 5 120 python3 benchmarks/bench_train_gpu.py $S2 --act_budget $b < /dev/null 2>&1 | grep --line-buffered -E "^ +2 |warm-up step 1|Error" >> $OUT/s2.txt
  pkill -9 -f compile_worker
done
find .kernel_cache -newer /tmp/marker -type f | tar cJf $OUT/kcache_new.tar.xz -T - 2>/dev/null
grep -E "passed|failed|^E |PROBE" $OUT/gpu_test.txt | head -60; cat $OUT/s2.txt
