"""
A synthetic preference data set with UltraFeedback's size and length profile, to measure data loading
at the paper's scale without a download (issue 23):

    python scripts/make_ultrafeedback_like.py --out /tmp/uf64k                      # 64,000 groups x 4
    python scripts/make_ultrafeedback_like.py --out /tmp/uf16k --groups 16000
    python data.py --model /tmp/uf64k/model --data /tmp/uf64k/train.jsonl         # statistics + cache
    python train.py --model /tmp/uf64k/model --data /tmp/uf64k/train.jsonl --out /tmp/run --max_steps 1

It writes OUT/train.jsonl (canonical rows: prompt, 4 responses, scores 1-10 as UltraFeedback's
overall_score) and OUT/model: a tiny random Llama (hidden 64, 2 layers) with a Llama-3-like tokenizer
and Llama 3.1's chat template, so that tokenizing, not the model, is what the measurement sees.

Lengths, drawn per text from log-normals (seeded), in tokens of the tokenizer written, before the chat
template: prompts median 100 (mean about 165, up to 4,000), responses median 300 (mean about 370, up to
3,000). Under the Llama 3.1 template that is about 1,700 tokens a group, about 108 M for 64,000 groups,
the issue's figure for UltraFeedback under the real Llama 3 tokenizer.

The tokenizer: byte-level BPE with Llama 3's pre-tokenizer split and special tokens, trained here
(32,000 tokens) on the synthetic text itself, whose words are drawn from a Zipf law over pseudo-words.
The real Llama 3 tokenizer has 128,256 tokens; pass --tokenizer DIR (a folder with tokenizer.json and
tokenizer_config.json, e.g. a downloaded Llama 3.1 Instruct) to use it instead; the texts are then sized
by that tokenizer's characters per token.
"""

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Llama 3's pre-tokenizer split (tokenizer.json's Split pattern)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


def pseudo_words(rng, n):
    """n distinct lower-case pseudo-words of 1-3 syllables (most of one or two: about English's 4.7 letters)."""
    onsets = [
        "",
        "b",
        "c",
        "d",
        "f",
        "g",
        "h",
        "j",
        "k",
        "l",
        "m",
        "n",
        "p",
        "r",
        "s",
        "t",
        "v",
        "w",
        "th",
        "st",
        "pr",
        "tr",
        "ch",
        "sh",
        "bl",
        "gr",
    ]
    vowels = ["a", "e", "i", "o", "u", "ea", "ou", "io", "y"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "st"]
    words = set()
    while len(words) < n:
        k = rng.choice([1, 2, 3], p=[0.45, 0.4, 0.15])
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(k)))
    return sorted(words)


def tokenizer_words(path):
    """The whole words of a byte-level BPE vocabulary (a token that is a space and lower-case letters), most
    frequent first (BPE gives earlier merges lower ids): text of them tokenizes about as real English does."""
    vocab = Tokenizer.from_file(path).get_vocab()
    words = [(i, t[1:]) for t, i in vocab.items() if t.startswith("\u0120") and t[1:].isascii() and t[1:].isalpha()]
    return [w for _, w in sorted(words) if w.islower()]


def text_pool(rng, chars, words=None):
    """English-like text: Zipf-distributed words in sentences and paragraphs, some numbers and lists. The words:
    a real tokenizer's (tokenizer_words), or pseudo-words for the tokenizer trained here."""
    vocab = np.array(words or pseudo_words(rng, 50000))
    out, size = [], 0
    while size < chars:
        n = int(rng.integers(5, 26))
        ranks = (rng.zipf(1.15, n) - 1) % len(vocab)  # the tail folded back, not piled on the last word
        words = list(vocab[ranks])
        words[0] = words[0].capitalize()
        if rng.random() < 0.1:
            words.insert(int(rng.integers(0, n)), str(int(rng.integers(0, 10000))))
        sentence = " ".join(words) + rng.choice([".", ".", ".", "?", "!", ",", ":"])
        sep = rng.choice([" ", " ", " ", " ", "\n\n", "\n- ", "\n1. "])
        out.append(sentence + sep)
        size += len(sentence) + len(sep)
    return "".join(out)


