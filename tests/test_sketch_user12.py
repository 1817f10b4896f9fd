"""Faults a new user found in the streaming SVD entry points (StreamingSVD, rsvd of row streams)."""

import numpy as np
import pytest
import torch

import lowrank


def _data(m: int = 200, n: int = 30, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((m, 6)) * np.logspace(0, -2, 6)) @ rng.standard_normal((6, n))


def test_failed_load_state_dict_leaves_instance_unchanged():
    # a float32 state refused by a float64 instance (dtype fixed, seed drawn) must not adopt its seed:
    # the instance's own sketches were drawn with its own seed
    A = _data()
    src = lowrank.StreamingSVD(30, 3, seed=5)
    src.update(A.astype(np.float32))
    sk = lowrank.StreamingSVD(30, 3, dtype=torch.float64)
    sk.update(A)
    seed0 = sk.seed
    with pytest.raises(ValueError, match="dtype"):
        sk.load_state_dict(src.state_dict())
    assert sk.seed == seed0
    S_ref = np.linalg.svd(A, compute_uv=False)[:3]
    np.testing.assert_allclose(sk.result().S.numpy(), S_ref, rtol=1e-10)


@pytest.mark.parametrize("first", [[[1.0, 2.0], [3.0, 4.0]], 3, None])
def test_stream_of_non_arrays_is_a_type_error(first):
    # the first block fixes the width: a block without a shape was an AttributeError
    with pytest.raises(TypeError, match="row blocks"):
        lowrank.rsvd(iter([first, np.ones((4, 2))]), 1, seed=0)


@pytest.mark.parametrize(("name", "value"), [("k", 4), ("sketch", 20), ("core", 50), ("n_test", 3)])
def test_load_state_dict_of_another_configuration_names_the_setting(name, value):
    src = lowrank.StreamingSVD(30, 3, seed=5)
    src.update(_data())
    sk = lowrank.StreamingSVD(**{"n_features": 30, "k": 3, "seed": 5, name: value})
    with pytest.raises(ValueError, match=f"state has {name}="):
        sk.load_state_dict(src.state_dict())
    assert sk.n_rows == 0 and sk._acc is None
