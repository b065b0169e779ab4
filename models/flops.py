"""Analytic FLOPs of a SiT + LSEP training step, and model FLOPs utilisation (MFU).

Convention (PaLM / nanoGPT "model FLOPs"): a matmul of (m, k) by (k, n) costs 2 m n k; only
matmuls are counted (patch-embedding conv, linears, attention scores and values); norms,
activations, softmax, adds, the embedding lookup and mean pooling are not. A training step costs
3x the forward (backward = 2x forward: input and weight gradients); activation recomputation
(flash-attention backward, checkpointing) is not model work and is not counted, so MFU is the
same for every implementation of the same math.

The probe branch (docs/method.md, "Probe branch") adds, per sample, one more pass through blocks
1..encoder_depth (adaLN included) and the classifier; the timestep embedding is shared.

For SiT-XL/2 at 256 px (32x32x4 latent) the forward is 237.3 GFLOPs without the probe, i.e.
118.6 G multiply-adds: the 118.6 "Gflops" of the DiT/SiT papers count multiply-adds.
"""
import math
from dataclasses import dataclass, fields

from models.sit import SIT_SIZES

# Dense (no 2:4 sparsity) tensor-core peaks in FLOP/s, from NVIDIA's datasheets: they quote the
# sparse figure, dense is half. H200 has the H100 SXM's GH100 compute (only memory differs), so the
# same 989 TFLOP/s bf16. "tf32" is the fp32-matmul peak with TF32 allowed, "fp32" the non-tensor one.
# Matched against torch.cuda.get_device_name() in order (first substring match wins).
PEAK_FLOPS = (
    ("H200", {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),  # SXM5
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
)


_XL = SIT_SIZES["XL"]


@dataclass(frozen=True)
class SiTFlopsConfig:
    """The sizes that determine a SiT's FLOPs (default SiT-XL/2 at 256 px)."""
    depth: int = _XL[0]
    hidden_size: int = _XL[1]
    num_heads: int = _XL[2]
    patch_size: int = 2
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    mlp_ratio: float = 4.0
    encoder_depth: int = 8
    frequency_embedding_size: int = 256

    @classmethod
    def from_name(cls, name, resolution=256, **overrides):
        """'SiT-XL/2' at ``resolution`` pixels (latent = resolution / 8)."""
        size, patch = name[len("SiT-"):].split("/")
        depth, hidden, heads = SIT_SIZES[size]
        kw = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch),
                  input_size=resolution // 8)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_model(cls, model):
        """Read the sizes off a built ``models.SiT``."""
        block = model.blocks[0]
        return cls(
            depth=len(model.blocks), hidden_size=model.pos_embed.shape[-1], num_heads=model.num_heads,
            patch_size=model.patch_size, input_size=model.input_size, in_channels=model.in_channels,
            num_classes=model.num_classes, mlp_ratio=block.mlp.fc1.out_features / block.mlp.fc1.in_features,
            encoder_depth=model.encoder_depth,
            frequency_embedding_size=model.t_embedder.frequency_embedding_size,
        )


def _as_config(cfg):
    if isinstance(cfg, SiTFlopsConfig):
        return cfg
    if isinstance(cfg, str):
        return SiTFlopsConfig.from_name(cfg)
    if isinstance(cfg, dict):
        names = {f.name for f in fields(SiTFlopsConfig)}
        return SiTFlopsConfig(**{k: v for k, v in cfg.items() if k in names})
    return SiTFlopsConfig.from_model(cfg)


def block_flops(cfg, tokens):
    """One block on one sample: {adaln, qkv, attention (scores + values), proj, mlp}."""
    d, mlp = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
    return {
        "adaln": 2 * d * 6 * d,
        "qkv": 2 * tokens * d * 3 * d,
        "attention": 2 * 2 * tokens * tokens * d,  # q k^T and attn v, summed over heads
        "proj": 2 * tokens * d * d,
        "mlp": 2 * 2 * tokens * d * mlp,
    }


