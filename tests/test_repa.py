"""REPA pieces: alignment loss against a float64 reference loop written from REPA's description,
float32 under autocast, projector keys/init/interchange with REPA's layout, encoder preprocessing
against a hand-written bicubic resize, weight loading (official formats, tiny random encoders
saved by the test), the one-line missing-weights error, FLOPs, and the paired dataset mode."""
import math
import os
import shutil
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn as nn

from dataset import CustomDataset
from models import encoders as enc
from models.flops import SiTFlopsConfig, encoder_forward_flops, repa_train_step_flops, vit_forward_flops
from models.config import check_align_depth
from models.encoders import check_token_grid
from models.repa import alignment_loss, build_projectors, per_sample_alignment, project_tokens
from preprocessing.storage import DatasetError, image_name, latent_name
from preprocessing.synthetic import write_synthetic_dataset

TINY = dict(embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


# ---------------------------------------------------------------- loss and projectors

def _reference_repa(hidden, state, targets, proj_coeff):
    """REPA from its paper/code description, in float64 with explicit loops: each projector is
    Linear-SiLU-Linear-SiLU-Linear applied per token; loss = sum over encoders and samples of the
    token-mean of -cos(projected, target), divided by (encoders * batch), times proj_coeff."""
    hidden = hidden.double()
    batch, tokens, _ = hidden.shape
    total = 0.0
    for n, target in enumerate(targets):
        w = [state[f"projectors.{n}.{i}.weight"].double() for i in (0, 2, 4)]
        b = [state[f"projectors.{n}.{i}.bias"].double() for i in (0, 2, 4)]
        for s in range(batch):
            per_token = []
            for k in range(tokens):
                h = hidden[s, k]
                for i in range(3):
                    h = w[i] @ h + b[i]
                    if i < 2:
                        h = h * torch.sigmoid(h)
                z = target[s, k].double()
                per_token.append(-float(h @ z) / (max(float(h.norm()), 1e-12) * max(float(z.norm()), 1e-12)))
            total += sum(per_token) / tokens
    return proj_coeff * total / (len(targets) * batch)


def _holder(projectors):
    m = nn.Module()
    m.projectors = projectors
    return m


def test_loss_equals_reference_loop_and_gradient():
    torch.manual_seed(0)
    hidden_size, z_dims, batch, tokens = 16, [8, 12], 3, 4
    model = _holder(build_projectors(hidden_size, z_dims, projector_dim=24))
    hidden = torch.randn(batch, tokens, hidden_size, requires_grad=True)
    targets = [torch.randn(batch, tokens, z) for z in z_dims]
    loss = alignment_loss(project_tokens(model.projectors, hidden), targets, proj_coeff=0.5)
    state = model.state_dict()
    ref = _reference_repa(hidden.detach(), state, targets, 0.5)
    assert loss.dtype == torch.float32 and abs(loss.item() - ref) < 1e-6
    per_sample = per_sample_alignment(project_tokens(model.projectors, hidden), targets)
    assert per_sample.shape == (batch,) and abs(0.5 * per_sample.mean().item() - ref) < 1e-6

    # gradient with respect to the SiT tokens, against float64 autograd of the reference formula
    loss.backward()
    h64 = hidden.detach().double().requires_grad_(True)
    ref_total = 0
    for n, target in enumerate(targets):
        x = h64
        for i in (0, 2, 4):
            x = x @ state[f"projectors.{n}.{i}.weight"].double().T + state[f"projectors.{n}.{i}.bias"].double()
            x = x * torch.sigmoid(x) if i < 4 else x
        cos = (x * target.double()).sum(-1) / (x.norm(dim=-1) * target.double().norm(dim=-1))
        ref_total = ref_total - cos.mean(dim=1).sum()
    (0.5 * ref_total / (len(targets) * batch)).backward()
    assert torch.allclose(hidden.grad.double(), h64.grad, atol=1e-7, rtol=1e-5)


def test_loss_is_float32_under_bf16_autocast():
    torch.manual_seed(1)
    projected = [torch.randn(4, 9, 16).bfloat16(), torch.randn(4, 9, 8).bfloat16()]
    targets = [torch.randn(4, 9, 16).bfloat16(), torch.randn(4, 9, 8).bfloat16()]
    fp32 = alignment_loss([p.float() for p in projected], [t.float() for t in targets], proj_coeff=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = alignment_loss(projected, targets, proj_coeff=0.5)
        projectors = build_projectors(16, [8], projector_dim=16)
        out = project_tokens(projectors, torch.randn(4, 9, 16))
        from_autocast = alignment_loss(out, [targets[1]], 1.0)
    assert mixed.dtype == torch.float32 and abs(mixed.item() - fp32.item()) < 1e-6
    assert out[0].dtype == torch.bfloat16 and from_autocast.dtype == torch.float32
    # half-precision normalisation would differ: the float32 path is really taken
    half = (-(torch.nn.functional.normalize(projected[0], dim=-1) * torch.nn.functional.normalize(
        targets[0], dim=-1)).sum(-1)).mean()
    assert half.dtype == torch.bfloat16


def test_loss_shape_mismatch_is_one_line():
    with pytest.raises(ValueError, match="--enc-type, --resolution and --model") as e:
        alignment_loss([torch.randn(2, 64, 8)], [torch.randn(2, 256, 8)])
    assert "\n" not in str(e.value)


def test_projector_keys_shapes_and_init():
    torch.manual_seed(2)
    hidden, p, z_dims = 64, 128, [32, 48]
    state = _holder(build_projectors(hidden, z_dims, p)).state_dict()
    expected = {}
    for n, z in enumerate(z_dims):
        expected.update({f"projectors.{n}.0.weight": (p, hidden), f"projectors.{n}.0.bias": (p,),
                         f"projectors.{n}.2.weight": (p, p), f"projectors.{n}.2.bias": (p,),
                         f"projectors.{n}.4.weight": (z, p), f"projectors.{n}.4.bias": (z,)})
    assert list(state) == list(expected)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert tuple(build_projectors(1152, [768])[0][0].weight.shape) == (2048, 1152)  # REPA's default width
    for k, v in state.items():
        if k.endswith("bias"):
            assert torch.count_nonzero(v) == 0
        else:  # xavier-uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out))
            a = math.sqrt(6 / (v.shape[0] + v.shape[1]))
            assert v.abs().max() <= a and abs(v.std().item() - a / math.sqrt(3)) < 0.1 * a


def test_state_dict_interchanges_with_repa_layout():
    torch.manual_seed(3)
    ours = _holder(build_projectors(16, [8, 4], 32))
    theirs = _holder(nn.ModuleList([
        nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, z)) for z in (8, 4)
    ]))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 5, 16)
    for a, b in zip(project_tokens(ours.projectors, x), [m(x.reshape(-1, 16)).reshape(2, 5, -1)
                                                         for m in theirs.projectors]):
        assert torch.equal(a, b)
    fresh = _holder(build_projectors(16, [8, 4], 32))
    fresh.load_state_dict(theirs.state_dict(), strict=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in theirs.state_dict().items())


