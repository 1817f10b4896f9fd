"""The compiled operator library: every op has its CPU and Meta kernels, and CUDA ones in a CUDA build."""

from __future__ import annotations

import pytest
import torch

import lowrank

OPS = ["lora_linear", "lora_linear_multi", "lora_linear_multi_backward"]


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
