"""Inception-v3 (2015-12-05 graph) features for the ADM suite, without TensorFlow.

The network is torch-fidelity's TF-compatible port, `FeatureExtractorInceptionV3`
('inception-v3-compat'): it takes uint8 NCHW images of any size, resizes them to 299x299
with TF1's bilinear kernel and normalises them inside forward, as ADM's graph does. One
forward gives the three arrays ADM reads (docs/method.md, "Evaluation"):

- "pool":    pool_3:0, (N, 2048), for FID, precision and recall;
- "logits":  pool_3 @ softmax weights without the bias, (N, 1008), whose softmax gives IS
             (torch-fidelity's 'logits_unbiased'; ADM's `softmax/logits/MatMul`);
- "spatial": mixed_6/conv:0[..., :7] flattened in (height, width, channel) order,
             (N, 17 * 17 * 7 = 2023), for sFID.

`mixed_6/conv:0` is the output of the op named `mixed_6/conv`, the ReLU closing the
scope whose Conv2D / batchnorm weights torch-fidelity's converter maps to
`Mixed_6d.branch1x1` (TF's mixed, mixed_1, ... mixed_10 are torch's Mixed_5b, 5c, 5d,
6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c), so it is that BasicConv2d's output: (N, 192, 17, 17)
after conv, batch norm and ReLU. torch-fidelity does not expose it, so a forward hook on
`Mixed_6d.branch1x1` keeps its first 7 channels during the same pass; the hook leaves the
port's own forward (resize, normalisation, every layer) untouched.
"""

import os
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from tqdm.auto import tqdm

from . import EvaluatorError

WEIGHTS_URL = URL_INCEPTION_V3
WEIGHTS_FILE = os.path.basename(URL_INCEPTION_V3)  # weights-inception-2015-12-05-6726825d.pth
TF_GRAPH_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/classify_image_graph_def.pb"
TF_GRAPH_FILE = "classify_image_graph_def.pb"

POOL_DIM = 2048
LOGITS_DIM = 1008
SPATIAL_CHANNELS = 7
SPATIAL_SIDE = 17
SPATIAL_DIM = SPATIAL_SIDE * SPATIAL_SIDE * SPATIAL_CHANNELS  # 2023
FEATURE_DIMS = {"pool": POOL_DIM, "logits": LOGITS_DIM, "spatial": SPATIAL_DIM}


class InceptionWeightsUnavailable(EvaluatorError):
    """The Inception-v3 weights file is missing, unreadable or could not be downloaded.

    ``problem`` is what went wrong alone (e.g. "Inception weights not found at PATH"); the
    message adds which file the real run needs, where it comes from, where it is looked for,
    which flag takes a local copy and that --smoke-test runs without it, all on one line."""

    def __init__(self, problem):
        self.problem = problem
        super().__init__(_weights_message(problem))


# ----------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------

def default_weights_path():
    """Where torch.hub (and torch-fidelity) keep the downloaded weights."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)


def _weights_message(problem):
    return (
        f"{problem}; the real run needs {WEIGHTS_FILE} (torch-fidelity's port of the 2015-12-05 Inception-v3) "
        f"from {WEIGHTS_URL}: download it where there is internet access and pass it with --inception-weights "
        f"PATH, or put it at {default_weights_path()} (the torch.hub cache, read when --inception-weights is not "
        f"given); evaluator/evaluator.py --smoke-test checks the pipeline without it (random weights: the numbers "
        f"are not FID)"
    )


def resolve_weights(path=None, download=True, timeout_s=60):
    """Path of the Inception weights: `path` if given, else torch.hub's cache, else a download there."""
    if path:
        if not os.path.isfile(path):
            raise InceptionWeightsUnavailable(f"--inception-weights {path}: no such file")
        return path
    cached = default_weights_path()
    if os.path.isfile(cached):
        return cached
    if not download:
        raise InceptionWeightsUnavailable(f"Inception weights not found at {cached}")
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        torch.hub.download_url_to_file(WEIGHTS_URL, cached, progress=True)  # writes a temp file, then moves it
    except Exception as exc:  # offline, proxy, HTTP error: all end in the same advice
        raise InceptionWeightsUnavailable(
            f"Inception weights not found at {cached} and the download failed ({type(exc).__name__}: "
            f"{_one_line(str(exc))})"
        ) from None
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return cached


def _one_line(text, limit=300):
    return " ".join(text.split())[:limit]


