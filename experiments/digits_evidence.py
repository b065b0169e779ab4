"""The paper's claim in miniature, measured: SiT baseline, LSEP, REPA and REPA + LSEP on real digits.

    python experiments/digits_evidence.py            # full: 4 methods x 3 seeds, ~35 min on 2 CPU cores
    python experiments/digits_evidence.py --quick    # the CI version (about 1.5 minutes)

Data: scikit-learn's 1797 digits, upscaled to 32x32 RGB as demo.py does (pixel space, no VAE),
split once (seed 0, stratified) into a training split, the only digits the generative models and
the judge network ever train on, and a held-out split the generated samples are compared with.

Each method is trained by ``train.py`` (the demo's model and recipe; the baseline is ``--no-probe``,
all else equal) for every seed, with a checkpoint every ``eval_every`` steps. REPA's "external"
encoder is not a pretrained DINOv2 (none has seen a digit, and none can be downloaded here) but a
small ViT trained here, with class labels, on the training split only (``train_digit_encoder``),
passed as ``--enc-type custom-vit=FILE --enc-arch ...``. The costliest step (REPA + LSEP: probe
branch, frozen encoder forward, projector) runs ``--steps`` steps; every other method runs longer,
so that its training FLOPs (``models/flops.py``) cover that budget. Every checkpoint is sampled by
``generate.py`` (balanced labels) and measured:

- Frechet distance, precision and recall (``evaluator/metrics.py``, the ADM functions) between the
  samples and the held-out digits, in the 64-d pooled features of a small CNN trained on the
  training split: the domain analogue of FID with Inception (which has never seen a digit);
- class consistency: that CNN's accuracy on the samples against their conditioning labels;
- held-out linear-probe top-1 per block at t = 0 and 0.5 (``probe.py``: null label, probes fitted
  on training-split digits, tested on the held-out split).

Results are mean and standard deviation over seeds, at equal steps and at equal training FLOPs
(the baseline's curve interpolated linearly in FLOPs between its checkpoints), written as
``digits_evidence.json``, ``.md`` (markdown tables) and ``.png`` (curves vs steps and vs
FLOPs, mean line and min..max band over seeds) under ``--results``; the markdown and PNG carry
the sha256 of the JSON they were made from. Work files (data, checkpoints, samples, per-checkpoint
metrics) go under ``--out`` and make a rerun resume where it stopped.
"""
import argparse
import concurrent.futures
import glob
import hashlib
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import demo  # noqa: E402  (the digits, the model and the recipe: one source of truth)
from evaluator.metrics import feature_statistics, frechet_distance, precision_recall  # noqa: E402
from models.encoders import ENCODERS, Encoder, create_vit, parse_arch_overrides  # noqa: E402
from models.flops import SiTFlopsConfig, encoder_forward_flops, repa_train_step_flops, train_step_flops  # noqa: E402
from provenance import code_version  # noqa: E402
from sampling.seeds import sample_labels  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SPLIT_SEED = 0            # the held-out split is the same for every seed and method
HELD_OUT_FRACTION = 0.3   # ~539 held-out digits, ~1258 for training
PROBE_TIMESTEPS = (0.0, 0.5)

# What is compared. flags: extra train.py flags; probe: whether a step runs the LSEP probe branch;
# repa: whether it aligns to the digit encoder (REPA_FLAGS + the encoder's file).
METHODS = {
    "baseline": dict(label="SiT baseline (--no-probe)", flags=["--no-probe"], probe=False, repa=False),
    "lsep": dict(label="LSEP", flags=[], probe=True, repa=False),
    "repa": dict(label="REPA (digit ViT)", flags=["--no-probe"], probe=False, repa=True),
    "repa_lsep": dict(label="REPA + LSEP", flags=[], probe=True, repa=True),
}

# REPA's "external" encoder: timm's ViT layout, 4 blocks of width 64, patch 4, so that its 8x8 patch
# tokens at 32 px match the SiT-S/4's token grid (REPA aligns token by token). REPA's settings
# scaled to a 4-block SiT of width 96: aligned after block 1 (REPA: 8 of 28 for SiT-XL, 4 of 12 for
# SiT-B), projector width 256 (REPA: 2048 for widths 768-1152), --proj-coeff 0.5 (REPA's).
ENCODER_NAME = "custom-vit"
ENCODER_ARCH = "embed_dim=64,depth=4,num_heads=4,patch_size=4"
ALIGN_DEPTH, PROJECTOR_DIM = 1, 256
ENCODER_LR, ENCODER_SEED = 1e-3, 0  # its training (train_digit_encoder); epochs are in SETTINGS
REPA_FLAGS = ["--enc-arch", ENCODER_ARCH, "--align-depth", str(ALIGN_DEPTH), "--projector-dim", str(PROJECTOR_DIM)]

