"""Stand-ins for tests and benchmarks: a tiny random SD-VAE-shaped AutoencoderKL and random datasets.

Nothing here is needed to build the real ImageNet data.
"""
import io
import json
import os
import zipfile

import numpy as np

from preprocessing.storage import LABELS_FILE, image_name, latent_name


def save_tiny_vae(folder, seed=0, latent_channels=4):
    """A random AutoencoderKL with the SD-VAE's structure (4 levels: 8x downsampling) but ~70k
    parameters, saved with save_pretrained to `folder` (loadable by models.vae.load_vae)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=latent_channels,
        norm_num_groups=4, sample_size=32,
    )
    vae.save_pretrained(folder)
    return folder


def png_bytes(array):
    """uint8 [H,W,3] -> uncompressed PNG bytes, as convert writes them."""
    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.fromarray(array).save(buf, format="png", compress_level=0)
    return buf.getvalue()


def npy_bytes(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def write_synthetic_dataset(data_dir, num_items, resolution=32, latent_shape=(8, 4, 4), num_classes=10,
                            images=True, latents=True, as_zip=False, seed=0):
    """Random `images/` and/or `vae-sd/` (folders, or images.zip / vae-sd.zip) in the layout of
    preprocessing/dataset_tools.py, with random labels. Returns the labels (np.int64)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num_items)
    class_names = [f"n{i:08d}" for i in range(num_classes)]
    parts = []
    if images:
        parts.append(("images", image_name,
                      lambda: png_bytes(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8))))
    if latents:
        parts.append(("vae-sd", latent_name,
                      lambda: npy_bytes(rng.standard_normal(latent_shape, dtype=np.float32))))
    for part, name_of, make in parts:
        files = {name_of(i): make() for i in range(num_items)}
        meta = {"labels": [[name_of(i), int(y)] for i, y in enumerate(labels)], "class_names": class_names}
        files[LABELS_FILE] = json.dumps(meta).encode()
        root = os.path.join(data_dir, part)
        if as_zip:
            os.makedirs(data_dir, exist_ok=True)
            with zipfile.ZipFile(root + ".zip", "w", compression=zipfile.ZIP_STORED) as zf:
                for name, data in files.items():
                    zf.writestr(name, data)
        else:
            for name, data in files.items():
                os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
                with open(os.path.join(root, name), "wb") as f:
                    f.write(data)
    return labels.astype(np.int64)
