"""A checkpoint is trusted only when it is what it claims to be, and every flag is checked before
work starts: content hashes, another run's files, the recipe of a resumed run, flag ranges,
output paths, and the hints of the messages. Tiny latent runs on CPU (test_train's helpers)."""
import argparse
import json
import os
import shutil
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import generate  # noqa: E402
import probe  # noqa: E402
import train  # noqa: E402
from flagcheck import AT_LEAST_1, BETA, POSITIVE, UNIT, Range, range_error  # noqa: E402
from models.checkpoint import (CheckpointError, load_checkpoint_file, load_model, seal, tree_sha256,  # noqa: E402
                               verify, weights_sha256)
from preprocessing.dataset_tools import main as tools_main  # noqa: E402
from test_train import assert_nested_equal, assert_states_equal, make_pixel_data  # noqa: E402
from test_train import tiny_argv  # noqa: E402
from test_train_faults import argv, ckpt, cli, folder_of, one_line, run  # noqa: E402
# the same fixtures: one intra-op thread, a fresh accelerate state per test, the tiny data, the unbroken run
from test_train_faults import fresh_accelerate_state, latent_dir, one_thread, unbroken  # noqa: E402,F401
from training.errors import TrainingError  # noqa: E402
from training.flags import explicit_flags, resume_recipe  # noqa: E402


def damage_tensor(path, tensor, fill=0xFF, nbytes=64):
    """Overwrite ``nbytes`` inside ``tensor``'s bytes in the zip file at ``path`` (its directory
    stays intact, so torch.load still reads the file). 0xFF bytes are float32 NaNs."""
    data = bytearray(open(path, "rb").read())
    needle = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0, "the tensor's bytes must occur once"
    data[at + 8:at + 8 + nbytes] = bytes([fill]) * nbytes
    open(path, "wb").write(bytes(data))


def copy_run(src, name, dst):
    shutil.copytree(os.path.join(src, name), os.path.join(dst, name))
    return os.path.join(dst, name)


