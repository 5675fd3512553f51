#!/usr/bin/env bash
# The GPU checks of issues #4 and #8 as one prepared run for a lent H100/H200 (the device tool):
#   bash bench/gpu_check.sh [all|baseline|variants|overlap|ablate|confirm|w13check|layerprofile|next|layer|trainer]   # JSON and one log under $OUT (or bench/results)
# baseline (about 4.5 minutes on an H200): the expert layer, and whole training steps eager at batch 8
# and compiled at batch 8, 16 and 4 x 8 -- the figures in bench/RESULTS.md. variants (about 3
# minutes): the same steps with the candidate speed-ups of bench/gpu_variants.py, for the A/B
# against the baseline on the same machine. overlap (about 6 minutes): the compiled baseline beside
# per-block compile with the optimizer update overlapped with the next forward and the stored w13
# weight (with torch._grouped_mm, and with bench/triton_grouped.py), and the expert layer with the
# w13 and Triton columns. ablate (about 4 minutes): the same without the overlap, without w13, and
# with the overlap at equal stream priority. confirm (about 4 minutes): the compiled baseline and the
# best candidate alternated, twice, at batch 8 and 16. w13check (about 3 minutes): the stored w13
# weight's output and gradients against the fp32 loop at gpu_train's shape, and 60-step loss curves
# with and without it (their per-step losses are in the JSON). layerprofile (about 1.5 minutes):
# the layer eager and compiled with kernel profiles, for the time outside the grouped GEMMs. next
# (about 7 minutes, one call): whole steps with bench/fused_moe.py's layer and with bf16 AdamW
# moments beside the best w13 run, then the w13 loss question: bf16 against the fp32 loop, and
# 60-step loss curves (the library twice, for the floor that nondeterministic kernels set; w13; bf16
# moments; and with a 20-step warm-up). layer (about 4 minutes, one call): the fused kernels in
# bf16, every grouped GEMM of the layer alone, and the layer eager and compiled with profiles.
# trainer (about 5 minutes; first `bash bench/fetch_wheels.sh` here, and carry [".whl"]):
# moesaic-doctor on one NCCL rank, the trainer's demo model in bf16 eager and compiled (FSSDP, EP,
# DDP), and gpu_train's 2.62B model through the trainer, compiled; bench/trainer_runs.py prints them
# side by side. Each part has its own time limit. All parts but trainer need torch only (the device
# image has no pulp, hydra or wandb; the scripts import moesaic from this checkout). Each script
# prints and writes every finished run as it goes, so a part cut off keeps those.
set -u
PART=${1:-all}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/gpu_check_$PART.log"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$LOG"
train() {  # name, time limit, gpu_train.py arguments...
  local name=$1 limit=$2
  shift 2
  echo "## $(date +%T) $name: $*" | tee -a "$LOG"
  timeout "$limit" python3 bench/gpu_train.py "$@" --json "$OUT/$name.json" 2>&1 | tee -a "$LOG"
}
if [ "$PART" = overlap ]; then  # the candidates beside the compiled baseline, and the layer
  train gpu_train_compile 100 --compile --batch 8
  train gpu_train_overlap_w13 100 --compile blocks --overlap-optimizer --variant w13 --batch 8 --profile "$OUT/gpu_train_profile_overlap_w13.txt"
  echo "## $(date +%T) expert layer" | tee -a "$LOG"
  timeout 150 python3 bench/gpu_moe_layer.py --iters 10 --json "$OUT/gpu_moe_layer.json" 2>&1 | tee -a "$LOG"
  train gpu_train_overlap_triton 120 --compile blocks --overlap-optimizer --variant triton-experts --batch 8
  echo "## $(date +%T) done" | tee -a "$LOG"
  exit 0
