"""
Writes the embedded demo that `python train.py` runs with no arguments: a tiny Llama 3
config, a small byte-level BPE tokenizer with Llama 3's special tokens and chat template,
and three small datasets. Deterministic: running it again rewrites the same files.

    python demo/make_demo.py          # writes next to this file

The task: "sort d a c a" must be answered "a a c d". The SFT demonstrations come from
sloppy annotators: most of them answer lazily by copying the letters unsorted, a minority
sorts them. A model fine-tuned on them learns both behaviours and mostly copies. The
preference groups hold 3 to 5 responses per prompt (a sorted answer and assorted
mistakes) with 1-10 scores, as a judge would give them; MPPO must teach the model to
prefer the sorted answer it already knows how to write.

The judge ties, as GPT-4's 1-10 scores in UltraFeedback often do: in TOP_TIE_SHARE of the groups
a second correct answer written differently ("a, a, c, d") also gets 10, and the judge's coarse
scale gives two different mistakes the same score in many groups (a lost letter and a swapped
pair both 5; the reversed list and the lazy copy both 2). Four files: sft.jsonl (demonstrations),
train.jsonl (preference groups), valid.jsonl (held-out groups for choosing hyperparameters,
e.g. compare.py's learning rate) and eval.jsonl (held-out groups for reporting only).
"""

import json
import os
import random

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Llama 3's chat template, as its tokenizer_config.json carries it
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Llama 3's pre-tokenizer split: digits apart from the spaces before them, newlines on their own
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
SFT_SORTED_SHARE = 0.3  # share of SFT demonstrations that sort; the rest copy the input
# Share of preference groups with two different answers tied for the best score. UltraFeedback's
# exact share is not measured here (no download); about 20% is assumed for its four GPT-4-scored
# responses per prompt on a 1-10 scale, where two good answers often both get 8, 9 or 10.
TOP_TIE_SHARE = 0.2
MIDDLE_TIE_SHARE = 0.5  # share of mistakes the judge scores one step coarser, so that some tie
N_SFT, N_TRAIN, N_EVAL, N_VALID = 6000, 2400, 300, 300


LETTERS = "abcdefghij"


def letters_prompt(rng):
    """A list of 3 to 6 letters that is not sorted already (so copying is really wrong)."""
    while True:
        xs = [rng.choice(LETTERS) for _ in range(rng.randint(3, 6))]
        if xs != sorted(xs):
            return xs


def show(xs):
    return " ".join(xs)


def mistakes(xs, rng):
    """Wrong answers to 'sort xs', each with the score a judge would give it (1-10). The judge is
    coarse: with probability MIDDLE_TIE_SHARE a reversed list scores like the lazy copy (2), and
    a swapped pair like a lost letter (5), so distinct mistakes often tie."""
    s = sorted(xs)
    coarse = lambda: rng.random() < MIDDLE_TIE_SHARE  # noqa: E731
    out = {show(xs): 2}  # lazy: the input copied unsorted
    if s[::-1] != s:
        out.setdefault(show(s[::-1]), 2 if coarse() else 3)  # sorted the wrong way round
    i = rng.randrange(len(s) - 1)
    swapped = s[:i] + [s[i + 1], s[i]] + s[i + 2 :]
    if swapped != s:
        out.setdefault(show(swapped), 5 if coarse() else 6)  # almost sorted: two neighbours swapped
    dropped = s[:i] + s[i + 1 :]
    out.setdefault(show(dropped), 5)  # sorted, but a letter lost
    shuffled = xs[:]
    rng.shuffle(shuffled)
    if shuffled != s:
        out.setdefault(show(shuffled), 1)  # noise
    out.pop(show(s), None)
    return out


