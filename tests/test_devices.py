"""A GPU that torch cannot use is one line at start-up (the CUDA probe mocked), and training's
precision follows the device when the command leaves it out."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import devices  # noqa: E402
import train  # noqa: E402
from test_train import make_latent_data, tiny_argv  # noqa: E402
from test_reliability import without  # noqa: E402
from test_train_faults import cli, reset_accelerate  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate()


@pytest.fixture
def old_driver(monkeypatch):
    """A machine with an NVIDIA GPU whose driver supports CUDA 11.4 only."""
    monkeypatch.setattr(devices, "gpu_present", lambda: True)
    monkeypatch.setattr(devices, "cuda_usable", lambda: (False, "The NVIDIA driver on your system is too old "
                                                                 "(found version 11040)."))
    monkeypatch.setattr(devices, "driver_cuda_version", lambda: "11.4")
    monkeypatch.setattr(torch.version, "cuda", "13.2")


def test_cuda_problem_names_both_versions_and_the_fix(old_driver):
    assert devices.cuda_problem() == (
        f"an NVIDIA GPU is present but torch {torch.__version__} cannot use it: it is built for CUDA 13.2 and the "
        "NVIDIA driver supports CUDA up to 11.4 (The NVIDIA driver on your system is too old (found version "
        "11040).); install PyTorch's build for your CUDA first (README, \"Install and test\"), or set "
        "CUDA_VISIBLE_DEVICES= to run on the CPU")


def test_no_problem_without_a_gpu_or_with_a_usable_one(monkeypatch):
    monkeypatch.setattr(devices, "cuda_usable", lambda: (False, None))
    monkeypatch.setattr(devices, "gpu_present", lambda: False)
    assert devices.cuda_problem() is None
    monkeypatch.setattr(devices, "gpu_present", lambda: True)
    monkeypatch.setattr(devices, "cuda_usable", lambda: (True, None))
    assert devices.cuda_problem() is None
    monkeypatch.undo()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert devices.gpu_present() is False  # every GPU hidden: the CPU is what the user asked for


def test_train_refuses_an_unusable_gpu_in_one_line(old_driver, tmp_path, capsys):
    data = make_latent_data(str(tmp_path / "data"))
    code, err = cli(tiny_argv(data, tmp_path, "x"), capsys)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("error: train.py: an NVIDIA GPU is present but torch") and "CUDA up to 11.4" in err
    assert not os.path.exists(tmp_path / "x")


def test_precision_follows_the_device_when_left_out(tmp_path, capsys):
    data = make_latent_data(str(tmp_path / "data"))
    argv = without(tiny_argv(data, tmp_path, "cpu-default", "--max-train-steps", 1), "--mixed-precision")
    train.main(train.parse_args(argv))
    out = capsys.readouterr().out
    assert "--mixed-precision no: no GPU here (the default fp16 is for GPUs" in out
    checkpoint = torch.load(tmp_path / "cpu-default" / "checkpoints" / "0000001.pt", weights_only=False)
    assert vars(checkpoint["args"])["mixed_precision"] == "no" and checkpoint["provenance"]["mixed_precision"] == "no"
    reset_accelerate()
    code, err = cli(tiny_argv(data, tmp_path, "fp16", "--mixed-precision", "fp16"), capsys)  # asked for: refused
    assert code == 1 and "--mixed-precision fp16 needs a GPU; use bf16 or no on CPU" in err


def test_generate_refuses_an_unusable_gpu_by_default_in_one_line(old_driver, tmp_path, capsys):
    import generate

    (tmp_path / "c.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as info:
        generate.cli(["--ckpt", str(tmp_path / "c.pt"), "--sample_dir", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("generate.py: error: generate.py: an NVIDIA GPU is present but torch")
