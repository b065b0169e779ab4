"""Fault tests of train.py and generate.py: kills mid-save, unreadable checkpoints, data
damaged mid-run, unwritable or full outputs, fresh runs over an experiment's checkpoints.

Every fault ends in one line that names the file or flag and the fix, with a documented exit code
(train.py: 1 for anything the user must fix, 2 for a diverged run; generate.py: 2), and leaves no
partial file: the previous checkpoint stays intact and a resumed run equals an unbroken one bitwise.
Read-only folders are simulated (these tests may run as root, which ignores chmod): by a path under
a regular file (NotADirectoryError) or by fileio's open() raising PermissionError.

    python tests/test_train_faults.py --kills 10     # the kill loop behind the counts in docs/faults.md
"""
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fileio  # noqa: E402
import generate  # noqa: E402
import train  # noqa: E402
import training.checkpoints as t_checkpoints  # noqa: E402
import training.data_order as t_data_order  # noqa: E402
import training.errors as t_errors  # noqa: E402
import training.monitor as t_monitor  # noqa: E402
from models import ModelConfig, SiT  # noqa: E402
from models.checkpoint import load_checkpoint_file  # noqa: E402
from preprocessing.storage import image_name  # noqa: E402
from preprocessing.synthetic import write_synthetic_dataset  # noqa: E402
from test_train import assert_nested_equal, assert_states_equal, make_latent_data, stats, tiny_argv  # noqa: E402

N_PIXEL = 8


def one_line(text):
    return "\n" not in text.strip() and "Traceback" not in text


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as the `python train.py` children get (OMP_NUM_THREADS=1): bitwise comparable runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process train.main builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory):
    return make_latent_data(str(tmp_path_factory.mktemp("latents")))


@pytest.fixture(scope="module")
def unbroken(latent_dir, tmp_path_factory):
    """An unbroken 4-step run with checkpoints at steps 2 and 4: what every broken run must equal."""
    out = tmp_path_factory.mktemp("unbroken")
    train.main(train.parse_args(argv(latent_dir, out, "full")))
    reset_accelerate()
    return out


def argv(data, out, name, *extra, steps=4):
    return tiny_argv(data, out, name, "--max-train-steps", steps, "--checkpointing-steps", 2, *extra)


def run(*args):
    return train.main(train.parse_args(list(map(str, args))))


def cli(args, capsys):
    """train.cli in this process: (exit code, stderr from "error: " on; the progress bar's output before it)."""
    with pytest.raises(SystemExit) as info:
        train.cli(list(map(str, args)))
    reset_accelerate()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return info.value.code, err[err.find("error: "):]


def folder_of(out, name):
    return os.path.join(out, name, "checkpoints")


def ckpt(out, name, step):
    return load_checkpoint_file(os.path.join(folder_of(out, name), f"{step:07d}.pt"))


def assert_same_run(a, b):
    assert a["steps"] == b["steps"]
    assert_states_equal(a["model"], b["model"])
    assert_states_equal(a["ema"], b["ema"])
    assert_nested_equal(a["opt"], b["opt"])


def copy_experiment(src_out, name, dst_out):
    shutil.copytree(os.path.join(src_out, name), os.path.join(dst_out, name))


def truncate(path, keep=0.5):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * keep)])


#################################################################################
#                           Kill during a checkpoint save                       #
#################################################################################

def start_killable_run(data, out, name, *extra, steps=4):
    """`python train.py` in a child of its own, to be SIGKILLed by pid; its output goes to <out>/<name>.log."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    log = open(os.path.join(out, f"{name}.log"), "ab")
    command = [sys.executable, os.path.join(ROOT, "train.py"), *map(str, argv(data, out, name, *extra, steps=steps))]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for(predicate, proc, timeout, poll=0.05):
    """Poll until predicate() holds; False if the child exited first or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(poll)
    return False


def temporaries(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith(".tmp-")) if os.path.isdir(folder) else []


