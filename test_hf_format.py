"""
Tests for hf_format.py: config.json read as transformers reads it (refused, ignored and accepted
spellings), broken checkpoint folders caught from the safetensors headers alone, and atomic writes
(a save killed at every crash point, clean_stale's repairs). Checkpoints are written by transformers'
own save_pretrained (test_model.make_checkpoint) or by model.py's.

Run: python -m pytest -q test_hf_format.py
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_format
from hf_format import MARKER, CheckpointError, ConfigError, atomic_dir, clean_stale
from model import Llama, LlamaConfig, check_pretrained
from conftest import LLAMA3, make_checkpoint


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """A save that dies after writing one shard leaves the checkpoint previously saved at that name intact
    and no temporary folder; a later successful save replaces it completely."""
    make_checkpoint(tmp_path / "src")
    model = Llama.from_pretrained(tmp_path / "src")
    out = tmp_path / "ckpt"
    model.save_pretrained(out, max_shard_size=40_000)
    first = {f: (out / f).read_bytes() for f in os.listdir(out)}

    real_save_file, written = hf_format.save_file, []

    def dying_save_file(tensors, filename, metadata=None):
        if written:
            raise KeyboardInterrupt("simulated crash")
        written.append(filename)
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(hf_format, "save_file", dying_save_file)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(out, max_shard_size=40_000)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == first
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "src"]

    monkeypatch.setattr(hf_format, "save_file", real_save_file)
    model.save_pretrained(out)
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "src"]
    assert torch.equal(Llama.from_pretrained(out).model.norm.weight, model.model.norm.weight)
    assert not (out / "model-00002-of-00002.safetensors").exists()


def test_save_not_atomic_writes_in_place(tmp_path):
    """atomic=False writes the model into an existing folder, keeping what else it holds, and makes no
    temporary sibling (the caller's own atomic_dir is the unit of atomicity)."""
    make_checkpoint(tmp_path / "src")
    model = Llama.from_pretrained(tmp_path / "src")
    with atomic_dir(tmp_path / "ckpt") as folder:
        (folder / "trainer_state.pt").write_text("x")
        model.save_pretrained(folder, atomic=False)
        assert sorted(os.listdir(tmp_path)) == ["ckpt.tmp", "src"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "src"]
    assert (tmp_path / "ckpt" / "trainer_state.pt").read_text() == "x"
    assert torch.equal(Llama.from_pretrained(tmp_path / "ckpt").lm_head.weight, model.lm_head.weight)


CRASH_SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
CRASH_CONFIG = LlamaConfig(**CRASH_SIZES)
CRASH_SAVE = f"""
import sys, torch
from model import Llama, LlamaConfig
torch.manual_seed(1)
model = Llama(LlamaConfig(**{CRASH_SIZES!r}))
model.save_pretrained(sys.argv[1], source_dir=sys.argv[2], max_shard_size=60_000)
"""


def test_killed_save_never_leaves_half_a_checkpoint(tmp_path):
    """Saves over an existing checkpoint, each killed (SIGKILL, MPPO_CRASH_AFTER=k) at its k-th crash point,
    k = 1..9 (beyond the last point the save completes): after every kill the final name holds either the
    old checkpoint or the new one, complete (it loads, and every tensor equals one of the two models, built
    here with the same seeds), or is absent between the two renames; clean_stale then leaves exactly one
    complete checkpoint there (the old one until the new one was renamed into place), no *.tmp / *.old."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    models = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        models[seed] = Llama(CRASH_CONFIG)
    models[0].save_pretrained(tmp_path / "old", source_dir=src)
    repo = os.path.dirname(os.path.abspath(__file__))
    runs = {}
    for k in range(1, 10):  # independent runs, a few at a time (each is mostly torch's import)
        shutil.copytree(tmp_path / "old", tmp_path / f"run{k}" / "ckpt")
        runs[k] = subprocess.Popen(
            [sys.executable, "-c", CRASH_SAVE, str(tmp_path / f"run{k}" / "ckpt"), str(src)],
            cwd=repo,
            env={**os.environ, "MPPO_CRASH_AFTER": str(k)},
        )
        if k % 3 == 0:
            [run.wait() for run in runs.values()]
    seen = []
    for k, run in runs.items():
        out = tmp_path / f"run{k}" / "ckpt"
        assert run.wait() in (0, -signal.SIGKILL)
        states = []
        for repaired in (False, True):
            if repaired:
                clean_stale(out.parent)
                assert os.listdir(out.parent) == ["ckpt"]
            if out.exists():
                weights = Llama.from_pretrained(out).state_dict()
                which = [
                    s for s, m in models.items() if all(torch.equal(weights[n], w) for n, w in m.state_dict().items())
                ]
                assert len(which) == 1 and (out / "tokenizer.json").exists()
                states.append(which[0])
            else:
                assert not repaired and run.returncode != 0
                states.append(None)
        seen.append((run.returncode == 0, *states))
    killed = [s for s in seen if not s[0]]
    assert seen == killed + [(True, 1, 1)] * (len(seen) - len(killed))  # every run past the last point completes
    assert killed[0] == (False, 0, 0) and (False, None, 0) in killed and killed[-1] == (False, 1, 1)
    assert len(killed) == 8  # after two shards, index, config, tokenizer file; before, between, after the renames


def test_clean_stale_repairs_leftovers(tmp_path):
    """clean_stale, on a folder left by crashes (folders holding MARKER, as atomic_dir makes them):
    NAME.tmp is removed; NAME.old is restored when NAME is gone and removed when NAME exists; files and
    other folders are untouched. atomic_dir repairs its own name the same way before writing (an empty
    NAME.tmp: killed before its marker), and removes its temporary folder when the body raises."""
    for name in ("a.tmp", "b.old", "c", "c.old", "f", "g.old.keep"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "marker").write_text(name)
        if name.endswith((".tmp", ".old")):
            (tmp_path / name / MARKER).write_text("")
    (tmp_path / "h.tmp").write_text("a file")
    assert sorted(clean_stale(tmp_path)) == ["restored b from b.old"]
    assert sorted(os.listdir(tmp_path)) == ["b", "c", "f", "g.old.keep", "h.tmp"]
    assert [(tmp_path / n / "marker").read_text() for n in ("b", "c", "f")] == ["b.old", "c", "f"]
    (tmp_path / "b").rename(tmp_path / "x.old")
    (tmp_path / "x.tmp").mkdir()
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "x") as tmp:
            assert tmp == tmp_path / "x.tmp" and os.listdir(tmp) == [MARKER]
            raise RuntimeError
    assert not (tmp_path / "x.tmp").exists() and (tmp_path / "x" / "marker").read_text() == "b.old"


BASE_CONFIG = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_parameters=dict(LLAMA3),
)
REFUSED = {  # case: (change to BASE_CONFIG, what the message must say: the key, and for most the value)
    "other-architecture": (dict(architectures=["MistralForCausalLM"]), "'architectures' is \\['MistralForCausalLM'\\]"),
    "model-type": (dict(model_type="mistral"), "'model_type' is 'mistral'"),
    "attention-bias": (dict(attention_bias=True), "'attention_bias' is True"),
    "mlp-bias": (dict(mlp_bias=True), "'mlp_bias' is True"),
    "activation": (dict(hidden_act="gelu"), "'hidden_act' is 'gelu'"),
    "quantized": (
        dict(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}),
        "'quantization_config' is {'quant_method': 'bitsandbytes'",
    ),
    "string-size": (dict(hidden_size="96"), "'hidden_size' is '96'; expected a positive integer"),
    "bool-size": (dict(num_hidden_layers=True), "'num_hidden_layers' is True"),
    "string-eps": (dict(rms_norm_eps="1e-5"), "'rms_norm_eps' is '1e-5'; expected a number"),
    "bad-eos-list": (dict(eos_token_id=[1, "2"]), "'eos_token_id' is \\[1, '2'\\]"),
    "bad-dtype": (dict(torch_dtype="int8"), "'torch_dtype' is 'int8'"),
    "gqa-heads": (dict(num_key_value_heads=3), "'num_key_value_heads'"),
    "missing-size": (dict(hidden_size=None), "'hidden_size'"),
    "rope-type-new": (
        dict(rope_parameters=dict(rope_type="yarn", factor=4.0)),
        "'rope_parameters.rope_type' is 'yarn'",
    ),
    "rope-type-old": (
        dict(rope_parameters=None, rope_scaling=dict(type="linear", factor=2.0)),
        "'rope_scaling.rope_type' is 'linear'",
    ),
    "rope-dynamic": (
        dict(rope_parameters=None, rope_scaling=dict(type="dynamic", factor=2.0)),
        "'rope_scaling.rope_type' is 'dynamic'",
    ),
    "rope-longrope": (
        dict(rope_parameters=None, rope_scaling=dict(rope_type="longrope", long_factor=[1.0], short_factor=[1.0])),
        "'rope_scaling.rope_type' is 'longrope'",
    ),
    "rope-yarn-old": (
        dict(rope_parameters=None, rope_scaling=dict(rope_type="yarn", factor=4.0)),
        "'rope_scaling.rope_type' is 'yarn'",
    ),
    "rope-string-theta": (dict(rope_parameters=None, rope_theta="10000"), "'rope_theta' is '10000'"),
    "rope-missing-factor": (
        dict(rope_parameters=dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0)),
        "'rope_parameters.factor'",
    ),
    "rope-unknown-key": (dict(rope_parameters={**LLAMA3, "mscale": 1.0}), "'rope_parameters.mscale'"),
    "rope-conflict": (dict(rope_theta=500000.0), "'rope_parameters' disagrees"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_configs(tmp_path, case):
    """Each config the model cannot honour raises ConfigError naming config.json, the key and (where it has
    one) the value, from LlamaConfig.from_json and from check_pretrained on the folder, before any weights
    are looked for (the folder has none)."""
    change, match = REFUSED[case]
    d = {k: v for k, v in {**BASE_CONFIG, **change}.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(d))
    for load, arg in ((LlamaConfig.from_json, tmp_path / "config.json"), (check_pretrained, tmp_path)):
        with pytest.raises(ConfigError, match=match) as err:
            load(arg)
        assert str(tmp_path / "config.json") in str(err.value) and "\n" not in str(err.value)


def test_config_not_json(tmp_path):
    """A config.json that is not valid JSON (a truncated download) raises one ConfigError line naming it."""
    (tmp_path / "config.json").write_text(json.dumps(BASE_CONFIG)[:-20])
    with pytest.raises(ConfigError, match="not valid JSON") as err:
        check_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value) and "\n" not in str(err.value)


def test_ignored_keys(tmp_path, capsys):
    """Keys transformers' LlamaConfig does not read (tool metadata, sliding_window, which Llama does not
    have) are ignored, recorded in config.ignored_keys in file order and named in the one line
    from_pretrained prints; transformers' own bookkeeping keys are read silently; torch_dtype is kept."""
    extra = {
        "_name_or_path": "me/model",
        "auto_map": {"AutoConfig": "x.Config"},
        "unsloth_version": "2024.9",
        "sliding_window": 4096,
        "transformers_version": "4.44.0",
        "use_cache": False,
        "torch_dtype": "float16",
    }
    config = LlamaConfig.from_dict({**BASE_CONFIG, **extra})
    assert config.ignored_keys == ("_name_or_path", "auto_map", "unsloth_version", "sliding_window")
    assert config.torch_dtype == "float16" and config == LlamaConfig.from_dict(BASE_CONFIG)
    make_checkpoint(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**d, **extra}))
    capsys.readouterr()
    Llama.from_pretrained(tmp_path)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"{tmp_path / 'config.json'}: ignoring _name_or_path, auto_map, unsloth_version, sliding_window "
        "(transformers does not read them either)"
    ]


