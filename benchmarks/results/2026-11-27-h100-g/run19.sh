#!/usr/bin/env bash
# For the next session (nvidia-h100-x1, ~9 min; then run21.sh): HEAD vs dd9f611 (.base2) stage 2 (not first in the call), HEAD's profile
# (host syncs: 2 expected), WKV as custom ops (--wkv_op 1, profiled), stage 1 HEAD vs eager; the custom-op GPU tests first. Carry [".whl", ".kcache", ".devrun", ".base2"].
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl .whl/pytest*.whl .whl/pluggy*.whl .whl/iniconfig*.whl .whl/pygments*.whl || exit 1
tar xJf .kcache/kcache.tar.xz; ls .kcache/kcache2.tar.xz 2>/dev/null && tar xJf .kcache/kcache2.tar.xz; touch /tmp/marker; sleep 1
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5"
S1="--stages 1 --micro_bsz 16 --text_min 30 --text_len 100 --ragged"
f() { grep -v -E "Warning|warn\(|warn_once|^\s*$|litlogger|Tip|^E11|AUTOTUNE|SingleProcess"; }
r() { local t=$1 o=$2; shift 2; echo "## $*" >> $OUT/$o; timeout $t "$@" 2>&1 | f | cut -c1-420 >> $OUT/$o; }
NEW="env PYTHONPATH=/tmp/site:$PWD python3 benchmarks/bench_train_gpu.py"
BASE="env PYTHONPATH=/tmp/site:$PWD/.base2 python3 .base2/benchmarks/bench_train_gpu.py"
PYTHONPATH=/tmp/site:$PWD timeout 140 python3 -m pytest -v -m gpu tests/test_wkv6.py -k "custom_ops or primed" -p no:cacheprovider 2>&1 | grep -E "PASS|FAIL|ERROR|passed|failed|Error|assert" > $OUT/gpu_test.txt
r 80 ab.txt $NEW $S2 --steps 3 --warmup 2          # first run of the call: warms the machine, not compared
r 110 ab.txt $BASE $S2 --steps 20 --warmup 3
r 90 ab.txt $NEW $S2 --steps 20 --warmup 3 --profile --profile_top 30
r 100 ab.txt $NEW $S2 --steps 20 --warmup 3 --wkv_op 1 --profile --profile_top 30
find .kernel_cache -newer /tmp/marker -type f | tar cJf $OUT/kcache_new.tar.xz -T - ; ls -la $OUT
cat $OUT/gpu_test.txt; grep -E "^##|^ +[12] |synchron|wall|OOM|Error" $OUT/ab.txt $OUT/s1.txt | cut -c1-250
