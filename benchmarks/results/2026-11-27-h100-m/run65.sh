#!/usr/bin/env bash
# Next session, nvidia-h100-x2 (DDP 2 is the one target left; 32 cores compile faster than x1's 16), no carried
# caches (a new checkout has none: first `pip download` fla-core==0.6.0 flash-linear-attention==0.6.0 einops, the
# cp312 pyrwkv-tokenizer and pytest + pluggy + iniconfig + pygments into .whl/). bench_overlap.py first (matmuls alone
# and beside all-reduces: NCCL defaults, 8 CTAs, high priority, SM carveout; ~1 min, nothing to compile), 1 GPU (compiles everything:
# >260 s on x1 in r62), then DDP 2 with no overlap at all (one 4 GB bucket: the whole all-reduce after the backward,
# NCCL with all its channels: ~3 GB at ~329 GB/s = ~9 ms exposed, against DDP's ~45 ms now). r64 (defaults): 1.75x. Needs DDP 2 <=
# 2/1.8 x the 1-GPU step. Bring kcache_new back.
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
r 90 python3 benchmarks/bench_overlap.py --gpus 2
r 330 python3 benchmarks/bench_train_gpu.py $S2 $M
r 140 python3 benchmarks/bench_train_gpu.py $S2 $M --devices 2 --ddp_bucket_mb 4000 --ddp_nccl_ctas 0 --ddp_avg_in_allreduce 1
find .kernel_cache -newer /tmp/marker -type f | tar cJf $OUT/kcache_new.tar.xz -T - 2>/dev/null
grep -E "^##|^\| |^# |^ +[0-9]+ |OOM|Error|H100|H200|exposed" $OUT/ddp.txt | cut -c1-260
