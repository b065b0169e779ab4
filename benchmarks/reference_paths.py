"""The slow reference training path: our model's math, run the way the authors' training runs it.

``JN-Yun/LSEP`` ``train.py`` with its defaults (and ``main_LSEP.sh``): the probe branch as a
second pass through blocks 1..encoder_depth, the crop by a Python loop over the batch, fused
(SDPA) attention (``--fused-attn`` defaults to True), fp16 autocast with a GradScaler
(``--mixed-precision fp16`` through accelerate) and TF32, torch's default AdamW and a
per-parameter EMA update. ``AUTHORS_TRAINING`` lists these settings for
``benchmarks/bench_train.py``. Only their ``generate.py`` defaults to manual attention (fp32 with
TF32): that is the sampling reference of ``benchmarks/bench_sampling.py``, and
``attention="manual"`` here reproduces it for training comparisons made before 2026-11-23.

This module does the computation with a ``models.SiT``'s own weights, so benchmarks compare
implementations of one computation (tests/test_perf_paths.py checks outputs and gradients are
equal). Nothing here is used for training.
"""
import contextlib
import math

import torch

# The authors' train.py defaults, as bench_train.Variant fields (their main and probe passes
# alternate block by block; ours runs the main pass first: the same work).
AUTHORS_TRAINING = dict(probe="two-pass", crop="loop", attention="sdpa", precision="fp16",
                        optimizer="default", ema="loop")


@contextlib.contextmanager
def attention_kind(model, fused):
    """Temporarily set every block's ``attn.fused_attn`` (SDPA if True, manual softmax if False)."""
    before = [block.attn.fused_attn for block in model.blocks]
    for block in model.blocks:
        block.attn.fused_attn = fused
    try:
        yield model
    finally:
        for block, flag in zip(model.blocks, before):
            block.attn.fused_attn = flag


def loop_pool_tokens(tokens, window=None):
    """Mean-pool (B, T, D) tokens in float32 with a Python loop over the batch (authors' crop)."""
    if window is None:
        return tokens.float().mean(dim=1)
    batch, num_tokens, dim = tokens.shape
    grid = math.isqrt(num_tokens)
    grid_tokens = tokens.reshape(batch, grid, grid, dim)
    size, top, left = (w.tolist() for w in window)  # a host sync on CUDA, as in their loop
    pooled = [
        grid_tokens[i, top[i]:top[i] + size[i], left[i]:left[i] + size[i]].reshape(-1, dim).float().mean(dim=0)
        for i in range(batch)
    ]
    return torch.stack(pooled)


def reference_forward_conditioned(model, x, t, y, y_probe=None, window=None, attention="sdpa", crop="loop"):
    """Same inputs and outputs as ``SiT.forward_conditioned``, computed in two passes.

    The main branch runs through all blocks, then the probe branch runs again through blocks
    1..encoder_depth with ``c_probe``; its tokens are pooled (``crop="loop"``: per-sample loop,
    ``"vectorised"``: the model's ``pool_tokens``) and classified. ``attention`` is ``"sdpa"``
    (the authors' training default) or ``"manual"`` (their generate.py default); the model's own
    setting is restored afterwards.
    """
    from models.sit import pool_tokens

    if attention not in ("manual", "sdpa") or crop not in ("loop", "vectorised"):
        raise ValueError(f"attention={attention!r} must be manual|sdpa, crop={crop!r} loop|vectorised")
    pool = loop_pool_tokens if crop == "loop" else pool_tokens
    with attention_kind(model, fused=attention == "sdpa"):
        tokens = model.x_embedder(x) + model.pos_embed
        t_emb = model.t_embedder(t)
        c = t_emb + model.y_embedder(y)
        h = tokens
        for block in model.blocks:
            h = block(h, c)
        velocity = model.unpatchify(model.final_layer(h, c))
        if y_probe is None:
            return velocity, None
        c_probe = t_emb + model.y_embedder(y_probe)
        h_probe = tokens
        for block in model.blocks[: model.encoder_depth]:
            h_probe = block(h_probe, c_probe)
        return velocity, model.classifier(pool(h_probe, window))


class ReferenceForward:
    """Callable like ``model(x, t, y)``, running ``reference_forward_conditioned``.

    In training mode it draws the CFG label dropout, the probe label dropout and the crop window
    with the model's own methods in the model's order, so under one seed both paths see the same
    labels and windows. Pass it to ``LSEPLoss`` in place of the model.
    """

    def __init__(self, model, attention="sdpa", crop="loop"):
        self.model, self.attention, self.crop = model, attention, crop

    def __call__(self, x, t, y):
        model = self.model
        if not model.training:
            return reference_forward_conditioned(model, x, t, y, attention=self.attention, crop=self.crop)
        y_main = model.y_embedder.drop(y, model.class_dropout_prob)
        y_probe = model.y_embedder.drop(y, model.uncond_prob)
        window = model.sample_crop_window(x.shape[0], x.device)
        return reference_forward_conditioned(model, x, t, y_main, y_probe, window, self.attention, self.crop)


@torch.no_grad()
def loop_ema_update(ema_params, params, decay):
    """The authors' EMA: one mul_ and one add_ per parameter tensor."""
    for ema_p, p in zip(ema_params, params):
        ema_p.mul_(decay).add_(p.detach(), alpha=1 - decay)
