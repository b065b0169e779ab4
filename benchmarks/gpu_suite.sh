#!/usr/bin/env bash
# GPU checks and benchmarks for one H100/H200, in parts that each fit a 10-minute slot.
#   bash benchmarks/gpu_suite.sh train      # GPU tests, training step: ours vs the authors' train.py defaults
#                                           # (SDPA, fp16 + GradScaler), eager and compiled
#   bash benchmarks/gpu_suite.sh fair       # the fp16 row; the old manual-attention reference beside the fair
#                                           # one; the speed levers in eager mode
#   bash benchmarks/gpu_suite.sh sample     # step profile, sampling vs the authors' settings, levers
#   bash benchmarks/gpu_suite.sh loop       # train.py's own loop on random latents
#   bash benchmarks/gpu_suite.sh levers     # models/fused.py tests on the GPU; GELU epilogue, fused norm alone
#   bash benchmarks/gpu_suite.sh graphs     # CUDA graphs, clipping in AdamW alone; all equal-numerics levers
#   bash benchmarks/gpu_suite.sh fp8        # FP8 alone and with fused norm + CUDA graphs; SiT-B/2 loss curves
#   bash benchmarks/gpu_suite.sh numerics   # SiT-XL/2 loss curves, 300 steps: fp8 vs bf16, equal levers vs none
#   bash benchmarks/gpu_suite.sh autotune   # max-autotune once into the persistent compile cache (slow) ...
#   bash benchmarks/gpu_suite.sh autotune2  # ... then timed from the cache (run on the same warm machine)
#   bash benchmarks/gpu_suite.sh memory     # --grad-checkpoint: SiT-XL/2 batch 32 peak memory and step time
#   bash benchmarks/gpu_suite.sh all        # train sample loop (the first three parts)
# Results (JSON + gpu_suite.log) go to $OUT if set, else benchmarks/results/. Each command is bounded
# by `timeout`, and a failure does not stop the later ones. Lever timings: SiT-XL/2, 256 px, batch 64,
# bf16, compiled, against ours compiled (bench_train --levers); every part shares one inductor cache
# ($COMPILE_CACHE, default benchmarks/results/compile_cache), so a graph compiled by an earlier part on
# the same machine is loaded, not rebuilt.
set -uo pipefail
cd "$(dirname "$0")/.."

PART=${1:-all}
PY=${PYTHON:-python3}
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_suite.log"
export PYTHONUNBUFFERED=1
CACHE=${COMPILE_CACHE:-benchmarks/results/compile_cache}
export TORCHINDUCTOR_CACHE_DIR=$CACHE TRITON_CACHE_DIR=$CACHE/triton

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

TRAIN="$PY benchmarks/bench_train.py --device cuda --resolution 256 --batch-size 64 --precision bf16 --results-dir $RESULTS \
    --compile-cache $CACHE"
XL="$TRAIN --model SiT-XL/2"

if [ "$PART" = train ] || [ "$PART" = all ]; then
    # CUDA-only correctness: mixed precision, flash attention, inductor, train.py and generate.py on the GPU.
    run 200 "$PY" -m pytest -q tests/test_gpu.py -p no:cacheprovider
    # Ours vs the authors' train.py defaults (two-pass probe, loop crop, SDPA attention, fp16 autocast +
    # GradScaler, default AdamW, loop EMA), eager; then ours compiled (the reference stays eager).
    run 90 $TRAIN --model SiT-B/2 SiT-XL/2 --compare
    run 200 $TRAIN --model SiT-B/2 SiT-XL/2 --compare --compile
fi

if [ "$PART" = fair ]; then
    # The fp16 row of the performance tables: ours fp16 + GradScaler, compiled, against the same fair reference.
    run 200 $TRAIN --model SiT-XL/2 --precision fp16 --compare --compile --reps 3
    # The reference the figures before 2026-11-23 used (manual attention, same precision as ours),
    # timed today on the same machine, so old and new ratios can be set side by side.
    run 150 $XL --compare --compile --reference-attention manual --reference-precision bf16 --reps 3
    # The models/fused.py levers without compile (what eager users get).
    run 110 $XL --levers gelu-epilogue,fused-norm --reps 3
fi

if [ "$PART" = levers ]; then
    run 120 "$PY" -m pytest -q tests/test_fused.py -p no:cacheprovider
    # Each alone against ours compiled: fc1+GELU in one cuBLASLt GEMM (backward recomputes the
    # pre-activation), Triton LayerNorm+modulate and gate+residual.
    run 420 $XL --compile --levers gelu-epilogue,fused-norm --reps 3
fi

if [ "$PART" = graphs ]; then
    # CUDA graphs (compile mode reduce-overhead) alone; clipping inside fused AdamW alone; then GELU epilogue +
    # fused norm + clipping in AdamW + CUDA graphs.
    run 480 $XL --compile --levers cudagraphs,clip-in-adamw,all --reps 3
fi

if [ "$PART" = fp8 ] || [ "$PART" = numerics ]; then
    # torchao is not in requirements.txt (imported only by --fp8): install it from a carried wheel
    # (pip download torchao==0.18.0 --no-deps -d .whl) where the machine has no registry access.
    "$PY" -c "import torchao" 2>/dev/null || "$PY" -m pip install -q --no-deps .whl/torchao-*.whl 2>&1 | tee -a "$LOG"
fi

if [ "$PART" = fp8 ]; then
    # torchao float8 (tensorwise dynamic scaling) for the block matmuls; then with fused norm, clipping in
    # AdamW and CUDA graphs.
    run 360 $XL --compile --levers fp8,all-fp8 --reps 3
    run 200 "$PY" benchmarks/lever_numerics.py --model SiT-B/2 --levers fp8 --steps 300 --compile \
        --out "$RESULTS/lever_numerics_fp8_b2.json"
fi

if [ "$PART" = numerics ]; then
    # Same init, batches, times and noise; loss per step and final weights, levers vs none.
    run 400 "$PY" benchmarks/lever_numerics.py --model SiT-XL/2 --levers fp8 --steps 300 --compile \
        --out "$RESULTS/lever_numerics_fp8_xl2.json"
    run 180 "$PY" benchmarks/lever_numerics.py --model SiT-B/2 --levers gelu-epilogue,fused-norm --steps 300 \
        --compile --out "$RESULTS/lever_numerics_equal_b2.json"
fi

if [ "$PART" = autotune ]; then
    # Pays max-autotune's benchmarking once into $CACHE (one timed step; the numbers here are not the result).
    run 570 $XL --compile --compile-mode max-autotune-no-cudagraphs --warmup 1 --reps 1 --steps-per-rep 1
fi

if [ "$PART" = autotune2 ]; then
    # Same graphs from the cache: max-autotune against the default mode, and max-autotune with CUDA graphs.
    run 400 $XL --compile --compile-mode max-autotune-no-cudagraphs --levers compile-mode,cudagraphs --reps 3
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

if [ "$PART" = memory ]; then
    # --grad-checkpoint: SiT-XL/2 at batch 32 per GPU with and without activation recomputation (peak
    # memory: does it fit a 24 GB card? and the step-time cost), bf16, eager then compiled.
    run 280 $TRAIN --model SiT-XL/2 --batch-size 32 --reps 3
    run 280 $TRAIN --model SiT-XL/2 --batch-size 32 --reps 3 --grad-checkpoint
fi

echo "results in $RESULTS" | tee -a "$LOG"
