"""Performance tooling: the analytic FLOP count, the slow reference path, compile readiness, the bench."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.reference_paths import ReferenceForward, attention_kind, loop_pool_tokens, \
    reference_forward_conditioned
from loss import LSEPLoss
from models import SiT
from models.flops import SiTFlopsConfig, mfu, peak_flops, sit_forward_flops, train_step_flops
from models.sit import pool_tokens

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2,
            num_classes=5, encoder_depth=2, crop_start=2)


def tiny(**kw):
    torch.manual_seed(0)
    model = SiT(**{**TINY, **kw})
    with torch.no_grad():  # the init zeroes adaLN and output layers; give every path signal
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.normal_(0, 0.05)
    return model


def inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.rand(batch, generator=g),
            torch.randint(0, 5, (batch,), generator=g))


#################################################################################
#                                  FLOP count                                   #
#################################################################################

def test_flops_closed_form_for_tiny_config():
    cfg = SiTFlopsConfig.from_model(tiny())
    tokens, d, mlp = 16, 32, 128  # (8 / 2)^2 tokens, hidden 32, MLP 4 x 32
    patch_embed = 2 * tokens * (4 * 2 * 2) * d           # 16384
    t_embed = 2 * 256 * d + 2 * d * d                     # 18432
    block = (2 * d * 6 * d                                # adaLN            12288
             + 2 * tokens * d * 3 * d                     # qkv              98304
             + 2 * 2 * tokens * tokens * d                # q k^T, attn v    32768
             + 2 * tokens * d * d                         # proj             32768
             + 2 * 2 * tokens * d * mlp)                  # fc1 + fc2       262144
    final = 2 * d * 2 * d + 2 * tokens * d * (2 * 2 * 4)  # 20480
    assert block == 438272
    backbone = patch_embed + t_embed + 4 * block + final
    probe = 2 * block + 2 * d * 5                         # 2 encoder blocks + classifier
    assert sit_forward_flops(cfg, probe=False) == backbone == 1808384
    assert sit_forward_flops(cfg, batch=3) == 3 * (backbone + probe) == 3 * 2685248
    assert train_step_flops(cfg, batch=3) == 9 * 2685248


def test_sit_flops_match_dit_papers_multiply_adds():
    # DiT/SiT tables list 23.0 (B/2) and 118.6 (XL/2) "Gflops": multiply-adds, half our 2mnk count.
    assert round(sit_forward_flops("SiT-B/2", probe=False) / 2e9, 1) == 23.0
    assert round(sit_forward_flops("SiT-XL/2", probe=False) / 2e9, 1) == 118.6
    assert sit_forward_flops(SiTFlopsConfig.from_name("SiT-XL/2", resolution=512), probe=False) > 4 * 237e9


@pytest.mark.parametrize("fused", [False, True])
def test_flop_counter_agrees_with_the_analytic_count(fused):
    model = tiny().train()
    cfg, batch = SiTFlopsConfig.from_model(model), 3
    x, t, y = inputs(batch)
    tokens, d = 16, 32
    with attention_kind(model, fused):
        with FlopCounterMode(display=False) as counter:
            model.forward_conditioned(x, t, y)
        assert counter.get_total_flops() == sit_forward_flops(cfg, batch, probe=False)
        with FlopCounterMode(display=False) as counter:
            model.forward_conditioned(x, t, y, y, None)
        assert counter.get_total_flops() == sit_forward_flops(cfg, batch)
        # The vectorised crop averages with a 0/1-mask bmm: 2 T D per probe sample, not model work.
        window = model.sample_crop_window(batch, "cpu")
        with FlopCounterMode(display=False) as counter:
            model.forward_conditioned(x, t, y, y, window)
        assert counter.get_total_flops() - sit_forward_flops(cfg, batch) == batch * 2 * tokens * d
        with FlopCounterMode(display=False) as counter:
            out, logits = model.forward_conditioned(x, t, y, y, None)
            (out.square().mean() + logits.logsumexp(1).mean()).backward()
    measured = counter.get_total_flops()
    # Backward skips the input gradient of the two layers fed by data that needs no gradient: the
    # patch-embedding conv and the first timestep-MLP linear.
    skipped = batch * (2 * tokens * (4 * 2 * 2) * d + 2 * 256 * d)
    # Flash-attention backward recomputes q k^T: +0.5x the forward attention (not model FLOPs).
    attention_fwd = batch * (cfg.depth + cfg.encoder_depth) * 2 * 2 * tokens * tokens * d
    recompute = attention_fwd // 2 if fused else 0
    assert measured == train_step_flops(cfg, batch) - skipped + recompute
    assert abs(measured / train_step_flops(cfg, batch) - 1) < 0.02


def test_peak_table_and_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H200", "fp16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp32", tf32=False) == 19.5e12
    assert peak_flops("Some CPU", "bf16") is None
    assert mfu(989e12 * 0.5, 1.0, 989e12) == pytest.approx(0.5)
    assert mfu(1e12, 1.0, None) is None


#################################################################################
#                               Reference path                                  #
#################################################################################

def test_loop_pool_equals_vectorised_pool():
    torch.manual_seed(0)
    tokens = torch.randn(5, 16, 3)
    size = torch.full((5,), 3)
    top, left = torch.randint(0, 2, (5,)), torch.randint(0, 2, (5,))
    torch.testing.assert_close(loop_pool_tokens(tokens, (size, top, left)), pool_tokens(tokens, (size, top, left)))
    torch.testing.assert_close(loop_pool_tokens(tokens), pool_tokens(tokens))


@pytest.mark.parametrize("attention,crop", [("manual", "loop"), ("sdpa", "vectorised")])
def test_reference_path_equals_model_outputs_and_gradients(attention, crop):
    model = tiny().train()
    x, t, y = inputs(6)
    y_probe = torch.where(torch.arange(6) % 2 == 0, torch.full_like(y, 5), y)
    window = model.sample_crop_window(6, "cpu")

    out, logits = model.forward_conditioned(x, t, y, y_probe, window)
    (out.square().mean() + logits.logsumexp(1).mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    ref_out, ref_logits = reference_forward_conditioned(model, x, t, y, y_probe, window, attention, crop)
    (ref_out.square().mean() + ref_logits.logsumexp(1).mean()).backward()

    assert all(block.attn.fused_attn for block in model.blocks)  # the model's setting is restored
    torch.testing.assert_close(ref_out, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref_logits, logits, rtol=1e-5, atol=1e-6)
    ref_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert ref_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(ref_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_reference_forward_draws_the_same_labels_and_window_as_the_model():
    model = tiny(class_dropout_prob=0.5, uncond_prob=0.5).train()
    x, _, y = inputs(8)
    loss_fn = LSEPLoss(weights_type="steps", weight_start=0.0225, weight_end=0.03, n_weights=10)
    results = []
    for forward in (model, ReferenceForward(model)):
        torch.manual_seed(3)
        results.append(loss_fn(forward, x, dict(y=y)))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ref, ours, rtol=1e-5, atol=1e-6)
    model.eval()
    t = torch.rand(8)
    ref_out, ref_logits = ReferenceForward(model)(x, t, y)
    assert ref_logits is None
    torch.testing.assert_close(ref_out, model(x, t, y)[0], rtol=1e-5, atol=1e-6)


#################################################################################
#                              torch.compile readiness                          #
#################################################################################

def test_training_forward_and_loss_have_no_graph_breaks():
    model = tiny().train()  # probe branch on, crop on (crop_start 2 < grid 4)
    loss_fn = LSEPLoss(weighting="lognormal", weights_type="steps", weight_start=0.0225, weight_end=0.03)
    x, _, y = inputs(3)

    def training_loss(x, y):
        terms = loss_fn(model, x, dict(y=y))
        denoising, probe_loss, accuracy = terms.denoising, terms.probe, terms.probe_accuracy
        return denoising.mean() + probe_loss, accuracy

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(training_loss)(x, y)
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


#################################################################################
#                                    Bench                                      #
#################################################################################

def test_bench_train_smoke(tmp_path):
    from benchmarks import bench_train

    threads = torch.get_num_threads()
    try:  # one thread: two OpenMP threads on a busy 2-core machine are many times slower
        records = bench_train.main([
            "--device", "cpu", "--model", "SiT-S/4", "--resolution", "64", "--crop-start", "1",
            "--batch-size", "2", "--warmup", "1", "--reps", "2", "--compare",
            "--levers", "ema,gelu-epilogue,clip-in-adamw",
            "--threads", "1", "--results-dir", str(tmp_path),
        ])
    finally:
        torch.set_num_threads(threads)
    (record,) = records
    saved = json.loads((tmp_path / "train_cpu.json").read_text())
    assert saved[-1]["paths"] == json.loads(json.dumps(record["paths"]))
    ours, reference = record["paths"]
    assert ours["name"] == "ours" and reference["name"] == "reference" and ours["mfu"] is None
    assert ours["step_ms"] > 0 and reference["step_ms"] > 0 and record["ours_speedup_vs_reference"] > 0
    assert record["flops_per_step"] == train_step_flops(SiTFlopsConfig.from_name("SiT-S/4", 64), 2)
    assert [item["variant"]["name"] for item in record["levers"]] == ["foreach-mul-add EMA", "loop EMA",
                                                                       "gelu epilogue on", "fused-clip AdamW"]
    assert reference["variant"]["attention"] == "sdpa" and reference["variant"]["precision"] == "fp32"
    assert record["torch"] == torch.__version__ and record["command"].startswith("benchmarks/bench_train.py")


def test_window_pooling_stays_float32_under_autocast():
    torch.manual_seed(0)
    tokens = torch.randn(4, 256, 64) * 3 + 1
    window = (torch.full((4,), 12), torch.tensor([0, 1, 2, 4]), torch.tensor([3, 0, 4, 1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled, looped = pool_tokens(tokens, window), loop_pool_tokens(tokens, window)
    torch.testing.assert_close(pooled, looped, rtol=1e-5, atol=1e-5)


def test_lever_variants_flip_one_setting_each():
    from benchmarks.bench_train import Variant, lever_variants

    base = Variant("ours", compile=True)
    flipped = dict(lever_variants(base, ("compile", "compile-mode", "attention", "probe")))
    assert flipped["compile"].compile is False
    assert (flipped["compile-mode"].compile, flipped["compile-mode"].compile_mode) == (True, "max-autotune-no-cudagraphs")
    assert flipped["attention"].attention == "manual" and flipped["probe"].probe == "two-pass"
    for variant in flipped.values():  # everything else stays as in the base
        changed = {k for k, v in vars(variant).items() if v != vars(base)[k]} - {"name"}
        assert 1 <= len(changed) <= 2, changed


def test_profile_train_phases_and_kernel_kinds_on_cpu(tmp_path):
    from benchmarks import profile_train

    # kernel names seen in an H100 profile of the compiled SiT-XL/2 step
    assert profile_train.kind_of("nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN") == "matmul"
    assert profile_train.kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16") == "attention"
    assert profile_train.kind_of("triton_poi_fused_gelu_gelu_backward_view_15") == "fused elementwise (triton)"
    assert profile_train.kind_of("void at::native::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata>") \
        == "optimizer"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        phases, kinds, attention = profile_train.main([
            "--device", "cpu", "--model", "SiT-S/8", "--resolution", "64", "--batch-size", "2", "--steps", "1",
            "--out", str(tmp_path / "profile.json")])
    finally:
        torch.set_num_threads(threads)
    assert list(phases) == ["forward+backward", "clip grad norm", "AdamW", "EMA"] and min(phases.values()) > 0
    assert kinds["optimizer"] > 0  # aten::_fused_adamw_ and the EMA's lerp_
    assert isinstance(attention["ms"]["MATH"], float) and attention["shape"] == [4, 6, 1, 64]
    assert json.loads((tmp_path / "profile.json").read_text())["phases_ms"] == phases


def test_reference_variant_follows_the_authors_training_defaults():
    from benchmarks.bench_train import ours_and_reference, parse_args

    # JN-Yun/LSEP train.py: --fused-attn True, --mixed-precision fp16 (accelerate: autocast + GradScaler),
    # default AdamW, per-parameter EMA, probe as a second pass, crop by a loop over the batch.
    _, reference = ours_and_reference(parse_args(["--device", "cuda"]))
    assert (reference.probe, reference.crop, reference.attention, reference.precision, reference.optimizer,
            reference.ema, reference.compile) == ("two-pass", "loop", "sdpa", "fp16", "default", "loop", False)
    ours, old = ours_and_reference(parse_args(["--device", "cuda", "--reference-attention", "manual",
                                               "--reference-precision", "bf16"]))
    assert (old.attention, old.precision, ours.precision) == ("manual", "bf16", "bf16")  # the pre-fix reference
    _, cpu_reference = ours_and_reference(parse_args(["--device", "cpu"]))
    assert cpu_reference.precision == "fp32"  # no fp16 GEMMs worth timing on a CPU
    assert ReferenceForward(tiny()).attention == "sdpa"


def test_speed_lever_variants_and_runner_keep_the_base_model():
    from benchmarks.bench_train import StepRunner, Variant, lever_variants
    from models.fused import GeluEpilogueLinear

    base = Variant("ours", compile=True, fp8=True)
    names = ("gelu-epilogue", "fp8", "cudagraphs", "clip-in-adamw", "all", "all-fp8")
    flipped = dict(lever_variants(base, names))
    assert flipped["gelu-epilogue"].gelu_epilogue and not flipped["gelu-epilogue"].fp8  # both claim fc1
    assert not flipped["fp8"].fp8
    assert (flipped["cudagraphs"].compile, flipped["cudagraphs"].compile_mode) == (True, "reduce-overhead")
    assert flipped["all"].model_levers == dict(gelu_epilogue=True, fused_norm_modulate=True, fp8=False)
    assert flipped["all-fp8"].model_levers == dict(gelu_epilogue=False, fused_norm_modulate=True, fp8=True)
    assert flipped["all"].compile_mode == flipped["all-fp8"].compile_mode == "reduce-overhead"
    assert flipped["clip-in-adamw"].optimizer == flipped["all"].optimizer == "fused-clip"

    model = tiny().train()
    loss_fn = LSEPLoss(weights_type="steps", weight_start=0.0225, weight_end=0.03, n_weights=10)
    ema = [p.detach().clone() for p in model.parameters()]
    runner = StepRunner(Variant("gelu", precision="fp32", optimizer="foreach", gelu_epilogue=True), model, ema,
                        loss_fn, torch.device("cpu"))
    assert runner.model is not model and type(model.blocks[0].mlp.fc1) is torch.nn.Linear
    assert isinstance(runner.model.blocks[0].mlp.fc1, GeluEpilogueLinear)
    assert all(a is b for a, b in zip(runner.model.parameters(), model.parameters()))
    x, _, y = inputs(4)
    before = [p.detach().clone() for p in model.parameters()]
    runner.step(x, y)  # trains the shared weights
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_lever_numerics_equal_levers_give_the_same_loss_curve(tmp_path):
    from benchmarks import lever_numerics

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        record = lever_numerics.main([
            "--device", "cpu", "--model", "SiT-S/8", "--resolution", "64", "--crop-start", "1", "--steps", "3",
            "--batch-size", "2", "--pool", "2", "--window", "2", "--levers", "gelu-epilogue",
            "--out", str(tmp_path / "numerics.json")])
    finally:
        torch.set_num_threads(threads)
    assert len(record["base_losses"]) == len(record["lever_losses"]) == 3
    assert record["base_losses"][0] != record["base_losses"][1]  # the runs train and see new batches
    torch.testing.assert_close(record["lever_losses"], record["base_losses"], rtol=1e-5, atol=0)
    assert record["summary"]["param_rel_l2_diff"] < 1e-5
    assert json.loads((tmp_path / "numerics.json").read_text())["summary"] == record["summary"]


def test_bench_train_refuses_gpu_only_levers_on_cpu(capsys):
    from benchmarks.bench_train import parse_args

    for argv in (["--fp8"], ["--fused-norm-modulate"], ["--levers", "cudagraphs"], ["--gelu-epilogue", "--fp8"]):
        with pytest.raises(SystemExit):
            parse_args(["--device", "cpu"] + argv)
        assert "error:" in capsys.readouterr().err
    assert "fp8" not in parse_args(["--device", "cpu", "--levers", "all"]).lever_names


def test_activation_memory_counts_saved_tensors(tmp_path):
    """Model state bytes in closed form; the per-sample saved bytes do not depend on the measured
    batch, and --grad-checkpoint keeps far fewer (only block inputs)."""
    from benchmarks import activation_memory
    from models import SiT_models

    def measure(batch):
        return activation_memory.main(["--model", "SiT-S/4", "--resolution", "64", "--batch-size", str(batch),
                                       "--crop-start", "2", "--out", str(tmp_path / f"{batch}.json")])

    one, two = measure(1), measure(2)
    model = SiT_models["SiT-S/4"](input_size=8, num_classes=1000)
    n = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert one["state_bytes"] == {"weights": 4 * n, "gradients": 4 * trainable, "adamw": 8 * trainable, "ema": 4 * n}
    for row in ("plain", "grad_checkpoint"):
        a, b = one["rows"][row]["saved_bytes_per_sample"], two["rows"][row]["saved_bytes_per_sample"]
        assert a > 0 and abs(a - b) / a < 0.02, row
    plain, checkpointed = (one["rows"][r]["saved_bytes_per_sample"] for r in ("plain", "grad_checkpoint"))
    assert checkpointed < 0.3 * plain


def test_bench_sampling_times_a_checkpoint_through_the_loader(tmp_path):
    """--ckpt: the benchmark's model, input and classes come from the checkpoint (the one loader); the
    authors' settings (manual attention) and ours give the same samples on CPU in fp32."""
    import argparse as ap

    from benchmarks import bench_sampling
    from models.checkpoint import atomic_save

    torch.manual_seed(0)
    model = SiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=4,
                encoder_depth=1)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    atomic_save({"ema": model.state_dict(), "config": model.config.to_dict(), "args": ap.Namespace()},
                str(tmp_path / "tiny.pt"))
    out = tmp_path / "sampling.json"
    bench_sampling.main(bench_sampling.parse_args(["--device", "cpu", "--ckpt", str(tmp_path / "tiny.pt"), "--compare",
                                                   "--sde-steps", "3", "--ode-steps", "3", "--batch-size", "2",
                                                   "--repeats", "1", "--out", str(out)]))
    assert torch.is_grad_enabled()  # the benchmark leaves the caller's grad mode alone
    with open(out) as f:
        result = json.load(f)
    assert (result["model"], result["resolution"]) == ("custom", 8)
    for key in ("sde/ours", "ode/ours"):
        assert 0 < result["compare"][key]["output_abs_max"] and result["compare"][key]["rel_l2_diff"] < 1e-5
