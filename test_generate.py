"""
Tests for generate.py: batched greedy decoding against one-at-a-time decoding and against transformers'
generate(do_sample=False) on a shrunk SmolLM2-shaped checkpoint (prompts from its chat template), the
sampling distribution against softmax(logits / T) cut to top-k / top-p by a naive loop (chi-square), and
the prompts -> scored groups pipeline (merging, ties, kill and restart, training on its output).

Run: python -m pytest -q test_generate.py
"""

import json
import math
import os

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from chat import ChatTokenizer
from conftest import spread_weights
from generate import filter_probs, generate, generate_batch, sample_n, sample_tokens
from model import Llama

transformers.logging.set_verbosity_error()
HERE = os.path.dirname(os.path.abspath(__file__))
SMOLLM2 = os.path.join(HERE, "testdata", "configs", "HuggingFaceTB--SmolLM2-135M-Instruct.json")
SMOLLM2_TEMPLATE = os.path.join(HERE, "testdata", "smollm2-instruct.chat_template.jinja")
SHRUNK = dict(hidden_size=144, intermediate_size=384, num_hidden_layers=2)  # 9 heads / 3 kv heads of width 16 kept
QUESTIONS = [
    "Hi",
    "Sort: 3 1 2",
    "What is the capital of France?",
    "Write a short poem about the sea and the wind over it at night, in four lines.",
    "Explain why the sky is blue and why sunsets are red, in two sentences, for a child of five or six.",
]


def build_tokenizer(folder):
    """A byte-level BPE tokenizer with SmolLM2's special tokens (ids 0, 1, 2) and chat template, trained here
    on a few sentences (the real one cannot be downloaded offline); its ids are a subset of the model's vocab."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(QUESTIONS * 3, trainer)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(SMOLLM2_TEMPLATE) as f:
        template = f.read()
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "chat_template": template,
        "model_max_length": 8192,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct's config.json as the Hub ships it, shrunk in width and depth, random weights
    written by transformers; returns (folder, transformers model, our model, prompt ids of QUESTIONS)."""
    folder = tmp_path_factory.mktemp("smollm2")
    with open(SMOLLM2) as f:
        config = {**json.load(f), **SHRUNK}
    with open(folder / "config.json", "w") as f:
        json.dump(config, f)
    hf = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(folder)).eval()
    spread_weights(hf, seed=0)
    hf.save_pretrained(folder)
    build_tokenizer(folder)
    tok = ChatTokenizer.from_pretrained(folder)
    prompts = [tok.encode_prompt(q) for q in QUESTIONS]
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert prompts == [
        hf_tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for q in QUESTIONS
    ]
    return folder, hf, Llama.from_pretrained(folder).eval(), prompts


def same_or_tie(model, prompt, a, b, tol):
    """a and b (token lists continuing prompt) are equal, or first differ where the two tokens' logits
    (one full forward of prompt + the common prefix) are within tol: a tie that rounding may break either way."""
    j = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if j is None:
        return len(a) == len(b)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + a[:j]]))[0, -1]
    return abs(float(logits[a[j]] - logits[b[j]])) <= tol


# float32 logits of this model are O(10); our and transformers' logits agree to ~1e-5 (test_model.py's
# parity tests hold 1e-6 on smaller models), so a pair of tokens closer than 1e-4 is a tie either may break
TIE = 1e-4


