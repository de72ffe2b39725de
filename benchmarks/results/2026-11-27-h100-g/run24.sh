#!/usr/bin/env bash
# nvidia-h100-x2, ~5 min: stage 2 through Lightning on 1 GPU then DDP on 2 (target 2c), with --wkv_op 1 the default.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do tar xJf $k; done
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5 --lightning"
f() { grep -v -E "Warning|warn\(|warn_once|^\s*$|litlogger|Tip|^E11|AUTOTUNE|SingleProcess"; }
r() { local t=$1; shift; echo "## $*" >> $OUT/ddp.txt; timeout $t "$@" 2>&1 | f | cut -c1-300 >> $OUT/ddp.txt; }
r 100 python3 benchmarks/bench_train_gpu.py $S2 --steps 20 --warmup 3
r 175 python3 benchmarks/bench_train_gpu.py $S2 --steps 20 --warmup 3 --devices 2
grep -E "^##|^ +2 |OOM|Error" $OUT/ddp.txt
