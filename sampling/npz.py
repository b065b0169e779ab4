"""PNG files written atomically, one per index, and the npz (``arr_0``: (N, H, W, 3) uint8)
streamed from them for the ADM evaluator."""
import io
import json
import os
import zipfile

import numpy as np
from PIL import Image, PngImagePlugin
from tqdm import tqdm

from fileio import atomic_write, remove_stale_temps
from sampling.errors import GenerateError

NPZ_PROVENANCE_KEY = "provenance"  # a uint8 array of UTF-8 JSON inside the npz, next to arr_0
# PNG text chunks of an adaptive solver's samples: its velocity evaluations, and how many were guided
NFE_KEYS = ("nfe", "nfe_guided")


def png_path(folder, index):
    return os.path.join(folder, f"{index:06d}.png")


def save_png_atomic(image, path, text=None):
    """Write a PNG under a temporary name in the same folder (fileio.temp_path: it names its host
    and process), then rename it into place; a full disk is fileio.DiskFull (one line). ``text``:
    {key: str} stored as PNG text chunks (the sampler's NFE with dopri5); None writes none."""
    buffer = io.BytesIO()  # encoded first, so a full disk reports the PNG's size as the space needed
    if text:
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, str(value))
        Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    else:
        Image.fromarray(image).save(buffer, format="PNG")
    # no fsync: 50k of them slow sampling down, and a killed process still leaves old-or-new
    atomic_write(path, lambda f: f.write(buffer.getbuffer()), expected_bytes=buffer.tell(), fsync=False)


def missing_indices(folder, num_samples):
    """Indices in [0, N) without a PNG, after removing temporary files a killed run left (those of
    live processes, e.g. another generate.py on this folder, are kept)."""
    remove_stale_temps(folder)
    names = set(os.listdir(folder))
    return [i for i in range(num_samples) if f"{i:06d}.png" not in names]


def npz_is_complete(path, shape):
    """True when ``path`` is an npz whose ``arr_0`` is a full uint8 array of ``shape``."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            found_shape, fortran, dtype = read_header(f)
            size = zf.getinfo("arr_0.npy").file_size
            return (tuple(found_shape) == tuple(shape) and dtype == np.uint8 and not fortran
                    and size - f.tell() == int(np.prod(shape)))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False


def write_npz(folder, num_samples, path, identity):
    """Stream PNGs 0..N-1 into ``path`` as ``arr_0`` (N, H, W, 3) uint8, the layout np.savez
    writes (a stored zip entry ``arr_0.npy``), without holding all N images in memory; the
    sample set's identity goes in as ``provenance`` (UTF-8 JSON bytes), which ADM's evaluator ignores."""
    first = np.asarray(Image.open(png_path(folder, 0)).convert("RGB"))
    shape = (num_samples, *first.shape)

    def write(out):  # into fileio's temporary (.tmp-<host>-<pid>-<name>.npz), renamed when complete
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                          "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_1_0(f, header)
                for i in tqdm(range(num_samples), desc="Building .npz", mininterval=5):
                    image = np.asarray(Image.open(png_path(folder, i)))
                    if image.shape != first.shape or image.dtype != np.uint8:
                        raise GenerateError(f"{png_path(folder, i)} is {image.dtype} {image.shape}, expected "
                                            f"uint8 {first.shape}; delete it and rerun to resample it")
                    f.write(np.ascontiguousarray(image).tobytes())
            with zf.open(f"{NPZ_PROVENANCE_KEY}.npy", "w") as f:
                np.lib.format.write_array(f, np.frombuffer(json.dumps(identity).encode(), dtype=np.uint8))

    atomic_write(path, write, expected_bytes=int(np.prod(shape)))
    return shape


def nfe_summary(folder, num_samples):
    """Mean, min and max velocity evaluations per sample (and the mean guided ones) from the NFE
    text chunks of PNGs 0..N-1, or None when a PNG has none (fixed-step samplers write none).
    Only the PNG headers are read: the chunks sit before the image data."""
    counts = []
    for i in range(num_samples):
        with Image.open(png_path(folder, i)) as image:
            text = image.info  # chunks before the image data (``.text`` would decode the image)
            if any(key not in text for key in NFE_KEYS):
                return None
            counts.append([int(text[key]) for key in NFE_KEYS])
    nfe, guided = np.asarray(counts, dtype=np.int64).T
    return {"mean": float(nfe.mean()), "min": int(nfe.min()), "max": int(nfe.max()),
            "guided_mean": float(guided.mean()), "forward_passes_mean": float((nfe + guided).mean()),
            "samples": int(num_samples)}
