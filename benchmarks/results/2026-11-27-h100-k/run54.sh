#!/usr/bin/env bash
# For the twelfth session (nvidia-h100-x1): the WKV GPU tests of the committed code with a box long enough for the
# compiled 2-layer tests (r52/r53 cut them at 130/150 s: three compiles of ~50 s each), their kernel cache brought
# back; then stage 2 through Lightning with master weights, --wkv_keep 1 / 0 (the default is 1), and the
# longest batch (8 x 577 + 1400 tokens) with the states kept: does its peak still fit 80 GB?
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl .whl/pytest*.whl .whl/pluggy*.whl .whl/iniconfig*.whl .whl/pygments*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do tar xJf $k; done
touch /tmp/marker
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/s2.txt
timeout -k 5 200 python3 -m pytest -v -rf --tb=short -p no:cacheprovider tests/test_wkv6.py tests/test_rwkv6.py -k "gpu" > $OUT/gpu_test.txt 2>&1
echo "tests rc $?" >> $OUT/s2.txt; grep -E "PASSED|FAILED|passed|failed|^E " $OUT/gpu_test.txt | head -30 >> $OUT/s2.txt
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5 --steps 20 --warmup 3 --master_weights 1 --lightning"
i=0
LONG="--stages 2 --micro_bsz 8 --text_min 1400 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5 --steps 10 --warmup 3 --master_weights 1 --lightning"
for x in "$S2 --wkv_keep 1|95" "$S2 --wkv_keep 0|95" "$LONG --wkv_keep 1|110"; do
  args=${x%|*}; lim=${x##*|}
  i=$((i+1)); echo "## $args" >> $OUT/s2.txt
  timeout -k 5 $lim python3 benchmarks/bench_train_gpu.py $args < /dev/null > /tmp/log 2>&1; echo "rc $?" >> $OUT/s2.txt; cp /tmp/log $OUT/log$i.txt
  pkill -9 -f compile_worker; grep -E "^ +2 |host time|Error|error" /tmp/log | head -20 >> $OUT/s2.txt
done
find .kernel_cache -newer /tmp/marker -type f | tar cJf $OUT/kcache_new.tar.xz -T - 2>/dev/null
cat $OUT/s2.txt
