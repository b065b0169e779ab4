"""Linear separability of a SiT's features, block by block and time by time (the paper's diagnostic).

For each time t, x_t = alpha_t x + sigma_t e is built from held data x with one fixed noise e
per sample; the frozen model (EMA weights, eval mode) runs on x_t with the null label by
default, so the conditioning cannot leak the class; the mean-pooled tokens after every block
are the features. A multinomial logistic regression is fitted per (block, t) on a train split
and its held-out top-1 is reported as a table, ``<out>/probe.json`` and ``<out>/probe.png``.

    python probe.py --ckpt results/exp/checkpoints/0400000.pt --data-dir data/imagenet256 \\
        --timesteps 0.0 0.25 0.5 0.75 --num-train 10000 --num-test 5000 --out probe-out

Reproducible: the split is a seeded permutation of the dataset indices, the noise (and the
posterior sample of stored VAE moments) of sample i comes from its own generator seeded by
(--seed, i), on the CPU, so it does not depend on the batch size, the device or the split;
the probes start from zero and are fitted full batch by L-BFGS: no randomness at all.
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F

from dataset import CustomDataset
from errors import UserError, run_cli
from fileio import check_writable
from flagcheck import AT_LEAST_0, AT_LEAST_1, UNIT, check_ranges
from loss import PATH_TYPES, interpolant
from models.checkpoint import load_model
from models.config import MODEL_NAMES, ConfigError
from models.vae import sample_posterior, uint8_to_pixels
from seeding import derive_seed


RANGES = {"timesteps": UNIT, "num_train": AT_LEAST_1, "num_test": AT_LEAST_1, "batch_size": AT_LEAST_1,
          "num_workers": AT_LEAST_0, "seed": AT_LEAST_0, "epochs": AT_LEAST_1, "weight_decay": AT_LEAST_0,
          "layers_per_fit": AT_LEAST_1}


class ProbeError(UserError, RuntimeError):
    """A user-fixable problem (flags vs checkpoint vs data); printed as one line."""


#################################################################################
#                            Fixed per-sample randomness                        #
#################################################################################

def sample_generator(seed, index, stream):
    """CPU generator of sample ``index``: a hash of (seed, stream, index), so streams never collide."""
    return torch.Generator().manual_seed(derive_seed("lsep-probe", seed, stream, index))


def sample_noise(indices, shape, seed):
    """(B, *shape) float32 noise e, one fixed draw per dataset index (shared by every t)."""
    return torch.stack([torch.randn(shape, generator=sample_generator(seed, int(i), "noise")) for i in indices])


def split_indices(num_items, num_train, num_test, seed):
    """Disjoint sorted train and test indices from one seeded permutation of range(num_items)."""
    if num_train < 1 or num_test < 1:
        raise ProbeError(f"--num-train ({num_train}) and --num-test ({num_test}) must be positive")
    if num_train + num_test > num_items:
        raise ProbeError(f"--num-train {num_train} + --num-test {num_test} = {num_train + num_test} samples "
                         f"requested but the dataset has only {num_items}; lower them")
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed))
    return perm[:num_train].sort().values, perm[num_train:num_train + num_test].sort().values


class ProbeInputs(torch.utils.data.Dataset):
    """Clean model inputs of chosen dataset items: ``(x0, e, label)``.

    Pixel items (uint8) become x / 127.5 - 1; latent items (VAE moments) become a posterior
    sample drawn with the item's own generator (``models.vae.sample_posterior``). ``e`` is the
    item's fixed noise.
    """

    def __init__(self, dataset, indices, seed):
        self.dataset, self.indices, self.seed = dataset, [int(i) for i in indices], seed

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        index = self.indices[k]
        data, label = self.dataset[index][-2:]
        if data.dtype == torch.uint8:
            x0 = uint8_to_pixels(data)
        else:
            x0 = sample_posterior(data[None], generator=sample_generator(self.seed, index, "posterior"),
                                  norm=self.dataset.latent_norm)[0]  # the latents' own normalisation
        return x0, sample_noise([index], x0.shape, self.seed)[0], torch.as_tensor(label, dtype=torch.int64)


#################################################################################
#                                    Features                                   #
#################################################################################

def _batches(data, batch_size, seed):
    """Yield (x0, e, y) batches from (x0, y) tensors or from an iterable of such triples."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(d) for d in data):
        x0, y = data
        for start in range(0, len(x0), batch_size):
            idx = range(start, min(start + batch_size, len(x0)))
            yield x0[start:idx.stop], sample_noise(idx, x0.shape[1:], seed), y[start:idx.stop]
    else:
        yield from data


