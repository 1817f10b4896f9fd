"""``--out`` on a path that cannot be written (a file where a folder must be) is refused before any work.

A user trial found ``extract --out FILE`` read both checkpoints and factored every layer before failing on
the output path, and ``compress --out FILE`` failed the same way, late; the commands now check the output
path first (the test makes reading a checkpoint fail, so an error about ``--out`` proves the order).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowrank.cli as cli


@pytest.fixture
def pair(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"layer.weight": torch.randn(12, 10, generator=g)}
    tuned = {
        "layer.weight": base["layer.weight"]
        + torch.randn(12, 2, generator=g) @ torch.randn(2, 10, generator=g)
    }
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    (tmp_path / "afile").write_text("keep")
    return tmp_path, tuned


@pytest.mark.parametrize(
    "argv",
    [
        [
            "extract",
            "{root}/base.safetensors",
            "{root}/tuned.safetensors",
            "--rank",
            "2",
            "--out",
            "{root}/afile",
        ],
        [
            "extract",
            "{root}/base.safetensors",
            "{root}/tuned.safetensors",
            "--rank",
            "2",
            "--out",
            "{root}/afile/x",
        ],
        ["compress", "{root}/tuned.safetensors", "--rank", "2", "--out", "{root}/afile"],
        ["compress", "{root}/tuned.safetensors", "--rank", "2", "--out", "{root}/afile/c.safetensors"],
    ],
    ids=["extract-file", "extract-under-file", "compress-file", "compress-under-file"],
)
def test_out_under_a_file_is_refused_before_reading(pair, argv, monkeypatch, capsys):
    root, _ = pair

    def no_reading(*args, **kwargs):
        raise AssertionError("a checkpoint was opened before --out was checked")

    monkeypatch.setattr(cli, "TensorSource", no_reading)
    assert cli.main([a.format(root=root) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "afile" in err and "not a directory" in err
    assert (root / "afile").read_text() == "keep"


def test_out_in_new_folders_still_works(pair, capsys):
    root, tuned = pair
    out = root / "new" / "deeper" / "c.safetensors"
    assert cli.main(["compress", str(root / "tuned.safetensors"), "--rank", "2", "--out", str(out)]) == 0
    factors = load_file(out)
    B = next(v for k, v in factors.items() if k.endswith("B"))
    A = next(v for k, v in factors.items() if k.endswith("A"))
    S = torch.linalg.svdvals(tuned["layer.weight"].double())
    error = float(torch.linalg.matrix_norm((B @ A).double() - tuned["layer.weight"].double()))
    assert error == pytest.approx(float(S[2:].norm()), rel=1e-4)  # the optimal rank-2 error
