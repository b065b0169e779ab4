"""Opt-in speed options for a built ``models.SiT``, applied from outside the model.

``apply_speed_options(model, ...)`` mutates a SiT in place: it swaps submodules or a block's class
for ones that hold the same ``nn.Parameter`` objects, so ``state_dict`` keys, values and the
optimizer's parameter list are unchanged and checkpoints load either way. Each option is off by
default and is checked against the eager ops by ``tests/test_fused.py``.

* ``gelu_epilogue``: ``mlp.fc1`` + tanh-GELU as one ``torch._addmm_activation`` call on CUDA,
  cuBLASLt's GELU epilogue (the tanh approximation, as SiT uses; on CPU that op applies the erf
  GELU, so off CUDA the same Function runs addmm + tanh-GELU). The epilogue keeps no
  pre-activation, so the backward recomputes it with one more GEMM: one elementwise pass and
  one saved (tokens x 4 hidden) activation per block less, one fc1-sized GEMM more.
* ``fused_norm_modulate``: each block's norms, adaLN modulates and gated residuals as three
  Triton kernels (norm1 + modulate; attention residual + norm2 + modulate; MLP residual), each
  with one Triton backward kernel. Computed in float32 and rounded where the eager ops round
  (``1 + scale`` and ``gate * y`` in the adaLN dtype), so results equal the eager ops up to
  float32 summation order. ``torch.compile`` already fuses these ops this way (inductor's
  kernels ``..._add_mul_native_layer_norm...``), so this option is for eager runs; compiled, the
  custom ops only hide them from inductor.
* ``fp8``: torchao float8 training (dynamic tensorwise scaling) for the four matmuls inside each
  block (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``): 96% of SiT-XL/2's FLOPs. The
  adaLN, embedder, final and classifier linears stay in bf16: they see one row per sample (too
  small to gain) or set the output and probe precision. Not equal numerics: a training-recipe
  choice, measured with ``benchmarks/lever_numerics.py``. Needs an sm89+ GPU and ``torchao``.

``clip_grad_norm_into_fused_adamw_`` clips gradients inside the fused AdamW kernel (its GradScaler
input), saving ``clip_grad_norm_``'s in-place pass over every gradient.

``persistent_compile_cache(path)`` points inductor's FX-graph, autograd and autotuning caches at
``path`` so ``torch.compile`` (max-autotune especially) pays once per machine, not per process.
"""
import functools
import math
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.sit import SiTBlock

FP8_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def add_speed_option_flags(parser):
    """The speed options' command-line flags, shared by train.py and benchmarks/bench_train.py; all off by default."""
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                        help="torch.compile mode with --compile (reduce-overhead and max-autotune also replay the "
                             "step as CUDA graphs)")
    parser.add_argument("--compile-cache", default=None, metavar="DIR",
                        help="keep inductor's compiled graphs and autotuning results in DIR for later runs")
    parser.add_argument("--gelu-epilogue", action="store_true",
                        help="tanh-GELU fused into the fc1 GEMM (cuBLASLt epilogue on GPUs); equal numerics")
    parser.add_argument("--fused-norm-modulate", action="store_true",
                        help="Triton LayerNorm+modulate and gate+residual kernels (CUDA); equal numerics")
    parser.add_argument("--fp8", action="store_true",
                        help="FP8 matmuls in the blocks (torchao; sm89+ GPUs, bf16); NOT equal numerics")


def apply_speed_options(model, gelu_epilogue=False, fused_norm_modulate=False, fp8=False):
    """Turn the chosen speed options on in ``model`` (a ``models.SiT``) in place; returns ``model``.

    Call after moving the model to its device and before ``torch.compile`` or a DDP wrapper. The
    EMA copy needs none (same keys); a checkpoint of either loads into the other.
    """
    if gelu_epilogue and fp8:
        raise ValueError("gelu_epilogue and fp8 both replace mlp.fc1 (--gelu-epilogue, --fp8); choose one")
    device = next(model.parameters()).device
    if fused_norm_modulate and device.type != "cuda" and not triton_interpreting():
        raise ValueError(f"fused_norm_modulate runs Triton kernels on a CUDA GPU; the model is on {device} "
                         "(leave --fused-norm-modulate off, or set TRITON_INTERPRET=1 for tests)")
    if fp8:
        check_fp8_device(device)
        convert_to_fp8(model)
    for block in model.blocks:
        if gelu_epilogue and not isinstance(block.mlp.fc1, GeluEpilogueLinear):
            block.mlp.fc1 = GeluEpilogueLinear.sharing(block.mlp.fc1)
            block.mlp.act = nn.Identity()
        if fused_norm_modulate:
            block.__class__ = FusedNormSiTBlock
    return model