@torch.no_grad()
def extract_features(model, data, t, label="null", path_type="linear", layers=None, batch_size=64, seed=0):
    """Mean-pooled tokens after the chosen blocks at time ``t``: ``(features (L, N, D), labels (N,))``.

    data: ``(x0, y)`` tensors of clean model inputs (N, C, H, W) and labels (N,) (the noise of
        row i is ``sample_noise([i], ...)``), or an iterable of ``(x0, e, y)`` batches, e.g. a
        DataLoader over ``ProbeInputs``.
    label: "null" conditions on the null label ``model.num_classes`` (the class cannot leak in
        through the conditioning); "true" conditions on ``y``.
    layers: 1-based block numbers (default: all blocks). Features are float32 on the CPU.
    The model runs as is: put it in eval mode on its device first.
    """
    if label not in ("null", "true"):
        raise ValueError(f"label must be 'null' or 'true', got {label!r}")
    device = next(model.parameters()).device
    layers = list(range(1, len(model.blocks) + 1)) if layers is None else list(layers)
    features, labels = [], []
    for x0, e, y in _batches(data, batch_size, seed):
        x0, e, y = x0.to(device, torch.float32), e.to(device, torch.float32), y.to(device)
        tt = torch.full((x0.shape[0],), float(t), device=device)
        alpha_t, sigma_t, _, _ = interpolant(tt, path_type)
        x_t = alpha_t[:, None, None, None] * x0 + sigma_t[:, None, None, None] * e
        cond = torch.full_like(y, model.num_classes) if label == "null" else y
        pooled = model.pooled_block_features(x_t, tt, cond)
        features.append(torch.stack([pooled[layer - 1] for layer in layers]).cpu())
        labels.append(y.cpu())
    if not features:
        raise ProbeError("no data to extract features from")
    return torch.cat(features, dim=1), torch.cat(labels)


#################################################################################
#                                  Linear probe                                 #
#################################################################################

def fit_linear_probe(train_x, train_y, test_x, test_y, num_classes, epochs=200, weight_decay=1e-4, device=None,
                     layers_per_fit=None):
    """Held-out top-1 of a multinomial logistic regression fitted on standardised features.

    train_x (N, D) or (L, N, D): L independent problems (one per layer) solved as one batched
    problem (torch.bmm). Features are standardised with the train mean/std; the objective is
    mean cross-entropy + weight_decay / 2 * ||W||^2 (sklearn's LogisticRegression with
    C = 1 / (weight_decay * N)), minimised full batch from zero by L-BFGS (strong Wolfe line
    search) for at most ``epochs`` iterations. No randomness is involved. L-BFGS, not Adam:
    separable classes lying in a row need a large bias against many weights, which Adam's
    equal per-coordinate steps reach far too slowly. ``layers_per_fit`` bounds memory
    (logits and L-BFGS history scale with L) by fitting the layers in chunks.
    Returns a float for (N, D) input, else a list of L floats.
    """
    single = train_x.ndim == 2
    if single:
        train_x, test_x = train_x[None], test_x[None]
    if train_x.shape[1] != len(train_y) or test_x.shape[1] != len(test_y):
        raise ValueError(f"features {tuple(train_x.shape)} / {tuple(test_x.shape)} do not match labels "
                         f"{len(train_y)} / {len(test_y)}")
    for name, y in (("train", train_y), ("test", test_y)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"{name} labels must lie in [0, {num_classes}); found {int(y.min())}..{int(y.max())}")
    device = train_x.device if device is None else torch.device(device)
    chunk = layers_per_fit or train_x.shape[0]
    accuracies = []
    for start in range(0, train_x.shape[0], chunk):
        accuracies += _fit_chunk(train_x[start:start + chunk].to(device, torch.float32), train_y.to(device),
                                 test_x[start:start + chunk].to(device, torch.float32), test_y.to(device),
                                 num_classes, epochs, weight_decay)
    return accuracies[0] if single else accuracies


def _fit_chunk(train_x, train_y, test_x, test_y, num_classes, epochs, weight_decay):
    num_layers, num_train, dim = train_x.shape
    mean = train_x.mean(dim=1, keepdim=True)
    std = train_x.std(dim=1, keepdim=True).clamp_min(1e-6)  # a constant feature stays 0, not inf
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(num_layers, dim, num_classes, device=train_x.device, requires_grad=True)
    bias = torch.zeros(num_layers, 1, num_classes, device=train_x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=epochs, history_size=10,
                                  line_search_fn="strong_wolfe")
    targets = train_y.repeat(num_layers)

    def closure():
        optimizer.zero_grad(set_to_none=True)
        logits = torch.baddbmm(bias, train_x, weight)
        # Sum over layers of each layer's mean CE: the layers stay independent problems.
        loss = F.cross_entropy(logits.reshape(-1, num_classes), targets, reduction="sum") / num_train
        loss = loss + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        predictions = torch.baddbmm(bias, test_x, weight).argmax(dim=-1)
        return (predictions == test_y).float().mean(dim=1).tolist()


