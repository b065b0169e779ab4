#!/usr/bin/env bash
# train.py's own loop on one GPU (data loader, posterior sampling, the non-finite guard, logging,
# the final checkpoint) on random SD-VAE-shaped moments: SiT-XL/2, 256 px, batch 64, bf16, compiled.
# Prints samples/s per logging window from stats.jsonl and the MFU of the last window.
#   bash benchmarks/train_loop_gpu.sh [RESULTS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${1:-benchmarks/results}
WORK=${TMPDIR:-/tmp}/lsep_train_loop
STEPS=${STEPS:-60}
rm -rf "$WORK" && mkdir -p "$WORK" "$RESULTS"
"$PY" -c "import sys; sys.path.insert(0, 'tests'); from test_train import make_latent_data; make_latent_data('$WORK/data', n=2048, side=32)"
"$PY" train.py --data-dir "$WORK/data" --output-dir "$WORK/exps" --exp-name loop --model SiT-XL/2 \
    --resolution 256 --batch-size 64 --mixed-precision bf16 --compile --max-train-steps "$STEPS" \
    --log-every 20 --sampling-steps 0 --report-to none --num-workers 4 --num-classes 1000
cp "$WORK/exps/loop/stats.jsonl" "$RESULTS/train_loop_stats.jsonl"
"$PY" - "$WORK/exps/loop/stats.jsonl" <<'PYEOF'
import json, sys
import torch
from models import SiT_models
from models.flops import SiTFlopsConfig, peak_flops, train_step_flops
records = [json.loads(line) for line in open(sys.argv[1])]
model = SiT_models["SiT-XL/2"](input_size=32, num_classes=1000)
flops = train_step_flops(SiTFlopsConfig.from_model(model), 1, probe=True)
peak = peak_flops(torch.cuda.get_device_name(), "bf16", tf32=True)
for r in records:
    print(f"step {r['step']:4d}: {r['samples_per_sec']:8.1f} samples/s, MFU {r['samples_per_sec'] * flops / peak:6.1%}, "
          f"loss {r['loss']:.4f}, peak alloc {r.get('cuda_max_alloc_gb', float('nan')):.1f} GiB")
PYEOF
