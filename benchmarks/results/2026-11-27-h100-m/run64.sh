#!/usr/bin/env bash
# nvidia-h100-x4, one call: 1 GPU, then DDP 4 and DDP 2 (100 MB buckets) with NCCL on a high-priority stream and at
# most 8 CTAs per NCCL kernel (train --ddp_nccl_high_priority 1 --ddp_nccl_ctas 8). r63 (same settings but NCCL's
# defaults): 1 GPU 313.5 ms, DDP 4 370.6 ms (3.38x), DDP 2 386.2 ms (1.62x); its DDP-4 profile: NCCL kernels resident
# 316 ms per step (26 all-reduces), i.e. holding SMs or waiting for them through most of the backward.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do tar xJf $k; done
touch /tmp/marker
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
export NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,TUNING
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/ddp.txt
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5 --lightning --steps 20 --warmup 3"
M="--master_weights 1 --wkv_keep 1"
T="--ddp_bucket_mb 100 --ddp_nccl_high_priority 1 --ddp_nccl_ctas 8"
END=$((SECONDS + 425))
i=0
r() {
  local t=$1; shift; i=$((i + 1)); local left=$((END - SECONDS)); [ $left -lt $t ] && t=$left
  [ $t -lt 20 ] && { echo "## skipped (no time): $*" >> $OUT/ddp.txt; return; }
  echo "## [box $t s, at $SECONDS s] $*" >> $OUT/ddp.txt
  timeout -k 5 $t "$@" < /dev/null > /tmp/log$i 2>&1; echo "## rc $? after $SECONDS s" >> $OUT/ddp.txt
  pkill -9 -f compile_worker; pkill -9 -f bench_train_gpu
  grep -v -E "Warning|warn\(|warn_once|^\s*$|litlogger|Tip|^E11|AUTOTUNE|SingleProcess|NCCL INFO" /tmp/log$i | cut -c1-300 >> $OUT/ddp.txt
  grep -E "NCCL INFO.*(coll channels|CTA|[Pp]riority|NCCL version)" /tmp/log$i | sort | uniq -c | head -8 | cut -c1-200 >> $OUT/ddp.txt
  cp /tmp/log$i $OUT/log$i.txt
}
r 125 python3 benchmarks/bench_train_gpu.py $S2 $M
r 150 python3 benchmarks/bench_train_gpu.py $S2 $M --devices 4 $T
CUDA_VISIBLE_DEVICES=0,1 r 140 python3 benchmarks/bench_train_gpu.py $S2 $M --devices 2 $T
grep -E "^##|^ +[0-9]+ |OOM|Error|H100|H200|channels|CTA" $OUT/ddp.txt | cut -c1-260
