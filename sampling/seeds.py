"""Seeds, labels and noise of every sample index: the same sample set whatever the number of
processes, the batch size or how often the run restarts."""
import torch

from sampling.errors import GenerateError
from seeding import derive_seed


def sample_seed(global_seed, index):
    """63-bit seed of sample ``index``: a hash of (global_seed, index), so no two indices or
    seeds share a stream and none collides with the label generator's seed."""
    return derive_seed("lsep-sample", global_seed, index)


def sample_labels(num_samples, num_classes, global_seed, balanced=False):
    """(N,) int64 labels on CPU for all indices at once, from a generator seeded by global_seed.

    Uniform at random (the authors' choice) or balanced: each class exactly N / num_classes
    times, in a fixed random order.
    """
    gen = torch.Generator().manual_seed(global_seed)
    if not balanced:
        return torch.randint(0, num_classes, (num_samples,), generator=gen)
    if num_samples % num_classes:
        raise GenerateError(f"--balanced-labels needs --num-fid-samples ({num_samples}) divisible by "
                            f"the number of classes ({num_classes})")
    classes = torch.arange(num_classes).repeat_interleave(num_samples // num_classes)
    return classes[torch.randperm(num_samples, generator=gen)]


def sample_noise(indices, shape, num_sde_steps, global_seed, device):
    """Initial noise (B, *shape) and SDE noise (num_sde_steps, B, *shape) or None, float32.

    Each sample draws its start, then its SDE noise, from its own generator on ``device``. The
    SDE noise is held for the whole batch: (num_steps - 1) x C x h x w x 4 bytes per sample,
    249 x 4 x 32 x 32 x 4 B ~ 4 MB at 256 px with 250 steps (130 MB for a batch of 32).
    """
    starts, steps = [], []
    for index in indices:
        gen = torch.Generator(device=device).manual_seed(sample_seed(global_seed, index))
        starts.append(torch.randn(shape, generator=gen, device=device))
        if num_sde_steps:
            steps.append(torch.randn((num_sde_steps, *shape), generator=gen, device=device))
    return torch.stack(starts), (torch.stack(steps, dim=1) if steps else None)
