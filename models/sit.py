"""SiT (Scalable Interpolant Transformer) with the LSEP linear-probe head.

The model and its probe branch are described in docs/method.md ("Model", "Probe branch").
The state-dict keys equal the authors' (``JN-Yun/LSEP`` ``models/sit_LSEP.py``), so their checkpoints load unchanged and ours load
in their code. Differences from theirs, all numerically neutral:

* the probe branch and the main branch run through blocks ``1..encoder_depth`` as one batch
  of 2B instead of two passes;
* crop-and-pool is vectorised (a window mask and one batched matmul) instead of a Python loop;
* the final layer is sized by ``hidden_size`` for every config (their SiT-S crashes);
* randomness (label dropout, crop window) is drawn in ``forward`` and the computation lives in
  ``forward_conditioned``, so tests and ``torch.compile`` can drive the deterministic part.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed

from models.config import PATCH_SIZES, SIT_SIZES, config_from_sit_kwargs
from models.repa import build_projectors, project_tokens


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Embeds scalar times t in [0, 1] with sinusoidal frequencies, then an MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """(N,) times -> (N, dim) [cos | sin] features, GLIDE convention."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size).to(t.dtype)
        return self.mlp(t_freq)


class LabelEmbedder(nn.Module):
    """Class-label table; row ``num_classes`` is the null label used for CFG and the probe."""

    def __init__(self, num_classes, hidden_size, with_null_row):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(with_null_row), hidden_size)
        self.num_classes = num_classes

    def drop(self, labels, prob):
        """Replace each label by the null label with probability ``prob``."""
        if prob <= 0:
            return labels
        drop_ids = torch.rand(labels.shape[0], device=labels.device) < prob
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels):
        return self.embedding_table(labels)


#################################################################################
#                                 Core SiT Model                                #
#################################################################################

