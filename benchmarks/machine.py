"""What the benchmarks ran on: hardware, software versions, lowrank revision, and measured ceilings.

``machine_info()`` is recorded at the top of every report so that numbers from different machines are
never compared blind. ``ceilings(device)`` measures the memory bandwidth and matmul throughput the device
actually reaches (not the datasheet), so that a kernel's achieved GB/s or TFLOP/s can be read as a fraction
of what is attainable (the roofline view: Williams, Waterman & Patterson, "Roofline: an insightful visual
performance model for multicore architectures", CACM 52(4), 2009).
"""

from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Distributions whose versions the report lists (those not installed are reported as ``None``).
PACKAGES = (
    "torch",
    "numpy",
    "scipy",
    "scikit-learn",
    "peft",
    "transformers",
    "safetensors",
    "matplotlib",
    "lowrank",
)


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    """Output of a short command, or ``None`` if it is missing, fails or takes over 10 s."""
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, ``sysctl`` on macOS, else ``platform``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        name = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
        if name:
            return name
    return platform.processor() or platform.machine() or "unknown"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _usable_cpus() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def package_versions() -> dict[str, str | None]:
    """Installed version of each distribution in ``PACKAGES`` (``None`` when not installed)."""
    versions: dict[str, str | None] = {}
    for dist in PACKAGES:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def blas_info() -> list[dict[str, Any]]:
    """BLAS/OpenMP libraries loaded in this process with their thread counts (needs ``threadpoolctl``)."""
    try:
        import threadpoolctl
    except ImportError:
        return []
    keep = ("user_api", "internal_api", "version", "num_threads", "threading_layer", "architecture")
    return [
        {k: lib.get(k) for k in keep if lib.get(k) is not None} for lib in threadpoolctl.threadpool_info()
    ]


def _torch_blas() -> str | None:
    """The BLAS torch was built against (``BLAS_INFO`` of ``torch.__config__.show()``)."""
    for part in torch.__config__.show().replace(",", "\n").splitlines():
        if "BLAS_INFO=" in part:
            return part.split("BLAS_INFO=", 1)[1].strip()
    return None


def git_revision() -> dict[str, Any]:
    """The lowrank checkout's commit, and whether tracked files differ from it."""
    commit = _run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT)
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT)
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def gpu_info() -> list[dict[str, Any]]:
    """Name, memory, compute capability and SM count of each visible CUDA device (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(
            {
                "index": index,
                "name": props.name,
                "memory_gib": round(props.total_memory / 2**30, 1),
                "compute_capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count,
            }
        )
    return gpus


def machine_info() -> dict[str, Any]:
    """Everything the report states about the machine and software, as a JSON-ready dict."""
    gpus = gpu_info()
    driver = None
    if gpus:
        out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        driver = out.splitlines()[0].strip() if out else None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": _usable_cpus(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "gpus": gpus,
        "cuda_runtime": torch.version.cuda,
        "cuda_driver": driver,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "versions": package_versions(),
        "torch_blas": _torch_blas(),
        "blas": blas_info(),
        "lowrank_git": git_revision(),
    }


def device_label(info: dict[str, Any], device: str) -> str:
    """A short, file-name-safe machine tag such as ``cpu-2c`` or ``cuda-nvidia-h200``."""
    if device == "cuda" and info.get("gpus"):
        name = info["gpus"][0]["name"].lower()
        slug = "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")
        while "--" in slug:
            slug = slug.replace("--", "-")
        return f"cuda-{slug}"
    return f"cpu-{info.get('cpus_usable') or info.get('cpu_count')}c"


@functools.cache
def ceilings(device: str = "cpu") -> dict[str, Any]:
    """Measured memory bandwidth (GB/s) and dense matmul throughput (TFLOP/s) on ``device``.

    Bandwidth is ``dst.copy_(src)`` on a buffer far larger than the last-level cache, counting one read
    and one write per byte (so it is comparable to a kernel's bytes read + written). Throughput is a
    square ``torch.matmul`` (2 n^3 flops) per dtype; on CUDA float32 runs with TF32 as currently
    configured (``torch.backends.cuda.matmul.allow_tf32``, recorded alongside). The result is cached per
    device; it takes about a second on CPU and well under that on a GPU.

    Parameters
    ----------
    device : str
        ``"cpu"`` or ``"cuda"`` (or ``"cuda:N"``).

    Returns
    -------
    dict
        ``{"memory_GBps": float, "matmul_TFLOPs": {dtype: float}, "matmul_n": int, "copy_MiB": int}``.
    """
    from benchmarks.common import measure

    dev = torch.device(device)
    is_cuda = dev.type == "cuda"
    if is_cuda and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available")
    copy_mib = 1024 if is_cuda else 128
    numel = copy_mib * 2**20 // 4
    src = torch.rand(numel, device=dev)
    dst = torch.empty_like(src)
    timing = measure({"copy": lambda: dst.copy_(src)}, device=dev, warmup=2, repeats=7)["copy"]
    bandwidth = 2 * numel * 4 / timing.median / 1e9

    n = 8192 if is_cuda else 1024
    dtypes = [torch.float32, torch.bfloat16, torch.float16] if is_cuda else [torch.float32]
    tflops: dict[str, float] = {}
    for dtype in dtypes:
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        timing = measure({"mm": lambda a=a, b=b: torch.matmul(a, b)}, device=dev, warmup=2, repeats=5)["mm"]
        tflops[str(dtype).removeprefix("torch.")] = 2 * n**3 / timing.median / 1e12
    result: dict[str, Any] = {
        "device": str(dev),
        "memory_GBps": bandwidth,
        "matmul_TFLOPs": tflops,
        "matmul_n": n,
        "copy_MiB": copy_mib,
    }
    if is_cuda:
        result["allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return result
