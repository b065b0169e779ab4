"""probe.py: the linear probe on features of known separability, and the CLI end to end."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from models import SiT
from probe import extract_features, fit_linear_probe, main, sample_noise, split_indices

TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=3, num_heads=2, num_classes=4,
            encoder_depth=2)
# Mean colour of each class, in [-1, 1] model units: the class is a linear function of the image.
CLASS_COLOURS = torch.tensor([[-0.6, -0.6, 0.6], [0.6, -0.6, -0.6], [-0.6, 0.6, -0.6], [0.6, 0.6, 0.6]])


def gaussian_classes(n, num_classes=10, dim=64, separation=8.0, seed=0):
    """Class means of norm ``separation`` on random directions plus unit Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=gen)
    means = separation * means / means.norm(dim=1, keepdim=True)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return means[y] + torch.randn(n, dim, generator=gen), y


def tiny_model(seed=0, scale=0.3):
    """A random tiny SiT whose adaLN gates are non-zero, so every block changes the tokens."""
    torch.manual_seed(seed)
    model = SiT(**TINY)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(std=scale)
    return model.eval()


def coloured_images(n, seed=0, pixel_noise=0.25):
    """(uint8 images (n, 3, 8, 8), labels): class colour plus per-pixel noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = CLASS_COLOURS[y][:, :, None, None] + pixel_noise * torch.randn(n, 3, 8, 8, generator=gen)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), y


def write_pixel_dataset(root, images, labels):
    """dataset.py's pixel layout: images/00000/img00000000.png ... + images/dataset.json."""
    entries = []
    for i, (image, label) in enumerate(zip(images, labels)):
        name = f"{i // 1000:05d}/img{i:08d}.png"
        os.makedirs(os.path.join(root, "images", os.path.dirname(name)), exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(root, "images", name))
        entries.append([name, int(label)])
    with open(os.path.join(root, "images", "dataset.json"), "w") as f:
        json.dump({"labels": entries}, f)
    return str(root)


def save_checkpoint(path, model):
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "steps": 0,
                "args": argparse.Namespace(model="custom", model_kwargs=dict(TINY))}, path)
    return str(path)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    images, labels = coloured_images(320)
    data = write_pixel_dataset(root / "data", images, labels)
    return data, save_checkpoint(root / "tiny.pt", tiny_model())


#################################################################################
#                                  The probe fit                                #
#################################################################################

def test_separable_features_are_probed_perfectly_and_shuffled_labels_at_chance():
    x, y = gaussian_classes(4000)
    train, test = slice(0, 1000), slice(1000, 4000)
    assert fit_linear_probe(x[train], y[train], x[test], y[test], 10, epochs=200) >= 0.99
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    chance = fit_linear_probe(x[train], shuffled[train], x[test], shuffled[test], 10, epochs=200)
    assert abs(chance - 0.1) < 0.03  # 3000 test samples: binomial std 0.0055


def test_batched_layers_equal_separate_fits_and_chunks():
    # Layers of decreasing separability, one batched problem == one fit per layer.
    layers = [gaussian_classes(600, separation=s, seed=0) for s in (8.0, 2.0, 0.5)]
    train_x = torch.stack([x[:300] for x, _ in layers])
    test_x = torch.stack([x[300:] for x, _ in layers])
    y = layers[0][1]
    batched = fit_linear_probe(train_x, y[:300], test_x, y[300:], 10, epochs=100)
    alone = [fit_linear_probe(train_x[i], y[:300], test_x[i], y[300:], 10, epochs=100) for i in range(3)]
    chunked = fit_linear_probe(train_x, y[:300], test_x, y[300:], 10, epochs=100, layers_per_fit=2)
    assert batched == pytest.approx(alone, abs=1 / 300) and batched == pytest.approx(chunked, abs=1 / 300)
    assert batched[0] > batched[1] > batched[2]


def test_probe_matches_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    x, y = gaussian_classes(3000, separation=2.0, seed=3)
    weight_decay, n = 1e-2, 1000
    ours = fit_linear_probe(x[:n], y[:n], x[n:], y[n:], 10, epochs=300, weight_decay=weight_decay)
    mean, std = x[:n].mean(0), x[:n].std(0)
    # sklearn minimises C * sum CE + |W|^2 / 2, i.e. our objective with C = 1 / (weight_decay * n).
    reference = LogisticRegression(C=1 / (weight_decay * n), max_iter=2000).fit(((x[:n] - mean) / std).numpy(), y[:n])
    theirs = reference.score(((x[n:] - mean) / std).numpy(), y[n:].numpy())
    assert 0.3 < theirs < 0.95 and abs(ours - theirs) < 0.01


def test_split_is_disjoint_seeded_and_checked():
    train, test = split_indices(50, 30, 20, seed=3)
    assert sorted(train.tolist() + test.tolist()) == list(range(50))
    assert torch.equal(split_indices(50, 30, 20, seed=3)[0], train)
    assert not torch.equal(split_indices(50, 30, 20, seed=4)[0], train)
    with pytest.raises(Exception, match="dataset has only 50"):
        split_indices(50, 40, 20, seed=0)


#################################################################################
#                              Features of a tiny SiT                           #
#################################################################################

def test_class_colour_is_separable_at_t0_and_chance_at_t1_unless_the_label_leaks():
    model = tiny_model()
    images, y = coloured_images(480, seed=1)
    x0 = images.float() / 127.5 - 1
    top1 = {}
    for t, label in ((0.0, "null"), (1.0, "null"), (1.0, "true")):
        feats, labels = extract_features(model, (x0, y), t, label=label, batch_size=100)
        assert feats.shape == (3, 480, 32) and torch.equal(labels, y)
        top1[t, label] = fit_linear_probe(feats[:, :240], y[:240], feats[:, 240:], y[240:], 4, epochs=200)
    print(top1)
    assert min(top1[0.0, "null"]) > 0.9            # mean colour survives every random block
    assert max(top1[1.0, "null"]) < 0.4            # pure noise input: chance is 0.25
    assert min(top1[1.0, "true"]) > 0.9            # conditioning on the class leaks it


