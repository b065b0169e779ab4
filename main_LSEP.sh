#!/usr/bin/env bash
# LSEP pipeline: train -> generate -> evaluate, with the paper's settings (Tab. 1 / Tab. 5:
# SiT-XL/2, 256 px, uncond-prob 0.9, encoder depth 8, crop from 12 tokens, probe weight
# 0.0225 -> 0.03 over 10 time bins, fp16 + TF32, global batch 256, 400k steps; SDE 250 steps,
# cfg 1.0, 50k samples, ADM evaluator).
#
#   bash main_LSEP.sh [train|generate|evaluate|all]        (default: all)
#   bash main_LSEP.sh demo [--quick]    the whole pipeline on scikit-learn's digits, CPU, minutes
#   bash main_LSEP.sh demo --source MY_CLASS_FOLDERS [--resolution 32]   the same on your own folders
#
# Every setting below is an environment variable, e.g.
#   N_GPU=8 DATA_DIR=/data/imagenet256 bash main_LSEP.sh train
#   CFG_SCALE=1.8 GUIDANCE_HIGH=0.7 bash main_LSEP.sh generate
# Re-running `train` resumes from the latest checkpoint of the same experiment.
set -euo pipefail
cd "$(dirname "$0")"

STAGE="${1:-all}"
case "$STAGE" in
  train|generate|evaluate|all) ;;
  demo) shift; exec "${PYTHON:-python}" demo.py "$@" ;;
  *) echo "usage: bash main_LSEP.sh [train|generate|evaluate|all|demo]" >&2; exit 2 ;;
esac

# ---- hardware ----
N_GPU="${N_GPU:-4}"                       # processes per node (accelerate launch / torchrun)
N_ACCUM="${N_ACCUM:-1}"                   # gradient accumulation steps
BATCH_SIZE="${BATCH_SIZE:-256}"           # batch per micro-step over all GPUs (optimizer step: x N_ACCUM)
PYTHON="${PYTHON:-python}"

# ---- data and output ----
DATA_DIR="${DATA_DIR:-../data/imagenet256}"
OUTPUT_DIR="${OUTPUT_DIR:-exps}"
RESOLUTION="${RESOLUTION:-256}"

# ---- model and LSEP probe (Tab. 1 / Tab. 5) ----
MODEL="${MODEL:-SiT-XL/2}"
UNCOND_PROB="${UNCOND_PROB:-0.9}"          # 1) probability of the null label in the probe branch
ENC_DEPTH="${ENC_DEPTH:-8}"                # 2) probe depth
CROP_START="${CROP_START:-12}"             # 3) smallest crop window side (16 = no crop at 256 px)
WEIGHTS_TYPE="${WEIGHTS_TYPE:-steps}"      # 4) probe-loss weight schedule
WEIGHT_START="${WEIGHT_START:-0.0225}"
WEIGHT_END="${WEIGHT_END:-0.03}"
N_WEIGHTS="${N_WEIGHTS:-10}"

# ---- REPA alignment (sihyun-yu/REPA): off while ENC_TYPE is empty ----
# REPA + LSEP: ENC_TYPE=dinov2-vit-b; REPA alone: also EXTRA_TRAIN_ARGS=--no-probe
ENC_TYPE="${ENC_TYPE:-}"                   # frozen encoders, REPA's names (comma list; name=/path/file allowed)
ENC_PATH="${ENC_PATH:-}"                   # their weights: a file/folder (default: torch.hub's cache)
PROJ_COEFF="${PROJ_COEFF:-0.5}"            # weight of the alignment loss
ALIGN_DEPTH="${ALIGN_DEPTH:-8}"            # aligned block (REPA's --encoder-depth; ENC_DEPTH is the probe's)