#################################################################################
#                      GELU in the fc1 GEMM epilogue                            #
#################################################################################

class _LinearGeluTanh(torch.autograd.Function):
    """gelu_tanh(x @ w.T + b) for 2-D x; the backward recomputes the pre-activation."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        if x.is_cuda:  # cuBLASLt epilogue GELU: the tanh approximation
            return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
        return F.gelu(torch.addmm(bias, x, weight.t()), approximate="tanh")  # CPU's op uses erf

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        pre = torch.addmm(bias, x, weight.t())
        grad_pre = torch.ops.aten.gelu_backward(grad, pre, approximate="tanh")
        grad_x = grad_pre.mm(weight) if ctx.needs_input_grad[0] else None
        grad_w = grad_pre.t().mm(x) if ctx.needs_input_grad[1] else None
        grad_b = grad_pre.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class GeluEpilogueLinear(nn.Linear):
    """``nn.Linear`` followed by tanh-GELU, as one GEMM with a GELU epilogue (same parameters)."""

    @classmethod
    def sharing(cls, linear):
        """A GeluEpilogueLinear holding ``linear``'s own weight and bias Parameters."""
        if linear.bias is None:
            raise ValueError("gelu_epilogue needs fc1 with a bias (the addmm epilogue adds it)")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):  # cast once as autocast would, then run as is
            out = _LinearGeluTanh.apply(x.reshape(-1, x.shape[-1]).to(dtype), self.weight.to(dtype),
                                        self.bias.to(dtype))
        return out.reshape(*x.shape[:-1], self.out_features)


#################################################################################
#        LayerNorm + adaLN modulate, and gate * y + residual, in Triton          #
#################################################################################