def test_noise_is_fixed_per_sample_whatever_the_batch_size():
    model = tiny_model()
    images, y = coloured_images(24)
    x0 = images.float() / 127.5 - 1
    a, _ = extract_features(model, (x0, y), 0.5, batch_size=24)
    b, _ = extract_features(model, (x0, y), 0.5, batch_size=5, layers=[2])
    assert torch.allclose(a[1], b[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(sample_noise([7], (3, 8, 8), seed=0)[0], sample_noise([3, 7], (3, 8, 8), seed=0)[1])


#################################################################################
#                                      CLI                                      #
#################################################################################

def test_cli_writes_json_and_png_and_is_deterministic(workspace, tmp_path):
    data, ckpt = workspace
    argv = ["--ckpt", ckpt, "--data-dir", data, "--timesteps", "0", "0.5", "1", "--num-train", "160",
            "--num-test", "160", "--batch-size", "64", "--num-workers", "0", "--device", "cpu", "--epochs", "150"]
    results = []
    for run in ("a", "b"):
        main(argv + ["--out", str(tmp_path / run)])
        with open(tmp_path / run / "probe.json") as f:
            results.append(json.load(f))
        with Image.open(tmp_path / run / "probe.png") as png:
            assert png.format == "PNG" and png.size[0] > 100 and png.size[1] > 100
    first = results[0]
    assert first["layers"] == [1, 2, 3] and first["timesteps"] == [0.0, 0.5, 1.0]
    top1 = np.array(first["top1"])
    assert top1.shape == (3, 3) and ((top1 >= 0) & (top1 <= 1)).all()
    assert top1[0].min() > 0.9 and top1[2].max() < 0.45 and first["label"] == "null"
    assert results[0]["top1"] == results[1]["top1"]


def test_cli_layers_and_true_label(workspace, tmp_path):
    data, ckpt = workspace
    result = main(["--ckpt", ckpt, "--data-dir", data, "--timesteps", "1", "--num-train", "100", "--num-test", "100",
                   "--layers", "1,3", "--label", "true", "--num-workers", "0", "--device", "cpu", "--epochs", "100",
                   "--out", str(tmp_path)])
    assert result["layers"] == [1, 3] and result["label"] == "true" and min(result["top1"][0]) > 0.9


@pytest.mark.parametrize("change, message", [
    (dict(ckpt="missing.pt"), "does not exist"),
    (dict(data="missing-dir"), "is not a folder"),
    (dict(num_train="300"), "dataset has only 320"),
    (dict(layers="2,7"), "blocks are numbered 1..3"),
    (dict(bad_ckpt=True), "records hidden_size=32 but its weights have hidden_size=64"),
])
def test_cli_user_errors(workspace, tmp_path, change, message):
    data, ckpt = workspace
    if change.get("bad_ckpt"):
        wide = SiT(**dict(TINY, hidden_size=64))
        torch.save({"ema": wide.state_dict(), "args": argparse.Namespace(model_kwargs=dict(TINY))},
                   tmp_path / "wide.pt")
        ckpt = str(tmp_path / "wide.pt")
    argv = ["--ckpt", str(tmp_path / change["ckpt"]) if "ckpt" in change else ckpt,
            "--data-dir", str(tmp_path / change["data"]) if "data" in change else data,
            "--num-train", change.get("num_train", "10"), "--num-test", "40", "--layers", change.get("layers", "all"),
            "--num-workers", "0", "--device", "cpu", "--epochs", "5", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert message in str(exit_info.value.code)


def test_cli_latent_dataset_and_config_name_checkpoint(tmp_path):
    # A bare EMA state dict (official SiT style): size from --model, classes from the label table.
    from models import SiT_models

    torch.manual_seed(0)
    model = SiT_models["SiT-S/8"](input_size=8, in_channels=4, num_classes=3)
    torch.save({"ema": model.state_dict()}, tmp_path / "sit.pt")
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    mean = labels[:, None, None, None].float() + 0.1 * torch.randn(60, 4, 8, 8, generator=gen)
    moments = torch.cat([mean, torch.full_like(mean, 0.1)], dim=1).numpy()
    entries = []
    for i in range(60):
        name = f"00000/img-mean-std-{i:08d}.npy"
        os.makedirs(tmp_path / "data" / "vae-sd" / "00000", exist_ok=True)
        np.save(tmp_path / "data" / "vae-sd" / name, moments[i])
        entries.append([name, int(labels[i])])
    with open(tmp_path / "data" / "vae-sd" / "dataset.json", "w") as f:
        json.dump({"labels": entries}, f)
    argv = ["--ckpt", str(tmp_path / "sit.pt"), "--data-dir", str(tmp_path / "data"), "--model", "SiT-S/8",
            "--timesteps", "0", "--num-train", "30", "--num-test", "30", "--layers", "1,12", "--num-workers", "0",
            "--device", "cpu", "--epochs", "50", "--out", str(tmp_path / "out")]
    result = main(argv)
    assert result["num_classes"] == 3 and len(result["top1"][0]) == 2 and min(result["top1"][0]) > 0.9
    assert main(argv)["top1"] == result["top1"]  # the posterior sample is seeded too
    with pytest.raises(SystemExit) as exit_info:
        main(argv[:5] + ["SiT-B/8"] + argv[6:])
    assert "--model SiT-B/8 contradicts checkpoint" in str(exit_info.value.code)
