#!/usr/bin/env bash
# Eleventh session (nvidia-h100-x1): is the stage-2 step bound by the host? (1) Lightning stage 2 with master
# weights, default; (2) the same with inductor's C++ wrapper (kernels launched from C++, not Python);
# (3, 4) the plain loop at 1 sample of 577 + 20..30 tokens (GPU time small: the step time is the host's cost),
# default and C++ wrapper. Carry [".whl", ".kcache", ".devrun"].
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl .whl/pytest*.whl .whl/pluggy*.whl .whl/iniconfig*.whl .whl/pygments*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do tar xJf $k; done
touch /tmp/marker
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/s2.txt
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5 --steps 20 --warmup 3 --master_weights 1"
TINY="--stages 2 --micro_bsz 1 --text_min 20 --text_len 30 --ragged --grad_cp 0 --compile 1 --act_budget 0.5 --steps 20 --warmup 3 --master_weights 1"
CPP="--inductor cpp_wrapper=1"
i=0
for x in "$S2 --lightning|110" "$S2 --lightning $CPP|280" "$TINY|80" "$TINY $CPP|100"; do
  args=${x%|*}; lim=${x##*|}
  i=$((i+1)); echo "## $args" >> $OUT/s2.txt
  timeout -k 5 $lim python3 benchmarks/bench_train_gpu.py $args < /dev/null > /tmp/log 2>&1; echo "rc $?" >> $OUT/s2.txt; cp /tmp/log $OUT/log$i.txt
  pkill -9 -f compile_worker; grep -E "^ +2 |warm-up step 1|host time|synchronisations|^    [0-9]+ x |Error|error" /tmp/log | head -20 >> $OUT/s2.txt
done
find .kernel_cache -newer /tmp/marker -type f | tar cJf $OUT/kcache_new.tar.xz -T - 2>/dev/null
cat $OUT/s2.txt
