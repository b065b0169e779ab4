"""experiments/digits_evidence.py: the split, the judge, the compute accounting, the statistics,
the outputs, and the whole pipeline in its quick mode (about 1.5 minutes on 2 cores)."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import demo  # noqa: E402
import digits_evidence as de  # noqa: E402


def test_held_out_split_is_disjoint_stratified_and_fixed():
    _, labels = demo.digit_images()
    train, held = de.held_out_split(labels)
    assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == len(labels) == 1797
    counts = np.bincount(labels)
    assert np.bincount(labels[held], minlength=10).tolist() == [round(0.3 * c) for c in counts]
    assert len(held) == 539
    again = de.held_out_split(labels)
    assert (again[0] == train).all() and (again[1] == held).all()


def test_judge_cnn_is_accurate_on_held_out_digits(one_thread):
    images, labels = demo.digit_images()
    train, held = de.held_out_split(labels)
    cnn = de.train_digit_cnn(images[train], labels[train], epochs=10)
    features, predictions = de.cnn_features_and_predictions(cnn, images[held])
    assert features.shape == (539, 64) and np.isfinite(features).all()
    assert (predictions == labels[held]).mean() > 0.96  # the judge of class consistency must itself be good
    # Identical sets: Frechet distance 0, precision = recall = 1 (evaluator/metrics.py's functions).
    stats = de.feature_statistics(features)
    metrics = de.sample_metrics(cnn, stats, features, images[held], labels[held])
    assert abs(metrics["frechet_distance"]) < 1e-6
    assert metrics["precision"] == 1.0 and metrics["recall"] == 1.0
    assert metrics["class_consistency"] == (predictions == labels[held]).mean()


def test_step_flops_differ_by_the_probe_branch_and_repa():
    # The demo's SiT in pixel space: 64 tokens of width 96, MLP 384, 4 blocks, probe after block 2, 10 classes.
    tokens, d = 64, 96
    block = 2 * d * 6 * d + 2 * tokens * d * 3 * d + 4 * tokens * tokens * d + 2 * tokens * d * d + 4 * tokens * d * 4 * d
    assert block == 15_839_232
    probe_branch = 2 * block + 2 * d * 10
    assert de.step_flops("lsep") - de.step_flops("baseline") == 3 * 32 * probe_branch
    # REPA adds the frozen digit ViT's forward (65 tokens of width 64, MLP 256, 4 blocks, 4x4x3 patches)
    # once and the projector (96 -> 256 -> 256 -> 64 on 64 tokens) forward and backward.
    n, e = 65, 64
    vit_block = 2 * n * e * 3 * e + 4 * n * n * e + 2 * n * e * e + 4 * n * e * 4 * e
    encoder = 2 * 64 * 3 * 16 * e + 4 * vit_block
    projector = 2 * tokens * (d * 256 + 256 * 256 + 256 * e)
    assert de.step_flops("repa") - de.step_flops("baseline") == 32 * (encoder + 3 * projector) == 2_277_539_840
    assert de.step_flops("repa_lsep") - de.step_flops("lsep") == de.step_flops("repa") - de.step_flops("baseline")
    # REPA + LSEP has the costliest step: it runs --steps; every other method covers its FLOPs in
    # whole evaluation intervals, no longer.
    assert de.budget_method() == "repa_lsep"
    cfg = dict(steps=1000, eval_every=200)
    assert de.method_steps("repa_lsep", cfg) == 1000
    budget = 1000 * de.step_flops("repa_lsep")
    for method, want in (("baseline", 2000), ("lsep", 1400), ("repa", 1400)):
        steps = de.method_steps(method, cfg)
        assert steps % 200 == 0 and steps * de.step_flops(method) >= budget
        assert (steps - 200) * de.step_flops(method) < budget
        assert steps == want, method
    assert de.method_flags("repa", "/e.pt") == ["--no-probe", "--enc-type", "custom-vit=/e.pt", *de.REPA_FLAGS]
    assert de.method_flags("lsep", "/e.pt") == []


def test_digit_encoder_is_trained_recorded_and_refused_when_made_otherwise(tmp_path, one_thread):
    """REPA's encoder: trained on the training split, saved as train.py loads it (its tokens are the
    trained ViT's), reused by a rerun only when made the same way."""
    import torch
    from models.encoders import load_encoders, parse_arch_overrides

    images, labels = demo.digit_images()
    train, held = de.held_out_split(labels)
    vit, head = de.train_digit_encoder(images[train], labels[train], epochs=3)
    assert de.encoder_accuracy(vit, head, images[held], labels[held]) > 0.2  # chance is 0.1 (3 epochs: ~0.3)
    record = de.prepare_encoder(str(tmp_path), images, labels, train, held, epochs=3)
    with open(record["file"], "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == record["sha256"]
    assert record["held_out_accuracy"] == de.encoder_accuracy(vit, head, images[held], labels[held])  # deterministic
    encoder = load_encoders(f"custom-vit={record['file']}", 32, **parse_arch_overrides(de.ENCODER_ARCH))[0]
    batch = torch.as_tensor(images[held[:4]]).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        want = vit.forward_features(encoder.preprocess(batch))[:, 1:]
    torch.testing.assert_close(encoder(batch), want)
    assert encoder(batch).shape == (4, 64, 64)  # 8x8 tokens, the SiT-S/4 grid
    mtime = os.path.getmtime(record["file"])
    assert de.prepare_encoder(str(tmp_path), images, labels, train, held, epochs=3) == record
    assert os.path.getmtime(record["file"]) == mtime  # reused, not retrained
    with pytest.raises(SystemExit, match="was made by .*'epochs': 3.*not .*'epochs': 4.*delete"):
        de.prepare_encoder(str(tmp_path), images, labels, train, held, epochs=4)
    torch.save(vit.state_dict() | {"extra": torch.zeros(1)}, record["file"])  # the file replaced behind its record
    with pytest.raises(SystemExit, match="is missing or not the file .* records"):
        de.prepare_encoder(str(tmp_path), images, labels, train, held, epochs=3)


def test_at_flops_interpolates_linearly_between_checkpoints():
    flops, values = np.array([10.0, 20.0, 30.0]), np.array([1.0, 3.0, 2.0])
    assert de.at_flops(flops, values, 15.0) == 2.0
    assert de.at_flops(flops, values, 27.5) == 2.25
    assert de.at_flops(flops, values, 30.0) == 2.0
    with pytest.raises(ValueError, match="outside"):
        de.at_flops(flops, values, 31.0)


def synthetic_records(seeds=(0, 1, 2), eval_every=200, budget_steps=1000):
    """Records whose metrics are linear in FLOPs plus the seed, so every summary number is known."""
    records = []
    for method in de.METHODS:
        steps = de.method_steps(method, dict(steps=budget_steps, eval_every=eval_every))
        for seed in seeds:
            for step in range(eval_every, steps + 1, eval_every):
                flops = step * de.step_flops(method)
                value = flops / 1e13 + seed
                records.append(dict(method=method, seed=seed, step=step, flops=flops, ms_per_step=100.0,
                                    frechet_distance=10 * value, precision=value / 10, recall=value / 20,
                                    class_consistency=value / 30,
                                    probe_top1=[[value / 40 + b / 100 for b in range(4)] for _ in de.PROBE_TIMESTEPS]))
    return records


def test_summary_means_stds_and_equal_flops_values():
    records = synthetic_records()
    summary = de.summarise(records, dict(steps=1000, eval_every=200))
    assert [row["step"] for row in summary["equal_steps"]] == [200, 400, 600, 800, 1000]
    last_steps, last_flops = summary["equal_steps"][-1], summary["equal_flops"][-1]
    for method in de.METHODS:
        # At equal steps: value = step * flops/step / 1e13 + seed -> mean over seeds 0..2 adds 1, sample std 1.
        expected = 1000 * de.step_flops(method) / 1e13 + 1
        mean, std = last_steps[f"{method}:frechet_distance"]
        assert mean == pytest.approx(10 * expected) and std == pytest.approx(10.0)
        # At equal FLOPs all are read at REPA + LSEP's budget: the linear curve gives the same value for all.
        budget = 1000 * de.step_flops("repa_lsep")
        mean, std = last_flops[f"{method}:class_consistency"]
        assert mean == pytest.approx((budget / 1e13 + 1) / 30) and std == pytest.approx(1 / 30)
        mean, _ = last_flops[f"{method}:probe_t0.5_b3"]
        assert mean == pytest.approx((budget / 1e13 + 1) / 40 + 0.02)
        assert last_flops[f"{method}_steps"] == pytest.approx(budget / de.step_flops(method))
    assert [row["step"] for row in summary["per_method"]["baseline"]] == list(range(200, 2001, 200))


def test_results_are_written_together_and_stamped_with_the_json_hash(tmp_path):
    records = synthetic_records(seeds=(0, 1))
    cfg = dict(de.SETTINGS["full"], seeds=[0, 1])
    result = dict(settings=cfg, data=dict(held_out=539), records=records,
                  judge=dict(held_out_accuracy=0.98, real_frechet_distance=1.5, real_precision=0.9, real_recall=0.9),
                  wall_clock={m: dict(ms_per_step=100.0) for m in de.METHODS})
    result["summary"] = de.summarise(records, cfg)
    paths, sha = de.write_results(result, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["digits_evidence.json", "digits_evidence.md", "digits_evidence.png"]
    with open(paths["json"], "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest()[:16] == sha
    with open(paths["md"]) as f:
        md = f.read()
    assert f"sha256 {sha}" in md and "**Equal training FLOPs**" in md and "**Equal steps**" in md
    assert Image.open(paths["png"]).info.get("Description", "").endswith(sha)
    with open(paths["json"]) as f:
        assert json.load(f)["summary"]["equal_steps"][-1]["step"] == 1000


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("evidence")
    proc = subprocess.run([sys.executable, "experiments/digits_evidence.py", "--quick", "--out", str(out / "work"),
                           "--results", str(out / "results")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results" / "digits_evidence.json") as f:
        return out, json.load(f)


def test_quick_pipeline_runs_and_metrics_are_finite_and_in_range(quick_result):
    out, result = quick_result
    cfg = result["settings"]
    assert result["data"]["held_out"] == 539 and result["data"]["train"] == 1258
    seeds = cfg["seeds"]
    assert len(seeds) >= 2
    for method in de.METHODS:
        steps = cfg["method_steps"][method]
        rows = [r for r in result["records"] if r["method"] == method]
        assert sorted((r["seed"], r["step"]) for r in rows) == \
            [(s, k) for s in seeds for k in range(cfg["eval_every"], steps + 1, cfg["eval_every"])]
        for r in rows:
            assert np.isfinite(r["frechet_distance"]) and r["frechet_distance"] >= 0
            for name in ("precision", "recall", "class_consistency"):
                assert 0.0 <= r[name] <= 1.0
            top1 = np.array(r["probe_top1"])
            assert top1.shape == (2, 4) and ((0 <= top1) & (top1 <= 1)).all()
            assert r["flops"] == r["step"] * de.step_flops(method)
        # The run's samples are the held-out comparison's: one npz per checkpoint, balanced labels.
        npz = sorted(os.listdir(out / "work" / "samples"))
        assert f"{method}-seed{seeds[0]}-{steps:07d}" in npz
    judge = result["judge"]
    assert 0.1 <= judge["held_out_accuracy"] <= 1.0 and judge["real_frechet_distance"] >= 0
    # Every method's training FLOPs cover REPA + LSEP's, so the equal-FLOPs table is read inside each curve.
    last = result["summary"]["equal_flops"][-1]
    for method in de.METHODS:
        assert last[f"{method}_steps"] <= cfg["method_steps"][method]
    # The REPA runs aligned to the digit encoder this run trained; the others did not align.
    import torch
    for method in de.METHODS:
        ckpt = torch.load(out / "work" / "exps" / f"{method}-seed{seeds[0]}" / "checkpoints" / "0000005.pt",
                          map_location="cpu", weights_only=False)
        assert ckpt["config"].get("enc_type") == (("custom-vit",) if de.METHODS[method]["repa"] else None), method
        assert ckpt["config"]["probe"] == de.METHODS[method]["probe"]
    assert result["invocation"]["records_reused"] == 0 and len(result["invocation"]["code"]) >= 40
    encoder = result["encoder"]
    assert 0.0 <= encoder["held_out_accuracy"] <= 1.0 and encoder["enc_arch"] == de.ENCODER_ARCH
    assert encoder["made_by"]["train_digits"] == 1258
    for key, value in last.items():
        if ":" in key:
            assert all(np.isfinite(value)) and value[1] >= 0
    md = (out / "results" / "digits_evidence.md").read_text()
    assert "| metric |" in md and Image.open(out / "results" / "digits_evidence.png").size[0] > 500
