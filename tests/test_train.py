"""train.py and training/ on CPU with a tiny SiT (hidden 32, depth 2, 8x8 inputs): multi-process
equivalence, exact resume, crash-safe checkpoints, the non-finite guard, trackers, checkpoint layout."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
import training.data_order as t_data_order
import training.loop as t_loop
import training.errors as t_errors
import training.optimizer as t_optimizer
import seeding
import training.setup as t_setup
import training.trackers as t_trackers
from models import ModelConfig, SiT
from models.checkpoint import load_checkpoint_file, load_model_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_ITEMS, NUM_LABELS = 24, 5


#################################################################################
#                               Tiny datasets                                   #
#################################################################################

def make_latent_data(root, n=NUM_ITEMS, side=8, channels=4):
    """<root>/vae-sd/: random float32 moments (mean, std) + dataset.json, as `encode` writes them."""
    rng = np.random.default_rng(0)
    folder, labels = os.path.join(root, "vae-sd"), []
    for i in range(n):
        rel = f"{i:08d}"[:5] + f"/img-mean-std-{i:08d}.npy"
        os.makedirs(os.path.join(folder, rel.split("/")[0]), exist_ok=True)
        moments = rng.standard_normal((2 * channels, side, side)).astype(np.float32)
        moments[channels:] = np.abs(moments[channels:]) * 0.1
        np.save(os.path.join(folder, rel), moments)
        labels.append([rel, i % NUM_LABELS])
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"labels": labels}, f)
    return root


def make_pixel_data(root, n=NUM_ITEMS, side=8):
    """<root>/images/: random RGB PNGs + dataset.json, as `convert` writes them."""
    from PIL import Image
    rng = np.random.default_rng(1)
    folder, labels = os.path.join(root, "images"), []
    for i in range(n):
        rel = f"{i:08d}"[:5] + f"/img{i:08d}.png"
        os.makedirs(os.path.join(folder, rel.split("/")[0]), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(os.path.join(folder, rel))
        labels.append([rel, i % NUM_LABELS])
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"labels": labels}, f)
    return root


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory):
    return make_latent_data(str(tmp_path_factory.mktemp("latents")))


@pytest.fixture(scope="module")
def pixel_dir(tmp_path_factory):
    return make_pixel_data(str(tmp_path_factory.mktemp("pixels")))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process train.main builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tiny_argv(data_dir, out_dir, name, *extra):
    return ["--exp-name", name, "--output-dir", str(out_dir), "--data-dir", str(data_dir), "--resolution", "64",
            "--model", "SiT-S/2", "--hidden-size", "32", "--depth", "2", "--num-heads", "2", "--encoder-depth", "1",
            "--num-classes", str(NUM_LABELS), "--batch-size", "8", "--num-workers", "0", "--report-to", "none",
            "--mixed-precision", "no", "--sampling-steps", "0", "--log-every", "1", "--crop-start", "2",
            "--ema-decay", "0.5", *map(str, extra)]


def run(*argv):
    return train.main(train.parse_args(list(argv)))


def torchrun_train(argv, nproc=2, timeout=240):
    """train.py under torchrun (gloo on CPU); kills torchrun and its workers on a timeout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               os.path.join(ROOT, "train.py"), *map(str, argv)]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers, started in their own session
        output, _ = proc.communicate()
    assert proc.returncode == 0, output[-3000:]
    return output


def ckpt(out_dir, name, step):
    return load_checkpoint_file(os.path.join(out_dir, name, "checkpoints", f"{step:07d}.pt"))


