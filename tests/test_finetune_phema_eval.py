"""train.py --init-from (fine-tuning at another resolution), post-hoc EMA wiring, evaluation during
training, on CPU with tiny pixel-space models (hidden 32, depth 2, 16 and 32 px)."""
import filecmp
import json
import os

import numpy as np
import pytest
import torch

import generate
import posthoc_ema
import train
from evaluator import inception as inc
from evaluator import metrics
from evaluator import evaluator as evaluator_cli
from models import ModelConfig, SiT
from models.checkpoint import load_checkpoint_file, weights_sha256
from test_train import NUM_LABELS, ckpt, make_pixel_data, run, stats
from training.errors import TrainingError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixels")
    return {side: make_pixel_data(str(root / f"px{side}"), n=16, side=side) for side in (16, 32)}


def argv(data_dir, out, name, *extra, side=16):
    return ["--exp-name", name, "--output-dir", str(out), "--data-dir", data_dir, "--vae", "none",
            "--resolution", str(side), "--model", "SiT-S/2", "--hidden-size", "32", "--depth", "2", "--num-heads", "2",
            "--encoder-depth", "1", "--num-classes", str(NUM_LABELS), "--batch-size", "8", "--num-workers", "0",
            "--report-to", "none", "--mixed-precision", "no", "--sampling-steps", "0", "--log-every", "1",
            "--crop-start", "2", "--ema-decay", "0.5", *map(str, extra)]




def sample(checkpoint_path, out_dir, n=4, *extra):
    folder = generate.main(generate.parse_args(
        ["--ckpt", checkpoint_path, "--sample-dir", str(out_dir), "--num-fid-samples", str(n), "--num-steps", "4",
         "--per-proc-batch-size", "8", "--device", "cpu", "--cfg-scale", "1", "--precision", "fp32", *extra]))
    with np.load(f"{folder}.npz") as f:
        return f["arr_0"]


#################################################################################
#                                 --init-from                                   #
#################################################################################

def test_init_from_16px_run_fine_tunes_at_32px_and_samples(data, tmp_path, caplog):
    run(*argv(data[16], tmp_path, "src", "--max-train-steps", 2))
    source_path = os.path.join(tmp_path, "src", "checkpoints", "0000002.pt")
    source = load_checkpoint_file(source_path)
    # learning rates 0: the step-1 checkpoint holds the initial weights exactly (Adam adds 0 * update)
    run(*argv(data[32], tmp_path, "init", "--max-train-steps", 1, "--init-from", source_path, "--num-classes", 7,
              "--learning-rate", 0, "--learning-rate-class", 0, side=32))
    init = ckpt(tmp_path, "init", 1)
    config = ModelConfig.from_dict(init["config"])
    assert (config.input_size, config.num_classes, config.in_channels) == (32, 7, 3)  # flags + data, not the source
    torch.manual_seed(0)
    fresh = SiT(config).state_dict()  # what train.py builds before copying (seeded by --seed 0)
    heads = ("pos_embed", "classifier.1.", "y_embedder.")  # classifier.0 (its LayerNorm) fits: copied
    copied = [k for k in fresh if not k.startswith(heads)]
    assert len(copied) == 32 and "classifier.0.weight" in copied
    for key in copied:  # copied exactly, into the model and the EMA
        assert torch.equal(init["model"][key], source["ema"][key]), key
        assert torch.equal(init["ema"][key], source["ema"][key]), key
    for key in fresh:
        if key.startswith(heads):  # the new grid's sin-cos table and fresh heads
            assert torch.equal(init["model"][key], fresh[key]), key
    assert init["model"]["pos_embed"].shape == (1, 256, 32) and source["ema"]["pos_embed"].shape == (1, 64, 32)
    record = init["provenance"]["init_from"]
    assert record["path"] == os.path.abspath(source_path) and record["which"] == "ema" and record["steps"] == 2
    assert record["weights_sha256"] == weights_sha256(source["ema"]) and record["copied"] == 32
    skipped = {line.split(":")[0] for line in record["skipped"]}
    assert skipped == {"pos_embed", "classifier.1.weight", "classifier.1.bias", "y_embedder.embedding_table.weight"}
    assert init["steps"] == 1 and all(s["step"] == 1 for s in init["opt"]["state"].values())  # fresh

    # a real fine-tuning run: trains at 32 px, keeps its provenance on resume, samples with generate.py
    run(*argv(data[32], tmp_path, "ft", "--max-train-steps", 2, "--init-from", source_path,
              "--init-from-weights", "model", "--checkpointing-steps", 1, side=32))
    assert [r["step"] for r in stats(tmp_path, "ft")] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in stats(tmp_path, "ft"))
    run(*argv(data[32], tmp_path, "ft", "--max-train-steps", 3, "--init-from", source_path, "--resume-step", -1,
              side=32))  # -1: the run's own checkpoint wins, the record stays
    ft = ckpt(tmp_path, "ft", 3)
    assert ft["provenance"]["init_from"]["which"] == "model"
    assert ft["provenance"]["init_from"]["weights_sha256"] == weights_sha256(source["model"])
    images = sample(os.path.join(tmp_path, "ft", "checkpoints", "0000003.pt"), tmp_path / "samples")
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 0