fi
if [ "$PART" = ablate ]; then  # a second sample of both, then which part of the candidate gives what
  train gpu_train_compile_2 100 --compile --batch 8
  train gpu_train_overlap_w13_2 100 --compile blocks --overlap-optimizer --variant w13 --batch 8 16
  train gpu_train_blocks_w13 90 --compile blocks --variant w13 --batch 8
  train gpu_train_blocks_overlap 90 --compile blocks --overlap-optimizer --batch 8
  train gpu_train_blocks 90 --compile blocks --batch 8
  train gpu_train_overlap_equal_w13 90 --compile blocks --overlap-optimizer equal --variant w13 --batch 8
  echo "## $(date +%T) done" | tee -a "$LOG"
  exit 0
fi
layer_part() {  # the fused kernels correct in bf16, the layer's GEMMs alone, the layer eager and compiled
  echo "## $(date +%T) fused kernels against the loop (bf16)" | tee -a "$LOG"
  timeout 90 python3 bench/fused_moe.py 2>&1 | tee -a "$LOG"
  echo "## $(date +%T) every grouped GEMM of the layer, alone: their sum against the layer's time" | tee -a "$LOG"
  timeout 90 python3 bench/gpu_grouped_gemm.py --layer --json "$OUT/gpu_layer_gemms.json" 2>&1 | tee -a "$LOG"
  echo "## $(date +%T) expert layer: library, w13 and fused, eager and compiled" | tee -a "$LOG"
  timeout 240 python3 bench/gpu_moe_layer.py --compiled --iters 10 --profile "$OUT/layer_profile" --json "$OUT/gpu_moe_layer_fused.json" 2>&1 | tee -a "$LOG"
}
steps_part() {  # whole steps: the fused layer and bf16 moments beside the best w13 run
  train gpu_train_best_w13 100 --compile blocks --overlap-optimizer equal --variant w13 --batch 8
  train gpu_train_best_fused 150 --compile blocks --overlap-optimizer equal --variant fused --batch 8 16
  train gpu_train_best_fused_bf16m 150 --compile blocks --overlap-optimizer equal --variant fused --moments bf16 --batch 8 16
  train gpu_train_blocks_fused 90 --compile blocks --variant fused --batch 8
  train gpu_train_blocks_w13_bf16m 90 --compile blocks --variant w13 --moments bf16 --batch 8
}
curves_part() {  # the w13 loss question: bf16 against fp32, then 60-step curves beside the floor
  timeout 60 python3 bench/gpu_variants.py 2>&1 | tee -a "$LOG"
  train gpu_train_curve_blocks 90 --compile blocks --batch 8 --steps 60
  train gpu_train_curve_w13 90 --compile blocks --variant w13 --batch 8 --steps 60
  train gpu_train_curve_blocks_again 90 --compile blocks --batch 8 --steps 60  # the run-to-run floor
  train gpu_train_curve_bf16m 90 --compile blocks --batch 8 --steps 60 --moments bf16
  train gpu_train_curve_blocks_warm 90 --compile blocks --batch 8 --steps 60 --lr-warmup 20
  train gpu_train_curve_w13_warm 90 --compile blocks --variant w13 --batch 8 --steps 60 --lr-warmup 20
  python3 bench/loss_curves.py "$OUT"/gpu_train_curve_{blocks,blocks_again,w13,bf16m}.json 2>&1 | tee -a "$LOG"
  python3 bench/loss_curves.py "$OUT"/gpu_train_curve_{blocks_warm,w13_warm}.json 2>&1 | tee -a "$LOG"
}
if [ "$PART" = next ] || [ "$PART" = layer ]; then
  if [ "$PART" = next ]; then steps_part; curves_part; else layer_part; fi
  echo "## $(date +%T) done" | tee -a "$LOG"
  exit 0