def triton_interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _kernels():
    """The Triton kernels, built on first use (so TRITON_INTERPRET set by a test is honoured)."""
    import triton
    import triton.language as tl

    @triton.jit
    def rounded(x, dtype: tl.constexpr):
        """float32 ``x`` rounded to nearest-even in ``dtype`` (kept as float32). Done by hand for
        bf16 because Triton's interpreter truncates that conversion (the GPU rounds)."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        elif dtype == tl.float32:
            return x
        else:
            return x.to(dtype).to(tl.float32)

    # Kernels resolve called jit functions through the module's globals (compiled or interpreted).
    globals()["_rounded"] = rounded

    @triton.jit
    def norm_modulate_fwd(X, SHIFT, SCALE, H, MEAN, RSTD, GATE, Y, X1, T, D, eps,
                          RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr):
        # H = modulate(LayerNorm(x)); with RESIDUAL, x = X + GATE * Y is formed first and kept in X1.
        row = tl.program_id(0)
        b = row // T
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL:
            gate = tl.load(GATE + b * D + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(Y + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            x = _rounded(x + _rounded(gate * y, Y.dtype.element_ty), X1.dtype.element_ty)
            tl.store(X1 + row * D + cols, x.to(X1.dtype.element_ty), mask=mask)
        mean = tl.sum(x, axis=0) / D
        diff = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / D + eps)
        scale = tl.load(SCALE + b * D + cols, mask=mask, other=0.0)
        one_plus = _rounded(scale.to(tl.float32) + 1.0, SCALE.dtype.element_ty)  # eager rounds 1 + scale
        shift = tl.load(SHIFT + b * D + cols, mask=mask, other=0.0).to(tl.float32)
        h = diff * rstd * one_plus + shift
        tl.store(H + row * D + cols, _rounded(h, H.dtype.element_ty).to(H.dtype.element_ty), mask=mask)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def norm_modulate_bwd(X, SCALE, DH, MEAN, RSTD, DX, DSHIFT, DSCALE, DX1, GATE, Y, DY, DGATE, B, T, D,
                          RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program: ROWS consecutive tokens of one sample; per-sample sums go to partial buffers.
        # With RESIDUAL, X is the saved x1 = x + gate * y and DX1 the gradient reaching x1 directly.
        b = tl.program_id(0)
        chunk = tl.program_id(1)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        scale = tl.load(SCALE + b * D + cols, mask=mask, other=0.0)
        one_plus = _rounded(scale.to(tl.float32) + 1.0, SCALE.dtype.element_ty)
        acc_shift = tl.zeros((BLOCK_D,), dtype=tl.float32)
        acc_scale = tl.zeros((BLOCK_D,), dtype=tl.float32)
        acc_gate = tl.zeros((BLOCK_D,), dtype=tl.float32)
        if RESIDUAL:
            gate = tl.load(GATE + b * D + cols, mask=mask, other=0.0).to(tl.float32)
        for i in range(ROWS):
            row = b * T + chunk * ROWS + i
            x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            dh = tl.load(DH + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (x - tl.load(MEAN + row)) * tl.load(RSTD + row), 0.0)
            acc_shift += dh
            acc_scale += dh * xhat
            g = dh * one_plus
            c1 = tl.sum(g * xhat, axis=0) / D
            c2 = tl.sum(g, axis=0) / D
            dx = (g - c2 - xhat * c1) * tl.load(RSTD + row)
            if RESIDUAL:
                dx += tl.load(DX1 + row * D + cols, mask=mask, other=0.0).to(tl.float32)
                dprod = _rounded(dx, Y.dtype.element_ty)
                y = tl.load(Y + row * D + cols, mask=mask, other=0.0).to(tl.float32)
                acc_gate += _rounded(dprod * y, Y.dtype.element_ty)  # eager rounds each product, then sums
                dy = _rounded(dprod * gate, DY.dtype.element_ty)
                tl.store(DY + row * D + cols, dy.to(DY.dtype.element_ty), mask=mask)
            tl.store(DX + row * D + cols, _rounded(dx, DX.dtype.element_ty).to(DX.dtype.element_ty), mask=mask)
        part = (chunk * B + b) * D + cols
        tl.store(DSHIFT + part, acc_shift, mask=mask)
        tl.store(DSCALE + part, acc_scale, mask=mask)
        if RESIDUAL:
            tl.store(DGATE + part, acc_gate, mask=mask)

    @triton.jit
    def gate_residual_fwd(X, GATE, Y, OUT, T, D, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        b = row // T
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        gate = tl.load(GATE + b * D + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        prod = _rounded(gate * y, Y.dtype.element_ty)  # eager rounds gate * y in its dtype
        x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + row * D + cols, _rounded(x + prod, OUT.dtype.element_ty).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def gate_residual_bwd(GATE, Y, DOUT, DY, DGATE, B, T, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        chunk = tl.program_id(1)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        gate = tl.load(GATE + b * D + cols, mask=mask, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for i in range(ROWS):
            row = b * T + chunk * ROWS + i
            dprod = _rounded(tl.load(DOUT + row * D + cols, mask=mask, other=0.0).to(tl.float32), Y.dtype.element_ty)
            y = tl.load(Y + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            acc += _rounded(dprod * y, Y.dtype.element_ty)  # eager rounds each product, then sums
            dy = _rounded(dprod * gate, DY.dtype.element_ty)
            tl.store(DY + row * D + cols, dy.to(DY.dtype.element_ty), mask=mask)
        tl.store(DGATE + (chunk * B + b) * D + cols, acc, mask=mask)

    return dict(norm_modulate_fwd=norm_modulate_fwd, norm_modulate_bwd=norm_modulate_bwd,
                gate_residual_fwd=gate_residual_fwd, gate_residual_bwd=gate_residual_bwd)


def _launch_shape(x):
    """(B, T, D), the power-of-two row block, rows per backward program (a divisor of T)."""
    batch, tokens, dim = x.shape
    if x.device.type != "cuda" and not triton_interpreting():
        raise RuntimeError(f"fused norm/modulate kernels need CUDA tensors, got {x.device} "
                           "(apply_speed_options(fused_norm_modulate=False) off the GPU)")
    return batch, tokens, dim, max(16, 1 << (dim - 1).bit_length()), math.gcd(tokens, 16)


@torch.library.custom_op("lsep::norm_modulate", mutates_args=())
def _norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                   out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, tokens, dim, block, _ = _launch_shape(x)
    h = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = torch.empty(batch * tokens, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    _kernels()["norm_modulate_fwd"][(batch * tokens,)](x, shift, scale, h, mean, rstd, x, x, x, tokens, dim, eps,
                                                       RESIDUAL=False, BLOCK_D=block)
    return h, mean, rstd


@_norm_modulate.register_fake
def _(x, shift, scale, eps, out_dtype):
    rows = x.shape[0] * x.shape[1]
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(rows, dtype=torch.float32), \
        x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("lsep::residual_norm_modulate", mutates_args=())
def _residual_norm_modulate(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor,
                            scale: torch.Tensor, eps: float, out_dtype: torch.dtype
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, tokens, dim, block, _ = _launch_shape(x)
    x1 = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, y.dtype), device=x.device)
    h = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = torch.empty(batch * tokens, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    _kernels()["norm_modulate_fwd"][(batch * tokens,)](x, shift, scale, h, mean, rstd, gate, y, x1, tokens, dim,
                                                       eps, RESIDUAL=True, BLOCK_D=block)
    return x1, h, mean, rstd


@_residual_norm_modulate.register_fake
def _(x, gate, y, shift, scale, eps, out_dtype):
    rows = x.shape[0] * x.shape[1]
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, y.dtype)), x.new_empty(x.shape, dtype=out_dtype),
            x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32))


@torch.library.custom_op("lsep::norm_modulate_backward", mutates_args=())
def _norm_modulate_backward(x: torch.Tensor, scale: torch.Tensor, dh: torch.Tensor, mean: torch.Tensor,
                            rstd: torch.Tensor, shift_dtype: torch.dtype, dx1: Optional[torch.Tensor],
                            gate: Optional[torch.Tensor], y: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """[dx, dshift, dscale] or, with the residual (dx1, gate, y given), [dx, dshift, dscale, dgate, dy]."""
    batch, tokens, dim, block, rows = _launch_shape(x)
    residual = dx1 is not None
    dx = torch.empty_like(x)
    parts = torch.empty(3 if residual else 2, tokens // rows, batch, dim, dtype=torch.float32, device=x.device)
    dy = torch.empty_like(y) if residual else x
    _kernels()["norm_modulate_bwd"][(batch, tokens // rows)](
        x, scale, dh, mean, rstd, dx, parts[0], parts[1], dx1 if residual else x, gate if residual else x,
        y if residual else x, dy, parts[-1], batch, tokens, dim, RESIDUAL=residual, ROWS=rows, BLOCK_D=block)
    grads = [dx, parts[0].sum(0).to(shift_dtype), parts[1].sum(0).to(scale.dtype)]
    return grads + [parts[2].sum(0).to(gate.dtype), dy] if residual else grads


@_norm_modulate_backward.register_fake
def _(x, scale, dh, mean, rstd, shift_dtype, dx1, gate, y):
    sums = (x.shape[0], x.shape[2])
    grads = [torch.empty_like(x), x.new_empty(sums, dtype=shift_dtype), x.new_empty(sums, dtype=scale.dtype)]
    return grads + [torch.empty_like(gate), torch.empty_like(y)] if dx1 is not None else grads


def _norm_modulate_setup(ctx, inputs, output):
    x, shift, scale, _, _ = inputs
    ctx.save_for_backward(x, scale, output[1], output[2])
    ctx.shift_dtype = shift.dtype


def _norm_modulate_grad(ctx, dh, _mean, _rstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = _norm_modulate_backward(x, scale, dh.contiguous(), mean, rstd, ctx.shift_dtype,
                                                 None, None, None)
    return dx, dshift, dscale, None, None


_norm_modulate.register_autograd(_norm_modulate_grad, setup_context=_norm_modulate_setup)


def _residual_norm_modulate_setup(ctx, inputs, output):
    x, gate, y, shift, scale, _, _ = inputs
    ctx.save_for_backward(output[0], gate, y, scale, output[2], output[3])
    ctx.shift_dtype, ctx.x_dtype = shift.dtype, x.dtype


def _residual_norm_modulate_grad(ctx, dx1, dh, _mean, _rstd):
    x1, gate, y, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale, dgate, dy = _norm_modulate_backward(x1, scale, dh.contiguous(), mean, rstd, ctx.shift_dtype,
                                                            dx1.contiguous(), gate, y)
    return dx.to(ctx.x_dtype), dgate, dy, dshift, dscale, None, None


_residual_norm_modulate.register_autograd(_residual_norm_modulate_grad, setup_context=_residual_norm_modulate_setup)


@torch.library.custom_op("lsep::gate_residual", mutates_args=())
def _gate_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    batch, tokens, dim, block, _ = _launch_shape(x)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, y.dtype), device=x.device)
    _kernels()["gate_residual_fwd"][(batch * tokens,)](x, gate, y, out, tokens, dim, BLOCK_D=block)
    return out


@_gate_residual.register_fake
def _(x, gate, y):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, y.dtype))


@torch.library.custom_op("lsep::gate_residual_backward", mutates_args=())
def _gate_residual_backward(gate: torch.Tensor, y: torch.Tensor,
                            dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, tokens, dim, block, rows = _launch_shape(y)
    dy = torch.empty_like(y)
    part = torch.empty(tokens // rows, batch, dim, dtype=torch.float32, device=y.device)
    _kernels()["gate_residual_bwd"][(batch, tokens // rows)](gate, y, dout, dy, part, batch, tokens, dim,
                                                             ROWS=rows, BLOCK_D=block)
    return dy, part.sum(0).to(gate.dtype)


@_gate_residual_backward.register_fake
def _(gate, y, dout):
    return torch.empty_like(y), torch.empty_like(gate)


def _gate_residual_setup(ctx, inputs, output):
    x, gate, y = inputs
    ctx.save_for_backward(gate, y)
    ctx.x_dtype = x.dtype


def _gate_residual_grad(ctx, dout):
    gate, y = ctx.saved_tensors
    dy, dgate = _gate_residual_backward(gate, y, dout.contiguous())
    return dout.to(ctx.x_dtype), dgate, dy


_gate_residual.register_autograd(_gate_residual_grad, setup_context=_gate_residual_setup)


def _out_dtype(x_dtype, device_type, shift, scale):
    """The eager result's dtype: LayerNorm runs in float32 under autocast, then modulate promotes."""
    norm_dtype = torch.float32 if torch.is_autocast_enabled(device_type) else x_dtype
    return torch.promote_types(norm_dtype, torch.promote_types(shift.dtype, scale.dtype))


