"""Which device a tool runs on, and one line when a GPU is there but torch cannot use it.

A PyPI build of torch is made for one CUDA version (``torch.version.cuda``); a cluster whose
NVIDIA driver supports only an older CUDA makes ``torch.cuda.is_available()`` quietly False,
and the run would go on on the CPU (or fail deep inside torch). ``cuda_problem`` says so at
start-up with both versions and the fix (README, "Install and test").
"""
import ctypes
import os
import shutil
import warnings

import torch

from errors import UserError

INSTALL_FIX = ("install PyTorch's build for your CUDA first (README, \"Install and test\"), or set "
               "CUDA_VISIBLE_DEVICES= to run on the CPU")


class DeviceError(UserError, RuntimeError):
    """A GPU that torch cannot use, or a device flag that cannot be honoured."""


def gpu_present():
    """True when this machine shows an NVIDIA GPU (device node, driver, or nvidia-smi) and
    CUDA_VISIBLE_DEVICES does not hide every GPU."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return (os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/version")
            or shutil.which("nvidia-smi") is not None)


def driver_cuda_version():
    """The newest CUDA version the NVIDIA driver supports ('12.2'), or None when no driver answers."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int()
        if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def cuda_usable():
    """torch.cuda.is_available(), and the first warning torch gave while answering (or None)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        usable = torch.cuda.is_available()
    reason = next((str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()), None)
    return usable, reason


def cuda_problem():
    """None when torch can use CUDA, or when the machine has no GPU; else the one line to print."""
    usable, reason = cuda_usable()
    if usable or not gpu_present():
        return None
    built = torch.version.cuda
    driver = driver_cuda_version()
    build = f"built for CUDA {built}" if built else "a CPU-only build"
    have = f"the NVIDIA driver supports CUDA up to {driver}" if driver else "no NVIDIA driver library answers"
    why = f" ({reason})" if reason else ""
    return f"an NVIDIA GPU is present but torch {torch.__version__} cannot use it: it is {build} and {have}{why}; " \
           f"{INSTALL_FIX}"


def check_cuda(flag):
    """Raise DeviceError (one line, naming ``flag``, what asked for CUDA) when a GPU is present but unusable."""
    problem = cuda_problem()
    if problem:
        raise DeviceError(f"{flag}: {problem}")
