"""Dataset files on disk: one read-only view of a folder or a .zip, and the file naming scheme.

Shared by the preprocessing tools (which write the layout) and dataset.py (which reads it).
Layout (REPA / LSEP / EDM2): `00000/img00000000.png` images, `00000/img-mean-std-00000000.npy`
latents, and a `dataset.json` with `{"labels": [[relative_path, class_index], ...]}` at the root.
"""
import json
import os
import zipfile

from errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
LATENT_SUFFIXES = (".npy",)
LABELS_FILE = "dataset.json"


class DatasetError(UserError, ValueError):
    """A problem with dataset files that the user can fix; the message names the file and the fix."""


def image_name(index: int) -> str:
    """Relative path of the index-th converted image; 1000 images per subfolder, as EDM2/REPA."""
    s = f"{index:08d}"
    return f"{s[:5]}/img{s}.png"


def latent_name(index: int) -> str:
    """Relative path of the index-th encoded image's moments."""
    s = f"{index:08d}"
    return f"{s[:5]}/img-mean-std-{s}.npy"


class FileStore:
    """Read-only files of a folder or a zip archive, addressed by '/'-separated relative paths.

    The zip is opened lazily once per process, so a FileStore can be handed to DataLoader
    workers (it pickles without the open handle, and a forked worker reopens its own).
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            self.is_zip = False
        elif os.path.isfile(self.path) and zipfile.is_zipfile(self.path):
            self.is_zip = True
        elif os.path.exists(self.path):
            raise ValueError(f"{self.path} is neither a folder nor a .zip archive")
        else:
            raise FileNotFoundError(f"{self.path} does not exist")
        self._zip = None
        self._zip_pid = None
        self._sizes = None

    def __repr__(self):
        return f"FileStore({self.path!r})"

    def __getstate__(self):
        # Workers only read: drop the open handle and the (possibly 1.28M-entry) listing.
        return dict(self.__dict__, _zip=None, _zip_pid=None, _sizes=None)

    def _zipfile(self):
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path, "r")
            self._zip_pid = os.getpid()
        return self._zip

    @property
    def sizes(self) -> dict:
        """{relative path: size in bytes} of every regular file (listed once, then cached)."""
        if self._sizes is None:
            if self.is_zip:
                self._sizes = {i.filename: i.file_size for i in self._zipfile().infolist() if not i.is_dir()}
            else:
                self._sizes = {}
                self._scan(self.path, "")
        return self._sizes

    def _scan(self, folder, prefix):
        # os.scandir recursion: much faster than os.walk + os.stat on 1.28M files.
        with os.scandir(folder) as it:
            for entry in it:
                if entry.is_dir():
                    self._scan(entry.path, prefix + entry.name + "/")
                elif entry.is_file():
                    self._sizes[prefix + entry.name] = entry.stat().st_size

    def names(self, suffixes=None) -> list:
        """Sorted relative paths, optionally only those ending with one of `suffixes` (any case)."""
        names = self.sizes.keys()
        if suffixes is not None:
            names = [n for n in names if n.lower().endswith(tuple(suffixes))]
        return sorted(names)

    def __contains__(self, name):
        return name in self.sizes

    def full_path(self, name) -> str:
        """Human-readable location of `name`, for error messages."""
        return f"{self.path}:{name}" if self.is_zip else os.path.join(self.path, name)

    def read(self, name) -> bytes:
        if self.is_zip:
            return self._zipfile().read(name)
        with open(os.path.join(self.path, name), "rb") as f:
            return f.read()

    def read_prefix(self, name, n: int) -> bytes:
        """The first n bytes of a file (headers), without reading the rest."""
        if self.is_zip:
            with self._zipfile().open(name) as f:
                return f.read(n)
        with open(os.path.join(self.path, name), "rb") as f:
            return f.read(n)

    def read_json(self, name):
        return json.loads(self.read(name).decode("utf-8"))
