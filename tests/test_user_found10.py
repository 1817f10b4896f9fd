"""Faults found by user-test10 (replays of mergekit / safetensors / torch.distributed reports): each test
asserts what a user should get, against an independent reference (PEFT on transformers, safetensors' own
loader, float64 SVD, the single-process result)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowrank.cli import main


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
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.ndim == 2:  # a rank-2 update of every matrix, the tied embedding included
                p.add_(
                    0.1 * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g)
                )
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    return transformers, tuned


@pytest.mark.parametrize("tied", [True, False])
def test_extract_with_tied_embeddings_reproduces_the_tuned_logits(tmp_path, tied, capsys):
    # replay of arcee-ai/mergekit#447 / #483 (extract_lora and tied embeddings): with
    # tie_word_embeddings the checkpoint stores only model.embed_tokens.weight, which is also lm_head's
    # weight. found: the adapter targeted model.embed_tokens alone; PEFT adapts modules, so lm_head kept the
    # BASE matrix and the logits of BASE + adapter were off by 2.9 (max abs) from TUNED.
    peft = pytest.importorskip("peft")
    transformers, tuned = _tiny_llama_pair(tmp_path, tied)
    keys = load_file(str(tmp_path / "tuned" / "model.safetensors")).keys()
    assert ("lm_head.weight" in keys) != tied
    out = tmp_path / "ad"
    argv = ["extract", str(tmp_path / "base"), str(tmp_path / "tuned"), "--rank", "2", "--out", str(out)]
    assert main([*argv, "--target", r"proj|embed|lm_head"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert "lm_head" in config["target_modules"] and "model.embed_tokens" in config["target_modules"]
    if tied:
        assert "tie_word_embeddings" in capsys.readouterr().err
    model = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "base")), str(out)
    ).eval()
    x = torch.arange(2, 12).reshape(1, 10)
    with torch.no_grad():
        want, got = tuned(x).logits.double(), model(x).logits.double()
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())


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
