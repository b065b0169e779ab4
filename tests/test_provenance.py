"""Provenance: one ModelConfig rebuilt from any checkpoint, flags that contradict it refused, sample
sets that know which weights and settings made them, latents that know their VAE.

The first tests reproduce three silent wrong results of an earlier version (each passed silently before):
two experiments' checkpoints of the same step sampled into one folder, a cosine-path model sampled
and probed on the linear path, and latents of one VAE kept when re-encoding with another.
"""
import argparse
import json
import os

import numpy as np
import pytest
import torch

import generate
from sampling.errors import GenerateError
from sampling.identity import PROVENANCE_FILE, read_npz_identity
import probe
import train
from training.errors import TrainingError
from models import ModelConfig, SiT
from models.checkpoint import atomic_save, config_from_checkpoint, load_model, weights_sha256
from models.config import DEFAULTS, ConfigError, resolve_config

TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=4,
            encoder_depth=1)

pytestmark = pytest.mark.usefixtures("one_thread")


def our_checkpoint(path, seed=0, **overrides):
    """A checkpoint as train.py writes it (config + provenance), with varied weights."""
    torch.manual_seed(seed)
    model = SiT(ModelConfig(**{**TINY, "model": "custom", **overrides}))
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    atomic_save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "args": argparse.Namespace(),
                 "steps": 10, "config": model.config.to_dict(), "provenance": {"run_id": f"run{seed}"}}, path)
    return model


def gen_argv(ckpt, out, *extra):
    return ["--ckpt", str(ckpt), "--num-fid-samples", "6", "--per-proc-batch-size", "3", "--sample_dir", str(out),
            "--mode", "sde", "--num-steps", "4", "--device", "cpu", *extra]


def npz_images(folder):
    with np.load(folder + ".npz") as f:
        return f["arr_0"]


#################################################################################
#                     Three paths that once passed silently                     #
#################################################################################

def test_two_experiments_same_step_never_share_a_sample_folder(tmp_path):
    a, b = tmp_path / "expA" / "checkpoints", tmp_path / "expB" / "checkpoints"
    os.makedirs(a), os.makedirs(b)
    model_a = our_checkpoint(a / "0400000.pt", seed=0)
    our_checkpoint(b / "0400000.pt", seed=1)
    folder = generate.main(generate.parse_args(gen_argv(a / "0400000.pt", tmp_path / "samples")))
    # B's flags name the same folder; before, this printed "nothing to do" and B was evaluated on A's samples
    with pytest.raises(GenerateError, match=r"made by something else \(checkpoint weights .*expA.*expB"):
        generate.main(generate.parse_args(gen_argv(b / "0400000.pt", tmp_path / "samples")))
    # the npz says which weights made it: the sha256 of A's EMA tensors
    identity = read_npz_identity(folder + ".npz")
    assert identity["checkpoint"]["weights_sha256"] == weights_sha256(model_a.state_dict())
    assert identity["checkpoint"]["run_id"] == "run0" and identity["settings"]["num_steps"] == 4
    # another --name_add gives B its own set
    folder_b = generate.main(generate.parse_args(gen_argv(b / "0400000.pt", tmp_path / "samples", "--name_add", "B")))
    assert not np.array_equal(npz_images(folder_b), npz_images(folder))