def kill(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_kill_during_checkpoint_save_then_resume_equals_unbroken(latent_dir, unbroken, tmp_path, capsys):
    folder = folder_of(tmp_path, "killed")
    proc = start_killable_run(latent_dir, tmp_path, "killed", "--debug-slow-save-step", 4)
    try:
        # step 4's save sleeps with its temporary written: kill the child there
        assert wait_for(lambda: any(n.endswith("-0000004.pt") for n in temporaries(folder)), proc, timeout=180), \
            open(os.path.join(tmp_path, "killed.log")).read()[-3000:]
    finally:
        kill(proc)
    assert proc.returncode == -signal.SIGKILL
    left = temporaries(folder)
    assert sorted(os.listdir(folder)) == sorted(["0000002.pt", *left]) and len(left) == 1
    assert left[0] == os.path.basename(fileio.temp_path("0000004.pt")).replace(f"-{os.getpid()}-", f"-{proc.pid}-")
    assert [r["step"] for r in stats(tmp_path, "killed")] == [1, 2, 3, 4]  # logged before the save

    capsys.readouterr()
    assert run(*argv(latent_dir, tmp_path, "killed", "--resume-step", -1)) == 4
    out = capsys.readouterr().out
    assert f"removed stale temporary file {os.path.join(folder, left[0])}" in out
    assert f"its process {proc.pid} has exited" in out
    assert sorted(os.listdir(folder)) == ["0000002.pt", "0000004.pt"]  # no temporary left
    assert_same_run(ckpt(tmp_path, "killed", 4), ckpt(unbroken, "full", 4))
    assert [r["step"] for r in stats(tmp_path, "killed")] == [1, 2, 3, 4]  # one record per step
    np.testing.assert_array_equal([r["loss"] for r in stats(tmp_path, "killed")],
                                  [r["loss"] for r in stats(unbroken, "full")])


#################################################################################
#                              Unreadable checkpoints                           #
#################################################################################

def test_truncated_newest_checkpoint(latent_dir, unbroken, tmp_path, capsys):
    copy_experiment(unbroken, "full", tmp_path)
    newest = os.path.join(folder_of(tmp_path, "full"), "0000004.pt")
    truncate(newest)
    # an explicit step that cannot be read: one line naming the file, nothing trained
    code, err = cli(argv(latent_dir, tmp_path, "full", "--resume-step", 4), capsys)
    assert code == 1 and one_line(err)
    assert err.startswith(f"error: --resume-step 4: checkpoint {newest} cannot be read (")
    assert err.rstrip().endswith("it may be truncated or not a PyTorch checkpoint; pass another step (2) or "
                                 "--resume-step -1 for the newest readable one")
    # -1: the newest readable one (step 2), with a warning naming the bad file; steps 3-4 are retrained
    assert run(*argv(latent_dir, tmp_path, "full", "--resume-step", -1)) == 4
    out = capsys.readouterr().out
    assert f"skipping checkpoint {newest} cannot be read" in out
    assert f"resuming from {os.path.join(folder_of(tmp_path, 'full'), '0000002.pt')}, the newest readable " \
           f"checkpoint (1 newer unreadable: {newest}; delete or move them)" in out
    assert_same_run(ckpt(tmp_path, "full", 4), ckpt(unbroken, "full", 4))  # rewritten, equal to the unbroken run
    # none readable: one line
    for step in (2, 4):
        truncate(os.path.join(folder_of(tmp_path, "full"), f"{step:07d}.pt"), keep=0.9)
    code, err = cli(argv(latent_dir, tmp_path, "full", "--resume-step", -1), capsys)
    assert code == 1 and one_line(err)
    assert err == (f"error: none of the 2 checkpoints in {folder_of(tmp_path, 'full')} can be read (e.g. {newest}); "
                   "restore one from a backup, or pass --resume-step 0 --overwrite to start over\n")


def authors_checkpoint(path, hidden, train_args):
    """The authors' layout {model, ema, opt, args, steps} of a tiny SiT of width ``hidden``."""
    config = ModelConfig(model="custom", input_size=8, in_channels=4, hidden_size=hidden, depth=2, num_heads=2,
                         patch_size=2, num_classes=5, encoder_depth=1, crop_start=2, crop_end=5)
    model = SiT(config)
    classifier = [p for n, p in model.named_parameters() if n.startswith("classifier.")]
    backbone = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    optimizer = torch.optim.AdamW([{"params": backbone}, {"params": classifier}])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "ema": model.state_dict(),
                "opt": optimizer.state_dict(), "args": train.argparse.Namespace(**train_args), "steps": 2}, path)
    return model


