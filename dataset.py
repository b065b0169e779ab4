"""The training dataset: SD-VAE moments (and optionally PNGs) under --data-dir, checked up front.

Layout (written by preprocessing/dataset_tools.py, the same as REPA / LSEP):

    DATA/images/   00000/img00000000.png ...          + dataset.json   (convert)
    DATA/vae-sd/   00000/img-mean-std-00000000.npy ... + dataset.json   (encode)

Either folder may instead be a zip of its contents (`DATA/images.zip`, `DATA/vae-sd.zip`); a
folder wins when both exist. Items are paired by sorted position, as in the authors' code.
"""
import io
import os
from typing import NamedTuple

import numpy as np
import torch

from models.vae import LATENT_DOWNSAMPLE, LatentNorm, LatentNormError
from preprocessing.storage import IMAGE_SUFFIXES, LABELS_FILE, LATENT_SUFFIXES, DatasetError, FileStore

IMAGES_DIR, LATENTS_DIR = "images", "vae-sd"
# convert's command for any class-folder tree; ImageNet's settings are docs/data.md's
CONVERT_HINT = ("python preprocessing/dataset_tools.py convert --source CLASS_FOLDERS --dest {d}/images "
                "--resolution WxH (ImageNet: --source IMAGENET/train --resolution 256x256 --transform "
                "center-crop-dhariwal)")
ENCODE_HINT = "python preprocessing/dataset_tools.py encode --source {d}/images --dest {d}/vae-sd"
# for images of a known size: the same convert command at that size (its default transform is ImageNet's)
IMAGE_FIX = ("restore {what} from a good copy, or re-run convert into a new folder: python "
             "preprocessing/dataset_tools.py convert --source CLASS_FOLDERS --dest {d}/images --resolution {w}x{h}")
LATENT_FIX = "delete it and re-run encode, which rewrites only missing files: " + ENCODE_HINT
PNG_COLOUR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}
_HEADER_BYTES = 4096  # a .npy header is at most this long for any 3-D shape


def _open_store(data_dir, name):
    folder = os.path.join(data_dir, name)
    if os.path.isdir(folder):
        return FileStore(folder)
    if os.path.isfile(folder + ".zip"):
        return FileStore(folder + ".zip")
    return None


def _show(names, limit=3):
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _read_labels(store, suffixes, fix):
    """Sorted data files of `store` and their int64 labels from its dataset.json, cross-checked."""
    if LABELS_FILE not in store:
        raise DatasetError(f"{store.full_path(LABELS_FILE)} is missing; {fix}")
    try:
        meta = store.read_json(LABELS_FILE)
        table = dict(meta["labels"])
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{store.full_path(LABELS_FILE)} has no valid 'labels' list ({e}); {fix}") from e
    files = store.names(suffixes)
    if not files:
        raise DatasetError(f"{store.path} holds no {'/'.join(suffixes)} files; {fix}")
    present = set(files)
    unlabelled = [f for f in files if f not in table]
    if unlabelled:
        raise DatasetError(
            f"{store.full_path(LABELS_FILE)} has no label for {len(unlabelled)} files in {store.path} "
            f"({_show(unlabelled)}); delete the stray files or {fix}"
        )
    orphans = sorted(k for k in table if k not in present)
    if orphans:
        raise DatasetError(
            f"{store.full_path(LABELS_FILE)} lists {len(orphans)} files missing from {store.path} "
            f"({_show(orphans)}); the copy is incomplete, or {fix}"
        )
    labels = np.array([table[f] for f in files])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise DatasetError(f"{store.full_path(LABELS_FILE)}: labels must be non-negative class indices")
    return files, labels.astype(np.int64), meta


def _npy_header(store, name):
    """(shape, dtype, fortran_order, header length in bytes) of a .npy file, reading only its start."""
    f = io.BytesIO(store.read_prefix(name, _HEADER_BYTES))
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except (ValueError, OSError, SyntaxError) as e:
        raise DatasetError(f"{store.full_path(name)} is not a readable .npy file ({e}); re-run encode") from e
    return tuple(shape), dtype, fortran, f.tell()


