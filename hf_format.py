"""
The Hugging Face checkpoint folder format, as transformers reads and writes it, knowing nothing of the
model classes (model.py passes in how to build its config and which tensors it holds).

config.json is read the way transformers reads it: a key it honours with a value this model does not
compute is refused, a key it does not read is ignored (and reported). read_pretrained checks a whole
folder from the safetensors headers, before any tensor is read. write_checkpoint writes the sharded
safetensors + index layout transformers writes, and atomic_dir makes a folder appear whole or not at all.
Depends only on torch, safetensors and the standard library.
"""

import json
import os
import re
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file


class ConfigError(ValueError):
    """config.json asks for something this model cannot compute."""


class CheckpointError(ValueError):
    """The files on disk do not match what config.json describes."""


# ----------------------------------------------------------------------------------------------
# config.json, read like transformers' LlamaConfig


# keys transformers reads whose every other value changes the computation (first value: what we write)
FIXED_KEYS = {
    "hidden_act": ("silu", "swish"),
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "attention_dropout": (0.0,),
}
# keys transformers reads that do not change the computation: its own bookkeeping, which every
# config.json it writes carries (pretraining_tp only split the same matmuls into slices in old versions)
SILENT_KEYS = (
    "transformers_version",
    "use_cache",
    "initializer_range",
    "pretraining_tp",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
)
POSITIVE, INT, NUMBER, BOOL = "a positive integer", "an integer", "a number", "true or false"
FIELD_KINDS = dict(
    vocab_size=POSITIVE,
    hidden_size=POSITIVE,
    intermediate_size=POSITIVE,
    num_hidden_layers=POSITIVE,
    num_attention_heads=POSITIVE,
    num_key_value_heads=POSITIVE,
    head_dim=POSITIVE,
    max_position_embeddings=POSITIVE,
    rms_norm_eps=NUMBER,
    tie_word_embeddings=BOOL,
    bos_token_id=INT,
    eos_token_id=INT,
    pad_token_id=INT,
)
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
READ_KEYS = {
    *FIELD_KINDS,
    *FIXED_KEYS,
    *SILENT_KEYS,
    "architectures",
    "model_type",
    "quantization_config",
    "torch_dtype",
    "dtype",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
}
DTYPES = ("float32", "bfloat16", "float16", "float64")


def read_config(path, architecture="LlamaForCausalLM"):
    """parse_config of the config.json file at path."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return parse_config(raw, source=str(path), architecture=architecture)


def parse_config(raw, source="config.json", architecture="LlamaForCausalLM"):
    """The validated values of a config.json dict, by LlamaConfig's field names (those the file sets, plus
    rope_theta, rope_scaling and ignored_keys: the keys transformers does not read either, in file order),
    or a one-line ConfigError naming source, the key and its value."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {_short(raw)}")
    d = {k: v for k, v in raw.items() if v is not None}  # HF writes null for "not set"

    def refuse(key, why):
        raise ConfigError(f"{source}: '{key}' is {_short(d[key])}; {why}")

    if d.get("architectures", [architecture]) != [architecture]:  # reward.py reads LlamaForSequenceClassification
        refuse("architectures", f"only {[architecture]} is supported")
    if d.get("model_type", "llama") != "llama":
        refuse("model_type", "only 'llama' is supported")
    for key, allowed in FIXED_KEYS.items():
        if key in d and (d[key] not in allowed or isinstance(d[key], bool) != isinstance(allowed[0], bool)):
            refuse(key, f"this implementation computes only {allowed[0]!r}")
    if "quantization_config" in d:
        refuse("quantization_config", "quantized checkpoints are not supported")
    values = {}
    for key, kind in FIELD_KINDS.items():
        if key in d:
            values[key] = _typed(source, key, d[key], kind)
    for key in REQUIRED:
        if key not in values:
            raise ConfigError(f"{source}: required key '{key}' is missing")
    dtype = d.get("dtype", d.get("torch_dtype"))  # transformers keeps dtype when both are present
    if dtype is not None:
        key = "dtype" if "dtype" in d else "torch_dtype"
        if not isinstance(dtype, str) or dtype.removeprefix("torch.") not in DTYPES:
            refuse(key, f"expected one of {', '.join(DTYPES)}")
        values["torch_dtype"] = dtype.removeprefix("torch.")
    values["rope_theta"], values["rope_scaling"] = _parse_rope(d, source)
    values["ignored_keys"] = tuple(k for k in raw if k not in READ_KEYS)
    return values


