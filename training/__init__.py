"""The parts of a training run that train.py wires, one concern per file.

A training step, in reading order: ``setup`` (accelerator, data, VAE, config, encoders, model,
loss) and ``optimizer`` build the run; ``checkpoints`` finds where it resumes; ``data_order``
deals the step's samples and seeds; ``loop.optimizer_step`` runs the loss (``loss.py``) on the
model (``models/sit.py``) and steps AdamW, then ``loop`` updates the EMA; ``monitor`` guards
against non-finite steps and writes ``stats.jsonl``; ``checkpoints`` saves. Optional parts: ``posthoc``
(post-hoc EMA), ``evaluation`` (FID during training), ``preview``, ``init_from`` (fine-tuning),
``trackers`` (wandb / TensorBoard), ``log``; ``flags`` checks the flags; ``errors`` holds what a
user can cause.
"""
