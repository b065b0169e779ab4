"""models/fused.py: each speed lever gives the eager model's results, keeps the state-dict keys and
Parameters, and refuses where it cannot run. Triton kernels run in the interpreter on CPU."""
import functools
import os
import subprocess
import sys

TRITON_FRESH = "triton" not in sys.modules  # Triton reads TRITON_INTERPRET when it is first imported

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # kernels compiled on a GPU, interpreted on CPU
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
import torch.nn.functional as F  # noqa: E402

from models import SiT  # noqa: E402
from models.fused import (  # noqa: E402
    FP8_LAYERS, GeluEpilogueLinear, apply_speed_options, check_fp8_device, clip_grad_norm_into_fused_adamw_,
    convert_to_fp8, gate_residual, norm_modulate, residual_norm_modulate,
)
from models.sit import modulate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def _interpreted_run():
    """This file's Triton tests, run once in a fresh process where Triton starts in interpreter mode."""
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", __file__, "-k",
                          "triton_"], env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    return run.stdout + run.stderr


def triton_test(fn):
    """Run ``fn`` here on a GPU or when Triton was not imported before this file set interpreter
    mode (this file alone); else check its result in a fresh interpreter-mode process (full suite)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if DEVICE == "cuda" or TRITON_FRESH:
            return fn(*args, **kwargs)
        node = os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0].split("::", 1)[1]
        output = _interpreted_run()
        assert f"PASSED tests/test_fused.py::{node}" in output or f"PASSED {__file__}::{node}" in output, \
            output[-4000:]
    return wrapper
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=3, num_heads=2,
            num_classes=5, encoder_depth=2, crop_start=2)


def tiny(seed=0, device="cpu"):
    torch.manual_seed(seed)
    model = SiT(**TINY).to(device)
    with torch.no_grad():  # the init zeroes adaLN and output layers; give every path signal
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.normal_(0, 0.1)
    return model.train()


def run_step(model, x, t, y, y_probe, window, autocast):
    """Outputs and parameter gradients of one forward/backward of forward_conditioned."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out, logits = model.forward_conditioned(x, t, y, y_probe, window)
        loss = out.float().square().mean() + logits.float().logsumexp(1).mean()
    loss.backward()
    return out, logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def inputs(batch=3, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(batch, 4, 8, 8, generator=g), torch.rand(batch, generator=g)
    y = torch.randint(0, 5, (batch,), generator=g)
    y_probe = torch.where(torch.arange(batch) % 2 == 0, torch.full_like(y, 5), y)
    window = (torch.full((batch,), 2), torch.tensor([0, 1, 2])[:batch], torch.tensor([2, 0, 1])[:batch])
    return x.to(device), t.to(device), y.to(device), y_probe.to(device), tuple(w.to(device) for w in window)


#################################################################################
#                             GELU epilogue                                     #
#################################################################################

def test_cpu_addmm_activation_is_erf_gelu_so_cpu_runs_addmm_plus_tanh_gelu():
    # torch's CPU kernel applies the erf GELU (its decomposition says so: tanh only on CUDA, where the
    # cuBLASLt epilogue is the tanh approximation). SiT uses tanh, hence the device branch.
    torch.manual_seed(0)
    x, w, b = torch.randn(8, 16), torch.randn(32, 16), torch.randn(32)
    pre = torch.addmm(b, x, w.t())
    fused = torch._addmm_activation(b, x, w.t(), use_gelu=True)
    torch.testing.assert_close(fused, F.gelu(pre), rtol=0, atol=0)
    assert (fused - F.gelu(pre, approximate="tanh")).abs().max() > 1e-4


@pytest.mark.parametrize("autocast", [False, True])
def test_gelu_epilogue_linear_equals_linear_then_tanh_gelu(autocast):
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40)
    fused = GeluEpilogueLinear.sharing(linear)
    assert fused.weight is linear.weight and fused.bias is linear.bias
    x = torch.randn(2, 5, 24, requires_grad=True)
    grad = torch.randn(2, 5, 40)
    results = []
    for forward in (lambda v: F.gelu(linear(v), approximate="tanh"), fused):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = forward(x)
        results.append((out,) + torch.autograd.grad(out, (x, linear.weight, linear.bias), grad))
    for ours, eager in zip(*results):
        assert ours.dtype == eager.dtype
        torch.testing.assert_close(ours, eager, rtol=1e-5 if not autocast else 1.6e-2, atol=1e-6)


#################################################################################
#                   Triton norm + modulate, gate + residual                      #
#################################################################################

