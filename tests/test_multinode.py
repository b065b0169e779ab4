"""Multi-node launch on CPU: two launcher processes on localhost play two nodes of one process each
(torchrun --nnodes 2, accelerate launch --num_machines 2) and must give what one node with two
processes gives: the same weights after 3 training steps and the same generate.py npz."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from sampling.identity import identity_key
from models.checkpoint import load_checkpoint_file
from test_train import make_pixel_data, tiny_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
TIMEOUT_S = 240


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(commands, timeout=TIMEOUT_S, env=None):
    """Start every command in its own process group, wait for all (bounded), kill the groups of
    those still running at the deadline; returns [(returncode, output)]."""
    procs = [subprocess.Popen(c, cwd=ROOT, env={**ENV, **(env or {})}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for c in commands]
    deadline, results = time.monotonic() + timeout, []
    try:
        for proc in procs:
            try:
                output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers, nothing else
                output, _ = proc.communicate()
                output += f"\n[killed after {timeout} s]"
            results.append((proc.returncode, output))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return results


TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def one_node_two_processes(script, args):
    return [[*TORCHRUN, "--standalone", "--nproc_per_node", "2", script, *args]]


def two_nodes_static(script, args):
    """torchrun's static rendezvous: --master_addr/--master_port, each node names its --node_rank."""
    port = str(free_port())
    return [[*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank), "--master_addr",
             "127.0.0.1", "--master_port", port, script, *args] for rank in (0, 1)]


def two_nodes_c10d(script, args):
    """torchrun's c10d rendezvous (what SLURM examples use): one --rdzv-endpoint, a shared --rdzv-id."""
    port = str(free_port())
    return [[*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank), "--rdzv-backend", "c10d",
             "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "lsep-test", script, *args] for rank in (0, 1)]


def two_machines_accelerate(script, args):
    """accelerate's --multi_gpu launcher (torchrun underneath; gloo on CPU). Its --cpu launcher starts
    one plain process per machine unless mpirun provides the ranks: two independent runs."""
    port = str(free_port())
    return [[sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
             "--num_processes", "2",
             "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
             "--mixed_precision", "no", "--dynamo_backend", "no", script, *args] for rank in (0, 1)]


LAUNCHERS = {"1x2": one_node_two_processes, "2x1-static": two_nodes_static, "2x1-c10d": two_nodes_c10d,
             "2x1-accelerate": two_machines_accelerate}


def run_launcher(kind, script, args):
    results = launch(LAUNCHERS[kind](os.path.join(ROOT, script), [str(a) for a in args]))
    for code, output in results:
        assert code == 0, f"{kind}: exit {code}\n{output[-3000:]}"
    return results


def train_args(data, root, name):
    """A tiny pixel-space SiT (8x8 images), 3 steps of global batch 8."""
    return tiny_argv(data, root, name, "--max-train-steps", 3, "--vae", "none", "--resolution", 8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """3 training steps on 1 node x 2 processes: the reference of every multi-node run."""
    root = tmp_path_factory.mktemp("multinode")
    data = make_pixel_data(str(root / "pixels"))
    run_launcher("1x2", "train.py", train_args(data, root, "ref"))
    return {"root": root, "data": data, "ckpt": str(root / "ref" / "checkpoints" / "0000003.pt")}


@pytest.mark.parametrize("kind", ["2x1-static", "2x1-c10d", "2x1-accelerate"])
def test_two_nodes_train_like_one_node_with_two_processes(trained, kind):
    root = trained["root"]
    run_launcher(kind, "train.py", train_args(trained["data"], root, kind))
    assert_same_weights(trained["ckpt"], str(root / kind / "checkpoints" / "0000003.pt"))


def assert_same_weights(ref_path, path):
    ref, mine = load_checkpoint_file(ref_path), load_checkpoint_file(path)
    assert mine["provenance"]["num_processes"] == 2 and mine["steps"] == 3
    for which in ("model", "ema"):
        assert ref[which].keys() == mine[which].keys()
        for key in ref[which]:  # the same gloo all-reduce of the same two shards: equal bits
            assert torch.equal(ref[which][key], mine[which][key]), f"{which}.{key}"


def generate_args(ckpt, sample_dir):
    return ["--ckpt", ckpt, "--sample-dir", sample_dir, "--num-fid-samples", 6, "--num-steps", 4,
            "--per-proc-batch-size", 2, "--device", "cpu", "--cfg-scale", 1.5, "--precision", "fp32", "--vae", "none"]


FAKE_SRUN = """#!/bin/bash
# stand-in for srun: the command once per "node" (SLURM_NODEID 0 .. SLURM_NNODES-1), all on this machine
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""


def test_slurm_script_trains_like_one_node_with_two_processes(trained, tmp_path):
    """scripts/slurm_train.sh with stand-ins for srun and scontrol: 2 'nodes' x 1 process."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    for name in ("srun", "scontrol"):
        os.chmod(bin_dir / name, 0o755)
    env = {"PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "n[0-1]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": ROOT, "GPUS_PER_NODE": "1",
           "MASTER_PORT": str(free_port())}
    root = trained["root"]
    ((code, output),) = launch([["bash", os.path.join(ROOT, "scripts", "slurm_train.sh"),
                                 *map(str, train_args(trained["data"], root, "slurm"))]], env=env)
    assert code == 0, output[-3000:]
    assert_same_weights(trained["ckpt"], str(root / "slurm" / "checkpoints" / "0000003.pt"))


def test_two_nodes_sample_like_one_node_with_two_processes(trained):
    """generate.py's npz is the same for 1 node x 2 processes and 2 nodes x 1 process."""
    arrays, ckpt = {}, trained["ckpt"]
    for kind in ("1x2", "2x1-c10d"):
        out = str(trained["root"] / f"samples-{kind}")
        run_launcher(kind, "generate.py", generate_args(ckpt, out))
        (name,) = [n for n in os.listdir(out) if n.endswith(".npz")]
        with np.load(os.path.join(out, name)) as f:
            arrays[kind] = (f["arr_0"], f["provenance"])
    ref_images, ref_identity = arrays["1x2"]
    assert ref_images.shape == (6, 8, 8, 3) and ref_images.std() > 0
    for kind in ("2x1-c10d",):
        np.testing.assert_array_equal(arrays[kind][0], ref_images)
        # the same sample-set identity (identity_key leaves out the code version: others may commit
        # between the two runs)
        assert identity_key(identity(arrays[kind][1])) == identity_key(identity(ref_identity))


def identity(raw):
    return json.loads(raw.tobytes().decode())
