#!/usr/bin/env bash
# All GPU measurements of the project in one go (one H100/H200), each a benchmark script that
# prints a table; logs go to $OUT (or ./gpu_logs). Usage, from the repository root:
#   bash benchmarks/gpu_suite.sh            # needs torch with CUDA, and fla (pip install '.[gpu]')
set -u
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
run() {  # run NAME SECONDS CMD...: a time-boxed step whose output goes to the console and $OUT/NAME.txt
  local name=$1 secs=$2; shift 2
  echo "=== $name"
  timeout "$secs" "$@" 2>&1 | grep -v -E "Warning|warn\(|^\s*$" | tee "$OUT/$name.txt" | tail -n 25
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
run train_stage1 80 python3 benchmarks/bench_train_gpu.py --stages 1 --micro_bsz 16 --text_len 100 --ragged --steps 4 --warmup 2
run train_stage2 100 python3 benchmarks/bench_train_gpu.py --stages 2 --micro_bsz 8 --text_len 1400 --ragged --steps 3 --warmup 2
run generate 70 python3 benchmarks/bench_generate.py --device cuda --batch_sizes 1,64 --contexts none --naive_tokens 4
run memory 70 python3 benchmarks/bench_memory_gpu.py --contexts 1024 8192 24576 --new_tokens 32
run eval 60 python3 benchmarks/bench_eval.py --device cuda --shape 1.6b --batch_sizes 1,64
run generate_compiled 120 python3 benchmarks/bench_generate.py --device cuda --compile --batch_sizes 1 --contexts none --naive_tokens 1
# On a machine with 2+ GPUs: DDP throughput against the 1-GPU rows above (same Lightning step).
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  run train_stage2_1gpu_lightning 150 python3 benchmarks/bench_train_gpu.py --lightning --stages 2 --micro_bsz 8 --text_len 1400 --ragged --steps 3 --warmup 2
  run train_stage2_ddp2 200 python3 benchmarks/bench_train_gpu.py --lightning --devices 2 --stages 2 --micro_bsz 8 --text_len 1400 --ragged --steps 3 --warmup 2
fi
