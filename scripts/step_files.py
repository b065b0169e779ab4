"""Which project files run during one plain training step: a tiny latent run on the CPU, profiled
from the start of its third optimizer step to the start of its fourth (nothing is written to the
repository).

    python scripts/step_files.py

The loop's own file counts too (its frame is running throughout). Lists the files and their count.
"""
import os
import sys
import tempfile

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import train  # noqa: E402
import training.loop as loop  # noqa: E402
from test_train import make_latent_data, tiny_argv  # noqa: E402

PROFILED_STEP = 2  # 0-based: the third step, after the first steps' one-off work


def main():
    seen = set()

    def profile(frame, event, arg):
        name = frame.f_code.co_filename
        path = os.path.abspath(name)
        if (event == "call" and os.path.isfile(name) and path.startswith(ROOT + os.sep) and path != HERE
                and os.sep + ".venv" + os.sep not in path):
            seen.add(os.path.relpath(path, ROOT))

    original = loop.optimizer_step

    def step(*args, **kwargs):
        sys.setprofile(profile if args[6] == PROFILED_STEP else None)  # args[6]: the step index
        return original(*args, **kwargs)

    loop.optimizer_step = step
    with tempfile.TemporaryDirectory() as folder:
        make_latent_data(folder)
        train.main(train.parse_args([str(a) for a in tiny_argv(folder, folder, "step-files", "--max-train-steps", 4,
                                                               "--checkpointing-steps", 100, "--log-every", 100)]))
    sys.setprofile(None)
    files = sorted(seen | {os.path.relpath(loop.__file__, ROOT)})
    print(f"{len(files)} project files run during one training step:")
    print("\n".join(f"  {f}" for f in files))
    return files


if __name__ == "__main__":
    main()
