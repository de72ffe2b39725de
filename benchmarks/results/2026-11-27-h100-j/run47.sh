#!/usr/bin/env bash
# Tenth session (nvidia-h100-x1), the committed state: the master-weight kernel equal to torch's fused AdamW,
# clipping norms summed in float64. GPU tests, then stage 2: --master_weights 1 through Lightning twice, in the
# plain loop, and fp32 weights in the plain loop (the baseline). Carry [".whl", ".kcache", ".devrun"].
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl .whl/pytest*.whl .whl/pluggy*.whl .whl/iniconfig*.whl .whl/pygments*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do tar xJf $k; done
touch /tmp/marker
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
timeout -k 5 150 python3 -m pytest -v --tb=short -p no:cacheprovider tests/test_master_weights.py tests/test_train_optim.py "tests/test_train.py::test_master_weights_follow_fp32_weights_under_bf16" < /dev/null > $OUT/gpu_test.txt 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/s2.txt
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5 --steps 20 --warmup 3"
i=0
for x in "--master_weights 1 --lightning" "--master_weights 1" "" "--master_weights 1 --lightning"; do
  i=$((i+1)); echo "## $x" >> $OUT/s2.txt
  timeout -k 5 100 python3 benchmarks/bench_train_gpu.py $S2 $x < /dev/null > /tmp/log 2>&1; cp /tmp/log $OUT/log$i.txt
  pkill -9 -f compile_worker; grep -E "^ +2 |warm-up step 1|host time|synchronisations|^    [0-9]+ x |Error" /tmp/log >> $OUT/s2.txt
done
find .kernel_cache -newer /tmp/marker -type f | tar cJf $OUT/kcache_new.tar.xz -T - 2>/dev/null
grep -E "passed|failed|^E |FAILED" $OUT/gpu_test.txt | head -30; cat $OUT/s2.txt
