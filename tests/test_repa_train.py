"""REPA and REPA + LSEP in the model, the loss and train.py, on CPU with tiny sizes: a 2x2
token grid (32 px images, 4x4 latents, patch 2) and tiny random encoders saved by the test.

* REPA alone equals a reference loop written from REPA's description (projector MLPs per token,
  -cos per token averaged over tokens, summed over encoders and samples, / (encoders x batch));
* REPA + LSEP: the gradient of denoising + probe + alignment is the sum of the separate gradients,
  and the aligned tokens are the main branch's (never the probe half of the 2B batch);
* the four settings (SiT, LSEP, REPA, REPA + LSEP) train, resume bitwise and sample with generate.py;
* 2 processes (torchrun, gloo) equal 1 process with 2 accumulation steps for REPA + LSEP;
* REPA-format checkpoints load with their projectors; ours load in REPA's module layout.
"""
import argparse
import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import generate
import train
from training.errors import TrainingError
from loss import LSEPLoss
from models import ModelConfig, SiT
from models import encoders as enc
from models.checkpoint import load_checkpoint_file, load_model
from models.config import ConfigError
from test_train import torchrun_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ENC = dict(embed_dim=32, depth=2, num_heads=2)
ENC_ARCH = "embed_dim=32,depth=2,num_heads=2"
NUM_ITEMS, NUM_LABELS, RES = 16, 5, 32


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tiny_vit(name, seed, **arch):
    torch.manual_seed(seed)
    vit = enc.create_vit(name, RES, **{**TINY_ENC, **arch})
    with torch.no_grad():  # non-trivial values everywhere (timm zero-inits some tensors)
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vit


def tiny_config(**changes):
    base = dict(model="custom", input_size=4, in_channels=4, num_classes=NUM_LABELS, depth=3, hidden_size=32,
                num_heads=2, patch_size=2, encoder_depth=1, enc_type=("dinov2-vit-b", "mocov3-vit-s"),
                z_dims=(32, 48), projector_dim=16, align_depth=2)
    return ModelConfig(**{**base, **changes})


def encoders_and_images(batch=4):
    dino = enc.Encoder("dinov2-vit-b", tiny_vit("dinov2-vit-b", 1), RES)
    moco = enc.Encoder("mocov3-vit-s", tiny_vit("mocov3-vit-s", 2, embed_dim=48), RES)
    images = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (batch, 3, RES, RES), dtype=np.uint8))
    return [dino, moco], images


def randomized(model, seed=5):
    torch.manual_seed(seed)
    with torch.no_grad():  # SiT zero-inits adaLN and the final layer: give every path a gradient
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model


#################################################################################
#                REPA alone against a loop from REPA's description              #
#################################################################################

def reference_repa_step(model, x, y, zs, proj_coeff):
    """REPA's training loss from its description, on our SiT's blocks: t ~ U(0,1), linear path,
    velocity target, label dropout; tokens after block ``align_depth`` go through each projector
    (Linear-SiLU-Linear-SiLU-Linear on the flattened tokens); per encoder and sample the token-mean
    of -cos; sum / (encoders x batch). Draws randomness in LSEPLoss's and SiT's order."""
    batch = x.shape[0]
    t = torch.rand(batch)
    noise = torch.randn_like(x)
    drop = torch.rand(batch) < model.class_dropout_prob
    y = torch.where(drop, torch.full_like(y, model.num_classes), y)
    tt = t.view(-1, 1, 1, 1)
    x_t, target = (1 - tt) * x + tt * noise, noise - x
    h = model.x_embedder(x_t) + model.pos_embed
    n, tokens, d = h.shape
    c = model.t_embedder(t) + model.y_embedder.embedding_table(y)
    zs_tilde = None
    for i, block in enumerate(model.blocks):
        h = block(h, c)
        if i + 1 == model.align_depth:
            zs_tilde = []
            for proj in model.projectors:
                flat = h.reshape(-1, d)
                flat = F.silu(flat @ proj[0].weight.T + proj[0].bias)
                flat = F.silu(flat @ proj[2].weight.T + proj[2].bias)
                zs_tilde.append((flat @ proj[4].weight.T + proj[4].bias).reshape(n, tokens, -1))
    out = model.unpatchify(model.final_layer(h, c))
    denoising = ((out - target) ** 2).mean(dim=(1, 2, 3)).mean()
    proj_loss = 0.0
    for z, z_tilde in zip(zs, zs_tilde):
        for z_j, z_tilde_j in zip(z, z_tilde):
            z_j, z_tilde_j = F.normalize(z_j, dim=-1), F.normalize(z_tilde_j, dim=-1)
            proj_loss = proj_loss + (-(z_j * z_tilde_j).sum(dim=-1)).mean()
    proj_loss = proj_loss / (len(zs) * batch)
    return denoising + proj_coeff * proj_loss, proj_loss