def _common(gate, y):
    """Eager promotes gate * y first; cast both so the kernels round that product once."""
    common = torch.promote_types(gate.dtype, y.dtype)
    return gate.to(common).contiguous(), y.to(common).contiguous()


def norm_modulate(x, shift, scale, eps=1e-6):
    """``modulate(LayerNorm(x), shift, scale)`` (no affine) in one kernel; x (B, T, D), shift/scale (B, D)."""
    out_dtype = _out_dtype(x.dtype, x.device.type, shift, scale)
    with torch.autocast(x.device.type, enabled=False):
        return _norm_modulate(x.contiguous(), shift.contiguous(), scale.contiguous(), eps, out_dtype)[0]


def residual_norm_modulate(x, gate, y, shift, scale, eps=1e-6):
    """``x1 = x + gate.unsqueeze(1) * y`` and ``modulate(LayerNorm(x1), shift, scale)`` in one kernel;
    returns ``(x1, modulated)``."""
    out_dtype = _out_dtype(torch.promote_types(x.dtype, y.dtype), x.device.type, shift, scale)
    gate, y = _common(gate, y)
    with torch.autocast(x.device.type, enabled=False):
        x1, h, _, _ = _residual_norm_modulate(x.contiguous(), gate, y, shift.contiguous(), scale.contiguous(), eps,
                                              out_dtype)
    return x1, h


