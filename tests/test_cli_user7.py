"""CLI faults found by a user test (user-test7): each asserts the behaviour a user should get."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowrank.cli import main


@pytest.fixture()
def pair(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {f"l{i}.proj.weight": torch.randn(12, 10, generator=g) for i in range(2)}
    tuned = {
        k: v + torch.randn(12, 2, generator=g) @ torch.randn(2, 10, generator=g) for k, v in base.items()
    }
    for name, state in (("base", base), ("tuned", tuned)):
        os.makedirs(tmp_path / name)
        save_file(state, str(tmp_path / name / "model.safetensors"))
    return tmp_path, base, tuned


def test_bad_seed_is_refused_by_the_parser_naming_seed_before_any_work(pair, capsys):
    # found: --seed -1 was accepted by argparse, the checkpoints were read and layers printed, then the
    # error came from deep inside ("seed must be in [0, 2**63)"), without naming --seed
    root, _, _ = pair
    for seed in ("-1", str(2**63), "x"):
        for argv in (
            ["extract", str(root / "base"), str(root / "tuned"), "--rank", "1", "--out", str(root / "ad")],
            ["compress", str(root / "tuned"), "--rank", "1", "--out", str(root / "c.safetensors")],
        ):
            assert main([*argv, "--seed", seed]) == 2
            captured = capsys.readouterr()
            assert "--seed" in captured.err and captured.out == ""
    assert not (root / "ad").exists() and not (root / "c.safetensors").exists()


def test_a_checkpoint_folder_holding_an_adapter_reads_only_the_model(pair, capsys):
    # found: `extract BASE TUNED --out TUNED` (an adapter saved beside the model, a common layout) made the
    # folder unreadable as a checkpoint: every *.safetensors was taken as a shard, so the next extract
    # failed ("lora_A.weight is in TUNED but not in BASE") and compress factored the adapter's own
    # lora_A/lora_B tensors into the compressed model.
    root, base, tuned = pair
    assert (
        main(
            ["extract", str(root / "base"), str(root / "tuned"), "--rank", "2", "--out", str(root / "tuned")]
        )
        == 0
    )
    assert os.path.isfile(root / "tuned" / "adapter_model.safetensors")
    save_file({"other.weight": torch.ones(3, 3)}, str(root / "tuned" / "notes.safetensors"))
    assert (
        main(["extract", str(root / "base"), str(root / "tuned"), "--rank", "2", "--out", str(root / "ad")])
        == 0
    )
    out = root / "c.safetensors"
    assert main(["compress", str(root / "tuned"), "--rank", "2", "--out", str(out)]) == 0
    written = load_file(str(out))
    assert sorted(written) == sorted(f"{k}.{f}" for k in tuned for f in "AB")
    for k, w in tuned.items():  # rank-2 factors of each weight: the optimal error to rounding
        s = torch.linalg.svdvals(w.double())
        err = torch.linalg.matrix_norm(w.double() - written[k + ".B"].double() @ written[k + ".A"].double())
        assert float(err) <= float(s[2:].norm()) * (1 + 1e-4)
    # a shard folder without an index or model.safetensors still reads every shard but the adapter
    shards = root / "shards"
    os.makedirs(shards)
    names = sorted(tuned)
    for i, k in enumerate(names):
        save_file({k: tuned[k]}, str(shards / f"model-0000{i + 1}-of-00002.safetensors"))
    os.link(root / "tuned" / "adapter_model.safetensors", shards / "adapter_model.safetensors")
    capsys.readouterr()
    assert main(["extract", str(root / "base"), str(shards), "--rank", "2", "--out", str(root / "ad2")]) == 0
    a1, a2 = (
        load_file(str(root / "ad" / "adapter_model.safetensors")),
        load_file(str(root / "ad2" / "adapter_model.safetensors")),
    )
    assert sorted(a1) == sorted(a2) and all(torch.equal(a1[k], a2[k]) for k in a1)
    assert len(a1) == 2 * len(base)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_budget_records_the_error_of_the_stored_half_precision_factors(tmp_path, dtype, capsys):
    # found: `extract --budget` on a bf16 checkpoint recorded (metadata, `lowrank info`) 5.4e-7 for a layer
    # whose bf16 factors are 2.4e-3 off the delta: the error of the fp32 factors before rounding (here the
    # budget buys full rank, so all of the error is the rounding)
    from lowrank.cli import _layer_records

    g = torch.Generator().manual_seed(1)
    base = {
        "a.weight": torch.randn(24, 16, generator=g).to(dtype),
        "b.weight": torch.randn(20, 16, generator=g).to(dtype),
    }
    tuned = {k: (v.float() + torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    argv = [
        "extract",
        str(tmp_path / "b.safetensors"),
        str(tmp_path / "t.safetensors"),
        "--out",
        str(tmp_path / "ad"),
    ]
    assert main([*argv, "--budget-params", "1300"]) == 0
    from safetensors import safe_open

    weights = str(tmp_path / "ad" / "adapter_model.safetensors")
    with safe_open(weights, framework="pt") as f:
        records = _layer_records(f.metadata(), weights)
    adapter = load_file(weights)
    assert set(records) == {"a", "b"}
    for module, rec in records.items():
        delta = tuned[module + ".weight"].double() - base[module + ".weight"].double()
        B = adapter[f"base_model.model.{module}.lora_B.weight"].double()
        A = adapter[f"base_model.model.{module}.lora_A.weight"].double()
        assert A.dtype == torch.float64 and adapter[f"base_model.model.{module}.lora_A.weight"].dtype == dtype
        true = float(torch.linalg.matrix_norm(delta - B @ A) / torch.linalg.matrix_norm(delta))
        assert rec["rel_error"] == pytest.approx(true, rel=1e-3)


def test_empty_out_is_refused_before_any_work(pair, capsys, monkeypatch):
    # found: `extract ... --out ''` read and factored everything, then failed with "[Errno 2] No such file
    # or directory: ''" (not naming --out); `compress ... --out ''` silently wrote ./model.safetensors
    root, _, _ = pair
    monkeypatch.chdir(root)
    for argv in (["extract", "base", "tuned", "--rank", "1"], ["compress", "tuned", "--rank", "1"]):
        for out in ("", "  "):
            assert main([*argv, "--out", out]) == 2
            captured = capsys.readouterr()
            assert "--out" in captured.err and "empty" in captured.err and captured.out == ""
    assert sorted(os.listdir(root)) == ["base", "tuned"]


def test_unwritable_out_folder_is_refused_before_any_work(pair, capsys, monkeypatch):
    # seen in the user test: an --out inside a folder that cannot be written was found only at write time,
    # after every layer was read and factored. Root bypasses permission bits, so the test makes os.access
    # report the folder unwritable (what it returns for another user on a read-only folder).
    root, _, _ = pair
    locked = root / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: False if str(path) == str(locked) else real_access(path, mode)
    )
    for argv in (
        ["extract", str(root / "base"), str(root / "tuned"), "--rank", "1", "--out", str(locked / "a" / "b")],
        ["compress", str(root / "tuned"), "--rank", "1", "--out", str(locked / "c.safetensors")],
    ):
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert "--out" in captured.err and "not writable" in captured.err and captured.out == ""
        assert "layer" not in captured.err  # refused before any layer was read
    assert os.listdir(locked) == []


@pytest.mark.parametrize(
    "text,count", [("0.3k", 300), ("1.5GB", 1_500_000_000), ("1.5KiB", 1536), ("2e3", 2000), ("7", 7)]
)
def test_sizes_are_whole_counts(text, count):
    from lowrank.cli import _parse_size

    assert _parse_size(text) == count


def test_fractional_count_is_refused_naming_the_option(pair, capsys):
    # seen in the user test: --budget-params 1.5 was read as 1 parameter without a word
    root, _, _ = pair
    argv = ["extract", str(root / "base"), str(root / "tuned"), "--out", str(root / "ad")]
    for option in ("--budget-params", "--budget"):
        assert main([*argv, option, "1.5"]) == 2
        err = capsys.readouterr().err
        assert option in err and "whole number" in err
    assert not (root / "ad").exists()
