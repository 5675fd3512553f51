#!/usr/bin/env bash
# The GPU checks of issues #4 and #8 as prepared runs for a lent H100/H200 (the device tool):
#   bash bench/gpu_check.sh [first|fused|moments|autotune|modes|moe_act|next|layer|trainer|recast|baseline]   # JSON and one log under $OUT (or bench/results)
# The library stores w13 = [w1; w3] since the fourth session; `--variant w1w3` (bench/gpu_variants.py)
# is the layout before it, and `--variant fused` is `model.moe.kernels=triton`. The parts that
# produced the second session's tables (overlap, ablate, confirm, w13check) are in git history
# (commit 3c01751 and before).
# next (about 7 minutes, one call): whole steps with the Triton element-wise kernels and with bf16
# AdamW moments beside the best run so far, then the w13 loss question: the layers in bf16 against
# the fp32 loop, and 60-step loss curves (the library twice, for the floor that nondeterministic
# kernels set; w1w3; bf16 moments; and with a 20-step warm-up).
# layer (about 4 minutes, one call): the Triton layer in bf16 against the loop, every grouped GEMM
# of the layer alone, and the layer eager and compiled (torch and Triton kernels, w1w3, loop dW)
# with kernel profiles.
# first (142 s on an H200 in the eighteenth session; run this when a session gets one device call): what decides #4 and
# #8 part 2: the Triton layer checked in bf16, the layer table eager and compiled (torch and Triton
# kernels), whole steps at batch 8 with and without the Triton kernels, and the router options' cost.
# fused (128 s) and moments (159 s): the eighteenth session's step profile with the Triton kernels, and
# fp32 against bf16 AdamW moments, interleaved, with their 60-step loss curves.
# autotune (about 5 minutes, not yet run): #4's layer compiled with max-autotune (inductor's Triton
# grouped-GEMM template timed against torch._grouped_mm per GEMM) and with CUDA graphs, per shape.
# modes (about 5 minutes, not yet run): the best setup with torch.compile's CUDA graphs
# (reduce-overhead) and max-autotune, for the 2.3% that #8 part 2 lacks on the strict measure.
# moe_act (about 3 minutes, not yet run): parallel.recompute_moe_act (`--variant moe-act`) on the best
# setup at batch 8 and 16, off and on: its cost in time, and the peak memory it saves (whether batch
# 16 fits an H100's 80 GB).
# trainer (about 5 minutes; first `bash bench/fetch_wheels.sh` here, and carry [".whl"]):
# moesaic-doctor on one NCCL rank, the trainer's demo model in bf16 eager and compiled (FSSDP, EP,
# DDP, FSSDP with the Triton kernels, FSSDP with full activation checkpointing, FSDP for the dense
# part, and FSSDP under fp16 autocast with loss scaling: its first CUDA run), and gpu_train's
# 2.62B model through the trainer, compiled; bench/trainer_runs.py prints them side by side. Since the
# nineteenth session the trainer builds on meta and initializes each rank's share on its GPU (CUDA
# generators): these runs are that path's first on CUDA.
# recast (about 3 minutes, the wheels as for trainer; not yet run): gpu_train's model through the
# trainer, eager at batch 4 on one GPU, with parallel.recast_expert_weights off and on, then on with
# fused AdamW: the peak memory beside moesaic-estimate's step peak, the bytes kept for backward
# beside its count, and the step time.
# baseline (about 4.5 minutes): the expert layer table, and whole steps eager and compiled.
# Name the H200 kind (nvidia-h200): batch 16 peaks at 94 GiB, over an H100's 80 (such a run fails alone
# and the others go on), and the earlier figures are from H200s.
# Each step has its own time limit. All parts but trainer need torch only (the device image has no
# pulp, hydra or wandb; the scripts import moesaic from this checkout). Each script prints and
# writes every finished run as it goes, so a part cut off keeps those.
set -u
PART=${1:-first}
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
layer_part() {  # the Triton layer correct in bf16, the layer's GEMMs alone, the layer eager and compiled
  echo "## $(date +%T) the Triton layer against the loop (bf16)" | tee -a "$LOG"
  timeout 90 python3 bench/fused_moe.py 2>&1 | tee -a "$LOG"
  echo "## $(date +%T) every grouped GEMM of the layer, alone: their sum against the layer's time" | tee -a "$LOG"
  timeout 90 python3 bench/gpu_grouped_gemm.py --layer --json "$OUT/gpu_layer_gemms.json" 2>&1 | tee -a "$LOG"
  echo "## $(date +%T) expert layer: torch and Triton kernels, w1w3, eager and compiled" | tee -a "$LOG"
  timeout 240 python3 bench/gpu_moe_layer.py --compiled --iters 10 --profile "$OUT/layer_profile" --json "$OUT/gpu_moe_layer_fused.json" 2>&1 | tee -a "$LOG"
}
steps_part() {  # whole steps: the Triton kernels and bf16 moments beside the best run so far
  echo "## $(date +%T) the Triton layer against the loop (bf16), before any step uses it" | tee -a "$LOG"
  timeout 90 python3 bench/fused_moe.py 2>&1 | tee -a "$LOG"
  train gpu_train_best 100 --compile blocks --overlap-optimizer equal --batch 8
  train gpu_train_best_fused 150 --compile blocks --overlap-optimizer equal --variant fused --batch 8 16
  train gpu_train_best_fused_bf16m 150 --compile blocks --overlap-optimizer equal --variant fused --moments bf16 --batch 8 16
  train gpu_train_blocks_fused 90 --compile blocks --variant fused --batch 8
  train gpu_train_blocks_bf16m 90 --compile blocks --moments bf16 --batch 8
}
curves_part() {  # the w13 loss question: bf16 against fp32, then 60-step curves beside the floor
  timeout 60 python3 bench/gpu_variants.py 2>&1 | tee -a "$LOG"
  train gpu_train_curve_blocks 90 --compile blocks --batch 8 --steps 60
  train gpu_train_curve_w1w3 90 --compile blocks --variant w1w3 --batch 8 --steps 60
  train gpu_train_curve_blocks_again 90 --compile blocks --batch 8 --steps 60  # the run-to-run floor
  train gpu_train_curve_bf16m 90 --compile blocks --batch 8 --steps 60 --moments bf16
  train gpu_train_curve_blocks_warm 90 --compile blocks --batch 8 --steps 60 --lr-warmup 20
  train gpu_train_curve_w1w3_warm 90 --compile blocks --variant w1w3 --batch 8 --steps 60 --lr-warmup 20
  python3 bench/loss_curves.py "$OUT"/gpu_train_curve_{blocks,blocks_again,w1w3,bf16m}.json 2>&1 | tee -a "$LOG"
  python3 bench/loss_curves.py "$OUT"/gpu_train_curve_{blocks_warm,w1w3_warm}.json 2>&1 | tee -a "$LOG"
}
if [ "$PART" = first ]; then
  echo "## $(date +%T) the Triton layer against the loop (bf16)" | tee -a "$LOG"
  timeout 90 python3 bench/fused_moe.py 2>&1 | tee -a "$LOG"
  echo "## $(date +%T) expert layer: torch and Triton kernels, w1w3, eager and compiled" | tee -a "$LOG"
  timeout 240 python3 bench/gpu_moe_layer.py --compiled --iters 10 --json "$OUT/gpu_moe_layer_fused.json" 2>&1 | tee -a "$LOG"
  train gpu_train_best 100 --compile blocks --overlap-optimizer equal --batch 8
  train gpu_train_best_fused 150 --compile blocks --overlap-optimizer equal --variant fused --batch 8
  echo "## $(date +%T) router options" | tee -a "$LOG"
  timeout 30 python3 bench/router_cost.py --json "$OUT/router_cost.json" 2>&1 | tee -a "$LOG"
  echo "## $(date +%T) done" | tee -a "$LOG"
  exit 0
