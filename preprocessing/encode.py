"""`encode`: converted PNGs -> VAE posterior moments, one .npy per image; resumable, multi-GPU.

Output: `00000/img-mean-std-00000000.npy` (float32 (2C, H/f, W/f), mean then std; (8, 32, 32) for
the SD-VAE at 256 px), the i-th file from the i-th image in sorted order, and `dataset.json`
with `{"vae": ..., "encode": ..., "labels": [[npy_path, class_index], ...], "class_names": [...]}` written
last. "vae" identifies the VAE (models.vae.vae_identity: name, config and weight hashes, the encoder
half's hash) and the normalisation that turns its latents into model inputs (models.vae.LatentNorm:
latent_norm "scale" with the config's latent_scale / latent_shift, or "per-channel" with latent_mean /
latent_std of the posterior samples over the whole dataset, computed at the end from the written files
in index order, so reruns and resumes give the same numbers); a rerun into the same folder with a VAE
whose encoder differs is refused, and train.py checks its --vae against it. `.encode.json` holds the
same record while an encode is in progress.

Images are cut into fixed chunks of --batch-size consecutive indices and every chunk is one VAE
batch, whatever the number of ranks: one-rank, multi-rank and resumed runs see the same batches
and so write the same bytes (given deterministic kernels). Each .npy is written to a temporary
file and renamed, so a killed run never leaves a partial file; a rerun encodes only the chunks
with a missing file (or one of the wrong size) and writes only those files.
"""
import datetime
import io
import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from fileio import check_writable
from models.vae import (ENCODE_VAE, NORM_KINDS, LatentNorm, LatentNormError, PosteriorStats, downsample_factor,
                        encode_moments, latent_channels, load_vae, vae_identity)
from preprocessing.storage import IMAGE_SUFFIXES, LABELS_FILE, DatasetError, FileStore, latent_name
from preprocessing.transforms import decode_rgb


@dataclass
class EncodeSummary:
    """What an encode run did (counts summed over ranks)."""

    dest: str
    total: int  # images in the dataset
    written: int  # .npy files written by this run
    kept: int  # .npy files that were already complete
    latent_shape: tuple
    zip_path: str = ""


def npy_file_size(shape, dtype="<f4") -> int:
    """Bytes of a complete np.save file holding an array of `shape` and `dtype`."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, dtype=dtype))
    return buf.tell()


def save_npy_atomic(path, array):
    """np.save to a temporary file in the same folder, then rename: readers never see a partial file."""
    folder, base = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array, dtype="<f4"))
    os.replace(tmp, path)


def _write_if_changed(path, data: bytes) -> bool:
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read() == data:
                return False
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return True


def pack_zip(folder, zip_path):
    """Store every file of `folder` (except temporaries) uncompressed in `zip_path`, atomically."""
    store = FileStore(folder)
    tmp = zip_path + ".incomplete"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in store.names():
            if not name.endswith(".tmp"):
                zf.write(os.path.join(folder, name), name)
    os.replace(tmp, zip_path)


class _ChunkImages(torch.utils.data.Dataset):
    """Item j = (first index, uint8 [b,3,H,W]) of the j-th chunk to encode."""

    def __init__(self, store, names, chunks, size):
        self.store, self.names, self.chunks, self.size = store, names, chunks, size

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, j):
        start, stop = self.chunks[j]
        images = []
        for i in range(start, stop):
            img = decode_rgb(self.store.read(self.names[i]))
            if img.size != self.size:
                raise DatasetError(
                    f"{self.store.full_path(self.names[i])} is {img.size[0]}x{img.size[1]} but the first "
                    f"image is {self.size[0]}x{self.size[1]}; all images must share one size (re-run convert)"
                )
            images.append(np.asarray(img))
        return start, torch.from_numpy(np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)))


def _setup_distributed(device):
    """(rank, world size, device) from torchrun's environment; single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # Long timeout: ranks meet at a barrier only after encoding their share.
        timeout = datetime.timedelta(hours=6)
        if device.type == "cuda":
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return rank, world, device


def _read_source(source, max_images):
    try:
        store = FileStore(source)
    except (FileNotFoundError, ValueError) as e:
        raise DatasetError(f"--source: {e} (expected the folder or .zip written by `convert`)") from e
    if LABELS_FILE not in store:
        raise DatasetError(
            f"{store.full_path(LABELS_FILE)} is missing: encode reads the output of `convert`, run "
            "`python preprocessing/dataset_tools.py convert --source RAW --dest DATA/images ...` first"
        )
    meta = store.read_json(LABELS_FILE)
    table = dict(meta.get("labels") or [])
    names = store.names(IMAGE_SUFFIXES)
    if not names:
        raise DatasetError(f"--source {source} holds no images")
    unlabelled = [n for n in names if n not in table]
    if unlabelled:
        raise DatasetError(
            f"{store.full_path(LABELS_FILE)} has no label for {len(unlabelled)} images "
            f"(e.g. {unlabelled[0]}); re-run convert"
        )
    if max_images is not None:
        names = names[:max_images]
    return store, names, [int(table[n]) for n in names], meta.get("class_names")