def test_grid_and_depth_checks():
    dinov2 = SimpleNamespace(name="dinov2-vit-b", num_tokens=256)
    check_token_grid([dinov2], 256, "SiT-XL/2", 256)
    with pytest.raises(ValueError) as e:
        check_token_grid([dinov2], 64, "SiT-XL/4", 256)
    msg = str(e.value)
    assert "\n" not in msg and all(s in msg for s in ("--enc-type dinov2-vit-b", "--resolution 256",
                                                       "--model SiT-XL/4", "16x16", "8x8"))
    check_token_grid(["dinov2-vit-b", "mae-vit-l"], 1024, "SiT-XL/2", 512)  # names, before any weights load
    with pytest.raises(ValueError, match="--enc-type clip-vit-L gives 32x32 patch tokens at --resolution 512 "
                                         "but --model SiT-B/4 has 16x16"):
        check_token_grid(["clip-vit-L"], 256, "SiT-B/4", 512)
    check_align_depth(8, 28)
    with pytest.raises(ValueError, match="--align-depth 29 must be in"):
        check_align_depth(29, 28, "SiT-XL/2")
    for name, spec in enc.ENCODERS.items():  # every REPA encoder: R / 16 tokens a side, as SiT-*/2
        assert enc.encoder_grid(spec, 256) == 16 and enc.encoder_grid(spec, 512) == 32, name


