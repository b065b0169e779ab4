"""The errors of a training run: what the user can fix (``TrainingError``), a data file damaged
mid-run (``TrainingDataError``) and a run that diverged (``TrainingDiverged``, exit status 2)."""
from dataset import dataset_error_line
from errors import UserError


class TrainingError(UserError, RuntimeError):
    """A user-fixable problem found at start-up (data, flags, checkpoints); printed as one message."""


class TrainingDataError(TrainingError):
    """A data file found damaged mid-run; printed by the process that read it (perhaps not rank 0)."""

    every_rank = True


class TrainingDiverged(UserError, RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is left intact."""

    exit_code = 2


def first_line(exc):
    """The first non-empty line of an exception's message (torch's can run to pages)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def data_error(exc, step, last_checkpoint):
    """A DatasetError met mid-run (directly, or re-raised by a DataLoader worker) as one line:
    the file and its fix, the step it stopped, and where to resume once it is fixed."""
    where = f"{last_checkpoint} is the latest checkpoint" if last_checkpoint else "no checkpoint was written yet"
    return TrainingDataError(f"stopped at step {step + 1}, nothing saved for it ({where}; --resume-step -1 continues "
                             f"once the data is fixed): {dataset_error_line(exc)}")
