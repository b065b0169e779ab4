"""dataset.py: items, folder/zip equality (also through DataLoader workers), pixel mode, and one
clear start-up error per broken layout."""
import json
import os
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

from dataset import CustomDataset
from preprocessing.storage import DatasetError, image_name, latent_name
from preprocessing.synthetic import npy_bytes, write_synthetic_dataset

N = 6


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    base = tmp_path_factory.mktemp("ds")
    folder, zipped = str(base / "folder"), str(base / "zipped")
    labels = write_synthetic_dataset(folder, N, resolution=32, latent_shape=(8, 4, 4), num_classes=5)
    write_synthetic_dataset(zipped, N, resolution=32, latent_shape=(8, 4, 4), num_classes=5, as_zip=True)
    return dict(base=base, folder=folder, zipped=zipped, labels=labels)


@pytest.fixture
def broken(layouts, tmp_path):
    """A fresh, editable copy of the folder layout."""
    dst = str(tmp_path / "data")
    shutil.copytree(layouts["folder"], dst)
    return dst


def _edit_json(path, fn):
    with open(path) as f:
        meta = json.load(f)
    fn(meta)
    with open(path, "w") as f:
        json.dump(meta, f)


def test_items_and_attributes(layouts):
    ds = CustomDataset(layouts["folder"])
    assert len(ds) == N and ds.labels.dtype == np.int64 and np.array_equal(ds.labels, layouts["labels"])
    assert ds.num_classes == 5 and ds.resolution == 32
    assert ds.latent_shape == (8, 4, 4) and ds.image_shape == (3, 32, 32)
    moments, label = ds[4]
    assert moments.dtype == torch.float32 and moments.shape == (8, 4, 4)
    assert label.dtype == torch.int64 and int(label) == layouts["labels"][4]
    assert np.array_equal(moments.numpy(), np.load(os.path.join(layouts["folder"], "vae-sd", latent_name(4))))
    image, moments2, label2 = CustomDataset(layouts["folder"], return_images=True)[4]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    png = np.asarray(PIL.Image.open(os.path.join(layouts["folder"], "images", image_name(4))))
    assert np.array_equal(image.permute(1, 2, 0).numpy(), png)
    assert torch.equal(moments2, moments) and label2 == label


def test_folder_and_zip_identical(layouts):
    a = CustomDataset(layouts["folder"], return_images=True)
    b = CustomDataset(layouts["zipped"], return_images=True, check_all_headers=True)
    assert b._latents.is_zip and b._images.is_zip
    for i in range(N):
        for x, y in zip(a[i], b[i]):
            assert torch.equal(x, y)
    loader = torch.utils.data.DataLoader(b, batch_size=4, num_workers=2)  # each worker opens its own zip
    images, moments, labels = (torch.cat(t) for t in zip(*loader))
    assert torch.equal(moments, torch.stack([a[i][1] for i in range(N)]))
    assert torch.equal(images, torch.stack([a[i][0] for i in range(N)]))
    assert labels.dtype == torch.int64 and labels.tolist() == a.labels.tolist()


def test_pixel_mode_needs_only_images(layouts, tmp_path):
    only = str(tmp_path / "px")
    shutil.copytree(os.path.join(layouts["folder"], "images"), os.path.join(only, "images"))
    ds = CustomDataset(only, mode="pixel")
    image, label = ds[2]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and int(label) == layouts["labels"][2]
    assert ds.latent_shape is None and ds.resolution == 32 and ds.num_classes == 5
    with pytest.raises(DatasetError, match=r"vae-sd \(or vae-sd.zip\) not found.*dataset_tools.py encode.*'pixel'"):
        CustomDataset(only)


def test_latents_only(layouts, tmp_path):
    only = str(tmp_path / "lat")
    shutil.copytree(os.path.join(layouts["folder"], "vae-sd"), os.path.join(only, "vae-sd"))
    ds = CustomDataset(only)
    assert ds.image_shape is None and ds.resolution == 32 and len(ds) == N
    with pytest.raises(DatasetError, match=r"images \(or images.zip\) not found.*return_images=True.*convert"):
        CustomDataset(only, return_images=True)
    with pytest.raises(DatasetError, match="pixel mode needs the PNGs"):
        CustomDataset(only, mode="pixel")


