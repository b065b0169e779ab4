#!/usr/bin/env python
"""ADM's evaluation suite without TensorFlow: Inception Score, FID, sFID, precision, recall.

    python evaluator/evaluator.py VIRTUAL_imagenet256_labeled.npz samples.npz
    torchrun --nproc_per_node=8 evaluator/evaluator.py REF.npz SAMPLE.npz   # data parallel

Prints the five numbers as openai/guided-diffusion's `evaluations/evaluator.py` does and
writes them to --output (default SAMPLE.metrics.json next to the sample file) and the same
name with .txt; the output folder is checked to be writable before any work. Both npz
files hold `arr_0`: uint8 images (N, H, W, 3); the reference's precomputed `mu`, `sigma`,
`mu_s`, `sigma_s` are used when present, and the sample's `provenance` (UTF-8 JSON in a uint8
array, written by generate.py) is copied into the metrics JSON. Reference activations are
cached next to the reference (REF.inception-cache.npz). The suite is described in docs/evaluation.md.

    python evaluator/evaluator.py REF.npz SAMPLE.npz --smoke-test   # offline check, NOT FID

--smoke-test runs the same pipeline on seeded random Inception weights (nothing downloaded, no
reference cache, precomputed statistics ignored): the numbers only show that the files, the
network and the metric code work. The table's first line, the metrics JSON ("smoke_test": true
and a note) and the default output name (SAMPLE.smoke-test.metrics.json) all say so, and a smoke
test never writes over a real result.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import zipfile

if __package__ in (None, ""):  # run as a file (from the repo root or from evaluator/): import the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.distributed as dist

from errors import UserError, is_reporting_process
from evaluator import EvaluatorError
from evaluator import inception as inc
from evaluator import metrics
from fileio import OutputError, atomic_write, check_writable

CACHE_VERSION = 1
MIN_IMAGES = metrics.PR_NEIGHBOURHOOD + 1  # k-NN radii need k other points; covariances need 2
STATS_KEYS = {"mu": (inc.POOL_DIM,), "sigma": (inc.POOL_DIM, inc.POOL_DIM),
              "mu_s": (inc.SPATIAL_DIM,), "sigma_s": (inc.SPATIAL_DIM, inc.SPATIAL_DIM)}
SMOKE_HEADER = "SMOKE TEST"  # first line of a smoke test's table and .txt file
SMOKE_NOTE = ("smoke test: random Inception weights (seed {seed}), not the 2015-12-05 Inception-v3; these numbers "
              "are not FID, sFID, Inception Score, precision or recall and mean nothing beyond the pipeline running; "
              "the real run needs " + inc.WEIGHTS_FILE)
FIX_NPZ = "save images as np.savez(path, images) with images a uint8 array of shape (N, H, W, 3) in [0, 255]"


class NpzFormatError(EvaluatorError):
    """An input npz is missing, is not an npz, or its arr_0 is not uint8 (N, H, W, 3) images."""


# ----------------------------------------------------------------------------
# Reading arr_0 of an npz in chunks
# ----------------------------------------------------------------------------

class NpzImages:
    """Row-sliceable view of an npz's `arr_0` (uint8 NHWC) that never loads the whole array.

    np.savez stores members uncompressed: those are memory-mapped at their offset inside the
    zip (random access, any rank can read its shard). Compressed members (np.savez_compressed)
    are decompressed as a forward stream instead: same numbers, slower, sequential.
    """

    def __init__(self, path, key="arr_0"):
        self.path = path
        if not os.path.isfile(path):
            raise NpzFormatError(f"{path}: no such file ({FIX_NPZ}).")
        try:
            self._zip = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise NpzFormatError(f"{path}: not an .npz file (not a zip archive); {FIX_NPZ}.") from None
        names = self._zip.namelist()
        member = f"{key}.npy"
        if member not in names:
            self._zip.close()
            keys = sorted(n[:-4] for n in names if n.endswith(".npy"))
            raise NpzFormatError(f"{path}: no '{key}' array (it has {keys}); {FIX_NPZ}.")
        self._info = self._zip.getinfo(member)
        self.compressed = self._info.compress_type != zipfile.ZIP_STORED
        with self._zip.open(member) as f:
            shape, fortran, dtype = self._read_header(f)
            header_len = f.tell()
        if dtype != np.uint8:
            raise NpzFormatError(f"{path}: {key} has dtype {dtype}, expected uint8 in [0, 255]; "
                                 f"convert with np.clip(np.round(x), 0, 255).astype(np.uint8) (x in [0, 255]).")
        if len(shape) != 4 or shape[3] != 3:
            hint = " (channels first? use x.transpose(0, 2, 3, 1))" if len(shape) == 4 and shape[1] == 3 else ""
            raise NpzFormatError(f"{path}: {key} has shape {shape}, expected (N, H, W, 3){hint}; {FIX_NPZ}.")
        if shape[0] == 0:
            raise NpzFormatError(f"{path}: {key} holds no images; {FIX_NPZ}.")
        self.shape = tuple(int(s) for s in shape)
        self._row_bytes = int(np.prod(self.shape[1:]))
        self._array = None
        self._stream = None
        self._pos = 0
        if fortran:  # rare (np.asfortranarray); no row-contiguous layout to stream
            self._array = np.load(path)[key]
        elif not self.compressed:
            offset = self._data_offset() + header_len
            if os.path.getsize(path) < offset + len(self) * self._row_bytes:
                raise NpzFormatError(f"{path}: arr_0 is shorter than its header says (truncated file?); {FIX_NPZ}.")
            self._array = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=self.shape)

    def _read_header(self, f):
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                return np.lib.format.read_array_header_1_0(f)
            if version == (2, 0):
                return np.lib.format.read_array_header_2_0(f)
        except ValueError as exc:
            raise NpzFormatError(f"{self.path}: unreadable arr_0 header ({exc}); {FIX_NPZ}.") from None
        raise NpzFormatError(f"{self.path}: unsupported .npy format version {version}; {FIX_NPZ}.")

    def _data_offset(self):
        """Byte offset of the member's data: the zip local header is 30 bytes + name + extra field."""
        with open(self.path, "rb") as f:
            f.seek(self._info.header_offset)
            local = f.read(30)
        name_len = int.from_bytes(local[26:28], "little")
        extra_len = int.from_bytes(local[28:30], "little")
        return self._info.header_offset + 30 + name_len + extra_len

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("NpzImages supports row slices images[a:b] only")
        start, stop, _ = index.indices(len(self))
        if self._array is not None:
            return np.array(self._array[start:stop])  # the copy is the disk read; torch wants writable memory
        return self._read_stream(start, max(stop - start, 0))

    def _read_stream(self, start, count):
        if self._stream is None or start < self._pos:
            if self._stream is not None:
                self._stream.close()
            self._stream = self._zip.open(self._info)
            self._read_header(self._stream)
            self._pos = 0
        while self._pos < start:  # skip forward by decompressing
            skip = min(start - self._pos, max(1, (64 << 20) // self._row_bytes))
            self._read_exact(skip * self._row_bytes)
            self._pos += skip
        data = self._read_exact(count * self._row_bytes)
        self._pos += count
        return np.frombuffer(data, dtype=np.uint8).reshape((count,) + self.shape[1:])

    def _read_exact(self, size):
        buf = bytearray()
        while len(buf) < size:
            chunk = self._stream.read(size - len(buf))
            if not chunk:
                raise NpzFormatError(f"{self.path}: arr_0 ends early (truncated file?); {FIX_NPZ}.")
            buf += chunk
        return buf

    def close(self):
        if self._stream is not None:
            self._stream.close()
        self._array = None
        self._zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_provenance(path, log=print):
    """The dict that generate.py stored in the sample npz as `provenance` (UTF-8 JSON bytes), or None."""
    with np.load(path) as npz:
        if "provenance" not in npz.files:
            return None
        try:
            raw = npz["provenance"]
            if raw.dtype != np.uint8:
                raise ValueError(f"dtype {raw.dtype}, expected uint8")
            return json.loads(raw.tobytes().decode("utf-8"))
        except Exception as exc:  # metadata only: the metrics stay valid without it
            log(f"warning: {path}: 'provenance' is not UTF-8 JSON in a uint8 array ({type(exc).__name__}: {exc}); "
                "metrics written without it")
            return None


def load_precomputed_stats(path):
    """ADM's precomputed mu / sigma / mu_s / sigma_s of an npz, or None if it has none."""
    with np.load(path) as npz:
        if "mu" not in npz.files:
            return None
        missing = [k for k in STATS_KEYS if k not in npz.files]
        if missing:
            raise NpzFormatError(f"{path}: has 'mu' but not {missing}; ADM reference batches carry "
                                 f"mu, sigma, mu_s and sigma_s together (remove 'mu' to compute them).")
        stats = {k: npz[k].astype(np.float64) for k in STATS_KEYS}
    for key, shape in STATS_KEYS.items():
        if stats[key].shape != shape:
            raise NpzFormatError(f"{path}: {key} has shape {stats[key].shape}, expected {shape} "
                                 f"(statistics of the 2015-12-05 Inception-v3 features).")
    return stats


# ----------------------------------------------------------------------------
# Reference activation cache
# ----------------------------------------------------------------------------

def cache_path(ref_path):
    root = ref_path[:-4] if ref_path.endswith(".npz") else ref_path
    return root + ".inception-cache.npz"


def cache_key(ref_path, weights_id):
    """Hash of what the activations depend on: the weights, the reference file's size and mtime."""
    st = os.stat(ref_path)
    blob = json.dumps([CACHE_VERSION, weights_id, st.st_size, st.st_mtime_ns])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def weights_id(backend, weights_path):
    if backend == "tf":
        return ["tf", os.path.basename(weights_path)]
    return ["torch", os.path.basename(weights_path), os.path.getsize(weights_path)]


def load_cache(path, key):
    """(pool, spatial) from the cache if it exists and matches key, else None."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as npz:
            if str(npz["key"]) != key:
                return None
            return npz["pool"], npz["spatial"]
    except Exception:  # a damaged cache is recomputed, not fatal
        return None


def save_cache(path, key, pool, spatial):
    atomic_write(path, lambda f: np.savez(f, key=np.array(key), pool=pool, spatial=spatial),
                 expected_bytes=pool.nbytes + spatial.nbytes)


# ----------------------------------------------------------------------------
# Distributed helpers (torchrun): each rank takes a contiguous shard
# ----------------------------------------------------------------------------

def shard_bounds(n, rank, world):
    return n * rank // world, n * (rank + 1) // world


def gather_rows(local, n, world, device):
    """Concatenate every rank's (rows, D) shard, in rank order, on every rank."""
    if world == 1:
        return local
    sizes = [shard_bounds(n, r, world)[1] - shard_bounds(n, r, world)[0] for r in range(world)]
    padded = torch.zeros((max(sizes), local.shape[1]), dtype=torch.float32, device=device)
    padded[:len(local)] = torch.from_numpy(local).to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return np.concatenate([p[:s].cpu().numpy() for p, s in zip(parts, sizes)])


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------

def _activations(images, model, keys, batch_size, rank, world, comm_device, progress, desc):
    lo, hi = shard_bounds(len(images), rank, world)
    local = inc.extract_features(model, images, batch_size, lo, hi, keys, progress and rank == 0, desc)
    return {k: gather_rows(local[k], len(images), world, comm_device) for k in keys}


def evaluate(ref_path, sample_path, inception_weights=None, batch_size=128, device="auto", backend="torch",
             tf_graph=None, use_cache=True, progress=True, log=print, smoke_test=False, smoke_seed=0):
    """All five metrics of sample_path against ref_path; a dict on rank 0, None on other ranks.

    smoke_test: random Inception weights made from smoke_seed (save_random_inception_weights, in a
    temporary folder removed once loaded) instead of the real ones; the reference cache is neither
    read nor written and precomputed statistics are not used (they belong to the real network).
    The dict then starts with "smoke_test": True and a "note" saying the numbers are not FID."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    comm_device = device if device.startswith("cuda") else "cpu"
    say = log if rank == 0 else (lambda *a, **k: None)

    ref_images, sample_images = NpzImages(ref_path), NpzImages(sample_path)
    for imgs in (ref_images, sample_images):
        if len(imgs) < MIN_IMAGES:
            raise NpzFormatError(f"{imgs.path}: {len(imgs)} images; precision/recall with k="
                                 f"{metrics.PR_NEIGHBOURHOOD} needs at least {MIN_IMAGES}.")
        if imgs.compressed and rank == 0:
            say(f"note: {imgs.path} is compressed (np.savez_compressed); streaming it sequentially, "
                f"which is slower than an np.savez file")
    ref_stats, sample_stats = load_precomputed_stats(ref_path), load_precomputed_stats(sample_path)
    provenance = read_provenance(sample_path, say)

    if smoke_test:
        if ref_stats is not None or sample_stats is not None:
            say("smoke test: the npz's precomputed mu/sigma/mu_s/sigma_s belong to the real Inception-v3; "
                "computing them from the random network instead")
        ref_stats = sample_stats = None
        use_cache = False
        folder = tempfile.mkdtemp(prefix="smoke-inception-")
        try:
            path = inc.save_random_inception_weights(os.path.join(folder, f"random-seed{smoke_seed}.pth"), smoke_seed)
            model = inc.InceptionV3Features(path, device=device)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        weights = f"random (smoke test, seed {smoke_seed})"
    elif backend == "tf":
        graph = tf_graph or os.path.join(os.path.dirname(os.path.abspath(__file__)), inc.TF_GRAPH_FILE)
        model, weights = inc.TFInceptionFeatures(graph), graph
    else:
        weights = inc.resolve_weights(inception_weights)
        if device.startswith("cuda"):  # the TF graph ran in full fp32: no TF32 in convolutions or matmuls
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        model = inc.InceptionV3Features(weights, device=device)
    say(f"inception: {backend} backend, weights {weights}, device {device}, world size {world}")

    # Reference activations: from the cache when it matches, else computed (and cached by rank 0).
    cache = cache_path(ref_path)
    key = cache_key(ref_path, weights_id(backend, weights)) if use_cache else None
    ref = load_cache(cache, key) if rank == 0 and use_cache else None
    hit = [ref is not None]
    if world > 1:
        dist.broadcast_object_list(hit, src=0)
    if hit[0]:
        say(f"loaded reference activations from cache {cache}")
    else:
        say("computing reference batch activations...")
        ref = _activations(ref_images, model, ("pool", "spatial"), batch_size, rank, world, comm_device,
                           progress, "reference")
        ref = (ref["pool"], ref["spatial"])
        if rank == 0 and use_cache:
            try:
                save_cache(cache, key, *ref)
                say(f"wrote reference activation cache {cache}")
            except (OSError, OutputError) as exc:
                say(f"warning: could not write the reference cache {cache} ({exc}); continuing without it")

    say("computing sample batch activations...")
    smp = _activations(sample_images, model, ("pool", "logits", "spatial"), batch_size, rank, world, comm_device,
                       progress, "samples")
    ref_images.close()
    sample_images.close()
    if world > 1:
        dist.barrier()
    if rank != 0:
        return None

    if ref_stats is not None:
        say(f"using precomputed mu/sigma/mu_s/sigma_s of {ref_path}")
    say("computing evaluations...")
    results = metrics.compute_all(
        ref[0], ref[1], smp["pool"], smp["spatial"], metrics.softmax(smp["logits"]),
        ref_stats=ref_stats, sample_stats=sample_stats, device=comm_device,
    )
    label = ({"smoke_test": True, "note": SMOKE_NOTE.format(seed=smoke_seed), "smoke_seed": smoke_seed}
             if smoke_test else {"smoke_test": False})
    results = dict(label, **results)  # the label first: the first thing a reader of the JSON sees
    results.update(ref_batch=os.path.abspath(ref_path), sample_batch=os.path.abspath(sample_path),
                   num_ref=len(ref[0]), num_samples=len(smp["pool"]), backend=backend,
                   inception_weights=weights if smoke_test else os.path.abspath(weights),
                   ref_statistics="precomputed" if ref_stats is not None else "computed",
                   reference={"path": os.path.abspath(ref_path), "bytes": os.path.getsize(ref_path)})
    if provenance is not None:
        results["samples_provenance"] = provenance
    return results


LABELS = [("inception_score", "Inception Score"), ("fid", "FID"), ("sfid", "sFID"),
          ("precision", "Precision"), ("recall", "Recall")]


def smoke_header(seed):
    return (f"{SMOKE_HEADER} (random Inception weights, seed {seed}): NOT FID - these numbers only show "
            f"that the pipeline runs; the real run needs {inc.WEIGHTS_FILE}")


def format_results(results):
    """The five numbers, one a line; a smoke test's table opens with smoke_header."""
    lines = [f"{label}: {results[key]}" for key, label in LABELS]
    if results.get("smoke_test"):
        lines.insert(0, smoke_header(results["smoke_seed"]))
    return "\n".join(lines)


def default_output(sample_path, smoke_test=False):
    """SAMPLE.metrics.json next to the sample npz; SAMPLE.smoke-test.metrics.json for a smoke test."""
    root = sample_path[:-4] if sample_path.endswith(".npz") else sample_path
    return root + (".smoke-test.metrics.json" if smoke_test else ".metrics.json")


def text_output(json_path):
    """The .txt twin of the metrics JSON: X.metrics.json -> X.metrics.txt."""
    return (json_path[:-5] if json_path.endswith(".json") else json_path) + ".txt"


def check_output(json_path):
    """Prove the metrics can be written before computing them (a read-only sample folder fails here)."""
    check_writable(os.path.dirname(os.path.abspath(json_path)), "--output PATH.json")


def is_smoke_result(path):
    """True if path is a smoke test's metrics JSON ("smoke_test": true) or .txt (opens with SMOKE_HEADER)."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".json"):
                data = json.load(f)
                return isinstance(data, dict) and data.get("smoke_test") is True
            return f.readline().startswith(SMOKE_HEADER)
    except (OSError, ValueError):  # unreadable, not JSON, not UTF-8: not a smoke result
        return False


class SmokeOverwriteError(EvaluatorError):
    """A --smoke-test run was pointed at an existing file that is not a smoke-test result."""


def check_smoke_target(json_path, smoke_test, log=print):
    """Before any work: a smoke test never writes over a file that is not a smoke result (a real
    evaluation, anything else); a real run replaces a smoke result, and says so."""
    for path in (json_path, text_output(json_path)):
        if not os.path.exists(path):
            continue
        smoke = is_smoke_result(path)
        if smoke_test and not smoke:
            raise SmokeOverwriteError(
                f"{path} exists and is not a smoke-test result (a real evaluation, or another file); "
                f"--smoke-test never writes over it: pass --output PATH.json with another path")
        if not smoke_test and smoke:
            log(f"note: replacing the smoke-test result {path} with this real evaluation")


def write_results(json_path, results):
    """The metrics as JSON at json_path and as text next to it (text_output), each written atomically."""
    txt_path = text_output(json_path)
    table = format_results(results).split("\n")
    head = table[:-len(LABELS)]  # a smoke test's header: the file's first line, as in the printed table
    text = "".join(line + "\n" for line in head + [f"ref_batch: {results['ref_batch']}",
                                                   f"sample_batch: {results['sample_batch']}"] + table[len(head):])
    atomic_write(json_path, lambda f: f.write((json.dumps(results, indent=2) + "\n").encode()))
    atomic_write(txt_path, lambda f: f.write(text.encode()))
    return json_path, txt_path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ref_batch", help="reference batch npz (arr_0 uint8 NHWC images, optional mu/sigma/mu_s/sigma_s)")
    parser.add_argument("sample_batch", help="sample batch npz (arr_0 uint8 NHWC images)")
    parser.add_argument("--inception-weights", default=None,
                        help=f"local {inc.WEIGHTS_FILE} (default: torch.hub cache, else download)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per Inception forward, per process")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    parser.add_argument("--backend", choices=["torch", "tf"], default="torch",
                        help="torch: torch-fidelity's port (default); tf: ADM's graph (needs tensorflow)")
    parser.add_argument("--tf-graph", default=None, help=f"{inc.TF_GRAPH_FILE} for --backend tf")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write REF.inception-cache.npz")
    parser.add_argument("--output", default=None, metavar="PATH.json",
                        help="metrics JSON (a .txt twin is written beside it); default SAMPLE.metrics.json "
                             "(SAMPLE.smoke-test.metrics.json with --smoke-test)")
    parser.add_argument("--smoke-test", action="store_true",
                        help="check the pipeline offline on seeded random Inception weights (nothing downloaded, "
                             "no reference cache); the numbers are NOT FID and are labelled so")
    parser.add_argument("--smoke-seed", type=int, default=None, metavar="N",
                        help="seed of --smoke-test's random weights (default 0): the same seed, the same numbers")
    args = parser.parse_args(argv)
    if args.smoke_test and args.inception_weights:
        parser.error("--smoke-test builds random Inception weights; drop --inception-weights "
                     "(or drop --smoke-test for a real run)")
    if args.smoke_test and args.backend == "tf":
        parser.error("--smoke-test runs the torch backend on random weights; drop --backend tf")
    if args.smoke_seed is not None and not args.smoke_test:
        parser.error("--smoke-seed only applies to --smoke-test; add --smoke-test or drop --smoke-seed")
    if args.smoke_seed is None:
        args.smoke_seed = 0
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.device not in ("auto", "cuda", "cpu"):
        parser.error(f"--device must be auto, cuda or cpu, got {args.device}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU; use --device cpu")
    return args


def main(argv=None):
    args = parse_args(argv)
    output = args.output or default_output(args.sample_batch, args.smoke_test)
    try:
        check_output(output)
        check_smoke_target(output, args.smoke_test, print if is_reporting_process() else (lambda *a, **k: None))
        results = evaluate(args.ref_batch, args.sample_batch, args.inception_weights, args.batch_size, args.device,
                           args.backend, args.tf_graph, use_cache=not args.no_cache, smoke_test=args.smoke_test,
                           smoke_seed=args.smoke_seed)
        if results is not None:
            print(format_results(results))
            json_path, txt_path = write_results(output, results)
            print(f"wrote {json_path} and {txt_path}")
    except UserError as exc:  # one line; exit status 2 (docs/faults.md)
        if is_reporting_process():
            print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