# ---------------------------------------------------------------- encoders

def _cubic_matrix(n_in, n_out, a=-0.75):
    """(n_out, n_in) bicubic resampling matrix: Keys' kernel, half-pixel centres, edge clamping."""
    m = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for i in range(n_out):
        src = (i + 0.5) * scale - 0.5
        x0 = math.floor(src)
        t = src - x0
        for off in (-1, 0, 1, 2):
            d = abs(off - t)
            w = ((a + 2) * d - (a + 3)) * d * d + 1 if d <= 1 else ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
            m[i, min(max(x0 + off, 0), n_in - 1)] += w
    return m


@pytest.mark.parametrize("name", ["dinov2-vit-b", "clip-vit-L", "mocov3-vit-b", "jepa-vit-h"])
def test_preprocessing_equals_hand_computation(name):
    res = 32
    spec = enc.ENCODERS[name]
    encoder = enc.Encoder(name, enc.create_vit(name, res, **TINY), res)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, res, res), dtype=np.uint8))
    x = images.double().numpy() / 255
    mean, std = np.array(spec.mean)[None, :, None, None], np.array(spec.std)[None, :, None, None]
    if spec.resize:
        m = _cubic_matrix(res, res * 7 // 8)
        resize = lambda v: np.einsum("oh,bchw,pw->bcop", m, v, m)  # noqa: E731
        want = resize((x - mean) / std) if spec.normalize_first else (resize(x) - mean) / std
    else:
        want = (x - mean) / std
    got = encoder.preprocess(images)
    assert got.dtype == torch.float32 and got.shape == (2, 3, encoder.input_size, encoder.input_size)
    assert encoder.input_size == (28 if spec.resize else 32)
    np.testing.assert_allclose(got.numpy(), want, atol=2e-5, rtol=0)


def _tiny(name, res=32, **kw):
    torch.manual_seed(4)
    vit = enc.create_vit(name, res, **{**TINY, **kw})
    with torch.no_grad():  # non-trivial values everywhere (timm zero-inits some tensors)
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vit


def _tokens_by_hand(vit, x, final_norm=True):
    h = vit.patch_embed(x)
    h = vit._pos_embed(h)
    h = vit.norm_pre(h)
    for block in vit.blocks:
        h = block(h)
    h = vit.norm(h) if final_norm else h
    return h[:, vit.num_prefix_tokens:]


class _Archive(nn.Module):
    """A TorchScript-able module holding a flat state dict (OpenAI ships CLIP as TorchScript)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _save_openai_clip(vit, path):
    """timm CLIP weights -> OpenAI's key layout (visual.*, fp16, plus text-tower keys) in a TorchScript file."""
    with torch.no_grad():
        for p in vit.parameters():
            p.copy_(p.half().float())  # OpenAI's weights are float16
    swaps = [("blocks.", "transformer.resblocks."), ("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv.weight",
             "attn.in_proj_weight"), ("attn.qkv.bias", "attn.in_proj_bias"), ("attn.proj", "attn.out_proj"),
             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"), ("patch_embed.proj", "conv1"), ("norm_pre", "ln_pre")]
    state = {"logit_scale": torch.ones(()), "token_embedding.weight": torch.zeros(5, 4).half(),
             "visual.proj": torch.randn(vit.embed_dim, 8).half()}
    for k, v in vit.state_dict().items():
        if k == "cls_token":
            k, v = "class_embedding", v.reshape(-1)
        elif k == "pos_embed":
            k, v = "positional_embedding", v[0]
        elif k.startswith("norm."):
            k = k.replace("norm.", "ln_post.")
        for a, b in swaps:
            k = k.replace(a, b)
        state[f"visual.{k}"] = v.half()
    root = _Archive()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_buffer(leaf, value)
    torch.jit.script(root).save(path)


def _save_official(name, vit, path):
    """The tiny model's weights in the layout of the encoder's official release."""
    sd = {k: v.clone() for k, v in vit.state_dict().items()}
    if name.startswith("clip"):
        return _save_openai_clip(vit, path)
    if name.startswith("dinov2"):
        sd["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])  # torch.hub DINOv2 files carry it
    elif name.startswith("mocov3"):
        sd = {"state_dict": {**{f"module.base_encoder.{k}": v for k, v in sd.items()},
                             "module.base_encoder.head.0.weight": torch.zeros(3, 3),
                             **{f"module.momentum_encoder.{k}": v for k, v in sd.items()}}}
    elif name.startswith("jepa"):
        sd = {"encoder": {f"module.{k}": v for k, v in sd.items()}, "epoch": 300}
    elif name.startswith("mae"):
        sd = {"model": sd}
    torch.save(sd, path)


@pytest.mark.parametrize("name", ["dinov2-vit-b", "mocov3-vit-s", "jepa-vit-h", "mae-vit-l", "dinov1-vit-b",
                                  "clip-vit-L"])
def test_tiny_encoder_loads_by_path(name, tmp_path):
    res = 32
    vit = _tiny(name, res)
    path = str(tmp_path / "weights.pth")
    _save_official(name, vit, path)
    spec = enc.ENCODERS[name]
    encoder = enc.load_encoders(f"{name}={path}", res, **TINY)[0]
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 3, res, res), dtype=np.uint8))
    tokens = encoder(images)
    grid = 2  # 32 px: 28 px / patch 14, or 32 px / patch 16
    assert tokens.shape == (2, grid * grid, 32) and tokens.dtype == torch.float32
    assert encoder.z_dim == 32 and encoder.num_tokens == grid * grid
    with torch.no_grad():
        want = _tokens_by_hand(vit, encoder.preprocess(images), spec.final_norm)
    torch.testing.assert_close(tokens, want, atol=1e-5, rtol=1e-5)
    if not spec.final_norm:  # REPA reads MAE / CLIP tokens before the final LayerNorm
        assert not torch.allclose(tokens, vit.norm(want), atol=1e-3)
    # frozen for good
    encoder.train()
    assert not encoder.training and not encoder.vit.training
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder(images).requires_grad


