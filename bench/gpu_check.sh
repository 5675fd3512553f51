#!/usr/bin/env bash
# The GPU checks of issues #4 and #8 as one prepared run for a lent H100/H200 (the device tool):
#   bash bench/gpu_check.sh            # writes JSON and one log under $OUT (or bench/results)
# Each part has its own time limit (all together under 7 minutes). Needs torch only (the
# device image has no pulp, hydra or wandb; the scripts import moesaic from this checkout). Each
# script prints and writes every finished run as it goes, so a part cut off by its limit keeps those.
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/gpu_check.log"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$LOG"
timeout 80 python3 bench/gpu_moe_layer.py --json "$OUT/gpu_moe_layer.json" 2>&1 | tee -a "$LOG"
timeout 80 python3 bench/gpu_train.py --batch 8 --json "$OUT/gpu_train.json" 2>&1 | tee -a "$LOG"
timeout 160 python3 bench/gpu_train.py --compile --batch 8 16 --json "$OUT/gpu_train_compile.json" 2>&1 | tee -a "$LOG"
timeout 80 python3 bench/gpu_train.py --compile --batch 8 --accum 4 --steps 6 \
  --json "$OUT/gpu_train_compile_accum.json" 2>&1 | tee -a "$LOG"