def test_authors_checkpoint_of_another_size_is_one_line(latent_dir, tmp_path, capsys):
    path = os.path.join(tmp_path, "authors", "checkpoints", "0000002.pt")
    authors_checkpoint(path, 64, {"model": "SiT-S/2", "num_classes": 5})
    # resumed: the record (--model SiT-S/2: width 384) contradicts its own weights (width 64)
    code, err = cli(argv(latent_dir, tmp_path, "authors", "--resume-step", -1), capsys)
    assert code == 1 and err == (f"error: checkpoint {path} records hidden_size=384 but its weights have "
                                 "hidden_size=64\n")
    # loaded into a model of another width: the key and both shapes, not PyTorch's size-mismatch dump
    checkpoint = load_checkpoint_file(path)
    model = SiT(ModelConfig(model="custom", input_size=8, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                            patch_size=2, num_classes=5, encoder_depth=1))
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(t_errors.TrainingError) as info:
        t_checkpoints.restore_checkpoint(checkpoint, model, SiT(model.config), optimizer, source=path)
    assert one_line(str(info.value)) and str(info.value).startswith(
        f"cannot resume: {path} (model) does not fit this model: pos_embed expected (1, 16, 32), found (1, 16, 64)")
    # the same width: restored exactly (the `module.` prefix of the authors' DDP model is dropped)
    model64 = authors_checkpoint(str(tmp_path / "same.pt"), 64, {})
    fresh = SiT(model64.config)
    ema = SiT(model64.config)
    classifier = [p for n, p in fresh.named_parameters() if n.startswith("classifier.")]
    backbone = [p for n, p in fresh.named_parameters() if not n.startswith("classifier.")]
    opt = torch.optim.AdamW([{"params": backbone}, {"params": classifier}])
    assert t_checkpoints.restore_checkpoint(load_checkpoint_file(str(tmp_path / "same.pt")), fresh, ema, opt) == \
        (2, None, {"consecutive": 0, "total": 0})
    assert_states_equal(fresh.state_dict(), model64.state_dict())
    # an optimizer state of another layout (one parameter group): one line naming the file
    with pytest.raises(t_errors.TrainingError, match=r"^cannot resume: the optimizer state in .* does not fit "
                                                        r"this model \(loaded state dict has a different number"):
        t_checkpoints.restore_checkpoint(load_checkpoint_file(str(tmp_path / "same.pt")), fresh, ema,
                                       torch.optim.AdamW(fresh.parameters()), source="x.pt")


#################################################################################
#                                Bad data mid-run                               #
#################################################################################

def second_step_item(dataset_size, batch):
    """An item that the 2nd step reads and the 1st does not (seed 0, one process)."""
    order = t_data_order.StepBatchSampler(dataset_size, batch, 1, [0], seed=0)
    return next(i for i in order.step_indices(1)[0] if i not in order.step_indices(0)[0])


@pytest.mark.parametrize("workers", [0, 1])
def test_garbage_image_found_mid_run(tmp_path, capsys, workers):
    data = str(tmp_path / "data")
    write_synthetic_dataset(data, N_PIXEL, resolution=8, latent_shape=(8, 1, 1), num_classes=3)
    shutil.rmtree(os.path.join(data, "vae-sd"))
    # replaced by garbage of the same byte size: the start-up check reads only the headers of PNGs
    # whose size differs from the first's, so it is found when read, at step 2
    bad = os.path.join(data, "images", image_name(second_step_item(N_PIXEL, 4)))
    size = os.path.getsize(bad)
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + bytes(size - 8))
    args = tiny_argv(data, tmp_path, "pix", "--vae", "none", "--resolution", 8, "--crop-start", 4, "--batch-size", 4,
                     "--max-train-steps", 3, "--checkpointing-steps", 1, "--num-workers", workers)
    code, err = cli(args, capsys)
    first = os.path.join(folder_of(tmp_path, "pix"), "0000001.pt")
    assert code == 1 and one_line(err)
    assert err.startswith(f"error: stopped at step 2, nothing saved for it ({first} is the latest checkpoint; "
                          f"--resume-step -1 continues once the data is fixed): {bad} cannot be decoded (not an "
                          "image PIL can identify); restore it from a good copy, or re-run convert")
    assert sorted(os.listdir(folder_of(tmp_path, "pix"))) == ["0000001.pt"]  # nothing for step 2, no temporary
    assert load_checkpoint_file(first)["steps"] == 1
    assert [r["step"] for r in stats(tmp_path, "pix")] == [1]