def config_json(values):
    """The config.json dict for values (parse_config's, without ignored_keys). RoPE goes out as the older
    rope_theta / rope_scaling keys: transformers v4 reads only those, and v5 converts them to its
    rope_parameters on load."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **values,
        **{k: allowed[0] for k, allowed in FIXED_KEYS.items()},
    }


def _short(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _typed(source, key, value, kind):
    is_int = isinstance(value, int) and not isinstance(value, bool)
    ok = {
        POSITIVE: is_int and value > 0,
        INT: is_int,
        BOOL: isinstance(value, bool),
        NUMBER: isinstance(value, (int, float)) and not isinstance(value, bool),
    }[kind]
    if key == "eos_token_id" and isinstance(value, list):  # Llama 3 instruct models stop on any of several
        ok = bool(value) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok:
        raise ConfigError(f"{source}: '{key}' is {_short(value)}; expected {kind}")
    return float(value) if kind == NUMBER else value


def _parse_rope(d, source):
    """(rope_theta, rope_scaling) from the old-style keys (rope_theta, rope_scaling) and/or the new-style
    rope_parameters, with rope_scaling normalised to None or a llama3 dict."""
    max_pos = d.get("max_position_embeddings", 2048)

    def parse(rope, theta, key):
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: '{key}' is {_short(rope)}; expected an object")
        rope = dict(rope)
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))  # "type" is the pre-4.45 spelling
        theta = _typed(source, f"{key}.rope_theta", rope.pop("rope_theta", theta), NUMBER)
        scaling = None
        if rope_type == "llama3":
            scaling = {"rope_type": "llama3"}
            for k in ("factor", "low_freq_factor", "high_freq_factor"):
                if k not in rope:
                    raise ConfigError(f"{source}: '{key}.{k}' is missing (required by rope_type 'llama3')")
                scaling[k] = _typed(source, f"{key}.{k}", rope.pop(k), NUMBER)
            # transformers falls back to max_position_embeddings as well
            k = "original_max_position_embeddings"
            scaling[k] = _typed(source, f"{key}.{k}", rope.pop(k, max_pos), POSITIVE)
        elif rope_type != "default":  # linear, dynamic, yarn, longrope, ...: other position encodings
            raise ConfigError(
                f"{source}: '{key}.rope_type' is {rope_type!r}; only 'default' and 'llama3' are supported"
            )
        if rope:
            raise ConfigError(f"{source}: unsupported key '{key}.{next(iter(rope))}' for rope_type {rope_type!r}")
        return theta, scaling

    theta = _typed(source, "rope_theta", d["rope_theta"], NUMBER) if "rope_theta" in d else None
    scaling = d.get("rope_scaling")
    default_theta = theta if theta is not None else 10000.0
    old = parse(scaling or {}, default_theta, "rope_scaling")
    if "rope_parameters" not in d:
        return old
    new = parse(d["rope_parameters"], default_theta, "rope_parameters")
    if (theta is not None and new[0] != old[0]) or (scaling is not None and new[1] != old[1]):
        raise ConfigError(f"{source}: 'rope_parameters' disagrees with 'rope_theta'/'rope_scaling'")
    return new


def as_torch_dtype(dtype):
    return getattr(torch, dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype


# ----------------------------------------------------------------------------------------------
# checking and reading checkpoint folders


SAFETENSORS_FLOATS = ("F32", "BF16", "F16", "F64")  # dtypes a weight may be stored in


def read_pretrained(path, make_config, tensor_shapes, report_ignored=False, architecture="LlamaForCausalLM"):
    """(config, {tensor name: file holding it}) of the HF checkpoint folder path, checked without reading
    tensor data: config.json parses and asks for nothing this model cannot compute, and every safetensors
    header holds exactly the tensors the config implies (name, shape, floating dtype), each lying inside its
    file. make_config(values, source) builds the config from parse_config's values; tensor_shapes(config)
    gives {name: shape} of every weight the model holds. Raises FileNotFoundError, or one ConfigError /
    CheckpointError line naming the file and the key or tensor. report_ignored: rank 0 prints one line
    naming the keys of config.json that are ignored."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    file = path / "config.json"
    values = read_config(file, architecture)
    config = make_config(values, str(file))
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if report_ignored and values["ignored_keys"] and rank == 0:
        print(f"{file}: ignoring {', '.join(values['ignored_keys'])} (transformers does not read them either)")
    return config, _locate_tensors(path, tensor_shapes(config), values.get("tie_word_embeddings", False))