def test_partial_folder_is_finished_only_by_the_same_checkpoint_and_precision(tmp_path):
    ckpt, other = tmp_path / "0000010.pt", tmp_path / "other" / "0000010.pt"
    our_checkpoint(ckpt, seed=0)
    os.makedirs(other.parent)
    our_checkpoint(other, seed=1)
    unbroken = npz_images(generate.main(generate.parse_args(gen_argv(ckpt, tmp_path / "full"))))
    partial = gen_argv(ckpt, tmp_path / "part", "--max-batches", "1")
    folder = generate.main(generate.parse_args(partial))
    assert len([n for n in os.listdir(folder) if n.endswith(".png")]) == 3
    with pytest.raises(GenerateError, match="checkpoint weights"):
        generate.main(generate.parse_args(gen_argv(other, tmp_path / "part")))
    with pytest.raises(GenerateError, match="precision tf32 there, bf16 now"):
        generate.main(generate.parse_args(gen_argv(ckpt, tmp_path / "part", "--precision", "bf16")))
    with pytest.raises(GenerateError, match="fused_attn True there, False now"):
        generate.main(generate.parse_args(gen_argv(ckpt, tmp_path / "part", "--no-fused-attn")))
    # nothing was written by the refused runs; the matching run finishes the set exactly
    assert len([n for n in os.listdir(folder) if n.endswith(".png")]) == 3
    np.testing.assert_array_equal(npz_images(generate.main(generate.parse_args(gen_argv(ckpt, tmp_path / "part")))),
                                  unbroken)


def test_folder_without_provenance_is_refused(tmp_path):
    ckpt = tmp_path / "0000010.pt"
    our_checkpoint(ckpt)
    folder = generate.main(generate.parse_args(gen_argv(ckpt, tmp_path / "s", "--max-batches", "1")))
    os.remove(os.path.join(folder, PROVENANCE_FILE))  # as an older generate.py left it
    with pytest.raises(GenerateError, match="without a readable provenance.json"):
        generate.main(generate.parse_args(gen_argv(ckpt, tmp_path / "s")))


def test_cosine_model_is_sampled_on_its_own_path_without_the_flag(tmp_path):
    ckpt = tmp_path / "cosine.pt"
    our_checkpoint(ckpt, path_type="cosine")
    implicit = npz_images(generate.main(generate.parse_args(gen_argv(ckpt, tmp_path / "a"))))
    explicit = npz_images(generate.main(generate.parse_args(gen_argv(ckpt, tmp_path / "b", "--path-type", "cosine"))))
    np.testing.assert_array_equal(implicit, explicit)
    # the path matters (the SDE's score depends on it): the linear path on the same weights gives other images
    linear_ckpt = tmp_path / "linear.pt"
    our_checkpoint(linear_ckpt, path_type="linear")  # same seed, same weights, other recorded path
    linear = npz_images(generate.main(generate.parse_args(gen_argv(linear_ckpt, tmp_path / "c"))))
    assert np.abs(linear.astype(int) - implicit).max() > 10
    with pytest.raises(GenerateError, match="--path-type linear contradicts checkpoint .*path_type=cosine"):
        generate.main(generate.parse_args(gen_argv(ckpt, tmp_path / "d", "--path-type", "linear")))


def test_probe_uses_the_checkpoint_path_type(tmp_path):
    from PIL import Image

    ckpt = tmp_path / "cosine.pt"
    our_checkpoint(ckpt, path_type="cosine")
    images = tmp_path / "data" / "images" / "00000"
    os.makedirs(images)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(images / f"img{i:08d}.png")
        entries.append([f"00000/img{i:08d}.png", i % 4])
    with open(tmp_path / "data" / "images" / "dataset.json", "w") as f:
        json.dump({"labels": entries}, f)
    argv = ["--ckpt", str(ckpt), "--data-dir", str(tmp_path / "data"), "--timesteps", "0.5", "--num-train", "8",
            "--num-test", "8", "--num-workers", "0", "--device", "cpu", "--epochs", "3", "--out", str(tmp_path / "o")]
    result = probe.main(argv)
    assert result["path_type"] == "cosine" and result["config"]["path_type"] == "cosine"
    assert result["top1"] == probe.main(argv + ["--path-type", "cosine"])["top1"]
    with pytest.raises(SystemExit, match="--path-type linear contradicts"):
        probe.main(argv + ["--path-type", "linear"])


#################################################################################
#                     One loader for every kind of checkpoint                   #
#################################################################################

