"""Adapter checkpoints: PEFT round trips both ways, integrity checks, atomic writes, adapter_size."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from helpers import tiny_llama_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lowrank
from lowrank import io as lowrank_io
from lowrank.lora import checkpoint, peft_format
from lowrank.lora.layers import LoRALayer
from lowrank.lora.model import lora_layers
from lowrank.lora.peft_format import CONFIG_NAME, WEIGHTS_NAME

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
    return tiny_llama_config()


@pytest.fixture(scope="module")
def base_state():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config())
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def fresh_base(state):
    model = transformers.LlamaForCausalLM(tiny_config()).eval()
    model.load_state_dict(state)
    return model


def randomize_lora(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def relative(a, b):
    return float((a - b).norm() / b.norm())


def lowrank_adapted(state):
    """Base model with lowrank adapters of mixed ranks/alphas, embeddings included, random factors."""
    model = fresh_base(state)
    lowrank.inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    lowrank.inject_lora(model, [r"model\.layers\.1\.mlp\.down_proj"], r=2, alpha=3)
    lowrank.inject_lora(model, ["embed_tokens"], r=3, alpha=5)
    randomize_lora(model, seed=2)
    return model.eval()


@pytest.fixture(scope="module")
def lowrank_dir(tmp_path_factory, base_state):
    path = tmp_path_factory.mktemp("lowrank_adapter")
    lowrank.save_adapter(lowrank_adapted(base_state), path)
    return path


def test_lowrank_saved_adapter_gives_same_outputs_in_peft(base_state, input_ids, lowrank_dir):
    model = lowrank_adapted(base_state)
    expected = logits(model, input_ids)
    assert relative(expected, logits(fresh_base(base_state), input_ids)) > 1e-2  # the adapter matters

    config = json.loads((lowrank_dir / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["rank_pattern"] == {"model.layers.1.mlp.down_proj": 2, "model.embed_tokens": 3}
    assert config["alpha_pattern"] == {"model.layers.1.mlp.down_proj": 3, "model.embed_tokens": 5}
    keys = set(load_file(lowrank_dir / WEIGHTS_NAME))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.embed_tokens.lora_embedding_B" in keys

    peft_model = peft.PeftModel.from_pretrained(fresh_base(base_state), str(lowrank_dir)).eval()
    assert relative(logits(peft_model, input_ids), expected) <= 1e-6
    # PEFT built exactly the layers and ranks lowrank saved
    peft_state = peft.get_peft_model_state_dict(peft_model)
    saved = load_file(lowrank_dir / WEIGHTS_NAME)
    assert set(peft_state) == set(saved)
    for key, tensor in saved.items():
        torch.testing.assert_close(peft_state[key], tensor, rtol=0, atol=0)


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory, base_state, input_ids):
    """A PEFT-saved adapter (rank/alpha patterns, rsLoRA, embeddings) and PEFT's outputs with it."""
    model = fresh_base(base_state)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        rank_pattern={"layers.1.self_attn.q_proj": 2},
        alpha_pattern={"v_proj": 3},
        use_rslora=True,
        init_lora_weights=False,
    )
    peft_model = peft.get_peft_model(model, config)
    randomize_lora(peft_model, seed=3)
    peft_model.eval()
    path = tmp_path_factory.mktemp("peft_adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(path))
    return path, logits(peft_model, input_ids), peft.get_peft_model_state_dict(peft_model)


def test_peft_saved_adapter_gives_peft_outputs_in_lowrank(base_state, input_ids, peft_dir, tmp_path):
    path, expected, peft_state = peft_dir
    model = lowrank.load_adapter(fresh_base(base_state), path)
    assert relative(logits(model, input_ids), expected) <= 1e-6
    q1 = model.get_submodule("model.layers.1.self_attn.q_proj")
    v0 = model.get_submodule("model.layers.0.self_attn.v_proj")
    assert q1.r["default"] == 2 and v0.r["default"] == 4 and v0.lora_alpha["default"] == 3
    assert v0.scaling["default"] == pytest.approx(3 / 2)  # rsLoRA: alpha / sqrt(r)

    # adapter_size: the LoRA factors against every other parameter
    size = lowrank.adapter_size(model)
    lora_numel = sum(v.numel() for k, v in peft_state.items() if "lora_" in k)
    base_numel = sum(v.numel() for v in base_state.values())
    assert (size.adapter_params, size.base_params) == (lora_numel, base_numel)
    assert size.adapter_bytes == 4 * lora_numel and size.ratio == pytest.approx(lora_numel / base_numel)

    # re-saved by lowrank: unknown PEFT fields kept, PEFT still loads it to the same outputs
    lowrank.save_adapter(model, tmp_path)
    original = json.loads((path / CONFIG_NAME).read_text())
    resaved = json.loads((tmp_path / CONFIG_NAME).read_text())
    for field in ("peft_version", "auto_mapping", "megatron_core", "use_rslora"):
        assert resaved[field] == original[field]
    again = peft.PeftModel.from_pretrained(fresh_base(base_state), str(tmp_path)).eval()
    assert relative(logits(again, input_ids), expected) <= 1e-6


def test_load_into_existing_adapter_and_second_name(base_state, input_ids, lowrank_dir, tmp_path):
    expected = logits(lowrank_adapted(base_state), input_ids)
    model = lowrank_adapted(base_state)
    randomize_lora(model, seed=99)
    lowrank.load_adapter(model, lowrank_dir, inject=False)  # overwrite the existing adapter's weights
    assert relative(logits(model, input_ids), expected) <= 1e-6

    other = fresh_base(base_state)
    lowrank.inject_lora(other, ["q_proj"], r=4)
    lowrank.load_adapter(other, lowrank_dir, adapter_name="second")
    assert other.get_submodule("model.layers.0.self_attn.q_proj").active_adapter == "default"
    switched = [m for m in other.modules() if "second" in getattr(m, "r", {})]
    assert len(switched) == 6  # 4 attention projections, 1 down_proj, the embedding
    for m in switched:
        m.set_adapter("second")
    assert relative(logits(other, input_ids), expected) <= 1e-6

    with pytest.raises(ValueError, match="already holds an adapter named 'default'"):
        lowrank.load_adapter(lowrank_adapted(base_state), lowrank_dir)
    with pytest.raises(
        ValueError,
        match="lora_embedding_A' has rank 3, adapter 'default' of 'model.embed_tokens' has rank 2",
    ):
        wrong_rank = fresh_base(base_state)
        lowrank.inject_lora(wrong_rank, ["q_proj", "v_proj", "down_proj", "embed_tokens"], r=2)
        lowrank.load_adapter(wrong_rank, lowrank_dir, inject=False)

    lowrank.save_adapter(other, tmp_path, adapter_name="second", base_model_name_or_path="tiny-llama")
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["base_model_name_or_path"] == "tiny-llama" and config["rank_pattern"]


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _corrupt(src, dst, *, tensors=None, config=None, raw=None):
    dst.mkdir()
    cfg = json.loads((src / CONFIG_NAME).read_text())
    if config:
        config(cfg)
    (dst / CONFIG_NAME).write_text(json.dumps(cfg))
    if raw is not None:
        (dst / WEIGHTS_NAME).write_bytes(raw((src / WEIGHTS_NAME).read_bytes()))
    else:
        data = load_file(src / WEIGHTS_NAME)
        if tensors:
            tensors(data)
        save_file(data, dst / WEIGHTS_NAME)
    return dst


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
V1 = "base_model.model.model.layers.1.self_attn.v_proj"


def _pop(key):
    return lambda d: d.pop(key)


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


def _truncate(raw):
    return raw[: len(raw) // 2]


def _garble_header(raw):
    return raw[:8] + b"{not json" + raw[17:]


def _nan(d):
    d[Q0 + ".lora_B.weight"][0, 0] = float("nan")


def _pop_module(d):
    d.pop(V1 + ".lora_A.weight")
    d.pop(V1 + ".lora_B.weight")


def _rank_pattern(cfg):
    cfg["rank_pattern"]["model.layers.0.self_attn.q_proj"] = 2


CASES = {
    "missing lora_B": (dict(tensors=_pop(Q0 + ".lora_B.weight")), Q0 + ".lora_B.weight"),
    "wrong shape": (dict(tensors=_set(Q0 + ".lora_A.weight", torch.zeros(4, 65))), Q0 + ".lora_A.weight"),
    "unknown module": (
        dict(tensors=_set("base_model.model.model.layers.7.mlp.up_proj.lora_A.weight", torch.zeros(4, 64))),
        "layers.7.mlp.up_proj",
    ),
    "wrong rank": (dict(config=_rank_pattern), Q0 + ".lora_A.weight"),
    "module missing from file": (dict(tensors=_pop_module), V1 + ".lora_A.weight"),
    "non-finite": (dict(tensors=_nan), Q0 + ".lora_B.weight"),
    "truncated": (dict(raw=_truncate), WEIGHTS_NAME),
    "corrupt header": (dict(raw=_garble_header), WEIGHTS_NAME),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_raises_naming_key_and_leaves_model_unchanged(case, base_state, lowrank_dir, tmp_path):
    kwargs, named = CASES[case]
    bad = _corrupt(lowrank_dir, tmp_path / "bad", **kwargs)
    model = fresh_base(base_state)
    state, types = _snapshot(model)
    with pytest.raises(ValueError) as info:
        lowrank.load_adapter(model, bad)
    assert named in str(info.value)
    after, after_types = _snapshot(model)
    assert after_types == types and after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state)


def test_failure_while_injecting_rolls_back(base_state, lowrank_dir, monkeypatch):
    # a failure inside a layer (here simulated: the second add_adapter call raises, as an out-of-memory
    # would) after layer 0 has already been wrapped: the model must come back unchanged.
    calls = []
    original = LoRALayer.add_adapter

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure in the second layer")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LoRALayer, "add_adapter", failing)
    model = fresh_base(base_state)
    state, types = _snapshot(model)
    with pytest.raises(RuntimeError, match="simulated failure"):
        lowrank.load_adapter(model, lowrank_dir)
    assert len(calls) == 2
    after, after_types = _snapshot(model)
    assert after_types == types and all(torch.equal(after[k], state[k]) for k in state)
    assert all(p.requires_grad for p in model.parameters())


def test_bin_adapter_read_with_weights_only_and_warning(base_state, input_ids, lowrank_dir, tmp_path):
    expected = logits(lowrank_adapted(base_state), input_ids)
    (tmp_path / CONFIG_NAME).write_text((lowrank_dir / CONFIG_NAME).read_text())
    torch.save(load_file(lowrank_dir / WEIGHTS_NAME), tmp_path / "adapter_model.bin")
    with pytest.warns(UserWarning, match="weights_only=True"):
        model = lowrank.load_adapter(fresh_base(base_state), tmp_path)
    assert relative(logits(model, input_ids), expected) <= 1e-6

    torch.save({"x": nn.Linear(2, 2)}, tmp_path / "adapter_model.bin")  # a pickled module: refused
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="cannot be read safely"):
        lowrank.load_adapter(fresh_base(base_state), tmp_path)


def test_save_refuses_what_peft_cannot_express():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with pytest.raises(ValueError, match="adapter_name"):
        lowrank.save_adapter(model, "unused")
    lowrank.inject_lora(model, ["0"], r=2)
    lowrank.inject_lora(model, ["1"], r=2, use_rslora=True)
    with pytest.raises(ValueError, match="use_rslora"):
        lowrank.save_adapter(model, "unused")


KILLED_WRITER = """
import os, sys, time, torch
from torch import nn
import lowrank
from lowrank import io as lowrank_io
from lowrank.lora import checkpoint

torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)])
lowrank.inject_lora(model, [str(i) for i in range(8)], r=4)
with torch.no_grad():
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.fill_(2.0)
original = checkpoint._entries_from_dict

def slow_entries(tensors):
    entries = original(tensors)
    def stall():
        print("ready", flush=True)  # half the tensors are in the temporary file
        time.sleep(60)
    entries[len(entries) // 2] = lowrank_io.TensorEntry(
        entries[len(entries) // 2].name, entries[0].dtype, entries[len(entries) // 2].shape, stall)
    return entries

checkpoint._entries_from_dict = slow_entries
lowrank.save_adapter(model, sys.argv[1])
"""


def test_killed_writer_leaves_previous_checkpoint_intact(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)])
    lowrank.inject_lora(model, [str(i) for i in range(8)], r=4)
    randomize_lora(model, seed=5)
    lowrank.save_adapter(model, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in (WEIGHTS_NAME, CONFIG_NAME)}

    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(KILLED_WRITER))
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        temporaries = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
        assert len(temporaries) == 1 and (tmp_path / temporaries[0]).stat().st_size > 8
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    fresh = nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)])
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k}, strict=False)
    lowrank.load_adapter(fresh, tmp_path)
    for a, b in zip(fresh.modules(), model.modules()):
        if hasattr(a, "lora_A"):
            assert torch.equal(a.lora_A["default"], b.lora_A["default"])
            assert torch.equal(a.lora_B["default"], b.lora_B["default"])


