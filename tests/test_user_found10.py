"""Faults found by user-test10 (replays of mergekit / safetensors / torch.distributed reports): each test
asserts what a user should get, against an independent reference (PEFT on transformers, safetensors' own
loader, float64 SVD, the single-process result)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from gloo_harness import run_gloo
from safetensors.torch import load_file, save_file

from lowrank.cli import main


def _tune(model, gen: torch.Generator) -> None:
    """A rank-2 update of every matrix of ``model`` in place (the tied embedding included)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(
                    0.1
                    * torch.randn(p.shape[0], 2, generator=gen)
                    @ torch.randn(2, p.shape[1], generator=gen)
                )


def _assert_peft_on_base_gives_tuned_logits(base_dir, adapter_dir, tuned) -> None:
    """PEFT loading the extracted adapter onto BASE reproduces TUNED's logits."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = transformers.LlamaForCausalLM.from_pretrained(str(base_dir))
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    x = torch.arange(2, 12).reshape(1, 10)
    with torch.no_grad():
        want, got = tuned(x).logits.double(), model(x).logits.double()
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())


def _tiny_llama_pair(tmp_path, tied: bool):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    base = transformers.LlamaForCausalLM(cfg).eval()
    tuned = transformers.LlamaForCausalLM(cfg).eval()
    tuned.load_state_dict(base.state_dict())
    _tune(tuned, torch.Generator().manual_seed(1))
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    return transformers, tuned


@pytest.mark.parametrize("tied", [True, False])
def test_extract_with_tied_embeddings_reproduces_the_tuned_logits(tmp_path, tied, capsys):
    # replay of arcee-ai/mergekit#447 / #483 (extract_lora and tied embeddings): with
    # tie_word_embeddings the checkpoint stores only model.embed_tokens.weight, which is also lm_head's
    # weight. found: the adapter targeted model.embed_tokens alone; PEFT adapts modules, so lm_head kept the
    # BASE matrix and the logits of BASE + adapter were off by 2.9 (max abs) from TUNED.
    pytest.importorskip("peft")
    _, tuned = _tiny_llama_pair(tmp_path, tied)
    keys = load_file(str(tmp_path / "tuned" / "model.safetensors")).keys()
    assert ("lm_head.weight" in keys) != tied
    out = tmp_path / "ad"
    argv = ["extract", str(tmp_path / "base"), str(tmp_path / "tuned"), "--rank", "2", "--out", str(out)]
    assert main([*argv, "--target", r"proj|embed|lm_head"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert "lm_head" in config["target_modules"] and "model.embed_tokens" in config["target_modules"]
    if tied:
        assert "tie_word_embeddings" in capsys.readouterr().err
    _assert_peft_on_base_gives_tuned_logits(tmp_path / "base", out, tuned)


def test_zero_size_weights_are_copied_not_factored(tmp_path, capsys):
    # replay of safetensors#280 / #205 (zero-size tensors in a checkpoint). found: `compress` on a checkpoint
    # holding a (0, 6) weight stopped with "A has an empty dimension (shape (0, 6))", naming no tensor and
    # writing nothing; such a weight has nothing to factor and is copied as it is (also with --target).
    g = torch.Generator().manual_seed(0)
    state = {
        "l.weight": torch.randn(8, 2, generator=g) @ torch.randn(2, 6, generator=g),
        "e.weight": torch.zeros(0, 6),
        "f.weight": torch.zeros(5, 0, dtype=torch.bfloat16),
    }
    save_file(state, str(tmp_path / "ck.safetensors"))
    for extra in ([], ["--target", "l|e|f"]):
        out = tmp_path / f"out{len(extra)}.safetensors"
        assert (
            main(["compress", str(tmp_path / "ck.safetensors"), "--rank", "2", "--out", str(out)] + extra)
            == 0
        )
        got = load_file(str(out))
        assert sorted(got) == ["e.weight", "f.weight", "l.weight.A", "l.weight.B"]
        assert got["e.weight"].shape == (0, 6) and got["f.weight"].shape == (5, 0)
        assert got["f.weight"].dtype == torch.bfloat16
        W = state["l.weight"].double()
        assert torch.allclose(got["l.weight.B"].double() @ got["l.weight.A"].double(), W, atol=1e-5)
    capsys.readouterr()
    # only zero-size weights selected: one clear line, exit 2, nothing written
    out = tmp_path / "none.safetensors"
    assert (
        main(
            [
                "compress",
                str(tmp_path / "ck.safetensors"),
                "--rank",
                "1",
                "--target",
                "e|f",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "e.weight" in err and "no 2-D weight" in err and not out.exists()


def test_an_index_naming_a_tensor_its_shard_lacks_is_refused(tmp_path, capsys):
    # replay of huggingface_hub#4728 / #4740 (an index.json entry whose tensor is not in the mapped shard,
    # e.g. a shard from another revision). found: lowrank ignored the index's mapping; a tensor the index
    # lists but no shard holds vanished from `compress`'s output without a word (the model then fails to
    # load, or loads with a freshly initialised layer).
    g = torch.Generator().manual_seed(0)
    folder = tmp_path / "ck"
    folder.mkdir()
    save_file({"a.weight": torch.randn(6, 5, generator=g)}, str(folder / "m-1.safetensors"))
    save_file({"b.weight": torch.randn(6, 5, generator=g)}, str(folder / "m-2.safetensors"))
    index = folder / "model.safetensors.index.json"
    for weight_map in (
        {"a.weight": "m-1.safetensors", "b.weight": "m-2.safetensors", "c.weight": "m-2.safetensors"},
        {"a.weight": "m-2.safetensors", "b.weight": "m-1.safetensors"},
    ):
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        out = tmp_path / "c.safetensors"
        assert main(["compress", str(folder), "--rank", "2", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "index" in err and "does not hold it" in err, err
        assert not out.exists()
    # a consistent index works; its tensors are all in the output
    index.write_text(
        json.dumps({"weight_map": {"a.weight": "m-1.safetensors", "b.weight": "m-2.safetensors"}})
    )
    assert main(["compress", str(folder), "--rank", "2", "--out", str(out)]) == 0
    assert sorted(load_file(str(out))) == ["a.weight.A", "a.weight.B", "b.weight.A", "b.weight.B"]


def test_compress_keeps_the_checkpoints_metadata(tmp_path):
    # replay of safetensors#549 (metadata lost when a checkpoint is re-saved; kohya / diffusers keep
    # training and model-card fields there). found: `compress` wrote only its own keys and
    # dropped the source file's __metadata__ (here a license field and a training-tool field).
    g = torch.Generator().manual_seed(0)
    src = tmp_path / "ck.safetensors"
    save_file(
        {"l.weight": torch.randn(8, 6, generator=g), "n.weight": torch.randn(6, generator=g)},
        str(src),
        metadata={"license": "apache-2.0", "ss_network_dim": "16", "lowrank.layers": "stale"},
    )
    out = tmp_path / "c.safetensors"
    assert main(["compress", str(src), "--rank", "2", "--out", str(out)]) == 0
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["license"] == "apache-2.0" and meta["ss_network_dim"] == "16" and meta["format"] == "pt"
    layers = json.loads(meta["lowrank.layers"])  # this run's record, not the stale one
    assert list(layers) == ["l"] and layers["l"]["rank"] == 2


# ------------------------------------------------------------------------ distributed (2 gloo ranks)


def _session_mismatch(rank: int, world: int, out_dir: str, results: dict) -> None:
    import lowrank.distributed as ld

    A = torch.randn(9, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for key, call in (
        ("dtype", lambda: ld.rsvd(A[:4].float() if rank == 0 else A[4:], 2, seed=1)),
        ("k", lambda: ld.rsvd(A[:4] if rank == 0 else A[4:], 2 + rank, seed=1)),
        ("oversample", lambda: ld.pca(A[:4] if rank == 0 else A[4:], 2, oversample=3 + rank, seed=1)),
    ):
        try:
            call()
            results[key] = "no error"
        except (TypeError, ValueError) as exc:
            results[key] = str(exc)


def _session_load(rank: int, world: int, out_dir: str, results: dict) -> None:
    from torch import nn

    import lowrank
    import lowrank.distributed as ld

    # rank 1 cannot read the folder (not on its file system, a truncated copy, ...)
    path = os.path.join(out_dir, "adapter" if rank == 0 else "missing")
    fresh = nn.Sequential(nn.Linear(4, 4))
    try:
        ld.load_adapter(fresh, path)
        results["inject"] = "no error"
    except (RuntimeError, OSError, ValueError) as exc:
        results["inject"] = type(exc).__name__
    results["inject_type"] = type(fresh[0]).__name__
    model = nn.Sequential(nn.Linear(4, 4))
    lowrank.inject_lora(model, ["0"], r=2)
    before = {k: v.detach().clone() for k, v in lowrank.lora_state_dict(model).items()}
    try:
        ld.load_adapter(model, path, inject=False)
        results["into"] = "no error"
    except (RuntimeError, OSError, ValueError) as exc:
        results["into"] = type(exc).__name__
    after = lowrank.lora_state_dict(model)
    results["unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
    # every rank can read it: loaded everywhere, equal to the saved factors
    ld.load_adapter(model, os.path.join(out_dir, "adapter"), inject=False)
    results["loaded"] = {k: v.detach().clone() for k, v in lowrank.lora_state_dict(model).items()}


_SESSIONS = {"mismatch": _session_mismatch, "load": _session_load}


def _two_ranks(session: str, tmp_path) -> list[dict]:
    """Run ``_SESSIONS[session]`` on 2 spawned gloo ranks (tests/gloo_harness.py: a hang fails the test)."""
    return run_gloo(_SESSIONS[session], 2, tmp_path)


def test_distributed_mismatch_errors_name_the_argument_and_the_dtypes(tmp_path):
    # replay of pytorch/pytorch#56112 / #156627 (collectives on mismatched inputs across ranks hang or
    # abort). lowrank raises on every rank (no hang); found: the messages said "the dtype differs between
    # ranks ([1, 2])" (internal codes) and "the arguments (k, oversample, n_iter, method, seed) differ",
    # without saying which.
    results = _two_ranks("mismatch", tmp_path)
    for res in results:
        assert "float32" in res["dtype"] and "float64" in res["dtype"], res["dtype"]
        assert res["k"].endswith("differ between ranks: k (pass the same values on every rank)"), res["k"]
        assert "differ between ranks: oversample" in res["oversample"], res["oversample"]


def test_a_header_safetensors_cannot_read_is_never_written(tmp_path):
    # replay of safetensors#668 / #414 ("Error while deserializing header: header too large"): the Rust
    # reader refuses headers over 100,000,000 bytes. found: lowrank.io.write_safetensors wrote such a file
    # (here through a 100 MB metadata value), which safetensors' own loader then refused.
    from safetensors import safe_open

    from lowrank.io import MAX_HEADER_BYTES, entries_from_dict, write_safetensors

    path = tmp_path / "x.safetensors"
    write_safetensors(path, entries_from_dict({"a": torch.arange(3.0)}), {"note": "old"})
    with pytest.raises(ValueError, match="header"):
        write_safetensors(path, entries_from_dict({"a": torch.ones(2)}), {"x": "a" * MAX_HEADER_BYTES})
    with safe_open(str(path), "pt") as f:  # the previous file is intact
        assert f.metadata()["note"] == "old" and torch.equal(f.get_tensor("a"), torch.arange(3.0))
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_extract_budget_counts_the_tied_lm_head_copy(tmp_path):
    # the tied lm_head's factors (added by the fix above) are stored beside the embedding's: a --budget
    # must count them, else the adapter is larger than asked (found with the first version of the fix).
    from lowrank.cli import _parse_size

    _tiny_llama_pair(tmp_path, True)
    out = tmp_path / "ad"
    argv = ["extract", str(tmp_path / "base"), str(tmp_path / "tuned"), "--out", str(out)]
    for budget in ("1500", "2K"):
        assert main([*argv, "--target", "proj|embed", "--budget-params", budget]) == 0
        got = load_file(str(out / "adapter_model.safetensors"))
        assert sum(t.numel() for t in got.values()) <= _parse_size(budget)
        emb = "base_model.model.model.embed_tokens.lora_embedding_A"
        if emb in got:  # the embedding kept a rank: lm_head carries the same factors
            assert torch.equal(got["base_model.model.lm_head.lora_B.weight"], got[emb].T)


def test_distributed_load_that_fails_on_one_rank_changes_no_rank(tmp_path):
    # replay of pytorch/pytorch#77091 / #76395 (synchronise checkpoint load errors across ranks) and
    # Lightning-AI/pytorch-lightning#19932 (state restored inconsistently across ranks). found:
    # lowrank.distributed.load_adapter with rank 1 unable to read the folder raised on both ranks, but
    # rank 0 had already injected / overwritten its adapter, so the ranks' models differed afterwards.
    from torch import nn

    import lowrank

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    lowrank.inject_lora(model, ["0"], r=2)
    with torch.no_grad():
        model[0].lora_B["default"].normal_()
    saved = {k: v.detach().clone() for k, v in lowrank.lora_state_dict(model).items()}
    lowrank.save_adapter(model, tmp_path / "adapter")
    results = _two_ranks("load", tmp_path)
    for res in results:
        assert res["inject"] != "no error" and res["inject_type"] == "Linear"
        assert res["into"] != "no error" and res["unchanged"]
        assert res["loaded"].keys() == saved.keys()
        assert all(torch.equal(res["loaded"][k], saved[k]) for k in saved)


def test_extract_from_a_tied_base_to_an_untied_fine_tune(tmp_path, capsys):
    # replay of arcee-ai/mergekit#496 ("handle optional/tied weights"): BASE ties lm_head to the input
    # embedding (no lm_head.weight stored), the fine-tune untied and trained it. found: every extract
    # stopped with "tensor 'lm_head.weight' is in TUNED but not in BASE (different models?)"; BASE's
    # lm_head is its embedding, and the adapter on the tied BASE must give TUNED's logits.
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    _, _ = _tiny_llama_pair(tmp_path, True)  # BASE tied (only its folder is used)
    base = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "base")).eval()
    cfg = transformers.LlamaConfig(**{**base.config.to_dict(), "tie_word_embeddings": False})
    tuned = transformers.LlamaForCausalLM(cfg).eval()
    state = base.state_dict()
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    tuned.load_state_dict(state)
    g = torch.Generator().manual_seed(2)
    _tune(tuned, g)
    tuned.save_pretrained(tmp_path / "untied")
    out = tmp_path / "ad"
    argv = ["extract", str(tmp_path / "base"), str(tmp_path / "untied"), "--rank", "2", "--out", str(out)]
    assert main([*argv, "--target", r"proj|embed|lm_head"]) == 0
    assert "BASE ties lm_head.weight to model.embed_tokens.weight" in capsys.readouterr().err
    _assert_peft_on_base_gives_tuned_logits(tmp_path / "base", out, tuned)


def test_extract_from_an_untied_base_to_a_tied_fine_tune(tmp_path, capsys):
    # the other direction of mergekit#496: BASE stores its own lm_head, TUNED ties it to its embedding
    # (no lm_head.weight stored). found: the adapter gave lm_head nothing (BASE + adapter kept BASE's
    # lm_head, off from TUNED's logits) -- and the first version of the tied fix gave it the embedding's
    # delta, which is TUNED's lm_head minus BASE's *embedding*, not minus BASE's lm_head.
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    _tiny_llama_pair(tmp_path, False)  # BASE untied (only its folder is used)
    base = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "base")).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # BASE's own lm_head: its embedding plus a rank-1 change (a low-rank delta)
        base.lm_head.weight.copy_(
            base.model.embed_tokens.weight + torch.randn(40, 1, generator=g) @ torch.randn(1, 16, generator=g)
        )
    base.save_pretrained(tmp_path / "base")
    cfg = transformers.LlamaConfig(**{**base.config.to_dict(), "tie_word_embeddings": True})
    tuned = transformers.LlamaForCausalLM(cfg).eval()
    state = {k: v for k, v in base.state_dict().items() if k != "lm_head.weight"}
    tuned.load_state_dict(state, strict=False)
    _tune(tuned, g)
    tuned.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_file(str(tmp_path / "tied" / "model.safetensors"))
    out = tmp_path / "ad"
    # lm_head's delta E_tuned - L_base has rank 3 (the tuning's 2 plus BASE's own rank-1 change)
    argv = ["extract", str(tmp_path / "base"), str(tmp_path / "tied"), "--rank", "3", "--out", str(out)]
    assert main([*argv, "--target", r"proj|embed|lm_head"]) == 0
    assert "TUNED ties lm_head.weight to model.embed_tokens.weight" in capsys.readouterr().err
    _assert_peft_on_base_gives_tuned_logits(tmp_path / "base", out, tuned)


def test_failed_adapter_write_removes_the_folders_it_created(tmp_path, monkeypatch):
    # seen in user test 10: when writing an adapter failed after its folder was created, an empty folder
    # (and its new parents) stayed behind; an existing folder and what it holds must be kept
    import lowrank.lora.checkpoint as ckpt

    def failing(path, write):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "write_temporary", failing)
    tensors = {"base_model.model.x.lora_A.weight": torch.zeros(2, 3)}
    with pytest.raises(OSError, match="No space"):
        ckpt.write_adapter_dir(tmp_path / "new" / "deeper" / "adapter", tensors, {"r": 2})
    assert os.listdir(tmp_path) == []
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(OSError, match="No space"):
        ckpt.write_adapter_dir(tmp_path / "kept" / "adapter", tensors, {"r": 2})
    assert os.listdir(tmp_path / "kept") == ["notes.txt"]
    with pytest.raises(OSError, match="No space"):
        ckpt.write_adapter_dir(tmp_path / "kept", tensors, {"r": 2})
    assert os.listdir(tmp_path / "kept") == ["notes.txt"]


def test_failed_compress_write_removes_the_folders_it_created(tmp_path, monkeypatch, capsys):
    # the same kind in the CLI: compress --out new/deeper/c.safetensors created the folders, then the write
    # failed (disk full) and left them behind
    import lowrank.io

    g = torch.Generator().manual_seed(0)
    save_file({"l.weight": torch.randn(12, 10, generator=g)}, str(tmp_path / "ckpt.safetensors"))

    def failing(path, entries, metadata=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lowrank.io, "write_safetensors", failing)
    out = tmp_path / "new" / "deeper" / "c.safetensors"
    assert main(["compress", str(tmp_path / "ckpt.safetensors"), "--rank", "2", "--out", str(out)]) == 2
    assert "No space" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["ckpt.safetensors"]