def test_init_from_reads_bare_repa_style_state_dicts(tmp_path):
    """A bare state dict with DDP prefixes, REPA's projectors and no probe classifier (REPA/SiT weights)."""
    import copy

    from training import init_from as train_init

    config = ModelConfig(model="custom", input_size=8, in_channels=3, num_classes=4, depth=2, hidden_size=32,
                         num_heads=2, patch_size=2, encoder_depth=1)
    torch.manual_seed(1)
    source = SiT(config).state_dict()
    state = {f"module.{k}": v for k, v in source.items() if not k.startswith("classifier.")}
    state["module.projectors.0.0.weight"] = torch.randn(64, 32)
    torch.save(state, tmp_path / "repa.pt")
    torch.manual_seed(2)
    model = SiT(config.replace(input_size=16))
    ema, before = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    record = train_init.init_from(str(tmp_path / "repa.pt"), "ema", model, ema)
    assert record["which"] == "state dict" and record["steps"] is None
    assert record["skipped"] == ["classifier.0.bias: not in the source (kept at init)",
                                 "classifier.0.weight: not in the source (kept at init)",
                                 "classifier.1.bias: not in the source (kept at init)",
                                 "classifier.1.weight: not in the source (kept at init)",
                                 "pos_embed: rebuilt for the new grid (1, 16, 32) -> (1, 64, 32)",
                                 "projectors.0.0.weight: not in the new model (dropped)"]
    for key, value in model.state_dict().items():
        expected = before[key] if key.startswith(("classifier.", "pos_embed")) else source[key]
        assert torch.equal(value, expected), key
        assert torch.equal(ema.state_dict()[key], expected), key
    assert record["copied"] == len(source) - 5


def test_init_from_size_mismatch_and_resume_are_one_line(data, tmp_path, capsys):
    run(*argv(data[16], tmp_path, "src", "--max-train-steps", 1))
    source = os.path.join(tmp_path, "src", "checkpoints", "0000001.pt")
    with pytest.raises(TrainingError) as err:
        run(*argv(data[32], tmp_path, "wide", "--init-from", source, "--hidden-size", 64, "--num-heads", 2,
                  "--max-train-steps", 1, side=32))
    message = str(err.value)
    assert "\n" not in message and "--init-from" in message
    assert "blocks.0.adaLN_modulation.1.bias is (192,) there and (384,) here" in message
    assert not os.path.exists(os.path.join(tmp_path, "wide", "checkpoints", "0000001.pt"))
    with pytest.raises(SystemExit):
        train.parse_args(argv(data[32], tmp_path, "x", "--init-from", source, "--resume-step", 3))
    assert "--init-from starts a new run; --resume-step 3 continues one" in capsys.readouterr().err
    with pytest.raises(TrainingError, match="--init-from: checkpoint .*missing.pt does not exist"):
        run(*argv(data[32], tmp_path, "gone", "--init-from", tmp_path / "missing.pt", "--max-train-steps", 1,
                  side=32))


#################################################################################
#                                 Post-hoc EMA                                  #
#################################################################################