# ---- training ----
MAX_STEPS="${MAX_STEPS:-400000}"
CKPT_EVERY="${CKPT_EVERY:-50000}"          # checkpoint period in steps (the last step is always saved)
SAMPLING_STEPS="${SAMPLING_STEPS:-10000}"  # preview grid period (0 = off)
MIXED_PRECISION="${MIXED_PRECISION:-fp16}"
REPORT_TO="${REPORT_TO:-wandb}"            # wandb | tensorboard | none
SEED="${SEED:-0}"
NUM_WORKERS="${NUM_WORKERS:-8}"
ADD_NAME="${ADD_NAME:-}"
EXTRA_TRAIN_ARGS="${EXTRA_TRAIN_ARGS:-}"    # more train.py flags, e.g. "--hidden-size 384 --depth 6"
SCHEDULE="${WEIGHTS_TYPE}-${WEIGHT_START}-to-${WEIGHT_END}-${N_WEIGHTS}"
REPA_NAME=""
if [[ -n "${ENC_TYPE}" ]]; then  # encoder names without their paths, joined by '+'
  REPA_NAME="-repa_$(echo "${ENC_TYPE}" | sed 's/=[^,]*//g; s/,/+/g')-align${ALIGN_DEPTH}-coeff${PROJ_COEFF}"
fi
NAME_ADD="${NAME_ADD:-uncond_${UNCOND_PROB}-enc${ENC_DEPTH}-RC_${CROP_START}-lambda-${SCHEDULE}-${ADD_NAME}${REPA_NAME}}"
SIZE="${MODEL#SiT-}"; SIZE="${SIZE%%/*}"
EXP_NAME="${EXP_NAME:-${SIZE}-${NAME_ADD}}"  # the authors' experiment name

# ---- generation (docs/sampling.md) ----
CKPT_STEP="${CKPT_STEP:-$MAX_STEPS}"
CKPT="${CKPT:-${OUTPUT_DIR}/${EXP_NAME}/checkpoints/$(printf '%07d' "$CKPT_STEP").pt}"
SAMPLE_DIR="${SAMPLE_DIR:-samples}"
MODE="${MODE:-sde}"
NUM_STEPS="${NUM_STEPS:-250}"
CFG_SCALE="${CFG_SCALE:-1.0}"
GUIDANCE_HIGH="${GUIDANCE_HIGH:-1.0}"
NUM_FID_SAMPLES="${NUM_FID_SAMPLES:-50000}"
PER_PROC_BATCH="${PER_PROC_BATCH:-64}"
VAE="${VAE:-ema}"                          # decoder for the FID samples
EXTRA_GEN_ARGS="${EXTRA_GEN_ARGS:-}"        # more generate.py flags; fastest: "--bf16 --compile"

# ---- evaluation ----
REF_BATCH="${REF_BATCH:-evaluator/VIRTUAL_imagenet256_labeled.npz}"
# SAMPLE_NPZ: the samples to evaluate (default: the npz that the generate stage writes)

