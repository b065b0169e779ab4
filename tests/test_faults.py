"""Fault tests: bad data, unwritable outputs, full disks, stale temporaries, bad convert sources.

Every user-caused fault must end in one line that names the file or flag and the fix, leave no
partial output, and keep the previous good file. Read-only folders are simulated (these tests may
run as root, which ignores chmod): by a path under a regular file (NotADirectoryError) or by
patching fileio's open() to raise PermissionError; each test says which.
"""
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch

import fileio
from dataset import CustomDataset, dataset_error_line
from evaluator import evaluator as cli
from evaluator import inception as inc
from models.checkpoint import atomic_save, load_checkpoint_file
from preprocessing.dataset_tools import main as tools_main
from preprocessing.storage import DatasetError, image_name, latent_name
from preprocessing.synthetic import npy_bytes, png_bytes, write_synthetic_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 6


def one_line(text):
    return "\n" not in text.strip() and "Traceback" not in text


@pytest.fixture
def data(tmp_path):
    """A fresh 6-item dataset: 8x8 uncompressed RGB PNGs (as convert writes) and (8, 2, 2) latents."""
    root = str(tmp_path / "data")
    write_synthetic_dataset(root, N, resolution=8, latent_shape=(8, 2, 2), num_classes=3)
    return root


def _replace(root, part, name, data):
    with open(os.path.join(root, part, name), "wb") as f:
        f.write(data)


def _worker_error(dataset, index):
    """The exception a DataLoader with one worker process raises for item `index`."""
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, [index]), num_workers=1)
    with pytest.raises(DatasetError) as info:
        next(iter(loader))
    return info.value


# ---------------------------------------------------------------------------- bad data

def test_garbage_png_of_another_byte_size_is_found_at_startup(data):
    _replace(data, "images", image_name(3), b"this is not an image")
    with pytest.raises(DatasetError) as info:
        CustomDataset(data, mode="pixel")
    message = str(info.value)
    assert one_line(message) and f"{image_name(3)} is not a PNG file" in message and "re-run convert" in message
    assert "1 bad images" in message
    CustomDataset(data)  # latent mode does not read the images: no reason to refuse


def test_garbage_png_of_the_same_size_fails_in_a_worker_with_one_line(data):
    size = os.path.getsize(os.path.join(data, "images", image_name(2)))
    ds = CustomDataset(data, mode="pixel")  # start-up sees equal byte sizes and passes
    _replace(data, "images", image_name(2), b"\x89PNG\r\n\x1a\n" + bytes(size - 8))
    with pytest.raises(DatasetError) as direct:
        ds[2]
    expected = str(direct.value)
    where = os.path.join(data, "images", image_name(2))
    assert one_line(expected) and expected.startswith(f"{where} cannot be decoded (not an image PIL can identify)")
    assert "restore it from a good copy, or re-run convert" in expected
    wrapped = _worker_error(ds, 2)
    assert "Traceback" in str(wrapped) and "DataLoader worker" in str(wrapped)  # what torch re-raises
    assert dataset_error_line(wrapped) == expected
    assert dataset_error_line(direct.value) == expected
    assert dataset_error_line(ValueError("first\nsecond line")) == "second line"  # foreign text: its last line


def test_png_of_another_size_or_mode(data):
    rgb16 = np.zeros((16, 16, 3), np.uint8)
    gray8 = np.zeros((8, 8), np.uint8)
    _replace(data, "images", image_name(1), png_bytes(rgb16))
    _replace(data, "images", image_name(4), png_bytes(gray8))
    with pytest.raises(DatasetError) as info:
        CustomDataset(data, mode="pixel")
    message = str(info.value)
    assert one_line(message) and message.startswith("2 bad images: ")
    assert f"{image_name(1)} is 16x16 8-bit RGB" in message and f"{image_name(4)} is 8x8 8-bit grayscale" in message
    assert "expected 8x8 8-bit RGB PNGs" in message

    # the same files swapped in after start-up: caught when read, in the worker, as one line
    _replace(data, "images", image_name(1), png_bytes(np.zeros((8, 8, 3), np.uint8)))
    _replace(data, "images", image_name(4), png_bytes(np.zeros((8, 8, 3), np.uint8)))
    ds = CustomDataset(data, return_images=True)
    _replace(data, "images", image_name(1), png_bytes(rgb16))
    _replace(data, "images", image_name(4), png_bytes(gray8))
    line = dataset_error_line(_worker_error(ds, 1))
    assert line.endswith("is a 16x16 RGB image, expected 8x8 RGB like the first image; restore it from a good copy, "
                         "or re-run convert into a new folder: " + "python preprocessing/dataset_tools.py convert "
                         f"--source CLASS_FOLDERS --dest {data}/images --resolution 8x8")  # the data's own size
    assert f"{image_name(4)} is a 8x8 L image" in dataset_error_line(_worker_error(ds, 4))