SETTINGS = {  # full run (default) and --quick (CI)
    "full": dict(seeds=(0, 1, 2), steps=800, eval_every=200, samples=250, sample_steps=10, probe_train=800,
                 cnn_epochs=10, encoder_epochs=30, jobs=2),
    "quick": dict(seeds=(0, 1), steps=5, eval_every=5, samples=100, sample_steps=4, probe_train=200,
                  cnn_epochs=3, encoder_epochs=1, jobs=2),
}
METRICS = {  # name: (table label, plot label, higher is better)
    "frechet_distance": ("Frechet distance (digit-CNN features) vs held-out", "Frechet distance", False),
    "precision": ("precision (k=3)", "precision", True),
    "recall": ("recall (k=3)", "recall", True),
    "class_consistency": ("class consistency of samples", "class consistency", True),
}


#################################################################################
#                                The data split                                 #
#################################################################################

def held_out_split(labels, fraction=HELD_OUT_FRACTION, seed=SPLIT_SEED):
    """(train_idx, held_idx): disjoint sorted indices, ``fraction`` of every class held out."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        cut = int(round(fraction * len(members)))
        held.append(members[:cut])
        train.append(members[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def prepare_data(out, images, labels, train_idx, log_dir):
    """The training split alone, as class folders -> preprocessing/dataset_tools.py convert."""
    data_dir = os.path.join(out, "data")
    if not os.path.exists(os.path.join(data_dir, "images", "dataset.json")):
        raw = os.path.join(out, "raw_train_digits")
        demo.write_class_folders(images[train_idx], labels[train_idx], raw)
        run_logged([sys.executable, "preprocessing/dataset_tools.py", "convert", "--source", raw, "--dest",
                    os.path.join(data_dir, "images"), "--resolution", f"{demo.RESOLUTION}x{demo.RESOLUTION}",
                    "--transform", "center-crop", "--workers", "2"], os.path.join(log_dir, "convert.log"), threads=2)
    with open(os.path.join(data_dir, "images", "dataset.json")) as f:
        if len(json.load(f)["labels"]) != len(train_idx):
            sys.exit(f"digits_evidence: {data_dir} holds another split; delete it (or pick a new --out)")
    return data_dir


def run_logged(cmd, log_path, threads=1):
    """Run one pipeline command with its output in ``log_path``; fail with the log's tail."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               WANDB_MODE="offline", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"{' '.join(cmd[1:3])} failed (exit {proc.returncode}); see {log_path}:\n{tail}")


#################################################################################
#                      The judge: a small CNN on real digits                    #
#################################################################################

class DigitCNN(nn.Module):
    """Three 3x3 conv layers on 32x32 grey digits; the 64-d pooled features play Inception's role."""

    def __init__(self, num_classes=demo.NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),   # 16x16
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def cnn_inputs(images):
    """(N, 32, 32, 3) uint8 -> (N, 1, 32, 32) float32 grey in [-1, 1]."""
    return torch.as_tensor(images).float().mean(-1)[:, None] / 127.5 - 1


def shifted_batches(x, epochs, batch_size, gen, fill):
    """Epochs of shuffled mini-batches of ``x`` (N, C, H, W), each moved by one random shift of up
    to 2 pixels (borders ``fill``): yields (indices, shifted batch)."""
    padded = F.pad(x, (2, 2, 2, 2), value=fill)
    side = x.shape[-1]
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
            yield idx, padded[idx, :, dy:dy + side, dx:dx + side]