def gate_residual(x, gate, y):
    """``x + gate.unsqueeze(1) * y`` in one kernel; x, y (B, T, D), gate (B, D)."""
    gate, y = _common(gate, y)
    return _gate_residual(x.contiguous(), gate, y)


class FusedNormSiTBlock(SiTBlock):
    """``SiTBlock`` whose norms, modulates and gated residuals run as three Triton kernels (same modules):
    norm1 + modulate; attention residual + norm2 + modulate; MLP residual."""

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        attn = self.attn(norm_modulate(x, shift_msa, scale_msa, self.norm1.eps))
        x, h = residual_norm_modulate(x, gate_msa, attn, shift_mlp, scale_mlp, self.norm2.eps)
        return gate_residual(x, gate_mlp, self.mlp(h))


#################################################################################
#                                FP8 matmuls                                    #
#################################################################################

def fp8_layer_filter(module, fqn):
    """torchao ``module_filter_fn``: the four matmuls inside each transformer block."""
    return isinstance(module, nn.Linear) and fqn.startswith("blocks.") and fqn.endswith(FP8_LAYERS)


def check_fp8_device(device):
    """One-line refusal unless ``device`` is a CUDA GPU with FP8 tensor cores (sm89+)."""
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        where = device if device.type != "cuda" else torch.cuda.get_device_name(device)
        raise ValueError(f"fp8 matmuls need an NVIDIA GPU with compute capability >= 8.9 (H100, L40, RTX 40xx); "
                         f"the model is on {where}: leave --fp8 off")