def test_latent_of_another_shape_with_the_same_bytes(data):
    ds = CustomDataset(data)
    np.testing.assert_array_equal(ds[5][0].numpy(), np.load(os.path.join(data, "vae-sd", latent_name(5))))
    _replace(data, "vae-sd", latent_name(5), npy_bytes(np.zeros((8, 4, 1), np.float32)))
    assert os.path.getsize(os.path.join(data, "vae-sd", latent_name(5))) == os.path.getsize(
        os.path.join(data, "vae-sd", latent_name(0)))
    line = dataset_error_line(_worker_error(ds, 5))
    assert one_line(line)
    assert line.startswith(os.path.join(data, "vae-sd", latent_name(5)) + " changed since start-up: it holds "
                           "float32 (8, 4, 1) (256 bytes), the latents are float32 (8, 2, 2) (256 bytes); "
                           "delete it and re-run encode")
    with pytest.raises(DatasetError, match=r"has shape \(8, 4, 1\) / float32 but .* has \(8, 2, 2\)"):
        CustomDataset(data, check_all_headers=True)  # a new start-up with every header parsed finds it


# ---------------------------------------------------------------------------- convert

def _run_tools(*argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, "preprocessing", "dataset_tools.py"), *argv],
                          capture_output=True, text=True, timeout=120)


def test_convert_missing_source_is_one_line_exit_1(tmp_path):
    proc = _run_tools("convert", "--source", str(tmp_path / "nope"), "--dest", str(tmp_path / "out"),
                      "--resolution", "8x8")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"dataset_tools.py convert: error: --source: {tmp_path / 'nope'} does not exist "
                                   "(expected a folder with one subfolder per class, or a .zip of one)")
    assert not os.path.exists(tmp_path / "out")


def test_convert_all_unreadable_source_fails_and_leaves_no_dataset(tmp_path):
    source = tmp_path / "raw"
    for cls, name in [("n01", "a.png"), ("n01", "b.jpg"), ("n02", "c.png")]:
        (source / cls).mkdir(parents=True, exist_ok=True)
        (source / cls / name).write_bytes(b"garbage, not an image")
    dest = tmp_path / "images"
    proc = _run_tools("convert", "--source", str(source), "--dest", str(dest), "--resolution", "8x8", "--workers", "0")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith(f"dataset_tools.py convert: error: none of the 3 images under --source {source} "
                                  f"could be read (e.g. {source / 'n01' / 'a.png'}: UnidentifiedImageError")
    log = f"{dest}.skipped.txt"
    assert last.endswith(f"nothing written to {dest}, every reason is in {log}") and "BytesIO" not in last
    assert not dest.exists()
    assert len(open(log).read().splitlines()) == 1 + 3  # header line + one per image
    with pytest.raises(SystemExit, match="none of the 3 images"):  # zip output: neither zip nor .incomplete
        tools_main(["convert", "--source", str(source), "--dest", str(tmp_path / "images.zip"), "--resolution", "8x8",
                    "--workers", "0"])
    assert sorted(os.listdir(tmp_path)) == ["images.skipped.txt", "images.zip.skipped.txt", "raw"]


def test_convert_dest_under_a_file_is_one_line(tmp_path):
    """Unwritable --dest simulated by a path under a regular file (NotADirectoryError; root ignores chmod)."""
    (tmp_path / "raw" / "n01").mkdir(parents=True)
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "raw" / "n01" / "x.png")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as info:
        tools_main(["convert", "--source", str(tmp_path / "raw"), "--dest", str(tmp_path / "file" / "images"),
                    "--resolution", "8x8", "--workers", "0"])
    assert str(info.value) == (f"dataset_tools.py convert: error: cannot write to {tmp_path / 'file' / 'images'} "
                               "(not a directory); choose a writable place with --dest")


# ---------------------------------------------------------------------------- evaluator output

def _images(n, side=16, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, side, side, 3)).astype(np.uint8)