def test_missing_data_dir_and_dataset_json(broken):
    with pytest.raises(DatasetError, match="no_such_dir is not a folder"):
        CustomDataset(broken + "/no_such_dir")
    os.remove(os.path.join(broken, "vae-sd", "dataset.json"))
    with pytest.raises(DatasetError, match=r"vae-sd/dataset.json is missing; run .*encode"):
        CustomDataset(broken)


def test_labels_null(broken):
    _edit_json(os.path.join(broken, "vae-sd", "dataset.json"), lambda m: m.update(labels=None))
    with pytest.raises(DatasetError, match="vae-sd/dataset.json has no valid 'labels' list"):
        CustomDataset(broken)


def test_file_without_label(broken):
    shutil.copy(os.path.join(broken, "vae-sd", latent_name(0)), os.path.join(broken, "vae-sd", "00000", "extra.npy"))
    with pytest.raises(DatasetError, match=r"has no label for 1 files .*\(00000/extra.npy\)"):
        CustomDataset(broken)


def test_label_for_missing_file(broken):
    os.remove(os.path.join(broken, "vae-sd", latent_name(3)))
    with pytest.raises(DatasetError, match=r"lists 1 files missing from .*vae-sd \(00000/img-mean-std-00000003.npy\)"):
        CustomDataset(broken)


def test_count_mismatch(broken):
    os.remove(os.path.join(broken, "images", image_name(5)))
    _edit_json(os.path.join(broken, "images", "dataset.json"), lambda m: m["labels"].pop())
    with pytest.raises(DatasetError, match=r"images has 5 images but .*vae-sd has 6 latents"):
        CustomDataset(broken)
    assert len(CustomDataset(broken, mode="pixel")) == 5  # pixel mode does not look at the latents


def test_labels_disagree(broken):
    _edit_json(os.path.join(broken, "images", "dataset.json"),
               lambda m: m["labels"][2].__setitem__(1, (m["labels"][2][1] + 1) % 5))
    with pytest.raises(DatasetError, match=r"labels disagree at 1 positions, e.g. 00000/img00000002.png"):
        CustomDataset(broken)


@pytest.mark.parametrize("array,msg", [
    (np.zeros((8, 4, 4), np.float64), r"img-mean-std-00000000.npy holds a float64 array of shape \(8, 4, 4\)"),
    (np.zeros((8, 16), np.float32), r"holds a float32 array of shape \(8, 16\); expected float32 moments"),
])
def test_wrong_first_latent(broken, array, msg):
    with open(os.path.join(broken, "vae-sd", latent_name(0)), "wb") as f:
        f.write(npy_bytes(array))
    with pytest.raises(DatasetError, match=msg):
        CustomDataset(broken)


def test_last_latent_other_shape(broken):
    with open(os.path.join(broken, "vae-sd", latent_name(N - 1)), "wb") as f:
        f.write(npy_bytes(np.zeros((8, 8, 8), np.float32)))
    with pytest.raises(DatasetError, match=r"00000005.npy has shape \(8, 8, 8\).*must come from one encode run"):
        CustomDataset(broken)


def test_latents_not_one_factor_from_images(broken):
    for i in range(N):
        with open(os.path.join(broken, "vae-sd", latent_name(i)), "wb") as f:
            f.write(npy_bytes(np.zeros((8, 4, 5), np.float32)))
    with pytest.raises(DatasetError, match="images are 32x32 but latents are 5x4"):
        CustomDataset(broken)


def test_truncated_latent_folder_and_zip(broken, tmp_path):
    path = os.path.join(broken, "vae-sd", latent_name(2))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 7)
    with pytest.raises(DatasetError, match=r"1 latent files are truncated .*-00000002.npy.*re-run the same encode"):
        CustomDataset(broken)
    shutil.make_archive(os.path.join(broken, "vae-sd"), "zip", os.path.join(broken, "vae-sd"))
    shutil.rmtree(os.path.join(broken, "vae-sd"))
    with pytest.raises(DatasetError, match=r"vae-sd.zip:00000/img-mean-std-00000002.npy"):
        CustomDataset(broken)


def test_file_replaced_after_startup(broken):
    ds = CustomDataset(broken)
    with open(os.path.join(broken, "vae-sd", latent_name(1)), "wb") as f:
        f.write(npy_bytes(np.zeros((8, 2, 8), np.float32)))  # same size, other shape
    with pytest.raises(DatasetError, match="img-mean-std-00000001.npy changed since start-up"):
        ds[1]