def convert_to_fp8(model):
    """Swap the block matmuls for torchao ``Float8Linear`` (same Parameters and keys), no device check."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise ImportError("fp8 training needs torchao: pip install torchao (tested with 0.18.0)") from None
    return convert_to_float8_training(model, module_filter_fn=fp8_layer_filter)


#################################################################################
#                      Gradient clipping inside fused AdamW                     #
#################################################################################

def clip_grad_norm_into_fused_adamw_(optimizer, params, max_norm):
    """``clip_grad_norm_(params, max_norm)`` done by the next ``optimizer.step()``; returns the norm.

    Computes the total norm only and hands ``max(norm / max_norm, 1)`` to the fused AdamW kernel
    as its ``grad_scale`` (the GradScaler input it divides gradients by as it reads them), so the
    gradients are not rewritten in a pass of their own. Equal to clipping then stepping up to
    float32 rounding (g / (1 / c) instead of g * c). Call right before every ``step()``; not with
    a GradScaler (fp16), which owns ``grad_scale``.
    """
    if not optimizer.defaults.get("fused"):
        raise ValueError("clipping inside AdamW needs torch.optim.AdamW(..., fused=True)")
    total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    optimizer.grad_scale = torch.clamp((total + 1e-6) / max_norm, min=1.0)  # clip_grad_norm_'s 1e-6
    return total


#################################################################################
#                          Persistent compile cache                             #
#################################################################################

def persistent_compile_cache(path):
    """Keep inductor's FX-graph, AOT-autograd and autotuning caches and Triton's kernels in ``path``.

    Call before the first ``torch.compile``: a later process with the same code, shapes and torch
    reuses the compiled graphs and max-autotune's choices instead of re-benchmarking them.
    """
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    os.environ["TRITON_CACHE_DIR"] = os.path.join(path, "triton")
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    from torch._inductor import config

    config.fx_graph_cache = True
    config.autotune_local_cache = True
    if hasattr(config, "autograd_cache"):
        config.autograd_cache = True
    if hasattr(torch._functorch.config, "enable_autograd_cache"):
        torch._functorch.config.enable_autograd_cache = True
    return path