def test_latent_of_another_shape_found_mid_run(tmp_path, capsys):
    data = make_latent_data(str(tmp_path / "data"))
    labels = json.load(open(os.path.join(data, "vae-sd", "dataset.json")))["labels"]
    bad = os.path.join(data, "vae-sd", labels[second_step_item(len(labels), 8)][0])
    np.save(bad, np.zeros((4, 16, 8), np.float32))  # the same byte count as the (8, 8, 8) latents
    code, err = cli(argv(data, tmp_path, "lat", "--checkpointing-steps", 1, steps=3), capsys)
    assert code == 1 and one_line(err)
    assert err.startswith(f"error: stopped at step 2, nothing saved for it ({folder_of(tmp_path, 'lat')}/0000001.pt "
                          f"is the latest checkpoint; --resume-step -1 continues once the data is fixed): {bad} "
                          "changed since start-up: it holds float32 (4, 16, 8) (")
    assert "the latents are float32 (8, 8, 8)" in err and "delete it and re-run encode" in err
    assert sorted(os.listdir(folder_of(tmp_path, "lat"))) == ["0000001.pt"]


#################################################################################
#                         Unwritable and full outputs                           #
#################################################################################

def test_train_refuses_an_unwritable_output_dir_before_any_work(latent_dir, tmp_path, capsys, monkeypatch):
    """--output-dir under a regular file (NotADirectoryError), and fileio's open() raising PermissionError."""
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "exps"
    # a missing --data-dir would be the first error of any work: the output is checked before it
    code, err = cli(tiny_argv("/nonexistent/data", out, "run", "--max-train-steps", 1), capsys)
    assert code == 1 and err == (f"error: cannot write to {out / 'run'} (not a directory); choose a writable place "
                                 "with --output-dir\n")

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(fileio, "open", denied, raising=False)
    code, err = cli(tiny_argv("/nonexistent/data", tmp_path / "ro", "run", "--max-train-steps", 1), capsys)
    assert code == 1 and err == (f"error: cannot write to {tmp_path / 'ro' / 'run'} (permission denied); choose a "
                                 "writable place with --output-dir\n")


class FullDiskFile(io.FileIO):
    """A file on a disk with `room` bytes left: the write that passes it fails with ENOSPC."""

    room = 64 * 1024

    def write(self, data):
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def full_disk_for(monkeypatch, suffix, room):
    """Files whose name ends with `suffix` are written to a disk with `room` bytes left (fileio's writes)."""
    def fdopen(fd, mode="r", *args, **kwargs):
        f = FullDiskFile(fd, "wb")
        f.room = room if os.readlink(f"/proc/self/fd/{fd}").endswith(suffix) else 1 << 40
        return f

    monkeypatch.setattr(fileio.os, "fdopen", fdopen)


def test_disk_full_during_checkpoint_save(latent_dir, unbroken, tmp_path, capsys, monkeypatch):
    copy_experiment(unbroken, "full", tmp_path)
    folder = folder_of(tmp_path, "full")
    os.remove(os.path.join(folder, "0000004.pt"))
    before = open(os.path.join(folder, "0000002.pt"), "rb").read()
    # room for args.json (a few KiB), not for a checkpoint (~0.5 MiB)
    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, mode="r", *a, **k: FullDiskFile(fd, "wb"))
    code, err = cli(argv(latent_dir, tmp_path, "full", "--resume-step", -1), capsys)
    monkeypatch.undo()
    path = os.path.join(folder, "0000004.pt")
    assert code == 1 and one_line(err)
    assert err.startswith(f"error: no space left on device while writing {path}: ")
    assert err.endswith(f"needed; free some space or write elsewhere (nothing written); the previous checkpoint "
                        f"{os.path.join(folder, '0000002.pt')} is intact: free space, then resume with "
                        "--resume-step -1\n")
    assert sorted(os.listdir(folder)) == ["0000002.pt"]  # no temporary, the previous checkpoint untouched
    assert open(os.path.join(folder, "0000002.pt"), "rb").read() == before
    # once there is room: resumed, equal to the unbroken run
    assert run(*argv(latent_dir, tmp_path, "full", "--resume-step", -1)) == 4
    assert_same_run(ckpt(tmp_path, "full", 4), ckpt(unbroken, "full", 4))


def pixel_checkpoint(path):
    config = ModelConfig(model="custom", input_size=8, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                         patch_size=2, num_classes=3, encoder_depth=1)
    torch.manual_seed(0)
    model = SiT(config)
    torch.save({"ema": model.state_dict(), "config": config.to_dict(), "steps": 1}, path)
    return path


