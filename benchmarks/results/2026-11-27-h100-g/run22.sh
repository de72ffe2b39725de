#!/usr/bin/env bash
# nvidia-h100-x1, ~8 min: the WKV custom-op GPU test (ops built outside the traced function), then stage 2
# HEAD default vs --wkv_op 1 with the outputs of the custom kernels kept (ops/partition.py), and two
# probes of the non-kernel time: expandable segments, dynamo guards skipped. Carry [".whl", ".kcache", ".devrun"].
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl .whl/pytest*.whl .whl/pluggy*.whl .whl/iniconfig*.whl .whl/pygments*.whl || exit 1
tar xJf .kcache/kcache.tar.xz; tar xJf .kcache/kcache2.tar.xz; touch /tmp/marker; sleep 1
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5"
f() { grep -v -E "Warning|warn\(|warn_once|^\s*$|litlogger|Tip|^E11|AUTOTUNE|SingleProcess"; }
r() { local t=$1 o=$2; shift 2; echo "## $*" >> $OUT/$o; timeout $t "$@" 2>&1 | f | cut -c1-420 >> $OUT/$o; }
NEW="env PYTHONPATH=/tmp/site:$PWD python3 benchmarks/bench_train_gpu.py"
PYTHONPATH=/tmp/site:$PWD timeout 90 python3 -m pytest -v -m gpu tests/test_wkv6.py -k "custom_ops" -p no:cacheprovider 2>&1 | grep -E "PASS|FAIL|ERROR|passed|failed|Error|^E " > $OUT/gpu_test.txt
r 80 ab.txt $NEW $S2 --steps 3 --warmup 2          # first run of the call: warms the machine, not compared
r 70 ab.txt $NEW $S2 --steps 20 --warmup 3
r 90 ab.txt $NEW $S2 --steps 20 --warmup 3 --wkv_op 1 --profile --profile_top 20
r 60 ab.txt $NEW $S2 --steps 20 --warmup 3 --wkv_op 1 --alloc expandable_segments:True
r 60 ab.txt $NEW $S2 --steps 20 --warmup 3 --wkv_op 1 --skip_guards 1
r 70 ab.txt $NEW $S2 --steps 20 --warmup 3 --wkv_op 1 --act_budget 0.6
r 45 ab.txt $NEW $S2 --steps 20 --warmup 3
find .kernel_cache -newer /tmp/marker -type f | tar cJf $OUT/kcache_new.tar.xz -T - ; ls -la $OUT
cat $OUT/gpu_test.txt; grep -E "^##|^ +[12] |synchron|wall|OOM|Error|allocator" $OUT/ab.txt | cut -c1-250
