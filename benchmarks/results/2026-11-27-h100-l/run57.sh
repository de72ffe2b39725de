#!/usr/bin/env bash
# Twelfth session, call 3 (nvidia-h100-x1): r56's --wkv_keep 0 run called the recomputing op's backward with a
# list (a graph cached from an interim definition of the op, same name, in the carried kernel cache). Since then
# KeepOutputs.uuid hashes the ops' defining modules (ops/partition.py), so those graphs cannot match. The kernel
# cache is repacked without inductor's fxgraph/aotautograd entries (all keyed by the old uuid), so the first
# run of each variant compiles its graphs again. Stage 2 through Lightning with master weights: keep 0, keep 1, keep 0.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do tar xJf $k; done
touch /tmp/marker
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/s2.txt
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5 --steps 20 --warmup 3 --master_weights 1 --lightning"
END=$((SECONDS + 560)); i=0
for x in "$S2 --wkv_keep 0|230" "$S2 --wkv_keep 1|230" "$S2 --wkv_keep 0|110"; do
  args=${x%|*}; lim=${x##*|}; left=$((END - SECONDS)); [ $left -lt $lim ] && lim=$left
  [ $lim -lt 30 ] && { echo "## skipped: $args" >> $OUT/s2.txt; continue; }
  i=$((i+1)); echo "## [box $lim s at $SECONDS s] $args" >> $OUT/s2.txt
  timeout -k 5 $lim python3 benchmarks/bench_train_gpu.py $args < /dev/null > /tmp/log 2>&1; echo "rc $? after $SECONDS s" >> $OUT/s2.txt; cp /tmp/log $OUT/log$i.txt
  pkill -9 -f compile_worker; grep -E "^ +2 |host time|Error|error" /tmp/log | head -20 >> $OUT/s2.txt
done
find .kernel_cache -newer /tmp/marker -type f | tar cJf $OUT/kcache_new.tar.xz -T - 2>/dev/null
cat $OUT/s2.txt