@pytest.mark.parametrize("tokens,dim,ada_dtype", [(9, 24, torch.bfloat16), (16, 48, torch.float32)])
@triton_test
def test_triton_norm_modulate_kernel_equals_eager_forward_and_backward(tokens, dim, ada_dtype):
    torch.manual_seed(0)  # 9 tokens: one row per backward program; D not a power of two: masked lanes
    x = (torch.randn(3, tokens, dim) * 2 + 0.5).to(DEVICE).requires_grad_()
    shift = torch.randn(3, dim).to(DEVICE, ada_dtype).requires_grad_()
    scale = (0.3 * torch.randn(3, dim)).to(DEVICE, ada_dtype).requires_grad_()
    grad = torch.randn(3, tokens, dim, device=DEVICE)
    eager = modulate(F.layer_norm(x, (dim,), eps=1e-6), shift, scale)
    fused = norm_modulate(x, shift, scale, eps=1e-6)
    assert fused.dtype == eager.dtype == torch.float32
    torch.testing.assert_close(fused, eager, rtol=1e-6, atol=2e-6)
    for ours, ref in zip(torch.autograd.grad(fused, (x, shift, scale), grad),
                         torch.autograd.grad(eager, (x, shift, scale), grad)):
        assert ours.dtype == ref.dtype
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@triton_test
def test_triton_gate_residual_kernel_equals_eager_forward_and_backward(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 16, 40, device=DEVICE, requires_grad=True)
    gate = torch.randn(3, 40).to(DEVICE, dtype).requires_grad_()
    y = torch.randn(3, 16, 40).to(DEVICE, dtype).requires_grad_()
    grad = torch.randn(3, 16, 40, device=DEVICE)
    eager = x + gate.unsqueeze(1) * y
    fused = gate_residual(x, gate, y)
    torch.testing.assert_close(fused, eager, rtol=0, atol=0)
    for ours, ref in zip(torch.autograd.grad(fused, (x, gate, y), grad),
                         torch.autograd.grad(eager, (x, gate, y), grad)):
        assert ours.dtype == ref.dtype
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("tokens,ada_dtype", [(9, torch.bfloat16), (16, torch.float32)])
@triton_test
def test_triton_residual_norm_modulate_kernel_equals_eager_forward_and_backward(tokens, ada_dtype):
    torch.manual_seed(0)
    dim = 40
    x = torch.randn(3, tokens, dim, device=DEVICE, requires_grad=True)
    gate, shift = (torch.randn(3, dim).to(DEVICE, ada_dtype).requires_grad_() for _ in range(2))
    scale = (0.3 * torch.randn(3, dim)).to(DEVICE, ada_dtype).requires_grad_()
    y = torch.randn(3, tokens, dim).to(DEVICE, ada_dtype).requires_grad_()
    grad_x1, grad_h = torch.randn(2, 3, tokens, dim, device=DEVICE)
    x1 = x + gate.unsqueeze(1) * y
    eager = (x1, modulate(F.layer_norm(x1, (dim,), eps=1e-6), shift, scale))
    fused = residual_norm_modulate(x, gate, y, shift, scale, eps=1e-6)
    torch.testing.assert_close(fused[0], eager[0], rtol=0, atol=0)
    torch.testing.assert_close(fused[1], eager[1], rtol=1e-6, atol=2e-6)
    inputs_ = (x, gate, y, shift, scale)
    for ours, ref in zip(torch.autograd.grad(fused, inputs_, (grad_x1, grad_h)),
                         torch.autograd.grad(eager, inputs_, (grad_x1, grad_h))):
        assert ours.dtype == ref.dtype
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


#################################################################################
#                          apply_speed_options on a SiT                          #
#################################################################################

@pytest.mark.parametrize("autocast", [False, True])
@triton_test
def test_triton_levers_keep_keys_and_parameters_and_give_the_eager_results(autocast):
    eager, fused = tiny(device=DEVICE), tiny(device=DEVICE)
    keys, params = list(fused.state_dict()), dict(fused.named_parameters())
    apply_speed_options(fused, gelu_epilogue=True, fused_norm_modulate=True)
    assert list(fused.state_dict()) == keys
    assert all(p is params[n] for n, p in fused.named_parameters())
    assert all(isinstance(b.mlp.fc1, GeluEpilogueLinear) for b in fused.blocks)
    args = inputs(device=DEVICE)
    out_e, logits_e, grads_e = run_step(eager, *args, autocast)
    out_f, logits_f, grads_f = run_step(fused, *args, autocast)
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_f, out_e, **tol)
    torch.testing.assert_close(logits_f, logits_e, **tol)
    assert grads_f.keys() == grads_e.keys()
    for name in grads_e:
        scale = grads_e[name].abs().max().item() + 1e-3
        error = (grads_f[name] - grads_e[name]).abs().max().item()
        assert error <= (2e-2 if autocast else 1e-4) * scale, (name, error, scale)


