#!/usr/bin/env bash
# GPU checks and benchmarks for one H100/H200, in parts that each fit a 10-minute slot.
#   bash benchmarks/gpu_suite.sh train      # GPU tests, training step: ours vs reference, eager and compiled
#   bash benchmarks/gpu_suite.sh sample     # step profile, sampling vs the authors' settings, levers
#   bash benchmarks/gpu_suite.sh loop       # train.py's own loop on random latents
#   bash benchmarks/gpu_suite.sh all
# Results (JSON + gpu_suite.log) go to $OUT if set, else benchmarks/results/. Each command is bounded
# by `timeout`, and a failure does not stop the later ones.
set -uo pipefail
cd "$(dirname "$0")/.."

PART=${1:-all}
PY=${PYTHON:-python3}
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_suite.log"
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/lsep_inductor_cache}

run() {  # run LIMIT_SECONDS CMD...: echo, time-bound, log
    local limit=$1; shift
    echo "+ $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "= exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$LOG"
}

{ date -Is; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv
  "$PY" -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)"
} 2>&1 | tee -a "$LOG"

TRAIN="$PY benchmarks/bench_train.py --device cuda --resolution 256 --batch-size 64 --precision bf16 --results-dir $RESULTS"

if [ "$PART" = train ] || [ "$PART" = all ]; then
    # CUDA-only correctness: mixed precision, flash attention, inductor, train.py and generate.py on the GPU.
    run 200 "$PY" -m pytest -q tests/test_gpu.py -p no:cacheprovider
    # Ours vs the authors' structure (two-pass probe, loop crop, manual attention, default AdamW, loop
    # EMA), eager; then ours compiled (the reference stays eager).
    run 90 $TRAIN --model SiT-B/2 SiT-XL/2 --compare
    run 200 $TRAIN --model SiT-B/2 SiT-XL/2 --compare --compile
fi

if [ "$PART" = sample ] || [ "$PART" = all ]; then
    # Where the compiled SiT-XL/2 step spends its time (phases, kernel kinds, attention backends).
    run 150 "$PY" benchmarks/profile_train.py --model SiT-XL/2 --compile --out "$RESULTS/profile_train.json"
    # Sampling, SiT-XL/2 at 256 px, the authors' per-process batch 32: their settings (fp32 weights,
    # TF32, manual attention) against ours (bf16 autocast + flash attention, then also compiled), same
    # weights and noise; SDE 250 steps and ODE 50 steps, CFG 1.5 (guided everywhere).
    run 200 "$PY" benchmarks/bench_sampling.py --device cuda --model SiT-XL/2 --batch-size 32 --compare --compile \
        --repeats 1 --out "$RESULTS/sampling_compare.json"
    # One lever at a time against ours (eager) for SiT-XL/2.
    run 100 $TRAIN --model SiT-XL/2 --levers probe,attention,optimizer,ema --reps 3
fi

if [ "$PART" = loop ] || [ "$PART" = all ]; then
    # train.py's own loop (data loading, the non-finite guard, logging, the final checkpoint) on
    # random latents, compiled.
    run 260 bash benchmarks/train_loop_gpu.sh "$RESULTS"
    # The evaluator: Inception features and the five metrics at 10k and 50k samples (random weights).
    run 190 "$PY" benchmarks/bench_evaluator.py --sizes 10000,50000 --device cuda --out "$RESULTS/evaluator_gpu.json"
fi

echo "results in $RESULTS" | tee -a "$LOG"