fi
if [ "$PART" = fused ]; then  # (about 3 minutes) where a step with the Triton kernels spends its time
  train gpu_train_fused_profile 120 --compile blocks --overlap-optimizer equal --variant fused --batch 8 --profile "$OUT/step_profile.txt"
  train gpu_train_fused_bf16m 150 --compile blocks --overlap-optimizer equal --variant fused --moments bf16 --batch 8 16
  train gpu_train_fused_plain 90 --compile blocks --variant fused --batch 8
  echo "## $(date +%T) done" | tee -a "$LOG"
  exit 0
fi
if [ "$PART" = moments ]; then  # (about 4 minutes) #8 part 2's candidate: fp32 against bf16 moments, interleaved
  for i in 1 2; do
    train gpu_train_fused_fp32m_$i 100 --compile blocks --overlap-optimizer equal --variant fused --batch 8 --steps 60
    train gpu_train_fused_bf16m_$i 100 --compile blocks --overlap-optimizer equal --variant fused --moments bf16 --batch 8 --steps 60
  done
  python3 bench/loss_curves.py "$OUT"/gpu_train_fused_{fp32m_1,fp32m_2,bf16m_1,bf16m_2}.json 2>&1 | tee -a "$LOG"
  echo "## $(date +%T) done" | tee -a "$LOG"
  exit 0
