"""Build lowrank._C: csrc/*.cpp and csrc/cpu/*.cpp always, csrc/cuda/*.cu with a CUDA build of torch.

Environment knobs
-----------------
LOWRANK_CUDA=0|1        force the CUDA sources off / on (default: on when torch is a CUDA build and a CUDA
                        toolkit with nvcc is found; no GPU is needed to compile).
TORCH_CUDA_ARCH_LIST    architectures to compile for (default "9.0": the H100/H200 we ship for).
MAX_JOBS                parallel compile jobs for ninja (default: number of CPUs).
CUDA_HOME / CUDA_PATH   the CUDA toolkit root; found automatically when unset (see find_cuda_toolkit).
LOWRANK_DEBUG=1         -O0 -g host code, -lineinfo device code.

Install with ``pip install --no-build-isolation -e .`` so the extension is built against the torch that
is already installed (build isolation would fetch another torch and break the ABI).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _is_toolkit(root: str) -> bool:
    """A real toolkit root has nvcc, the runtime headers and libcudart (a wrapper prefix has only nvcc)."""
    if not root or not os.path.isdir(root):
        return False
    has_nvcc = os.path.exists(os.path.join(root, "bin", "nvcc"))
    has_headers = os.path.exists(os.path.join(root, "include", "cuda_runtime.h"))
    libdirs = [
        "lib64",
        "lib",
        os.path.join("targets", "x86_64-linux", "lib"),
        os.path.join("targets", "sbsa-linux", "lib"),
    ]
    has_cudart = any(glob.glob(os.path.join(root, d, "libcudart.so*")) for d in libdirs)
    return has_nvcc and has_headers and has_cudart


def _nvcc_wrapper_target(nvcc: str) -> str | None:
    """If ``nvcc`` is a small shell script that execs the real nvcc, return that real path."""
    try:
        with open(nvcc, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    for token in head.decode("utf-8", "replace").split():
        token = token.strip("\"'")
        if token.endswith("/nvcc") and os.path.isabs(token) and os.path.exists(token):
            return token
    return None


def find_cuda_toolkit() -> str | None:
    """Locate the CUDA toolkit root, looking past wrapper scripts.

    Order: $CUDA_HOME, $CUDA_PATH, the toolkit of the nvcc on PATH (following a wrapper script and
    symlinks), the conventional ``cuda`` directory of the prefix that nvcc lives in (``/usr/local/bin/nvcc``
    -> ``/usr/local/cuda``), then /usr/local/cuda and /opt/cuda.
    """
    candidates: list[str] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        for path in (nvcc, os.path.realpath(nvcc), _nvcc_wrapper_target(nvcc)):
            if path:
                candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(path))))
        prefix = os.path.dirname(os.path.dirname(nvcc))
        candidates.append(os.path.join(prefix, "cuda"))
    candidates += ["/usr/local/cuda", "/opt/cuda"]
    for root in candidates:
        if _is_toolkit(root):
            return os.path.realpath(root)
    return None


def find_pip_cuda_includes() -> list[str]:
    """Header folders of the pip ``nvidia-*`` wheels (cusparse.h, cublas_v2.h, cusolverDn.h, ...).

    torch's CUDA headers include cuSPARSE/cuBLAS/cuSOLVER headers that a minimal toolkit may not ship; the
    wheels torch depends on carry them under ``site-packages/nvidia/cu13/include`` (or one folder per
    library in older layouts).
    """
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found: list[str] = []
    for base in spec.submodule_search_locations:
        for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if any(
                os.path.exists(os.path.join(inc, h)) for h in ("cusparse.h", "cublas_v2.h", "cusolverDn.h")
            ):
                found.append(inc)
    return found


def _want_cuda(toolkit: str | None) -> bool:
    import torch

    flag = os.environ.get("LOWRANK_CUDA")
    if flag == "0":
        return False
    if flag == "1":
        if torch.version.cuda is None:
            sys.exit("lowrank setup: LOWRANK_CUDA=1 but the installed torch is a CPU-only build.")
        if toolkit is None:
            sys.exit(
                "lowrank setup: LOWRANK_CUDA=1 but no CUDA toolkit was found. Set CUDA_HOME to the toolkit "
                "root (the folder with bin/nvcc, include/cuda_runtime.h and lib64/libcudart.so)."
            )
        return True
    return torch.version.cuda is not None and toolkit is not None


def build_extensions():
    toolkit = find_cuda_toolkit()
    if toolkit:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import: set it first.
        os.environ["CUDA_HOME"] = toolkit
    use_cuda = _want_cuda(toolkit)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    debug = os.environ.get("LOWRANK_DEBUG") == "1"
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fopenmp"]  # the C++ standard is left to torch (C++20 for torch >= 2.10)
    define_macros: list[tuple[str, str | None]] = []
    include_dirs = [os.path.join(HERE, "csrc")]
    extra_link = ["-fopenmp"]
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        include_dirs += find_pip_cuda_includes()
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo" if debug else "-DNDEBUG"]
        nvcc += ["-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__"]
        nvcc += ["-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]
        define_macros.append(("LOWRANK_WITH_CUDA", "1"))
        ext = CUDAExtension(
            "lowrank._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=extra_link,
        )
        print(
            f"lowrank setup: building with CUDA (toolkit {toolkit}, "
            f"arch {os.environ['TORCH_CUDA_ARCH_LIST']})",
            file=sys.stderr,
        )
    else:
        ext = CppExtension(
            "lowrank._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=extra_link,
        )
        print(
            "lowrank setup: building the CPU extension only (no CUDA toolkit or CPU torch)", file=sys.stderr
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = build_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
