"""Data-loading throughput of CustomDataset + DataLoader, against what SiT-XL/2 training consumes.

One LSEP training step (SiT-XL/2, 256 px) eats a global batch of 256 latents. This script builds
(or reads, --data-dir) an ImageNet-256-shaped layout: (8, 32, 32) float32 moments, and 256x256
PNGs for the paired path that also decodes every image with PIL (mode="latent+pixel": what REPA
alignment reads, and what the authors' loader decoded on every step).
It reports samples/s and batches/s per layout and worker count; with --step-rate (training
steps/s measured on your accelerator) it also reports the headroom, loader batches/s / step rate
(> 1: the loader keeps up). Files are read from a warm page cache, so this is the CPU cost.

    python benchmarks/bench_dataloader.py                      # synthetic data in a temp folder
    python benchmarks/bench_dataloader.py --data-dir DATA --step-rate 2.1
"""
import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import models.vae  # noqa: E402,F401  (imported by train.py anyway; keeps it out of the init timing)
from dataset import CustomDataset  # noqa: E402
from preprocessing.synthetic import write_synthetic_dataset  # noqa: E402


def measure(dataset, batch_size, workers, max_batches):
    """(first-batch seconds, steady samples/s, steady batches/s, batches timed) over one shuffled pass."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         pin_memory=False, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    it = iter(loader)
    next(it)  # includes worker start-up
    first = time.perf_counter() - start
    n, t0 = 0, time.perf_counter()
    for batch in it:
        n += 1
        if n >= max_batches:
            break
    elapsed = time.perf_counter() - t0
    del it
    return first, n * batch_size / elapsed, n / elapsed, n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="existing layout (vae-sd/, optional images/); default: synthetic")
    p.add_argument("--num-latents", type=int, default=4096, help="synthetic latent-only set size")
    p.add_argument("--num-images", type=int, default=1536, help="synthetic PNG + latent set size (authors' path)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--max-batches", type=int, default=100, help="timed batches per measurement (after the first)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of this process (collation at workers=0); DataLoader workers use 1 each")
    p.add_argument("--step-rate", type=float, default=None, help="training steps/s of SiT-XL/2 on your accelerator")
    p.add_argument("--out", default=os.path.join(HERE, "results", "dataloader.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)  # OpenMP spin-waits make torch.stack ~15x slower on a busy 2-core box

    tmp = None
    if args.data_dir is None:
        tmp = tempfile.mkdtemp(prefix="bench_dataloader_")
        t = time.perf_counter()
        write_synthetic_dataset(os.path.join(tmp, "latents"), args.num_latents, images=False,
                                latent_shape=(8, 32, 32), num_classes=1000)
        write_synthetic_dataset(os.path.join(tmp, "latents_zip"), args.num_latents, images=False,
                                latent_shape=(8, 32, 32), num_classes=1000, as_zip=True)  # stored, like --zip
        write_synthetic_dataset(os.path.join(tmp, "authors"), args.num_images, resolution=256,
                                latent_shape=(8, 32, 32), num_classes=1000, seed=1)
        print(f"built synthetic layouts in {tmp} ({time.perf_counter() - t:.1f} s)")
        cases = [("latents, folder", os.path.join(tmp, "latents"), {}),
                 ("latents, zip", os.path.join(tmp, "latents_zip"), {}),
                 ("PNG (PIL) + latents, latent+pixel", os.path.join(tmp, "authors"), {"mode": "latent+pixel"})]
    else:
        cases = [("latents", args.data_dir, {})]
        if any(os.path.exists(os.path.join(args.data_dir, p)) for p in ("images", "images.zip")):
            cases.append(("PNG (PIL) + latents, latent+pixel", args.data_dir, {"mode": "latent+pixel"}))

    results = []
    try:
        for name, data_dir, kwargs in cases:
            t = time.perf_counter()
            ds = CustomDataset(data_dir, **kwargs)
            init_s = time.perf_counter() - t
            for workers in args.workers:
                first, sps, bps, n = measure(ds, args.batch_size, workers, args.max_batches)
                row = dict(layout=name, items=len(ds), workers=workers, batch_size=args.batch_size,
                           init_s=round(init_s, 3), first_batch_s=round(first, 3), batches_timed=n,
                           samples_per_s=round(sps, 1), batches_per_s=round(bps, 3))
                if args.step_rate:
                    row["headroom"] = round(bps / args.step_rate, 2)
                results.append(row)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    head = f"{'layout':36} {'workers':>7} {'samples/s':>10} {'batches/s':>10} {'1st batch s':>11} {'init s':>7}"
    head += f" {'headroom':>9}" if args.step_rate else ""
    print(f"\nbatch {args.batch_size} (one SiT-XL/2 step = 256 samples), {os.cpu_count()} CPUs, "
          f"{args.threads} torch thread(s), shuffle, pin_memory=False")
    print(head)
    for r in results:
        line = (f"{r['layout']:36} {r['workers']:>7} {r['samples_per_s']:>10.0f} {r['batches_per_s']:>10.2f} "
                f"{r['first_batch_s']:>11.2f} {r['init_s']:>7.2f}")
        print(line + (f" {r['headroom']:>9.2f}" if args.step_rate else ""))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(results=results, step_rate=args.step_rate, threads=args.threads, cpus=os.cpu_count(),
                       torch=torch.__version__, python=platform.python_version(), machine=platform.machine()),
                  f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