def test_accepted_config_spellings():
    """Old keys (rope_theta + rope_scaling with 'type'), new rope_parameters, and both at once when they
    agree, all give the same config; null values count as absent; unusual spellings of the fixed values
    transformers accepts are accepted."""
    old = {
        **BASE_CONFIG,
        "rope_parameters": None,
        "rope_theta": 10000.0,
        "torch_dtype": "bfloat16",
        "rope_scaling": {k if k != "rope_type" else "type": v for k, v in LLAMA3.items() if k != "rope_theta"},
    }
    both = {**BASE_CONFIG, "rope_theta": 10000.0, "head_dim": None, "pad_token_id": None}
    configs = [LlamaConfig.from_dict(d) for d in (old, BASE_CONFIG, both)]
    assert configs[0] == configs[1] == configs[2]
    assert configs[0].rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    assert (configs[0].head_dim, configs[0].num_key_value_heads) == (16, 2)
    assert LlamaConfig.from_dict(configs[0].to_dict()) == configs[0]
    # transformers computes "swish" as SiLU, and an integer 0 dropout is no dropout
    assert LlamaConfig.from_dict({**BASE_CONFIG, "hidden_act": "swish", "attention_dropout": 0}) == configs[1]


def _rewrite(file, edit):
    state = load_file(file)
    edit(state)
    save_file(state, file, metadata={"format": "pt"})


