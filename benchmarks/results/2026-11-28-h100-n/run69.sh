#!/usr/bin/env bash
# Session 14, call 3 (nvidia-h100-x4, caches of r62/r63/r67/r68 carried): where DDP's cost goes with one bucket
# after the backward (r68: DDP 2 350.7 ms, DDP 4 359.7, 1 GPU 311.8; r67 on an x2 host: 340.7 vs 308.8): rank 0's
# profile of one step of 1 GPU and of DDP 2 with one bucket, then DDP 2 and DDP 4 with 100 MB buckets overlapping the
# backward (8 CTAs, high priority) in the same call.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do [ -f $k ] && tar xJf $k; done
touch /tmp/marker
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/ddp.txt
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5 --lightning --steps 20 --warmup 3"
M="--master_weights 1 --wkv_keep 1"
END=$((SECONDS + 585))
i=0
r() {
  local t=$1; shift; i=$((i + 1)); local left=$((END - SECONDS)); [ $left -lt $t ] && t=$left
  [ $t -lt 20 ] && { echo "## skipped (no time): $*" >> $OUT/ddp.txt; return; }
  echo "## [box $t s, at $SECONDS s] $*" >> $OUT/ddp.txt
  timeout -k 5 $t "$@" < /dev/null > /tmp/log$i 2>&1; echo "## rc $? after $SECONDS s" >> $OUT/ddp.txt
  pkill -9 -f compile_worker; pkill -9 -f bench_train_gpu
  grep -v -E "Warning|warn\(|warn_once|^\s*$|litlogger|Tip|^E11|AUTOTUNE|SingleProcess|NCCL INFO" /tmp/log$i | cut -c1-300 >> $OUT/ddp.txt
}
r 130 python3 benchmarks/bench_train_gpu.py $S2 $M --profile --profile_top 16
r 150 python3 benchmarks/bench_train_gpu.py $S2 $M --devices 2 --profile --profile_top 16
r 120 python3 benchmarks/bench_train_gpu.py $S2 $M --devices 2 --ddp_bucket_mb 100
r 140 python3 benchmarks/bench_train_gpu.py $S2 $M --devices 4 --ddp_bucket_mb 100
find .kernel_cache -newer /tmp/marker -type f | tar cJf $OUT/kcache_new.tar.xz -T - 2>/dev/null
grep -E "^##|^\| |^# |^ +[0-9]+ |OOM|Error|H100|H200|exposed|idle|wall" $OUT/ddp.txt | cut -c1-200
