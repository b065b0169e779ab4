"""What the checkpoint content hashes cost: sha256 throughput on this machine, one thread and the
thread pool that ``models.checkpoint.seal`` / ``verify`` use, scaled to SiT-XL/2's checkpoint.

    python benchmarks/bench_integrity.py [--mib 512] [--out benchmarks/results/integrity.json]

A training checkpoint holds the model, its EMA and AdamW's two moments: 4 float32 copies of the
parameters. ``seal`` hashes the entries in parallel (each state dict as one sha256 stream, as
provenance's weights hash; the optimizer state leaf by leaf), so its time is about the larger of
(one state dict at one thread's rate) and (all bytes at the pool's rate). Loading for sampling
verifies the EMA entry only.
"""
import argparse
import datetime
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from models.checkpoint import HASH_THREADS, seal, verify  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.sit import SiT  # noqa: E402


def rate(buffers, threads):
    """GiB/s of sha256 over ``buffers`` hashed ``threads`` at a time (best of 3)."""
    total = sum(len(b) for b in buffers) / 2**30
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda b: hashlib.sha256(b).hexdigest(), buffers))
        best = min(best, time.perf_counter() - start)
    return total / best


def _tensors(obj, path=""):
    if torch.is_tensor(obj):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{path}/{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{path}[{i}]")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="bytes hashed per measurement")
    parser.add_argument("--model", default="SiT-B/2", help="a training checkpoint of this size is sealed and verified")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "integrity.json"))
    args = parser.parse_args(argv)
    chunk = 16 * 2**20
    buffers = [torch.randn(chunk // 4).view(torch.uint8).numpy().tobytes() for _ in range(args.mib * 2**20 // chunk)]
    one, pool = rate(buffers, 1), rate(buffers, HASH_THREADS)
    with torch.device("meta"):
        params = sum(p.numel() for p in SiT(ModelConfig(model="SiT-XL/2")).parameters())
    state_gib = params * 4 / 2**30
    total_gib = 4 * state_gib  # model, ema, exp_avg, exp_avg_sq
    seal_s = max(state_gib / one, total_gib / pool)
    # measured: seal and verify a checkpoint of --model's size, laid out as training writes it
    model = SiT(ModelConfig(model=args.model))
    state = model.state_dict()
    moments = {i: {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
               for i, p in enumerate(model.parameters())}
    checkpoint = {"model": state, "ema": {k: v.clone() for k, v in state.items()}, "steps": 1,
                  "opt": {"state": moments, "param_groups": [{"lr": 1e-4, "params": list(moments)}]}}
    measured_gib = sum(t.numel() * t.element_size() for _, t in _tensors(checkpoint)) / 2**30
    start = time.perf_counter()
    sealed = seal(checkpoint)
    seal_measured = time.perf_counter() - start
    start = time.perf_counter()
    verify(sealed, "bench")
    verify_measured = time.perf_counter() - start
    rows = [("sha256, 1 thread", f"{one:.2f} GiB/s"), (f"sha256, {HASH_THREADS} threads", f"{pool:.2f} GiB/s"),
            ("SiT-XL/2 parameters", f"{params / 1e6:.1f} M"), ("one state dict (fp32)", f"{state_gib:.2f} GiB"),
            ("training checkpoint (model, ema, 2 moments)", f"{total_gib:.2f} GiB"),
            ("seal / verify a training checkpoint (est.)", f"{seal_s:.1f} s"),
            ("verify the EMA for sampling (est.)", f"{state_gib / one:.1f} s"),
            (f"measured: {args.model} checkpoint", f"{measured_gib:.2f} GiB"),
            (f"measured: seal {args.model}", f"{seal_measured:.2f} s ({measured_gib / seal_measured:.2f} GiB/s)"),
            (f"measured: verify {args.model}", f"{verify_measured:.2f} s ({measured_gib / verify_measured:.2f} GiB/s)"),
            ("SiT-XL/2 at the measured seal rate", f"{total_gib * seal_measured / measured_gib:.1f} s")]
    for name, value in rows:
        print(f"{name:<48} {value}")
    record = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(["benchmarks/bench_integrity.py"] + (sys.argv[1:] if argv is None else argv)),
              "torch": torch.__version__, "sha256_gib_s_1_thread": one, "sha256_gib_s_pool": pool, "threads": HASH_THREADS,
              "sit_xl2_params": params, "state_dict_gib": state_gib, "checkpoint_gib": total_gib,
              "seal_or_verify_s_est": seal_s, "verify_ema_s_est": state_gib / one, "cpu_count": os.cpu_count(),
              "measured_model": args.model, "measured_gib": measured_gib, "seal_s": seal_measured,
              "verify_s": verify_measured, "sit_xl2_seal_s_at_measured_rate": total_gib * seal_measured / measured_gib}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
