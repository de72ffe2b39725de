#!/usr/bin/env bash
# Twelfth session, call 4 (nvidia-h100-x1): why are kept-states runs whose graphs compile in the process (r52 run 2,
# r57 run 2: 346.9 / 335.7 ms, host-bound) slower than those whose graphs come from the cache (r53, r56: 311-313)?
# The bench now prints the time Python's cyclic GC takes in the timed steps. Stage 2 with --wkv_keep 1:
# A fresh compile (TORCHINDUCTOR_FORCE_DISABLE_CACHES=1), B from the cache (r57's entries), A again.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do tar xJf $k; done
touch /tmp/marker
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/s2.txt
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5 --steps 20 --warmup 3 --master_weights 1 --lightning --wkv_keep 1"
END=$((SECONDS + 570)); i=0
for x in "1|220" "0|100" "1|220"; do
  fresh=${x%|*}; lim=${x##*|}; left=$((END - SECONDS)); [ $left -lt $lim ] && lim=$left
  [ $lim -lt 30 ] && { echo "## skipped: fresh=$fresh" >> $OUT/s2.txt; continue; }
  i=$((i+1)); echo "## [box $lim s at $SECONDS s] fresh compile=$fresh" >> $OUT/s2.txt
  TORCHINDUCTOR_FORCE_DISABLE_CACHES=$fresh timeout -k 5 $lim python3 benchmarks/bench_train_gpu.py $S2 < /dev/null > /tmp/log 2>&1; echo "rc $? after $SECONDS s" >> $OUT/s2.txt; cp /tmp/log $OUT/log$i.txt
  pkill -9 -f compile_worker; grep -E "^ +2 |host time|GC|Error|error" /tmp/log | head -20 >> $OUT/s2.txt
done
cat $OUT/s2.txt