def test_posthoc_ema_resume_is_bitwise_and_profiles_follow_the_trajectory(data, tmp_path):
    phema = ("--posthoc-ema-sigma-rels", "0.05,0.10", "--posthoc-ema-every", 2)
    run(*argv(data[16], tmp_path, "full", "--max-train-steps", 4, "--checkpointing-steps", 1, *phema))
    run(*argv(data[16], tmp_path, "split", "--max-train-steps", 2, "--checkpointing-steps", 1, *phema))
    run(*argv(data[16], tmp_path, "split", "--max-train-steps", 4, "--checkpointing-steps", 1, "--resume-step", 2,
              *phema))
    snapshots = [os.path.join("posthoc-ema", f"{s:07d}.pt") for s in (2, 4)]
    assert sorted(os.listdir(os.path.join(tmp_path, "full", "posthoc-ema"))) == ["0000002.pt", "0000004.pt"]
    for name in snapshots:  # N + resume + N steps == 2N unbroken, byte for byte
        assert filecmp.cmp(os.path.join(tmp_path, "full", name), os.path.join(tmp_path, "split", name), shallow=False)

    # the tracked profile at step 4 is the power-function average of the model after steps 1..4
    snap = torch.load(os.path.join(tmp_path, "full", snapshots[1]), weights_only=True)
    assert snap["step"] == 4 and snap["source"] == {"samples_seen": 32, "global_batch": 8}
    trajectory = [ckpt(tmp_path, "full", s)["model"] for s in (1, 2, 3, 4)]
    for gamma, tracked in zip(snap["gammas"], snap["ema"]):
        weights = [(s ** (gamma + 1) - (s - 1) ** (gamma + 1)) / 4 ** (gamma + 1) for s in (1, 2, 3, 4)]
        for key in ("blocks.1.mlp.fc2.weight", "classifier.1.bias", "final_layer.linear.weight"):
            expected = sum(w * t[key].double() for w, t in zip(weights, trajectory))
            torch.testing.assert_close(tracked[key].double(), expected, rtol=0, atol=2e-7)
    assert ckpt(tmp_path, "full", 4)["posthoc_ema_tracker"]["step"] == 4

    # posthoc_ema.py rebuilds a length between the tracked two; generate.py samples it
    out = os.path.join(tmp_path, "phema-{sigma_rel}.pt")
    posthoc_ema.main(["--exp-dir", os.path.join(tmp_path, "full"), "--sigma-rel", "0.07", "--out", out])
    rebuilt = load_checkpoint_file(out.format(sigma_rel=0.07))
    low, high = (snap["ema"][i]["final_layer.linear.weight"] for i in (0, 1))
    middle = rebuilt["ema"]["final_layer.linear.weight"]
    assert not torch.equal(middle, low) and not torch.equal(middle, high)
    images = sample(out.format(sigma_rel=0.07), tmp_path / "samples")
    assert images.shape == (4, 16, 16, 3) and images.std() > 0


def test_posthoc_ema_flags_are_checked(data, tmp_path, capsys):
    for bad, message in [("0.05,0.5", "0.5 is outside (0, 0.2887]"), ("0.05,0.05", "distinct"),
                         ("x", "could not convert")]:
        with pytest.raises(SystemExit):
            train.parse_args(argv(data[16], tmp_path, "x", "--posthoc-ema-sigma-rels", bad))
        assert message in capsys.readouterr().err


#################################################################################
#                          Evaluation during training                           #
#################################################################################

def fast_sqrtm_stand_in(matrix):
    """scipy's 2048x2048 sqrtm takes 20-60 s on 2 cores; the Frechet math has its own tests."""
    return np.diag(np.sqrt(np.abs(np.diag(matrix))))


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    weights = inc.save_random_inception_weights(str(root / "random-inception.pth"), seed=0)
    ref = str(root / "ref.npz")
    np.savez(ref, arr_0=np.random.RandomState(3).randint(0, 256, (6, 16, 16, 3)).astype(np.uint8))
    return {"weights": weights, "ref": ref}