@triton_test
def test_triton_levers_trace_as_one_graph_with_no_breaks():
    model = apply_speed_options(tiny(device=DEVICE), gelu_epilogue=True, fused_norm_modulate=True)
    x, t, y, y_probe, window = inputs(device=DEVICE)

    def loss(x, t, y, y_probe):
        out, logits = model.forward_conditioned(x, t, y, y_probe, window)
        return out.square().mean() + logits.logsumexp(1).mean()

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(loss)(x, t, y, y_probe)
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_lever_errors_are_one_line(monkeypatch):
    with pytest.raises(ValueError, match="choose one"):
        apply_speed_options(tiny(), gelu_epilogue=True, fp8=True)
    with pytest.raises(ValueError, match="compute capability >= 8.9") as info:
        apply_speed_options(tiny(), fp8=True)
    assert "\n" not in str(info.value) and "--fp8" in str(info.value)
    with pytest.raises(ValueError, match="--fp8"):
        check_fp8_device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA GPU") as info:
        apply_speed_options(tiny(), fused_norm_modulate=True)
    assert "\n" not in str(info.value)


def test_fp8_converts_exactly_the_block_matmuls_keeping_keys():
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    model = tiny()
    keys, params = list(model.state_dict()), dict(model.named_parameters())
    reference = tiny()
    convert_to_fp8(model)
    converted = sorted(n for n, m in model.named_modules() if isinstance(m, Float8Linear))
    assert converted == sorted(f"blocks.{i}.{layer}" for i in range(TINY["depth"]) for layer in FP8_LAYERS)
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    # torchao's emulated path runs on CPU: the outputs follow bf16's within fp8's rounding.
    args = inputs()
    out, logits, grads = run_step(model, *args, autocast=True)
    ref_out, ref_logits, ref_grads = run_step(reference, *args, autocast=True)
    rel = ((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
    assert 0 < rel < 0.1, rel
    assert grads.keys() == ref_grads.keys()


#################################################################################
#                        Clipping inside fused AdamW                            #
#################################################################################

@pytest.mark.parametrize("grad_size", [0.01, 30.0])  # below and above max_norm
def test_clipping_inside_fused_adamw_equals_clip_then_step(grad_size):
    torch.manual_seed(0)
    params = [torch.randn(40, 24, requires_grad=True), torch.randn(24, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt, twin_opt = (torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True) for ps in (params, twins))
    for _ in range(3):
        grads = [torch.randn_like(p) * grad_size for p in params]
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g.clone(), g.clone()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        twin_norm = clip_grad_norm_into_fused_adamw_(twin_opt, twins, 1.0)
        twin_opt.step()
        torch.testing.assert_close(twin_norm, norm, rtol=0, atol=0)
        for p, q in zip(params, twins):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    assert float(norm) > 1.0 if grad_size > 1 else float(norm) < 1.0
    with pytest.raises(ValueError, match="fused=True"):
        clip_grad_norm_into_fused_adamw_(torch.optim.AdamW(params, foreach=True), params, 1.0)


#################################################################################
#                          Persistent compile cache                             #
#################################################################################

CACHE_SCRIPT = """
import sys, torch
from models.fused import persistent_compile_cache
persistent_compile_cache(sys.argv[1])
torch.set_num_threads(1)
f = torch.compile(lambda a: (a.sin() * 2 + 1).sum(0))
f(torch.randn(8, 4, device=sys.argv[2]))  # cuda on a GPU machine: Triton, no C++ compiler needed
from torch._dynamo.utils import counters
print(counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
"""


def test_persistent_compile_cache_hits_in_a_second_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    runs = [subprocess.run([sys.executable, "-c", CACHE_SCRIPT, str(tmp_path / "cache"), DEVICE], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=240) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    (first_hit, first_miss), (second_hit, second_miss) = (map(int, r.stdout.split()[-2:]) for r in runs)
    assert (first_hit, first_miss) == (0, 1) and (second_hit, second_miss) == (1, 0)
    assert (tmp_path / "cache" / "fxgraph").is_dir()


#################################################################################
#                                 CUDA only                                     #
#################################################################################

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_addmm_activation_is_the_tanh_gelu():
    torch.manual_seed(0)
    x, w, b = (torch.randn(*s, device="cuda", dtype=torch.bfloat16) for s in ((256, 128), (512, 128), (512,)))
    fused = torch._addmm_activation(b, x, w.t(), use_gelu=True).float()
    pre = torch.addmm(b.float(), x.float(), w.float().t())
    tanh_err = (fused - F.gelu(pre, approximate="tanh")).abs().max().item()
    erf_err = (fused - F.gelu(pre)).abs().max().item()
    assert tanh_err < erf_err and tanh_err < 0.05 * pre.abs().max().item(), (tanh_err, erf_err)