fi
if [ "$PART" = trainer ]; then  # the trainer and the doctor on CUDA (about 5 minutes): run
  # `bash bench/fetch_wheels.sh` here first, and carry [".whl"]: the image lacks hydra, omegaconf and PuLP
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/site . || exit 1
  export PYTHONPATH=/tmp/site OUT
  REPO=$(pwd)
  cd /tmp  # the installed moesaic, not the checkout's folders
  one="python3 -m torch.distributed.run --standalone --nproc_per_node 1"
  echo "## $(date +%T) moesaic-doctor, 1 rank, nccl" | tee -a "$LOG"
  timeout 120 $one -m moesaic.parallel.doctor --suite full 2>&1 | tee -a "$LOG"
  demo="logging=quiet logging.out_dir=$OUT/trainer steps=300 eval_every=100 parallel.mixed_precision=bf16"
  for run in "fssdp_eager parallel=fssdp" "fssdp_compiled parallel=fssdp compile=true" \
             "ep_compiled parallel=ep compile=true" "ddp_eager parallel=ddp"; do
    set -- $run
    name=$1; shift
    echo "## $(date +%T) trainer, demo model, $name" | tee -a "$LOG"
    timeout 150 $one -m moesaic.trainer $demo logging.run_name=$name "$@" 2>&1 | grep -E "moesaic|^step|^done|rror" | tail -6 | tee -a "$LOG"
  done
  big="model.dim=2048 model.num_layers=16 model.num_heads=16 model.max_seq_len=2048 data.seq_len=2048 model.moe.num_experts=16 model.moe.top_k=4 model.moe.ffn_dim=1408 model.moe.num_shared_experts=1 batch_size=8"
  echo "## $(date +%T) trainer, gpu_train's model (2.62B), compiled, bf16 autocast" | tee -a "$LOG"
  timeout 240 $one -m moesaic.trainer logging=quiet logging.out_dir=$OUT/trainer logging.run_name=big_compiled \
    steps=30 eval_every=1000 parallel=ddp parallel.mixed_precision=bf16 compile=true $big 2>&1 | grep -E "moesaic|^step|^done|rror" | tail -6 | tee -a "$LOG"
  python3 "$REPO/bench/trainer_runs.py" "$OUT/trainer" 2>&1 | tee -a "$LOG"
  exit 0
fi
if [ "$PART" = w13check ]; then  # why the w13 runs' loss ran higher: kernels, or chaotic training?
  timeout 60 python3 bench/gpu_variants.py 2>&1 | tee -a "$LOG"
  train gpu_train_curve_blocks 90 --compile blocks --batch 8 --steps 60
  train gpu_train_curve_w13 90 --compile blocks --variant w13 --batch 8 --steps 60
  exit 0
fi
if [ "$PART" = layerprofile ]; then  # where the layer's non-GEMM time goes, eager and compiled
  timeout 150 python3 bench/gpu_moe_layer.py --compiled --profile "$OUT/layer_profile" --json "$OUT/gpu_moe_layer_compiled.json" 2>&1 | tee -a "$LOG"
  exit 0
fi
if [ "$PART" = confirm ]; then  # baseline and candidate alternated, twice, on one machine
  train gpu_train_confirm_base_a 100 --compile --batch 8
  train gpu_train_confirm_best_a 100 --compile blocks --overlap-optimizer equal --variant w13 --batch 8 16
  train gpu_train_confirm_base_b 130 --compile --batch 8 16
  train gpu_train_confirm_best_b 100 --compile blocks --overlap-optimizer equal --variant w13 --batch 8
  echo "## $(date +%T) done" | tee -a "$LOG"
  exit 0
fi
if [ "$PART" != variants ]; then
  timeout 80 python3 bench/gpu_moe_layer.py --json "$OUT/gpu_moe_layer.json" 2>&1 | tee -a "$LOG"
  train gpu_train 80 --batch 8
  train gpu_train_compile 160 --compile --batch 8 16
  train gpu_train_compile_accum 80 --compile --batch 8 --accum 4 --steps 6
fi
if [ "$PART" != baseline ]; then
  train gpu_train_complex_rotary 80 --batch 8 --variant complex-rotary
  train gpu_train_w13 80 --batch 8 --variant w13
  train gpu_train_compile_variants 120 --compile --batch 8 --variant w13 complex-rotary
fi
