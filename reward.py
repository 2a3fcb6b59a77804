"""
Reward models: a Hugging Face LlamaForSequenceClassification folder (Skywork-Reward-Llama-3.1-8B,
FsfairX-LLaMA3-RM, ...) loaded into this project's Llama body with a linear score head.

The reward of (prompt, response) is what transformers computes: the conversation rendered with the
reward model's own chat template (apply_chat_template, tokenized), the body run over it, and the score
head applied to the hidden state of the last token that is not pad_token_id.

    rm = RewardModel.from_pretrained("Skywork-Reward-Llama-3.1-8B-v0.2", dtype=torch.bfloat16, device="cuda")
    scores = rm.score_texts(prompts, responses)
"""

import json

import torch
import torch.nn as nn

from chat import ChatTokenizer
from hf_format import ConfigError, as_torch_dtype, read_pretrained, tensor_slices
from model import Llama, LlamaConfig

ARCHITECTURE = "LlamaForSequenceClassification"


class LlamaForSequenceClassification(Llama):
    """The Llama body (model.*) with score = Linear(hidden, num_labels, bias=False) in place of lm_head,
    named as transformers names it, so its checkpoint loads strictly."""

    def __init__(self, config, num_labels=1):
        super().__init__(config)
        del self.lm_head  # (tie_word_embeddings has nothing to tie here)
        self.score = nn.Linear(config.hidden_size, num_labels, bias=False)
        nn.init.normal_(self.score.weight, std=0.02)

    def forward(self, input_ids, pad_token_id=None):
        """input_ids (B, T), each row right-padded with pad_token_id. Returns the score head on the last token
        that is not pad_token_id in each row, (B, num_labels) float32, as transformers pools it (the last
        position when pad_token_id is None). Right padding needs no mask: causal attention never lets a real
        token see the padding after it."""
        h = super().forward(input_ids, return_hidden=True)  # (B, T, H)
        if pad_token_id is None:
            last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        else:  # the rightmost non-pad index (argmax picks the largest index among the non-pad ones)
            index = torch.arange(input_ids.shape[1], device=input_ids.device)
            last = (index * (input_ids != pad_token_id)).argmax(-1)  # (B,)
        return self.score(h[torch.arange(h.shape[0], device=h.device), last]).float()  # (B, num_labels)


class RewardModel:
    """A LlamaForSequenceClassification checkpoint with its tokenizer: rewards of (prompt, response) pairs."""

    def __init__(self, model, tok, pad_token_id, batch_size=8):
        self.model, self.tok, self.pad_token_id, self.batch_size = model, tok, pad_token_id, batch_size

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", batch_size=8):
        """Load a LlamaForSequenceClassification folder; any other architecture is refused in one line."""
        shapes = LlamaForSequenceClassification.tensor_shapes
        config, located = read_pretrained(path, _make_config, shapes, architecture=ARCHITECTURE)
        with torch.device("meta"):  # no memory until the real tensors are assigned
            model = LlamaForSequenceClassification(config)
        state = {name: t[:].to(device=device, dtype=as_torch_dtype(dtype)) for name, t in tensor_slices(located)}
        model.load_state_dict(state, strict=True, assign=True)
        model.source_dir = str(path)
        return cls(model.eval(), ChatTokenizer.from_pretrained(path), config.pad_token_id, batch_size)

    def encode(self, prompt, response):
        """The token ids transformers' apply_chat_template(conversation + [assistant response], tokenize=True)
        gives with the reward model's template. prompt: a string (one user message) or a list of messages."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return self.tok.encode_prompt(
            messages + [{"role": "assistant", "content": response}], add_generation_prompt=False
        )

    @torch.no_grad()
    def score_ids(self, sequences):
        """Rewards (floats) of token-id lists, batch_size at a time, longest first (less padding); one at a
        time without a pad_token_id (transformers then pools the last position, which padding would move)."""
        device = self.model.model.embed_tokens.weight.device
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        out = [0.0] * len(sequences)
        size = self.batch_size if self.pad_token_id is not None else 1
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            T = len(sequences[batch[0]])
            ids = torch.full(
                (len(batch), T), self.pad_token_id if self.pad_token_id is not None else 0, dtype=torch.long
            )
            for row, i in enumerate(batch):
                ids[row, : len(sequences[i])] = torch.as_tensor(sequences[i])
            scores = self.model(ids.to(device), self.pad_token_id)[:, 0].tolist()
            for i, s in zip(batch, scores):
                out[i] = s
        return out

    def score_texts(self, prompts, responses):
        """The reward of each (prompt, response) pair."""
        return self.score_ids([self.encode(p, r) for p, r in zip(prompts, responses)])


def _make_config(values, source):
    """LlamaConfig of the body, after checking transformers' num_labels: the length of id2label when
    config.json has it, else num_labels, else 2."""
    with open(source) as f:
        raw = json.load(f)
    n = len(raw["id2label"]) if isinstance(raw.get("id2label"), dict) else raw.get("num_labels", 2)
    if n != 1:
        raise ConfigError(f"{source}: a reward model gives one score per answer (num_labels 1); this one has {n}")
    return LlamaConfig.from_values(values, source)
