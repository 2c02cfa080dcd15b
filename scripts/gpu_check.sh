#!/usr/bin/env bash
# Verify minigpt on a CUDA GPU: tests on cuda, the classic config, fp16 vs bf16, torchrun, sampling.
# Usage: scripts/gpu_check.sh PART...   with parts tests (the suite with MINIGPT_TEST_DEVICES=cpu,cuda), quick
# (fp16 vs bf16 with an interrupt and resume, torchrun, sampling on CPU) and classic (bench and the full
# configs/shakespeare_char.yaml run, eval, sampling speed). Logs and summaries go to $OUT (default: gpu_check_out/).
# Needs Tiny Shakespeare in $MINIGPT_DATA_DIR (default: data/). Each step is timed and has a time limit.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MINIGPT_DATA_DIR=${MINIGPT_DATA_DIR:-$PWD/data}
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
MG="$PY -m minigpt"
LOG="$OUT/$(IFS=_; echo "$*").log"
SUMMARY="$OUT/summary.txt"

step() {  # step NAME LIMIT_S COMMAND...: run it, log its output, record wall time and exit code
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*" | tee -a "$LOG"
  local start=$EPOCHREALTIME
  timeout "$limit" bash -c "$*" >>"$LOG" 2>&1
  local rc=$?
  local wall=$(awk "BEGIN {print $EPOCHREALTIME - $start}")
  printf '%-28s rc=%-4s wall=%7.1fs  %s\n' "$name" "$rc" "$wall" "$*" | tee -a "$SUMMARY" "$LOG"
}

val_losses() {  # the "step N: ... val loss X" lines of a log section
  grep -ao 'step [0-9]*: train loss [0-9.]*, val loss [0-9.]*' "$1" | tr '\n' ';'
}

# tokens/s and compile estimate from a run's TensorBoard events: the first log interval includes compiling.
TB_SPEED=/tmp/minigpt_tb_speed.py
cat > $TB_SPEED <<'EOF'
import sys, statistics
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0}); acc.Reload()
pts = acc.Scalars("perf/tokens_per_sec"); tps = [p.value for p in pts[2:]]
steps = pts[0].step; tok_per_step = float(sys.argv[2])
first_s = steps * tok_per_step / pts[0].value; steady_s = steps * tok_per_step / statistics.median(tps)
print(f"tokens/s median {statistics.median(tps):,.0f} (min {min(tps):,.0f}, max {max(tps):,.0f}) over {len(tps)} log intervals; "
      f"first {steps} steps took {first_s:.1f} s, steady {steady_s:.2f} s: compile+warm-up about {first_s - steady_s:.1f} s")
EOF

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
} 2>&1 | tee -a "$SUMMARY"

for part in "$@"; do case "$part" in
tests)
  # Parallel workers with one CPU thread each (16 threads per worker would oversubscribe the cores many times).
  XDIST=$($PY -c 'import xdist' 2>/dev/null && echo "-n 12")
  LIMIT=$($PY -c 'import pytest_timeout' 2>/dev/null && echo "--timeout 90")
  step tests_cpu_cuda 150 "MINIGPT_TEST_DEVICES=cpu,cuda OMP_NUM_THREADS=1 $PY -m pytest -q -p no:cacheprovider -p no:benchmark -rfEs $XDIST $LIMIT tests"
  grep -a "passed\|failed" "$LOG" | tail -2 | tee -a "$SUMMARY"
  ;;
quick)
  # Without deterministic mode: do two identical CUDA runs agree bit for bit? (information only)
  step cuda_repeatability 60 "$PY - <<'EOF'
import tempfile, torch
from pathlib import Path
from minigpt import config, checkpoint
from minigpt.train import train
runs = []
for i in range(2):
    d = Path(tempfile.mkdtemp())
    cfg = config.load('configs/tiny.yaml', ['train.device=cuda', f'train.out_dir={d}', 'train.max_iters=30', 'train.sample_chars=0'])
    runs.append(checkpoint.load(train(cfg, progress=False).run_dir, prefer=checkpoint.LAST)['model'])
