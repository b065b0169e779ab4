"""Image decoding and the crop/resize rules used to build ImageNet-256/512.

`center-crop-dhariwal` is the ADM rule (guided-diffusion `center_crop_arr`) that DiT, SiT, REPA and
LSEP train on; `center-crop` is EDM2's one-step LANCZOS crop, generalised to any WxH.
"""
import functools
import io

import numpy as np
import PIL.Image

from preprocessing.storage import DatasetError

TRANSFORMS = ("center-crop-dhariwal", "center-crop")


def decode_rgb(data: bytes) -> PIL.Image.Image:
    """Decode an image file fully (so truncated files fail here) and convert it to RGB.

    Grayscale, CMYK and palette images go through PIL's own conversion. Alpha is dropped, not
    composited: the stored colour of transparent pixels is kept, as ADM/EDM2's convert('RGB').
    16-bit grayscale is scaled to 8 bits instead of being clipped.
    """
    img = PIL.Image.open(io.BytesIO(data))
    img.load()
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I"):
        img = PIL.Image.fromarray(np.round(np.asarray(img, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
    return img.convert("RGB")


def center_crop_dhariwal(img: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """ADM's ImageNet crop to size x size.

    1. While the short side is >= 2 * size, halve both sides (floor) with a BOX filter.
    2. BICUBIC-resize so the short side equals `size` (long side: round(long * scale), Python's
       round); this upscales images whose short side is below `size`.
    3. Crop the centre size x size (offset floor((side - size) / 2)).
    """
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), PIL.Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(side * scale) for side in img.size), PIL.Image.Resampling.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def center_crop(img: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """Largest centred box with the target aspect ratio, then one LANCZOS resize to width x height.

    For square targets this is EDM2's `center-crop`; small images are upscaled by the resize.
    """
    w, h = img.size
    if w * height > h * width:  # too wide: keep the full height
        box_w, box_h = max(1, round(h * width / height)), h
    else:
        box_w, box_h = w, max(1, round(w * height / width))
    left, top = (w - box_w) // 2, (h - box_h) // 2
    return img.resize((width, height), PIL.Image.Resampling.LANCZOS, box=(left, top, left + box_w, top + box_h))


def make_transform(name: str, width: int, height: int):
    """The crop/resize rule `name` as a picklable function: PIL RGB image -> width x height."""
    if name == "center-crop-dhariwal":
        if width != height:
            raise DatasetError(f"--transform center-crop-dhariwal needs a square --resolution, got {width}x{height}")
        return functools.partial(center_crop_dhariwal, size=width)
    if name == "center-crop":
        return functools.partial(center_crop, width=width, height=height)
    raise DatasetError(f"unknown --transform {name!r}; choose one of {', '.join(TRANSFORMS)}")
