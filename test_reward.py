"""
Tests for reward.py: rewards equal transformers' LlamaForSequenceClassification on tiny checkpoints it
writes (float32, within 1e-4, batches with right padding and a response ending in the pad token), with
the conversation rendered by the reward model's own chat template; other architectures are refused.

Run: python -m pytest -q test_reward.py
"""

import json
import math
import os
import shutil

import pytest
import torch
import transformers

from conftest import DEMO
from hf_format import ConfigError
from reward import RewardModel

transformers.logging.set_verbosity_error()

PROMPTS = [
    "Sort: 3 1 2",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort: 9 4"}],
    "Sort the list 8 5 7 6 1 and say nothing else",
    "Sort: 1",
]
RESPONSES = ["1 2 3", "4 9", "1 5 6 7 8", "1"]


def make_reward_model(path, tie=False, pad=3):
    """A tiny random LlamaForSequenceClassification written by transformers (the demo's vocabulary, Llama 3
    chat template), weights redrawn at unit-ish scale so that rewards differ; returns the transformers model."""
    config = transformers.LlamaConfig(
        vocab_size=290,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=4,
        pad_token_id=pad,
        num_labels=1,
    )
    hf = transformers.LlamaForSequenceClassification(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(
                1 + 0.2 * torch.randn(p.shape, generator=g)
                if "norm" in name
                else 2 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1])
            )
    hf.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(DEMO, name), path / name)
    return hf


@pytest.mark.parametrize("tie", [False, True])
def test_rewards_match_transformers(tmp_path, tie):
    """Four conversations (one with a system turn) of different lengths, scored in one right-padded batch
    of 3 and 1 (batch_size 3), vs transformers: apply_chat_template(..., tokenize=True) of the same
    tokenizer folder, each conversation alone, logits[0, 0]. A response whose last token is the pad token
    is pooled at the last token before it, as transformers pools it; its batch with padding agrees too."""
    hf = make_reward_model(tmp_path, tie=tie)
    rm = RewardModel.from_pretrained(tmp_path, batch_size=3)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    expected, ids = [], []
    for p, r in zip(PROMPTS, RESPONSES):
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else p
        conv = hf_tok.apply_chat_template(
            messages + [{"role": "assistant", "content": r}], tokenize=True, return_dict=False
        )
        assert rm.encode(p, r) == conv
        ids.append(conv)
        with torch.no_grad():
            expected.append(float(hf(torch.tensor([conv])).logits[0, 0]))
    assert len(set(map(len, ids))) == len(ids)
    ours = rm.score_texts(PROMPTS, RESPONSES)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(expected), rtol=0, atol=1e-4)
    assert max(expected) - min(expected) > 0.1  # the rewards differ, so the comparison means something
    # a sequence ending in the pad token (3), in a padded batch: transformers pools the last non-pad token
    padded = [ids[2] + [3], ids[0]]
    L = max(map(len, padded))
    batch = torch.tensor([s + [3] * (L - len(s)) for s in padded])
    mask = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in padded])
    with torch.no_grad():
        theirs = hf(batch, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(torch.tensor(rm.score_ids(padded)), theirs, rtol=0, atol=1e-4)
    torch.testing.assert_close(theirs[0], torch.tensor(expected[2]), rtol=0, atol=1e-4)


def test_other_architectures_refused(tmp_path):
    """A causal LM folder, and a classifier with two labels, are refused with one line naming config.json."""
    make_reward_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(
        ConfigError,
        match=r"config.json: 'architectures' is \['LlamaForCausalLM'\]; only "
        r"\['LlamaForSequenceClassification'\] is supported",
    ):
        RewardModel.from_pretrained(tmp_path)
    labels = {"id2label": {"0": "bad", "1": "good"}, "label2id": {"bad": 0, "good": 1}}
    (tmp_path / "config.json").write_text(json.dumps({**config, **labels}))
    with pytest.raises(ConfigError, match="config.json: a reward model gives one score per answer .* has 2$"):
        RewardModel.from_pretrained(tmp_path)