def test_eval_every_logs_evaluator_metrics_of_generate_samples(data, tmp_path, eval_files, monkeypatch):
    monkeypatch.setattr(metrics, "_sqrtm", fast_sqrtm_stand_in)
    flags = ("--eval-every", 2, "--eval-samples", 6, "--eval-steps", 4, "--eval-ref", eval_files["ref"],
             "--eval-inception-weights", eval_files["weights"], "--eval-keep-samples")
    run(*argv(data[16], tmp_path, "ev", "--max-train-steps", 5, "--checkpointing-steps", 4, *flags))
    records = [r for r in stats(tmp_path, "ev") if "eval_fid" in r]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert r["eval_samples"] == 6  # FID/sFID: any sign with the sqrtm stand-in; equal to the CLI below
        assert 1.0 <= r["eval_inception_score"] <= 1008 and 0 <= r["eval_precision"] <= 1 and 0 <= r["eval_recall"] <= 1
        assert all(np.isfinite(r[k]) for k in r)
    assert records[0]["eval_fid"] != records[1]["eval_fid"]  # the model moved between the two
    npz = os.path.join(tmp_path, "ev", "eval", "0000004.npz")
    assert sorted(os.listdir(os.path.join(tmp_path, "ev", "eval"))) == ["0000002.npz", "0000004.npz"]

    # the samples are generate.py's, from the EMA weights of the step-4 checkpoint
    with np.load(npz) as f:
        evaluated = f["arr_0"]
    made = sample(os.path.join(tmp_path, "ev", "checkpoints", "0000004.pt"), tmp_path / "gen", 6)
    np.testing.assert_array_equal(evaluated, made)

    # and the logged metrics are evaluator/evaluator.py's on them
    output = str(tmp_path / "cli.json")
    assert evaluator_cli.main([eval_files["ref"], npz, "--inception-weights", eval_files["weights"], "--device", "cpu",
                               "--batch-size", "8", "--output", output]) == 0
    with open(output) as f:
        cli = json.load(f)
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert records[1][f"eval_{key}"] == pytest.approx(cli[key], rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("case", ["no ref", "missing ref", "missing weights", "guidance without null label"])
def test_eval_inputs_fail_at_start_up_in_one_line(data, tmp_path, eval_files, case):
    missing = str(tmp_path / "none")
    flags, message = {
        "no ref": ((), "--eval-every needs --eval-ref REF.npz"),
        "missing ref": (("--eval-ref", missing), f"--eval-ref {missing}: no such file"),
        "missing weights": (("--eval-ref", eval_files["ref"], "--eval-inception-weights", missing),
                            f"--eval-inception-weights {missing}: no such file; download weights-inception-2015-12-05"),
        "guidance without null label": (("--eval-ref", eval_files["ref"], "--eval-cfg-scale", 2, "--cfg-prob", 0,
                                         "--uncond-prob", 0), "--eval-cfg-scale 2.0 needs the null-label row"),
    }[case]
    with pytest.raises(TrainingError) as err:
        run(*argv(data[16], tmp_path, "bad", "--eval-every", 100, "--max-train-steps", 1, *flags))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not os.path.exists(os.path.join(tmp_path, "bad", "stats.jsonl"))  # before any step


WRAPPER = """import sys
sys.path.insert(0, {root!r})
import numpy as np
from evaluator import metrics
metrics._sqrtm = lambda m: np.diag(np.sqrt(np.abs(np.diag(m))))  # fast_sqrtm_stand_in
import train
train.cli(sys.argv[1:])
"""


def test_eval_with_two_processes_shards_sampling_and_inception(data, tmp_path, eval_files, monkeypatch):
    import signal
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    wrapper = tmp_path / "train_wrapper.py"
    wrapper.write_text(WRAPPER.format(root=root))
    flags = ["--eval-every", 2, "--eval-samples", 7, "--eval-steps", 3, "--eval-ref", eval_files["ref"],
             "--eval-inception-weights", eval_files["weights"], "--eval-keep-samples", "--eval-cfg-scale", 1.5]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(wrapper),
               *map(str, argv(data[16], tmp_path, "two", "--max-train-steps", 2, *flags))]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root)
    proc = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    assert proc.returncode == 0, output[-3000:]
    (record,) = [r for r in stats(tmp_path, "two") if "eval_fid" in r]
    assert record["step"] == 2 and record["eval_samples"] == 7
    # 7 samples dealt over 2 processes in batches of 4: generate.py's images, one process
    npz = os.path.join(tmp_path, "two", "eval", "0000002.npz")
    with np.load(npz) as f:
        evaluated = f["arr_0"]
    made = sample(os.path.join(tmp_path, "two", "checkpoints", "0000002.pt"), tmp_path / "gen", 7, "--cfg-scale", "1.5",
                  "--num-steps", "3")
    np.testing.assert_array_equal(evaluated, made)
    monkeypatch.setattr(metrics, "_sqrtm", fast_sqrtm_stand_in)
    output = str(tmp_path / "cli.json")
    assert evaluator_cli.main([eval_files["ref"], npz, "--inception-weights", eval_files["weights"], "--device", "cpu",
                               "--batch-size", "4", "--output", output, "--no-cache"]) == 0
    with open(output) as f:
        cli = json.load(f)
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):  # Inception sharded over 2 processes
        assert record[f"eval_{key}"] == pytest.approx(cli[key], rel=1e-6, abs=1e-9), key