def test_pos_embed_resampled_and_bf16(tmp_path):
    # a DINOv2-style file made for a 4x4 grid (56 px) loads into the 2x2 grid of 32 px images,
    # its position embedding resampled by timm's function (bicubic, antialiased), as REPA does
    big = _tiny("dinov2-vit-b", res=64)
    assert big.patch_embed.grid_size == (4, 4)
    path = str(tmp_path / "dinov2_vitb14_pretrain.pth")
    _save_official("dinov2-vit-b", big, path)
    from timm.layers import resample_abs_pos_embed
    folder = str(tmp_path)  # a folder holding the official file name works too
    encoder = enc.load_encoders("dinov2-vit-b", 32, enc_path=folder, amp_dtype=torch.bfloat16, **TINY)[0]
    want = resample_abs_pos_embed(big.pos_embed.detach(), (2, 2), num_prefix_tokens=1)
    assert torch.equal(encoder.vit.pos_embed, want)
    images = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    tokens = encoder(images)  # blocks in bf16; the final LayerNorm is float32 under autocast
    assert tokens.shape == (2, 4, 32)
    encoder.amp_dtype = None
    fp32 = encoder(images)
    assert fp32.dtype == torch.float32 and not torch.equal(tokens.float(), fp32)
    assert torch.allclose(tokens.float(), fp32, atol=0.1)


