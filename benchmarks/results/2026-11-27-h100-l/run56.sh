#!/usr/bin/env bash
# Twelfth session, call 2 (same warm nvidia-h100-x1): stage 2 through Lightning with master weights, --wkv_keep
# 1 / 0 / 1 (the default is 1), then the longest batch (8 x 577 + 1400 tokens) with the states kept: its peak.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl || exit 1
[ -d .kernel_cache ] || for k in .kcache/kcache*.tar.xz; do tar xJf $k; done
touch /tmp/marker2
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/s2.txt
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5 --steps 20 --warmup 3 --master_weights 1 --lightning"
LONG="--stages 2 --micro_bsz 8 --text_min 1400 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5 --steps 10 --warmup 3 --master_weights 1 --lightning"
i=0
for x in "$S2 --wkv_keep 1|100" "$S2 --wkv_keep 0|100" "$S2 --wkv_keep 1|100" "$LONG --wkv_keep 1|120"; do
  args=${x%|*}; lim=${x##*|}
  i=$((i+1)); echo "## $args" >> $OUT/s2.txt
  timeout -k 5 $lim python3 benchmarks/bench_train_gpu.py $args < /dev/null > /tmp/log 2>&1; echo "rc $?" >> $OUT/s2.txt; cp /tmp/log $OUT/log$i.txt
  pkill -9 -f compile_worker; grep -E "^ +2 |host time|Error|error" /tmp/log | head -20 >> $OUT/s2.txt
done
find .kernel_cache -newer /tmp/marker2 -type f | tar cJf $OUT/kcache_new.tar.xz -T - 2>/dev/null
cat $OUT/s2.txt
