#!/usr/bin/env bash
# Session 8 (nvidia-h100-x1): stage 2 default vs inductor's coordinate-descent tuning of its Triton kernels vs no
# activation budget, default again. Carry [".whl", ".kcache", ".devrun"].
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do tar xJf $k; done
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1"
f() { grep -v -E "Warning|warn\(|warn_once|^\s*$|litlogger|Tip|^E11|AUTOTUNE|SingleProcess"; }
r() { local t=$1 o=$2; shift 2; echo "## $*" >> $OUT/$o; timeout $t "$@" 2>&1 | f | cut -c1-300 >> $OUT/$o; }
NEW="env PYTHONPATH=/tmp/site:$PWD python3 benchmarks/bench_train_gpu.py"
touch /tmp/marker
r 80 ab.txt $NEW $S2 --act_budget 0.5 --steps 20 --warmup 3
r 300 ab.txt $NEW $S2 --act_budget 0.5 --steps 20 --warmup 3 --inductor coordinate_descent_tuning=1
r 80 ab.txt $NEW $S2 --steps 20 --warmup 3
r 70 ab.txt $NEW $S2 --act_budget 0.5 --steps 20 --warmup 3
find .kernel_cache -newer /tmp/marker -type f | tar cJf $OUT/kcache_new.tar.xz -T - 2>/dev/null
grep -E "^##|^ +[12] |OOM|Error|host time|warm-up step 1" $OUT/ab.txt | cut -c1-250