def stats(out_dir, name):
    with open(os.path.join(out_dir, name, "stats.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_states_equal(a, b, exact=True, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def assert_nested_equal(a, b, path="opt"):
    if torch.is_tensor(a):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_nested_equal(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_nested_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


#################################################################################
#                            training/ units                                    #
#################################################################################

def test_step_batch_sampler_shards_epochs_and_resume():
    full = t_data_order.StepBatchSampler(10, global_batch=4, num_shards=2, shards=[0, 1], seed=3)
    it = iter(full)
    stream = [i for _ in range(10) for i in next(it)]  # 5 steps x 2 shards x 2 = 20 samples = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # each epoch has its own permutation
    # two processes with one shard each see exactly the two halves of every global batch
    rank0 = iter(t_data_order.StepBatchSampler(10, 4, 2, [0], seed=3))
    rank1 = iter(t_data_order.StepBatchSampler(10, 4, 2, [1], seed=3))
    for step in range(5):
        assert next(rank0) + next(rank1) == stream[4 * step:4 * step + 4]
    # resuming at step 3 continues the same stream
    resumed = iter(t_data_order.StepBatchSampler(10, 4, 2, [0, 1], seed=3, start_step=3))
    assert next(resumed) + next(resumed) == stream[12:16]
    assert seeding.derive_seed(0, 1, 2) != seeding.derive_seed(0, 2, 1)


def test_update_ema_closed_form():
    ema, model = [torch.full((3,), 2.0), torch.zeros(2)], [torch.full((3,), 4.0), torch.ones(2)]
    t_loop.update_ema(ema, model, 0.75)
    assert torch.equal(ema[0], torch.full((3,), 2.5)) and torch.equal(ema[1], torch.full((2,), 0.25))


def test_authors_rules_classifier_lr_and_crop():
    def config_of(*flags, side=32):
        return t_setup.training_config(train.parse_args(["--exp-name", "x", *flags]), 4, side)

    b2 = config_of("--model", "SiT-B/2")
    assert t_optimizer.classifier_learning_rate(train.parse_args(["--exp-name", "x", "--model", "SiT-B/2"]), b2) == 3e-2
    assert t_optimizer.classifier_learning_rate(train.parse_args(["--exp-name", "x"]), b2) == 3e-2  # resumed SiT-B
    xl = train.parse_args(["--exp-name", "x", "--model", "SiT-XL/2"])
    assert t_optimizer.classifier_learning_rate(xl, config_of("--model", "SiT-XL/2")) == 1e-4
    args = train.parse_args(["--exp-name", "x", "--model", "SiT-B/2", "--learning-rate-class", "0.5"])
    assert t_optimizer.classifier_learning_rate(args, b2) == 0.5
    # 256 px, patch 2: 16x16 tokens; crop-start 12 turns the crop on with end 17 (the authors' rule)
    config = config_of("--model", "SiT-XL/2", "--crop-start", "12")
    assert (config.crop_start, config.crop_end, config.depth, config.hidden_size) == (12, 17, 28, 1152)
    assert config_of("--model", "SiT-XL/2").crop_start is None  # default 16 = grid side: plain mean pooling
    assert (config_of("--model", "SiT-XL/2", "--crop-start", "20", side=64).crop_end) == 33  # 512 px
    with pytest.raises(t_errors.TrainingError, match="--crop-end"):
        config_of("--model", "SiT-XL/2", "--crop-start", "12", "--crop-end", "20")
    with pytest.raises(t_errors.TrainingError, match="--model is required"):
        config_of()


def test_wandb_offline_without_credentials(tmp_path):
    env = {}
    assert "offline" in t_trackers.ensure_wandb_cannot_hang(env, str(tmp_path / "netrc"))
    assert env["WANDB_MODE"] == "offline"
    env = {"WANDB_API_KEY": "k"}
    assert t_trackers.ensure_wandb_cannot_hang(env, str(tmp_path / "netrc")) is None and "WANDB_MODE" not in env
    env = {"WANDB_MODE": "online"}
    assert t_trackers.ensure_wandb_cannot_hang(env, str(tmp_path / "netrc")) is None and env["WANDB_MODE"] == "online"


#################################################################################
#                               Training runs                                   #
#################################################################################

@pytest.mark.parametrize("extra", [(), ("--no-probe",)], ids=["lsep", "baseline"])
def test_two_processes_equal_one_process_with_accumulation(latent_dir, tmp_path, extra):
    # the baseline leaves the classifier without gradients, which DDP refuses unless it is frozen
    torchrun_train(tiny_argv(latent_dir, tmp_path, "two", "--max-train-steps", 3, *extra))
    # --batch-size is per micro-step over all processes (the authors' meaning): 2 x 4 = 8 per optimizer step either way
    run(*tiny_argv(latent_dir, tmp_path, "accum", "--max-train-steps", 3, "--gradient-accumulation-steps", 2,
                   "--batch-size", 4, *extra))
    two, accum = ckpt(tmp_path, "two", 3), ckpt(tmp_path, "accum", 3)
    assert two["provenance"]["num_processes"] == 2 and accum["provenance"]["num_processes"] == 1
    assert two["provenance"]["run_id"] != accum["provenance"]["run_id"]
    assert_states_equal(two["model"], accum["model"], exact=False, atol=1e-5)
    assert_states_equal(two["ema"], accum["ema"], exact=False, atol=1e-5)
    # the runs really trained (the comparison is not between two initialisations)
    fresh = SiT(ModelConfig.from_dict(accum["config"])).state_dict()
    assert not torch.equal(fresh["final_layer.linear.weight"], accum["model"]["final_layer.linear.weight"])
    assert [r["step"] for r in stats(tmp_path, "two")] == [1, 2, 3]
    np.testing.assert_allclose([r["loss"] for r in stats(tmp_path, "two")],
                               [r["loss"] for r in stats(tmp_path, "accum")], rtol=1e-5)


def test_resume_is_bitwise_equal_to_unbroken_run(latent_dir, tmp_path):
    run(*tiny_argv(latent_dir, tmp_path, "full", "--max-train-steps", 5, "--checkpointing-steps", 2,
                   "--num-workers", 2))
    run(*tiny_argv(latent_dir, tmp_path, "split", "--max-train-steps", 3, "--checkpointing-steps", 2))
    run(*tiny_argv(latent_dir, tmp_path, "split", "--max-train-steps", 5, "--checkpointing-steps", 2,
                   "--resume-step", 3))
    full, split = ckpt(tmp_path, "full", 5), ckpt(tmp_path, "split", 5)
    assert full["steps"] == split["steps"] == 5 and split["data"]["samples_seen"] == 40
    assert_states_equal(full["model"], split["model"])
    assert_states_equal(full["ema"], split["ema"])
    assert_nested_equal(full["opt"], split["opt"])
    # -1 resumes from the latest checkpoint; nothing left to do at step 5
    assert run(*tiny_argv(latent_dir, tmp_path, "split", "--max-train-steps", 5, "--resume-step", -1)) == 5


def test_checkpoint_layout_matches_authors(latent_dir, tmp_path):
    run(*tiny_argv(latent_dir, tmp_path, "layout", "--max-train-steps", 1))
    path = os.path.join(tmp_path, "layout", "checkpoints", "0000001.pt")
    checkpoint = load_checkpoint_file(path)  # weights_only=True
    assert {"model", "ema", "opt", "args", "steps"} <= checkpoint.keys()
    assert checkpoint["steps"] == 1 and checkpoint["scaler"] is None
    assert checkpoint["data"] == {"samples_seen": 8, "dataset_size": NUM_ITEMS, "global_batch": 8, "seed": 0}
    expected = {"pos_embed", "y_embedder.embedding_table.weight"}
    for prefix in ("x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "final_layer.linear",
                   "final_layer.adaLN_modulation.1", "classifier.0", "classifier.1"):
        expected |= {f"{prefix}.weight", f"{prefix}.bias"}
    for block in range(2):
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            expected |= {f"blocks.{block}.{layer}.weight", f"blocks.{block}.{layer}.bias"}
    assert set(checkpoint["model"]) == expected and set(checkpoint["ema"]) == expected
    assert checkpoint["config"] == {"model": "custom", "input_size": 8, "patch_size": 2, "in_channels": 4,
                                    "hidden_size": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0,
                                    "class_dropout_prob": 0.1, "num_classes": NUM_LABELS, "encoder_depth": 1,
                                    "uncond_prob": 0.9, "crop_start": 2, "crop_end": 5, "qk_norm": False,
                                    "path_type": "linear", "probe": True}
    # the flags are stored as parsed (the authors' key), never rewritten with derived values
    assert vars(checkpoint["args"]) == vars(train.parse_args(tiny_argv(latent_dir, tmp_path, "layout",
                                                                       "--max-train-steps", 1)))
    assert set(checkpoint["provenance"]) >= {"run_id", "started", "code", "data", "num_processes"}
    for which in ("ema", "model"):
        model = SiT(ModelConfig.from_dict(checkpoint["config"]))
        load_model_weights(model, path, which=which, strict=True)
        assert torch.equal(model.state_dict()["blocks.1.mlp.fc2.weight"], checkpoint[which]["blocks.1.mlp.fc2.weight"])


def test_crash_during_checkpoint_write_keeps_previous(latent_dir, tmp_path, monkeypatch):
    run(*tiny_argv(latent_dir, tmp_path, "crash", "--max-train-steps", 2))
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        run(*tiny_argv(latent_dir, tmp_path, "crash", "--max-train-steps", 4, "--resume-step", -1))
    monkeypatch.setattr(torch, "save", real_save)
    folder = os.path.join(tmp_path, "crash", "checkpoints")
    assert sorted(os.listdir(folder)) == ["0000002.pt"]  # no partial file, no temp file
    assert load_checkpoint_file(os.path.join(folder, "0000002.pt"))["steps"] == 2
    assert run(*tiny_argv(latent_dir, tmp_path, "crash", "--max-train-steps", 4, "--resume-step", -1)) == 4


def test_nonfinite_step_is_skipped_and_logged(latent_dir, tmp_path):
    run(*tiny_argv(latent_dir, tmp_path, "nan", "--max-train-steps", 3, "--checkpointing-steps", 1,
                   "--debug-nan-steps", 2))
    records = stats(tmp_path, "nan")
    assert [(r["step"], r["skipped_steps"], r["nonfinite_total"]) for r in records] == [(1, 0, 0), (2, 1, 1), (3, 0, 1)]
    assert records[1]["loss"] is None and records[2]["loss"] > 0
    # the skipped step changed nothing: weights, EMA and Adam state at step 2 equal those at step 1
    one, two, three = ckpt(tmp_path, "nan", 1), ckpt(tmp_path, "nan", 2), ckpt(tmp_path, "nan", 3)
    assert_states_equal(one["model"], two["model"])
    assert_states_equal(one["ema"], two["ema"])
    assert_nested_equal(one["opt"], two["opt"])
    assert not torch.equal(two["model"]["final_layer.linear.weight"], three["model"]["final_layer.linear.weight"])
    assert (three["nonfinite"]["consecutive"], three["nonfinite"]["total"]) == (0, 1)
    assert [os.path.basename(c["nonfinite"]["good_checkpoint"]) for c in (one, two, three)] == \
        ["0000001.pt", "0000001.pt", "0000003.pt"]  # step 2 was skipped: its checkpoint is not named as good


def test_consecutive_nonfinite_steps_stop_the_run(latent_dir, tmp_path, capsys):
    argv = tiny_argv(latent_dir, tmp_path, "diverge", "--max-train-steps", 20, "--checkpointing-steps", 2,
                     "--debug-nan-steps", "3-20", "--max-nonfinite", 3)
    with pytest.raises(SystemExit) as exit_info:
        train.cli(argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "3 consecutive steps with a non-finite loss" in message and "--max-nonfinite 3" in message
    assert "0000004.pt" in message
    folder = os.path.join(tmp_path, "diverge", "checkpoints")
    assert sorted(os.listdir(folder)) == ["0000002.pt", "0000004.pt"]
    # step 4's checkpoint holds step 2's weights (steps 3 and 4 were skipped)
    assert_states_equal(ckpt(tmp_path, "diverge", 2)["model"], ckpt(tmp_path, "diverge", 4)["model"])
    last = stats(tmp_path, "diverge")[-1]
    assert (last["step"], last["nonfinite_total"]) == (5, 3)


def test_pixel_mode_previews_and_tensorboard(pixel_dir, tmp_path):
    run(*tiny_argv(pixel_dir, tmp_path, "pix", "--vae", "none", "--resolution", 8, "--crop-start", 4,
                   "--max-train-steps", 2, "--sampling-steps", 2, "--report-to", "tensorboard",
                   "--num-workers", 1))
    from PIL import Image
    grid = np.array(Image.open(os.path.join(tmp_path, "pix", "samples", "0000002.png")))
    assert grid.shape == (8 * 10 + 2, 8 * 10 + 2, 3) and grid.std() > 0  # 64 samples, 8x8 with 2 px padding
    config = ckpt(tmp_path, "pix", 2)["config"]
    assert (config["in_channels"], config["input_size"], config["crop_start"]) == (3, 8, None)
    events = [f for _, _, files in os.walk(os.path.join(tmp_path, "pix", "logs")) for f in files
              if f.startswith("events.out.tfevents")]
    assert events


def test_report_to_wandb_offline_without_login(latent_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    run(*tiny_argv(latent_dir, tmp_path, "wb", "--max-train-steps", 1, "--report-to", "wandb"))
    assert os.path.isdir(os.path.join(tmp_path, "wb", "wandb"))
    assert stats(tmp_path, "wb")[0]["step"] == 1


@pytest.mark.parametrize("extra, message", [
    (["--data-dir", "/nonexistent/data"], "dataset_tools.py"),
    (["--crop-end", "9"], "--crop-end"),
    (["--num-classes", "3"], "--num-classes 3"),
    (["--resolution", "128"], "--resolution 128"),
    (["--resume-step", "7"], "available steps"),
])
def test_user_errors_name_the_flag(latent_dir, tmp_path, extra, message):
    with pytest.raises(t_errors.TrainingError, match=message):
        run(*tiny_argv(latent_dir, tmp_path, "err", "--max-train-steps", 1), *extra)


def test_unknown_model_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--exp-name", "x", "--model", "SiT-M/2"])
    assert "SiT-XL/2" in capsys.readouterr().err


def test_baseline_switch_trains_without_probe(latent_dir, tmp_path):
    run(*tiny_argv(latent_dir, tmp_path, "base", "--max-train-steps", 2, "--no-probe", "--weight-class", 0.5))
    checkpoint = ckpt(tmp_path, "base", 2)
    assert checkpoint["config"]["probe"] is False
    records = stats(tmp_path, "base")
    assert [r["probe_loss"] for r in records] == [0.0, 0.0] and all(r["loss"] > 0 for r in records)
    # the classifier gets no gradient, so AdamW (weight decay 0) leaves it at its initialisation
    torch.manual_seed(0)  # train.py initialises under --seed
    init = SiT(ModelConfig.from_dict(checkpoint["config"])).state_dict()
    assert torch.equal(checkpoint["model"]["classifier.1.weight"], init["classifier.1.weight"])
    assert not torch.equal(checkpoint["model"]["final_layer.linear.weight"], init["final_layer.linear.weight"])


def test_compile_flag_traces_the_training_step(latent_dir, tmp_path):
    # dynamo with the eager backend: the real graph capture without inductor's minutes of CPU compilation
    run(*tiny_argv(latent_dir, tmp_path, "eager", "--max-train-steps", 2))
    run(*tiny_argv(latent_dir, tmp_path, "compiled", "--max-train-steps", 2, "--compile", "--compile-backend", "eager"))
    eager, compiled = ckpt(tmp_path, "eager", 2), ckpt(tmp_path, "compiled", 2)
    assert_states_equal(eager["model"], compiled["model"], exact=False, atol=1e-6)
    assert set(compiled["model"]) == set(eager["model"])  # no _orig_mod. / module. prefixes


def test_grad_checkpoint_flag_trains_the_same_weights(latent_dir, tmp_path):
    run(*tiny_argv(latent_dir, tmp_path, "plain", "--max-train-steps", 2))
    run(*tiny_argv(latent_dir, tmp_path, "ckpt", "--max-train-steps", 2, "--grad-checkpoint"))
    assert_states_equal(ckpt(tmp_path, "plain", 2)["model"], ckpt(tmp_path, "ckpt", 2)["model"], exact=False, atol=1e-6)
    assert ckpt(tmp_path, "ckpt", 2)["args"].grad_checkpoint is True


def test_speed_lever_flags(latent_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # tests/test_fused.py turns Triton's CPU interpreter on
    # GELU in the fc1 GEMM (on CPU: addmm then tanh-GELU, the same math) trains the same weights
    run(*tiny_argv(latent_dir, tmp_path, "plain", "--max-train-steps", 2))
    run(*tiny_argv(latent_dir, tmp_path, "gelu", "--max-train-steps", 2, "--gelu-epilogue"))
    plain, gelu = ckpt(tmp_path, "plain", 2), ckpt(tmp_path, "gelu", 2)
    assert set(plain["model"]) == set(gelu["model"])  # the lever keeps the keys
    assert_states_equal(plain["model"], gelu["model"], exact=False, atol=1e-6)
    # levers that cannot run here are one line at start-up, before any step
    with pytest.raises(t_errors.TrainingError, match="fused_norm_modulate runs Triton kernels on a CUDA GPU"):
        run(*tiny_argv(latent_dir, tmp_path, "norm", "--max-train-steps", 1, "--fused-norm-modulate"))
    for argv, message in ((["--fp8"], "--fp8 runs with --mixed-precision bf16"),
                          (["--compile-mode", "max-autotune"], "only with --compile")):
        with pytest.raises(SystemExit):
            train.parse_args(tiny_argv(latent_dir, tmp_path, "x", *argv))
        assert message in capsys.readouterr().err
