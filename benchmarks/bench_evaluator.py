"""Time the ADM evaluator: Inception feature extraction and the five metrics for N samples.

    python benchmarks/bench_evaluator.py                         # N = 10k and 50k
    python benchmarks/bench_evaluator.py --sizes 256,1024 --device cpu

Images are random uint8 256x256x3 batches cycled from an in-memory pool (no disk), fed
through the same `extract_features` path as the CLI (host -> device copy included). The
reference set's features are the sample features shuffled plus noise, so the metrics see
(N, 2048) / (N, 2023) arrays of the real sizes. Without the real Inception weights a random-
weight network of the same architecture is used: the same FLOPs, meaningless numbers; the
table says which. Writes benchmarks/results/evaluator.json.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from evaluator import inception as inc
from evaluator import metrics


class CyclingImages:
    """n random images served from a small pool: sliceable like NpzImages."""

    def __init__(self, n, size, pool=512, seed=0):
        self.n = n
        self.pool = np.random.default_rng(seed).integers(0, 256, (min(pool, n), size, size, 3), dtype=np.uint8)

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        start, stop, _ = index.indices(self.n)
        rows = np.arange(start, stop) % len(self.pool)
        return self.pool[rows]


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def flops_per_image(model, size, device):
    x = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,50000", help="comma-separated sample counts")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--inception-weights", default=None, help="real weights file (default: torch.hub cache)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's fp32 peak, to report extraction as a fraction of it")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "evaluator.json"))
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    sizes = [int(s) for s in args.sizes.split(",")]
    if device == "cuda":  # as the CLI: full fp32 like the TF graph
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    try:
        weights, weights_kind = inc.resolve_weights(args.inception_weights, download=False), "real"
    except inc.InceptionWeightsUnavailable:
        weights = inc.save_random_inception_weights(os.path.join(tempfile.mkdtemp(), "random.pth"))
        weights_kind = "random (real weights absent: timings valid, metric values meaningless)"
    model = inc.InceptionV3Features(weights, device=device)
    gflop = flops_per_image(model, args.image_size, device) / 1e9
    inc.extract_features(model, CyclingImages(min(args.batch_size, 8), args.image_size), 8, progress=False)  # warm-up

    rows = []
    for n in sizes:
        images = CyclingImages(n, args.image_size)
        feats, t_extract = timed(lambda: inc.extract_features(model, images, args.batch_size, progress=False), device)
        rng = np.random.default_rng(1)
        perm = rng.permutation(n)
        ref_pool = feats["pool"][perm] + rng.normal(0, 0.01, feats["pool"].shape).astype(np.float32)
        ref_spatial = feats["spatial"][perm] + rng.normal(0, 0.01, feats["spatial"].shape).astype(np.float32)

        probs, t_softmax = timed(lambda: metrics.softmax(feats["logits"]), "cpu")
        _, t_is = timed(lambda: metrics.inception_score(probs), "cpu")
        stats, t_stats = timed(lambda: [metrics.feature_statistics(x) for x in
                                        (ref_pool, feats["pool"], ref_spatial, feats["spatial"])], "cpu")
        _, t_fid = timed(lambda: metrics.frechet_distance(*stats[1], *stats[0]), "cpu")
        _, t_sfid = timed(lambda: metrics.frechet_distance(*stats[3], *stats[2]), "cpu")
        _, t_pr = timed(lambda: metrics.precision_recall(ref_pool, feats["pool"], device=device), device)
        t_metrics = t_softmax + t_is + t_stats + t_fid + t_sfid + t_pr
        rate = n / t_extract
        row = {
            "n": n, "extract_s": t_extract, "images_per_s": rate, "ms_per_image": 1000 / rate,
            "extract_tflops": gflop * rate / 1e3, "stats_s": t_stats, "fid_sqrtm_s": t_fid, "sfid_sqrtm_s": t_sfid,
            "is_s": t_softmax + t_is, "precision_recall_s": t_pr, "metrics_s": t_metrics,
            "total_s": t_extract + t_metrics,
            "extrapolated_50k_extract_s": 50000 / rate,
            "extrapolated_50k_note": f"linear from the per-image rate measured at N={n}; precision/recall grows as N^2",
        }
        if args.peak_tflops:
            row["extract_fraction_of_peak"] = row["extract_tflops"] / args.peak_tflops
        rows.append(row)

    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device: {device} ({name}), threads {torch.get_num_threads()}, load average {load:.1f}, "
          f"weights: {weights_kind}")
    print(f"Inception forward: {gflop:.2f} GFLOP/image at {args.image_size}px (resized to 299 inside)")
    header = f"{'N':>7} {'extract s':>10} {'img/s':>8} {'ms/img':>8} {'TFLOP/s':>8} {'stats s':>8} " \
             f"{'FID s':>7} {'sFID s':>7} {'IS s':>6} {'P/R s':>7} {'total s':>8} {'50k extract s*':>15}"
    print(header)
    for r in rows:
        print(f"{r['n']:>7} {r['extract_s']:>10.1f} {r['images_per_s']:>8.1f} {r['ms_per_image']:>8.1f} "
              f"{r['extract_tflops']:>8.3f} {r['stats_s']:>8.2f} {r['fid_sqrtm_s']:>7.1f} {r['sfid_sqrtm_s']:>7.1f} "
              f"{r['is_s']:>6.2f} {r['precision_recall_s']:>7.2f} {r['total_s']:>8.1f} "
              f"{r['extrapolated_50k_extract_s']:>15.0f}")
    print("* extrapolated linearly from the per-image rate measured at that N (not measured at 50k)")

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    result = {"device": device, "device_name": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "load_average_1min": load,
              "weights": weights_kind, "image_size": args.image_size, "batch_size": args.batch_size,
              "gflop_per_image": gflop, "rows": rows, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = args.out + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
