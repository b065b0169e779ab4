"""The embedded default, shortened: every stage runs for real and leaves sane outputs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_digit_data_and_classifier_are_real():
    images, labels = demo.digit_images()
    assert images.shape == (1797, 32, 32, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert (images[..., 0] == images[..., 2]).all() and images.max() > 200
    clf, held_out = demo.fit_digit_classifier(images, labels)
    assert held_out > 0.9  # the judge of class consistency must itself be good on real digits
    assert demo.class_consistency(clf, images, labels) > 0.9
    assert demo.class_consistency(clf, images, (labels + 1) % 10) < 0.1


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "main_LSEP.sh", "demo", "--quick", "--out", str(out)], cwd=ROOT, env=dict(
        env, PYTHON=sys.executable), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "summary.json") as f:
        return out, json.load(f), proc.stdout


def test_quick_demo_outputs_exist_and_are_sane(quick_run):
    out, summary, stdout = quick_run
    assert "LSEP demo summary" in stdout and set(summary["results"]) == {"lsep", "baseline"}
    n = summary["settings"]["samples"]
    for name, result in summary["results"].items():
        samples = np.load(result["samples_npz"])["arr_0"]
        assert samples.shape == (n, 32, 32, 3) and samples.dtype == np.uint8
        assert samples.std() > 1  # not a constant image
        grid = Image.open(result["grid"])
        assert grid.size == (10 * 32 * 2, 10 * 32 * 2) and grid.mode == "RGB"
        assert 0.0 <= result["class_consistency"] <= 1.0
        top1 = np.array(result["probe_top1"])
        assert top1.shape == (2, 4) and ((0 <= top1) & (top1 <= 1)).all()
        assert Image.open(result["probe_png"]).size[0] > 100
        assert np.isfinite(result["final_loss"]) and result["final_loss"] > 0
        assert os.path.isfile(result["checkpoint"])
    assert summary["results"]["lsep"]["final_probe_accuracy"] is not None
    assert summary["results"]["baseline"]["final_probe_accuracy"] == 0.0  # --no-probe: no probe branch
    assert summary["real_digit_classifier_accuracy"] > 0.9
    # The data went through preprocessing/dataset_tools.py into the ImageNet layout.
    with open(out / "data" / "images" / "dataset.json") as f:
        assert len(json.load(f)["labels"]) == 1797


def test_own_class_folders_run_the_same_pipeline_scaled_to_the_data(tmp_path):
    """`demo.py --source`: three classes of 20x12 images (not square, not the demo's size) in
    class folders; converted at 16 px, the model's crop scaled to the 4x4 grid, 3 classes."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cats", "dogs", "owls"]):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(8):
            image = np.full((12, 20, 3), 60 * c + 40, np.uint8) + rng.integers(0, 20, (12, 20, 3), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / "src" / name / f"{i}.png")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "demo.py", "--source", str(tmp_path / "src"), "--resolution", "16",
                           "--quick", "--steps", "3", "--samples", "6", "--no-baseline", "--out", str(out)],
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.load(open(out / "summary.json"))
    assert summary["settings"]["num_classes"] == 3 and summary["settings"]["samples"] == 6
    assert summary["settings"]["device"] == "cpu" and summary["data"] == str(tmp_path / "src")
    result = summary["results"]["lsep"]
    assert np.load(result["samples_npz"])["arr_0"].shape == (6, 16, 16, 3)
    assert Image.open(result["grid"]).size == (10 * 16 * 2, 3 * 16 * 2)
    assert np.isfinite(result["final_loss"]) and 0 <= result["class_consistency"] <= 1
    import torch
    checkpoint = torch.load(result["checkpoint"], weights_only=False)
    assert checkpoint["config"]["num_classes"] == 3 and checkpoint["config"]["input_size"] == 16
    assert (checkpoint["config"]["crop_start"], checkpoint["config"]["crop_end"]) == (3, 5)  # 3/4 of the 4x4 grid
    assert vars(checkpoint["args"])["mixed_precision"] == "no"
    assert len(json.load(open(out / "data" / "images" / "dataset.json"))["labels"]) == 24


def test_model_flags_scale_the_crop_to_the_grid():
    assert demo.model_flags(32) == demo.MODEL_FLAGS  # the demo's own 8x8 grid: crop from 6
    flags = demo.model_flags(64)
    assert flags[flags.index("--crop-start") + 1] == "12"  # 16x16 tokens: the paper's 12 of 16