def generate_args(ckpt_path, sample_dir, *extra):
    return ["--ckpt", ckpt_path, "--vae", "none", "--num-fid-samples", "4", "--per-proc-batch-size", "2",
            "--sample_dir", str(sample_dir), "--num-steps", "2", "--cfg-scale", "1", "--device", "cpu", *extra]


def test_generate_unwritable_sample_dir_and_full_disk(tmp_path, monkeypatch):
    """--sample_dir under a regular file (NotADirectoryError); a full disk while writing the PNGs and the npz."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    # checked before any work: the checkpoint (garbage) is never read
    result = subprocess.run([sys.executable, "generate.py", *generate_args(str(tmp_path / "garbage.pt"),
                                                                             tmp_path / "file" / "samples")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr == (
        f"generate.py: error: cannot write to {tmp_path / 'file' / 'samples'} (not a directory); choose a writable "
        "place with --sample_dir\n")

    ckpt_path = pixel_checkpoint(str(tmp_path / "pixel.pt"))
    full_disk_for(monkeypatch, ".png", 100)  # smaller than any PNG: the first PNG write fails
    with pytest.raises(fileio.DiskFull) as info:
        generate.main(generate.parse_args(generate_args(ckpt_path, tmp_path / "s")))
    folder = os.path.join(tmp_path, "s", os.listdir(tmp_path / "s")[0])
    assert one_line(str(info.value)) and str(info.value).startswith(
        f"no space left on device while writing {folder}/00000")
    assert re.search(r"free there, \d+ B needed; free some space or write elsewhere \(nothing written\)$",
                     str(info.value))  # the encoded PNG's size
    assert sorted(os.listdir(folder)) == ["provenance.json"]  # no PNG, no temporary
    full_disk_for(monkeypatch, ".npz", 400)  # PNGs fit, the npz (4 x 192 pixel bytes) does not
    with pytest.raises(fileio.DiskFull, match=r"while writing .*\.npz: .* free there, 768 B needed; free some "
                                              r"space or write elsewhere \(nothing written\)$"):
        generate.main(generate.parse_args(generate_args(ckpt_path, tmp_path / "s")))
    assert sorted(os.listdir(tmp_path / "s")) == [os.path.basename(folder)]  # no npz, no temporary
    monkeypatch.undo()
    npz = generate.main(generate.parse_args(generate_args(ckpt_path, tmp_path / "s"))) + ".npz"
    assert np.load(npz)["arr_0"].shape == (4, 8, 8, 3)


def test_generate_removes_stale_temporaries(tmp_path, capsys):
    ckpt_path = pixel_checkpoint(str(tmp_path / "pixel.pt"))
    folder = generate.main(generate.parse_args(generate_args(ckpt_path, tmp_path / "s", "--print-npz-path")))
    folder = folder.removesuffix(".npz")
    os.makedirs(folder)
    dead = 999_999_999  # above any pid_max: a process that cannot exist
    npz_tmp = fileio.temp_path(folder + ".npz").replace(f"-{os.getpid()}-", f"-{dead}-")
    png_tmp = fileio.temp_path(os.path.join(folder, "000001.png")).replace(f"-{os.getpid()}-", f"-{dead}-")
    live_tmp = fileio.temp_path(os.path.join(folder, "000099.png"))  # this process's: alive, kept
    for path in (npz_tmp, png_tmp, live_tmp):
        open(path, "wb").write(b"partial")
    capsys.readouterr()
    generate.main(generate.parse_args(generate_args(ckpt_path, tmp_path / "s")))
    out = capsys.readouterr().out
    assert f"removed stale temporary file {npz_tmp} (7 B; its process {dead} has exited)" in out
    assert f"removed stale temporary file {png_tmp} (7 B; its process {dead} has exited)" in out
    assert not os.path.exists(npz_tmp) and not os.path.exists(png_tmp) and os.path.exists(live_tmp)
    assert np.load(folder + ".npz")["arr_0"].shape == (4, 8, 8, 3)


#################################################################################
#                      Overwrite refusal, stats, divergence                     #
#################################################################################

def test_fresh_run_over_checkpoints_is_refused(latent_dir, unbroken, tmp_path, capsys):
    copy_experiment(unbroken, "full", tmp_path)
    folder = folder_of(tmp_path, "full")
    before = {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in os.listdir(folder)}
    code, err = cli(argv(latent_dir, tmp_path, "full"), capsys)
    assert code == 1 and err == (f"error: {folder} already holds 2 checkpoints (up to steps 2, 4); pass "
                                 "--resume-step -1 to continue from the latest, or --overwrite to delete them and "
                                 "start over\n")
    assert {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in os.listdir(folder)} == before
    with pytest.raises(SystemExit):
        train.parse_args(argv(latent_dir, tmp_path, "full", "--overwrite", "--resume-step", -1))
    assert "--overwrite starts over; it contradicts --resume-step -1" in capsys.readouterr().err
    # --overwrite: the old checkpoints and stats are gone; the new run (2 steps) equals a fresh one
    assert run(*argv(latent_dir, tmp_path, "full", "--overwrite", steps=2)) == 2
    assert "--overwrite: deleted the 2 checkpoints of the previous run" in capsys.readouterr().out
    assert sorted(os.listdir(folder)) == ["0000002.pt"]
    assert_same_run(ckpt(tmp_path, "full", 2), ckpt(unbroken, "full", 2))
    assert [r["step"] for r in stats(tmp_path, "full")] == [1, 2]


def test_trim_stats_keeps_one_record_per_step(tmp_path, monkeypatch):
    path = str(tmp_path / "stats.jsonl")
    lines = ['{"step": 1, "loss": 1.0}', '{"step": 2, "loss": 0.9}', '{"step": 2, "fid": 50.0}',
             '{"step": 3, "loss": 0.8}', '{"step": 4, "lo']  # a line cut short by a kill
    with open(path, "w") as f:
        f.write("\n".join(lines))
    logged = []
    assert t_monitor.trim_stats(path, 2, log=logged.append) == 2
    assert open(path).read() == "\n".join(lines[:3]) + "\n"
    assert logged == [f"{path}: dropped 2 records after step 2 (this run writes them again)"]
    assert t_monitor.trim_stats(path, 2) == 0 and os.listdir(tmp_path) == ["stats.jsonl"]
    assert t_monitor.trim_stats(str(tmp_path / "missing.jsonl"), 0) == 0
    # a full disk while appending: one line (the half-written line is dropped by the next trim)
    monkeypatch.setattr(t_monitor, "open", lambda *a, **k: FullDiskFile(os.open(path, os.O_WRONLY | os.O_APPEND),
                                                                           "wb"), raising=False)
    FullDiskFile.room = 0
    try:
        with pytest.raises(fileio.DiskFull) as info:
            t_monitor.append_stats(path, {"step": 3, "loss": float("nan")})
    finally:
        FullDiskFile.room = 64 * 1024
    assert str(info.value) == (f"no space left on device while appending to {path}; free some space, then resume "
                               "with --resume-step -1")


def test_guard_names_the_last_checkpoint_saved_in_the_normal_loss_range():
    guard = t_monitor.NonFiniteGuard(3)
    guard.note_checkpoint("c/0000010.pt")       # before any log: nothing against the weights
    for step, loss in [(20, 1.0), (30, 0.8), (40, 1.6)]:  # 1.6 = 2 x the lowest 0.8: still in range
        guard.note_log(loss, skipped=0)
        guard.note_checkpoint(f"c/{step:07d}.pt")
    assert guard.good_checkpoint == "c/0000040.pt" and guard.lowest_loss == 0.8
    guard.note_log(1.7, skipped=0)              # 1.7 > 1.6: the loss has left its normal range
    guard.note_checkpoint("c/0000050.pt")
    guard.note_log(0.9, skipped=0)              # back in range
    guard.record(True, 55)                      # ... but a step was skipped since the log
    guard.note_checkpoint("c/0000060.pt")
    guard.note_log(0.9, skipped=1)              # a window with a skipped step is not normal either
    guard.note_checkpoint("c/0000070.pt")
    assert guard.good_checkpoint == "c/0000040.pt"
    # the record travels in the checkpoint: a resumed guard names the same one
    resumed = t_monitor.NonFiniteGuard(3, **guard.state())
    resumed.record(True, 71)
    with pytest.raises(t_errors.TrainingDiverged) as info:
        resumed.record(True, 72, "c/0000070.pt")
    assert str(info.value) == (
        "training stopped at step 72: 3 consecutive steps with a non-finite loss or gradient norm (--max-nonfinite 3); "
        "the last checkpoint saved while the loss was in its normal range is c/0000040.pt (--resume-step 40); later "
        "ones, up to c/0000070.pt, may hold damaged weights. Lower --learning-rate or try --mixed-precision bf16/no")
    # nothing saved in range / nothing saved at all
    empty = t_monitor.NonFiniteGuard(1, in_range=False)
    empty.note_checkpoint("c/0000005.pt")
    assert "no checkpoint was saved while the loss was in its normal range, so c/0000005.pt may hold damaged" \
           in empty.where("c/0000005.pt")
    assert t_monitor.NonFiniteGuard(1).where(None) == "no checkpoint was written"


#################################################################################
#            The kill loop behind docs/faults.md's counts (not a test)          #
#################################################################################

def kill_loop(kills, out):
    """Kill `python train.py` (8 steps, checkpoints every 2) `kills` times, in turn inside a
    checkpoint save, in the middle of a step, and during start-up; resume each with --resume-step
    -1 and compare the finished run with an unbroken one bitwise. Prints and returns the counts."""
    import random

    torch.set_num_threads(1)  # as the children (OMP_NUM_THREADS=1): bitwise comparable
    data = make_latent_data(os.path.join(out, "data"))
    steps = 8
    train.main(train.parse_args(list(map(str, argv(data, out, "full", steps=steps)))))
    reset_accelerate()
    reference = ckpt(out, "full", steps)
    rng = random.Random(0)
    counts = dict(kills=0, in_save=0, mid_step=0, start_up=0, clean_resumes=0, equal_to_unbroken=0,
                  temporaries_after_kill=0, temp_files_left=0)
    for trial in range(kills):
        name, kind = f"k{trial}", ("in_save", "mid_step", "start_up")[trial % 3]
        folder, stats_path = folder_of(out, name), os.path.join(out, name, "stats.jsonl")
        save_step, after = rng.choice([2, 4, 6, 8]), rng.randint(1, steps - 1)
        logged = lambda: sum(1 for _ in open(stats_path)) if os.path.exists(stats_path) else 0  # noqa: E731
        proc = start_killable_run(data, out, name, *(["--debug-slow-save-step", save_step]
                                                     if kind == "in_save" else []), steps=steps)
        try:
            if kind == "in_save":
                wait_for(lambda: any(n.endswith(f"-{save_step:07d}.pt") for n in temporaries(folder)), proc, 300)
            elif kind == "mid_step":  # step `after` logged, then a random moment of the next step
                wait_for(lambda: logged() >= after, proc, 300, poll=0.005)
                time.sleep(rng.uniform(0.0, 0.05))
            else:
                time.sleep(rng.uniform(0.5, 4.0))
            alive = proc.poll() is None
        finally:
            kill(proc)
        at_kill = f"{logged()} steps logged, checkpoints {[s for s, _ in t_checkpoints.list_checkpoints(folder)]}"
        left = temporaries(folder) + temporaries(os.path.join(out, name))
        counts["kills"] += alive
        counts[kind] += alive
        counts["temporaries_after_kill"] += len(left)
        try:  # resumed, or started afresh when killed before its first checkpoint
            train.main(train.parse_args(list(map(str, argv(data, out, name, "--resume-step", -1, steps=steps)))))
            counts["clean_resumes"] += 1
        except Exception as exc:  # noqa: BLE001 - counted and shown
            print(f"trial {trial}: resume failed: {type(exc).__name__}: {exc}")
        finally:
            reset_accelerate()
        counts["temp_files_left"] += len(temporaries(folder) + temporaries(os.path.join(out, name)))
        try:
            assert_same_run(ckpt(out, name, steps), reference)
            assert [r["step"] for r in stats(out, name)] == list(range(1, steps + 1))
            counts["equal_to_unbroken"] += 1
        except Exception as exc:  # noqa: BLE001
            print(f"trial {trial}: differs from the unbroken run: {type(exc).__name__}: {exc}")
        print(f"trial {trial}: {kind}{f' of step {save_step}' if kind == 'in_save' else ''}, alive at kill "
              f"{alive}, {at_kill}, temporaries {left}", flush=True)
    print(counts)
    return counts


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=kill_loop.__doc__)
    parser.add_argument("--kills", type=int, default=10)
    options = parser.parse_args()
    kill_loop(options.kills, tempfile.mkdtemp(prefix="kill-loop-"))