def test_loader_rebuilds_every_kind_of_checkpoint(tmp_path):
    model = our_checkpoint(tmp_path / "ours.pt", crop_start=2, path_type="cosine")
    state = model.state_dict()
    expected = model.config
    # ours: everything from the stored config
    assert load_model(str(tmp_path / "ours.pt")).config == expected
    # ours before the config object: SiT kwargs in args.model_kwargs, the path in args.path_type
    kwargs = {k: v for k, v in expected.sit_kwargs().items() if k != "path_type"}
    torch.save({"ema": state, "args": argparse.Namespace(model_kwargs=kwargs, path_type="cosine")}, tmp_path / "old.pt")
    assert load_model(str(tmp_path / "old.pt")).config == expected
    # the authors': their flag names, crop as (random_crop, crop_start, crop_end) on the 4x4 grid
    authors_args = argparse.Namespace(model="SiT-S/2", num_classes=4, encoder_depth=1, qk_norm=False,
                                      path_type="cosine", cfg_prob=0.1, uncond_prob=0.9, random_crop=True,
                                      crop_start=2, crop_end=5, resolution=256)
    torch.save({"model": state, "ema": state, "opt": {}, "args": authors_args, "steps": 3}, tmp_path / "authors.pt")
    with pytest.raises(Exception, match="records hidden_size=384 but its weights have hidden_size=32"):  # their name vs weights
        load_model(str(tmp_path / "authors.pt"))
    authors_args.model = "tiny"  # a name outside the table: the sizes come from the weights, heads from the flag
    torch.save({"model": state, "ema": state, "opt": {}, "args": authors_args, "steps": 3}, tmp_path / "authors.pt")
    loaded = load_model(str(tmp_path / "authors.pt"), given={"num_heads": 2})
    assert loaded.config == expected and loaded.kind == "authors' args" and loaded.steps == 3
    # a bare state dict: sizes from the weights, the rest from flags (heads too: width 32 is in no table)
    torch.save(state, tmp_path / "bare.pt")
    bare = load_model(str(tmp_path / "bare.pt"), given={"num_heads": 2, "encoder_depth": 1, "path_type": "cosine",
                                                       "crop_start": 2})
    assert bare.config == expected and bare.weights_sha256 == loaded.weights_sha256
    # REPA: projectors ignored, its --encoder-depth (alignment depth) is not the probe depth
    repa_state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    repa_state["projectors.0.0.weight"] = torch.zeros(8, 32)
    repa_args = argparse.Namespace(model="tiny", encoder_depth=2, path_type="linear", qk_norm=False,
                                   num_classes=4, cfg_prob=0.1)
    torch.save({"ema": repa_state, "args": repa_args}, tmp_path / "repa.pt")
    repa = load_model(str(tmp_path / "repa.pt"), given={"num_heads": 2, "encoder_depth": 1})
    assert repa.config.encoder_depth == 1 and repa.config.path_type == "linear" and repa.kind == "REPA args"
    assert repa.report.ignored == ["projectors.0.0.weight"] and len(repa.report.missing) == 4
    for key in state:
        if not key.startswith("classifier."):
            assert torch.equal(repa.model.state_dict()[key], state[key]), key


