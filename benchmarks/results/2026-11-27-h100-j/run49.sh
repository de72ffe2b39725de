#!/usr/bin/env bash
# Tenth session (nvidia-h100-x1): stage 2 with --master_weights 1 through Lightning, without and with gc.freeze()
# at the start of training (the cyclic collector no longer scans the model), alternately. Carry [".whl", ".kcache", ".devrun"].
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl .whl/pytest*.whl .whl/pluggy*.whl .whl/iniconfig*.whl .whl/pygments*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do tar xJf $k; done
touch /tmp/marker
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/s2.txt
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5 --steps 20 --warmup 3"
i=0
T="--gc_freeze 1"
for x in "--master_weights 1 --lightning" "--master_weights 1 --lightning $T" "--master_weights 1 --lightning" "--master_weights 1 --lightning $T"; do
  i=$((i+1)); echo "## $x" >> $OUT/s2.txt
  timeout -k 5 110 python3 benchmarks/bench_train_gpu.py $S2 $x < /dev/null > /tmp/log 2>&1; cp /tmp/log $OUT/log$i.txt
  pkill -9 -f compile_worker; grep -E "^ +2 |warm-up step 1|host time|synchronisations|^    [0-9]+ x |Error" /tmp/log >> $OUT/s2.txt
done
find .kernel_cache -newer /tmp/marker -type f | tar cJf $OUT/kcache_new.tar.xz -T - 2>/dev/null
cat $OUT/s2.txt
