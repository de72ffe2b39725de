#!/usr/bin/env bash
# Eleventh session (nvidia-h100-x1): r52's GPU tests again with their failure printed (r52's box cut them),
# after making _fla_packed_ops() and _fla_packed_ops(False) one build; then stage 2 through Lightning with
# master weights, --wkv_keep 1 / 0 / 1.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl .whl/pytest*.whl .whl/pluggy*.whl .whl/iniconfig*.whl .whl/pygments*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do tar xJf $k; done
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/s2.txt
timeout -k 5 150 python3 -m pytest -q -rf --tb=short -p no:cacheprovider tests/test_wkv6.py tests/test_rwkv6.py -k "gpu" > $OUT/gpu_test.txt 2>&1
echo "tests rc $?" >> $OUT/s2.txt; grep -E "passed|failed|^FAILED|^E " $OUT/gpu_test.txt | head -20 >> $OUT/s2.txt
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5 --steps 20 --warmup 3 --master_weights 1 --lightning"
i=0
for x in "$S2 --wkv_keep 1|95" "$S2 --wkv_keep 0|95" "$S2 --wkv_keep 1|95"; do
  args=${x%|*}; lim=${x##*|}
  i=$((i+1)); echo "## $args" >> $OUT/s2.txt
  timeout -k 5 $lim python3 benchmarks/bench_train_gpu.py $args < /dev/null > /tmp/log 2>&1; echo "rc $?" >> $OUT/s2.txt; cp /tmp/log $OUT/log$i.txt
  pkill -9 -f compile_worker; grep -E "^ +2 |host time|Error|error" /tmp/log | head -20 >> $OUT/s2.txt
done
cat $OUT/s2.txt
