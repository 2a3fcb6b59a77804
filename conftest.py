"""Helpers shared by the test files that train or score a tiny Llama on the demo's data."""

import json
import os

import torch

from model import Llama, LlamaConfig

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16)


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