def test_missing_weights_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # an empty torch.hub cache
    with pytest.raises(enc.EncoderWeightsMissing) as e:
        enc.load_encoders("dinov2-vit-b", 256)
    msg = str(e.value)
    assert "\n" not in msg
    assert all(s in msg for s in ("--enc-type dinov2-vit-b=", "--enc-path",
                                  "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"))
    with pytest.raises(enc.EncoderWeightsMissing, match="does not exist") as e:
        enc.load_encoders(f"mocov3-vit-b={tmp_path / 'nope.pth'}", 256)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="--enc-type 'dinov3-vit-b' is not known"):
        enc.parse_enc_type("dinov3-vit-b")
    # a file that does not fit: one line naming the encoder and the expected release
    wrong = _tiny("mae-vit-l", 32)
    torch.save(wrong.state_dict(), tmp_path / "mae.pth")
    with pytest.raises(enc.EncoderWeightsError) as e:
        enc.load_encoders(f"jepa-vit-h={tmp_path / 'mae.pth'}", 32, **TINY)
    assert "\n" not in str(e.value) and "IN1K-vit.h.14-300e" in str(e.value)
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 truncated download")
    with pytest.raises(enc.EncoderWeightsError, match="is not a readable weights file") as e:
        enc.load_encoders(f"dinov2-vit-b={tmp_path / 'cut.pth'}", 32, **TINY)
    assert "\n" not in str(e.value)


def test_parse_enc_type():
    assert enc.parse_enc_type("") == [] and enc.parse_enc_type("None") == []
    assert enc.parse_enc_type("dinov2-vit-b=/a.pth, mocov3-vit-b", "/w") == [
        ("dinov2-vit-b", "/a.pth"), ("mocov3-vit-b", "/w")]
    assert enc.parse_enc_type("dinov2-vit-b,clip-vit-L", "/a,/b") == [("dinov2-vit-b", "/a"), ("clip-vit-L", "/b")]
    with pytest.raises(ValueError, match="--enc-path lists 3 paths for 2 encoders"):
        enc.parse_enc_type("dinov2-vit-b,clip-vit-L", "/a,/b,/c")


# ---------------------------------------------------------------- FLOPs

def test_encoder_flops_formula_counts_the_model():
    from torch.utils.flop_counter import FlopCounterMode

    for name in ("dinov2-vit-b", "dinov2reg-vit-s", "jepa-vit-h"):
        vit = enc.create_vit(name, 32, **TINY).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            vit.forward_features(torch.randn(1, 3, 28, 28))
        b = vit.blocks[0]
        want = vit_forward_flops(32, 2, 14, 2, vit.num_prefix_tokens, b.mlp.fc1.out_features, b.mlp.fc2.in_features)
        assert counter.get_total_flops() == want, name


def test_encoder_specs_match_timm_architectures():
    for name, spec in enc.ENCODERS.items():
        with torch.device("meta"):
            vit = enc.create_vit(name, 256)
        b = vit.blocks[0]
        assert (vit.embed_dim, len(vit.blocks), b.attn.num_heads, vit.patch_embed.patch_size[0],
                b.mlp.fc1.out_features, b.mlp.fc2.in_features, vit.num_prefix_tokens) == (
            spec.embed_dim, spec.depth, spec.num_heads, spec.patch_size, spec.mlp_in, spec.mlp_out,
            spec.prefix_tokens), name
        assert vit.patch_embed.grid_size == (16, 16), name
    cfg = SiTFlopsConfig.from_name("SiT-XL/2")
    # encoder once, projectors (1152 -> 2048 -> 2048 -> 768 on 256 tokens) three times
    proj = 2 * 256 * (1152 * 2048 + 2048 * 2048 + 2048 * 768)
    assert repa_train_step_flops(cfg, "dinov2-vit-b", 256, batch=2) == 2 * (encoder_forward_flops("dinov2-vit-b")
                                                                             + 3 * proj)