def test_streaming_writer_matches_safetensors_reader(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=gen),
        "bf16": torch.randn(7, generator=gen).to(torch.bfloat16),
        "f16": torch.randn(2, 2, 2, generator=gen).half(),
        "f64": torch.randn(4, generator=gen).double(),
        "i64": torch.arange(6).reshape(2, 3),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(6, 4, generator=gen).T,  # non-contiguous input
    }
    entries = [lowrank_io.TensorEntry(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in tensors.items()]
    lowrank_io.write_safetensors(tmp_path / "t.safetensors", entries, {"note": "x"})
    loaded = load_file(tmp_path / "t.safetensors")
    assert loaded.keys() == tensors.keys()
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    with safe_open(tmp_path / "t.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
    bad = [lowrank_io.TensorEntry("x", torch.float32, (2,), lambda: torch.zeros(3))]
    with pytest.raises(ValueError, match="declared"):
        lowrank_io.write_safetensors(tmp_path / "t.safetensors", bad)
    assert torch.equal(load_file(tmp_path / "t.safetensors")["f32"], tensors["f32"])  # old file kept
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []  # temporary removed


# ----------------------------------------------------------------------------------------------------
# PEFT pattern fields (issue 15 §2): nested names that are suffixes of each other, both loaders
# ----------------------------------------------------------------------------------------------------


class _Holder(nn.Module):
    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


class Nested(nn.Module):
    """Module paths foo, bar.foo, qux, baz.qux, baz.qux_x: names that are dotted suffixes of others."""

    def __init__(self):
        super().__init__()
        self.foo = nn.Linear(12, 12)
        self.bar = _Holder(foo=nn.Linear(12, 12))
        self.qux = nn.Linear(12, 12)
        self.baz = _Holder(qux=nn.Linear(12, 12), qux_x=nn.Linear(12, 12))

    def forward(self, x):
        h = self.bar.foo(torch.tanh(self.foo(x)))
        return self.baz.qux_x(torch.tanh(self.baz.qux(torch.tanh(self.qux(h)))))


# module path -> (r, alpha) of each case; None: not adapted
NESTED_CASES = {
    "issue: foo r8/a16, bar.foo and baz.qux r4/a4": {"foo": (8, 16), "bar.foo": (4, 4), "baz.qux": (4, 4)},
    "outer differs: bar.foo r8/a16, foo r4": {"foo": (4, 4), "bar.foo": (8, 16), "qux": (4, 4)},
    "only the short name adapted": {"foo": (2, 3), "qux": (2, 3)},
    "only the long name adapted": {"bar.foo": (2, 3), "baz.qux": (3, 5)},
    "all, three ranks": {
        "foo": (2, 2),
        "bar.foo": (3, 6),
        "qux": (4, 1),
        "baz.qux": (2, 2),
        "baz.qux_x": (5, 5),
    },
}


@pytest.mark.parametrize("case", list(NESTED_CASES))
def test_nested_suffix_names_round_trip_through_peft_and_lowrank(case, tmp_path):
    layers = NESTED_CASES[case]
    torch.manual_seed(0)
    state = Nested().state_dict()

    def fresh():
        model = Nested().eval()
        model.load_state_dict(state)
        return model

    model = fresh()
    for path, (r, alpha) in layers.items():
        lowrank.inject_lora(model, ["^" + path.replace(".", r"\.") + "$"], r=r, alpha=alpha)
    randomize_lora(model, seed=4)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(x)
        assert relative(expected, fresh()(x)) > 1e-2
    lowrank.save_adapter(model, tmp_path)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(fresh(), str(tmp_path)).eval()
    peft_layers = {
        name.removeprefix("base_model.model."): (m.r["default"], m.lora_alpha["default"])
        for name, m in peft_model.named_modules()
        if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)
    }
    assert peft_layers == layers  # PEFT built exactly these layers, with these ranks and alphas
    loaded = lowrank.load_adapter(fresh(), tmp_path)
    assert {n: (m.r["default"], m.lora_alpha["default"]) for n, m in lora_layers(loaded)} == layers
    with torch.no_grad():
        assert relative(peft_model(x), expected) <= 1e-6
        assert relative(loaded(x), expected) <= 1e-6

    # a PEFT save of the same adapter loads in lowrank to the same outputs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(tmp_path / "peft"))
    assert relative(lowrank.load_adapter(fresh(), tmp_path / "peft")(x).detach(), expected) <= 1e-6


PEFT_KEYS = [
    "foo",
    "bar.foo",
    "bar.foo.baz",
    "foobar",
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.mlp.experts.0.q_proj",
    "model.h.2.attn.q_proj",
    "model.layers.10.mlp.down_proj",
    "lm_head",
]
PEFT_CONFIGS = [
    {"target_modules": ["foo", "q_proj"]},
    {"target_modules": ["bar.foo", "down_proj"]},
    {"target_modules": r".*\.q_proj"},
    {"target_modules": "^foo$"},
    {"target_modules": ["q_proj", "foo"], "exclude_modules": ["layers.1.self_attn.q_proj", "bar.foo"]},
    {"target_modules": ["q_proj"], "exclude_modules": r".*layers\.0.*"},
    {"target_modules": ["q_proj", "foo", "down_proj"], "modules_to_save": ["bar", "layers.10"]},
    {"target_modules": ["q_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": 10, "layers_pattern": "layers"},
    {"target_modules": ["q_proj"], "layers_to_transform": [2], "layers_pattern": ["h", "layers"]},
]


@pytest.mark.parametrize("fields", PEFT_CONFIGS, ids=[str(c) for c in PEFT_CONFIGS])
def test_target_rules_agree_with_peft(fields):
    from peft.tuners.tuners_utils import check_target_module_exists

    config = peft.LoraConfig(**fields)
    for key in PEFT_KEYS:
        assert bool(check_target_module_exists(config, key)) is peft_format.matches_targets(fields, key), key


@pytest.mark.parametrize(
    "patterns",
    [{"foo": 2}, {"^foo": 2}, {"bar.foo": 2, "foo": 3}, {"^model\\.layers\\.1\\.self_attn\\.q_proj": 5},
     {"layers.1.*q_proj": 6}, {"q_proj": 7, "^model": 8}],
)  # fmt: skip
def test_pattern_lookup_agrees_with_peft(patterns):
    from peft.utils.other import get_pattern_key

    for key in PEFT_KEYS:
        expected = patterns.get(get_pattern_key(patterns.keys(), key), "default")
        assert peft_format.pattern_value(patterns, key, "default") == expected, key


# ----------------------------------------------------------------------------------------------------
# Torn checkpoints (issue 15 §5): a failure between the two renames, and temporaries of a killed save
# ----------------------------------------------------------------------------------------------------


def _two_layer(seed):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    lowrank.inject_lora(model, ["0", "1"], r=2, alpha=4)
    randomize_lora(model, seed)
    return model


def _reloaded(path):
    torch.manual_seed(0)
    return lowrank.load_adapter(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), path)


@pytest.mark.parametrize("fail_on", [WEIGHTS_NAME, CONFIG_NAME])
def test_save_interrupted_at_either_rename_reads_all_old_or_all_new(fail_on, tmp_path, monkeypatch):
    old = _two_layer(seed=1)
    lowrank.save_adapter(old, tmp_path)
    new = _two_layer(seed=2)
    for layer in new:  # the new save also changes the scaling (alpha 4 -> 7): a mix would be wrong
        layer.lora_alpha["default"], layer.scaling["default"] = 7.0, 3.5
    x = torch.randn(3, 8)
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == fail_on:
            raise OSError("injected failure (power cut)")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(OSError, match="injected"):
        lowrank.save_adapter(new, tmp_path)
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    # the failing save removed its own temporaries; a killed one would leave them (see below)
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []
    if fail_on == WEIGHTS_NAME:  # nothing renamed: all old
        loaded = _reloaded(tmp_path)
        torch.testing.assert_close(loaded(x), old(x), rtol=0, atol=0)
    else:  # new weights, old config on disk: read all new, with a warning
        with pytest.warns(UserWarning, match="interrupted save"):
            loaded = _reloaded(tmp_path)
        assert loaded[0].scaling["default"] == 3.5
        torch.testing.assert_close(loaded(x), new(x), rtol=0, atol=0)
    # PEFT reads the folder repaired by the next save
    lowrank.save_adapter(new, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(_reloaded(tmp_path)(x), new(x), rtol=0, atol=0)


def test_config_edited_after_save_is_used_as_written(tmp_path):
    model = _two_layer(seed=1)
    lowrank.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["lora_alpha"] = 2
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _reloaded(tmp_path)[0].scaling["default"] == 1.0


def test_next_save_removes_temporaries_of_a_killed_save(tmp_path):
    model = _two_layer(seed=1)
    lowrank.save_adapter(model, tmp_path)
    for name in (WEIGHTS_NAME, CONFIG_NAME):  # what a save killed before its renames leaves
        (tmp_path / f".{name}.abc123.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("keep me")
    lowrank.save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([WEIGHTS_NAME, CONFIG_NAME, "notes.txt"])


# ----------------------------------------------------------------------------------------------------
# Bad input tables (issue 15 §5): one row per kind, each a clear exception naming the argument/field
# ----------------------------------------------------------------------------------------------------


def _config_value(field, value):
    def change(cfg):
        cfg[field] = value

    return change


CONFIG_FIELD_CASES = {
    "use_rslora string": ("use_rslora", "no"),
    "r string": ("r", "8"),
    "r zero": ("r", 0),
    "r bool": ("r", True),
    "lora_alpha string": ("lora_alpha", "16"),
    "lora_alpha NaN": ("lora_alpha", float("nan")),
    "lora_dropout out of range": ("lora_dropout", 1.5),
    "rank_pattern list": ("rank_pattern", ["q_proj"]),
    "rank_pattern float value": ("rank_pattern", {"q_proj": 2.5}),
    "rank_pattern bad regex": ("rank_pattern", {"q_proj(": 2}),
    "alpha_pattern string value": ("alpha_pattern", {"q_proj": "x"}),
    "target_modules number": ("target_modules", 5),
    "target_modules bad regex": ("target_modules", "q_proj("),
    "exclude_modules bad regex": ("exclude_modules", "["),
    "modules_to_save string": ("modules_to_save", "lm_head"),
    "modules_to_save bad regex": ("modules_to_save", ["lm_head("]),
    "layers_to_transform string": ("layers_to_transform", "0"),
    "layers_pattern number": ("layers_pattern", 3),
}


@pytest.mark.parametrize("case", list(CONFIG_FIELD_CASES))
def test_malformed_config_field_is_a_value_error_naming_it(case, base_state, lowrank_dir, tmp_path):
    field, value = CONFIG_FIELD_CASES[case]
    bad = _corrupt(lowrank_dir, tmp_path / "bad", config=_config_value(field, value))
    model = fresh_base(base_state)
    state, types = _snapshot(model)
    with pytest.raises(ValueError, match=field):
        lowrank.load_adapter(model, bad)
    after, after_types = _snapshot(model)
    assert after_types == types and all(torch.equal(after[k], state[k]) for k in state)


def test_file_module_outside_target_modules(base_state, lowrank_dir, tmp_path):
    def narrow(cfg):  # the file adapts q_proj, v_proj, down_proj, embed_tokens; PEFT would skip v_proj
        cfg["exclude_modules"] = ["v_proj"]

    bad = _corrupt(lowrank_dir, tmp_path / "bad", config=narrow)
    with pytest.raises(ValueError, match="do not select module 'model.layers.0.self_attn.v_proj'"):
        lowrank.load_adapter(fresh_base(base_state), bad)
    with pytest.warns(UserWarning, match="loaded anyway"):
        lowrank.load_adapter(fresh_base(base_state), bad, strict=False)


def _adapted():
    model = nn.Sequential(nn.Linear(4, 4))
    lowrank.inject_lora(model, ["0"], r=2)
    return model


def _a_file(tmp_path):
    (tmp_path / "file.json").write_text("{}")
    return tmp_path / "file.json"


SAVE_CASES = {
    "model not a module": (lambda t: ("model", t / "o"), {}, TypeError, "model"),
    "path None": (lambda t: (_adapted(), None), {}, TypeError, "path"),
    "path a number": (lambda t: (_adapted(), 3), {}, TypeError, "path"),
    "path a regular file": (lambda t: (_adapted(), _a_file(t)), {}, ValueError, "is a file"),
    "no such adapter": (lambda t: (_adapted(), t / "o"), {"adapter_name": "x"}, ValueError, "adapter_name"),
    "adapter_name not str": (
        lambda t: (_adapted(), t / "o"),
        {"adapter_name": 3},
        ValueError,
        "adapter_name",
    ),
    "no LoRA layer": (lambda t: (nn.Linear(2, 2), t / "o"), {}, ValueError, "adapter_name"),
}


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_save_adapter_bad_input(case, tmp_path):
    make, kwargs, error, named = SAVE_CASES[case]
    with pytest.raises(error, match=named):
        lowrank.save_adapter(*make(tmp_path), **kwargs)
    assert not (tmp_path / "o").exists()


LOAD_CASES = {
    "model not a module": (lambda t, d: ("model", d), {}, TypeError, "model"),
    "path None": (lambda t, d: (nn.Linear(2, 2), None), {}, TypeError, "path"),
    "path a regular file": (
        lambda t, d: (nn.Linear(2, 2), d / CONFIG_NAME),
        {},
        ValueError,
        "is a file, not",
    ),
    "missing folder": (lambda t, d: (nn.Linear(2, 2), t / "nope"), {}, FileNotFoundError, "does not exist"),
    "folder without config": (lambda t, d: (nn.Linear(2, 2), t), {}, FileNotFoundError, CONFIG_NAME),
    "empty adapter_name": (
        lambda t, d: (nn.Linear(2, 2), d),
        {"adapter_name": ""},
        ValueError,
        "adapter_name",
    ),
    "wrong base model": (lambda t, d: (nn.Linear(2, 2), d), {}, ValueError, "wrong base model"),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_load_adapter_bad_input(case, lowrank_dir, tmp_path):
    make, kwargs, error, named = LOAD_CASES[case]
    with pytest.raises(error, match=named):
        lowrank.load_adapter(*make(tmp_path, lowrank_dir), **kwargs)


@pytest.mark.parametrize(
    "args, error, named",
    [(("model",), TypeError, "model"), ((nn.Linear(2, 2), "x"), ValueError, "adapter_name")],
)
def test_adapter_size_bad_input(args, error, named):
    with pytest.raises(error, match=named):
        lowrank.adapter_size(*args)


KILLED_BETWEEN_RENAMES = """
import os, sys, time, torch
from torch import nn
import lowrank
from lowrank import io as lowrank_io
from lowrank.lora import checkpoint

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
lowrank.inject_lora(model, ["0", "1"], r=2, alpha=7)
with torch.no_grad():
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.fill_(0.5)
real_replace = os.replace

def replace(src, dst):
    real_replace(src, dst)
    if os.path.basename(dst) == checkpoint.WEIGHTS_NAME:
        print("ready", flush=True)  # new weights in place, old config still there
        time.sleep(60)

checkpoint.os.replace = replace
lowrank.save_adapter(model, sys.argv[1])
"""


def test_writer_killed_between_the_two_renames_reads_all_new(tmp_path):
    old = _two_layer(seed=1)  # alpha 4
    lowrank.save_adapter(old, tmp_path)
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(KILLED_BETWEEN_RENAMES))
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["lora_alpha"] == 4  # the torn state on disk
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # the killed save's staged config
    with pytest.warns(UserWarning, match="interrupted save"):
        loaded = _reloaded(tmp_path)
    assert loaded[0].lora_alpha["default"] == 7 and loaded[0].scaling["default"] == 3.5
    assert torch.equal(loaded[0].lora_A["default"], torch.full((2, 8), 0.5))
    lowrank.save_adapter(loaded, tmp_path)  # the next save repairs the folder and removes the temporaries
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME, "writer.py"])
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["lora_alpha"] == 7
