"""Helpers shared by the test files: tiny Llamas with the demo's tokenizer, the demo's data, and
train.py run in this process or as a user runs it."""

import atexit
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
from safetensors.torch import load_file

from model import Llama, LlamaConfig

HERE = os.path.dirname(os.path.abspath(__file__))

# train.py and data.py keep tokenized data sets in a cache (default ~/.cache/mppo): the tests, and the
# train.py processes they start, keep theirs in a temporary folder removed when the session ends.
os.environ["MPPO_CACHE"] = tempfile.mkdtemp(prefix="mppo-test-cache-")
atexit.register(shutil.rmtree, os.environ["MPPO_CACHE"], ignore_errors=True)

DEMO = os.path.join(HERE, "demo")
TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16
)


def save_demo_llama(path, **sizes):
    """Write a random Llama (seed 0) with the demo's vocabulary, special tokens and tokenizer files
    to path; sizes override TINY (hidden 32, 1 layer). Returns path."""
    with open(os.path.join(DEMO, "config.json")) as f:
        config = json.load(f)
    config.update({**TINY, **sizes})
    torch.manual_seed(0)
    Llama(LlamaConfig.from_dict(config)).save_pretrained(path, source_dir=DEMO)
    return path


def copy_demo_rows(name, n, path):
    """Write the first n lines of the demo's data file `name` (e.g. "train.jsonl") to path; returns path."""
    with open(os.path.join(DEMO, name)) as f, open(path, "w") as g:
        g.writelines(f.readlines()[:n])
    return path


# ------------------------------------------------------------------------------------------------
# tiny checkpoints written by transformers itself


def spread_weights(model, seed=0):
    """Redraw a transformers model's weights at unit-ish scale (norms near 1, matrices ~ N(0, 4 / fan_in)),
    so that logits spread out: HF's 0.02 init gives near-constant logits, where a parity test proves little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(2 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return model


LLAMA3 = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)  # with head_dim 16 this puts frequencies in all three llama3 bands
EXTRA_FILES = {"tokenizer.json": '{"model": "dummy"}\n', "chat_template.jinja": "{{ messages }}\n"}


def make_checkpoint(path, seed=0, shard=False, old_style=False, rope=LLAMA3, tie=True, nkv=2, head_dim=None):
    """Write a tiny random Llama checkpoint with transformers' own save_pretrained; return the HF model.
    Weights are redrawn at unit-ish scale so logits spread out (HF's 0.02 init gives near-constant logits)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=nkv,
        head_dim=head_dim,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_parameters=dict(rope),
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    hf = spread_weights(transformers.LlamaForCausalLM(config).eval(), seed)
    hf.save_pretrained(path, max_shard_size="20KB" if shard else "10MB")
    for name, text in EXTRA_FILES.items():
        (path / name).write_text(text)
    if old_style:  # rewrite config.json with the keys transformers < 5 wrote
        d = json.loads((path / "config.json").read_text())
        rope_parameters = d.pop("rope_parameters")
        d["rope_theta"] = rope_parameters.pop("rope_theta")
        rope_type = rope_parameters.pop("rope_type")
        d["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope_parameters}
        d["torch_dtype"] = d.pop("dtype")
        (path / "config.json").write_text(json.dumps(d))
    return hf


# ------------------------------------------------------------------------------------------------
# Comparing runs whose float32 sums are taken in another order
#
# Two runs that compute the same steps with their sums in another order (2 ranks against 1,
# another split into micro-batches, FSDP's sharded reductions, another layout of the batch, another
# CPU's kernels) get gradients that differ in their last bits: re-associating a float32 sum of n
# terms changes it by up to about n * 1.2e-7 * sum(|terms|), which is a large share of the result
# where the terms cancel (a gradient element near zero). AdamW turns each gradient element into a
# step of at most about lr whatever the gradient's scale, so such an element's weight can move by a
# noticeable share of lr differently in the two runs (at worst 2 lr, its sign flipped), and later
# steps build on the moved weights. A bound that holds whatever the CPU is therefore a share of how
# far training can move a weight, lr * steps, not a relative tolerance on the weight's value:
#
#     |w_a - w_b| <= REORDER * lr * steps
#
# REORDER = 0.01. Measured on this project's 2-core x86 machine (setup's tiny Llama, hidden 64,
# 6 steps of Pair-MNM at lr 1e-3 against one process): the worst element differed by 1.40e-6 for
# 2-rank DDP, 1.44e-6 for FSDP (the 1.44e-6 another machine failed on), 1.01e-6 for the padded
# layout, 1.55e-6 for attention per segment, 0.58e-6 for micro-batches of 2: at most 2.6e-4 of
# lr * steps, 40 times below the bound. A real fault, such as one micro-batch's gradient counted
# twice, moves most weights by a share of lr per step, far above it.
# Where the order is the same (a resumed run against an uninterrupted one) weights are compared for
# bit-identity instead.
REORDER = 0.01


def reorder_atol(lr, steps):
    """The absolute tolerance between the weights of two runs of `steps` AdamW steps at learning rate
    lr that differ only in float32 summation order (see above)."""
    return REORDER * lr * steps


def assert_same_training(actual, expected, lr, steps):
    """Two state dicts (name -> tensor) after the same training in another summation order agree
    within reorder_atol; a failure names the tensor and keeps torch's report of the mismatch."""
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(
            actual[name],
            expected[name],
            rtol=0,
            atol=reorder_atol(lr, steps),
            msg=lambda report, name=name: f"{name}: {report}",
        )


def weights(folder):
    """Every tensor of a Hugging Face folder's *.safetensors files, by name."""
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def records(out, split=None):
    """The records of OUT/metrics.jsonl, only those of one split ("train", "eval") if given."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if split is None or r["split"] == split]


def run(*argv):
    """train.py in this process (fast: no interpreter start-up, no re-import of torch)."""
    import train

    return train.train(train.parse_args([str(a) for a in argv]))


def run_cli(*argv, nproc=None, cwd=HERE, env=None, script="train.py"):
    """A script as a user runs it: `python train.py ...`, or torchrun with nproc processes."""
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc
        else [sys.executable]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        launcher + [os.path.join(HERE, script)] + [str(a) for a in argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """A tiny Llama with the demo's tokenizer, briefly fine-tuned on the demo's SFT rows (so its
    rewards p are far from 0, where p-based losses have gradients), and 128 preference groups."""
    root = tmp_path_factory.mktemp("train")
    save_demo_llama(
        root / "init",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    for name, n in (("sft.jsonl", 640), ("train.jsonl", 128)):
        copy_demo_rows(name, n, root / name)
    sft = run(
        "--model",
        root / "init",
        "--data",
        root / "sft.jsonl",
        "--loss",
        "sft",
        "--out",
        root / "sft",
        "--batch_size",
        32,
        "--micro_batch_size",
        32,
        "--lr",
        3e-3,
        "--max_length",
        64,
        "--max_prompt_length",
        32,
        "--log_every",
        100,
    )
    return {"root": root, "model": sft, "data": root / "train.jsonl"}


LR = 1e-3  # common()'s --lr


def common(setup, out, **overrides):
    """train.py flags of a short run on setup's model and data; overrides replace or add flags."""
    args = {
        "--model": setup["model"],
        "--data": setup["data"],
        "--out": out,
        "--batch_size": 16,
        "--micro_batch_size": 4,
        "--lr": LR,
        "--max_length": 64,
        "--max_prompt_length": 32,
        "--log_every": 1,
        "--warmup_ratio": 0.0,
        "--seed": 0,
    }
    args.update(overrides)
    return [x for kv in args.items() for x in kv]