def build_tokenizer(pool, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator((pool[i : i + 100_000] for i in range(0, len(pool), 100_000)), trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    return tok


def write_model(folder, tokenizer_dir, pool, vocab_size):
    """OUT/model: the tokenizer files (built or copied) and a tiny random Llama of the tokenizer's vocabulary."""
    import torch

    from model import Llama, LlamaConfig

    os.makedirs(folder, exist_ok=True)
    if tokenizer_dir:
        for name in (
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "generation_config.json",
            "chat_template.jinja",
        ):
            if os.path.isfile(os.path.join(tokenizer_dir, name)):
                shutil.copy(os.path.join(tokenizer_dir, name), folder)
        tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    else:
        tok = build_tokenizer(pool, vocab_size)
        tok.save(os.path.join(folder, "tokenizer.json"))
    if not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):  # a bare tokenizer.json: Llama 3.1's
        with open(os.path.join(os.path.dirname(HERE), "testdata", "llama-3.1-instruct.chat_template.jinja")) as f:
            template = f.read()
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump(
                {
                    "bos_token": "<|begin_of_text|>",
                    "eos_token": "<|eot_id|>",
                    "chat_template": template,
                    "model_max_length": 131072,
                    "tokenizer_class": "PreTrainedTokenizerFast",
                },
                f,
                indent=2,
            )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": tok.token_to_id("<|begin_of_text|>"),
        "eos_token_id": tok.token_to_id("<|eot_id|>"),
        "torch_dtype": "float32",
    }
    torch.manual_seed(0)
    Llama(LlamaConfig.from_dict(config)).save_pretrained(folder, source_dir=folder)
    return tok


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write train.jsonl and model/ into")
    p.add_argument("--groups", type=int, default=64000, help="preference groups (UltraFeedback: 64k prompts)")
    p.add_argument("--responses", type=int, default=4, help="responses per group (UltraFeedback: 4)")
    p.add_argument("--seed", type=int, default=0, help="seeds every draw: the same flags write the same files")
    p.add_argument("--tokenizer", default=None, help="a folder with a real tokenizer.json (default: build one)")
    p.add_argument("--vocab_size", type=int, default=32000, help="tokens of the tokenizer built here")
    args = p.parse_args()
    t0 = time.time()
    rng = np.random.default_rng(args.seed)
    words = tokenizer_words(os.path.join(args.tokenizer, "tokenizer.json")) if args.tokenizer else None
    pool = text_pool(rng, 12_000_000, words)
    tok = write_model(os.path.join(args.out, "model"), args.tokenizer, pool[:4_000_000], args.vocab_size)
    sample = pool[:2_000_000]
    chars_per_token = len(sample) / len(tok.encode(sample, add_special_tokens=False).ids)
    print(f"tokenizer: {tok.get_vocab_size()} tokens, {chars_per_token:.2f} characters a token on this text")

    def text(tokens):
        n = max(1, int(tokens * chars_per_token))
        start = int(rng.integers(0, len(pool) - n - 100))
        start = pool.find(" ", start) + 1  # begin on a word
        return pool[start : start + n].strip() or "ok"

    path = os.path.join(args.out, "train.jsonl")
    with open(path, "w") as f:
        for _ in range(args.groups):
            prompt = text(np.clip(rng.lognormal(np.log(100), 1.0), 5, 4000))
            lengths = np.clip(rng.lognormal(np.log(300), 0.65, args.responses), 1, 3000)
            scores = np.round(rng.uniform(1, 10, args.responses) * 2) / 2  # overall_score-like, in halves
            if scores.min() == scores.max():
                scores[0] = 10.0 if scores[0] < 10 else 1.0
            f.write(
                json.dumps({"prompt": prompt, "responses": [text(n) for n in lengths], "scores": scores.tolist()})
                + "\n"
            )
    print(
        f"wrote {path} ({os.path.getsize(path) / 1e6:.0f} MB, {args.groups} groups) and "
        f"{os.path.join(args.out, 'model')} in {time.time() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
