#!/usr/bin/env bash
# The GPU checks of issues #4 and #8 as one prepared run for a lent H100/H200 (the device tool):
#   bash bench/gpu_check.sh            # writes JSON and logs under $OUT (or bench/results)
# Each part has its own time limit, under 5 minutes. Needs torch only (the device image has no
# pulp, hydra or wandb; the scripts import moesaic from this checkout).
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_card.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu_card.txt"
timeout 280 python bench/gpu_moe_layer.py --json "$OUT/gpu_moe_layer.json" 2>&1 | tee "$OUT/gpu_moe_layer.log"
timeout 280 python bench/gpu_train.py --batch 8 4 --json "$OUT/gpu_train.json" 2>&1 | tee "$OUT/gpu_train.log"
timeout 280 python bench/gpu_train.py --compile --batch 8 --json "$OUT/gpu_train_compile.json" 2>&1 | tee "$OUT/gpu_train_compile.log"