def sit_forward_flops_breakdown(cfg, batch=1, probe=True):
    """Forward matmul FLOPs by part for ``batch`` samples; ``probe`` adds the LSEP branch."""
    cfg = _as_config(cfg)
    d, p, c = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    tokens = (cfg.input_size // p) ** 2
    per_block = sum(block_flops(cfg, tokens).values())
    parts = {
        "patch_embed": 2 * tokens * (c * p * p) * d,
        "t_embed": 2 * cfg.frequency_embedding_size * d + 2 * d * d,
        "blocks": cfg.depth * per_block,
        "final_layer": 2 * d * 2 * d + 2 * tokens * d * (p * p * c),
        "probe_blocks": cfg.encoder_depth * per_block if probe else 0,
        "probe_classifier": 2 * d * cfg.num_classes if probe else 0,
    }
    return {k: batch * v for k, v in parts.items()}


def sit_forward_flops(cfg, batch=1, probe=True):
    """Forward matmul FLOPs of ``batch`` samples (training mode with the probe if ``probe``)."""
    return sum(sit_forward_flops_breakdown(cfg, batch, probe).values())


def train_step_flops(cfg, batch=1, probe=True):
    """Forward + backward model FLOPs of one training step: 3x the forward."""
    return 3 * sit_forward_flops(cfg, batch, probe)


def peak_flops(device_name, precision="bf16", tf32=True):
    """Dense peak FLOP/s of a CUDA device for ``precision`` (bf16|fp16|fp32), or None if unknown.

    fp32 uses the TF32 tensor-core peak when ``tf32`` (``--allow-tf32``), else the fp32 peak.
    """
    key = "tf32" if precision == "fp32" and tf32 else precision
    for pattern, peaks in PEAK_FLOPS:
        if pattern.lower() in (device_name or "").lower():
            return peaks[key]
    return None


def mfu(flops_per_step, step_time_s, peak_flops):
    """Model FLOPs utilisation: achieved FLOP/s over the device's peak (None if no peak)."""
    if not peak_flops or step_time_s <= 0 or not math.isfinite(step_time_s):
        return None
    return flops_per_step / step_time_s / peak_flops


def vit_forward_flops(embed_dim, depth, patch_size, grid, prefix_tokens=1, mlp_in=None, mlp_out=None,
                      in_chans=3):
    """Forward matmul FLOPs of one image through a plain ViT (patch embedding + blocks, no head).

    ``grid`` is the patch grid side; the sequence also holds ``prefix_tokens`` (class/registers).
    ``mlp_in`` / ``mlp_out``: fc1 output and fc2 input widths (4 x embed_dim; SwiGLU differs).
    """
    d = embed_dim
    mlp_in, mlp_out = mlp_in or 4 * d, mlp_out or 4 * d
    tokens = grid * grid + prefix_tokens
    per_block = (2 * tokens * d * 3 * d + 2 * 2 * tokens * tokens * d + 2 * tokens * d * d
                 + 2 * tokens * d * mlp_in + 2 * tokens * mlp_out * d)
    return 2 * grid * grid * in_chans * patch_size * patch_size * d + depth * per_block


def encoder_forward_flops(enc_type, resolution=256, batch=1, arch=None):
    """Forward FLOPs of the frozen REPA encoder(s) for ``batch`` images of side ``resolution``.

    ``enc_type``: a ``--enc-type`` string (comma list) or list of names; ``arch``: the parsed
    ``--enc-arch``. Frozen and under no_grad, the encoders run forward only, so a training step
    costs 1x this (not 3x).
    """
    from models.encoders import encoder_grid, encoder_spec, parse_enc_type

    names = [n for n, _ in parse_enc_type(enc_type)] if isinstance(enc_type, str) else list(enc_type)
    total = 0
    for name in names:
        s = encoder_spec(name, arch)
        total += vit_forward_flops(s.embed_dim, s.depth, s.patch_size, encoder_grid(s, resolution),
                                   s.prefix_tokens, s.mlp_in, s.mlp_out)
    return batch * total


def projector_forward_flops(hidden_size, z_dims, tokens, projector_dim=2048, batch=1):
    """Forward FLOPs of REPA's projector MLPs (one per encoder width in ``z_dims``) on ``tokens`` tokens."""
    p = projector_dim
    return batch * sum(2 * tokens * (hidden_size * p + p * p + p * z) for z in z_dims)


def repa_train_step_flops(cfg, enc_type, resolution=256, batch=1, projector_dim=2048, arch=None):
    """FLOPs REPA adds to ``train_step_flops``: encoders forward (1x) + projectors (3x, trained).

    The SiT's backward through blocks 1..align_depth is already in its 3x forward count.
    """
    from models.encoders import encoder_spec, parse_enc_type

    cfg = _as_config(cfg)
    names = [n for n, _ in parse_enc_type(enc_type)] if isinstance(enc_type, str) else list(enc_type)
    tokens = (cfg.input_size // cfg.patch_size) ** 2
    z_dims = [encoder_spec(n, arch).z_dim for n in names]
    return (encoder_forward_flops(names, resolution, batch, arch)
            + 3 * projector_forward_flops(cfg.hidden_size, z_dims, tokens, projector_dim, batch))


if __name__ == "__main__":
    for name in ("SiT-B/2", "SiT-L/2", "SiT-XL/2"):
        cfg = SiTFlopsConfig.from_name(name)
        fwd, fwd_probe = sit_forward_flops(cfg, probe=False), sit_forward_flops(cfg)
        print(f"{name} 256px: forward {fwd / 1e9:.1f} GFLOPs ({fwd / 2e9:.1f} G MACs), with probe "
              f"{fwd_probe / 1e9:.1f}, train step {train_step_flops(cfg) / 1e9:.1f} GFLOPs per sample")