#################################################################################
#                              Checkpoint and data                              #
#################################################################################

def load_probe_model(args):
    """The checkpoint's frozen EMA model and config (models.checkpoint.load_model): --model and
    --path-type default to what the checkpoint records and must agree with it."""
    try:
        loaded = load_model(args.ckpt, given={"model": args.model, "path_type": args.path_type}, which="ema")
    except ConfigError as exc:
        raise ProbeError(str(exc)) from None
    if loaded.report.unexpected or loaded.report.ignored or loaded.report.missing:
        print(f"loaded {args.ckpt}: {loaded.report.summary()}")
    return loaded


def open_dataset(data_dir, data_mode, ckpt_in_channels=None):
    """CustomDataset in the mode the model needs: auto = pixel for 3-channel models, else latent
    when ``data_dir/vae-sd`` (or .zip) exists, else pixel. Returns (dataset, channels, side)."""
    if data_mode == "auto":
        has_latents = any(os.path.exists(os.path.join(data_dir, p)) for p in ("vae-sd", "vae-sd.zip"))
        data_mode = "pixel" if ckpt_in_channels == 3 or not has_latents else "latent"
    dataset = CustomDataset(data_dir, mode=data_mode, pixel_flag="--data-mode pixel")
    if data_mode == "pixel":
        channels, side, _ = dataset.image_shape
    else:
        channels, side = dataset.latent_shape[0] // 2, dataset.latent_shape[1]
    return dataset, channels, side


#################################################################################
#                                 Report outputs                                #
#################################################################################

def format_table(timesteps, layers, top1):
    """Rows = blocks, columns = times, held-out top-1 in percent."""
    lines = ["block " + "".join(f"{f't={t:g}':>9}" for t in timesteps)]
    for j, layer in enumerate(layers):
        lines.append(f"{layer:>5} " + "".join(f"{100 * row[j]:>8.2f}%" for row in top1))
    return "\n".join(lines)


