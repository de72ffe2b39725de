#!/usr/bin/env bash
# Eleventh session (nvidia-h100-x1): where the host's 238 ms per stage-2 step go (r50: 1 sample of 577 + 20..30
# tokens, plain loop, the GPU nearly idle). (1) cProfile of 3 steps with the backward on the main thread, then
# torch.profiler's CPU operators; (2) the same run's timing with dynamo's guard checks skipped.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl .whl/pytest*.whl .whl/pluggy*.whl .whl/iniconfig*.whl .whl/pygments*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do tar xJf $k; done
touch /tmp/marker
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/s2.txt
TINY="--stages 2 --micro_bsz 1 --text_min 20 --text_len 30 --ragged --grad_cp 0 --compile 1 --act_budget 0.5 --steps 20 --warmup 3 --master_weights 1"
i=0
for x in "$TINY --host_profile 3|150" "$TINY --skip_guards 1|90" "$TINY --lightning|100"; do
  args=${x%|*}; lim=${x##*|}
  i=$((i+1)); echo "## $args" >> $OUT/s2.txt
  timeout -k 5 $lim python3 benchmarks/bench_train_gpu.py $args < /dev/null > /tmp/log 2>&1; echo "rc $?" >> $OUT/s2.txt; cp /tmp/log $OUT/log$i.txt
  pkill -9 -f compile_worker; grep -E "^ +2 |warm-up step 1|host time|synchronisations|^    [0-9]+ x |Error|error" /tmp/log | head -20 >> $OUT/s2.txt
done
find .kernel_cache -newer /tmp/marker -type f | tar cJf $OUT/kcache_new.tar.xz -T - 2>/dev/null
cat $OUT/s2.txt
