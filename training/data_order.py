"""The order of the data and the seeds of each step: what makes a resumed run continue exactly.

Every random draw of optimizer step ``s`` is a function of ``(seed, s, shard)``. The global batch
of step ``s`` is a slice of an infinite stream of epoch-seeded permutations of the dataset, cut
into ``num_processes x grad_accum`` shards; shard ``j = rank * accum + micro_step`` goes to that
process and micro step, and the global torch RNG is reseeded from ``(seed, s, j)`` before its
posterior sample and forward pass. Hence no RNG state is checkpointed, a run resumed at step N
continues exactly like an unbroken one, and 2 processes x 1 accumulation step see the same
samples and noise as 1 process x 2 accumulation steps (EDM2's habit).
"""
import torch
from torch.utils.data import DataLoader

from seeding import derive_seed
from training.errors import TrainingError


def global_batch_size(args):
    """Samples per optimizer step: --batch-size (per micro-step, over all processes; the authors'
    meaning) times --gradient-accumulation-steps."""
    return args.batch_size * args.gradient_accumulation_steps


def seed_step(seed, step, shard, device=None):
    """Seed the global torch RNG (CPU, and ``device`` when it is a GPU) for shard ``shard`` of step ``step``."""
    value = derive_seed(seed, step, shard)
    torch.random.default_generator.manual_seed(value)
    if device is not None and device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(value)


class StepBatchSampler:
    """Infinite batch sampler: this process's micro-batches of every optimizer step from ``start_step``.

    The sample stream is the concatenation of permutations of ``range(dataset_size)``, epoch ``e``
    permuted by a generator seeded from (seed, e). Step ``s`` takes the ``global_batch`` samples
    at stream position ``start_sample + (s - start_step) * global_batch``, split into
    ``num_shards`` equal shards; this process yields its ``shards`` in order, one list per micro
    step. Works with DataLoader(batch_sampler=...) and any number of workers.
    """

    PERMUTATION_DOMAIN = -1  # keeps permutation seeds apart from step seeds

    def __init__(self, dataset_size, global_batch, num_shards, shards, seed, start_step=0, start_sample=None):
        if dataset_size < 1:
            raise TrainingError("the dataset is empty")
        if global_batch % num_shards:
            raise TrainingError(f"global batch {global_batch} is not divisible into {num_shards} shards")
        self.dataset_size = int(dataset_size)
        self.global_batch = int(global_batch)
        self.local_batch = self.global_batch // num_shards
        self.shards = list(shards)
        self.seed = int(seed)
        self.start_step = int(start_step)
        self.start_sample = self.start_step * self.global_batch if start_sample is None else int(start_sample)
        self._cache = {}

    def permutation(self, epoch):
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.PERMUTATION_DOMAIN, epoch))
            self._cache[epoch] = torch.randperm(self.dataset_size, generator=generator)
        return self._cache[epoch]

    def indices(self, position, count):
        """Dataset indices of stream positions [position, position + count)."""
        out = []
        while count > 0:
            epoch, offset = divmod(position, self.dataset_size)
            take = min(count, self.dataset_size - offset)
            out.extend(self.permutation(epoch)[offset:offset + take].tolist())
            position, count = position + take, count - take
        return out

    def step_indices(self, step):
        """{shard: indices} of this process's shards of optimizer step ``step``."""
        base = self.start_sample + (step - self.start_step) * self.global_batch
        return {j: self.indices(base + j * self.local_batch, self.local_batch) for j in self.shards}

    def __iter__(self):
        step = self.start_step
        while True:
            batches = self.step_indices(step)
            for shard in self.shards:
                yield batches[shard]
            step += 1


def build_dataloader(args, dataset, accelerator, start_step, start_sample):
    """A DataLoader over this process's shards of every step (never re-sharded by accelerate)."""
    accum = args.gradient_accumulation_steps
    rank = accelerator.process_index
    sampler = StepBatchSampler(
        dataset_size=len(dataset), global_batch=global_batch_size(args), num_shards=accelerator.num_processes * accum,
        shards=range(rank * accum, (rank + 1) * accum), seed=args.seed, start_step=start_step,
        start_sample=start_sample)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                      pin_memory=accelerator.device.type == "cuda", persistent_workers=args.num_workers > 0)