def snapshot(folder):
    """{relative path: bytes} of every file under ``folder`` (what a refused resume must not change)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


#################################################################################
#                      Content hashes written with the file                     #
#################################################################################

def test_seal_records_the_provenance_weights_hash_and_verify_detects_any_change():
    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    opt = {"state": {0: {"exp_avg": torch.zeros(3), "step": torch.tensor(4.0)}}, "param_groups": [{"lr": 1e-4}]}
    sealed = seal({"ema": state, "opt": opt, "steps": 7, "args": argparse.Namespace(lr=1e-4)})
    assert sealed["integrity"]["ema"] == weights_sha256(state)  # the hash sample sets already record
    assert set(sealed["integrity"]) == {"ema", "opt", "steps", "args"}
    assert verify(sealed, "x.pt") == sealed["integrity"]
    assert verify({"ema": state}, "x.pt") is None  # the authors' files: nothing recorded, nothing verified
    for change in (lambda c: c["ema"]["a"].__setitem__((0, 0), 0.5), lambda c: c["opt"]["param_groups"][0].update(lr=1.0),
                   lambda c: c["opt"]["state"][0]["step"].fill_(5.0), lambda c: c.update(steps=8)):
        damaged = seal({"ema": {k: v.clone() for k, v in state.items()}, "opt": {
            "state": {0: {k: v.clone() for k, v in opt["state"][0].items()}}, "param_groups": [dict(lr=1e-4)]},
            "steps": 7})
        change(damaged)
        with pytest.raises(CheckpointError, match=r"^checkpoint x\.pt is damaged: its '(ema|opt|steps)' entry"):
            verify(damaged, "x.pt")
    # the tree hash sees structure, types and values, not only tensor bytes
    assert tree_sha256({"a": 1}) != tree_sha256({"a": 1.0}) != tree_sha256({"b": 1.0})
    assert tree_sha256([torch.zeros(2)]) != tree_sha256([torch.zeros(2, dtype=torch.float64)])


def test_damaged_checkpoint_bytes_are_found_on_every_load(latent_dir, unbroken, tmp_path, capsys):
    copy_run(unbroken, "full", tmp_path)
    newest = os.path.join(folder_of(tmp_path, "full"), "0000004.pt")
    ema_tensor = torch.load(newest, weights_only=True)["ema"]["blocks.0.attn.qkv.weight"]
    damage_tensor(newest, ema_tensor)
    loaded = torch.load(newest, map_location="cpu", weights_only=True)  # what passed before: torch.load is happy
    assert torch.isnan(loaded["ema"]["blocks.0.attn.qkv.weight"]).any()

    # resume, explicit step: one line naming the file, nothing trained
    code, err = cli(argv(latent_dir, tmp_path, "full", "--resume-step", 4, steps=6), capsys)
    assert code == 1 and one_line(err)
    assert err.startswith(f"error: --resume-step 4: checkpoint {newest} is damaged: its 'ema' entry does not match")
    assert err.rstrip().endswith("pass another step (2) or --resume-step -1 for the newest readable one")
    # resume -1: skips it with a warning and continues from step 2, equal to the unbroken run
    run(*argv(latent_dir, tmp_path, "full", "--resume-step", -1))
    out = capsys.readouterr().out
    assert f"skipping checkpoint {newest} is damaged" in out and "resuming from" in out
    assert_states_equal(ckpt(tmp_path, "full", 4)["ema"], ckpt(unbroken, "full", 4)["ema"])
    assert_nested_equal(ckpt(tmp_path, "full", 4)["opt"], ckpt(unbroken, "full", 4)["opt"])

    # generate and probe on a damaged file: one line, their exit codes, no samples written
    damage_tensor(newest, ckpt(unbroken, "full", 4)["ema"]["blocks.0.attn.qkv.weight"])
    with pytest.raises(SystemExit) as info:
        generate.cli(["--ckpt", newest, "--num-fid-samples", "2", "--device", "cpu", "--sample_dir",
                      str(tmp_path / "samples"), "--cfg-scale", "1"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and one_line(err) and f"checkpoint {newest} is damaged: its 'ema' entry" in err
    assert not any(name.endswith(".png") for _, _, files in os.walk(tmp_path / "samples") for name in files)
    with pytest.raises(SystemExit) as info:
        probe.main(["--ckpt", newest, "--data-dir", latent_dir, "--num-train", "8", "--num-test", "8",
                    "--num-workers", "0", "--device", "cpu", "--out", str(tmp_path / "probe")])
    assert f"checkpoint {newest} is damaged" in str(info.value.code) and one_line(str(info.value.code))
    # an intact checkpoint loads verified, its recorded hash is the identity's hash
    loaded = load_model(os.path.join(folder_of(unbroken, "full"), "0000004.pt"))
    assert loaded.verified and loaded.weights_sha256 == ckpt(unbroken, "full", 4)["integrity"]["ema"]


#################################################################################
#                       Another run's checkpoint in this folder                 #
#################################################################################

def test_another_runs_checkpoint_is_refused_and_nothing_is_changed(latent_dir, unbroken, tmp_path, capsys):
    run(*argv(latent_dir, tmp_path, "other", steps=2))  # another run: its own run id
    folder = copy_run(unbroken, "full", tmp_path)
    other = os.path.join(folder_of(tmp_path, "other"), "0000002.pt")
    before = snapshot(folder)
    # under a later step's name: the step inside is not the name's
    shutil.copy(other, os.path.join(folder_of(tmp_path, "full"), "0000006.pt"))
    before["checkpoints/0000006.pt"] = open(other, "rb").read()
    code, err = cli(argv(latent_dir, tmp_path, "full", "--resume-step", -1, steps=8), capsys)
    assert code == 1 and one_line(err)
    assert "0000006.pt holds step 2, not the step 6 its name says" in err
    assert snapshot(folder) == before  # stats.jsonl, checkpoints, args.json: all as they were
    os.remove(os.path.join(folder_of(tmp_path, "full"), "0000006.pt"))
    del before["checkpoints/0000006.pt"]
    # under its own step's name: the run id is not this folder's
    shutil.copy(other, os.path.join(folder_of(tmp_path, "full"), "0000002.pt"))
    before["checkpoints/0000002.pt"] = open(other, "rb").read()
    theirs = ckpt(tmp_path, "other", 2)["provenance"]["run_id"]
    ours = json.load(open(os.path.join(folder, "args.json")))["provenance"]["run_id"]
    code, err = cli(argv(latent_dir, tmp_path, "full", "--resume-step", 2, steps=8), capsys)
    assert code == 1 and one_line(err) and theirs != ours
    assert f"belongs to run {theirs}, not to this folder's run {ours}" in err
    assert snapshot(folder) == before


#################################################################################
#                          The recipe of a resumed run                          #
#################################################################################

RECIPE = ["--learning-rate", "0.002", "--weighting", "lognormal", "--weights-type", "steps", "--weight-start", "0.1",
          "--weight-end", "0.3", "--n-weights", "4", "--max-grad-norm", "0.5"]


def without(args, *flags):
    """``args`` without the given flags and their values."""
    out, skip = [], False
    for item in map(str, args):
        if skip:
            skip = False
        elif item in flags:
            skip = True
        else:
            out.append(item)
    return out


def test_resume_takes_the_recipe_from_the_checkpoint_and_logs_changes(latent_dir, tmp_path, capsys):
    full = argv(latent_dir, tmp_path, "unbroken", *RECIPE)
    run(*full)
    run(*argv(latent_dir, tmp_path, "broken", *RECIPE))
    os.remove(os.path.join(folder_of(tmp_path, "broken"), "0000004.pt"))  # as if it died after step 2's save
    # resumed with only the data, model and launch flags: the recipe comes back from the checkpoint
    bare = without(argv(latent_dir, tmp_path, "broken", "--resume-step", -1), "--ema-decay", "--batch-size",
                   "--max-train-steps")
    assert "--learning-rate" not in bare and "--weighting" not in bare
    capsys.readouterr()
    run(*bare)
    out = capsys.readouterr().out
    for flag, value in [("--learning-rate", "0.002"), ("--weighting", "lognormal"), ("--ema-decay", "0.5"),
                        ("--max-train-steps", "4"), ("--n-weights", "4")]:
        assert f"{flag} {value}: taken from" in out, flag
    a, b = ckpt(tmp_path, "unbroken", 4), ckpt(tmp_path, "broken", 4)
    assert "Resumed from" in out and "at step 2" in out
    assert_states_equal(a["model"], b["model"])
    assert_nested_equal(a["opt"], b["opt"])
    assert vars(b["args"])["learning_rate"] == 0.002 and b["provenance"]["recipe_changes"] == []
    # an explicit change is logged and recorded in provenance, and stays on record
    run(*argv(latent_dir, tmp_path, "broken", *RECIPE[2:], "--learning-rate", "0.001", "--resume-step", -1,
              steps=6))
    assert "--learning-rate 0.001 changes the resumed run's 0.002 (from step 4)" in capsys.readouterr().out
    changes = [{"step": 4, "flag": "--learning-rate", "was": 0.002, "now": 0.001},
               {"step": 4, "flag": "--max-train-steps", "was": 4, "now": 6}]  # training longer is a change too
    assert ckpt(tmp_path, "broken", 6)["provenance"]["recipe_changes"] == changes
    assert ckpt(tmp_path, "broken", 6)["opt"]["param_groups"][0]["lr"] == 0.001


def test_precision_must_be_restated_when_it_differs():
    parser_args = train.parse_args(["--exp-name", "x"])
    assert "mixed_precision" not in parser_args.explicit_flags and parser_args.mixed_precision == "fp16"
    checkpoint = {"args": argparse.Namespace(mixed_precision="bf16", learning_rate=1e-4)}
    with pytest.raises(TrainingError, match=r"^X\.pt was trained with --mixed-precision bf16; pass "
                                            r"--mixed-precision bf16 to continue it"):
        resume_recipe(parser_args, checkpoint, "X.pt", 10, log=None)
    given = train.parse_args(["--exp-name", "x", "--mixed-precision", "no", "--learning-rate", "1e-4"])
    assert {"mixed_precision", "learning_rate", "exp_name"} <= set(given.explicit_flags)

    class Log:
        lines = []

        def warning(self, text):
            self.lines.append(text)

    resumed, changes = resume_recipe(given, checkpoint, "X.pt", 10, Log())
    assert resumed.mixed_precision == "no" and changes == [{"step": 10, "flag": "--mixed-precision", "was": "bf16",
                                                              "now": "no"}]


def test_explicit_flags_are_what_the_command_says():
    parser = argparse.ArgumentParser()
    parser.add_argument("--a", type=int, default=1)
    parser.add_argument("--b", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--c", default="x")
    assert explicit_flags(parser, ["--a", "1", "--no-b"]) == ["a", "b"]  # given, even when equal to the default
    assert explicit_flags(parser, []) == []
    assert parser.parse_args([]).a == 1  # the defaults are restored


#################################################################################
#                            Ranges of numeric flags                            #
#################################################################################

def test_range_rules():
    assert POSITIVE.holds(1e-9) and not POSITIVE.holds(0) and not POSITIVE.holds(float("nan"))
    assert UNIT.holds(0) and UNIT.holds(1) and not UNIT.holds(1.01) and not BETA.holds(1.0) and BETA.holds(0.999)
    assert not AT_LEAST_1.holds(float("inf")) and Range(0, low_open=True, allow_inf=True).holds(float("inf"))
    assert [r.describe() for r in (POSITIVE, UNIT, BETA, AT_LEAST_1)] == ["> 0", "in [0, 1]", "in [0, 1)", ">= 1"]
    assert range_error("max_grad_norm", -1.0, POSITIVE) == "--max-grad-norm must be > 0, got -1.0"
    assert range_error("timesteps", [0.5, 2.0], UNIT) == "--timesteps must be in [0, 1], got 2.0"
    assert range_error("learning_rate_class", None, POSITIVE) is None  # not given


@pytest.mark.parametrize("flag, value, message", [
    ("--max-grad-norm", "-1", "--max-grad-norm must be > 0, got -1.0"),
    ("--weight-class", "-0.02", "--weight-class must be >= 0, got -0.02"),
    ("--weight-start", "-1", "--weight-start must be >= 0"), ("--weight-end", "-1", "--weight-end must be >= 0"),
    ("--learning-rate", "-0.0001", "--learning-rate must be >= 0"), ("--adam-beta2", "1", "--adam-beta2 must be in [0, 1)"),
    ("--n-weights", "0", "--n-weights must be >= 1"), ("--seed", "-1", "--seed must be >= 0"),
    ("--uncond-prob", "1.5", "--uncond-prob must be in [0, 1], got 1.5"), ("--num-classes", "0", "--num-classes must be >= 1"),
    ("--learning-rate", "nan", "--learning-rate must be >= 0, got nan"), ("--exp-name", "", "--exp-name '' must name"),
    ("--exp-name", "..", "--exp-name '..' must name"), ("--exp-name", "../up", "--exp-name '../up' must name"),
    ("--exp-name", "/abs", "--exp-name '/abs' must name"),
])
def test_train_flags_out_of_range_are_one_usage_line(flag, value, message, capsys):
    argv_ = ["--exp-name", "x", flag, value] if flag != "--exp-name" else ["--exp-name", value]
    with pytest.raises(SystemExit) as info:
        train.parse_args(argv_)
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err.splitlines()[-1]
    train.parse_args(["--exp-name", "nested/run", "--max-grad-norm", "inf"])  # inside --output-dir; no clipping


@pytest.mark.parametrize("tool, args, message", [
    (probe.parse_args, ["--ckpt", "c", "--data-dir", "d", "--epochs", "0"], "--epochs must be >= 1, got 0"),
    (probe.parse_args, ["--ckpt", "c", "--data-dir", "d", "--timesteps", "0", "1.5"], "--timesteps must be in [0, 1]"),
    (probe.parse_args, ["--ckpt", "c", "--data-dir", "d", "--num-test", "0"], "--num-test must be >= 1"),
    (tools_main, ["convert", "--source", "s", "--dest", "d", "--resolution", "8", "--max-images", "0"],
     "--max-images must be >= 1, got 0"),
    (tools_main, ["encode", "--source", "s", "--dest", "d", "--max-images", "-3"], "--max-images must be >= 1"),
    (tools_main, ["encode", "--source", "s", "--dest", "d", "--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_other_tools_check_their_ranges_at_parse_time(tool, args, message, capsys):
    with pytest.raises(SystemExit) as info:
        tool(args)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_posthoc_step_range(capsys):
    import posthoc_ema
    with pytest.raises(SystemExit):
        posthoc_ema.parse_args(["--exp-dir", "e", "--sigma-rel", "0.05", "--step", "-1"])
    assert "--step must be >= 0, got -1" in capsys.readouterr().err


def test_fresh_run_with_more_classes_than_the_data_says_so(latent_dir, tmp_path, capsys):
    run(*without(argv(latent_dir, tmp_path, "wide", steps=1), "--num-classes"), "--num-classes", "9")
    assert "--num-classes 9 is larger than the 5 classes of" in capsys.readouterr().out


#################################################################################
#                       Outputs checked, nothing left behind                    #
#################################################################################

def test_refused_start_leaves_no_experiment_folder(latent_dir, tmp_path, capsys):
    code, err = cli(tiny_argv(str(tmp_path / "no-such-data"), tmp_path, "refused"), capsys)
    assert code == 1 and "--data-dir" in err
    assert not os.path.exists(tmp_path / "refused")
    code, err = cli(without(tiny_argv(latent_dir, tmp_path, "refused"), "--model"), capsys)
    assert code == 1 and "--model is required" in err and not os.path.exists(tmp_path / "refused")


def test_probe_out_is_checked_before_any_work(latent_dir, unbroken, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as info:
        probe.main(["--ckpt", os.path.join(folder_of(unbroken, "full"), "0000004.pt"), "--data-dir", latent_dir,
                    "--num-train", "8", "--num-test", "8", "--num-workers", "0", "--device", "cpu",
                    "--out", str(tmp_path / "file")])
    assert str(info.value.code) == (f"probe.py: error: cannot write to {tmp_path / 'file'} (it is a file, not a "
                                    "folder); choose a writable place with --out")


#################################################################################
#                        Hints that send the user the right way                 #
#################################################################################

def test_pixel_folder_hints_name_each_tools_own_flag(tmp_path, unbroken, capsys):
    data = make_pixel_data(str(tmp_path / "pixels"))
    code, err = cli(tiny_argv(data, tmp_path, "pix"), capsys)
    assert code == 1 and one_line(err)
    assert "encode them: python preprocessing/dataset_tools.py encode" in err and "--vae none" in err
    assert "mode=" not in err and "IMAGENET" not in err
    with pytest.raises(SystemExit) as info:
        probe.main(["--ckpt", os.path.join(folder_of(unbroken, "full"), "0000004.pt"), "--data-dir", data,
                    "--data-mode", "latent", "--num-workers", "0", "--device", "cpu", "--out", str(tmp_path / "p")])
    assert "--data-mode pixel" in str(info.value.code) and "--vae none" not in str(info.value.code)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = cli(tiny_argv(str(empty), tmp_path, "empty"), capsys)
    assert code == 1 and "holds neither images/ nor vae-sd/" in err and "--source CLASS_FOLDERS" in err


def test_a_folder_given_as_checkpoint_is_named_as_a_folder(unbroken):
    folder = folder_of(unbroken, "full")
    with pytest.raises(CheckpointError, match=r"is a folder, not a \.pt file; pass a file inside it, e.g. .*0000004\.pt"):
        load_checkpoint_file(folder)
    with pytest.raises(SystemExit) as info:
        probe.main(["--ckpt", folder, "--data-dir", folder, "--out", os.path.join(unbroken, "p")])
    assert "is a folder, not a .pt file" in str(info.value.code)


def test_generate_hints_for_a_pixel_model_and_a_folder(tmp_path, capsys):
    data = make_pixel_data(str(tmp_path / "pixels"))
    run(*without(tiny_argv(data, tmp_path, "pix", "--max-train-steps", 1), "--resolution"), "--vae", "none")
    folder = folder_of(tmp_path, "pix")
    capsys.readouterr()
    common = ["--num-fid-samples", "2", "--device", "cpu", "--sample_dir", str(tmp_path / "s"), "--cfg-scale", "1"]
    with pytest.raises(SystemExit) as info:
        generate.cli(["--ckpt", os.path.join(folder, "0000001.pt"), "--vae", "ema", *common])
    err = capsys.readouterr().err
    assert info.value.code == 2 and one_line(err)
    assert "--vae ema: the checkpoint's model is pixel-space (3 input channels" in err and "drop --vae" in err
    assert "huggingface" not in err.lower() and "download" not in err.lower()
    with pytest.raises(SystemExit) as info:
        generate.cli(["--ckpt", folder, *common])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"checkpoint {folder} is a folder, not a .pt file; pass a file inside it" in err


def test_init_from_verifies_the_weights_it_copies(unbroken, tmp_path):
    from models import SiT
    from training.init_from import init_from

    path = str(tmp_path / "src.pt")
    shutil.copy(os.path.join(folder_of(unbroken, "full"), "0000004.pt"), path)
    source = ckpt(unbroken, "full", 4)
    model = SiT(**{k: v for k, v in source["config"].items() if k != "model"})
    ema = SiT(**{k: v for k, v in source["config"].items() if k != "model"})
    damage_tensor(path, next(iter(source["opt"]["state"].values()))["exp_avg"])  # the optimizer state: not read
    assert init_from(path, "ema", model, ema)["copied"] > 0
    assert torch.equal(model.state_dict()["pos_embed"], ema.state_dict()["pos_embed"])
    damage_tensor(path, source["ema"]["blocks.0.attn.qkv.weight"])
    with pytest.raises(TrainingError, match=rf"^--init-from: checkpoint {path} is damaged: its 'ema' entry"):
        init_from(path, "ema", model, ema)
