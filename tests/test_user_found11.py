"""Faults found by user test 11 (StreamingSVD's counter-based row draws, commit 8200cbd): each test asserts
what a user should get, against an independent reference (float64 exact SVD, the stream's own state)."""

from __future__ import annotations

import pytest
import torch

from lowrank.sketch import StreamingSVD


def _decaying(m: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, n, dtype=torch.float64, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    return (U * 0.5 ** torch.arange(n, dtype=torch.float64)) @ V.T


def test_row_offset_beyond_the_generators_rows_is_a_value_error_naming_it():
    """row_offset = 2**60 (or >= 2**63) was accepted, then update() raised a ValueError about the private
    op's ``start`` (or pybind's RuntimeError): the generator reads word ``i W + j`` of a 2**62 counter.
    Now the constructor names row_offset, the last rows work, and a block past them changes nothing."""
    n, k = 30, 3
    limit = (2**62 - 1) // (8 + 8 + 1 + 5)  # zeta_s + zeta_c sign picks, 1 sign word, 5 Gaussian pairs
    for offset in (limit, 2**60, 2**63, 2**64):
        with pytest.raises(ValueError, match=f"row_offset must be < {limit}.*got {offset}"):
            StreamingSVD(n, k, seed=1, row_offset=offset)
    A = _decaying(200, n, seed=2)
    sk = StreamingSVD(n, k, seed=1, row_offset=limit - 200)
    sk.update(A[:150]).update(A[150:])  # up to the last row
    torch.testing.assert_close(sk.result().S, torch.linalg.svdvals(A)[:k], rtol=2e-3, atol=0)
    state = {key: value.clone() for key, value in sk._acc.items()}
    with pytest.raises(ValueError, match="row_offset=.* plus 201 rows.*beyond the last row"):
        sk.update(A[:1])
    assert sk.n_rows == 200
    assert all(torch.equal(state[key], sk._acc[key]) for key in state)
    # a state whose rows pass the limit (hand-edited) is refused by load_state_dict, naming the rows
    bad = StreamingSVD(n, k, seed=1, row_offset=limit - 200).update(A).state_dict()
    bad["row_offset"] = limit - 100
    with pytest.raises(ValueError, match="row_offset \\+ n_rows = .* beyond the last global row"):
        StreamingSVD(n, k, seed=1).load_state_dict(bad)
    # more Gaussian test rows mean more words per row, and fewer rows
    small = (2**62 - 1) // (8 + 8 + 1 + 50)
    with pytest.raises(ValueError, match=f"row_offset must be < {small}"):
        StreamingSVD(n, k, seed=1, n_test=100, row_offset=small)
