#!/usr/bin/env bash
# nvidia-h100-x1, ~8.5 min: with --wkv_op 1 the default, stage 2 A/B/A against --wkv_op 0, through Lightning,
# and stage 1 compiled. Carry [".whl", ".kcache", ".devrun"].
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do tar xJf $k; done; touch /tmp/marker; sleep 1
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5"
S1="--stages 1 --micro_bsz 16 --text_min 30 --text_len 100 --ragged"
f() { grep -v -E "Warning|warn\(|warn_once|^\s*$|litlogger|Tip|^E11|AUTOTUNE|SingleProcess"; }
r() { local t=$1 o=$2; shift 2; echo "## $*" >> $OUT/$o; timeout $t "$@" 2>&1 | f | cut -c1-420 >> $OUT/$o; }
NEW="env PYTHONPATH=/tmp/site:$PWD python3 benchmarks/bench_train_gpu.py"
r 75 ab.txt $NEW $S2 --steps 3 --warmup 2          # first run of the call: warms the machine, not compared
r 65 ab.txt $NEW $S2 --steps 20 --warmup 3
r 75 ab.txt $NEW $S2 --steps 20 --warmup 3 --wkv_op 0
r 65 ab.txt $NEW $S2 --steps 20 --warmup 3
r 85 ab.txt $NEW $S2 --steps 20 --warmup 3 --lightning
find .kernel_cache -newer /tmp/marker -type f | tar cJf $OUT/kcache_new.tar.xz -T -
r 125 s1.txt $NEW $S1 --steps 10 --warmup 3 --compile 1
ls -la $OUT; grep -E "^##|^ +[12] |OOM|Error|allocator" $OUT/ab.txt $OUT/s1.txt | cut -c1-250