def test_batched_greedy_equals_one_at_a_time_and_transformers(smollm2):
    """Five chat prompts of different lengths in one left-padded batch, 32 greedy tokens: each row equals our
    generate() of that prompt alone and transformers' generate(do_sample=False) on the same batch
    (with its attention mask); a difference counts only where the two tokens' logits tie."""
    folder, hf, model, prompts = smollm2
    assert len(set(map(len, prompts))) == len(prompts)  # all lengths differ
    ours = generate_batch(model, prompts, 32)
    alone = [generate(model, p, 32) for p in prompts]
    L = max(map(len, prompts))
    ids = torch.tensor([[2] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        theirs = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=2
        )[:, L:].tolist()
    exact = 0
    for p, o, a, t in zip(prompts, ours, alone, theirs):
        assert len(o) == 32 and len(set(o)) > 4  # no degenerate repeat of one token
        assert same_or_tie(model, p, o, a, TIE) and same_or_tie(model, p, o, t, TIE)
        exact += o == a == t
    assert exact >= len(prompts) - 1  # ties are rare: at most one row may take the other branch


def test_stop_tokens_and_shared_prefill(smollm2):
    """Per-row stop: with a stop token that row 1 produces at step 5, row 1 ends there (stop token last)
    and the other rows, which leave the batch at other times, still equal generate(); num_samples=3 greedy
    samples of each prompt all equal generate(); sample_n's draws with per-row generators equal generate()
    with the same seeds, or first differ where the two tokens tie (same_or_tie: float32 order can swap two tied
    tokens in the sorted order the draw walks; seen on one CPU with top-p alone, which keeps ~45k nearly equal
    probabilities of these random weights). The draws keep the top 40 tokens, whose cumulative sums lie far
    apart, so a draw next to a boundary is not the other way to differ."""
    _, _, model, prompts = smollm2
    ref = [generate(model, p, 16) for p in prompts[:3]]
    stop = ref[1][5]
    cut = [r[: r.index(stop) + 1] if stop in r else r for r in ref]
    assert generate_batch(model, prompts[:3], 16, stop_ids=[stop]) == cut
    assert generate_batch(model, prompts[:3], 16, num_samples=3) == [r for r in ref for _ in range(3)]
    seeds = [11, 12, 13, 14]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    drawn = sample_n(model, prompts[0], 4, 12, temperature=0.8, top_p=0.95, top_k=40, generator=gens)
    alone = [
        generate(model, prompts[0], 12, 0.8, 0.95, generator=torch.Generator().manual_seed(s), top_k=40) for s in seeds
    ]
    assert all(same_or_tie(model, prompts[0], d, a, TIE) for d, a in zip(drawn, alone))
    assert sum(d == a for d, a in zip(drawn, alone)) >= len(seeds) - 1
    assert len(set(map(tuple, drawn))) > 1


def test_rows_independent_of_batch(smollm2):
    """With one generator per row, a sampled row's tokens do not depend on what else is in the batch
    (temperatures and top-p given per row; the greedy row draws nothing)."""
    _, _, model, prompts = smollm2

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    both = generate_batch(
        model, prompts[1:4], 12, temperature=[0.7, 0.0, 1.0], top_p=[0.9, 1.0, 0.8], generators=gens([5, 6, 7])
    )
    assert both[0] == generate_batch(model, prompts[1:2], 12, temperature=0.7, top_p=0.9, generators=gens([5]))[0]
    assert both[2] == generate_batch(model, prompts[3:4], 12, temperature=1.0, top_p=0.8, generators=gens([7]))[0]
    assert both[1] == generate(model, prompts[2], 12)


def nucleus(p, top_p, top_k):
    """The reference: probabilities p cut to the top_k most likely, renormalised, then to the shortest
    most-likely prefix whose mass reaches top_p, renormalised; a plain loop over the sorted tokens."""
    order = sorted(range(len(p)), key=lambda i: -p[i])[: top_k or len(p)]
    total = sum(p[i] for i in order)
    kept, mass = [], 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.append(i)
        mass += p[i] / total
    return {i: p[i] / sum(p[j] for j in kept) for i in kept}


def chi2_threshold(df, z=4.753):
    """Chi-square quantile by Wilson and Hilferty's cube-root normal approximation; z = 4.753 is the
    standard normal's 1 - 1e-6 quantile, so a correct sampler fails with probability about 1e-6."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


PEAKED = [3.0, 2.5, 2.0, 1.5, 1.0] + [-8.0] * 2995  # 98% of the mass on 5 tokens: top-p sorts only candidates
CASES = {
    "T0.7-p0.8": (0.7, 0.8, 0, None),
    "T1.3-p0.95": (1.3, 0.95, 0, None),
    "T1-p0.9-k3": (1.0, 0.9, 3, None),
    "T0.5": (0.5, 1.0, 0, None),
    "3000-tokens-p0.84": (1.0, 0.84, 0, PEAKED),
}


@pytest.mark.parametrize("case", CASES)
def test_sampling_follows_truncated_softmax(case):
    """Draws (one row each, one generator, fixed seed) from fixed logits (8 tokens, or 3,000 with most of the
    mass on 5, where only the most likely candidates are sorted): tokens outside the nucleus never appear, and
    the counts of the rest pass a chi-square test against nucleus()'s probabilities at a threshold a correct
    sampler exceeds with probability ~1e-6; filter_probs equals nucleus() to float32 rounding."""
    temperature, top_p, top_k, values = CASES[case]
    logits = torch.tensor(values or [2.0, 1.5, 1.2, 0.9, 0.3, 0.0, -0.5, -1.0])
    V = len(logits)
    p = torch.softmax(logits.double() / temperature, -1).tolist()
    expected = nucleus(p, top_p, top_k)
    N = 200_000 if V < 100 else 5_000
    rows = logits.expand(N, -1)
    settings = [torch.full((N,), temperature), torch.full((N,), top_p), torch.full((N,), top_k)]
    tokens = sample_tokens(rows, *settings, generators=torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=V).tolist()
    assert {i for i, c in enumerate(counts) if c} == set(expected)
    chi2 = sum((counts[i] - N * q) ** 2 / (N * q) for i, q in expected.items())
    assert chi2 < chi2_threshold(len(expected) - 1)
    probs = filter_probs(logits[None], *[s[:1] for s in settings])[0]
    torch.testing.assert_close(probs, torch.tensor([expected.get(i, 0.0) for i in range(V)]), rtol=0, atol=1e-6)


def test_sample_n_first_token_distribution(smollm2):
    """sample_n's first tokens (2,000 samples sharing one prefill, top-k 4 at T=1.5) follow the model's own
    next-token probabilities cut to its top 4 (chi-square, threshold as above)."""
    _, _, model, prompts = smollm2
    N = 2000
    first = [
        s[0]
        for s in sample_n(model, prompts[1], N, 1, temperature=1.5, top_k=4, generator=torch.Generator().manual_seed(0))
    ]
    with torch.no_grad():
        logits = model(torch.tensor([prompts[1]]))[0, -1].float()
    expected = nucleus(torch.softmax(logits / 1.5, -1).tolist(), 1.0, 4)
    counts = {t: first.count(t) for t in set(first)}
    assert set(counts) <= set(expected) and min(expected.values()) * N > 20  # chi-square needs no tiny bins
    chi2 = sum((counts.get(i, 0) - N * q) ** 2 / (N * q) for i, q in expected.items())
    assert chi2 < chi2_threshold(len(expected) - 1)


# ----------------------------------------------------------------------------------------------
# generate.py as a command: prompts -> scored groups

SCORER = "def score(prompt, response):\n    return float(len(set(response)) % 3)\n"  # ties are common


def pipeline_flags(root, out, **changes):
    flags = {
        "--model": root / "model",
        "--out": out,
        "--num_samples": 5,
        "--max_new_tokens": 3,
        "--temperature": 1.0,
        "--top_k": 2,
        "--scorer": f"{root / 'scorer.py'}:score",
        "--chunk_size": 2,
        "--batch_size": 2,
        "--seed": 0,
        **changes,
    }
    prompts = ["--prompts", str(root / "prompts.jsonl"), str(root / "more.jsonl")]
    return prompts + [str(x) for kv in flags.items() for x in kv]


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    """A tiny random Llama with the demo's tokenizer; 5 demo rows (canonical: only their prompts are used) and
    a file of prompt-only rows, one repeating a demo prompt; a verifier in a .py file."""
    from conftest import copy_demo_rows, save_demo_llama

    root = tmp_path_factory.mktemp("groups")
    save_demo_llama(root / "model")
    copy_demo_rows("train.jsonl", 5, root / "prompts.jsonl")
    first = json.loads(open(root / "prompts.jsonl").readline())["prompt"]
    more = [{"prompt": "sort b a"}, {"prompt": first}, {"prompt": [{"role": "user", "content": "sort c a b"}]}]
    (root / "more.jsonl").write_text("".join(json.dumps(r) + "\n" for r in more))
    (root / "scorer.py").write_text(SCORER)
    prompts = [json.loads(line)["prompt"] for line in open(root / "prompts.jsonl")] + ["sort b a", "sort c a b"]
    return root, prompts


def test_groups_file(groups, capsys):
    """Every distinct prompt gets one group, in order: distinct answers (identical draws merged, counted; empty
    ones dropped), each scored by the verifier; all-tie groups kept and counted; train.py trains a step on it."""
    from conftest import run
    from generate import main

    root, prompts = groups
    main(pipeline_flags(root, root / "g.jsonl"))
    rows = [json.loads(line) for line in open(root / "g.jsonl")]
    assert [r["prompt"] for r in rows] == prompts and not os.path.exists(f"{root / 'g.jsonl'}.parts")
    namespace = {}
    exec(SCORER, namespace)
    for r in rows:
        assert len(set(r["responses"])) == len(r["responses"]) and sum(r["counts"]) <= 5  # empty answers dropped
        assert r["scores"] == [namespace["score"](r["prompt"], x) for x in r["responses"]]
        assert r["sampling"]["temperature"] == 1.0 and r["sampling"]["top_k"] == 2
    assert any(c > 1 for r in rows for c in r["counts"])  # some answers were drawn twice and merged
    ties = sum(len(set(r["scores"])) == 1 for r in rows)
    assert f"{len(rows)} groups; {ties} with all scores tied" in capsys.readouterr().out
    assert 0 < ties < len(rows)
    out = run(
        "--model",
        root / "model",
        "--data",
        root / "g.jsonl",
        "--loss",
        "pair_mnm",
        "--out",
        root / "train",
        "--max_steps",
        1,
        "--batch_size",
        2,
        "--micro_batch_size",
        2,
        "--max_length",
        64,
        "--max_prompt_length",
        32,
        "--log_every",
        1,
    )
    assert os.path.exists(os.path.join(out, "config.json"))


def test_groups_killed_and_resumed(groups):
    """A run killed (SIGKILL, by the crash hook) after chunk 1 is on disk and chunk 2 half-written, started
    again with the same flags, skips chunk 1 and ends with a file identical to an uninterrupted run's; other
    flags are refused while the parts of the first run are there."""
    from conftest import run_cli
    from generate import main

    root, _ = groups
    main(pipeline_flags(root, root / "ref.jsonl"))
    out = root / "killed.jsonl"
    # crash points: settings.json's temporary file and rename (1, 2), chunk 1's (3, 4), chunk 2's temporary file (5)
    killed = run_cli(*pipeline_flags(root, out), script="generate.py", env={"MPPO_CRASH_AFTER": "5"})
    assert killed.returncode == -9, killed.stderr
    parts = f"{out}.parts"
    assert sorted(os.listdir(parts)) == ["chunk-000000.jsonl", "chunk-000001.jsonl.tmp", "settings.json"]
    assert not os.path.exists(out)
    with pytest.raises(SystemExit, match=r"started with other settings \(--seed 0\)"):
        main(pipeline_flags(root, out, **{"--seed": 1}))
    resumed = run_cli(*pipeline_flags(root, out), script="generate.py")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming: 1 chunks already done" in resumed.stdout and "chunk 1/4" not in resumed.stdout
    assert open(out).read() == open(root / "ref.jsonl").read()
    assert not os.path.exists(parts)


def test_groups_under_torchrun(groups):
    """torchrun with 2 processes (gloo, CPU) splits the chunks across ranks; the file equals one process's."""
    from conftest import run_cli

    root, _ = groups
    if not os.path.exists(root / "ref.jsonl"):
        from generate import main

        main(pipeline_flags(root, root / "ref.jsonl"))
    result = run_cli(*pipeline_flags(root, root / "ddp.jsonl"), script="generate.py", nproc=2)
    assert result.returncode == 0, result.stderr
    assert "2 ranks" in result.stdout
    assert open(root / "ddp.jsonl").read() == open(root / "ref.jsonl").read()


def test_groups_scored_by_reward_model(groups):
    """--reward_model: each distinct answer's score is the reward model's (reward.py, itself checked against
    transformers in test_reward.py) of (prompt, answer); a causal LM given as --reward_model is refused."""
    from generate import main
    from reward import RewardModel
    from test_reward import make_reward_model

    root, prompts = groups
    make_reward_model(root / "rm")
    flags = pipeline_flags(root, root / "rm.jsonl", **{"--num_samples": 3})
    at = flags.index("--scorer")
    main(flags[:at] + ["--reward_model", str(root / "rm")] + flags[at + 2 :])
    rows = [json.loads(line) for line in open(root / "rm.jsonl")]
    assert [r["prompt"] for r in rows] == prompts and rows[0]["sampling"]["scored_by"] == str(root / "rm")
    rm = RewardModel.from_pretrained(root / "rm")
    for r in rows:
        assert r["scores"] == pytest.approx(
            rm.score_texts([r["prompt"]] * len(r["responses"]), r["responses"]), abs=1e-5
        )
    with pytest.raises(SystemExit, match="'architectures' is \\['LlamaForCausalLM'\\]"):
        refused = pipeline_flags(root, root / "refused.jsonl")
        main(refused[:at] + ["--reward_model", str(root / "model")] + refused[at + 2 :])
    assert not os.path.exists(root / "refused.jsonl.parts")
