"""The compiled operator library: every op has its CPU and Meta kernels, and CUDA ones in a CUDA build."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import lowrank

OPS = ["lora_linear", "lora_linear_multi", "lora_linear_multi_backward", "lora_linear_quantized"]


@pytest.mark.parametrize("op", OPS)
def test_kernels_registered(op):
    qualified = f"lowrank::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "Meta")
    # A CUDA build of torch with a toolkit compiles the CUDA kernels (CI checks WITH_CUDA is True there).
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA") == lowrank.WITH_CUDA


def test_extension_reports_its_build():
    from lowrank import _C

    assert _C.torch_version == torch.__version__.split("+")[0]
    assert lowrank.WITH_CUDA in (True, False)
    if torch.version.cuda is None:
        assert not lowrank.WITH_CUDA


def _import_in_subprocess(prelude: str) -> subprocess.CompletedProcess:
    code = f"{prelude}\nimport lowrank\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_missing_extension_says_how_to_rebuild():
    result = _import_in_subprocess("import sys; sys.modules['lowrank._C'] = None")
    assert result.returncode != 0
    assert "ImportError: lowrank's compiled extension lowrank._C could not be loaded" in result.stderr
    assert "pip install --no-build-isolation -e ." in result.stderr


def test_extension_built_for_another_torch_says_how_to_rebuild():
    result = _import_in_subprocess("import torch; torch.__version__ = '9.9.9+cpu'")
    assert result.returncode != 0
    assert (
        f"built against torch {torch.__version__.split('+')[0]} but torch 9.9.9 is installed" in result.stderr
    )
    assert "pip install --no-build-isolation -e ." in result.stderr
