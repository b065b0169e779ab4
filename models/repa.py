"""REPA: projector MLPs and the token-alignment loss (Yu et al., "Representation Alignment for
Generation", arXiv 2410.06940), as ``sihyun-yu/REPA`` computes them.

* Projectors: one MLP per encoder, ``Linear(hidden, P) - SiLU - Linear(P, P) - SiLU -
  Linear(P, z_dim)`` with P = ``projector_dim`` (2048), held in an ``nn.ModuleList`` that the
  SiT stores as ``projectors``, so the state-dict keys are REPA's ``projectors.N.{0,2,4}.*`` and
  checkpoints move between the two codebases with their projectors. Init as REPA's: its SiT
  applies xavier-uniform weights and zero biases to every ``nn.Linear``, projectors included.
* Loss: for each encoder and sample, the negative cosine similarity between each projected SiT
  token (taken after block ``--align-depth`` of the main branch) and the encoder's token at the
  same grid position, averaged over tokens; then averaged over samples AND over encoders (REPA
  sums both and divides by ``num_encoders * batch``), and multiplied by ``--proj-coeff`` in the
  training loop. Here it is always evaluated in float32 with autocast off: REPA normalised half
  precision tensors, the cause of its fp16 NaNs late in training.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.config import DEFAULT_PROJECTOR_DIM  # noqa: F401  (one source; re-exported)


def build_projectors(hidden_size, z_dims, projector_dim=DEFAULT_PROJECTOR_DIM):
    """``nn.ModuleList`` of one MLP per encoder feature width in ``z_dims`` (REPA's layout and init)."""
    projectors = nn.ModuleList([
        nn.Sequential(
            nn.Linear(hidden_size, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, z_dim),
        )
        for z_dim in z_dims
    ])
    for module in projectors.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    return projectors


def project_tokens(projectors, tokens):
    """SiT tokens (B, T, hidden) at the alignment depth -> one (B, T, z_dim) tensor per encoder."""
    return [projector(tokens) for projector in projectors]


def per_sample_alignment(projected, targets):
    """(B,) float32: -cos(projected token, encoder token), mean over tokens, then over encoders.

    ``projected``, ``targets``: equal-length lists of (B, T, z_dim) tensors (any dtype);
    ``targets`` are the frozen encoder's tokens and get no gradient from here.
    """
    if len(projected) != len(targets) or not targets:
        raise ValueError(f"{len(projected)} projector outputs for {len(targets)} encoders; the model's "
                         "projectors (z_dims) must match --enc-type")
    total = None
    with torch.autocast(targets[0].device.type, enabled=False):
        for z_tilde, z in zip(projected, targets):
            if z_tilde.shape != z.shape:
                raise ValueError(f"projected SiT tokens {tuple(z_tilde.shape)} do not match the encoder's tokens "
                                 f"{tuple(z.shape)}; check --enc-type, --resolution and --model (see check_token_grid)")
            z_tilde = F.normalize(z_tilde.float(), dim=-1)
            z = F.normalize(z.detach().float(), dim=-1)
            term = -(z_tilde * z).sum(dim=-1).mean(dim=1)
            total = term if total is None else total + term
    return total / len(targets)


def alignment_loss(projected, targets, proj_coeff=0.5):
    """REPA's projection loss times ``proj_coeff``: a float32 scalar to add to the denoising loss."""
    return proj_coeff * per_sample_alignment(projected, targets).mean()