fi
if [ "$PART" = modes ]; then  # (about 5 minutes) #8's remaining 2.3%: torch.compile's modes on the best setup
  best="--compile blocks --variant fused --moments bf16 --batch 8 --steps 30"
  train gpu_train_mode_default 100 $best --overlap-optimizer equal
  train gpu_train_mode_cudagraphs 120 $best --compile-mode reduce-overhead
  train gpu_train_mode_cudagraphs_overlap 120 $best --compile-mode reduce-overhead --overlap-optimizer equal
  train gpu_train_mode_autotune 200 $best --compile-mode max-autotune-no-cudagraphs --overlap-optimizer equal
  echo "## $(date +%T) done" | tee -a "$LOG"
  exit 0
fi
if [ "$PART" = moe_act ]; then  # (about 3 minutes) the experts' activation recomputed: time and peak memory
  best="--compile blocks --moments bf16 --steps 20 --batch 8 16"
  train gpu_train_moe_act_off 120 $best --variant fused
  train gpu_train_moe_act_on 120 $best --variant fused moe-act
  echo "## $(date +%T) done" | tee -a "$LOG"
  exit 0
fi
if [ "$PART" = autotune ]; then  # (about 5 minutes) #4's fine-grained shapes under inductor's max-autotune and CUDA graphs
  # one shape per process, each with its own limit, fine-grained first: a part cut off keeps the rows printed
  for shape in deepseekmoe-16b olmoe mixtral; do
    echo "## $(date +%T) expert layer $shape: compile modes" | tee -a "$LOG"
    timeout 150 python3 bench/gpu_moe_layer.py --compiled --iters 10 --shapes $shape \
      --runs compiled compiled_triton graphs graphs_triton autotune autotune_w1w3 \
      --json "$OUT/gpu_moe_layer_modes_$shape.json" 2>&1 | tee -a "$LOG"
  done
  echo "## $(date +%T) done" | tee -a "$LOG"
  exit 0
fi
if [ "$PART" = next ] || [ "$PART" = layer ]; then
  if [ "$PART" = next ]; then steps_part; curves_part; else layer_part; fi
  echo "## $(date +%T) done" | tee -a "$LOG"
  exit 0
fi
install_moesaic() {  # for the trainer's parts: run `bash bench/fetch_wheels.sh` here first, and carry
  # [".whl"]: the image lacks hydra, omegaconf and PuLP
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/site . || exit 1
  export PYTHONPATH=/tmp/site OUT
  REPO=$(pwd)
  cd /tmp  # the installed moesaic, not the checkout's folders
  one="python3 -m torch.distributed.run --standalone --nproc_per_node 1"
  big="model.dim=2048 model.num_layers=16 model.num_heads=16 model.max_seq_len=2048 data.seq_len=2048 model.moe.num_experts=16 model.moe.top_k=4 model.moe.ffn_dim=1408 model.moe.num_shared_experts=1 batch_size=8"
}
if [ "$PART" = recast ]; then  # parallel.recast_expert_weights on CUDA (about 2 minutes; the wheels, as trainer)
  install_moesaic
  # gpu_train's model through the trainer, eager, DDP on one GPU (every expert resident), at batch 4 (8
  # would need about 83 GiB with the casts kept, by moesaic-estimate): the casts kept, then cast again
  # (then fused AdamW), each beside moesaic-estimate's total for the same overrides (auto: foreach on a GPU)
  for spec in "false auto" "true auto" "true fused"; do
    set -- $spec
    echo "## $(date +%T) trainer, gpu_train's model (2.62B), eager, batch 4, recast_expert_weights=$1, optim.implementation=$2" | tee -a "$LOG"
    timeout 150 $one -m moesaic.trainer logging=quiet logging.out_dir=$OUT/trainer logging.run_name=big_recast_$1_$2 \
      steps=${BIG_STEPS:-30} eval_every=1000 parallel=ddp parallel.mixed_precision=bf16 logging.count_kept=true \
      parallel.recast_expert_weights=$1 optim.implementation=$2 ${big/batch_size=8/batch_size=4} 2>&1 | tail -4 | tee -a "$LOG"
    echo "## moesaic-estimate, the same overrides (the last column: the step's peak)" | tee -a "$LOG"
    timeout 60 python3 -m moesaic.trainer.estimate --world-size 1 parallel=ddp parallel.mixed_precision=bf16 \
      parallel.recast_expert_weights=$1 optim.implementation=$2 ${big/batch_size=8/batch_size=4} 2>&1 | tail -1 | tee -a "$LOG"
  done
  python3 "$REPO/bench/trainer_runs.py" "$OUT/trainer" 2>&1 | tee -a "$LOG"
  exit 0
