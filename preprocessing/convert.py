"""`convert`: a class-folder tree (ImageNet train) or its .zip -> RGB PNGs of one size + dataset.json.

Output: `00000/img00000000.png`, ... in sorted source order (skipped files leave no gap) and
`dataset.json` with `{"labels": [[png_path, class_index], ...], "class_names": [...]}`; class
index = position of the image's top-level folder among the sorted folder names. Unreadable
images are skipped and listed in `<dest>.skipped.txt`, next to the output; when none can be read,
nothing is left at `dest` and DatasetError says so.
"""
import io
import json
import multiprocessing
import os
import zipfile
from dataclasses import dataclass, field

import PIL.Image
from tqdm import tqdm

from fileio import check_writable
from preprocessing.storage import LABELS_FILE, DatasetError, FileStore, image_name
from preprocessing.transforms import decode_rgb, make_transform


@dataclass
class ConvertSummary:
    """What a convert run did."""

    dest: str
    written: int
    num_classes: int
    skipped: list = field(default_factory=list)  # [(source path, reason), ...]
    skipped_log: str = ""


def skipped_log_path(dest: str) -> str:
    """`<dest>.skipped.txt` beside the output folder or zip (so the dataset itself stays clean)."""
    return os.path.normpath(dest) + ".skipped.txt"


def list_source(store: FileStore):
    """Sorted image paths of the source, their labels {path: class_index}, and the class names.

    Labels come from the source's dataset.json when it has one (a re-conversion of our own
    output), else from the top-level folder names.
    """
    extensions = {ext.lower() for ext in PIL.Image.registered_extensions()}
    names = [n for n in store.names() if os.path.splitext(n)[1].lower() in extensions]
    if not names:
        raise DatasetError(f"--source {store.path} contains no image files")
    if LABELS_FILE in store:
        meta = store.read_json(LABELS_FILE)
        labels = dict(meta.get("labels") or [])
        unlabelled = [n for n in names if n not in labels]
        if unlabelled:
            raise DatasetError(
                f"{store.full_path(LABELS_FILE)} has no label for {len(unlabelled)} images "
                f"(e.g. {unlabelled[0]}); fix or delete that file to label images by folder name"
            )
        class_names = meta.get("class_names")
        if class_names is None:
            class_names = [str(i) for i in range(max(labels[n] for n in names) + 1)]
        return names, {n: int(labels[n]) for n in names}, list(class_names)
    at_root = [n for n in names if "/" not in n]
    if at_root:
        raise DatasetError(
            f"--source {store.path} must hold one folder per class (ImageNet train: one folder per "
            f"synset), but {len(at_root)} images lie directly in it (e.g. {at_root[0]}); move them into "
            "class folders"
        )
    class_names = sorted({n.split("/", 1)[0] for n in names})
    index = {c: i for i, c in enumerate(class_names)}
    return names, {n: index[n.split("/", 1)[0]] for n in names}, class_names


# Worker state, set once per process by _init_worker (the store reopens its zip per process).
_worker = {}


def _init_worker(store, transform, size):
    _worker.update(store=store, transform=make_transform(transform, *size), size=tuple(size))


def _convert_one(name):
    """Source path -> (png bytes, None), or (None, reason) when the file cannot be used."""
    try:
        img = _worker["transform"](decode_rgb(_worker["store"].read(name)))
    except PIL.UnidentifiedImageError:  # its own text shows a BytesIO repr, not the file
        return None, "UnidentifiedImageError: not an image format PIL can read"
    except Exception as e:  # a corrupt file must not abort a 1.28M-image run
        return None, f"{type(e).__name__}: {e}"
    if img.size != _worker["size"]:
        return None, f"transform produced {img.size[0]}x{img.size[1]}"
    buf = io.BytesIO()
    img.save(buf, format="png", compress_level=0)  # uncompressed: fastest to decode later
    return buf.getvalue(), None