def judge(prompt, response):
    """The demo's judge as a verifier (generate.py --scorer demo/make_demo.py:judge, onpolicy.py): the
    1-10 score of `response` to `prompt` ("sort d b a c", or a chat whose last user turn is that) on
    the preference data's scale. 10: sorted, with spaces or commas; 2: the letters copied unsorted;
    3: sorted the wrong way round; 6: sorted but for two neighbours swapped; 5: sorted with one letter
    lost; 1: anything else. Where mistakes() draws a coarser score (a swap 5, a reversal 2), the
    verifier, being deterministic, gives the finer one."""
    if isinstance(prompt, list):  # chat messages: the last user turn
        prompt = [m["content"] for m in prompt if m.get("role") == "user"][-1]
    words = prompt.split()
    if len(words) < 2 or words[0] != "sort":
        raise ValueError(f"judge: not a demo prompt ('sort' and letters): {prompt!r}")
    xs, s = words[1:], sorted(words[1:])
    answer = response.strip()
    if answer in (show(s), ", ".join(s)):
        return 10.0
    got = answer.split(" ")
    if got == xs:
        return 2.0
    if got == s[::-1]:
        return 3.0
    if any(got == s[:i] + [s[i + 1], s[i]] + s[i + 2 :] for i in range(len(s) - 1)):
        return 6.0
    if any(got == s[:i] + s[i + 1 :] for i in range(len(s))):
        return 5.0
    return 1.0


def preference_group(xs, rng):
    """One prompt, the sorted answer (score 10), in TOP_TIE_SHARE of the groups also the sorted
    answer with commas (score 10 too: a tie at the top), and 2 to 4 mistakes, in random order."""
    wrong = mistakes(xs, rng)
    copy = show(xs)
    others = [r for r in wrong if r != copy]
    rng.shuffle(others)
    keep = [copy] + others[: rng.randint(1, 3)]  # the lazy copy is always there: it is what the SFT model does
    best = [show(sorted(xs))] + ([", ".join(sorted(xs))] if rng.random() < TOP_TIE_SHARE else [])
    rows = [(r, 10.0) for r in best] + [(r, float(wrong[r])) for r in keep]
    rng.shuffle(rows)
    return {"prompt": f"sort {show(xs)}", "responses": [r for r, _ in rows], "scores": [s for _, s in rows]}


def sft_row(xs, rng):
    """One demonstration: sorted with probability SFT_SORTED_SHARE, else the lazy copy."""
    answer = sorted(xs) if rng.random() < SFT_SORTED_SHARE else xs
    return {"prompt": f"sort {show(xs)}", "responses": [show(answer)], "scores": [1.0]}


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build_tokenizer(texts):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    # like Llama 3's tokenizer.json: the post-processor prepends <|begin_of_text|> by itself
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    return tok


def main(out=HERE, seed=0):
    rng = random.Random(seed)
    seen = set()

    def new_prompts(n):  # every prompt once: held-out prompts are never trained on
        drawn = []
        while len(drawn) < n:
            xs = letters_prompt(rng)
            if tuple(xs) not in seen:
                seen.add(tuple(xs))
                drawn.append(xs)
        return drawn

    prompts = new_prompts(N_SFT + N_TRAIN + N_EVAL)
    sft = [sft_row(xs, rng) for xs in prompts[:N_SFT]]
    train = [preference_group(xs, rng) for xs in prompts[N_SFT : N_SFT + N_TRAIN]]
    evals = [preference_group(xs, rng) for xs in prompts[N_SFT + N_TRAIN :]]
    valid = [preference_group(xs, rng) for xs in new_prompts(N_VALID)]
    os.makedirs(out, exist_ok=True)
    for name, rows in (("sft", sft), ("train", train), ("valid", valid), ("eval", evals)):
        write_jsonl(os.path.join(out, f"{name}.jsonl"), rows)

    texts = (
        ["user\n\n", "assistant\n\n", "system\n\n"]
        + [r["prompt"] for r in train]
        + [x for r in train for x in r["responses"]]
    )
    tok = build_tokenizer(texts)
    tok.save(os.path.join(out, "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>",
                "model_max_length": 256,
                "chat_template": CHAT_TEMPLATE,
                "tokenizer_class": "PreTrainedTokenizerFast",
            },
            f,
            indent=2,
        )
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(
            {"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]},
            f,
            indent=2,
        )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": ids["<|begin_of_text|>"],
        "eos_token_id": ids["<|eot_id|>"],
        "torch_dtype": "float32",
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    top_ties = sum(sorted(r["scores"])[-2] == 10.0 for r in train) / len(train)
    print(
        f"wrote the demo to {out}: {len(sft)} SFT rows, {len(train)} train groups ({top_ties:.0%} tied at the top), "
        f"{len(valid)} valid groups, {len(evals)} eval groups, vocab {config['vocab_size']}"
    )


if __name__ == "__main__":
    main()