def test_contradicting_flags_and_broken_records_are_one_line(tmp_path):
    model = our_checkpoint(tmp_path / "ours.pt", crop_start=2)
    checkpoint = torch.load(tmp_path / "ours.pt", weights_only=False)
    state = checkpoint["ema"]
    source = "checkpoint X"
    for given, message in [({"num_classes": 10}, "--num-classes 10 contradicts checkpoint X, which has num_classes=4"),
                           ({"encoder_depth": 2}, "--encoder-depth 2 contradicts"),
                           ({"qk_norm": True}, "--qk-norm on contradicts"),
                           ({"model": "SiT-B/2"}, "--model SiT-B/2 contradicts checkpoint X, which has depth=2"),
                           ({"crop_start": 3}, "probe window sides 3..4 but checkpoint X has sides 2..4")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            config_from_checkpoint(checkpoint, state, given, None, source)
    # flags equal to the checkpoint are accepted
    assert config_from_checkpoint(checkpoint, state, {"num_classes": 4, "crop_start": 2}, None, source)[0] == model.config
    broken = dict(checkpoint, config={**checkpoint["config"], "hidden_size": 64})
    with pytest.raises(Exception, match="records hidden_size=64 but its weights have hidden_size=32"):
        config_from_checkpoint(broken, state, {}, None, source)


def test_config_validation_names_the_flag():
    data = {"in_channels": 4, "input_size": 32}
    cases = [({"model": "SiT-XL/2", "encoder_depth": 40}, "--encoder-depth 40 must be in"),
             ({"model": "SiT-XL/2", "crop_start": 12, "crop_end": 20}, "--crop-end 20"),
             ({"model": "SiT-XL/2", "hidden_size": 100}, "--hidden-size 100 is not divisible by --num-heads 16"),
             ({"model": "SiT-XL/2", "uncond_prob": 1.5}, "--uncond-prob must be in"),
             ({"model": "SiT-XL/3"}, "not a SiT config")]
    for given, message in cases:
        with pytest.raises(ConfigError, match=message):
            resolve_config(data, given, DEFAULTS, "flags")
    config = resolve_config(data, {"model": "SiT-B/2", "crop_start": 12}, DEFAULTS, "flags")
    assert (config.model, config.grid_size, config.crop_end, config.encoder_depth) == ("SiT-B/2", 16, 17, 8)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="fields this code does not know"):
        ModelConfig.from_dict({**config.to_dict(), "second_probe_depth": 4})


#################################################################################
#                     Training: resume reads the config back                    #
#################################################################################

@pytest.fixture()
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_resume_takes_the_config_from_the_checkpoint(tmp_path, fresh_accelerate_state):
    from test_train import make_latent_data, tiny_argv

    data = make_latent_data(str(tmp_path / "data"))
    argv = tiny_argv(data, tmp_path, "cos", "--path-type", "cosine", "--max-train-steps", 2)
    train.main(train.parse_args(argv))
    fresh_accelerate_state_reset()
    # resuming with no model flags at all: the checkpoint's config (cosine path, tiny sizes, crop)
    train.main(train.parse_args(["--exp-name", "cos", "--output-dir", str(tmp_path), "--data-dir", data,
                                 "--batch-size", "8", "--num-workers", "0", "--report-to", "none",
                                 "--mixed-precision", "no", "--sampling-steps", "0", "--max-train-steps", "3",
                                 "--resume-step", "-1", "--ema-decay", "0.5"]))
    checkpoint = torch.load(tmp_path / "cos" / "checkpoints" / "0000003.pt", weights_only=False)
    first = torch.load(tmp_path / "cos" / "checkpoints" / "0000002.pt", weights_only=False)
    assert checkpoint["config"] == first["config"] and checkpoint["config"]["path_type"] == "cosine"
    assert checkpoint["provenance"]["run_id"] == first["provenance"]["run_id"]  # one run across resumes
    fresh_accelerate_state_reset()
    with pytest.raises(TrainingError, match="--path-type linear contradicts checkpoint .*path_type=cosine"):
        train.main(train.parse_args(tiny_argv(data, tmp_path, "cos", "--path-type", "linear", "--max-train-steps", 4,
                                              "--resume-step", -1)))


def fresh_accelerate_state_reset():
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


#################################################################################
#                 Latents record their VAE; train checks --vae against it       #
#################################################################################

