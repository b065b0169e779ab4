"""preprocessing/: crop rules, convert (odd inputs, corrupt files, workers, zip), encode (values,
resume, two ranks), and the whole chain read back through CustomDataset."""
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from dataset import CustomDataset
from models.vae import encode_moments, load_vae
from preprocessing.dataset_tools import main
from preprocessing.storage import image_name, latent_name
from preprocessing.synthetic import save_tiny_vae
from preprocessing.transforms import center_crop, center_crop_dhariwal, decode_rgb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "preprocessing", "dataset_tools.py")
RES = 32
# Sorted source paths, their expected class (sorted top-level folders n01 < n02 < n03), None = corrupt.
SOURCES = {
    "n01/b.JPEG": 0,
    "n01/cmyk.jpg": 0,
    "n01/sub/deep/gray.png": 0,
    "n02/corrupt.JPEG": None,
    "n02/rgba.png": 1,
    "n03/a.JPEG": 2,
    "n03/pal.png": 2,
    "n03/small.png": 2,  # 12x10: smaller than 32, upscaled by the bicubic step
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _write_raw_tree(root):
    rng = np.random.default_rng(0)

    def rgb(h, w):
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    def save(rel, img, **kw):
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        img.save(os.path.join(root, rel), **kw)

    save("n03/a.JPEG", PIL.Image.fromarray(rgb(60, 80)), format="JPEG", quality=95)
    pal = PIL.Image.fromarray(rgb(40, 40)).convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 3
    save("n03/pal.png", pal, transparency=3)
    save("n03/small.png", PIL.Image.fromarray(rgb(10, 12)))
    save("n01/b.JPEG", PIL.Image.fromarray(rgb(50, 64)), format="JPEG", quality=95)
    save("n01/sub/deep/gray.png", PIL.Image.fromarray(rng.integers(0, 256, (36, 48), dtype=np.uint8)))
    save("n01/cmyk.jpg", PIL.Image.fromarray(rgb(40, 56)).convert("CMYK"), format="JPEG")
    save("n02/rgba.png", PIL.Image.fromarray(rng.integers(0, 256, (52, 44, 4), dtype=np.uint8), "RGBA"))
    with open(os.path.join(root, "n02/corrupt.JPEG"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    with open(os.path.join(root, "n02/notes.txt"), "w") as f:
        f.write("not an image: ignored")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """raw tree -> convert (in-process) -> encode (in-process), shared by the tests below."""
    base = tmp_path_factory.mktemp("prep")
    raw, data = str(base / "raw"), str(base / "data")
    _write_raw_tree(raw)
    vae_dir = save_tiny_vae(str(base / "vae"))
    images, latents = os.path.join(data, "images"), os.path.join(data, "vae-sd")
    main(["convert", "--source", raw, "--dest", images, "--resolution", f"{RES}x{RES}", "--workers", "0"])
    main(["encode", "--source", images, "--dest", latents, "--vae", vae_dir, "--batch-size", "3", "--workers", "0"])
    return dict(base=str(base), raw=raw, data=data, images=images, latents=latents, vae=vae_dir)


# ---------------------------------------------------------------------------- crop rules

def test_dhariwal_crop_hand_example():
    # Target 2 from 16x8: two BOX halvings (16x8 -> 8x4 -> 4x2), no bicubic change (scale 1), then the
    # centre crop keeps columns 1..2. Each 2x2 block is built so that row pairs and then column pairs
    # average to integers, so every halving is exact: the result is the block-mean grid C[:, 1:3].
    C = np.array([[[10, 200, 7], [50, 150, 9], [90, 100, 11], [130, 50, 13]],
                  [[170, 20, 15], [200, 60, 17], [230, 90, 19], [245, 120, 21]]])
    L1 = np.kron(C, np.ones((2, 2, 1))) + np.kron(np.ones((2, 4, 1)), np.array([[-4, 0], [0, 4]])[:, :, None])
    L0 = np.kron(L1, np.ones((2, 2, 1))) + np.kron(np.ones((4, 8, 1)), np.array([[-2, 0], [0, 2]])[:, :, None])
    out = center_crop_dhariwal(PIL.Image.fromarray(L0.astype(np.uint8)), 2)
    assert np.array_equal(np.asarray(out), C[:, 1:3].astype(np.uint8))


def test_dhariwal_upscales_small_and_center_crop():
    small = PIL.Image.new("RGB", (5, 3), (17, 130, 240))  # short side 3 < 8: bicubic up to 13x8, crop
    out = np.asarray(center_crop_dhariwal(small, 8))
    assert out.shape == (8, 8, 3) and (out == [17, 130, 240]).all()
    wide = PIL.Image.new("RGB", (40, 10), (1, 2, 3))
    out = np.asarray(center_crop(wide, 12, 6))  # box 20x10 centred, then LANCZOS to 12x6
    assert out.shape == (6, 12, 3) and (out == [1, 2, 3]).all()


def test_decode_rgb_modes():
    def roundtrip(img, fmt="PNG", **kw):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return np.asarray(decode_rgb(buf.getvalue()))

    assert (roundtrip(PIL.Image.new("L", (2, 2), 77)) == 77).all()
    assert (roundtrip(PIL.Image.new("RGBA", (2, 2), (10, 20, 30, 0))) == [10, 20, 30]).all()  # alpha dropped
    assert (roundtrip(PIL.Image.new("CMYK", (2, 2), (0, 0, 0, 0)), "JPEG", quality=100) >= 254).all()
    pal = PIL.Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 40, 50, 60] + [0] * 762)
    assert (roundtrip(pal, transparency=0) == [40, 50, 60]).all()
    assert (roundtrip(PIL.Image.fromarray(np.full((2, 2), 65535, np.uint16))) == 255).all()  # 16-bit scaled
    with pytest.raises(Exception):
        decode_rgb(b"\x89PNG\r\n\x1a\n truncated")


# ---------------------------------------------------------------------------- convert

def test_convert_output(work):
    images = work["images"]
    meta = json.load(open(os.path.join(images, "dataset.json")))
    good = [p for p, y in SOURCES.items() if y is not None]
    assert meta["labels"] == [[image_name(i), SOURCES[p]] for i, p in enumerate(good)]
    assert meta["class_names"] == ["n01", "n02", "n03"]
    for i, src in enumerate(good):
        with open(os.path.join(work["raw"], src), "rb") as f:
            expected = np.asarray(center_crop_dhariwal(decode_rgb(f.read()), RES))
        path = os.path.join(images, image_name(i))
        with PIL.Image.open(path) as img:
            assert img.mode == "RGB" and img.size == (RES, RES)
            assert np.array_equal(np.asarray(img), expected), src
        assert os.path.getsize(path) > RES * RES * 3  # stored uncompressed (compress_level=0)
    gray = np.asarray(PIL.Image.open(os.path.join(images, image_name(2))))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    log = open(images + ".skipped.txt").read().splitlines()
    assert log[0].startswith("# 1 of 8") and len(log) == 2
    assert log[1].startswith(os.path.join(work["raw"], "n02/corrupt.JPEG") + "\t")


def test_convert_subprocess_workers_zip_identical(work):
    dest = os.path.join(work["base"], "images_w2.zip")
    run = subprocess.run([sys.executable, TOOL, "convert", "--source", work["raw"], "--dest", dest,
                          "--resolution", f"{RES}x{RES}", "--workers", "2"],
                         cwd=work["base"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "wrote 7 images of 8 (3 classes)" in run.stdout and "skipped 1 unreadable" in run.stdout
    with zipfile.ZipFile(dest) as zf:
        names = sorted(zf.namelist())
        assert names == sorted([image_name(i) for i in range(7)] + ["dataset.json"])
        for name in names:
            with open(os.path.join(work["images"], name), "rb") as f:
                assert zf.read(name) == f.read(), name


def test_convert_max_images_and_errors(work, tmp_path):
    dest = str(tmp_path / "few")
    main(["convert", "--source", work["raw"], "--dest", dest, "--resolution", "16x8",
          "--transform", "center-crop", "--max-images", "4", "--workers", "0"])
    labels = json.load(open(os.path.join(dest, "dataset.json")))["labels"]
    assert labels == [[image_name(0), 0], [image_name(1), 0], [image_name(2), 0]]  # 4th input is corrupt
    assert PIL.Image.open(os.path.join(dest, image_name(0))).size == (16, 8)
    with pytest.raises(SystemExit, match="not empty"):
        main(["convert", "--source", work["raw"], "--dest", dest, "--resolution", "16x16"])
    flat = tmp_path / "flat"
    flat.mkdir()
    PIL.Image.new("RGB", (8, 8)).save(flat / "x.png")
    with pytest.raises(SystemExit, match="one folder per class"):
        main(["convert", "--source", str(flat), "--dest", str(tmp_path / "o"), "--resolution", "8x8"])
    with pytest.raises(SystemExit, match="square"):
        main(["convert", "--source", work["raw"], "--dest", str(tmp_path / "o2"), "--resolution", "16x8"])


# ---------------------------------------------------------------------------- encode

def _direct_moments(work, batch=3):
    """encode_moments on the converted PNGs, in the same fixed chunks as the tool."""
    vae = load_vae(work["vae"])
    imgs = [np.asarray(PIL.Image.open(os.path.join(work["images"], image_name(i)))) for i in range(7)]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)
    return torch.cat([encode_moments(vae, x[s:s + batch]) for s in range(0, 7, batch)]).numpy()


def test_encode_equals_direct_and_dataset_reads_it(work):
    direct = _direct_moments(work)
    for i in range(7):
        stored = np.load(os.path.join(work["latents"], latent_name(i)))
        assert stored.dtype == np.float32 and stored.shape == (8, RES // 8, RES // 8)
        assert np.array_equal(stored, direct[i])
    meta = json.load(open(os.path.join(work["latents"], "dataset.json")))
    expected_labels = [y for y in SOURCES.values() if y is not None]
    assert meta["labels"] == [[latent_name(i), y] for i, y in enumerate(expected_labels)]

    ds = CustomDataset(work["data"], return_images=True)
    assert len(ds) == 7 and ds.labels.tolist() == expected_labels and ds.labels.dtype == np.int64
    assert ds.num_classes == 3 and ds.resolution == RES
    assert ds.latent_shape == (8, 4, 4) and ds.image_shape == (3, RES, RES)
    for i in range(7):
        image, moments, label = ds[i]
        assert np.array_equal(moments.numpy(), direct[i]) and int(label) == expected_labels[i]
        assert np.array_equal(image.permute(1, 2, 0).numpy(),
                              np.asarray(PIL.Image.open(os.path.join(work["images"], image_name(i)))))
    # Batch-size-1 encoding agrees to float tolerance (batch composition may change the last bits).
    vae = load_vae(work["vae"])
    single = encode_moments(vae, ds[5][0][None]).numpy()[0]
    np.testing.assert_allclose(single, direct[5], rtol=1e-5, atol=1e-6)


def _mtimes(folder):
    return {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in
            [latent_name(i) for i in range(7)] + ["dataset.json"]}


def test_encode_resume(work, capsys):
    dest = os.path.join(work["base"], "vae-resume")
    shutil.copytree(work["latents"], dest)
    before = _mtimes(dest)
    args = ["encode", "--source", work["images"], "--dest", dest, "--vae", work["vae"],
            "--batch-size", "3", "--workers", "0"]
    main(args)
    assert "(0 written now, 7 already complete)" in capsys.readouterr().out
    assert _mtimes(dest) == before  # a complete dataset is left untouched

    os.remove(os.path.join(dest, latent_name(1)))  # chunk 0
    os.remove(os.path.join(dest, latent_name(5)))  # chunk 1
    with open(os.path.join(dest, latent_name(6)), "r+b") as f:  # chunk 2: a cut-off file
        f.truncate(100)
    stale = os.path.join(dest, "00000", f".{os.path.basename(latent_name(1))}.12345.tmp")
    open(stale, "wb").close()
    main(args)
    assert "(3 written now, 4 already complete)" in capsys.readouterr().out
    after = _mtimes(dest)
    redone = {latent_name(i) for i in (1, 5, 6)}
    assert {n for n in before if after[n] != before[n]} == redone
    assert not os.path.exists(stale)
    for i in range(7):  # same chunks -> the resumed files equal the unbroken run's bytes
        assert open(os.path.join(dest, latent_name(i)), "rb").read() == \
            open(os.path.join(work["latents"], latent_name(i)), "rb").read()


def test_encode_two_ranks_equal_one_rank(work):
    dest = os.path.join(work["base"], "vae-2ranks")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    run = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", TOOL, "encode",
                          "--source", work["images"], "--dest", dest, "--vae", work["vae"],
                          "--batch-size", "3", "--workers", "0", "--zip"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "7 latents (8, 4, 4)" in run.stdout and "(7 written now" in run.stdout
    one, two = (sorted(os.listdir(os.path.join(d, "00000"))) for d in (work["latents"], dest))
    assert one == two and len(one) == 7  # no temporary files left
    for name in [latent_name(i) for i in range(7)] + ["dataset.json"]:
        assert open(os.path.join(dest, name), "rb").read() == open(os.path.join(work["latents"], name), "rb").read()
    with zipfile.ZipFile(dest + ".zip") as zf:
        assert sorted(zf.namelist()) == sorted([latent_name(i) for i in range(7)] + ["dataset.json"])


def test_encode_errors(work, tmp_path):
    base = ["--vae", work["vae"], "--workers", "0"]
    with pytest.raises(SystemExit, match="encode writes a folder"):
        main(["encode", "--source", work["images"], "--dest", str(tmp_path / "x.zip")] + base)
    bare = tmp_path / "bare"
    (bare / "00000").mkdir(parents=True)
    shutil.copy(os.path.join(work["images"], image_name(0)), bare / "00000")
    with pytest.raises(SystemExit, match="dataset.json is missing.*convert"):
        main(["encode", "--source", str(bare), "--dest", str(tmp_path / "o")] + base)
    with pytest.raises(SystemExit, match="--vae DIR"):
        main(["encode", "--source", work["images"], "--dest", str(tmp_path / "o"),
              "--vae", str(tmp_path / "missing_vae")])
    other = tmp_path / "other"
    (other / "00000").mkdir(parents=True)
    (other / "00000" / "img-mean-std-00000099.npy").write_bytes(b"")
    with pytest.raises(SystemExit, match="another dataset"):
        main(["encode", "--source", work["images"], "--dest", str(other)] + base)