class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False, fused_attn=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        # timm >= 1.0 needs the qk-norm layer named; LayerNorm is what older timm defaulted to.
        self.attn = Attention(
            hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm,
            norm_layer=nn.LayerNorm if qk_norm else None,
        )
        self.attn.fused_attn = fused_attn
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(
            in_features=hidden_size,
            hidden_features=int(hidden_size * mlp_ratio),
            act_layer=lambda: nn.GELU(approximate="tanh"),
            drop=0,
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN modulation and a linear map from tokens to patches."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


#################################################################################
#                        Probe crop window and pooling                          #
#################################################################################

def pool_tokens(tokens, window=None):
    """Mean-pool (B, T, D) tokens in float32, over all tokens or a square window per sample.

    ``window`` is ``(size, top, left)``: three (B,) integer tensors on the tokens' device, the
    side and the top-left corner of each sample's window on the sqrt(T) x sqrt(T) grid. The
    window average is one batched matmul with a 0/1 mask, so no Python loop over the batch.
    """
    tokens = tokens.float()
    if window is None:
        return tokens.mean(dim=1)
    size, top, left = window
    batch, num_tokens, _ = tokens.shape
    grid = math.isqrt(num_tokens)
    pos = torch.arange(grid, device=tokens.device)
    rows = (pos[None] >= top[:, None]) & (pos[None] < (top + size)[:, None])
    cols = (pos[None] >= left[:, None]) & (pos[None] < (left + size)[:, None])
    mask = (rows[:, :, None] & cols[:, None, :]).reshape(batch, 1, num_tokens).float()
    with torch.autocast(tokens.device.type, enabled=False):  # average in float32 under mixed precision
        pooled = torch.bmm(mask, tokens).squeeze(1)
    return pooled / (size * size).float()[:, None]


#################################################################################
#                                     SiT                                       #
#################################################################################

class SiT(nn.Module):
    """SiT backbone plus ``classifier``, the LSEP probe at depth ``encoder_depth``, and, with REPA
    alignment (``config.enc_type``), ``projectors`` reading the tokens after block ``align_depth``.

    ``model(x, t, y)`` returns ``(velocity, probe_logits)``; ``probe_logits`` is None in eval
    mode and for the baseline (``probe=False``: plain SiT training, same keys). A training-mode
    model with projectors returns ``(velocity, probe_logits, projected)``: one (N, T, z_dim)
    tensor per encoder (``models/repa.py``).
    """

    def __init__(self, config=None, fused_attn=True, **kwargs):
        """``SiT(config)`` with a ``models.config.ModelConfig``, or the authors' keyword arguments
        (``input_size``, ``patch_size``, ..., ``random_crop_kwargs``), which become one.
        ``fused_attn`` is a runtime choice (SDPA or manual attention), not part of the config."""
        super().__init__()
        if config is None:
            config = config_from_sit_kwargs(kwargs)
        elif kwargs:
            raise TypeError(f"SiT(config) takes no other model arguments, got {sorted(kwargs)}")
        self.config = config
        hidden_size = config.hidden_size
        self.in_channels = self.out_channels = config.in_channels
        self.input_size, self.patch_size, self.grid_size = config.input_size, config.patch_size, config.grid_size
        self.num_heads, self.num_classes = config.num_heads, config.num_classes
        self.encoder_depth, self.uncond_prob = config.encoder_depth, config.uncond_prob
        self.class_dropout_prob = config.class_dropout_prob
        self.probe = config.probe  # False: the SiT baseline (no probe branch; classifier kept for the keys)
        self.crop_start, self.crop_end = config.crop_start, config.crop_end
        self.grad_checkpoint = False  # a runtime switch (train.py --grad-checkpoint), not part of the config

        self.x_embedder = PatchEmbed(config.input_size, config.patch_size, config.in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(config.num_classes, hidden_size, config.has_null_label)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos embedding; a parameter (not a buffer) only to keep the authors' keys.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([
            SiTBlock(hidden_size, config.num_heads, mlp_ratio=config.mlp_ratio, qk_norm=config.qk_norm,
                     fused_attn=fused_attn)
            for _ in range(config.depth)
        ])
        self.final_layer = FinalLayer(hidden_size, config.patch_size, self.out_channels)
        self.classifier = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, config.num_classes))
        self.initialize_weights()
        # REPA's projectors (its keys projectors.N.*), built after the backbone so that a model
        # without them draws the same initial weights as before they existed
        self.align_depth = config.align_depth
        self.projectors = build_projectors(hidden_size, config.z_dims, config.projector_dim) if config.aligned else None
        if not config.probe:  # the baseline never uses the classifier, and DDP refuses parameters without gradients
            self.classifier.requires_grad_(False)

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # Patch embedding initialised like a Linear layer.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p, h = self.out_channels, self.patch_size, self.grid_size
        x = x.reshape(x.shape[0], h, h, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def sample_crop_window(self, batch_size, device):
        """One window side per step in [crop_start, crop_end), a random corner per sample."""
        if self.crop_start is None:
            return None
        size = torch.randint(self.crop_start, self.crop_end, (1,), device=device).expand(batch_size)
        # Corners uniform in [0, grid - size]: floor(u * (grid - size + 1)), no host sync; the
        # clamp guards float rounding of u * span up to span.
        max_corner = self.grid_size - size
        span = (max_corner + 1).float()
        top = torch.minimum((torch.rand(batch_size, device=device) * span).long(), max_corner)
        left = torch.minimum((torch.rand(batch_size, device=device) * span).long(), max_corner)
        return size, top, left

    def forward(self, x, t, y):
        """x: (N, C, H, W) inputs, t: (N,) times in [0, 1], y: (N,) class labels."""
        if not self.training:
            return self.forward_conditioned(x, t, y)
        align = self.projectors is not None
        y_main = self.y_embedder.drop(y, self.class_dropout_prob)
        if not self.probe:
            return self.forward_conditioned(x, t, y_main, align=align)
        y_probe = self.y_embedder.drop(y, self.uncond_prob)
        window = self.sample_crop_window(x.shape[0], x.device)
        return self.forward_conditioned(x, t, y_main, y_probe, window, align=align)

    def forward_conditioned(self, x, t, y, y_probe=None, window=None, align=False):
        """Deterministic forward with labels already dropped.

        ``y_probe`` (labels for the probe branch) switches the probe branch on: it runs with
        the main branch as one batch of 2B through blocks 1..encoder_depth, then its tokens
        are pooled over ``window`` and classified. ``align`` (REPA) also returns the main
        branch's tokens after block ``align_depth`` through the projectors (never the probe's).
        """
        x = self.x_embedder(x) + self.pos_embed
        t_emb = self.t_embedder(t)
        c = t_emb + self.y_embedder(y)
        probe_logits = aligned = None
        tap = self.align_depth if align else None
        if y_probe is None:
            for i, block in enumerate(self.blocks, 1):
                x = self.run_block(block, x, c)
                aligned = x if i == tap else aligned
        else:
            batch = x.shape[0]
            c_both = torch.cat([c, t_emb + self.y_embedder(y_probe)])
            x = torch.cat([x, x])
            for i, block in enumerate(self.blocks[: self.encoder_depth], 1):
                x = self.run_block(block, x, c_both)
                aligned = x[:batch] if i == tap else aligned
            x, probe_tokens = x[:batch], x[batch:]
            probe_logits = self.classifier(pool_tokens(probe_tokens, window))
            for i, block in enumerate(self.blocks[self.encoder_depth:], self.encoder_depth + 1):
                x = self.run_block(block, x, c)
                aligned = x if i == tap else aligned
        x = self.unpatchify(self.final_layer(x, c))
        if align:
            return x, probe_logits, project_tokens(self.projectors, aligned)
        return x, probe_logits

    def run_block(self, block, x, c):
        """One block; with ``grad_checkpoint`` (--grad-checkpoint) its activations are recomputed in
        the backward pass instead of stored (the probe branch's blocks too: they run in the 2B batch)."""
        if self.grad_checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)
        return block(x, c)

    @torch.no_grad()
    def pooled_block_features(self, x, t, y):
        """Mean-pooled float32 tokens after every block, a list of ``depth`` (N, D) tensors."""
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        features = []
        for block in self.blocks:
            x = block(x, c)
            features.append(pool_tokens(x))
        return features


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(grid_size**2, embed_dim) MAE-style 2-D sin-cos embedding: first half encodes the column
    index, second half the row index (token k sits at row k // grid_size, column k % grid_size)."""
    cols, rows = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    return np.concatenate([
        get_1d_sincos_pos_embed_from_grid(embed_dim // 2, cols),
        get_1d_sincos_pos_embed_from_grid(embed_dim // 2, rows),
    ], axis=1)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """(M,) positions -> (M, embed_dim) [sin | cos] features."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                                   SiT Configs                                 #
#################################################################################

def _make_config(size, patch_size):
    depth, hidden_size, num_heads = SIT_SIZES[size]

    def build(**kwargs):
        return SiT(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size, **kwargs)

    build.__name__ = f"SiT_{size}_{patch_size}"
    build.__doc__ = f"SiT-{size}/{patch_size}: depth {depth}, width {hidden_size}, {num_heads} heads."
    return build


# The authors' constructor table; sizes come from models.config.SIT_SIZES.
SiT_models = {f"SiT-{size}/{p}": _make_config(size, p) for size in SIT_SIZES for p in PATCH_SIZES}