run_train() {
  if [[ ! -e "${DATA_DIR}/vae-sd" && ! -e "${DATA_DIR}/vae-sd.zip" ]]; then
    cat >&2 <<EOF
error: no latents at DATA_DIR=${DATA_DIR} (expected ${DATA_DIR}/vae-sd or vae-sd.zip).
Build them from ImageNet (see preprocessing/dataset_tools.py --help):
  python preprocessing/dataset_tools.py convert --source IMAGENET/train --dest ${DATA_DIR}/images \\
      --resolution ${RESOLUTION}x${RESOLUTION} --transform center-crop-dhariwal
  torchrun --nproc_per_node ${N_GPU} preprocessing/dataset_tools.py encode \\
      --source ${DATA_DIR}/images --dest ${DATA_DIR}/vae-sd
or point DATA_DIR at an existing copy.
EOF
    exit 1
  fi
  echo "== train ${EXP_NAME} on ${N_GPU} GPU(s)"
  accelerate launch --num_processes "${N_GPU}" train.py \
    --report-to="${REPORT_TO}" \
    --allow-tf32 \
    --mixed-precision="${MIXED_PRECISION}" \
    --seed="${SEED}" \
    --model="${MODEL}" \
    --resolution="${RESOLUTION}" \
    --batch-size="${BATCH_SIZE}" \
    --gradient-accumulation-steps="${N_ACCUM}" \
    --uncond-prob="${UNCOND_PROB}" \
    --encoder-depth="${ENC_DEPTH}" \
    --crop-start="${CROP_START}" \
    --weights-type="${WEIGHTS_TYPE}" \
    --weight-start="${WEIGHT_START}" \
    --weight-end="${WEIGHT_END}" \
    --n-weights="${N_WEIGHTS}" \
    --enc-type="${ENC_TYPE}" \
    ${ENC_PATH:+--enc-path="${ENC_PATH}"} \
    --proj-coeff="${PROJ_COEFF}" \
    --align-depth="${ALIGN_DEPTH}" \
    --max-train-steps="${MAX_STEPS}" \
    --checkpointing-steps="${CKPT_EVERY}" \
    --sampling-steps="${SAMPLING_STEPS}" \
    --num-workers="${NUM_WORKERS}" \
    --resume-step=-1 \
    --exp-name="${EXP_NAME}" \
    --output-dir="${OUTPUT_DIR}" \
    --data-dir="${DATA_DIR}" \
    ${EXTRA_TRAIN_ARGS}
}

# The model, its probe depth, resolution and path type come from the checkpoint (generate.py reads
# them from it); passing them here could only contradict it.
GEN_ARGS=(
  --ckpt "${CKPT}"
  --num-fid-samples "${NUM_FID_SAMPLES}"
  --per-proc-batch-size "${PER_PROC_BATCH}"
  --vae "${VAE}"
  --mode "${MODE}"
  --num-steps "${NUM_STEPS}"
  --cfg-scale "${CFG_SCALE}"
  --guidance-high "${GUIDANCE_HIGH}"
  --global-seed "${SEED}"
  --name_add "${NAME_ADD}"
  --sample_dir "${SAMPLE_DIR}"
)

run_generate() {
  if [[ ! -f "${CKPT}" ]]; then
    echo "error: checkpoint ${CKPT} not found; train first, or set CKPT / CKPT_STEP" >&2
    exit 1
  fi
  echo "== generate ${NUM_FID_SAMPLES} samples from ${CKPT}"
  # shellcheck disable=SC2086  # EXTRA_GEN_ARGS is a list of flags
  torchrun --nnodes=1 --nproc_per_node="${N_GPU}" generate.py "${GEN_ARGS[@]}" ${EXTRA_GEN_ARGS}
}

run_evaluate() {
  if [[ ! -f "${REF_BATCH}" ]]; then
    cat >&2 <<EOF
error: reference batch ${REF_BATCH} not found. Download ADM's ImageNet 256 reference batch:
  wget -P evaluator https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz
or set REF_BATCH.
EOF
    exit 1
  fi
  # generate.py's own naming rule and flags, so the two never disagree (SAMPLE_NPZ overrides it)
  local npz="${SAMPLE_NPZ:-}"
  if [[ -z "${npz}" ]]; then
    # shellcheck disable=SC2086
    npz="$("${PYTHON}" generate.py "${GEN_ARGS[@]}" ${EXTRA_GEN_ARGS} --print-npz-path | tail -n 1)"
  fi
  if [[ ! -f "${npz}" ]]; then
    echo "error: samples ${npz} not found; run: bash main_LSEP.sh generate" >&2
    exit 1
  fi
  echo "== evaluate ${npz}"
  "${PYTHON}" evaluator/evaluator.py "${REF_BATCH}" "${npz}"
}

case "$STAGE" in
  train) run_train ;;
  generate) run_generate ;;
  evaluate) run_evaluate ;;
  all) run_train; run_generate; run_evaluate ;;
esac
