"""The embedded default: the whole LSEP pipeline on real data on a CPU, in minutes.

    python demo.py            # or: bash main_LSEP.sh demo
    python demo.py --quick    # the shortened run CI uses (a minute or two)
    python demo.py --source MY_CLASS_FOLDERS [--resolution 32] [--device auto]   # your own small set

With ``--source`` the same pipeline runs on your own class folders (one subfolder of images per
class, any sizes): they are converted at ``--resolution``, the model and recipe below are scaled
to that token grid and the class count is the data's; the class-consistency judge is then a
logistic regression fitted on your images. ``--device auto`` trains and samples on the GPU when
torch can use one (precision: the authors' fp16), else on the CPU (no mixed precision).

scikit-learn ships 1797 labelled 8x8 handwritten digits (10 classes). The demo upscales them to
32x32 RGB, writes them as a class-folder tree, and then runs the same tools as the ImageNet
pipeline, each as its own command:

1. ``preprocessing/dataset_tools.py convert`` -> ``images/`` + ``dataset.json``;
2. ``train.py --vae none`` (pixel space, no pretrained weights) for LSEP and, unless
   ``--no-baseline``, the SiT baseline (``--no-probe``) with every other setting equal;
3. ``generate.py --balanced-labels`` -> a PNG per sample and the ``.npz`` for the evaluator;
4. class consistency: a logistic regression fitted on real digits labels the samples; the
   share that matches the conditioning label is reported (the held-out accuracy of that
   classifier on real digits says how far to trust it);
5. ``probe.py``: held-out linear-probe top-1 per block of the frozen models (the paper's
   diagnostic);
6. ``evaluator/evaluator.py`` (FID etc. against the real digits) when the Inception weights
   are present (``--inception-weights PATH`` or torch-fidelity's cache).

Everything lands under ``--out`` (default ``demo_out/``); ``summary.json`` holds the numbers.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

from dataset import CustomDataset
from devices import cuda_problem
from sampling.seeds import sample_labels

ROOT = os.path.dirname(os.path.abspath(__file__))
NUM_CLASSES = 10
RESOLUTION = 32

# Model and recipe of the demo: 8x8 tokens (patch 4), probe after block 2 of 4, crop windows of
# 6..8 tokens (the paper's 12..16 of 16, scaled), the paper's time-bin probe weights; a higher
# learning rate, a short EMA and lognormal times so a few CPU minutes give legible digits.
# ``model_flags(resolution)`` scales the crop window to another grid (3/4 of its side, as 12 of 16).
PATCH = 4
ENCODER_DEPTH = 2
MODEL_FLAGS = ["--model", "SiT-S/4", "--hidden-size", "96", "--depth", "4", "--num-heads", "4",
               "--patch-size", "4", "--encoder-depth", str(ENCODER_DEPTH), "--crop-start", "6"]
RECIPE_FLAGS = ["--uncond-prob", "0.9", "--weights-type", "steps", "--weight-start", "0.0225",
                "--weight-end", "0.03", "--n-weights", "10", "--learning-rate", "2e-3",
                "--learning-rate-class", "2e-3", "--ema-decay", "0.99", "--batch-size", "32",
                "--weighting", "lognormal"]
SETTINGS = {  # full run (default) and --quick
    "full": dict(steps=1500, samples=300, sample_steps=20, probe_train=1000, probe_test=500),
    "quick": dict(steps=20, samples=50, sample_steps=5, probe_train=200, probe_test=100),
}


def flag_value(flags, name):
    """The value of ``name`` in a flag/value list."""
    return flags[flags.index(name) + 1]


def with_flags(flags, changes):
    """A copy of ``flags`` (flag/value pairs) with the values of ``changes`` replaced."""
    out = list(flags)
    for flag, value in changes.items():
        out[out.index(flag) + 1] = value
    return out


def model_flags(resolution):
    """MODEL_FLAGS for images of ``resolution`` pixels: the crop starts at 3/4 of the token grid's side."""
    return with_flags(MODEL_FLAGS, {"--crop-start": str(max(1, 3 * (resolution // PATCH) // 4))})


def run(cmd, log_path):
    """Run a pipeline command, showing its progress bars, keeping a log; fail loudly."""
    print("$ " + " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        proc.wait()
    if proc.returncode != 0:
        sys.exit(f"demo: step failed (exit {proc.returncode}); see {log_path}")


#################################################################################
#                                  The data                                     #
#################################################################################

def digit_images(resolution=RESOLUTION):
    """(1797, R, R, 3) uint8 upscaled digits and their labels, from scikit-learn's copy."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    small = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((resolution, resolution), Image.BICUBIC)) for im in small])
    return np.repeat(big[..., None], 3, axis=-1), digits.target.astype(np.int64)


def folder_images(data_dir):
    """(N, R, R, 3) uint8 images, labels and the class count of a converted ``data_dir/images``."""
    dataset = CustomDataset(data_dir, mode="pixel")
    images = np.stack([dataset[i].image.permute(1, 2, 0).numpy() for i in range(len(dataset))])
    return images, dataset.labels.astype(np.int64), dataset.num_classes


def write_class_folders(images, labels, dest):
    """The ImageNet-style source tree: one folder per class."""
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = os.path.join(dest, f"digit_{label}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(image).save(os.path.join(folder, f"{i:04d}.png"))


def save_reference_npz(images, path):
    """Real digits in the evaluator's format (arr_0: N x H x W x 3 uint8)."""
    if not os.path.exists(path):
        np.savez(path + ".tmp.npz", arr_0=images)
        os.replace(path + ".tmp.npz", path)


#################################################################################
#                                 Measurements                                  #
#################################################################################

def gray_features(images):
    """RxRx3 uint8 -> 64 features: grey level averaged over an 8x8 grid of cells (the digits' grid)."""
    grey = images.astype(np.float32).mean(-1) / 255.0
    n, side = grey.shape[0], grey.shape[1]
    return grey.reshape(n, 8, side // 8, 8, side // 8).mean(axis=(2, 4)).reshape(n, 64)


def fit_digit_classifier(images, labels, seed=0):
    """Logistic regression on the real images (the digits, or --source's); returns (classifier,
    held-out accuracy on real images)."""
    from sklearn.linear_model import LogisticRegression
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    cut = int(0.8 * len(labels))
    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(gray_features(images[order[:cut]]), labels[order[:cut]])
    held_out = float(clf.score(gray_features(images[order[cut:]]), labels[order[cut:]]))
    return clf, held_out


def class_consistency(clf, samples, labels):
    """Share of generated samples that the real-digit classifier assigns to their conditioning label."""
    return float((clf.predict(gray_features(samples)) == labels).mean())


def class_grid(samples, labels, path, per_class=10, num_classes=NUM_CLASSES):
    """PNG grid: one row per class, the first ``per_class`` samples of that class."""
    rows = []
    side = samples.shape[1]
    for c in range(num_classes):
        picked = samples[labels == c][:per_class]
        pad = np.zeros((per_class - len(picked), *samples.shape[1:]), np.uint8)
        rows.append(np.concatenate(list(np.concatenate([picked, pad])), axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).resize(
        (per_class * side * 2, num_classes * side * 2), Image.NEAREST).save(path)


def inception_weights_path(flag):
    """The Inception weights to use for FID, or None when they are not on this machine."""
    if flag:
        return flag
    cache = os.path.join(torch.hub.get_dir(), "checkpoints", "weights-inception-2015-12-05-6726825d.pth")
    return cache if os.path.isfile(cache) else None


#################################################################################
#                                   Pipeline                                    #
#################################################################################

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out", help="output folder")
    parser.add_argument("--quick", action="store_true", help="shortened run (CI): fewer steps and samples")
    parser.add_argument("--steps", type=int, default=None, help="training steps per model")
    parser.add_argument("--samples", type=int, default=None, help="generated samples per model (a multiple of the "
                                                                 "class count; default rounded up to one)")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also train the SiT baseline (--no-probe) and compare")
    parser.add_argument("--inception-weights", default=None, help="Inception .pth for FID (else skipped when absent)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", default=None, metavar="CLASS_FOLDERS",
                        help="your own data: one subfolder of images per class (default: scikit-learn's digits)")
    parser.add_argument("--resolution", type=int, default=RESOLUTION, help="image side in pixels (a multiple of 8)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the GPU when torch can use one, else the CPU")
    args = parser.parse_args(argv)
    if args.resolution < 8 or args.resolution % 8:
        parser.error(f"--resolution must be a multiple of 8 (the patch {PATCH} token grid and the judge's 8x8 "
                     f"cells), got {args.resolution}")
    if args.source is not None and not os.path.isdir(args.source):
        parser.error(f"--source {args.source} is not a folder (expected one subfolder of images per class)")
    device = pick_device(args.device)
    cfg = dict(SETTINGS["quick" if args.quick else "full"])
    cfg["steps"] = args.steps or cfg["steps"]
    out = os.path.abspath(args.out)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    start = time.time()
    res = args.resolution

    # 1. data in the ImageNet layout
    data_dir, images, labels, num_classes = prepare_data(args, out, logs)
    per_class = -(-(args.samples or cfg["samples"]) // num_classes)
    cfg.update(samples=per_class * num_classes, num_classes=num_classes, resolution=res, device=device)
    if args.samples and args.samples % num_classes:
        parser.error(f"--samples must be a multiple of the {num_classes} classes")
    reference = os.path.join(out, "reference.npz" if args.source else "digits_reference.npz")
    save_reference_npz(images, reference)

    variants = {"lsep": []} if not args.baseline else {"lsep": [], "baseline": ["--no-probe"]}
    clf, clf_real = fit_digit_classifier(images, labels, args.seed)
    weights = inception_weights_path(args.inception_weights)
    results = {name: run_variant(name, extra, args, cfg, out, logs, data_dir, labels, clf, weights, reference)
               for name, extra in variants.items()}
    summary = dict(settings=cfg, data=args.source or "scikit-learn digits", seconds=round(time.time() - start, 1),
                   real_digit_classifier_accuracy=clf_real,
                   fid="computed" if weights else "skipped: Inception weights not found (pass --inception-weights "
                   "PATH; torch-fidelity downloads weights-inception-2015-12-05-6726825d.pth from "
                   "github.com/toshas/torch-fidelity/releases)", results=results)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print_summary(summary, out)
    return summary


def run_variant(name, extra, args, cfg, out, logs, data_dir, labels, clf, weights, reference):
    """Stages 2-6 for one model (LSEP, or the baseline with ``extra`` = --no-probe): train, sample,
    class consistency, the per-block probe, and the ADM metrics when the Inception weights exist."""
    res, num_classes, device = cfg["resolution"], cfg["num_classes"], cfg["device"]
    # on a CPU train.py leaves mixed precision off by itself; the GPU takes the authors' fp16
    precision = [] if device == "cuda" else ["--mixed-precision", "no"]
    # 2. training
    print(f"== 2/6 train {name}: {cfg['steps']} steps, pixel space, {device}")
    run([sys.executable, "train.py", "--exp-name", name, "--output-dir", os.path.join(out, "exps"), "--data-dir", data_dir,
         "--vae", "none", "--resolution", str(res), "--num-classes", str(num_classes),
         *model_flags(res), *RECIPE_FLAGS, *extra, "--max-train-steps", str(cfg["steps"]),
         "--checkpointing-steps", str(cfg["steps"]), "--sampling-steps", "0", *precision,
         "--report-to", "none", "--num-workers", "0", "--seed", str(args.seed),
         "--log-every", str(max(1, cfg["steps"] // 20)), "--resume-step", "-1"],
        os.path.join(logs, f"train_{name}.log"))
    ckpt = os.path.join(out, "exps", name, "checkpoints", f"{cfg['steps']:07d}.pt")
    with open(os.path.join(out, "exps", name, "stats.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]

    # 3. sampling
    print(f"== 3/6 generate {cfg['samples']} samples ({name})")
    gen_argv = ["--ckpt", ckpt, "--num-fid-samples", str(cfg["samples"]), "--balanced-labels", "--mode", "ode",
                "--heun", "--num-steps", str(cfg["sample_steps"]), "--cfg-scale", "1.0",
                "--per-proc-batch-size", "100", "--sample_dir", os.path.join(out, "samples"), "--name_add", name,
                "--global-seed", str(args.seed), "--device", device]  # model, --vae none, size: from the checkpoint
    run([sys.executable, "generate.py", *gen_argv], os.path.join(logs, f"generate_{name}.log"))
    import generate
    npz = generate.main(generate.parse_args(gen_argv + ["--print-npz-path"])) + ".npz"
    samples = np.load(npz)["arr_0"]
    cond_labels = sample_labels(cfg["samples"], num_classes, args.seed, balanced=True).numpy()
    grid = os.path.join(out, f"grid_{name}.png")
    class_grid(samples, cond_labels, grid, num_classes=num_classes)

    # 4. class consistency
    print(f"== 4/6 class consistency ({name})")
    consistency = class_consistency(clf, samples, cond_labels)

    # 5. linear separability per block
    print(f"== 5/6 linear probe per block ({name})")
    probe_out = os.path.join(out, f"probe_{name}")
    num_train = min(cfg["probe_train"], len(labels) * 2 // 3)
    num_test = min(cfg["probe_test"], len(labels) - num_train)
    run([sys.executable, "probe.py", "--ckpt", ckpt, "--data-dir", data_dir, "--timesteps", "0.0", "0.5",
         "--num-train", str(num_train), "--num-test", str(num_test), "--out", probe_out,
         "--device", device, "--num-workers", "0", "--seed", str(args.seed)],
        os.path.join(logs, f"probe_{name}.log"))
    with open(os.path.join(probe_out, "probe.json")) as f:
        probe = json.load(f)

    # 6. ADM metrics when the Inception weights exist
    metrics = None
    if weights:
        print(f"== 6/6 evaluator ({name})")
        run([sys.executable, "evaluator/evaluator.py", reference, npz, "--inception-weights", weights, "--device", device],
            os.path.join(logs, f"evaluate_{name}.log"))
        with open(os.path.splitext(npz)[0] + ".metrics.json") as f:
            metrics = json.load(f)
    return dict(checkpoint=ckpt, samples_npz=npz, grid=grid, probe_json=os.path.join(probe_out, "probe.json"),
                probe_png=os.path.join(probe_out, "probe.png"), final_loss=last["loss"],
                final_probe_accuracy=last.get("probe_accuracy"), class_consistency=consistency,
                probe_timesteps=probe["timesteps"], probe_layers=probe["layers"], probe_top1=probe["top1"],
                metrics=metrics)


def prepare_data(args, out, logs):
    """Stage 1: the digits (or --source's class folders) through ``convert`` at --resolution into
    ``<out>/data/images``; returns (data folder, real images (N, R, R, 3) uint8, labels, class count)."""
    res, data_dir = args.resolution, os.path.join(out, "data")
    done = os.path.exists(os.path.join(data_dir, "images", "dataset.json"))
    if args.source is None:
        print("== 1/6 data: scikit-learn digits -> class folders -> preprocessing/dataset_tools.py convert")
        images, labels = digit_images(res)
        num_classes, source, transform = NUM_CLASSES, os.path.join(out, "raw_digits"), "center-crop"
        if not done:
            write_class_folders(images, labels, source)
    else:
        print(f"== 1/6 data: {args.source} -> preprocessing/dataset_tools.py convert at {res}x{res}")
        source, transform = os.path.abspath(args.source), "center-crop-dhariwal"
    if not done:
        run([sys.executable, "preprocessing/dataset_tools.py", "convert", "--source", source, "--dest",
             os.path.join(data_dir, "images"), "--resolution", f"{res}x{res}", "--transform", transform,
             "--workers", "2"], os.path.join(logs, "convert.log"))
    if args.source is not None:
        images, labels, num_classes = folder_images(data_dir)
    return data_dir, images, labels, num_classes


def pick_device(flag):
    """cuda or cpu for --device: auto takes the GPU when torch can use one; a GPU torch cannot use
    (an older driver than its CUDA build) is one line, as train.py and generate.py say it."""
    if flag == "cpu":
        return "cpu"
    problem = cuda_problem()
    if problem:
        sys.exit(f"demo: error: {problem}")
    if torch.cuda.is_available():
        return "cuda"
    if flag == "cuda":
        sys.exit("demo: error: --device cuda but torch sees no GPU; use --device auto or cpu")
    return "cpu"


def print_summary(summary, out):
    results = summary["results"]
    names = list(results)
    print("\n==================== LSEP demo summary ====================")
    print(f"{'':34}" + "".join(f"{n:>12}" for n in names))
    print(f"{'final training loss (total)':34}" + "".join(f"{results[n]['final_loss']:>12.4f}" for n in names))
    print(f"{'sample class consistency':34}" + "".join(f"{100 * results[n]['class_consistency']:>11.1f}%" for n in names))
    for i, t in enumerate(results[names[0]]["probe_timesteps"]):
        for j, layer in enumerate(results[names[0]]["probe_layers"]):
            label = f"linear probe t={t:g} block {layer}"
            print(f"{label:34}" + "".join(f"{100 * results[n]['probe_top1'][i][j]:>11.1f}%" for n in names))
    for n in names:
        if results[n]["metrics"]:
            print(f"{'ADM metrics ' + n:34}" + json.dumps(results[n]["metrics"]))
    print(f"(real-digit classifier held-out accuracy: {100 * summary['real_digit_classifier_accuracy']:.1f}%; "
          f"FID {summary['fid']})")
    print(f"took {summary['seconds']:.0f} s; files under {out}:")
    for n in names:
        print(f"  {n}: grid {results[n]['grid']}\n        samples {results[n]['samples_npz']}\n"
              f"        probe {results[n]['probe_png']}\n        checkpoint {results[n]['checkpoint']}")
    print(f"  summary: {os.path.join(out, 'summary.json')}")


if __name__ == "__main__":
    main()