diff = max((runs[0][k] - runs[1][k]).abs().max().item() for k in runs[0])
print('two identical CUDA runs (non-deterministic kernels allowed): max weight difference', diff)
EOF"
  SHORT="--set train.max_iters=600 --set train.eval_iters=50"
  step bf16_600 150 "$MG train -c configs/shakespeare_char.yaml --out-dir runs/bf16_600 $SHORT"
  step fp16_600_until_sigint 150 "$MG train -c configs/shakespeare_char.yaml --out-dir runs/fp16_600 $SHORT --set train.dtype=float16 & pid=\$!
    while [ ! -f runs/fp16_600/last.pt ] && kill -0 \$pid 2>/dev/null; do sleep 0.5; done; sleep 2; kill -INT \$pid; wait \$pid; echo exit code \$?"
  step fp16_600_resume 150 "$MG train -c configs/shakespeare_char.yaml --out-dir runs/fp16_600 $SHORT --set train.dtype=float16 --resume"
  step info_fp16 30 "$MG info --checkpoint runs/fp16_600/last.pt | head -40"
  step torchrun_nproc1 100 "torchrun --standalone --nproc_per_node 1 -m minigpt train -c configs/shakespeare_char.yaml --device cuda --out-dir runs/torchrun1 --set train.max_iters=100 --set train.eval_interval=50 --set train.eval_iters=20"
  step train_nproc1 100 "$MG train -c configs/shakespeare_char.yaml --device cuda --nproc 1 --out-dir runs/nproc1 --set train.max_iters=100 --set train.eval_interval=50 --set train.eval_iters=20"
  step sample_gpu_ckpt_on_cpu 120 "$MG sample --checkpoint runs/bf16_600 --device cpu -n 300 --seed 1"
  {
    echo "bf16 600 steps:   $(val_losses <(sed -n '/=== bf16_600/,/^bf16_600 /p' "$LOG"))"
    echo "fp16 600 steps:   $(val_losses <(sed -n '/=== fp16_600_until/,/^fp16_600_resume /p' "$LOG"))"
    echo "torchrun nproc 1: $(val_losses <(sed -n '/=== torchrun_nproc1/,/^torchrun_nproc1 /p' "$LOG"))"
    echo "train --nproc 1:  $(val_losses <(sed -n '/=== train_nproc1/,/^train_nproc1 /p' "$LOG"))"
  } | tee -a "$SUMMARY"
  ;;
classic)
  TIME=$([ -x /usr/bin/time ] && echo "/usr/bin/time -v")
  step train_classic 330 "$TIME $MG train -c configs/shakespeare_char.yaml --out-dir runs/classic"
  step tb_speed 60 "$PY $TB_SPEED runs/classic 16384"
  step eval_val 120 "$MG eval --checkpoint runs/classic --split val"
  step sample_gpu_ckpt_on_cpu 120 "$MG sample --checkpoint runs/classic --device cpu -n 300 --seed 1"
  step sample_gpu_cached 60 "$MG sample --checkpoint runs/classic --device cuda -n 2000 --seed 1 > /dev/null"
  step sample_gpu_uncached 120 "$MG sample --checkpoint runs/classic --device cuda -n 2000 --seed 1 --no-cache > /dev/null"
  step bench 150 "$MG bench -c configs/shakespeare_char.yaml --json --prepare-mb 8 > $OUT/bench.json"
  {
    cat "$OUT/bench.json"; echo
    echo "classic: $(val_losses <(sed -n '/=== train_classic/,/^train_classic /p' "$LOG"))"
    grep -a "Elapsed (wall\|Maximum resident\|tokens/s median\|bits per char\|bits/char\|loss" "$LOG" | grep -v "^step\|=== " | tail -8
  } | tee -a "$SUMMARY"
  ;;
*) echo "usage: $0 tests|quick|classic..." >&2; exit 2 ;;
esac; done