def tensor_slices(located):
    """Yield (name, tensor slice) for every tensor of read_pretrained's {name: file}, lazily: a slice reads
    nothing until indexed, slice[:] is the whole tensor and slice[a:b] only rows a..b-1 (how a sharded
    loader reads just its own rows). A tied lm_head.weight is not among them: it is model.embed_tokens.weight."""
    by_file = {}
    for name, file in located.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in names:
                yield name, f.get_slice(name)


def _locate_tensors(path, expected, tied):
    """{tensor name: file holding it}, after checking every safetensors header against expected."""
    expected = dict(expected)
    if tied:  # HF omits it from the file; older saves may not
        expected.pop("lm_head.weight", None)  # a reward model has no lm_head at all
    located = {}
    for file, listed in _checkpoint_files(path):
        header = read_safetensors_header(file)
        for name in listed:
            if name not in header:
                raise CheckpointError(f"{file}: missing tensor '{name}' (listed in model.safetensors.index.json)")
        for name, (dtype, shape) in header.items():
            if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                continue  # recomputed from config / shared with embed_tokens
            if name not in expected:
                raise CheckpointError(f"{file}: unexpected tensor '{name}'")
            if name in located:
                raise CheckpointError(f"{file}: tensor '{name}' also appears in {located[name].name}")
            if shape != expected[name]:
                raise CheckpointError(
                    f"{file}: tensor '{name}' has shape {shape}, config.json implies {expected[name]}"
                )
            if dtype not in SAFETENSORS_FLOATS:
                raise CheckpointError(
                    f"{file}: tensor '{name}' is stored as {dtype}; expected one of "
                    f"{', '.join(SAFETENSORS_FLOATS)} (quantized weights are not supported)"
                )
            located[name] = file
    missing = [name for name in expected if name not in located]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        where = next(f for f in (path / "model.safetensors.index.json", path / "model.safetensors") if f.is_file())
        raise CheckpointError(f"{where}: missing tensor '{missing[0]}'{more}")
    return located


def _checkpoint_files(path):
    """[(safetensors file, tensor names the index places in it)]."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid index ({e})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map'")
        shards = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        for shard, names in shards.items():
            if not (path / shard).is_file():
                raise CheckpointError(
                    f"{index}: shard '{shard}' is missing (it holds '{names[0]}' and {len(names) - 1} more)"
                )
        return [(path / shard, names) for shard, names in shards.items()]
    if (path / "model.safetensors").is_file():
        return [(path / "model.safetensors", [])]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def read_safetensors_header(file):
    """{tensor name: (dtype, shape)} from a safetensors file's header: an 8-byte little-endian length,
    then that many bytes of JSON giving each tensor's dtype, shape and byte range in the data that follows.
    A truncated file (an interrupted download or copy) is caught here, by its last byte range."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8 or n > 100 * 2**20:
            raise CheckpointError(f"{file}: not a safetensors file (header of {n} bytes in a file of {size})")
        try:
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            tensors = {
                name: (h["dtype"], tuple(int(x) for x in h["shape"]), int(h["data_offsets"][1]))
                for name, h in header.items()
            }
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{file}: the safetensors header does not parse ({type(e).__name__}: {e})") from None
    if tensors:
        name, (_, _, end) = max(tensors.items(), key=lambda item: item[1][2])
        if 8 + n + end > size:
            raise CheckpointError(f"{file}: truncated: tensor '{name}' ends at byte {8 + n + end}, the file has {size}")
    return {name: (dtype, shape) for name, (dtype, shape, _) in tensors.items()}


# ----------------------------------------------------------------------------------------------
# writing checkpoint folders


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)  # copied so the folder is complete