def plot_probe(path, timesteps, layers, top1, chance, title):
    """probe.png: top-1 vs block, one line per t, chance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for t, row in zip(timesteps, top1):
        ax.plot(layers, [100 * a for a in row], marker="o", markersize=3, label=f"t = {t:g}")
    ax.axhline(100 * chance, color="gray", linestyle="--", linewidth=1, label="chance")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, 100)
    ax.set_xlabel("block")
    ax.set_ylabel("linear probe top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


#################################################################################
#                                      CLI                                      #
#################################################################################

def parse_layers(spec, depth):
    """'all' or comma-separated 1-based block numbers, checked against the model depth."""
    if spec == "all":
        return list(range(1, depth + 1))
    try:
        layers = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise ProbeError(f"--layers {spec!r} must be 'all' or comma-separated block numbers like 1,4,8") from None
    if not layers or layers[0] < 1 or layers[-1] > depth:
        raise ProbeError(f"--layers {spec!r}: blocks are numbered 1..{depth} for this model")
    return layers


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Linear separability of SiT features per block and time.")
    p.add_argument("--ckpt", required=True, help="checkpoint (.pt); its EMA weights are probed")
    p.add_argument("--data-dir", required=True, help="dataset folder (images/ and/or vae-sd/, see dataset.py)")
    p.add_argument("--model", default=None, choices=MODEL_NAMES, metavar="MODEL",
                   help="default: the checkpoint's; needed only for bare state dicts of non-table widths")
    p.add_argument("--data-mode", choices=("auto", "latent", "pixel"), default="auto",
                   help="latent = VAE moments (vae-sd/), pixel = images/; auto picks what the model takes")
    p.add_argument("--timesteps", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75],
                   help="times t in [0, 1] (0 = data, 1 = noise)")
    p.add_argument("--num-train", type=int, default=10000)
    p.add_argument("--num-test", type=int, default=5000)
    p.add_argument("--label", choices=("null", "true"), default="null",
                   help="conditioning label: null (no class leak) or the true class")
    p.add_argument("--layers", default="all", help="'all' or 1-based blocks, e.g. 1,4,8")
    p.add_argument("--path-type", choices=PATH_TYPES, default=None,
                   help="default: the checkpoint's (the interpolant it was trained on), else linear")
    p.add_argument("--batch-size", type=int, default=128, help="feature extraction batch")
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader workers")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0, help="split, noise and posterior samples")
    p.add_argument("--epochs", type=int, default=200, help="max full-batch L-BFGS iterations per probe")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="L2 penalty on the probe weights")
    p.add_argument("--layers-per-fit", type=int, default=None, help="fit layers in chunks (GPU memory)")
    p.add_argument("--out", default="probe-results", help="folder for probe.json and probe.png")
    args = p.parse_args(argv)
    check_ranges(p, args, RANGES)
    return args


def run(args):
    """Extract, fit and report; returns the dict written to probe.json."""
    check_writable(args.out, "--out")  # before any work: a file or read-only --out costs seconds, not a probe
    if not os.path.exists(args.ckpt):
        raise ProbeError(f"--ckpt {args.ckpt} does not exist")
    if not os.path.isdir(args.data_dir):
        raise ProbeError(f"--data-dir {args.data_dir} is not a folder")
    loaded = load_probe_model(args)
    config, model = loaded.config, loaded.model.to(args.device)
    dataset, channels, side = open_dataset(args.data_dir, args.data_mode, config.in_channels)
    if (channels, side) != (config.in_channels, config.input_size):
        raise ProbeError(f"the checkpoint's model takes {config.in_channels}x{config.input_size}x{config.input_size} "
                         f"inputs but --data-dir gives {channels}x{side}x{side}; use the dataset it was trained on "
                         "(or --data-mode pixel/latent)")
    layers = parse_layers(args.layers, len(model.blocks))
    if args.label == "null" and model.y_embedder.embedding_table.num_embeddings <= model.num_classes:
        raise ProbeError("the model has no null label (trained without label dropout); use --label true")
    if dataset.num_classes > model.num_classes and args.label == "true":
        raise ProbeError(f"the dataset has {dataset.num_classes} classes but the model knows {model.num_classes}")
    train_idx, test_idx = split_indices(len(dataset), args.num_train, args.num_test, args.seed)
    loaders = [torch.utils.data.DataLoader(ProbeInputs(dataset, idx, args.seed), batch_size=args.batch_size,
                                           num_workers=args.num_workers, pin_memory=args.device.startswith("cuda"))
               for idx in (train_idx, test_idx)]
    print(f"probing {len(layers)} blocks at t = {args.timesteps} on {args.num_train} train / {args.num_test} test "
          f"samples of {args.data_dir} ({dataset.num_classes} classes), conditioned on the {args.label} label")

    top1 = []
    for t in args.timesteps:
        (train_x, train_y), (test_x, test_y) = [
            extract_features(model, loader, t, label=args.label, path_type=config.path_type, layers=layers)
            for loader in loaders]
        top1.append(fit_linear_probe(train_x, train_y, test_x, test_y, dataset.num_classes, epochs=args.epochs,
                                     weight_decay=args.weight_decay, device=args.device,
                                     layers_per_fit=args.layers_per_fit))
        best = max(range(len(layers)), key=lambda j: top1[-1][j])
        print(f"t={t:g}: best block {layers[best]} top-1 {100 * top1[-1][best]:.2f}%")

    counts = torch.bincount(train_y, minlength=dataset.num_classes)
    result = {
        "ckpt": os.path.abspath(args.ckpt), "data_dir": os.path.abspath(args.data_dir),
        "label": args.label, "path_type": config.path_type, "seed": args.seed,
        "checkpoint": {"weights_sha256": loaded.weights_sha256, "steps": loaded.steps,
                       "run_id": loaded.provenance.get("run_id")}, "config": config.to_dict(),
        "num_train": args.num_train, "num_test": args.num_test, "num_classes": dataset.num_classes,
        "chance": 1.0 / dataset.num_classes,
        "majority": float((test_y == counts.argmax()).float().mean()),
        "probe": {"optimizer": "lbfgs", "epochs": args.epochs, "weight_decay": args.weight_decay},
        "timesteps": list(args.timesteps), "layers": layers,
        "top1": top1,  # top1[i][j]: time timesteps[i], block layers[j]
    }
    print(format_table(args.timesteps, layers, top1))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe.json"), "w") as f:
        json.dump(result, f, indent=2)
    title = f"{os.path.basename(args.ckpt)}, {args.label} label, {args.num_train} train / {args.num_test} test"
    plot_probe(os.path.join(args.out, "probe.png"), args.timesteps, layers, top1, result["chance"], title)
    print(f"wrote {os.path.join(args.out, 'probe.json')} and probe.png")
    return result


def main(argv=None):
    """Exit 1 with one line for what the user must fix (flags, checkpoint, data, output)."""
    return run_cli(lambda a: run(parse_args(a)), argv, prefix="probe.py: error: ", exit_code=1,
                   message_in_exit=True)


if __name__ == "__main__":
    main()