class _Dest:
    """Writes files into an empty folder, or into a zip that appears (atomically) on close()."""

    def __init__(self, dest):
        self.dest = dest
        self.is_zip = dest.lower().endswith(".zip")
        if self.is_zip:
            check_writable(os.path.dirname(os.path.abspath(dest)), "--dest")
            self._tmp = dest + ".incomplete"
            self._zip = zipfile.ZipFile(self._tmp, "w", compression=zipfile.ZIP_STORED)
        else:
            if os.path.isdir(dest) and os.listdir(dest):
                raise DatasetError(f"--dest {dest} exists and is not empty; remove it or choose another folder")
            self._created = not os.path.isdir(dest)
            check_writable(dest, "--dest")
            self._made = set()

    def write(self, name, data):
        if self.is_zip:
            self._zip.writestr(name, data)
            return
        folder = os.path.join(self.dest, os.path.dirname(name))
        if folder not in self._made:
            os.makedirs(folder, exist_ok=True)
            self._made.add(folder)
        with open(os.path.join(self.dest, name), "wb") as f:
            f.write(data)

    def close(self):
        if self.is_zip:
            self._zip.close()
            os.replace(self._tmp, self.dest)

    def discard(self):
        """Remove what was written (nothing may look like a finished dataset)."""
        if self.is_zip:
            self._zip.close()
            os.remove(self._tmp)
            return
        for folder in sorted(self._made, reverse=True):
            for name in os.listdir(folder):
                os.remove(os.path.join(folder, name))
            os.rmdir(folder)
        if self._created:
            os.rmdir(self.dest)


def convert_dataset(source, dest, resolution=(256, 256), transform="center-crop-dhariwal",
                    max_images=None, workers=None, progress=True) -> ConvertSummary:
    """Convert `source` (folder or .zip) into `dest` (folder or .zip); see the module docstring.

    resolution: (width, height). max_images: use only the first N source images in sorted
    order (skipped ones count). workers: processes decoding in parallel (output order and
    bytes do not depend on it); 0 or 1 decodes in this process.
    """
    if not dest:
        raise DatasetError("--dest must not be empty")
    make_transform(transform, *resolution)  # flag errors before any work
    try:
        store = FileStore(source)
    except (FileNotFoundError, ValueError) as e:
        raise DatasetError(f"--source: {e} (expected a folder with one subfolder per class, or a .zip of one)"
                           ) from None
    names, labels, class_names = list_source(store)
    if max_images is not None:
        names = names[:max_images]
    workers = min(8, os.cpu_count() or 1) if workers is None else workers

    out = _Dest(dest)
    entries, skipped = [], []
    init_args = (store, transform, tuple(resolution))
    pool = None
    if workers > 1:
        pool = multiprocessing.Pool(workers, initializer=_init_worker, initargs=init_args)
        results = pool.imap(_convert_one, names, chunksize=16)  # imap keeps source order
    else:
        _init_worker(*init_args)
        results = map(_convert_one, names)
    try:
        for name, (png, reason) in tqdm(zip(names, results), total=len(names), unit="img",
                                        desc="convert", disable=not progress):
            if png is None:
                skipped.append((name, reason))
                continue
            out_name = image_name(len(entries))
            out.write(out_name, png)
            entries.append([out_name, labels[name]])
        if entries:
            out.write(LABELS_FILE, json.dumps({"labels": entries, "class_names": class_names}).encode())
            out.close()
        else:
            out.discard()
    except BaseException:
        if out.is_zip and os.path.exists(out._tmp):
            os.remove(out._tmp)
        raise
    finally:
        if pool is not None:
            pool.terminate()

    log = skipped_log_path(dest)
    with open(log, "w") as f:
        f.write(f"# {len(skipped)} of {len(names)} source images skipped by convert (unreadable)\n")
        for name, reason in skipped:
            f.write(f"{store.full_path(name)}\t{reason}\n")
    if not entries:
        raise DatasetError(f"none of the {len(names)} images under --source {source} could be read (e.g. "
                           f"{store.full_path(skipped[0][0])}: {skipped[0][1]}); nothing written to {dest}, "
                           f"every reason is in {log}")
    return ConvertSummary(dest=dest, written=len(entries), num_classes=len(class_names),
                          skipped=skipped, skipped_log=log)
