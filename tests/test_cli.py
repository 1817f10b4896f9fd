"""The ``lowrank`` command line on a real pair of checkpoints: a tiny Llama and the same briefly fine-tuned.

References are float64 NumPy SVDs of the weight deltas and PEFT loading the written adapters.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import tiny_llama_config
from safetensors.torch import load_file, save_file

import lowrank
from lowrank.cli import main

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model():
    return transformers.LlamaForCausalLM(tiny_llama_config())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """BASE: one safetensors file. TUNED: the model after 8 AdamW steps, saved as 4 shards + index."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = tiny_model()
    model.save_pretrained(root / "base")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(8):
        ids = torch.randint(0, 128, (8, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(root / "tuned", max_shard_size="100KB")
    assert len(list((root / "tuned").glob("*.safetensors"))) > 1
    tuned_state = {k: v.clone() for k, v in model.state_dict().items()}
    return root, base_state, tuned_state


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "lowrank", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def delta64(base_state, tuned_state, name):
    return tuned_state[name].double().numpy() - base_state[name].double().numpy()


def printed(stdout, module):
    """rank, energy (fraction) and relative error printed for a module."""
    line = next(line for line in stdout.splitlines() if line.split()[:1] == [module])
    match = re.search(r"rank\s+(\d+)\s+energy\s+([\d.]+)%\s+rel\.err\s+([\d.e+-]+)", line)
    return int(match[1]), float(match[2]) / 100, float(match[3])


def adapter_factors(path):
    tensors = load_file(path / "adapter_model.safetensors")
    out = {}
    for key, value in tensors.items():
        m = re.match(r"base_model\.model\.(.+)\.(lora_A\.weight|lora_embedding_A)$", key)
        if m:
            b_key = key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
            B, A = tensors[b_key].double().numpy(), value.double().numpy()
            out[m[1]] = B @ A if m[2] == "lora_A.weight" else (B @ A).T  # embedding update is (B A)^T
    return out


def merged_logits(base_state, updates, ids):
    model = tiny_model().eval()
    state = dict(base_state)
    for module, update in updates.items():
        state[module + ".weight"] = base_state[module + ".weight"] + torch.from_numpy(update).float()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_extract_fixed_rank_matches_truncated_svd_and_loads_in_peft(checkpoints, tmp_path):
    root, base_state, tuned_state = checkpoints
    out = tmp_path / "adapter"
    result = run_cli(
        "extract", root / "base", root / "tuned", "--rank", 4, "--target", "q_proj|v_proj|embed_tokens",
        "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    updates = adapter_factors(out)
    assert sorted(updates) == sorted(
        ["model.embed_tokens"]
        + [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    )
    for module, update in updates.items():
        delta = delta64(base_state, tuned_state, module + ".weight")
        s = np.linalg.svd(delta, compute_uv=False)
        best = np.sqrt(np.sum(s[4:] ** 2))  # Eckart–Young: the optimal rank-4 error
        error = np.linalg.norm(delta - update)
        assert best * (1 - 1e-6) <= error <= best * 1.01
        rank, energy, rel_err = printed(result.stdout, module)
        total = np.sum(s**2)
        assert rank == 4
        assert energy == pytest.approx(1 - error**2 / total, abs=2e-5)
        assert rel_err == pytest.approx(error / np.sqrt(total), rel=1e-3)

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4 and not config["rank_pattern"]
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    expected = merged_logits(base_state, updates, ids)
    base = tiny_model().eval()
    base.load_state_dict(base_state)
    peft_model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    ours = tiny_model().eval()
    ours.load_state_dict(base_state)
    lowrank.load_adapter(ours, out)
    with torch.no_grad():
        for model in (peft_model, ours):
            got = model(input_ids=ids).logits
            assert float((got - expected).norm() / expected.norm()) < 1e-5


def test_extract_rank_auto_meets_tolerance_with_minimal_ranks(checkpoints, tmp_path):
    root, base_state, tuned_state = checkpoints
    out, tol = tmp_path / "auto", 0.5
    result = run_cli("extract", root / "base", root / "tuned", "--rank", "auto", "--tol", tol, "--out", out)
    assert result.returncode == 0, result.stderr
    updates = adapter_factors(out)
    two_d = {k[: -len(".weight")] for k, v in tuned_state.items() if v.dim() == 2 and "embed" not in k}
    assert set(updates) == two_d  # default: every 2-D weight but the embedding
    config = json.loads((out / "adapter_config.json").read_text())
    ranks = set()
    for module, update in updates.items():
        delta = delta64(base_state, tuned_state, module + ".weight")
        s = np.linalg.svd(delta, compute_uv=False)
        # tails[k]: the optimal relative error at rank k (Eckart–Young)
        tails = np.sqrt(np.cumsum((s**2)[::-1])[::-1] / np.sum(s**2))
        minimal = int(np.argmax(np.append(tails, 0.0) <= tol))
        rank = printed(result.stdout, module)[0]
        ranks.add(rank)
        assert np.linalg.norm(delta - update) / np.linalg.norm(delta) <= tol * (1 + 1e-4)
        assert minimal <= rank <= minimal + 2
        assert config["rank_pattern"].get(module, config["r"]) == rank
    assert len(ranks) > 1  # per-layer ranks really differ, so rank_pattern is exercised
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    expected = merged_logits(base_state, updates, ids)
    ours, theirs = tiny_model().eval(), tiny_model().eval()
    ours.load_state_dict(base_state)
    theirs.load_state_dict(base_state)
    lowrank.load_adapter(ours, out)  # strict: ranks agree with r / rank_pattern
    theirs = peft.PeftModel.from_pretrained(theirs, str(out)).eval()  # PEFT reads the per-layer ranks
    with torch.no_grad():
        for model in (ours, theirs):
            got = model(input_ids=ids).logits
            assert float((got - expected).norm() / expected.norm()) < 1e-5

    info = run_cli("info", out)
    assert info.returncode == 0, info.stderr
    for module in updates:
        line = next(line for line in info.stdout.splitlines() if line.startswith(module + " "))
        assert line.split()[1:5] == [
            "linear",
            *map(str, updates[module].shape[::-1]),
            str(printed(result.stdout, module)[0]),
        ]
    params = sum(t.numel() for t in load_file(out / "adapter_model.safetensors").values())
    assert f"{params:,} params" in info.stdout and f"{len(updates)}" in info.stdout


def test_compress_factors_matching_weights_and_copies_the_rest(checkpoints, tmp_path):
    root, _, tuned_state = checkpoints
    out = tmp_path / "compressed.safetensors"
    result = run_cli("compress", root / "tuned", "--rank", 8, "--target", "mlp", "--out", out)
    assert result.returncode == 0, result.stderr
    written = load_file(out)
    factored = [k for k in tuned_state if ".mlp." in k]
    assert len(factored) == 6
    for name, weight in tuned_state.items():
        if name not in factored:
            assert torch.equal(written[name], weight)
            continue
        B, A = written[name + ".B"].double().numpy(), written[name + ".A"].double().numpy()
        assert B.shape == (weight.shape[0], 8) and A.shape == (8, weight.shape[1])
        W = weight.double().numpy()
        s = np.linalg.svd(W, compute_uv=False)
        error = np.linalg.norm(W - B @ A)
        assert np.sqrt(np.sum(s[8:] ** 2)) * (1 - 1e-6) <= error <= np.sqrt(np.sum(s[8:] ** 2)) * 1.01
        line = next(line for line in result.stdout.splitlines() if line.startswith(name + " "))
        assert float(line.split("rel.err")[1]) == pytest.approx(error / np.linalg.norm(W), rel=1e-3)
        assert "rank    8" in line
    assert set(written) == {k for k in tuned_state if k not in factored} | {
        k + s for k in factored for s in (".A", ".B")
    }


def test_user_mistake_is_one_line_without_traceback(checkpoints, tmp_path):
    root, _, _ = checkpoints
    result = run_cli("extract", tmp_path / "missing", root / "tuned", "--rank", 4, "--out", tmp_path / "x")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "missing" in result.stderr and "no such file" in result.stderr
    assert not (tmp_path / "x").exists()


def test_user_mistakes_in_process(checkpoints, tmp_path, capsys):
    root, base_state, tuned_state = checkpoints
    bad = tmp_path / "bad.safetensors"
    save_file({**tuned_state, "model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 65)}, bad)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes((root / "base" / "model.safetensors").read_bytes()[:100])
    base = root / "base"
    cases = [
        (["extract", base, bad, "--rank", "4", "--out", tmp_path / "o"], "mismatched shapes"),
        (["extract", base, root / "tuned", "--rank", "4", "--target", "norm", "--out", tmp_path / "o"],
         "2-D"),
        (["extract", base, root / "tuned", "--rank", "4", "--target", "nothing", "--out", tmp_path / "o"],
         "no 2-D weight tensors match"),
        (["extract", base, root / "tuned", "--rank", "auto", "--out", tmp_path / "o"], "--tol"),
        (["extract", base, root / "tuned", "--rank", "4", "--target", "(", "--out", tmp_path / "o"],
         "regular"),
        (["extract", base, root / "tuned", "--rank", "0", "--out", tmp_path / "o"], "positive integer"),
        (["compress", corrupt, "--rank", "4", "--out", tmp_path / "o"], "not a readable safetensors"),
        (["compress", base, "--out", tmp_path / "o"], "exactly one of --rank"),
        (["compress", base, "--tol", "1.5", "--out", tmp_path / "o"], "(0, 1)"),
        (["compress", base / "model.safetensors", "--rank", "2", "--out", base / "model.safetensors"],
         "is the input"),
        (["info", base], "not a PEFT adapter directory"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lowrank: error: ") and err.count("\n") == 1 and message in err, (argv, err)
    assert not (tmp_path / "o").exists()
    assert load_file(base / "model.safetensors").keys() == base_state.keys()


def info_table(stdout):
    """``lowrank info``'s achieved-error rows: module -> (rank, rel.err), in printed order."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("achieved error"))
    rows = {}
    for line in lines[start + 1 :]:
        parts = line.split()
        if parts and parts[0] != "total":
            rows[parts[0]] = (int(parts[2]), float(parts[3]))
    return rows


def in_process(capsys, *args):
    """``lowrank ARGS`` through ``main`` in this process: (exit status, stdout)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().out


def test_extract_with_a_budget_allocates_ranks_and_records_achieved_errors(checkpoints, tmp_path, capsys):
    root, base_state, tuned_state = checkpoints
    out, budget = tmp_path / "budget", 24 * 1024
    assert (
        in_process(capsys, "extract", root / "base", root / "tuned", "--budget", "24KiB", "--out", out)[0]
        == 0
    )
    tensors = load_file(out / "adapter_model.safetensors")
    assert sum(t.numel() * t.element_size() for t in tensors.values()) <= budget
    updates = adapter_factors(out)
    # The allocation against float64 spectra: its total error is (near) the optimum for this budget, and
    # no worse than the best uniform rank that fits.
    spectra, costs, norms = [], [], []
    modules = sorted({k[: -len(".weight")] for k in tuned_state if k.endswith(".weight")})
    modules = [m for m in modules if tuned_state[m + ".weight"].dim() == 2 and "embed" not in m]
    for module in modules:
        delta = delta64(base_state, tuned_state, module + ".weight")
        spectra.append(np.linalg.svd(delta, compute_uv=False))
        costs.append(sum(delta.shape) * 4)
        norms.append(np.sum(spectra[-1] ** 2))
    optimum = lowrank.allocate_ranks(spectra, budget, costs)
    total = sum(norms)
    achieved = sum(
        np.linalg.norm(delta64(base_state, tuned_state, m + ".weight") - updates.get(m, 0.0)) ** 2
        for m in modules
    )
    assert achieved <= (total - optimum.captured) * 1.01
    uniform = max(k for k in range(1, 64) if k * sum(costs) <= budget)
    uniform_error = sum(float(np.sum(s[uniform:] ** 2)) for s in spectra)
    assert achieved <= uniform_error * 1.001
    # lowrank info prints each layer's rank and achieved error, matching a float64 recompute, worst first
    code, stdout = in_process(capsys, "info", out)
    assert code == 0
    rows = info_table(stdout)
    assert list(rows) == sorted(rows, key=lambda m: -rows[m][1])
    assert set(rows) == set(updates)
    for module, (rank, rel_err) in rows.items():
        delta = delta64(base_state, tuned_state, module + ".weight")
        assert rank == np.linalg.matrix_rank(updates[module], tol=1e-6 * np.abs(updates[module]).max())
        assert rel_err == pytest.approx(
            np.linalg.norm(delta - updates[module]) / np.linalg.norm(delta), rel=2e-3, abs=2e-4
        )


def test_every_cli_file_records_ranks_and_errors(checkpoints, tmp_path, capsys):
    root, base_state, tuned_state = checkpoints
    out = tmp_path / "fixed"
    assert in_process(capsys, "extract", root / "base", root / "tuned", "--rank", 3, "--out", out)[0] == 0
    rows = info_table(in_process(capsys, "info", out)[1])
    assert rows and all(rank == 3 for rank, _ in rows.values())
    target = tmp_path / "compressed.safetensors"
    argv = ("compress", root / "tuned", "--budget-params", "20k", "--target", "mlp", "--out", target)
    assert in_process(capsys, *argv)[0] == 0
    written = load_file(target)
    factored = {k[: -len(".weight.B")] for k in written if k.endswith(".weight.B")}
    assert (
        factored
        and sum(written[f"{m}.weight.B"].numel() + written[f"{m}.weight.A"].numel() for m in factored)
        <= 20_000
    )
    rows = info_table(in_process(capsys, "info", target)[1])
    assert set(rows) == factored
    for module, (rank, rel_err) in rows.items():
        W = tuned_state[module + ".weight"].double()
        approx = written[f"{module}.weight.B"].double() @ written[f"{module}.weight.A"].double()
        assert rank == written[f"{module}.weight.B"].shape[1] >= 1
        assert rel_err == pytest.approx(float((W - approx).norm() / W.norm()), rel=2e-3, abs=2e-4)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--budget", "40XB"], "expected a size such as 40MiB"),
        (["--budget", "-5"], "expected a size"),
        (["--budget", "0.1"], "expected a positive size"),
        (["--budget", "1MiB", "--budget-params", "10"], "not both"),
        (["--budget", "1MiB", "--rank", "4"], "pass one of"),
        (["--budget", "16"], "the budget leaves no layer a rank"),
    ],
)
def test_budget_mistakes_are_one_line_errors(checkpoints, tmp_path, capsys, argv, message):
    root, _, _ = checkpoints
    code = main(["extract", str(root / "base"), str(root / "tuned"), *argv, "--out", str(tmp_path / "x")])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------
# Small synthetic checkpoints (fast): issue 15 §4 and §5 on the command line
# ----------------------------------------------------------------------------------------------------


@pytest.fixture()
def small(tmp_path):
    """BASE and TUNED = BASE + a rank-2 delta on every 2-D weight; 1-D norms and an int buffer unchanged."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"attn.q_proj.weight": (12, 10), "attn.k_proj.weight": (6, 10), "mlp.up.weight": (16, 10)}
    base = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    base["attn.norm.weight"] = torch.ones(10)
    base["attn.ids"] = torch.arange(4)
    tuned = dict(base)
    for name, (m, n) in shapes.items():
        tuned[name] = base[name] + torch.randn(m, 2, generator=gen) @ torch.randn(2, n, generator=gen)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    return tmp_path, base, tuned


def _extract(root, *extra):
    return ["extract", str(root / "base.safetensors"), str(root / "tuned.safetensors"), *map(str, extra)]


def test_target_skips_tensors_that_cannot_be_factored_and_counts_them(small, capsys):
    root, base, tuned = small
    assert main(_extract(root, "--rank", 2, "--target", "attn", "--out", root / "o")) == 0
    err = capsys.readouterr().err
    assert "skipped 1 tensor(s) matching --target" in err and "attn.norm.weight" in err
    factors = adapter_factors(root / "o")
    assert set(factors) == {"attn.q_proj", "attn.k_proj"}
    for module, update in factors.items():  # the rank-2 delta is recovered exactly (float64 reference)
        np.testing.assert_allclose(update, delta64(base, tuned, module + ".weight"), atol=1e-4)


def test_rank_above_a_layer_is_said_per_layer(small, capsys):
    root, base, tuned = small
    assert main(_extract(root, "--rank", 8, "--out", root / "o")) == 0  # k_proj is 6 x 10
    err = capsys.readouterr().err
    assert "attn.k_proj: --rank 8 is not below min(6, 10) = 6" in err
    assert "q_proj: --rank" not in err and "mlp.up: --rank" not in err
    assert load_file(root / "o" / "adapter_model.safetensors")[
        "base_model.model.attn.k_proj.lora_A.weight"
    ].shape == (
        6,
        10,
    )

    assert main(_extract(root, "--rank", 10, "--out", root / "o2")) == 2  # no layer below full rank
    err = capsys.readouterr().err
    assert err.count("kept at full rank") == 3 and "nothing was factored" in err
    assert not (root / "o2").exists()

    compress = ["compress", str(root / "tuned.safetensors"), "--out", str(root / "c")]
    assert main([*compress, "--rank", "20"]) == 2
    err = capsys.readouterr().err
    assert err.count("kept dense: --rank 20 is not below min(") == 3 and "no layer was factored" in err
    assert not (root / "c").exists()
    assert main([*compress, "--rank", "4"]) == 0  # q_proj, up: factored; k_proj 4 (6 + 10) > 60: dense
    err = capsys.readouterr().err
    assert "attn.k_proj.weight: kept dense: rank 4 factors would take 64 numbers, the dense weight 60" in err
    written = load_file(root / "c" / "model.safetensors")
    assert {"attn.q_proj.weight.A", "mlp.up.weight.B", "attn.k_proj.weight"} <= set(written)


@pytest.mark.parametrize("which", ["base", "tuned"])
def test_nan_error_names_the_tensor_and_checkpoint(small, which, capsys):
    root, base, tuned = small
    state = dict(base if which == "base" else tuned)
    state["mlp.up.weight"] = state["mlp.up.weight"].clone()
    state["mlp.up.weight"][1, 2] = float("nan")
    save_file(state, root / f"{which}.safetensors")
    assert main(_extract(root, "--rank", 2, "--out", root / "o")) == 2
    err = capsys.readouterr().err
    assert f"{which.upper()} tensor 'mlp.up.weight' holds 1 NaN" in err and err.count("\n") == 1
    if which == "tuned":
        assert (
            main(["compress", str(root / "tuned.safetensors"), "--rank", "2", "--out", str(root / "c")]) == 2
        )
        assert "CKPT tensor 'mlp.up.weight' holds 1 NaN" in capsys.readouterr().err
    assert not (root / "o").exists() and not (root / "c").exists()


def _adapter_dir(root, config, tensors):
    path = root / "adapter"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, path / "adapter_model.safetensors")
    return path


def _fields(stdout):
    """``lowrank info``'s header lines: field -> first value."""
    return {words[0]: words[1] for words in map(str.split, stdout.splitlines()) if len(words) >= 2}


def test_info_shows_bias_dora_and_init(small, capsys):
    # the config fields that change what loading the adapter does: PEFT's bias mode, DoRA, a residual init
    root, _, _ = small
    tensors = {
        "base_model.model.attn.q_proj.lora_A.weight": torch.zeros(2, 10),
        "base_model.model.attn.q_proj.lora_B.weight": torch.zeros(12, 2),
    }
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
    path = _adapter_dir(root, config, tensors)
    shown = _fields(in_process(capsys, "info", path)[1])
    assert (shown["bias"], shown["use_dora"]) == ("none", "False") and "init_lora_weights" not in shown
    config.update(bias="lora_only", use_dora=True, init_lora_weights="pissa")
    (path / "adapter_config.json").write_text(json.dumps(config))
    shown = _fields(in_process(capsys, "info", path)[1])
    assert (shown["bias"], shown["use_dora"], shown["init_lora_weights"]) == ("lora_only", "True", "pissa")


def test_info_never_prints_a_traceback(small, capsys):
    root, _, _ = small
    empty = {
        "base_model.model.attn.q_proj.lora_A.weight": torch.zeros(0, 10),
        "base_model.model.attn.q_proj.lora_B.weight": torch.zeros(12, 0),
    }
    path = _adapter_dir(root, {"peft_type": "LORA", "r": 8, "lora_alpha": 16}, empty)
    assert main(["info", str(path)]) == 0  # was a ZeroDivisionError
    assert "empty adapter: rank 0" in capsys.readouterr().out
    for field, value in [
        ("use_rslora", "no"),
        ("alpha_pattern", {"(": 2}),
        ("lora_alpha", "16"),
        ("r", None),
    ]:
        config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, field: value}
        (path / "adapter_config.json").write_text(json.dumps(config))
        code = main(["info", str(path)])
        captured = capsys.readouterr()
        if value is None:  # r: null is PEFT's default
            assert code == 0
            continue
        assert code == 2 and field in captured.err and captured.err.count("\n") == 1, captured.err


def test_cli_without_tqdm_prints_plain_lines(small, capsys, monkeypatch):
    root, _, _ = small
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now raises ImportError
    assert main(_extract(root, "--rank", 2, "--out", root / "o")) == 0
    out = capsys.readouterr().out
    assert re.search(r"^attn\.q_proj\s+12x10\s+rank\s+2", out, re.M) and "wrote" in out


def test_internal_error_is_one_line(small, capsys, monkeypatch):
    root, _, _ = small

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("lowrank.cli._factor", broken)
    assert main(_extract(root, "--rank", 2, "--out", root / "o")) == 1
    err = capsys.readouterr().err
    assert err.startswith("lowrank: internal error: ZeroDivisionError") and err.count("\n") == 1


BAD_ARGV = {
    "no command": ([], "required"),
    "unknown command": (["squash"], "invalid choice"),
    "extract without --out": (["extract", "{base}", "{tuned}", "--rank", "2"], "--out"),
    "rank not a number": (
        ["extract", "{base}", "{tuned}", "--rank", "two", "--out", "{o}"],
        "positive integer",
    ),
    "rank negative": (["extract", "{base}", "{tuned}", "--rank", "-1", "--out", "{o}"], "positive integer"),
    "tol out of range": (
        ["extract", "{base}", "{tuned}", "--rank", "auto", "--tol", "0", "--out", "{o}"],
        "(0, 1)",
    ),
    "tol with fixed rank": (
        ["extract", "{base}", "{tuned}", "--rank", "2", "--tol", "0.1", "--out", "{o}"],
        "--tol",
    ),
    "missing BASE": (["extract", "{o}", "{tuned}", "--rank", "2", "--out", "{o}"], "no such file"),
    "target regex invalid": (
        ["extract", "{base}", "{tuned}", "--rank", "2", "--target", "[", "--out", "{o}"],
        "regular",
    ),
    "target matches only 1-D": (
        ["extract", "{base}", "{tuned}", "--rank", "2", "--target", "norm", "--out", "{o}"],
        "not 2-D float weights",
    ),
    "compress rank auto": (
        ["compress", "{base}", "--rank", "auto", "--out", "{o}"],
        "--rank takes an integer",
    ),
    "compress onto itself": (["compress", "{base}", "--rank", "2", "--out", "{base}"], "is the input"),
    "info on a file that is not safetensors": (["info", "{text}"], "is a file"),
    "info on a missing folder": (["info", "{o}"], "no such directory"),
}


@pytest.mark.parametrize("case", list(BAD_ARGV))
def test_main_bad_input(case, small, capsys):
    root, _, _ = small
    argv, message = BAD_ARGV[case]
    paths = {"base": root / "base.safetensors", "tuned": root / "tuned.safetensors", "o": root / "o"}
    paths["text"] = root / "notes.txt"
    paths["text"].write_text("not a checkpoint\n")
    assert main([a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowrank: error: ") and err.count("\n") == 1 and message in err, err
    assert not (root / "o").exists()


def test_budget_errors_have_no_cancellation_near_zero(checkpoints, tmp_path, capsys):
    # A budget large enough for every layer at full rank: the recorded errors are ~0 (rounding), not the
    # ~3e-4 noise of ||D||^2 - sum S^2.
    root, base_state, tuned_state = checkpoints
    out = tmp_path / "full"
    assert (
        in_process(capsys, "extract", root / "base", root / "tuned", "--budget", "64MiB", "--out", out)[0]
        == 0
    )
    rows = info_table(in_process(capsys, "info", out)[1])
    updates = adapter_factors(out)
    assert rows
    for module, (_, rel_err) in rows.items():
        delta = delta64(base_state, tuned_state, module + ".weight")
        true = np.linalg.norm(delta - updates[module]) / np.linalg.norm(delta)
        assert rel_err < 1e-5 and true < 1e-5


def test_same_shape_layers_factored_in_batches_match_per_layer_optimum(tmp_path, capsys, monkeypatch):
    """Eleven same-shape layers (three batches of at most four), one unchanged in the middle, a bf16 group
    of another shape and an infinite delta: each adapter equals the layer's own Eckart-Young truncation."""
    import lowrank.cli as cli

    monkeypatch.setattr(cli, "GROUP_LAYERS", 4)
    g = torch.Generator().manual_seed(3)
    base, tuned = {}, {}
    for i in range(11):
        w = torch.randn(20, 14, generator=g)
        rank = 1 + i % 4
        delta = torch.randn(20, rank, generator=g) @ torch.randn(rank, 14, generator=g) * (i + 1)
        base[f"h.{i}.w.weight"], tuned[f"h.{i}.w.weight"] = w, w + (0 if i == 5 else 1) * delta
    for i in range(3):
        w = torch.randn(9, 30, generator=g).bfloat16()
        base[f"h.{i}.b.weight"], tuned[f"h.{i}.b.weight"] = (
            w,
            (w.float() + torch.randn(9, 30, generator=g)).bfloat16(),
        )
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    args = ["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), "--rank", "3"]
    assert main([*args, "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "h.5.w" in out and "unchanged, skipped" in out
    factors = load_file(tmp_path / "o" / "adapter_model.safetensors")
    for name in base:
        module = name[: -len(".weight")]
        delta = tuned[name].double() - base[name].double()
        if module == "h.5.w":
            assert f"base_model.model.{module}.lora_A.weight" not in factors
            continue
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        best = (U[:, :3] * S[:3]) @ Vh[:3]
        B = factors[f"base_model.model.{module}.lora_B.weight"].double()
        A = factors[f"base_model.model.{module}.lora_A.weight"].double()
        assert factors[f"base_model.model.{module}.lora_B.weight"].dtype == base[name].dtype
        rounding = 1e-2 if base[name].dtype == torch.bfloat16 else 1e-5
        assert float((B @ A - best).norm() / delta.norm()) < rounding, module
        optimum = float(S[3:].pow(2).sum().sqrt() / S.pow(2).sum().sqrt())
        assert printed(out, module)[2] == pytest.approx(optimum, rel=0.02, abs=1e-5), module

    tuned["h.6.w.weight"] = base["h.6.w.weight"] * 0 + float("inf")
    save_file(tuned, tmp_path / "tuned.safetensors")
    assert main([*args, "--out", str(tmp_path / "o2")]) == 2
    assert "TUNED tensor 'h.6.w.weight' holds 280 NaN or infinite" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_extract_names_changed_tensors_the_adapter_cannot_carry(tmp_path, capsys):
    """A changed bias, norm and unselected embedding are listed (with their relative change); unchanged
    ones are not; the energy line says it covers the selected layers only."""
    g = torch.Generator().manual_seed(5)
    base = {
        "embed_tokens.weight": torch.randn(30, 8, generator=g),
        "layer.proj.weight": torch.randn(12, 8, generator=g),
        "layer.proj.bias": torch.randn(12, generator=g),
        "layer.norm.weight": torch.ones(8),
        "layer.other.weight": torch.randn(6, 8, generator=g),
    }
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["layer.proj.weight"] += torch.randn(12, 1, generator=g) @ torch.randn(1, 8, generator=g)
    tuned["layer.proj.bias"] += 0.5
    tuned["layer.norm.weight"] *= 2
    tuned["embed_tokens.weight"][3] += 1.0
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    args = ["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), "--rank", "1"]
    assert main([*args, "--out", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    assert "of the selected layers' delta" in captured.out
    note = next(line for line in captured.err.splitlines() if "changed tensor(s)" in line)
    assert note.startswith("lowrank: note: 3 changed tensor(s)")
    bias_change = float((0.5 * torch.ones(12)).norm() / base["layer.proj.bias"].norm())
    assert f"layer.proj.bias (rel. change {bias_change:.2e})" in note
    assert "layer.norm.weight (rel. change 1.00e+00)" in note and "embed_tokens.weight" in note
    assert "layer.other.weight" not in note and "layer.proj.weight" not in note

    assert main([*args, "--target", "proj|norm|embed", "--out", str(tmp_path / "o2")]) == 0
    note = next(line for line in capsys.readouterr().err.splitlines() if "changed tensor(s)" in line)
    assert note.startswith("lowrank: note: 2 changed tensor(s)")  # the embedding is in the adapter now
    assert "layer.proj.bias" in note and "layer.norm.weight" in note and "embed_tokens" not in note


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_compress_records_the_error_of_fp32_weights_at_any_scale(tmp_path, capsys, scale):
    # The recorded error's norms were fp32 sums of squares: NaN at 1e30 (overflow), 0 at 1e-30 (underflow)
    # for a truncation that is 30-40% off. Reference: the float64 error of the written factors.
    W = torch.randn(16, 12, generator=torch.Generator().manual_seed(0)) * scale
    save_file({"layer.weight": W}, str(tmp_path / "w.safetensors"))
    target = tmp_path / "c.safetensors"
    assert in_process(capsys, "compress", tmp_path / "w.safetensors", "--rank", 3, "--out", target)[0] == 0
    written = load_file(target)
    approx = written["layer.weight.B"].double() @ written["layer.weight.A"].double()
    expected = float((W.double() - approx).norm() / W.double().norm())
    assert 0.1 < expected < 1
    rows = info_table(in_process(capsys, "info", target)[1])
    assert rows["layer"][1] == pytest.approx(expected, rel=1e-3)