def _single_missing(p):
    _rewrite(p / "model.safetensors", lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    return "model.layers.1.mlp.up_proj.weight", "model.safetensors"


def _single_shape(p):
    _rewrite(p / "model.safetensors", lambda s: s.update({"model.norm.weight": torch.ones(65)}))
    return r"'model.norm.weight' has shape \(65,\)", "model.safetensors"


def _single_unexpected(p):
    _rewrite(p / "model.safetensors", lambda s: s.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    return "unexpected tensor 'model.layers.0.self_attn.q_proj.bias'", "model.safetensors"


def _shard_missing(p):
    index = json.loads((p / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.1.self_attn.k_proj.weight"]
    os.remove(p / shard)
    return f"shard '{shard}' is missing", "model.safetensors.index.json"


def _shard_missing_tensor(p):
    index = json.loads((p / "model.safetensors.index.json").read_text())
    name = "model.layers.0.mlp.down_proj.weight"
    _rewrite(p / index["weight_map"][name], lambda s: s.pop(name))
    return f"missing tensor '{name}'", index["weight_map"][name]


def _shard_unlisted(p):
    index = json.loads((p / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.embed_tokens.weight"]
    (p / "model.safetensors.index.json").write_text(json.dumps(index))
    return "missing tensor 'model.embed_tokens.weight'", "model.safetensors.index.json"


def _single_truncated(p):
    file = p / "model.safetensors"
    size = file.stat().st_size
    file.write_bytes(file.read_bytes()[:-100])  # an interrupted download: the last tensor's bytes are cut short
    return f"truncated: tensor 'model\\.[^']+' ends at byte {size}, the file has {size - 100}", "model.safetensors"


def _single_garbage_header(p):
    file = p / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:12] = b"#!?x"  # the JSON header no longer parses
    file.write_bytes(bytes(data))
    return "the safetensors header does not parse", "model.safetensors"


def _single_int_dtype(p):
    _rewrite(p / "model.safetensors", lambda s: s.update({"model.norm.weight": torch.ones(64, dtype=torch.int8)}))
    return "'model.norm.weight' is stored as I8", "model.safetensors"


def _shard_index_not_json(p):
    (p / "model.safetensors.index.json").write_text('{"weight_map": {')
    return "not a valid index", "model.safetensors.index.json"


BROKEN = {
    "missing-tensor": (_single_missing, False),
    "wrong-shape": (_single_shape, False),
    "unexpected-tensor": (_single_unexpected, False),
    "truncated": (_single_truncated, False),
    "garbage-header": (_single_garbage_header, False),
    "int-dtype": (_single_int_dtype, False),
    "missing-shard": (_shard_missing, True),
    "shard-lacks-listed-tensor": (_shard_missing_tensor, True),
    "tensor-not-in-index": (_shard_unlisted, True),
    "index-not-json": (_shard_index_not_json, True),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_checkpoints(tmp_path, case, monkeypatch):
    """Each broken checkpoint raises one CheckpointError line naming the tensor (or shard) and the file:
    from check_pretrained, which reads no tensor data (safe_open, the only tensor reader, is made to
    fail), and from from_pretrained, with the same message."""
    break_it, shard = BROKEN[case]
    make_checkpoint(tmp_path, shard=shard)
    what, file = break_it(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(hf_format, "safe_open", lambda *a, **k: pytest.fail("check_pretrained read tensor data"))
        with pytest.raises(CheckpointError, match=what) as checked:
            check_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=what) as err:
        Llama.from_pretrained(tmp_path)
    assert str(err.value) == str(checked.value) and "\n" not in str(err.value)
    assert str(tmp_path / file) in str(err.value)


def test_check_pretrained_reads_headers_only(tmp_path, monkeypatch):
    """check_pretrained on a sound sharded checkpoint returns the config from_pretrained uses, without
    opening a tensor (safe_open made to fail)."""
    make_checkpoint(tmp_path, shard=True)
    monkeypatch.setattr(hf_format, "safe_open", lambda *a, **k: pytest.fail("read tensor data"))
    config = check_pretrained(tmp_path)
    monkeypatch.undo()
    assert config == Llama.from_pretrained(tmp_path).config and config.torch_dtype == "float32"