fi
if [ "$PART" = trainer ]; then  # the trainer and the doctor on CUDA (about 5 minutes)
  install_moesaic
  echo "## $(date +%T) moesaic-doctor, 1 rank, nccl" | tee -a "$LOG"
  timeout 120 $one -m moesaic.parallel.doctor --suite "$([ "${TRAINER_QUICK:-0}" = 1 ] && echo default || echo full)" 2>&1 | tee -a "$LOG"
  if [ "${TRAINER_QUICK:-0}" != 1 ]; then
    echo "## $(date +%T) moesaic-doctor --kernels triton, 1 rank, nccl" | tee -a "$LOG"
    timeout 90 $one -m moesaic.parallel.doctor --kernels triton 2>&1 | tee -a "$LOG"
  fi
  # what each run's log keeps: the run's own lines, and a rank's exception with the frame above it
  # (torchrun's closing ChildFailedError lines would push the cause out of `tail`)
  keep='^moesaic|^step|^done|^\[rank[0-9]+\]: +File |^\[rank[0-9]+\]: [A-Za-z_.]*(Error|Exception)|^[A-Za-z_.]*(Error|Exception):'
  demo="logging=quiet logging.out_dir=$OUT/trainer steps=${TRAINER_STEPS:-300} eval_every=100 parallel.mixed_precision=bf16"
  # (logging.count_kept: the eager runs count what the GPU's kernels keep for backward, which
  # trainer_runs.py puts beside moesaic-estimate's count of the CPU's)
  runs=("fssdp_eager parallel=fssdp logging.count_kept=true" "fssdp_compiled parallel=fssdp compile=true"
        "ep_compiled parallel=ep compile=true model.moe.router.aux_loss_scope=global_batch"
        "ddp_eager parallel=ddp logging.count_kept=true"
        "fssdp_triton parallel=fssdp model.moe.kernels=triton logging.count_kept=true"
        "fssdp_checkpoint_full parallel=fssdp parallel.activation_checkpoint=full logging.count_kept=true"
        "fssdp_fsdp_compiled parallel=fssdp parallel.dense_sharding=fsdp compile=true"
        "fssdp_fp16 parallel=fssdp"  # fp16 autocast and loss scaling (_grouped_mm's fallback off bf16)
        "fssdp_moe_act_compiled parallel=fssdp parallel.recompute_moe_act=true compile=true")
  # (ep_compiled also runs the global-batch balance loss: its int64 all-reduce on NCCL, eager in a compiled block)
  # TRAINER_QUICK=1 (about 3 minutes, for what is left of a session's device time): the compiled,
  # Triton and FSDP runs alone, and the doctor's default suite
  [ "${TRAINER_QUICK:-0}" = 1 ] && runs=("${runs[1]}" "${runs[2]}" "${runs[4]}" "${runs[6]}")
  for run in "${runs[@]}"; do
    set -- $run
    name=$1; shift
    args=$demo
    [[ $name == *fp16 ]] && args=${demo/mixed_precision=bf16/mixed_precision=fp16}
    echo "## $(date +%T) trainer, demo model, $name" | tee -a "$LOG"
    timeout 150 $one -m moesaic.trainer $args logging.run_name=$name "$@" 2>&1 | grep -E "$keep" | tail -6 | tee -a "$LOG"
  done
  echo "## $(date +%T) trainer, gpu_train's model (2.62B), compiled, bf16 autocast" | tee -a "$LOG"
  timeout 240 $one -m moesaic.trainer logging=quiet logging.out_dir=$OUT/trainer logging.run_name=big_compiled \
    steps=${BIG_STEPS:-30} eval_every=1000 parallel=ddp parallel.mixed_precision=bf16 compile=true $big 2>&1 | grep -E "$keep" | tail -6 | tee -a "$LOG"
  python3 "$REPO/bench/trainer_runs.py" "$OUT/trainer" 2>&1 | tee -a "$LOG"
  exit 0
fi
if [ "$PART" = baseline ]; then
  timeout 80 python3 bench/gpu_moe_layer.py --json "$OUT/gpu_moe_layer.json" 2>&1 | tee -a "$LOG"
  train gpu_train 80 --batch 8
  train gpu_train_compile 160 --compile --batch 8 16
  train gpu_train_compile_accum 80 --compile --batch 8 --accum 4 --steps 6
  echo "## $(date +%T) done" | tee -a "$LOG"
  exit 0
fi
echo "gpu_check.sh: unknown part ($PART): first, fused, moments, autotune, modes, moe_act, next, layer, trainer, recast or baseline" >&2
exit 2
