"""The run's log: stdout and ``<exp>/log.txt`` on the main process, and its opening summary."""
import json
import logging
import os
import sys

from fileio import atomic_write
from training.data_order import global_batch_size
from training.optimizer import classifier_learning_rate

logger = logging.getLogger("lsep.train")


def close_log():
    """Detach and close the log's handlers (its file in <exp> among them)."""
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def setup_logging(exp_dir, is_main):
    """Log to stdout and <exp>/log.txt on the main process; warnings only elsewhere."""
    close_log()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if is_main:
        handlers.append(logging.FileHandler(os.path.join(exp_dir, "log.txt")))
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)


def log_run_summary(args, config, dataset, accelerator, total_steps, exp_dir, provenance):
    """The opening lines of a run: folder, run id, model, data, batch arithmetic, precision."""
    accum = args.gradient_accumulation_steps
    logger.info(f"Experiment directory {exp_dir} (run {provenance['run_id']}, code {provenance['code']})")
    logger.info(f"Model: {config.describe()}")
    logger.info(f"Dataset: {len(dataset):,} items ({args.data_dir}, {dataset.mode})")
    logger.info(f"Global batch {global_batch_size(args)} per optimizer step = {accelerator.num_processes} processes "
                f"x {accum} accumulation steps x {args.batch_size // accelerator.num_processes} per micro-batch "
                f"(the authors fix 256; any size works); {total_steps} steps (--max-train-steps "
                f"{args.max_train_steps}, --epochs {args.epochs}); classifier lr "
                f"{classifier_learning_rate(args, config)}; {accelerator.mixed_precision} precision")


def write_run_record(exp_dir, args, config, provenance):
    """``<exp>/args.json``: the flags as parsed, the model config and the run's provenance."""
    record = {"args": vars(args), "config": config.to_dict(), "provenance": provenance}
    atomic_write(os.path.join(exp_dir, "args.json"),
                 lambda f: f.write(json.dumps(record, indent=2, default=str).encode()))