PROGRESS_FILE = ".encode.json"  # the VAE record of an encode in progress (dataset.json is written last)


def check_latent_record(dest, record, has_latents):
    """Refuse, in one line, to add latents of this VAE to a folder whose latents came from another:
    the encoder weights (encoder.* + quant_conv.*, which alone fix the moments) must hash the same.
    Returns the VAE record to keep: the stored one when there is one (it made the files there)."""
    stored = None
    for name in (LABELS_FILE, PROGRESS_FILE):
        path = os.path.join(dest, name)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    stored = json.load(f).get("vae")
            except (OSError, ValueError, AttributeError):
                stored = None
            break
    if stored is None:
        if has_latents:
            raise DatasetError(f"--dest {dest} holds latents without a record of the VAE that made them (an older "
                               "encode or another tool); encode into a new --dest, or delete the folder")
        return record["vae"]
    mine = record["vae"]
    if stored.get("encoder_sha256") != mine["encoder_sha256"]:
        raise DatasetError(f"--dest {dest} holds latents of the VAE {stored.get('name')} (encoder "
                           f"{str(stored.get('encoder_sha256'))[:12]}), not of --vae {mine['spec']} (encoder "
                           f"{mine['encoder_sha256'][:12]}); encode into a new --dest for this VAE")
    return stored


def latent_statistics(dest, names, channels, progress=False):
    """Per-channel (mean, std) of the posterior samples of the latents ``names`` under ``dest``
    (models.vae.PosteriorStats), read in the given order: one pass over the files."""
    stats = PosteriorStats(channels)
    for name in tqdm(names, unit="file", desc="latent statistics", disable=not progress):
        stats.add(np.load(os.path.join(dest, name)))
    return stats.result()


def latent_norm_record(stored, mine, latent_norm, dest, names, channels, progress=False):
    """The VAE record to write: ``stored`` (the one already in dest, else this VAE's) with the
    normalisation of --latent-norm. "scale": the config's factors of the VAE the record names (this
    VAE's, ``mine``, when the record predates them); a record of an older encode whose implied SD-VAE
    normalisation (0.18215 / 0) is the same is kept as it is. "per-channel" adds the statistics of the
    written files (``channels`` latent channels)."""
    if latent_norm not in NORM_KINDS:
        raise DatasetError(f"--latent-norm {latent_norm}: expected one of {', '.join(NORM_KINDS)}")
    older = "latent_norm" not in stored and "latent_shift" not in stored
    base = LatentNorm("scale", mine["latent_scale"], mine["latent_shift"])
    if not older:
        try:
            base = LatentNorm.from_record(stored)
        except LatentNormError:  # a damaged record: this VAE's factors (its encoder made the files)
            pass
    norm = LatentNorm("scale", base.scale, base.shift)
    if latent_norm == "scale" and older and LatentNorm.from_record(stored) == norm:
        return stored  # an SD-VAE folder of an older encode: its dataset.json stays byte for byte
    if latent_norm == "per-channel":
        mean, std = latent_statistics(dest, names, channels, progress)
        if min(std) <= 0:
            raise DatasetError(f"--latent-norm per-channel: a latent channel of {dest} is constant (std 0), so it "
                               "cannot be normalised per channel; use --latent-norm scale")
        norm = LatentNorm("per-channel", norm.scale, norm.shift, mean, std)
    kept = {k: v for k, v in stored.items() if k not in ("latent_mean", "latent_std")}
    return {**kept, **norm.fields()}


