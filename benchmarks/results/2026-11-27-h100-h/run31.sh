#!/usr/bin/env bash
# Session 8 (nvidia-h100-x1): bf16 linear weights + fp32 masters (--master_weights 1) vs fp32 weights, stage 2, same
# call; GPU tests of the master-weight optimizer. Carry [".whl", ".kcache", ".devrun"].
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl .whl/pytest*.whl .whl/pluggy*.whl .whl/iniconfig*.whl .whl/pygments*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do tar xJf $k; done
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5"
f() { grep -v -E "Warning|warn\(|warn_once|^\s*$|litlogger|Tip|^E11|AUTOTUNE|SingleProcess"; }
r() { local t=$1 o=$2; shift 2; echo "## $*" >> $OUT/$o; timeout $t "$@" 2>&1 | f | cut -c1-300 >> $OUT/$o; }
NEW="env PYTHONPATH=/tmp/site:$PWD python3 benchmarks/bench_train_gpu.py"
touch /tmp/marker
PYTHONPATH=/tmp/site:$PWD timeout 60 python3 -m pytest -q tests/test_master_weights.py -p no:cacheprovider 2>&1 | tail -3 > $OUT/gpu_test.txt
r 75 ab.txt $NEW $S2 --steps 20 --warmup 3
r 80 ab.txt $NEW $S2 --steps 20 --warmup 3 --master_weights 1
r 100 ab.txt $NEW $S2 --steps 20 --warmup 3 --master_weights 1 --lightning
r 60 ab.txt $NEW $S2 --steps 20 --warmup 3
r 200 ab.txt $NEW $S2 --steps 20 --warmup 3 --master_weights 1 --inductor coordinate_descent_tuning=1
find .kernel_cache -newer /tmp/marker -type f | tar cJf $OUT/kcache_new.tar.xz -T - 2>/dev/null
cat $OUT/gpu_test.txt; grep -E "^##|^ +[12] |OOM|Error|host time" $OUT/ab.txt | cut -c1-250