class _UnloadedInception(FeatureExtractorInceptionV3):
    """torch-fidelity's architecture with its weights left as initialised (the loader is skipped)."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


def save_random_inception_weights(path, seed=0):
    """Write a randomly initialised state dict of the port to `path`, seeded, nothing downloaded.

    What `evaluator.py --smoke-test` runs the pipeline on (and the tests and benchmarks): the
    same seed gives the same file, so the same features and numbers. Convolutions get He-normal
    weights and batch norms the identity, so activations keep a sensible scale through the 94
    conv layers; the numbers mean nothing, the shapes and the code path are the real ones.
    """
    torch.save({}, path)  # the constructor insists on reading a file
    net = _UnloadedInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)
    gen = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=gen)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            module.running_mean.zero_()
            module.running_var.fill_(1.0)
    nn.init.normal_(net.fc.weight, std=POOL_DIM ** -0.5, generator=gen)
    nn.init.normal_(net.fc.bias, std=0.1, generator=gen)
    torch.save(net.state_dict(), path)
    return path


# ----------------------------------------------------------------------------
# Feature extractor
# ----------------------------------------------------------------------------

class InceptionV3Features(nn.Module):
    """pool_3, bias-free logits and ADM's spatial features from one pass of torch-fidelity's port."""

    def __init__(self, weights_path, device="cpu"):
        super().__init__()
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights_path
            )
        except Exception as exc:  # unpickling / key-mismatch errors from deep inside torch
            raise InceptionWeightsUnavailable(
                f"could not load Inception weights from {weights_path} ({type(exc).__name__}: {_one_line(str(exc))})"
            ) from None
        self.weights_path = weights_path
        self.device = torch.device(device)
        self.to(self.device)
        self._spatial = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output[:, :SPATIAL_CHANNELS]

    @torch.no_grad()
    def forward(self, images):
        """images: uint8 (N, 3, H, W) tensor -> (pool (N, 2048), logits (N, 1008), spatial (N, 2023)), float32."""
        pool, logits = self.net(images)
        spatial = self._spatial.permute(0, 2, 3, 1).reshape(images.shape[0], -1).float()
        self._spatial = None
        return pool, logits, spatial

    def features(self, batch):
        """uint8 (N, H, W, 3) numpy batch -> dict of float32 numpy arrays "pool", "logits", "spatial"."""
        x = torch.from_numpy(np.ascontiguousarray(batch))
        if self.device.type == "cuda":
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        pool, logits, spatial = self(x)
        return {"pool": pool.cpu().numpy(), "logits": logits.cpu().numpy(), "spatial": spatial.cpu().numpy()}


class TFInceptionFeatures:
    """ADM's own graph through TensorFlow (`--backend tf`): same outputs as InceptionV3Features.features."""

    def __init__(self, graph_path):
        try:
            import tensorflow.compat.v1 as tf
        except ImportError:
            raise EvaluatorError(
                "--backend tf needs TensorFlow, which is not installed (pip install tensorflow). "
                "The default --backend torch computes the same features without it."
            ) from None
        if not graph_path or not os.path.isfile(graph_path):
            raise EvaluatorError(
                f"--backend tf needs ADM's graph file {TF_GRAPH_FILE} (looked for {graph_path!r}). "
                f"Download it from {TF_GRAPH_URL} and pass it with --tf-graph PATH."
            )
        graph = tf.Graph()
        with graph.as_default():
            self.images = tf.placeholder(tf.float32, shape=[None, None, None, 3])
            graph_def = tf.GraphDef()
            with open(graph_path, "rb") as f:
                graph_def.ParseFromString(f.read())
            pool, spatial, matmul = tf.import_graph_def(
                graph_def, input_map={"ExpandDims:0": self.images},
                return_elements=["pool_3:0", "mixed_6/conv:0", "softmax/logits/MatMul"], name="adm",
            )
            for op in graph.get_operations():  # the graph fixes batch size 1 in its static shapes
                for out in op.outputs:
                    dims = out.get_shape().as_list() if out.get_shape().dims is not None else None
                    if dims and dims[0] == 1:
                        out.__dict__["_shape_val"] = tf.TensorShape([None] + dims[1:])
            self.pool, self.spatial = pool, spatial[..., :SPATIAL_CHANNELS]
            config = tf.ConfigProto(allow_soft_placement=True)
            config.gpu_options.allow_growth = True
            self.sess = tf.Session(graph=graph, config=config)
            self.softmax_weights = self.sess.run(matmul.inputs[1])  # (2048, 1008), no bias: ADM's IS

    def features(self, batch):
        pool, spatial = self.sess.run([self.pool, self.spatial], {self.images: batch.astype(np.float32)})
        pool = pool.reshape(len(batch), -1)
        return {"pool": pool, "logits": pool @ self.softmax_weights, "spatial": spatial.reshape(len(batch), -1)}


def extract_features(model, images, batch_size=128, start=0, stop=None, keys=("pool", "logits", "spatial"),
                     progress=True, desc="features"):
    """Features of images[start:stop] in batches; the next batch is read while this one runs.

    images: anything with len() and slicing to uint8 (n, H, W, 3) arrays (a numpy array, an
    NpzImages reader). model: an object with .features(batch) -> dict (see above).
    """
    stop = len(images) if stop is None else stop
    out = {key: np.empty((stop - start, FEATURE_DIMS[key]), dtype=np.float32) for key in keys}
    starts = list(range(start, stop, batch_size))
    with ThreadPoolExecutor(max_workers=1) as reader, tqdm(total=stop - start, desc=desc, disable=not progress,
                                                          mininterval=5.0) as bar:
        pending = reader.submit(lambda s: np.asarray(images[s:min(s + batch_size, stop)]), starts[0]) if starts else None
        for i, s in enumerate(starts):
            batch = pending.result()
            if i + 1 < len(starts):
                pending = reader.submit(lambda s: np.asarray(images[s:min(s + batch_size, stop)]), starts[i + 1])
            feats = model.features(batch)
            for key in keys:
                out[key][s - start:s - start + len(batch)] = feats[key]
            bar.update(len(batch))
    return out
