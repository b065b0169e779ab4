"""What made an artefact: the code version and a training run's record (run id, data, launch).

Checkpoints carry ``run_record`` as ``checkpoint["provenance"]``; sample sets and metrics files
carry ``code_version``. docs/provenance.md lists what each artefact records.
"""
import datetime
import os
import subprocess
import uuid


def code_version(root=None):
    """The git commit of this codebase (with '+dirty' for uncommitted changes), or None."""
    root = root or os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


def run_record(previous, data_dir, dataset, num_processes, mixed_precision):
    """What made this run's checkpoints: a run id (kept across resumes), start time, code version,
    the data (folder, size, mode, the VAE record of its latents) and the launch."""
    previous = previous or {}
    return {
        "run_id": previous.get("run_id") or uuid.uuid4().hex[:16],
        "started": previous.get("started") or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "code": code_version(),
        "data": {"data_dir": os.path.abspath(data_dir), "items": len(dataset), "mode": dataset.mode,
                 "vae": getattr(dataset, "vae_record", None)},
        "num_processes": num_processes,
        "mixed_precision": mixed_precision,
    }
