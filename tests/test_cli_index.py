"""The CLI's shard index (model.safetensors.index.json): entries must name files inside the checkpoint folder
(by name: a Hugging Face cache snapshot's shards are symlinks into ../../blobs and must still read)."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from lowrank.cli import main


def _checkpoint(folder, g):
    folder.mkdir()
    save_file({"a.weight": torch.randn(40, 30, generator=g)}, str(folder / "m-1.safetensors"))
    return {"a.weight": "m-1.safetensors"}


def test_an_index_naming_a_shard_outside_the_folder_is_refused(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    folder = tmp_path / "ck"
    weight_map = _checkpoint(folder, g)
    outside = tmp_path / "outside.safetensors"  # a readable safetensors file next to the folder
    save_file({"b.weight": torch.randn(6, 5, generator=g)}, str(outside))
    index = folder / "model.safetensors.index.json"
    out = tmp_path / "c.safetensors"
    for entry in ("../outside.safetensors", str(outside), "sub/../../outside.safetensors"):
        index.write_text(json.dumps({"weight_map": {**weight_map, "b.weight": entry}}))
        assert main(["compress", str(folder), "--rank", "2", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "outside the checkpoint folder" in err and entry in err, err
        assert not out.exists()


def test_an_index_with_symlinked_and_subfolder_shards_reads(tmp_path):
    # a Hugging Face cache layout: snapshots/<rev>/m-2.safetensors -> ../../blobs/<hash>; and a shard in a
    # subfolder of the checkpoint (inside by name): both are read, every tensor reaches the output
    g = torch.Generator().manual_seed(1)
    folder = tmp_path / "snapshots" / "rev"
    folder.parent.mkdir()
    weight_map = _checkpoint(folder, g)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    b = torch.randn(40, 2, generator=g) @ torch.randn(2, 30, generator=g)  # exactly rank 2
    save_file({"b.weight": b}, str(blobs / "0123abcd"))
    os.symlink(os.path.join("..", "..", "blobs", "0123abcd"), folder / "m-2.safetensors")
    (folder / "sub").mkdir()
    c = torch.randn(40, 30, generator=g)
    save_file({"c.weight": c}, str(folder / "sub" / "m-3.safetensors"))
    weight_map.update({"b.weight": "m-2.safetensors", "c.weight": "sub/m-3.safetensors"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out = tmp_path / "c.safetensors"
    assert main(["compress", str(folder), "--rank", "2", "--out", str(out)]) == 0
    got = load_file(str(out))
    assert sorted(got) == [f"{n}.weight.{f}" for n in "abc" for f in "AB"]
    # b has rank 2: its rank-2 factors reproduce it (an independent check that the symlinked shard was read)
    torch.testing.assert_close(got["b.weight.B"] @ got["b.weight.A"], b, rtol=1e-4, atol=1e-5)
