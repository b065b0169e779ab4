"""Post-hoc EMA tracking in the training loop: EDM2's power-function EMA profiles
(posthoc_ema.py), updated after every optimizer step on the main process, snapshotted every
--posthoc-ema-every steps and at the end, and resumed exactly from the training checkpoint."""
import os

from posthoc_ema import SNAPSHOT_DIR, PowerFunctionEMA, list_step_files, save_snapshot
from training.errors import TrainingError


class PosthocTracking:
    """posthoc_ema.PowerFunctionEMA on the main process, wired into train.py's loop."""

    STATE_KEY = "posthoc_ema_tracker"  # its entry in the training checkpoint

    def __init__(self, model, sigma_rels, every, exp_dir, step, resumed=None, resume_path=None, log=print):
        self.names = [name for name, _ in model.named_parameters()]
        self.params = list(model.parameters())
        self.every, self.exp_dir = every, exp_dir
        self.tracker = PowerFunctionEMA(self.params, sigma_rels, step=step)
        if resumed is not None:
            state = resumed.get(self.STATE_KEY)
            if state is None:
                log(f"warning: {resume_path} has no post-hoc EMA state: its profiles start at step {step}")
            else:
                try:
                    self.tracker.load_state_dict(state)
                except (ValueError, KeyError, TypeError) as exc:
                    raise TrainingError(f"--posthoc-ema-sigma-rels: {resume_path}: {exc}") from None

    def drop_later_snapshots(self, step, log=print):
        """Remove snapshots past ``step`` (a longer earlier run's, or an overwritten run's: never
        mixed with this one's); called when the loop begins, after every start-up check."""
        for saved, path in list_step_files(os.path.join(self.exp_dir, SNAPSHOT_DIR)):
            if saved > step:
                os.remove(path)
                log(f"removed the post-hoc EMA snapshot {path}: it is past this run's step {step}")

    def update(self, step):
        self.tracker.update(self.params, step)

    def maybe_snapshot(self, step, total_steps, extra):
        """Write <exp>/posthoc-ema/<step:07d>.pt every --posthoc-ema-every steps and at the end."""
        if step % self.every == 0 or step == total_steps:
            return save_snapshot(self.exp_dir, step, self.names, self.tracker, extra=extra)
        return None

    def state_dict(self):
        return self.tracker.state_dict()


def posthoc_checkpoint_entry(tracking):
    """The training checkpoint's post-hoc EMA entry (None when tracking is off or not on this process)."""
    return {PosthocTracking.STATE_KEY: tracking.state_dict() if tracking is not None else None}