def train_digit_cnn(images, labels, epochs, seed=0, batch_size=16):
    """Adam with a one-cycle learning rate on the training digits, random 2-pixel shifts per batch;
    deterministic for a seed (10 epochs: ~98% on the held-out digits, ~10 s on one core)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3,
                                                   total_steps=epochs * math.ceil(len(images) / batch_size))
    y = torch.as_tensor(labels)
    for idx, batch in shifted_batches(cnn_inputs(images), epochs, batch_size, gen, fill=-1.0):
        loss = F.cross_entropy(model(batch), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def cnn_features_and_predictions(model, images, batch_size=500):
    """(features (N, 64) float64 numpy, predicted labels (N,) numpy)."""
    feats, preds = [], []
    for start in range(0, len(images), batch_size):
        f = model.features(cnn_inputs(images[start:start + batch_size]))
        feats.append(f)
        preds.append(model.head(f).argmax(-1))
    return torch.cat(feats).double().numpy(), torch.cat(preds).numpy()


def sample_metrics(cnn, ref_stats, ref_features, samples, sample_labels):
    """Frechet distance, precision, recall (evaluator/metrics.py) and class consistency."""
    features, predictions = cnn_features_and_predictions(cnn, samples)
    mu, sigma = feature_statistics(features)
    precision, recall = precision_recall(ref_features, features, device="cpu")
    return dict(frechet_distance=frechet_distance(mu, sigma, *ref_stats), precision=precision, recall=recall,
                class_consistency=float((predictions == sample_labels).mean()))


#################################################################################
#              REPA's "external" encoder: a small ViT on the same digits        #
#################################################################################

def train_digit_encoder(images, labels, epochs, seed=ENCODER_SEED, batch_size=32):
    """The ViT REPA aligns to, trained with class labels on the training digits only.

    Built as train.py builds ``--enc-type custom-vit --enc-arch ENCODER_ARCH`` and fed through
    the same ``Encoder.preprocess``; the classifier reads the mean of the very patch tokens REPA
    aligns to (after the final norm), so those tokens carry the class. AdamW, one-cycle learning
    rate, random 2-pixel shifts; deterministic for a seed. Returns the timm ViT (eval mode)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    vit = create_vit(ENCODER_NAME, demo.RESOLUTION, **parse_arch_overrides(ENCODER_ARCH))
    preprocess = Encoder(ENCODER_NAME, vit, demo.RESOLUTION).preprocess  # freezes vit: unfrozen below
    vit.requires_grad_(True).train()
    head = nn.Linear(vit.embed_dim, demo.NUM_CLASSES)
    params = list(vit.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=ENCODER_LR, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=ENCODER_LR,
                                                   total_steps=epochs * math.ceil(len(images) / batch_size))
    x = torch.as_tensor(images).permute(0, 3, 1, 2).contiguous()  # uint8 (N, 3, 32, 32), as train.py's batches
    y = torch.as_tensor(labels)
    for idx, batch in shifted_batches(x, epochs, batch_size, gen, fill=0):
        tokens = vit.forward_features(preprocess(batch))
        loss = F.cross_entropy(head(tokens[:, vit.num_prefix_tokens:].mean(1)), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    vit.eval().requires_grad_(False)
    return vit, head.requires_grad_(False)


def encoder_accuracy(vit, head, images, labels):
    """Held-out top-1 of the encoder's own classifier (mean patch token -> linear head)."""
    preprocess = Encoder(ENCODER_NAME, vit, demo.RESOLUTION).preprocess
    with torch.no_grad():
        tokens = vit.forward_features(preprocess(torch.as_tensor(images).permute(0, 3, 1, 2)))
        predictions = head(tokens[:, vit.num_prefix_tokens:].mean(1)).argmax(-1).numpy()
    return float((predictions == labels).mean())


def prepare_encoder(out, images, labels, train_idx, held_idx, epochs):
    """The encoder's weights file under ``out`` (trained once; a rerun reuses it only if it was
    made the same way, file unchanged) and its record: file, sha256, held-out accuracy, training FLOPs."""
    path = os.path.join(out, "encoder", f"{ENCODER_NAME}.pt")
    made_by = dict(arch=ENCODER_ARCH, epochs=epochs, seed=ENCODER_SEED, train_digits=len(train_idx), lr=ENCODER_LR)
    record_path = path + ".json"

    def file_sha256():
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    if os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record["made_by"] != made_by:
            sys.exit(f"digits_evidence: {path} was made by {record['made_by']}, not {made_by}; delete {out} "
                     "(its REPA runs used that encoder) or pick a new --out")
        if not os.path.isfile(path) or file_sha256() != record["sha256"]:
            sys.exit(f"digits_evidence: {path} is missing or not the file {record_path} records; delete {out} "
                     "(its REPA runs used the recorded encoder) or pick a new --out")
        return record
    vit, head = train_digit_encoder(images[train_idx], labels[train_idx], epochs)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(vit.state_dict(), path + ".tmp")  # the file train.py loads: timm keys, no head
    os.replace(path + ".tmp", path)
    sha = file_sha256()
    arch = parse_arch_overrides(ENCODER_ARCH)
    record = dict(file=path, sha256=sha, made_by=made_by,
                  held_out_accuracy=encoder_accuracy(vit, head, images[held_idx], labels[held_idx]),
                  train_flops=3 * epochs * len(train_idx) * encoder_forward_flops(ENCODER_NAME, demo.RESOLUTION,
                                                                                  arch=arch))
    with open(record_path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(record_path + ".tmp", record_path)
    return record


#################################################################################
#                               Compute per step                                #
#################################################################################

def model_flag(name):
    """The value of a train.py model flag in demo.MODEL_FLAGS (flag/value pairs)."""
    flags = dict(zip(demo.MODEL_FLAGS[::2], demo.MODEL_FLAGS[1::2]))
    return flags[name]


def flops_config():
    """models/flops.py's size record of the demo's SiT in pixel space (checked against each checkpoint)."""
    return SiTFlopsConfig(depth=int(model_flag("--depth")), hidden_size=int(model_flag("--hidden-size")),
                          num_heads=int(model_flag("--num-heads")), patch_size=int(model_flag("--patch-size")),
                          input_size=demo.RESOLUTION, in_channels=3, num_classes=demo.NUM_CLASSES,
                          encoder_depth=int(model_flag("--encoder-depth")))


def batch_size():
    flags = dict(zip(demo.RECIPE_FLAGS[::2], demo.RECIPE_FLAGS[1::2]))
    return int(flags["--batch-size"])


def step_flops(method):
    """Training FLOPs of one optimizer step of ``method`` (forward + backward, the whole batch; for
    REPA also the frozen encoder's forward and the projector's forward + backward)."""
    flops = train_step_flops(flops_config(), batch=batch_size(), probe=METHODS[method]["probe"])
    if METHODS[method]["repa"]:
        flops += repa_train_step_flops(flops_config(), [ENCODER_NAME], demo.RESOLUTION, batch_size(), PROJECTOR_DIM,
                                       parse_arch_overrides(ENCODER_ARCH))
    return flops


def budget_method():
    """The method with the costliest step: it runs --steps steps, and its FLOPs are the budget."""
    return max(METHODS, key=step_flops)


def method_steps(method, cfg):
    """Steps per method: --steps for the costliest; at least its FLOPs for the others, rounded up
    to a whole number of evaluation intervals."""
    ratio = step_flops(budget_method()) / step_flops(method)
    return int(math.ceil(cfg["steps"] * ratio / cfg["eval_every"] - 1e-9)) * cfg["eval_every"]


def method_flags(method, encoder_file):
    """train.py flags of ``method`` beyond the demo's model and recipe."""
    flags = list(METHODS[method]["flags"])
    if METHODS[method]["repa"]:
        flags += ["--enc-type", f"{ENCODER_NAME}={encoder_file}", *REPA_FLAGS]
    return flags


#################################################################################
#                           Train, sample, measure                              #
#################################################################################

def train_run(out, data_dir, method, seed, steps, eval_every, encoder_file):
    """train.py with a checkpoint every ``eval_every`` steps (resumes an interrupted run)."""
    exp_root = os.path.join(out, "exps")
    name = f"{method}-seed{seed}"
    final = os.path.join(exp_root, name, "checkpoints", f"{steps:07d}.pt")
    if not os.path.isfile(final):
        run_logged([sys.executable, "train.py", "--exp-name", name, "--output-dir", exp_root, "--data-dir", data_dir,
                    "--vae", "none", "--resolution", str(demo.RESOLUTION), "--num-classes", str(demo.NUM_CLASSES),
                    *demo.MODEL_FLAGS, *demo.RECIPE_FLAGS, *method_flags(method, encoder_file),
                    "--max-train-steps", str(steps), "--checkpointing-steps", str(eval_every),
                    "--checkpointing-epochs", "0", "--sampling-steps", "0", "--mixed-precision", "no",
                    "--report-to", "none", "--num-workers", "0", "--seed", str(seed), "--log-every", str(eval_every),
                    "--resume-step", "-1"], os.path.join(out, "logs", f"train_{name}.log"))
    ms_per_step = {}  # of the log interval ending at each step (train.py's samples/s; survives resumes)
    with open(os.path.join(exp_root, name, "stats.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record.get("samples_per_sec"):
                ms_per_step[record["step"]] = 1e3 * batch_size() / record["samples_per_sec"]
    return os.path.join(exp_root, name, "checkpoints"), ms_per_step


def generate_samples(out, ckpt, method, seed, step, cfg):
    """generate.py --balanced-labels on one checkpoint: (uint8 samples, their conditioning labels)."""
    sample_dir = os.path.join(out, "samples", f"{method}-seed{seed}-{step:07d}")
    found = glob.glob(os.path.join(sample_dir, "*.npz"))
    if len(found) != 1:
        # The model's size comes from the checkpoint; the npz is the one file in its own folder.
        run_logged([sys.executable, "generate.py", "--ckpt", ckpt, "--vae", "none",
                    "--resolution", str(demo.RESOLUTION), "--num-fid-samples", str(cfg["samples"]),
                    "--balanced-labels", "--mode", "ode", "--heun", "--num-steps", str(cfg["sample_steps"]),
                    "--cfg-scale", "1.0", "--per-proc-batch-size", "100", "--sample_dir", sample_dir,
                    "--global-seed", str(seed), "--no-keep-pngs", "--device", "cpu"],
                   os.path.join(out, "logs", f"generate_{method}-seed{seed}-{step:07d}.log"))
        found = glob.glob(os.path.join(sample_dir, "*.npz"))
    samples = np.load(found[0])["arr_0"]
    labels = sample_labels(cfg["samples"], demo.NUM_CLASSES, seed, balanced=True).numpy()
    return samples, labels


def probe_top1(ckpt, probe_data, method):
    """Held-out linear-probe top-1 [t][block] of a checkpoint's EMA model (probe.py's functions),
    and the model's FLOPs size record."""
    import probe
    from models.checkpoint import load_model

    loaded = load_model(ckpt, which="ema", hash_weights=False)
    model, config = loaded.model, loaded.config  # eval mode, frozen, CPU
    made = (config.probe, config.aligned and (config.enc_type, config.align_depth, config.projector_dim))
    counted = (METHODS[method]["probe"], METHODS[method]["repa"] and ((ENCODER_NAME,), ALIGN_DEPTH, PROJECTOR_DIM))
    if made != counted:
        raise RuntimeError(f"{ckpt} was trained with (probe, REPA) = {made}, not the {counted} of {method}")
    (x_train, y_train), (x_test, y_test) = probe_data
    top1 = []
    for t in PROBE_TIMESTEPS:
        train_x, _ = probe.extract_features(model, (x_train, y_train), t, seed=0)
        test_x, _ = probe.extract_features(model, (x_test, y_test), t, seed=1)
        top1.append(probe.fit_linear_probe(train_x, y_train, test_x, y_test, demo.NUM_CLASSES))
    return top1, SiTFlopsConfig.from_model(model)


def evaluate_run(out, data_dir, method, seed, cfg, judge):
    """Train one (method, seed) run, then measure each of its checkpoints; returns the records."""
    steps = method_steps(method, cfg)
    ckpt_dir, ms_per_step = train_run(out, data_dir, method, seed, steps, cfg["eval_every"],
                                      (judge["encoder"] or {}).get("file"))
    records = []
    for step in range(cfg["eval_every"], steps + 1, cfg["eval_every"]):
        path = os.path.join(out, "metrics", f"{method}-seed{seed}-{step:07d}.json")
        if os.path.isfile(path):
            with open(path) as f:
                records.append(dict(json.load(f), ms_per_step=ms_per_step.get(step)))
            continue
        ckpt = os.path.join(ckpt_dir, f"{step:07d}.pt")
        samples, labels = generate_samples(out, ckpt, method, seed, step, cfg)
        top1, model_cfg = probe_top1(ckpt, judge["probe_data"], method)
        if model_cfg != flops_config():
            raise RuntimeError(f"{ckpt} is {model_cfg}, not the {flops_config()} the FLOPs were counted for")
        record = dict(method=method, seed=seed, step=step, flops=step * step_flops(method),
                      probe_top1=top1,
                      **sample_metrics(judge["cnn"], judge["ref_stats"], judge["ref_features"], samples, labels))
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
        print(f"  {method} seed {seed} step {step}: FD {record['frechet_distance']:.2f}  P {record['precision']:.3f}"
              f"  R {record['recall']:.3f}  class {record['class_consistency']:.3f}  probe t=0.5 "
              + "/".join(f"{a:.2f}" for a in top1[-1]), flush=True)
        records.append(dict(record, ms_per_step=ms_per_step.get(step)))
    return records


#################################################################################
#                           Mean and spread over seeds                          #
#################################################################################

def metric_value(record, name):
    """A scalar metric of a record; probe accuracies are named probe_t<t>_b<block>."""
    if name.startswith("probe_t"):
        t, block = name[len("probe_t"):].split("_b")
        return record["probe_top1"][PROBE_TIMESTEPS.index(float(t))][int(block) - 1]
    return record[name]


def metric_names(num_blocks):
    return list(METRICS) + [f"probe_t{t:g}_b{b}" for t in PROBE_TIMESTEPS for b in range(1, num_blocks + 1)]


def mean_std(values):
    """Mean and sample standard deviation (ddof=1; 0 for one value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def curves(records, method, name):
    """{seed: (steps, flops, values)} of one method and metric, sorted by step."""
    out = {}
    for seed in sorted({r["seed"] for r in records if r["method"] == method}):
        rows = sorted((r for r in records if r["method"] == method and r["seed"] == seed), key=lambda r: r["step"])
        out[seed] = (np.array([r["step"] for r in rows]), np.array([r["flops"] for r in rows], dtype=np.float64),
                     np.array([metric_value(r, name) for r in rows]))
    return out


def at_flops(flops, values, budget):
    """A run's metric at ``budget`` FLOPs, linear between its two bracketing checkpoints."""
    if not flops[0] <= budget <= flops[-1] * (1 + 1e-12):
        raise ValueError(f"budget {budget:.4g} FLOPs is outside the run's checkpoints {flops[0]:.4g}..{flops[-1]:.4g}")
    return float(np.interp(budget, flops, values))


def summarise(records, cfg):
    """Mean/std over seeds per method, step and metric, plus the equal-steps and equal-FLOPs tables."""
    num_blocks = len(records[0]["probe_top1"][0])
    names = metric_names(num_blocks)
    per_method = {}
    for method in METHODS:
        rows = {}
        for name in names:
            seeds = curves(records, method, name)
            steps = next(iter(seeds.values()))[0]
            for i, step in enumerate(steps):
                rows.setdefault(int(step), dict(step=int(step), flops=float(step * step_flops(method)),
                                                n_seeds=len(seeds)))[name] = mean_std([v[2][i] for v in seeds.values()])
        per_method[method] = [rows[s] for s in sorted(rows)]
    budget_steps = [row["step"] for row in per_method[budget_method()]]
    equal_steps, equal_flops = [], []
    for step in budget_steps:
        budget = step * step_flops(budget_method())
        steps_row, flops_row = dict(step=step, flops=budget), dict(step=step, flops=budget)
        for method in METHODS:
            flops_row[f"{method}_steps"] = budget / step_flops(method)
            for name in names:
                seeds = curves(records, method, name)
                steps_row[f"{method}:{name}"] = mean_std([v[2][list(v[0]).index(step)] for v in seeds.values()])
                flops_row[f"{method}:{name}"] = mean_std([at_flops(v[1], v[2], budget) for v in seeds.values()])
        equal_steps.append(steps_row)
        equal_flops.append(flops_row)
    return dict(names=names, per_method=per_method, equal_steps=equal_steps, equal_flops=equal_flops)


#################################################################################
#                                    Outputs                                    #
#################################################################################

def fmt(ms, name):
    mean, std = ms
    if name == "frechet_distance":
        return f"{mean:.2f} ± {std:.2f}"
    return f"{100 * mean:.1f} ± {100 * std:.1f}%"


def metric_label(name):
    if name in METRICS:
        return METRICS[name][0]
    t, block = name[len("probe_t"):].split("_b")
    return f"linear probe top-1, t = {t}, block {block}"


def markdown(result, sha):
    """Markdown tables: equal steps and equal FLOPs at the final budget, then the whole curves."""
    s, cfg, methods = result["summary"], result["settings"], list(METHODS)
    n = len(cfg["seeds"])
    head = "| metric | " + " | ".join(METHODS[m]["label"] for m in methods) + " |\n" \
           + "| --- |" + " --- |" * len(methods) + "\n"
    last_steps, last_flops = s["equal_steps"][-1], s["equal_flops"][-1]
    lines = [f"Mean ± std over {n} seeds ({', '.join(map(str, cfg['seeds']))}); {cfg['samples']} samples per checkpoint "
             f"({cfg['sample_steps']}-step Heun ODE, cfg 1.0, balanced labels) vs {result['data']['held_out']} held-out "
             f"real digits; judge CNN held-out accuracy {100 * result['judge']['held_out_accuracy']:.1f}%; real "
             f"training digits vs held-out (the floor at this sample size): Frechet distance "
             f"{result['judge']['real_frechet_distance']:.2f}, precision {100 * result['judge']['real_precision']:.1f}%, "
             f"recall {100 * result['judge']['real_recall']:.1f}%.", ""]
    enc = result.get("encoder")
    if enc:
        lines += [f"REPA's \"external\" encoder is not a pretrained DINOv2: it is a small ViT (timm layout, "
                  f"`{enc['enc_arch']}`, 8x8 patch tokens like the SiT's) trained here for "
                  f"{enc['made_by']['epochs']} epochs with class labels on the {enc['made_by']['train_digits']} "
                  f"training digits only (classifier on its mean patch token: {100 * enc['held_out_accuracy']:.1f}% "
                  f"held-out accuracy), passed as `--enc-type {enc['enc_type']}=FILE " + " ".join(enc["repa_flags"])
                  + f"` (REPA's settings scaled to a 4-block SiT, `--proj-coeff 0.5`). Its own training "
                  f"({enc['train_flops'] / 1e9:.0f} GFLOPs) is not in the budgets below, as REPA does not count "
                  "DINOv2's.", ""]
    lines += [f"**Equal steps** ({last_steps['step']} steps each, batch {batch_size()}; training GFLOPs "
              + ", ".join(f"{METHODS[m]['label']} {last_steps['step'] * step_flops(m) / 1e9:.0f}" for m in methods)
              + "):", "", head.rstrip("\n")]
    lines += ["| " + metric_label(name) + " | " + " | ".join(fmt(last_steps[f"{m}:{name}"], name) for m in methods)
              + " |" for name in s["names"]]
    lines += ["", f"**Equal training FLOPs** ({last_flops['flops'] / 1e9:.0f} GFLOPs: "
              + ", ".join(f"{METHODS[m]['label']} at {last_flops[f'{m}_steps']:.0f} steps" for m in methods)
              + "; between checkpoints a run's metric is interpolated linearly in FLOPs):", "", head.rstrip("\n")]
    lines += ["| " + metric_label(name) + " | " + " | ".join(fmt(last_flops[f"{m}:{name}"], name) for m in methods)
              + " |" for name in s["names"]]
    depth = int(model_flag("--encoder-depth"))
    curve_names = list(METRICS) + [f"probe_t{t:g}_b{depth}" for t in PROBE_TIMESTEPS]
    lines += ["", f"**Curves** (every checkpoint; probe columns at block {depth}, the LSEP probe depth):", "",
              "| method | step | GFLOPs | " + " | ".join(METRICS[c][1] if c in METRICS else f"probe t={c[7:].split('_b')[0]}"
                                                       for c in curve_names) + " |",
              "| --- | --- | --- |" + " --- |" * len(curve_names)]
    for m in methods:
        for row in s["per_method"][m]:
            lines.append(f"| {METHODS[m]['label']} | {row['step']} | {row['flops'] / 1e9:.0f} | "
                         + " | ".join(fmt(row[c], c) for c in curve_names) + " |")
    wall = result["wall_clock"]
    lines += ["", "Measured training wall-clock (`train.py`'s own timer, "
              f"{cfg['jobs']} runs at a time, one thread each, on a machine shared with other jobs): "
              + ", ".join(f"{METHODS[m]['label']} {wall[m]['ms_per_step']:.0f} ms/step" for m in methods
                          if wall[m]["ms_per_step"] is not None)
              + "; FLOPs per step (models/flops.py, the compute axis above): "
              + ", ".join(f"{METHODS[m]['label']} {step_flops(m) / 1e9:.2f} G" for m in methods) + ".",
              "", f"<sub>from digits_evidence.json, sha256 {sha}</sub>", ""]
    return "\n".join(lines)


def plot(result, path, sha):
    """Metric vs steps and vs FLOPs per method: mean over seeds, band = min..max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = int(model_flag("--encoder-depth"))
    names = list(METRICS) + [f"probe_t{t:g}_b{depth}" for t in PROBE_TIMESTEPS]
    records = result["records"]
    fig, axes = plt.subplots(len(names) // 2, 4, figsize=(16, 3.2 * len(names) // 2))
    for k, name in enumerate(names):
        label = METRICS[name][1] if name in METRICS else f"probe top-1 t={name[7:].split('_b')[0]}, block {depth}"
        for col, axis_name in enumerate(("steps", "GFLOPs")):
            ax = axes[k // 2, 2 * (k % 2) + col]
            for method in METHODS:
                seeds = curves(records, method, name)
                x = next(iter(seeds.values()))[0 if col == 0 else 1] / (1 if col == 0 else 1e9)
                values = np.stack([v[2] for v in seeds.values()])
                scale = 1 if name == "frechet_distance" else 100
                line, = ax.plot(x, scale * values.mean(0), marker="o", markersize=3, label=METHODS[method]["label"])
                ax.fill_between(x, scale * values.min(0), scale * values.max(0), color=line.get_color(), alpha=0.2)
            ax.set_xlabel(f"training {axis_name}")
            ax.set_ylabel(label + ("" if name == "frechet_distance" else " (%)"), fontsize=8)
            ax.grid(alpha=0.3)
            if k == 0:
                ax.legend(fontsize=8)
    fig.suptitle(f"digits, {len(result['settings']['seeds'])} seeds: mean, band = min..max over seeds "
                 f"(digits_evidence.json sha256 {sha})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Description": f"digits_evidence.json sha256 {sha}"})
    plt.close(fig)


def write_results(result, results_dir):
    """JSON, markdown and PNG, each written to a temporary file, then renamed into place JSON last;
    the markdown and PNG name the sha256 of the JSON bytes, so a mismatched set is detectable."""
    os.makedirs(results_dir, exist_ok=True)
    text = json.dumps(result, indent=1).encode()
    sha = hashlib.sha256(text).hexdigest()[:16]
    paths = {ext: os.path.join(results_dir, f"digits_evidence.{ext}") for ext in ("json", "md", "png")}
    tmp = {ext: f"{path}.tmp-{os.getpid()}.{ext}" for ext, path in paths.items()}
    try:
        with open(tmp["json"], "wb") as f:
            f.write(text)
        with open(tmp["md"], "w") as f:
            f.write(markdown(result, sha))
        plot(result, tmp["png"], sha)
        for ext in ("png", "md", "json"):
            os.replace(tmp[ext], paths[ext])
    finally:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
    return paths, sha


#################################################################################
#                                     Main                                      #
#################################################################################

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI version: 2 seeds, a few steps, few samples")
    parser.add_argument("--out", default=os.path.join(HERE, "work"), help="work folder (data, checkpoints, samples)")
    parser.add_argument("--results", default=os.path.join(HERE, "results"), help="folder for the json/md/png")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2)")
    parser.add_argument("--steps", type=int, default=None, help="LSEP's training steps (the compute budget)")
    parser.add_argument("--eval-every", type=int, default=None, help="checkpoint and measure every N steps")
    parser.add_argument("--samples", type=int, default=None, help="samples per checkpoint (multiple of 10)")
    parser.add_argument("--jobs", type=int, default=None, help="runs trained/measured at once (one thread each)")
    args = parser.parse_args(argv)
    cfg = dict(SETTINGS["quick" if args.quick else "full"])
    for key in ("seeds", "steps", "eval_every", "samples", "jobs"):
        if getattr(args, key) is not None:
            cfg[key] = tuple(args.seeds) if key == "seeds" else getattr(args, key)
    if cfg["samples"] % demo.NUM_CLASSES or cfg["samples"] < 65:
        parser.error(f"--samples must be a multiple of {demo.NUM_CLASSES} and above the 64 feature dimensions")
    if cfg["steps"] % cfg["eval_every"]:
        parser.error(f"--steps {cfg['steps']} must be a multiple of --eval-every {cfg['eval_every']}")
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    os.makedirs(os.path.join(out, "metrics"), exist_ok=True)
    torch.set_num_threads(1 if cfg["jobs"] > 1 else torch.get_num_threads())
    start = time.time()
    measured_before = set(os.listdir(os.path.join(out, "metrics")))  # a rerun reuses these

    images, labels = demo.digit_images()
    train_idx, held_idx = held_out_split(labels)
    data_dir = prepare_data(out, images, labels, train_idx, os.path.join(out, "logs"))
    print(f"data: {len(train_idx)} training digits, {len(held_idx)} held out; training the judge CNN", flush=True)
    cnn = train_digit_cnn(images[train_idx], labels[train_idx], cfg["cnn_epochs"])
    ref_features, held_pred = cnn_features_and_predictions(cnn, images[held_idx])
    ref_stats = feature_statistics(ref_features)
    # The floor: as many real training digits as samples, against the held-out digits.
    real = images[train_idx][np.random.default_rng(SPLIT_SEED).permutation(len(train_idx))[:cfg["samples"]]]
    real_features, _ = cnn_features_and_predictions(cnn, real)
    real_precision, real_recall = precision_recall(ref_features, real_features, device="cpu")
    judge_info = dict(held_out_accuracy=float((held_pred == labels[held_idx]).mean()),
                      real_frechet_distance=frechet_distance(*feature_statistics(real_features), *ref_stats),
                      real_precision=real_precision, real_recall=real_recall)
    print(f"judge CNN held-out accuracy {100 * judge_info['held_out_accuracy']:.1f}%; real digits: FD "
          f"{judge_info['real_frechet_distance']:.2f}", flush=True)
    probe_train = np.random.default_rng(SPLIT_SEED + 1).permutation(train_idx)[:cfg["probe_train"]]
    from models.vae import uint8_to_pixels

    def probe_inputs(idx):
        return uint8_to_pixels(torch.as_tensor(images[np.sort(idx)]).permute(0, 3, 1, 2)), \
            torch.as_tensor(labels[np.sort(idx)])

    encoder = None
    if any(METHODS[m]["repa"] for m in METHODS):
        print(f"training REPA's encoder ({ENCODER_NAME} {ENCODER_ARCH}) on the training split", flush=True)
        encoder = prepare_encoder(out, images, labels, train_idx, held_idx, cfg["encoder_epochs"])
        print(f"encoder held-out accuracy {100 * encoder['held_out_accuracy']:.1f}%", flush=True)
    judge = dict(cnn=cnn, ref_features=ref_features, ref_stats=ref_stats, encoder=encoder,
                 probe_data=(probe_inputs(probe_train), probe_inputs(held_idx)))

    runs = [(m, s) for s in cfg["seeds"] for m in METHODS]
    print(f"{len(runs)} runs, {cfg['jobs']} at a time; steps " + ", ".join(
        f"{m} {method_steps(m, cfg)}" for m in METHODS) + f", measured every {cfg['eval_every']}", flush=True)
    records = []
    with concurrent.futures.ThreadPoolExecutor(cfg["jobs"]) as pool:
        futures = [pool.submit(evaluate_run, out, data_dir, m, s, cfg, judge) for m, s in runs]
        for future in futures:
            records += future.result()

    wall_clock = {}
    for m in METHODS:
        per_step = [r["ms_per_step"] for r in records if r["method"] == m and r["ms_per_step"]]
        wall_clock[m] = dict(ms_per_step=float(np.mean(per_step)) if per_step else None,
                             flops_per_step=step_flops(m))
    result = dict(
        settings={**cfg, "seeds": list(cfg["seeds"]), "method_steps": {m: method_steps(m, cfg) for m in METHODS},
                  "quick": args.quick, "probe_timesteps": list(PROBE_TIMESTEPS), "train_flags": demo.MODEL_FLAGS
                  + demo.RECIPE_FLAGS, "methods": {m: METHODS[m] for m in METHODS}},
        data=dict(source="sklearn.datasets.load_digits, 8x8 -> 32x32 bicubic, grey as RGB", train=len(train_idx),
                  held_out=len(held_idx), split_seed=SPLIT_SEED, held_out_fraction=HELD_OUT_FRACTION),
        judge=dict(network="DigitCNN (3 conv layers, 64-d pooled features), trained on the training split",
                   **judge_info),
        encoder=encoder and dict(
            enc_type=ENCODER_NAME, enc_arch=ENCODER_ARCH, timm_layout=ENCODERS[ENCODER_NAME].timm_name,
            repa_flags=REPA_FLAGS, training="class labels, training split only, mean-pooled patch tokens -> linear head",
            file_sha256=encoder["sha256"], **{k: encoder[k] for k in ("made_by", "held_out_accuracy", "train_flops")}),
        wall_clock=wall_clock, seconds=round(time.time() - start, 1), records=records,
        invocation=dict(code=code_version(ROOT), records_reused=sum(
            f"{r['method']}-seed{r['seed']}-{r['step']:07d}.json" in measured_before for r in records),
            note="seconds: this invocation; records_reused: checkpoints measured by an earlier invocation over --out"))
    result["summary"] = summarise(records, cfg)
    paths, sha = write_results(result, os.path.abspath(args.results))
    with open(paths["md"]) as f:
        print("\n" + f.read())
    print(f"took {result['seconds']:.0f} s; wrote {', '.join(paths.values())}")
    return result


if __name__ == "__main__":
    main()
