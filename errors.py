"""The one base of every error a user can cause, and the wrapper that turns it into one line.

Each tool raises a subclass of ``UserError`` (``TrainingError``, ``GenerateError``,
``ConfigError``, ``CheckpointError``, ``DatasetError``, ``OutputError``, ...) whose message names
the flag or file and says the fix. Each entry point calls ``run_cli``, which prints that message
as one line (on the process that should speak) and exits with the entry point's code; anything
that is not a ``UserError`` is a bug and keeps its traceback. The exit codes are listed in
docs/faults.md.
"""
import os
import sys


class UserError(Exception):
    """Something the user can fix (a flag, a file, the data, the disk, the device): printed as one line."""

    exit_code = None  # a subclass may fix its own code (training that diverged exits 2)
    every_rank = False  # True: printed by whichever process met it (a damaged file, read by one rank)


def is_reporting_process():
    """Rank 0 of a torchrun / accelerate launch, or the only process."""
    return os.environ.get("RANK", "0") == "0"


def run_cli(main, argv=None, prefix="error: ", exit_code=1, message_in_exit=False):
    """``main(argv)``, with a UserError printed as ``prefix + message`` on stderr and ``exit_code``
    (or the error's own) as the exit status. Returns what ``main`` returns.

    ``message_in_exit`` (exit status 1 only): the line travels as ``SystemExit``'s message, which
    the interpreter prints to stderr (``sys.exit("...")``), so a caller in the same process reads it."""
    try:
        return main(argv)
    except UserError as exc:
        code = exc.exit_code if exc.exit_code is not None else exit_code
        speak = is_reporting_process() or exc.every_rank
        if message_in_exit and code == 1:
            sys.exit(f"{prefix}{exc}" if speak else 1)
        if speak:
            print(f"{prefix}{exc}", file=sys.stderr)
        sys.exit(code)