def write_checkpoint(folder, config, state, source_dir=None, dtype=None, max_shard_size=5 * 1024**3):
    """Write state (a state dict by HF names) into the existing folder as HF shards + index, config.json
    (the dict config, as config_json gives it), and source_dir's tokenizer / generation files; tensors cast
    to dtype if given."""
    folder, dtype = Path(folder), as_torch_dtype(dtype)
    if config["tie_word_embeddings"]:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    item_size = dtype.itemsize if dtype is not None else None
    shards, size = [[]], 0  # consecutive tensors, at most max_shard_size bytes per shard
    for name, t in state.items():
        nbytes = t.numel() * (item_size or t.element_size())
        if shards[-1] and size + nbytes > max_shard_size:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += nbytes
    weight_map, total_size = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: state[n].detach().to("cpu", dtype).contiguous() for n in names}
        save_file(tensors, folder / file, metadata={"format": "pt"})
        crash_point()
        weight_map.update({n: file for n in names})
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    crash_point()
    written = dtype or next(iter(state.values())).dtype
    config = {**config, "torch_dtype": str(written).removeprefix("torch.")}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    crash_point()
    for name in TOKENIZER_FILES if source_dir is not None else ():
        if (Path(source_dir) / name).is_file():
            shutil.copy2(Path(source_dir) / name, folder / name)
            crash_point()


# ----------------------------------------------------------------------------------------------
# atomic folders


_crash_calls = 0


def crash_point():
    """Test hook: with MPPO_CRASH_AFTER=N in the environment, the N-th call in this process kills it
    with SIGKILL, so tests can stop a save at every step between its files and renames."""
    global _crash_calls
    if "MPPO_CRASH_AFTER" in os.environ:
        _crash_calls += 1
        if _crash_calls == int(os.environ["MPPO_CRASH_AFTER"]):
            os.kill(os.getpid(), signal.SIGKILL)


MARKER = ".written-by-mppo"  # written first into every folder atomic_dir makes; it travels with the folder


@contextmanager
def atomic_dir(path):
    """Yield the folder <path>.tmp (holding only MARKER) to write into; on success it becomes path (an
    existing path is moved to <path>.old first and removed after), on an exception it is removed. The names
    are fixed, so a process killed at any moment leaves path complete (old or new) or repairable by
    clean_stale. MARKER tells this code's leftovers from a user's: a <path>.tmp or <path>.old without it is
    never touched, and the save is refused instead."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    _repair(path)
    for leftover in (tmp, old):
        if leftover.exists():
            raise FileExistsError(
                f"{leftover}: in the way of saving {path.name}, and not written by mppo "
                f"(no {MARKER} inside); move it away"
            )
    tmp.mkdir(parents=True)
    (tmp / MARKER).write_text("")
    try:
        yield tmp
        crash_point()
        if path.exists():
            path.rename(old)
            crash_point()
        tmp.rename(path)
        crash_point()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():  # failed between the two renames: put the old one back
            old.rename(path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _ours(folder):
    """A folder atomic_dir made: it holds MARKER, or it is empty (killed between mkdir and the marker)."""
    return folder.is_dir() and not folder.is_symlink() and ((folder / MARKER).is_file() or not any(folder.iterdir()))


def _repair(path):
    """Undo what a crash inside atomic_dir(path) left: remove the temporary folder; an old folder is the
    complete previous version: restore it if path is gone, else remove it. Only folders of our own."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if _ours(tmp):
        shutil.rmtree(tmp)
    if _ours(old):
        if not path.exists():
            old.rename(path)
            return [f"restored {path.name} from {old.name}"]
        shutil.rmtree(old)
    return []


def clean_stale(folder, names=None):
    """Repair what crashed saves left in folder: NAME.tmp removed, NAME.old restored as NAME if NAME is
    missing (else removed); names: a regex NAME must match in full (None: any). A folder without MARKER
    is someone else's and stays as it is. Returns a line for each folder restored."""
    restored = []
    for entry in sorted(Path(folder).iterdir()):
        name, dot, suffix = entry.name.rpartition(".")
        if dot and suffix in ("tmp", "old") and (names is None or re.fullmatch(names, name)) and entry.exists():
            restored += _repair(entry.with_name(name))
    return restored