def _decoder_only_changed(src, dst):
    """A copy of the VAE at ``src`` whose decoder differs and encoder is equal (like SD-VAE ft-EMA vs ft-MSE)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(src)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.startswith("decoder."):
                p.add_(0.01)
    vae.save_pretrained(dst)
    return dst


def test_encode_refuses_latents_of_another_vae_and_train_checks_vae(tmp_path, fresh_accelerate_state):
    from PIL import Image

    from dataset import CustomDataset
    from preprocessing.dataset_tools import main as tools
    from preprocessing.storage import DatasetError
    from preprocessing.synthetic import save_tiny_vae

    raw = tmp_path / "raw"
    rng = np.random.default_rng(0)
    for i in range(6):
        os.makedirs(raw / f"n0{i % 2}", exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(raw / f"n0{i % 2}" / f"{i}.png")
    data = tmp_path / "data"
    vae_a, vae_b = save_tiny_vae(str(tmp_path / "vae_a"), seed=0), save_tiny_vae(str(tmp_path / "vae_b"), seed=1)
    vae_a_decoder = _decoder_only_changed(vae_a, str(tmp_path / "vae_a_dec"))
    tools(["convert", "--source", str(raw), "--dest", str(data / "images"), "--resolution", "32x32", "--workers", "0"])
    encode = ["encode", "--source", str(data / "images"), "--dest", str(data / "vae-sd"), "--workers", "0"]
    tools(encode + ["--vae", vae_a])
    before = {n: open(data / "vae-sd" / "00000" / n, "rb").read() for n in os.listdir(data / "vae-sd" / "00000")}
    # before: "0 written now, 6 already complete", and the folder kept A's latents under B's name
    with pytest.raises(SystemExit) as exit_info:
        tools(encode + ["--vae", vae_b])
    assert exit_info.value.code not in (0, None)
    assert {n: open(data / "vae-sd" / "00000" / n, "rb").read() for n in os.listdir(data / "vae-sd" / "00000")} == before
    with pytest.raises(DatasetError, match=r"holds latents of the VAE .*vae_a .*not of --vae .*vae_b"):
        from preprocessing.encode import encode_dataset
        encode_dataset(str(data / "images"), str(data / "vae-sd"), vae=vae_b, workers=0, progress=False)
    # the same encoder (another decoder) is the same latent space: accepted, nothing rewritten
    assert encode_dataset(str(data / "images"), str(data / "vae-sd"), vae=vae_a_decoder, workers=0,
                          progress=False).written == 0
    record = CustomDataset(str(data)).vae_record
    assert record["name"] == os.path.abspath(vae_a) and len(record["encoder_sha256"]) == 64
    assert not os.path.exists(data / "vae-sd" / ".encode.json")

    # train.py: the preview decoder must share the latents' encoder
    from test_train import tiny_argv
    argv = tiny_argv(str(data), tmp_path, "vae", "--resolution", 32, "--max-train-steps", 1, "--sampling-steps", 1)
    with pytest.raises(TrainingError, match=r"--vae .*vae_b is not the VAE that encoded"):
        train.main(train.parse_args(argv + ["--vae", vae_b]))
    fresh_accelerate_state_reset()
    train.main(train.parse_args(argv + ["--vae", vae_a_decoder]))
    checkpoint = torch.load(tmp_path / "vae" / "checkpoints" / "0000001.pt", weights_only=False)
    assert checkpoint["provenance"]["data"]["vae"]["encoder_sha256"] == record["encoder_sha256"]
    # generate.py: decoding with a VAE of another encoder is refused, with the right one accepted
    ckpt = tmp_path / "vae" / "checkpoints" / "0000001.pt"
    argv = gen_argv(ckpt, tmp_path / "s", "--num-fid-samples", "2", "--per-proc-batch-size", "2")
    with pytest.raises(GenerateError, match=r"--vae .*vae_b is not the VAE of the latents"):
        generate.main(generate.parse_args(argv + ["--vae", vae_b]))
    folder = generate.main(generate.parse_args(argv + ["--vae", vae_a]))
    assert npz_images(folder).shape == (2, 32, 32, 3)
