#!/usr/bin/env bash
# nvidia-h100-x1: stage 2 Lightning vs plain loop, same machine, alternating (is run17's slow Lightning row order noise?).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl || exit 1
tar xJf .kcache/kcache.tar.xz
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5 --steps 20 --warmup 4"
f() { grep -v -E "Warning|warn\(|warn_once|^\s*$|litlogger|Tip|^E11|AUTOTUNE|SingleProcess"; }
r() { local t=$1; shift; echo "## $*" >> $OUT/lt.txt; timeout $t "$@" 2>&1 | f | cut -c1-300 >> $OUT/lt.txt; }
r 110 python3 benchmarks/bench_train_gpu.py $S2
r 100 python3 benchmarks/bench_train_gpu.py $S2 --lightning
r 80 python3 benchmarks/bench_train_gpu.py $S2
grep -E "^##|^ +2 |OOM|Error" $OUT/lt.txt