def encode_dataset(source, dest, vae=ENCODE_VAE, batch_size=32, workers=None, max_images=None,
                   device=None, zip_dest=False, progress=True, latent_norm="scale") -> EncodeSummary:
    """Encode the PNGs of `source` (convert's folder or zip) into moments under the folder `dest`.

    Runs on every rank of a torchrun launch (ranks share the pending chunks round-robin; only
    rank 0 writes dataset.json, after a barrier). vae: "ema"/"mse", a hub name or a local folder
    (any diffusers AutoencoderKL). zip_dest: also pack `dest` into `dest.zip` at the end.
    latent_norm: "scale" (the config's scaling / shift factor) or "per-channel" (statistics of the
    data, one extra pass over the written latents by rank 0); see models.vae.LatentNorm.
    """
    if latent_norm not in NORM_KINDS:
        raise DatasetError(f"--latent-norm {latent_norm}: expected one of {', '.join(NORM_KINDS)}")
    if dest.lower().endswith(".zip"):
        raise DatasetError(
            f"--dest {dest}: encode writes a folder (that is what makes it resumable); pass the folder "
            "and add --zip to also pack it into <folder>.zip"
        )
    dest = os.path.normpath(dest)
    if os.path.abspath(dest) == os.path.abspath(source):
        raise DatasetError("--dest must differ from --source")
    rank, world, device = _setup_distributed(device)
    if workers is None:
        workers = max(1, min(8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    try:
        store, names, labels, class_names = _read_source(source, max_images)
        check_writable(dest, "--dest")
        width, height = decode_rgb(store.read(names[0])).size
        model = load_vae(vae, device)
        f = downsample_factor(model)
        if width % f or height % f:
            raise DatasetError(f"images are {width}x{height}; the VAE needs sides divisible by {f}")
        shape = (2 * latent_channels(model), height // f, width // f)
        complete = npy_file_size(shape)
        out_names = [latent_name(i) for i in range(len(names))]

        os.makedirs(dest, exist_ok=True)
        sizes = FileStore(dest).sizes
        expected = set(out_names)
        foreign = [n for n in sizes if n.endswith(".npy") and n not in expected]
        if foreign:
            raise DatasetError(
                f"--dest {dest} holds {len(foreign)} .npy files this dataset would not write "
                f"(e.g. {foreign[0]}): it belongs to another dataset or a larger --max-images; use an empty folder"
            )
        record = {"vae": vae_identity(model, vae), "encode": {
            "source": os.path.abspath(source), "images": len(names), "image_size": [width, height],
            "latent_shape": list(shape), "moments": "float32 (mean, std) of the posterior, unscaled"}}
        this_vae = record["vae"]
        record["vae"] = check_latent_record(dest, record, any(n.endswith(".npy") for n in sizes))
        if rank == 0:  # before the first latent: a killed run still says which VAE made its files
            _write_if_changed(os.path.join(dest, PROGRESS_FILE), json.dumps(record, indent=1).encode())
        if world > 1:
            dist.barrier()  # every rank has listed dest before anyone writes to it

        chunks = [(s, min(s + batch_size, len(names))) for s in range(0, len(names), batch_size)]
        pending = [c for c in chunks if any(sizes.get(out_names[i]) != complete for i in range(*c))]
        mine = pending[rank::world]
        loader = torch.utils.data.DataLoader(
            _ChunkImages(store, names, mine, (width, height)), batch_size=None, num_workers=workers,
            pin_memory=device.type == "cuda",
        )
        written = 0
        bar = tqdm(total=sum(b - a for a, b in mine), unit="img", desc=f"encode rank {rank}",
                   disable=not progress or rank != 0)
        for start, images in loader:
            moments = encode_moments(model, images.to(device, non_blocking=True)).cpu().numpy()
            for j, array in enumerate(moments):
                name = out_names[start + j]
                if sizes.get(name) != complete:
                    save_npy_atomic(os.path.join(dest, name), array)
                    written += 1
            bar.update(len(moments))
        bar.close()

        if world > 1:
            count = torch.tensor([written], dtype=torch.int64, device=device)
            dist.all_reduce(count)
            written = int(count.item())
            dist.barrier()
        summary = EncodeSummary(dest=dest, total=len(names), written=written, kept=len(names) - written,
                                latent_shape=shape)
        if rank == 0:
            final = FileStore(dest).sizes
            bad = [n for n in out_names if final.get(n) != complete]
            if bad:
                raise DatasetError(
                    f"{len(bad)} latents missing or incomplete after encoding (e.g. {bad[0]}); re-run encode"
                )
            for name in final:
                if name.endswith(".tmp"):  # left by a killed run
                    os.remove(os.path.join(dest, name))
            record["vae"] = latent_norm_record(record["vae"], this_vae, latent_norm, dest, out_names, shape[0] // 2,
                                               progress)
            meta = {**record, "labels": [[n, y] for n, y in zip(out_names, labels)]}
            if class_names is not None:
                meta["class_names"] = class_names
            changed = _write_if_changed(os.path.join(dest, LABELS_FILE), json.dumps(meta).encode())
            os.remove(os.path.join(dest, PROGRESS_FILE))
            if zip_dest:
                summary.zip_path = dest + ".zip"
                if changed or written or not os.path.isfile(summary.zip_path):
                    pack_zip(dest, summary.zip_path)
        if world > 1:
            dist.barrier()
        return summary
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