def _png_header(store, name):
    """(width, height, bit depth, colour type) from a PNG's IHDR chunk, or None if it does not start like a PNG."""
    head = store.read_prefix(name, 26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"), head[24], head[25]


def dataset_error_line(exc):
    """The one-line message of `exc`, also after a DataLoader worker re-raised it: the worker's copy
    carries the whole traceback as its message, whose last line is '<module>.<Class>: <message>'."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(exc).__name__
    head, sep, message = lines[-1].partition(": ")
    return message if sep and head.rsplit(".", 1)[-1] == type(exc).__name__ else lines[-1]


def _png_size(store, name):
    """(width, height) of an image from its header (PNG) or via PIL for other formats."""
    header = _png_header(store, name)
    if header is not None:
        return header[:2]
    import PIL.Image

    with PIL.Image.open(io.BytesIO(store.read(name))) as img:
        return img.size


class LatentItem(NamedTuple):
    """mode="latent": the VAE posterior moments (float32 [2C, h, w]) and the label (int64)."""
    moments: torch.Tensor
    label: torch.Tensor


class ImageItem(NamedTuple):
    """mode="pixel": the image (uint8 [3, H, W]) and the label."""
    image: torch.Tensor
    label: torch.Tensor


class PairedItem(NamedTuple):
    """mode="latent+pixel" (REPA): the image its encoders read, its latent moments, the label (the
    authors' (image, features, label) order)."""
    image: torch.Tensor
    moments: torch.Tensor
    label: torch.Tensor


class CustomDataset(torch.utils.data.Dataset):
    """ImageNet latents (default) or pixels from a `--data-dir` laid out as in the module docstring.

    Items are named tuples (batched by DataLoader into the same type):
    mode="latent": ``LatentItem(moments float32 [2C,h,w], label int64)``; only vae-sd/ is read, and
        images/ is checked against it when present. return_images=True adds the uint8 image
        [3,H,W] first, as the authors' dataset: ``PairedItem(image, moments, label)``.
    mode="pixel": ``ImageItem(image uint8 [3,H,W], label)``; only images/ is needed (small sets, no VAE).
    mode="latent+pixel": ``PairedItem(image uint8 [3,H,W], moments, label)``, the same as mode="latent" with
        return_images=True: REPA's encoders read the image next to its latent. Both folders must
        list the same items (count, labels and the index in each file name), checked at start-up.
    pixel_flag: the calling tool's flag for pixel space (train.py's "--vae none"), named in the
        message when only images are there (default: this class's mode='pixel').
    check_all_headers: parse every .npy header at start-up (one small read per file, minutes for
        1.28M files). By default the first and last headers are parsed and every file's size is
        checked against them, and each read compares the file's header bytes (a memcmp).
        Images that will be read (pixel mode, return_images): the PNG header (size, 8-bit RGB) of
        the first image and of every image whose byte size differs from it is read at start-up
        (convert's uncompressed PNGs all share one byte size), of all of them with check_all_headers.

    Attributes: labels (np.int64 [N]), num_classes, class_names (or None), resolution (image side in
    pixels), image_shape (3,H,W) and latent_shape (2C,h,w) (None when that part is absent),
    image_files / latent_files (relative paths, sorted), vae_record (what encode recorded of its VAE, or None),
    latent_norm (models.vae.LatentNorm of that record: how moments become model inputs; None in pixel mode).
    Every layout problem raises DatasetError here, naming the file and the fix.
    """

    def __init__(self, data_dir, mode="latent", return_images=False, check_all_headers=False, pixel_flag=None):
        if mode not in ("latent", "pixel", "latent+pixel"):
            raise ValueError(f"mode must be 'latent', 'pixel' or 'latent+pixel', got {mode!r}")
        if mode == "latent+pixel":
            mode, return_images = "latent", True
        if not os.path.isdir(data_dir):
            raise DatasetError(f"--data-dir {data_dir} is not a folder")
        self.data_dir, self.mode, self.return_images = data_dir, mode, return_images
        convert_fix = "run " + CONVERT_HINT.format(d=data_dir)
        encode_fix = "run " + ENCODE_HINT.format(d=data_dir)

        self._images = _open_store(data_dir, IMAGES_DIR)
        self._latents = _open_store(data_dir, LATENTS_DIR) if mode == "latent" else None
        needs_images = mode == "pixel" or return_images
        if needs_images and self._images is None:
            raise DatasetError(
                f"{os.path.join(data_dir, IMAGES_DIR)} (or {IMAGES_DIR}.zip) not found; "
                f"{'pixel mode' if mode == 'pixel' else 'return_images=True'} needs the PNGs: {convert_fix}"
            )
        if mode == "latent" and self._latents is None:
            if self._images is None:
                raise DatasetError(f"{data_dir} holds neither {IMAGES_DIR}/ nor {LATENTS_DIR}/ (nor their .zip); "
                                   f"{convert_fix}, then {ENCODE_HINT.format(d=data_dir)}")
            pixel = pixel_flag or "mode='pixel'"  # the tool's flag, else this class's argument
            raise DatasetError(
                f"{os.path.join(data_dir, LATENTS_DIR)} (or {LATENTS_DIR}.zip) not found next to "
                f"{os.path.join(data_dir, IMAGES_DIR)}; encode them: {ENCODE_HINT.format(d=data_dir)}, or use the "
                f"images as they are with {pixel}"
            )

        self.image_files, self.latent_files = [], []
        self.image_shape = self.latent_shape = self.class_names = self.vae_record = self.latent_norm = None
        if self._images is not None:
            self.image_files, image_labels, meta = _read_labels(self._images, IMAGE_SUFFIXES, convert_fix)
            self.class_names = meta.get("class_names")
            w, h = _png_size(self._images, self.image_files[0])
            self.image_shape = (3, h, w)
            self.labels = image_labels
            if needs_images:
                self._check_images(check_all_headers)
        if mode == "latent":
            self.latent_files, self.labels, meta = _read_labels(self._latents, LATENT_SUFFIXES, encode_fix)
            names = meta.get("class_names")
            self.vae_record = meta.get("vae")  # what encode recorded of the VAE that made the latents
            self.class_names = names if names is not None else self.class_names
            self._check_latents(check_all_headers)
            self.latent_norm = self._latent_norm()
            if self._images is not None:
                self._check_pairing(image_labels, encode_fix)
        self.num_classes = len(self.class_names) if self.class_names else int(self.labels.max()) + 1
        if self.labels.max() >= self.num_classes:
            raise DatasetError(f"labels reach {self.labels.max()} but class_names lists {self.num_classes} classes")
        if self.image_shape is not None:
            self.resolution = self.image_shape[1]
        else:
            factor = (self.vae_record or {}).get("downsample_factor", LATENT_DOWNSAMPLE)  # older encodes: SD-VAE's
            self.resolution = self.latent_shape[1] * factor

    def _check_latents(self, check_all_headers):
        """All .npy files: float32 C-order 3-D arrays of one shape, and complete (size check)."""
        first = self.latent_files[0]
        shape, dtype, fortran, header_len = _npy_header(self._latents, first)
        where = self._latents.full_path(first)
        if dtype != np.dtype("<f4") or fortran or len(shape) != 3 or shape[0] % 2:
            raise DatasetError(
                f"{where} holds a {dtype} array of shape {shape}; expected float32 moments (2C, h, w) "
                f"(mean then std) as written by encode; {ENCODE_HINT.format(d=self.data_dir)}"
            )
        self.latent_shape = shape
        self._header = self._latents.read_prefix(first, header_len)
        complete = header_len + int(np.prod(shape)) * 4
        for name in self.latent_files[-1:] + (self.latent_files[1:-1] if check_all_headers else []):
            other = _npy_header(self._latents, name)
            if other[:3] != (shape, dtype, fortran):
                raise DatasetError(
                    f"{self._latents.full_path(name)} has shape {other[0]} / {other[1]} but {where} has {shape} / "
                    f"{dtype}; all latents must come from one encode run"
                )
        sizes = self._latents.sizes
        bad = [n for n in self.latent_files if sizes[n] != complete]
        if bad:
            where = _show([self._latents.full_path(n) for n in bad])
            raise DatasetError(
                f"{len(bad)} latent files are truncated or the wrong size ({where}; expected {complete} bytes for "
                f"{shape}); re-run the same encode command, it rewrites them: {ENCODE_HINT.format(d=self.data_dir)}"
            )

    def _latent_norm(self):
        """The record's normalisation (older records: the SD-VAE's), checked against the latents' channels."""
        where = self._latents.full_path(LABELS_FILE)
        try:
            norm = LatentNorm.from_record(self.vae_record)
        except LatentNormError as exc:
            raise DatasetError(f"{where}: {exc}; re-run the same encode command, which rewrites the record: "
                               f"{ENCODE_HINT.format(d=self.data_dir)}") from None
        if norm.channels is not None and norm.channels * 2 != self.latent_shape[0]:
            raise DatasetError(f"{where} records per-channel statistics of {norm.channels} channels but the latents "
                               f"have {self.latent_shape[0] // 2}; re-run the same encode command to recompute them: "
                               f"{ENCODE_HINT.format(d=self.data_dir)}")
        return norm

    def _check_images(self, check_all_headers):
        """PNG headers (IHDR) agree with the first image's size and are 8-bit RGB; see the class docstring."""
        sizes, first = self._images.sizes, self.image_files[0]
        bad = []
        for name in self.image_files:
            if not name.lower().endswith(".png") or (name != first and sizes[name] == sizes[first]
                                                     and not check_all_headers):
                continue
            header = _png_header(self._images, name)
            if header is None:
                bad.append(f"{self._images.full_path(name)} is not a PNG file")
            elif header[:2] != (self.image_shape[2], self.image_shape[1]) or header[2:] != (8, 2):
                kind = f"{header[2]}-bit {PNG_COLOUR_TYPES.get(header[3], f'colour type {header[3]}')}"
                bad.append(f"{self._images.full_path(name)} is {header[0]}x{header[1]} {kind}")
        if bad:
            raise DatasetError(f"{len(bad)} bad images: {_show(bad, 2)}; expected {self.image_shape[2]}x"
                               f"{self.image_shape[1]} 8-bit RGB PNGs like {self._images.full_path(first)}; "
                               f"{self._image_fix('them')}")

    def _image_fix(self, what):
        _, h, w = self.image_shape
        return IMAGE_FIX.format(what=what, d=self.data_dir, w=w, h=h)

    def _check_pairing(self, image_labels, fix):
        """images/ and vae-sd/ must describe the same images in the same order."""
        images, latents = self._images.path, self._latents.path
        if len(self.image_files) != len(self.latent_files):
            raise DatasetError(
                f"{images} has {len(self.image_files)} images but {latents} has {len(self.latent_files)} latents; "
                f"re-run encode on these images ({fix}), or move {images} away to train on the latents alone"
            )
        if self.return_images:  # items are paired by position: their names must carry the same index
            digits = str.maketrans("", "", "".join(map(chr, range(32, 48))) + "".join(map(chr, range(58, 127))))
            for image, latent in zip(self.image_files, self.latent_files):
                if image.translate(digits) != latent.translate(digits):
                    raise DatasetError(f"{images}/{image} is paired with {latents}/{latent} (same position in "
                                       f"sorted order) but their indices differ; the folders hold different "
                                       f"items: {fix}")
        differ = np.flatnonzero(image_labels != self.labels)
        if len(differ):
            i = int(differ[0])
            raise DatasetError(
                f"labels disagree at {len(differ)} positions, e.g. {self.image_files[i]} is class {image_labels[i]} in "
                f"{images} but {self.latent_files[i]} is class {self.labels[i]} in {latents}; the latents were not "
                f"encoded from these images: {fix}"
            )
        _, h, w = self.image_shape
        _, lh, lw = self.latent_shape
        if h % lh or w % lw or h // lh != w // lw:
            raise DatasetError(f"images are {w}x{h} but latents are {lw}x{lh}: not one VAE factor apart; {fix}")

    def __len__(self):
        return len(self.labels)

    def _image(self, idx):
        import PIL.Image

        name = self.image_files[idx]
        fix = self._image_fix("it")
        try:
            with PIL.Image.open(io.BytesIO(self._images.read(name))) as img:
                mode, array = img.mode, np.array(img)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error... for a damaged file
            unknown = isinstance(e, PIL.UnidentifiedImageError)  # its text holds a BytesIO repr, not a reason
            why = "not an image PIL can identify" if unknown else f"{type(e).__name__}: {e}"
            raise DatasetError(f"{self._images.full_path(name)} cannot be decoded ({why}); {fix}") from None
        if mode != "RGB" or array.shape != self.image_shape[1:] + (3,):
            raise DatasetError(f"{self._images.full_path(name)} is a {array.shape[1]}x{array.shape[0]} {mode} image, "
                               f"expected {self.image_shape[2]}x{self.image_shape[1]} RGB like the first image; {fix}")
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))  # numpy: ~8x faster than torch here

    def _moments(self, idx):
        name = self.latent_files[idx]
        raw = self._latents.read(name)
        header = len(self._header)
        complete = header + 4 * int(np.prod(self.latent_shape))
        if raw[:header] != self._header or len(raw) != complete:
            where, fix = self._latents.full_path(name), LATENT_FIX.format(d=self.data_dir)
            shape, dtype, _, _ = _npy_header(self._latents, name)
            raise DatasetError(f"{where} changed since start-up: it holds {dtype} {shape} ({len(raw)} bytes), the "
                               f"latents are float32 {self.latent_shape} ({complete} bytes); {fix}")
        return torch.from_numpy(np.frombuffer(raw, dtype="<f4", offset=header).reshape(self.latent_shape).copy())

    def __getitem__(self, idx):
        label = torch.tensor(self.labels[idx])
        if self.mode == "pixel":
            return ImageItem(self._image(idx), label)
        if self.return_images:
            return PairedItem(self._image(idx), self._moments(idx), label)
        return LatentItem(self._moments(idx), label)