def test_evaluator_refuses_an_unwritable_output_before_any_work(tmp_path, monkeypatch, capsys):
    """Default output in a read-only sample folder, simulated by fileio's open() raising PermissionError;
    an explicit --output under a regular file (NotADirectoryError)."""
    ref, smp = str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz")
    np.savez(ref, _images(4))
    np.savez(smp, _images(4, seed=1))
    called = []
    monkeypatch.setattr(cli, "evaluate", lambda *a, **k: called.append(a))

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    with monkeypatch.context() as m:
        m.setattr(fileio, "open", denied, raising=False)
        assert cli.main([ref, smp]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: cannot write to {tmp_path} (permission denied); "
                   "choose a writable place with --output PATH.json\n")
    (tmp_path / "file").write_text("x")
    assert cli.main([ref, smp, "--output", str(tmp_path / "file" / "m.json")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: cannot write to {tmp_path / 'file'} (it is a file, not a folder); "
                   "choose a writable place with --output PATH.json\n")
    assert called == []  # nothing was computed
    assert sorted(os.listdir(tmp_path)) == ["file", "ref.npz", "samples.npz"]


def test_evaluator_output_flag_provenance_and_missing_input(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli.metrics, "_sqrtm", lambda m: np.diag(np.sqrt(np.abs(np.diag(m)))))  # FID value unused
    weights = inc.save_random_inception_weights(str(tmp_path / "random.pth"), seed=0)
    ref, smp = str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz")
    provenance = {"ckpt": "exp/checkpoints/0400000.pt", "cfg_scale": 1.8, "mode": "sde", "note": "é"}
    np.savez(ref, _images(4))
    np.savez(smp, _images(4, seed=1), provenance=np.frombuffer(json.dumps(provenance).encode(), np.uint8))
    out = tmp_path / "results" / "run1.json"
    assert cli.main([ref, smp, "--inception-weights", weights, "--batch-size", "4", "--device", "cpu", "--no-cache",
                     "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["samples_provenance"] == provenance
    assert metrics["reference"] == {"path": ref, "bytes": os.path.getsize(ref)}
    assert f"FID: {metrics['fid']}" in (tmp_path / "results" / "run1.txt").read_text()
    assert not (tmp_path / "samples.metrics.json").exists()
    assert sorted(os.listdir(tmp_path / "results")) == ["run1.json", "run1.txt"]  # no temporaries left
    capsys.readouterr()

    logged = []
    np.savez(smp, _images(4, seed=1), provenance=np.frombuffer(b"{not json", np.uint8))
    assert cli.read_provenance(smp, logged.append) is None and "not UTF-8 JSON" in logged[0]
    os.remove(smp)
    assert cli.main([ref, smp, "--output", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {smp}: no such file")


# ---------------------------------------------------------------------------- atomic writes

class _FullDiskFile(io.FileIO):
    """A file on a disk with `room` bytes left: the write that passes it fails with ENOSPC."""

    room = 4096

    def write(self, data):
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def _full_disk(monkeypatch):
    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, mode="r", *a, **k: _FullDiskFile(fd, "wb"))


def test_checkpoint_save_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "0000100.pt")
    atomic_save({"steps": 100, "w": torch.ones(8)}, path)
    big = {"steps": 200, "w": torch.zeros(10_000), "opt": {"m": torch.zeros(3000, dtype=torch.float64)}}
    _full_disk(monkeypatch)
    with pytest.raises(fileio.DiskFull) as info:
        atomic_save(big, path)
    monkeypatch.undo()
    message = str(info.value)
    free = fileio.human_bytes(shutil.disk_usage(tmp_path).free)
    assert one_line(message)
    assert fileio.payload_bytes(big) == 40_000 + 24_000  # the tensors' bytes: 62.5 KiB
    assert message == (f"no space left on device while writing {path}: {free} free there, 62.5 KiB needed; "
                       "free some space or write elsewhere (previous file kept)")
    assert load_checkpoint_file(path)["steps"] == 100
    assert torch.equal(load_checkpoint_file(path)["w"], torch.ones(8))
    assert os.listdir(tmp_path) == ["0000100.pt"]  # the temporary is gone


def test_atomic_write_failures(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    # a fresh file on a full disk: nothing left behind, needed size = what was written before the failure
    _full_disk(monkeypatch)
    with pytest.raises(fileio.DiskFull, match=r"needed; free some space or write elsewhere \(nothing written\)$") as e:
        fileio.atomic_write(path, lambda f: [f.write(b"x" * 1024) for _ in range(10)])
    assert "more than 4.0 KiB needed" in str(e.value)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []
    # quota exceeded at fsync (NFS reports it there): DiskFull too
    fileio.atomic_write(path, lambda f: f.write(b"old"))

    def quota(fd):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(fileio.os, "fsync", quota)
    with pytest.raises(fileio.DiskFull, match=r"^disk quota exceeded while writing .*metrics.json: .* free there, "
                                               r"more than 3 B needed"):
        fileio.atomic_write(path, lambda f: f.write(b"new"))
    monkeypatch.undo()
    # any other error passes through unchanged
    with pytest.raises(ZeroDivisionError):
        fileio.atomic_write(path, lambda f: (f.write(b"partial"), 1 / 0))
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["metrics.json"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_save({"w": torch.ones(2)}, str(tmp_path / "ckpt.pt"))
        fileio.atomic_write(tmp_path / "m.json", lambda f: f.write(b"{}"))
        with open(tmp_path / "plain", "wb"):
            pass
    finally:
        os.umask(old)
    for name in ("ckpt.pt", "m.json", "plain"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name


# ---------------------------------------------------------------------------- writability and stale temporaries

def test_check_writable(tmp_path, monkeypatch):
    """Unwritable folders simulated by a path under a regular file and by fileio's open() raising PermissionError."""
    nested = tmp_path / "a" / "b"
    fileio.check_writable(nested, "--results-dir")
    assert nested.is_dir() and os.listdir(nested) == []  # created, probe removed
    (tmp_path / "f").write_text("x")
    with pytest.raises(fileio.OutputNotWritable) as info:
        fileio.check_writable(tmp_path / "f" / "sub", "--results-dir")
    assert str(info.value) == (f"cannot write to {tmp_path / 'f' / 'sub'} (not a directory); "
                               "choose a writable place with --results-dir")

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(fileio, "open", read_only, raising=False)
    with pytest.raises(fileio.OutputNotWritable, match=r"\(read-only file system\); choose a writable place with "
                                                       r"--sample-dir$"):
        fileio.check_writable(nested, "--sample-dir")


def _age(path, hours):
    t = time.time() - hours * 3600
    os.utime(path, (t, t))


def test_remove_stale_temps_keeps_live_owners_and_removes_dead_ones(tmp_path):
    live = subprocess.Popen(["sleep", "60"])
    try:
        dead = subprocess.Popen(["true"])
        dead.wait(timeout=10)
        assert fileio.pid_alive(live.pid) and not fileio.pid_alive(dead.pid)
        host = fileio.temp_path("x").split("-")[1]
        files = {
            f".tmp-{host}-{live.pid}-0000200.pt": (100, 0, True),     # live writer on this host
            f".tmp-{host}-{dead.pid}-0000200.pt": (2000, 0, False),   # killed mid-save
            ".tmp-otherhost-12-0000200.pt": (10, 1, True),            # another host, recent: cannot tell
            ".tmp-otherhost-13-0000100.pt": (10, 25, False),          # another host, untouched for 25 h
            ".tmp-k3j_9x2a.pt": (10, 0.5, True),                      # legacy mkstemp name, recent
            ".tmp-q0w_e1r2.pt": (3 * 1024 ** 2, 2, False),            # legacy mkstemp name, 2 h old
            f"samples.npz.tmp-{dead.pid}": (10, 0.5, True),           # legacy npz temporary, recent
            f"old.npz.tmp-{dead.pid}": (10, 2, False),                # legacy npz temporary, 2 h old
            f"live.npz.tmp-{live.pid}": (10, 2, True),                # legacy name, owner pid still runs here
            "0000100.pt": (10, 100, True),                            # not a temporary
        }
        for name, (size, hours, _) in files.items():
            (tmp_path / name).write_bytes(b"\0" * size)
            _age(tmp_path / name, hours)
        logged = []
        removed = fileio.remove_stale_temps(str(tmp_path), log=logged.append)
        gone = sorted(str(tmp_path / n) for n, (_, _, keep) in files.items() if not keep)
        assert sorted(removed) == gone and len(logged) == 4
        assert sorted(os.listdir(tmp_path)) == sorted(n for n, (_, _, keep) in files.items() if keep)
        killed = next(line for line in logged if f"-{dead.pid}-0000200.pt" in line)
        assert killed == (f"removed stale temporary file {tmp_path}/.tmp-{host}-{dead.pid}-0000200.pt "
                          f"(2.0 KiB; its process {dead.pid} has exited)")
        assert any(".tmp-q0w_e1r2.pt (3.0 MiB; old-style name, untouched for 2.0 h)" in line for line in logged)
        assert fileio.remove_stale_temps(str(tmp_path / "missing")) == []
    finally:
        live.kill()
        live.wait(timeout=10)


def test_temp_path_names_the_owner(tmp_path):
    tmp = fileio.temp_path(str(tmp_path / "0001000.pt"))
    name = os.path.basename(tmp)
    assert os.path.dirname(tmp) == str(tmp_path) and name.endswith(f"-{os.getpid()}-0001000.pt")
    host, pid = fileio.temp_owner(name)
    assert pid == os.getpid() and "-" not in host and name == f".tmp-{host}-{pid}-0001000.pt"
    assert fileio.temp_owner("0001000.pt") is None and fileio.temp_owner(".tmp-x.pt") is None
