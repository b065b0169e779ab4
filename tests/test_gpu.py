"""CUDA-only checks: mixed precision, flash attention, torch.compile (inductor), and train.py /
generate.py end to end on a GPU. Skipped where no GPU is visible (CI); run them on a GPU with
``python -m pytest -q tests/test_gpu.py``."""
import os

import numpy as np
import pytest
import torch

from loss import LSEPLoss
from models import SiT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SMALL = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=384, depth=4, num_heads=6, num_classes=10,
             encoder_depth=2, crop_start=5, class_dropout_prob=0.1, uncond_prob=0.9)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def randomised(model, std=0.02):
    """Give the zero-initialised adaLN / output layers weights, so outputs are not trivially zero."""
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, std)
    return model


def fixed_inputs(model, batch=8, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, device="cuda", generator=g)
    t = torch.rand(batch, device="cuda", generator=g)
    y = torch.randint(0, model.num_classes, (batch,), device="cuda", generator=g)
    y_probe = torch.where(torch.rand(batch, device="cuda", generator=g) < 0.5, model.num_classes, y)
    window = model.sample_crop_window(batch, "cuda")
    return x, t, y, y_probe, window


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 references in true fp32; restore the global flags afterwards."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_bf16_and_fp16_autocast_forward_close_to_fp32():
    torch.manual_seed(0)
    model = randomised(SiT(**SMALL)).cuda().train()
    inputs = fixed_inputs(model)
    with torch.no_grad():
        v_ref, logits_ref = model.forward_conditioned(*inputs)
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cuda", dtype=dtype):
                v, logits = model.forward_conditioned(*inputs)
            assert v.dtype == dtype and logits.dtype == dtype  # the classifier's Linear runs in half precision
            tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
            assert rel_err(v, v_ref) < tol and rel_err(logits, logits_ref) < tol, dtype


@pytest.mark.parametrize("hidden,heads", [(768, 12), (1152, 16)])  # SiT-B and SiT-XL head dims 64 and 72
def test_flash_attention_runs_at_sit_head_dims_and_matches_manual(hidden, heads):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = randomised(SiT(input_size=32, patch_size=2, in_channels=4, hidden_size=hidden, depth=1,
                           num_heads=heads, num_classes=10, encoder_depth=1, crop_start=12)).cuda().eval()
    x, t, y, _, _ = fixed_inputs(model, batch=4)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.fused_attn = False
        v_manual, _ = model(x, t, y)  # fp32 manual softmax attention: the reference
        for block in model.blocks:
            block.attn.fused_attn = True
        # Forcing the flash kernel raises if it cannot run these shapes, so this also proves it is used.
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
            v_flash, _ = model(x, t, y)
    assert rel_err(v_flash, v_manual) < 2e-2


def test_compiled_training_loss_and_gradients_match_eager():
    torch.manual_seed(0)
    model = randomised(SiT(**SMALL)).cuda().train()
    loss_fn = LSEPLoss(weights_type="steps", weight_start=0.0225, weight_end=0.03, n_weights=10)
    x = torch.randn(16, 4, 16, 16, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")

    def loss_and_grads(forward):
        torch.manual_seed(3)  # the same times, noise, label dropout and crop window in both runs
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            terms = loss_fn(forward, x, dict(y=y))
            denoising, probe_loss = terms.denoising, terms.probe
            loss = denoising.mean() + probe_loss
        loss.backward()
        return loss.detach().float(), probe_loss.detach().float(), [p.grad.clone() for p in model.parameters()
                                                                    if p.grad is not None]

    eager = loss_and_grads(model)
    compiled = loss_and_grads(torch.compile(model))
    assert abs(compiled[0] - eager[0]) / eager[0] < 1e-2
    assert abs(compiled[1] - eager[1]) / eager[1] < 1e-2
    assert len(compiled[2]) == len(eager[2])
    flat_eager = torch.cat([g.flatten().double() for g in eager[2]])
    flat_compiled = torch.cat([g.flatten().double() for g in compiled[2]])
    assert rel_err(flat_compiled, flat_eager) < 5e-2


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory):
    from test_train import make_latent_data
    return make_latent_data(str(tmp_path_factory.mktemp("latents")))


@pytest.fixture()
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_train_on_cuda_mixed_precision_and_resume(latent_dir, tmp_path, precision, fresh_accelerate_state):
    """train.py on the GPU: finite losses, the GradScaler state in fp16 checkpoints, and a resumed run
    close to an unbroken one (GPU kernels are not bitwise deterministic, so a tolerance)."""
    import train
    from accelerate.state import AcceleratorState, GradientState
    from test_train import ckpt, stats, tiny_argv

    def run(name, steps, *extra):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        argv = tiny_argv(latent_dir, tmp_path, name, "--max-train-steps", steps, "--checkpointing-steps", 2, *extra)
        argv[argv.index("--mixed-precision") + 1] = precision
        return train.main(train.parse_args(argv))

    run("full", 4)
    run("split", 2)
    run("split", 4, "--resume-step", 2)
    full, split = ckpt(tmp_path, "full", 4), ckpt(tmp_path, "split", 4)
    records = stats(tmp_path, "full")
    assert len(records) == 4 and all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert all(t.device.type == "cpu" for t in full["model"].values())  # checkpoints load without a GPU
    if precision == "fp16":
        assert full["scaler"] is not None and full["scaler"]["scale"] > 0
    for key in full["model"]:
        torch.testing.assert_close(split["model"][key], full["model"][key], rtol=1e-3, atol=1e-4, msg=key)
        torch.testing.assert_close(split["ema"][key], full["ema"][key], rtol=1e-3, atol=1e-4, msg=key)


def test_generate_on_cuda_tf32_bf16_and_compile_agree_with_fp32(tmp_path):
    """generate.py on the GPU in tf32, bf16 and bf16 + compile against fp32 on the GPU (noise is drawn
    on the sampling device, so CPU and GPU runs start from different noise): the same images up to
    rounding of a few pixel levels."""
    import generate
    from test_generate import LATENT_KWARGS, tiny_checkpoint

    # --vae none samples in pixel space, so a 3-channel model
    tiny_checkpoint(str(tmp_path / "model.pt"), {**LATENT_KWARGS, "input_size": 16, "in_channels": 3})

    def sample(out, *extra):
        argv = ["--ckpt", str(tmp_path / "model.pt"), "--vae", "none", "--resolution", "16", "--num-fid-samples",
                "16", "--per-proc-batch-size", "8", "--sample_dir", str(tmp_path / out), "--mode", "sde",
                "--num-steps", "20", "--cfg-scale", "2.0", "--device", "cuda", *extra]
        with np.load(generate.main(generate.parse_args(argv)) + ".npz") as f:
            return f["arr_0"].astype(np.float64)

    reference = sample("fp32", "--precision", "fp32")
    assert len(np.unique(reference)) > 50  # varied images, not a constant
    for name, extra in (("tf32", ()), ("bf16", ("--bf16",)), ("bf16c", ("--bf16", "--compile"))):
        diff = np.abs(sample(name, *extra) - reference)
        assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 8, (name, diff.mean(), diff.max())