def test_repa_step_equals_reference_loop():
    encoders, images = encoders_and_images()
    model = randomized(SiT(tiny_config(probe=False))).train()
    reference = copy.deepcopy(model)
    x, y = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(7)), torch.tensor([0, 1, 2, 3])
    zs = [e(images) for e in encoders]
    assert [z.shape for z in zs] == [(4, 4, 32), (4, 4, 48)]

    torch.manual_seed(11)
    denoising, probe, _, proj = LSEPLoss()(model, x, dict(y=y), zs=zs)
    total = denoising.mean() + probe + 0.5 * proj
    total.backward()
    torch.manual_seed(11)
    want_total, want_proj = reference_repa_step(reference, x, y, zs, 0.5)
    want_total.backward()

    assert probe.item() == 0.0 and -1.0 <= proj.item() <= 1.0
    torch.testing.assert_close(proj, want_proj, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(total, want_total, rtol=1e-6, atol=1e-7)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    want = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == want.keys() and any(n.startswith("projectors.1.4.") for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


#################################################################################
#          REPA + LSEP: gradients add up; the aligned tokens are the main branch's  #
#################################################################################

@pytest.mark.parametrize("align_depth", [1, 3])  # inside the 2B batch (probe depth 1..2) and after the split
def test_repa_plus_lsep_gradient_is_the_sum_of_the_terms(align_depth):
    encoders, images = encoders_and_images()
    zs = [e(images) for e in encoders]
    config = tiny_config(encoder_depth=2, align_depth=align_depth, crop_start=1)
    x, y = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(8)), torch.tensor([4, 1, 2, 3])
    loss_fn = LSEPLoss(weights_type="steps", weight_start=0.5, weight_end=1.0, n_weights=4)
    base = randomized(SiT(config)).train()

    def grads(weights):
        model = copy.deepcopy(base)
        torch.manual_seed(12)
        denoising, probe, _, proj = loss_fn(model, x, dict(y=y), zs=zs)
        terms = (denoising.mean(), probe, 0.5 * proj)
        sum(w * term for w, term in zip(weights, terms)).backward()
        return [t.detach() for t in terms], {n: p.grad.clone() for n, p in model.named_parameters()
                                             if p.grad is not None and p.grad.abs().sum() > 0}

    terms, total = grads((1, 1, 1))
    assert all(t.abs() > 0 for t in terms)
    parts = [grads(w)[1] for w in ((1, 0, 0), (0, 1, 0), (0, 0, 1))]
    assert total.keys() == parts[0].keys() | parts[1].keys() | parts[2].keys()
    for name, grad in total.items():
        summed = sum(part[name] for part in parts if name in part)
        torch.testing.assert_close(grad, summed, rtol=1e-5, atol=1e-7, msg=name)
    # the alignment term reaches the projectors and blocks 1..align_depth, never the probe or later blocks
    align = parts[2]
    assert not any(n.startswith(("classifier.", "final_layer.")) for n in align)
    assert {int(n.split(".")[1]) for n in align if n.startswith("blocks.")} == set(range(align_depth))
    assert {n.split(".")[0] for n in parts[1]} <= {"classifier", "blocks", "x_embedder", "t_embedder", "y_embedder"}
    assert not any(n.startswith("projectors.") for n in parts[0] | parts[1])

    # the projected tokens come from the main branch: equal to a forward without the probe branch
    model = base.eval()
    labels = torch.tensor([0, 1, 2, 3])
    t = torch.full((4,), 0.3)
    with torch.no_grad():
        window = (torch.full((4,), 1), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
        out, logits, projected = model.forward_conditioned(x, t, labels, torch.full_like(labels, 5), window, align=True)
        out_plain, no_logits, projected_plain = model.forward_conditioned(x, t, labels, align=True)
    assert logits is not None and no_logits is None
    torch.testing.assert_close(out, out_plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(projected, projected_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # eval mode is unchanged: (velocity, None)
    velocity, none = model(x, t, labels)
    assert none is None and velocity.shape == x.shape


def test_alignment_config_is_validated_and_stored_only_when_on():
    config = tiny_config()
    assert config.aligned and ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config  # args.json: lists
    assert "REPA alignment of block 2 to dinov2-vit-b+mocov3-vit-s" in config.describe()
    plain = tiny_config(enc_type=(), z_dims=(), projector_dim=2048, align_depth=8)
    assert not plain.aligned and "enc_type" not in plain.to_dict() and "align_depth" not in plain.to_dict()
    assert SiT(plain).projectors is None and not any(k.startswith("projectors.") for k in SiT(plain).state_dict())
    for changes, message in [(dict(align_depth=4), "--align-depth 4 must be in"),
                             (dict(z_dims=(32,)), "one positive token width per encoder"),
                             (dict(enc_type=(), z_dims=(), align_depth=2), "only apply with --enc-type")]:
        with pytest.raises(ConfigError, match=message):
            tiny_config(**changes)
    # a model without alignment draws the same initial weights as before the projectors existed
    torch.manual_seed(0)
    aligned = SiT(tiny_config()).state_dict()
    torch.manual_seed(0)
    assert all(torch.equal(v, aligned[k]) for k, v in SiT(plain).state_dict().items())


#################################################################################
#                      Checkpoints: REPA's layout, both ways                    #
#################################################################################

class RepaLayoutSiT(nn.Module):
    """REPA's module layout: the SiT backbone (its keys equal ours without the classifier) and
    ``projectors`` built as REPA's build_mlp (Linear, SiLU, Linear, SiLU, Linear)."""

    def __init__(self, backbone, hidden, projector_dim, z_dims):
        super().__init__()
        for name in ("x_embedder", "t_embedder", "y_embedder", "blocks", "final_layer"):
            setattr(self, name, getattr(backbone, name))
        self.pos_embed = backbone.pos_embed
        self.projectors = nn.ModuleList([
            nn.Sequential(nn.Linear(hidden, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                          nn.SiLU(), nn.Linear(projector_dim, z)) for z in z_dims])


def test_repa_checkpoint_loads_with_projectors_and_ours_loads_in_repa_layout(tmp_path):
    config = tiny_config(probe=False)
    ours = randomized(SiT(config))
    state = ours.state_dict()
    # ours in REPA's layout: every key but the probe head, projectors included
    repa_module = RepaLayoutSiT(SiT(tiny_config(enc_type=(), z_dims=(), projector_dim=2048, align_depth=8)), 32, 16,
                                (32, 48))
    repa_module.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier.")}, strict=True)
    assert torch.equal(repa_module.projectors[1][4].weight, ours.projectors[1][4].weight)

    # REPA's checkpoint: no classifier, args.enc_type names the encoders, args.encoder_depth is the alignment depth
    repa_state = dict(repa_module.state_dict())
    repa_args = argparse.Namespace(model="tiny", enc_type="dinov2-vit-b,mocov3-vit-s", encoder_depth=2,
                                   projector_dim=16, path_type="linear", qk_norm=False, num_classes=NUM_LABELS,
                                   cfg_prob=0.1, proj_coeff=0.5)
    torch.save({"model": repa_state, "ema": repa_state, "opt": {}, "args": repa_args, "steps": 4}, tmp_path / "r.pt")
    loaded = load_model(str(tmp_path / "r.pt"), given={"num_heads": 2, "encoder_depth": 1})
    assert loaded.kind == "REPA args" and loaded.report.ignored == [] and loaded.report.unexpected == []
    assert sorted(loaded.report.missing) == sorted(k for k in state if k.startswith("classifier."))
    got = loaded.config
    assert (got.enc_type, got.z_dims, got.projector_dim, got.align_depth, got.probe) == \
        (("dinov2-vit-b", "mocov3-vit-s"), (32, 48), 16, 2, False)
    for key, value in repa_state.items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    # the same weights without REPA's record of the encoders: projectors ignored, as any other head
    torch.save(repa_state, tmp_path / "bare.pt")
    bare = load_model(str(tmp_path / "bare.pt"), given={"num_heads": 2, "encoder_depth": 1})
    assert not bare.config.aligned and len(bare.report.ignored) == 12
    # ours round-trips with its config (projectors are real keys)
    torch.save({"ema": state, "config": config.to_dict()}, tmp_path / "ours.pt")
    again = load_model(str(tmp_path / "ours.pt"))
    assert again.config == config and again.report.summary() == "all keys matched"


#################################################################################
#                       train.py: the four settings end to end                  #
#################################################################################

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A paired dataset (images/ 32 px + vae-sd/ 4x4 latents), a tiny DINOv2 weights file in the
    official layout, and a tiny VAE (factor 8) for generate.py."""
    from diffusers import AutoencoderKL
    from PIL import Image

    root = tmp_path_factory.mktemp("repa")
    rng = np.random.default_rng(0)
    images, latents = [], []
    for i in range(NUM_ITEMS):
        sub = f"{i:08d}"[:5]
        os.makedirs(root / "data" / "images" / sub, exist_ok=True)
        os.makedirs(root / "data" / "vae-sd" / sub, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(
            root / "data" / "images" / sub / f"img{i:08d}.png")
        moments = rng.standard_normal((8, 4, 4)).astype(np.float32)
        moments[4:] = np.abs(moments[4:]) * 0.1
        np.save(root / "data" / "vae-sd" / sub / f"img-mean-std-{i:08d}.npy", moments)
        images.append([f"{sub}/img{i:08d}.png", i % NUM_LABELS])
        latents.append([f"{sub}/img-mean-std-{i:08d}.npy", i % NUM_LABELS])
    for folder, labels in (("images", images), ("vae-sd", latents)):
        with open(root / "data" / folder / "dataset.json", "w") as f:
            json.dump({"labels": labels}, f)
    state = dict(tiny_vit("dinov2-vit-b", 1).state_dict())
    state["mask_token"] = torch.zeros(1, 32)  # torch.hub DINOv2 files carry it
    torch.save(state, root / "dinov2_vitb14_pretrain.pth")
    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                  sample_size=32).save_pretrained(root / "tinyvae")
    return {"root": root, "data": str(root / "data"), "weights": str(root / "dinov2_vitb14_pretrain.pth"),
            "vae": str(root / "tinyvae")}


SETTINGS = {  # the four settings of the paper's comparison, one flag set
    "sit": ["--no-probe"],
    "lsep": [],
    "repa": ["--no-probe", "--enc-type", "dinov2-vit-b"],
    "repa_lsep": ["--enc-type", "dinov2-vit-b"],
}


def train_argv(files, out, name, setting, *extra):
    argv = ["--exp-name", name, "--output-dir", str(out), "--data-dir", files["data"], "--model", "SiT-S/2",
            "--hidden-size", "32", "--depth", "2", "--num-heads", "2", "--encoder-depth", "1", "--num-classes",
            str(NUM_LABELS), "--batch-size", "4", "--num-workers", "0", "--report-to", "none", "--mixed-precision",
            "no", "--sampling-steps", "0", "--log-every", "1", "--ema-decay", "0.5", *SETTINGS[setting]]
    if "--enc-type" in argv:
        argv += ["--enc-path", files["weights"], "--enc-arch", ENC_ARCH, "--align-depth", "2", "--projector-dim",
                 "16"]
    return argv + [str(a) for a in extra]


def run(argv):
    return train.main(train.parse_args(argv))


def ckpt(out, name, step):
    return load_checkpoint_file(os.path.join(out, name, "checkpoints", f"{step:07d}.pt"))


def stats(out, name):
    with open(os.path.join(out, name, "stats.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_equal_states(a, b, atol=None):
    assert a.keys() == b.keys()
    for key in a:
        if atol is None:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_four_settings_train_resume_bitwise_and_sample(files, tmp_path, setting):
    run(train_argv(files, tmp_path, "full", setting, "--max-train-steps", 2, "--checkpointing-steps", 1))
    # resume from step 1 in another folder; a REPA run resumes without repeating --enc-type (the checkpoint has it)
    os.makedirs(tmp_path / "split" / "checkpoints")
    shutil.copy(tmp_path / "full" / "checkpoints" / "0000001.pt", tmp_path / "split" / "checkpoints")
    argv = train_argv(files, tmp_path, "split", setting, "--max-train-steps", 2, "--resume-step", 1)
    if setting == "repa":
        argv.remove("--enc-type")
        argv.remove("dinov2-vit-b")
    run(argv)
    full, split = ckpt(tmp_path, "full", 2), ckpt(tmp_path, "split", 2)
    assert_equal_states(full["model"], split["model"])
    assert_equal_states(full["ema"], split["ema"])
    config = ModelConfig.from_dict(full["config"])
    aligned, probe = setting.startswith("repa"), setting != "sit" and setting != "repa"
    assert (config.aligned, config.probe) == (aligned, probe)
    assert any(k.startswith("projectors.0.4.") for k in full["model"]) == aligned
    if aligned:
        assert (config.enc_type, config.z_dims, config.align_depth, config.projector_dim) == (("dinov2-vit-b",), (32,),
                                                                                            2, 16)
    records = stats(tmp_path, "full")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert (r["proj_loss"] != 0) == aligned and (r["probe_loss"] != 0) == probe and r["denoising_loss"] > 0
        assert -1 <= r["proj_loss"] <= 1 and r["loss"] == pytest.approx(r["denoising_loss"] + r["probe_loss"])
    assert [r["proj_loss"] for r in stats(tmp_path, "split")] == [records[1]["proj_loss"]]

    # sample with generate.py: projectors unused, the loader accepts them
    folder = generate.main(generate.parse_args([
        "--ckpt", str(tmp_path / "full" / "checkpoints" / "0000002.pt"), "--vae", files["vae"], "--num-fid-samples",
        "4", "--per-proc-batch-size", "4", "--sample_dir", str(tmp_path / "samples"), "--mode", "ode",
        "--num-steps", "2", "--device", "cpu"]))
    with np.load(folder + ".npz") as f:
        samples = f["arr_0"]
    assert samples.shape == (4, 32, 32, 3) and samples.dtype == np.uint8 and samples.std() > 0


def test_repa_flags_are_checked(files, tmp_path):
    with pytest.raises(SystemExit):
        train.parse_args(["--exp-name", "x", "--enc-type", "dinov9-vit-q"])
    with pytest.raises(SystemExit):
        train.parse_args(["--exp-name", "x", "--proj-coeff", "-1"])
    # no weights: one line naming the flag and the file to get
    argv = train_argv(files, tmp_path, "none", "repa", "--max-train-steps", 1)
    argv[argv.index("--enc-path") + 1] = str(tmp_path / "missing.pth")
    with pytest.raises(TrainingError, match="--enc-type dinov2-vit-b: weights file .*missing.pth does not"):
        run(argv)
    # alignment cannot be added to a resumed run without projectors
    run(train_argv(files, tmp_path, "plain", "lsep", "--max-train-steps", 1))
    with pytest.raises(TrainingError, match="(--enc-type|--projector-dim|--align-depth) .* contradicts"):
        run(train_argv(files, tmp_path, "plain", "repa_lsep", "--max-train-steps", 2, "--resume-step", 1))


def test_encoder_weights_are_recorded_and_a_resume_with_others_is_refused(files, tmp_path):
    from models.checkpoint import weights_sha256

    run(train_argv(files, tmp_path, "rec", "repa", "--max-train-steps", 1))
    recorded = ckpt(tmp_path, "rec", 1)["provenance"]["encoders"]
    loaded = enc.load_encoders(f"dinov2-vit-b={files['weights']}", RES, **TINY_ENC)[0]
    assert recorded == [{"name": "dinov2-vit-b", "arch": ENC_ARCH, "weights_sha256": weights_sha256(loaded.vit.state_dict())}]
    # the same weights resume (and are recorded again); other weights of the same shape are one line
    run(train_argv(files, tmp_path, "rec", "repa", "--max-train-steps", 2, "--resume-step", 1))
    assert ckpt(tmp_path, "rec", 2)["provenance"]["encoders"] == recorded
    other = tmp_path / "other.pth"
    torch.save(tiny_vit("dinov2-vit-b", 2).state_dict(), other)
    argv = train_argv(files, tmp_path, "rec", "repa", "--max-train-steps", 3, "--resume-step", 2)
    argv[argv.index("--enc-path") + 1] = str(other)
    with pytest.raises(TrainingError, match=r"--enc-type dinov2-vit-b: the weights given .* are not the ones "
                                                  r".*0000002.pt was trained with"):
        run(argv)
    assert ckpt(tmp_path, "rec", 2)["provenance"]["encoders"] == recorded and \
        not os.path.exists(tmp_path / "rec" / "checkpoints" / "0000003.pt")
    run(train_argv(files, tmp_path, "none", "lsep", "--max-train-steps", 1))
    assert ckpt(tmp_path, "none", 1)["provenance"]["encoders"] is None


def test_two_processes_equal_one_process_with_accumulation_repa_lsep(files, tmp_path):
    torchrun_train(train_argv(files, tmp_path, "two", "repa_lsep", "--max-train-steps", 2))
    run(train_argv(files, tmp_path, "accum", "repa_lsep", "--max-train-steps", 2, "--gradient-accumulation-steps", 2,
                   "--batch-size", 2))
    two, accum = ckpt(tmp_path, "two", 2), ckpt(tmp_path, "accum", 2)
    assert two["provenance"]["num_processes"] == 2 and accum["provenance"]["num_processes"] == 1
    assert_equal_states(two["model"], accum["model"], atol=1e-5)
    assert_equal_states(two["ema"], accum["ema"], atol=1e-5)
    fresh = SiT(ModelConfig.from_dict(accum["config"])).state_dict()
    assert not torch.equal(fresh["projectors.0.4.weight"], accum["model"]["projectors.0.4.weight"])
    for key in ("loss", "proj_loss", "probe_loss"):
        np.testing.assert_allclose([r[key] for r in stats(tmp_path, "two")], [r[key] for r in stats(tmp_path, "accum")],
                                   rtol=1e-5)