def test_enc_arch_resizes_the_counted_and_checked_encoder(tmp_path):
    """--enc-arch: the shape the FLOPs count and the grid check see before any weights load is the
    one built (a custom ViT with patch 4 on 32 px images: 8x8 tokens, as the digits SiT-S/4)."""
    from torch.utils.flop_counter import FlopCounterMode

    arch = enc.parse_arch_overrides("embed_dim=48,depth=3,num_heads=3,patch_size=4")
    spec = enc.encoder_spec("custom-vit", arch)
    assert enc.encoder_spec("custom-vit") is enc.ENCODERS["custom-vit"]
    vit = enc.create_vit("custom-vit", 32, **arch).eval()
    b = vit.blocks[0]
    assert (vit.embed_dim, len(vit.blocks), b.attn.num_heads, vit.patch_embed.patch_size[0],
            b.mlp.fc1.out_features, b.mlp.fc2.in_features, vit.num_prefix_tokens) == (
        48, 3, 3, 4, 192, 192, 1) == (spec.embed_dim, spec.depth, spec.num_heads, spec.patch_size, spec.mlp_in,
                                      spec.mlp_out, spec.prefix_tokens)
    assert enc.encoder_grid(spec, 32) == vit.patch_embed.grid_size[0] == 8
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        vit.forward_features(torch.randn(2, 3, 32, 32))
    assert encoder_forward_flops("custom-vit", 32, batch=2, arch=arch) == counter.get_total_flops()
    check_token_grid(["custom-vit"], 64, "SiT-S/4", 32, arch)  # by name, before weights
    with pytest.raises(ValueError, match="custom-vit gives 2x2 patch tokens at --resolution 32"):
        check_token_grid(["custom-vit"], 64, "SiT-S/4", 32)  # without --enc-arch: patch 16
    assert enc.alignment_fields("custom-vit", "embed_dim=48,depth=3,num_heads=3,patch_size=4")["z_dims"] == (48,)
    cfg = SiTFlopsConfig(depth=4, hidden_size=96, num_heads=4, patch_size=4, input_size=32, in_channels=3,
                         num_classes=10, encoder_depth=2)
    proj = 2 * 64 * (96 * 256 + 256 * 256 + 256 * 48)
    assert repa_train_step_flops(cfg, "custom-vit", 32, batch=2, projector_dim=256, arch=arch) == \
        counter.get_total_flops() + 2 * 3 * proj
    # a custom ViT's own weights file loads with the same overrides, and its tokens are the model's
    path = str(tmp_path / "vit.pt")
    torch.save(vit.state_dict(), path)
    encoder = enc.load_encoders(f"custom-vit={path}", 32, **arch)[0]
    images = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    with torch.no_grad():
        want = vit.forward_features(encoder.preprocess(images))[:, 1:]
    torch.testing.assert_close(encoder(images), want)
    with pytest.raises(enc.EncoderWeightsMissing, match="custom-vit needs its weights"):
        enc.load_encoders("custom-vit", 32, **arch)


# ---------------------------------------------------------------- paired dataset

def test_paired_dataset_mode(tmp_path):
    data = str(tmp_path / "data")
    labels = write_synthetic_dataset(data, 5, resolution=32, latent_shape=(8, 4, 4), num_classes=3)
    ds = CustomDataset(data, mode="latent+pixel")
    assert len(ds) == 5 and ds.resolution == 32
    for i in range(5):
        image, moments, label = ds[i]
        png = np.asarray(PIL.Image.open(os.path.join(data, "images", image_name(i))))
        assert image.dtype == torch.uint8 and np.array_equal(image.permute(1, 2, 0).numpy(), png)
        assert np.array_equal(moments.numpy(), np.load(os.path.join(data, "vae-sd", latent_name(i))))
        assert int(label) == labels[i]
    images, moments, ys = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert images.shape == (5, 3, 32, 32) and moments.shape == (5, 8, 4, 4) and ys.tolist() == labels.tolist()

    # the same count and labels but different items: caught by the file-name indices
    broken = str(tmp_path / "broken")
    shutil.copytree(data, broken)
    src = os.path.join(broken, "vae-sd", latent_name(4))
    dst = os.path.join(broken, "vae-sd", latent_name(7))
    os.rename(src, dst)
    import json
    meta_path = os.path.join(broken, "vae-sd", "dataset.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["labels"] = [[latent_name(7) if n == latent_name(4) else n, y] for n, y in meta["labels"]]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(DatasetError, match="indices differ") as e:
        CustomDataset(broken, mode="latent+pixel")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="'latent', 'pixel' or 'latent\\+pixel'"):
        CustomDataset(data, mode="pixels")
