"""Small CUDA cases for compute-sanitizer memcheck (run by gpu_check.sh): every kernel path and tail.

Exits non-zero if a result is wrong; compute-sanitizer reports out-of-bounds or misaligned accesses.
"""

from __future__ import annotations

import torch

import lowrank


def main() -> None:
    torch.manual_seed(0)
    cases = [
        # (M, in, out, r, dtype, offset): offset > 0 misaligns x to force the scalar path
        (1, 64, 40, 4, torch.bfloat16, 0),
        (3, 67, 45, 3, torch.float16, 0),
        (5, 136, 33, 16, torch.float32, 0),
        (16, 256, 24, 256, torch.bfloat16, 0),
        (16, 520, 9, 1, torch.float32, 1),
        (2, 96, 17, 8, torch.bfloat16, 1),
        (40, 96, 17, 8, torch.bfloat16, 0),
    ]
    for M, n_in, n_out, r, dtype, offset in cases:
        base = torch.randn(M * n_in + offset, device="cuda", dtype=dtype)
        x = base[offset:].view(M, n_in)
        w = torch.randn(n_out, n_in, device="cuda", dtype=dtype) / n_in**0.5
        a = torch.randn(r, n_in, device="cuda", dtype=dtype) / n_in**0.5
        b = torch.randn(n_out, r, device="cuda", dtype=dtype)
        bias = torch.randn(n_out, device="cuda", dtype=dtype)
        y = lowrank.lora_linear(x, w, a, b, 0.5, bias)
        ref = x.double() @ w.double().T + 0.5 * (x.double() @ a.double().T) @ b.double().T + bias.double()
        err = (y.double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        assert err < tol, (M, n_in, n_out, r, dtype, offset, err)
    # Mixed-adapter op: decode (gather kernels) and prefill (segments), misaligned x, -1 rows.
    for M, n_in, n_out, r, offset in [(3, 64, 40, 4, 0), (5, 67, 33, 5, 1), (200, 96, 24, 8, 0)]:
        dtype = torch.bfloat16
        base = torch.randn(M * n_in + offset, device="cuda", dtype=dtype)
        x = base[offset:].view(M, n_in)
        w = torch.randn(n_out, n_in, device="cuda", dtype=dtype) / n_in**0.5
        a = torch.randn(3, r, n_in, device="cuda", dtype=dtype) / n_in**0.5
        b = torch.randn(3, n_out, r, device="cuda", dtype=dtype)
        ids = torch.randint(-1, 3, (M,), device="cuda")
        scales = torch.tensor([0.5, 1.0, 2.0], device="cuda")
        y = lowrank.lora_linear_multi(x, w, a, b, ids, scales)
        ref = x.double() @ w.double().T
        for i in range(M):
            j = int(ids[i])
            if j >= 0:
                ref[i] += scales[j].double() * (x[i].double() @ a[j].double().T) @ b[j].double().T
        err = (y.double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
        assert err < 3e-2, ("multi", M, n_in, n_out, r, offset, err)
    torch.cuda.synchronize()
    print("memcheck cases ran:", len(cases) + 3)


if __name__ == "__main__":
    main()
