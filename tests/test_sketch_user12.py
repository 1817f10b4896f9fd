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


def _shards(tmp_path, A: np.ndarray, parts: int = 3) -> list[str]:
    paths = []
    for i, piece in enumerate(np.array_split(A, parts)):
        path = str(tmp_path / f"part{i}.npy")
        np.save(path, piece)
        paths.append(path)
    return paths


def test_shard_list_reads_right(tmp_path):
    A = _data(300, 30)
    S = lowrank.rsvd(_shards(tmp_path, A), 3, seed=0).S.numpy()
    np.testing.assert_allclose(S, np.linalg.svd(A, compute_uv=False)[:3], rtol=1e-10)


def test_missing_shard_is_a_value_error_naming_it(tmp_path, monkeypatch):
    import lowrank.sketch as sketch_mod

    paths = _shards(tmp_path, _data(300, 30))
    missing = str(tmp_path / "gone.npy")
    read = []
    real = sketch_mod._shard_blocks
    monkeypatch.setattr(sketch_mod, "_shard_blocks", lambda p: read.append(p) or real(p))
    with pytest.raises(ValueError, match="gone.npy"):
        lowrank.rsvd([*paths, missing], 3, seed=0)
    assert read == []  # refused before any shard was read


@pytest.mark.parametrize("kind", ["npy", "safetensors"])
def test_shard_of_another_width_is_named(tmp_path, kind):
    paths = _shards(tmp_path, _data(300, 30))
    other = _data(40, 31, seed=1).astype(np.float32)
    if kind == "npy":
        odd = str(tmp_path / "odd.npy")
        np.save(odd, other)
    else:
        from safetensors.torch import save_file

        odd = str(tmp_path / "odd.safetensors")
        save_file({"x": torch.from_numpy(other)}, odd)
    with pytest.raises(ValueError, match=r"odd\.(npy|safetensors)' has 31 columns"):
        lowrank.rsvd([paths[0], odd, *paths[1:]], 3, seed=0)


def test_truncated_shard_is_a_value_error(tmp_path):
    paths = _shards(tmp_path, _data(300, 30))
    for name in ("cut.npy", "cut.safetensors"):
        bad = tmp_path / name
        bad.write_bytes(b"\x93NUMPY" if name.endswith(".npy") else b"\x08\x00\x00")
        with pytest.raises(ValueError, match=name):
            lowrank.rsvd([*paths, str(bad)], 3, seed=0)


def test_memmap_routing_as_the_readme_says(tmp_path):
    # README: a memmap of 256 MiB or more is streamed in one pass; a smaller one, or a large one passed
    # as mm.view(np.ndarray), goes through the multi-pass rsvd
    from lowrank.sketch import MEMMAP_STREAM_BYTES, is_row_stream

    rows = MEMMAP_STREAM_BYTES // (1024 * 4)
    big = np.memmap(tmp_path / "big.dat", dtype=np.float32, mode="w+", shape=(rows, 1024))  # sparse file
    assert is_row_stream(big) and not is_row_stream(big.view(np.ndarray))
    A = _data(300, 30)
    small = np.memmap(tmp_path / "small.dat", dtype=np.float64, mode="w+", shape=A.shape)
    small[:] = A
    assert not is_row_stream(small)
    S = lowrank.rsvd(small, 3, seed=0).S.numpy()
    np.testing.assert_allclose(S, np.linalg.svd(A, compute_uv=False)[:3], rtol=1e-10)
    del big, small


def test_stream_of_mixed_dtypes_names_the_block_and_no_missing_argument():
    # NumPy blocks are float64, torch ones float32: rsvd has no dtype= argument to offer
    A = _data(300, 30)
    blocks = [torch.from_numpy(A[:100]).float(), torch.from_numpy(A[100:200]).float(), A[200:]]
    with pytest.raises(TypeError, match="row block 2") as info:
        lowrank.rsvd(iter(blocks), 3, seed=0)
    assert "pass dtype=" not in str(info.value)
    S = lowrank.rsvd(iter([*blocks[:2], A[200:].astype(np.float32)]), 3, seed=0).S.numpy()
    np.testing.assert_allclose(S, np.linalg.svd(A, compute_uv=False)[:3], rtol=1e-4)


def test_stream_block_of_wrong_width_is_named():
    A = _data(300, 30)
    with pytest.raises(ValueError, match="row block 3: block has 29 columns"):
        lowrank.rsvd(iter([A[:50], A[50:100], A[100:200], A[200:, :29]]), 3, seed=0)


def test_stream_of_empty_blocks_is_an_empty_stream():
    # was "result() needs at least one update() ...": rsvd's caller called neither
    for stream in (iter([]), iter([np.zeros((0, 30)), np.zeros((0, 30))])):
        with pytest.raises(ValueError, match="stream is empty"):
            lowrank.rsvd(stream, 3, seed=0)


def test_dict_is_no_row_stream():
    # a dict iterates its keys: {"x": A} was read as a list of shard paths ("shard paths must end in ...")
    A = _data(100, 30)
    with pytest.raises(TypeError, match="got dict"):
        lowrank.rsvd({"x": A}, 3, seed=0)
