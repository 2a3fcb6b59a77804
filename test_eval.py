"""
Tests of eval.py: the ranking metrics on hand-made groups with known answers, Kendall's tau-b
against its definition (a naive loop) and scipy, the bootstrap intervals, the log-probs against
a one-response-at-a-time forward of the model, and the answer files against the schemas that
FastChat's MT-Bench judge and AlpacaEval read.

    python -m pytest test_eval.py -q
"""

import itertools
import json
import math
import os

import numpy as np
import pytest
import torch

import eval as ev
from chat import ChatTokenizer
from data import tokenize_groups
from formats import read_groups
from conftest import DEMO, save_demo_llama
from model import Llama



def test_kendall_tau_b_hand_examples():
    """Same order: 1; reversed: -1. x = (1, 2, 3), y = (1, 1, 2): pair (1, 2) is tied in y, the
    other two are concordant, so tau_b = 2 / sqrt(3 * 2). All y equal: undefined (NaN)."""
    x = torch.tensor([[1.0, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 0], [1, 2, 3, 0]])
    y = torch.tensor([[1.0, 2, 3, 4], [4, 3, 2, 1], [1, 1, 2, 0], [5, 5, 5, 0]])
    mask = torch.tensor([[True] * 4, [True] * 4, [True, True, True, False], [True, True, True, False]])
    tau = ev.kendall_tau_b(x, y, mask)
    torch.testing.assert_close(tau[:3], torch.tensor([1.0, -1.0, 2 / math.sqrt(6)], dtype=torch.float64))
    assert math.isnan(tau[3])


def test_kendall_tau_b_against_definition_and_scipy():
    """Random rows of 2-6 entries with many ties: equal to the definition written as a loop over
    pairs and, where scipy is installed, to scipy.stats.kendalltau (its default variant is tau-b)."""
    g = torch.Generator().manual_seed(0)
    B, K = 200, 6
    x = torch.randint(0, 4, (B, K), generator=g).float()
    y = torch.randint(0, 4, (B, K), generator=g).float()
    mask = torch.arange(K)[None] < torch.randint(2, K + 1, (B,), generator=g)[:, None]
    tau = ev.kendall_tau_b(x, y, mask)
    for b in range(B):
        xs, ys = x[b][mask[b]].tolist(), y[b][mask[b]].tolist()
        s = sum(np.sign(xs[i] - xs[j]) * np.sign(ys[i] - ys[j]) for i, j in itertools.combinations(range(len(xs)), 2))
        nx = sum(xs[i] != xs[j] for i, j in itertools.combinations(range(len(xs)), 2))
        ny = sum(ys[i] != ys[j] for i, j in itertools.combinations(range(len(xs)), 2))
        expected = s / math.sqrt(nx * ny) if nx and ny else float("nan")
        assert (math.isnan(expected) and math.isnan(tau[b])) or abs(tau[b].item() - expected) < 1e-12
    try:
        from scipy.stats import kendalltau
    except ImportError:
        return
    for b in range(B):
        ref = kendalltau(x[b][mask[b]].numpy(), y[b][mask[b]].numpy()).statistic
        assert (math.isnan(ref) and math.isnan(tau[b])) or abs(tau[b].item() - ref) < 1e-12


def test_metrics_on_hand_made_groups():
    """Group A: scores (10, 5, 1), p (0.5, 0.2, 0.1): top-1 right, 3 of 3 pairs right, tau 1.
    Group B: scores (10, 1, pad), p (0.1, 0.4): top-1 wrong, 0 of 1 pair, tau -1. So p_chosen =
    (0.5 + 0.1) / 2 = 0.3, p_rejected = (0.2 + 0.1 + 0.4) / 3 = 0.7 / 3, top-1 1/2, pairwise 3/4, tau 0."""
    logps = torch.tensor([[0.5, 0.2, 0.1], [0.1, 0.4, 1.0]]).log()
    scores = torch.tensor([[10.0, 5.0, 1.0], [10.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rows = ev.group_rows(logps, scores, mask)
    m = ev.metrics_of(rows)
    expected = {"p_chosen": 0.3, "p_rejected": 0.7 / 3, "margin": 0.3 - 0.7 / 3, "top1_acc": 0.5, "pair_acc": 0.75, "kendall_tau": 0.0}
    for k, v in expected.items():
        assert abs(m[k] - v) < 1e-6, k
    # one group alone: A is perfect, B entirely wrong
    assert ev.metrics_of(rows[:1])["top1_acc"] == 1 and ev.metrics_of(rows[1:])["pair_acc"] == 0


def synthetic_rows(n, seed):
    """n groups of 4 responses whose log p agrees with the scores up to noise (so every metric varies)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(1, 11, (n, 4), generator=g).float()
    logps = -2 + 0.1 * scores + torch.randn(n, 4, generator=g)
    return ev.group_rows(logps, scores, torch.ones(n, 4, dtype=torch.bool))


def test_bootstrap_contains_point_and_narrows():
    """The 95% interval contains the point estimate, and 16 times more groups narrow it (about
    4-fold, as 1 / sqrt(n); asserted: at least 2-fold). Seeded: the same call gives the same interval."""
    small, large = synthetic_rows(40, 0), synthetic_rows(640, 1)
    ci_small, ci_large = ev.bootstrap(small, 300, seed=0), ev.bootstrap(large, 300, seed=0)
    for rows, ci in ((small, ci_small), (large, ci_large)):
        point = ev.metrics_of(rows)
        for k in ev.METRICS:
            assert ci[k][0] <= point[k] <= ci[k][1], k
    for k in ev.METRICS:
        assert ci_large[k][1] - ci_large[k][0] < (ci_small[k][1] - ci_small[k][0]) / 2, k
    assert ev.bootstrap(small, 50, seed=3) == ev.bootstrap(small, 50, seed=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Llama with the demo's tokenizer (Llama 3 chat template)."""
    root = tmp_path_factory.mktemp("eval")
    save_demo_llama(root / "model")
    return root


def test_score_groups_matches_one_response_at_a_time(tiny):
    """score_groups' mean log-probs (packed, several groups per forward) against the model run on
    prompt + response alone, log_softmax of its logits summed over the response tokens by a loop."""
    model = Llama.from_pretrained(tiny / "model")
    tok = ChatTokenizer.from_pretrained(tiny / "model")
    groups, _ = read_groups(os.path.join(DEMO, "eval.jsonl"))
    groups, _ = tokenize_groups(groups[:6], tok, 64, 32)
    rows = ev.score_groups(model, groups, micro_batch_size=4)
    for g, row in zip(groups, rows):
        means = []
        for r in g.response_ids:
            ids = torch.tensor([g.prompt_ids + r])
            with torch.no_grad():
                logprobs = model(ids)[0].float().log_softmax(-1)  # (T, V)
            P = len(g.prompt_ids)
            means.append(sum(logprobs[P - 1 + i, t].item() for i, t in enumerate(r)) / len(r))
        tied_best = [k for k, s in enumerate(g.scores) if s == max(g.scores)]  # every response tied for best is a chosen
        p_chosen = sum(math.exp(means[k]) for k in tied_best) / len(tied_best)
        assert abs(row[ev.SUMS.index("p_chosen")] - p_chosen) < 1e-6
        tau = ev.kendall_tau_b(torch.tensor([means]), torch.tensor([g.scores]))[0].item()
        assert abs(row[len(ev.SUMS)] - tau) < 1e-9


def test_eval_cli_metrics(tiny, tmp_path, capsys):
    """`eval.py --model --data --out`: the JSON has every metric, with an interval around it."""
    out = tmp_path / "metrics.json"
    ev.main(["--model", str(tiny / "model"), "--data", os.path.join(DEMO, "eval.jsonl"), "--max_length", "64",
             "--max_prompt_length", "32", "--bootstrap", "100", "--out", str(out), "--micro_batch_size", "64"])
    res = json.loads(out.read_text())
    assert res["groups"] == 300 and res["bootstrap"] == 100
    for k in ev.METRICS:
        lo, hi = res["ci"][k]
        assert lo <= res["metrics"][k] <= hi
    assert "| top1_acc |" in capsys.readouterr().out


def test_mt_bench_answers_multi_turn_and_schema(tiny, tmp_path, monkeypatch):
    """MT-Bench questions, one of two turns: each turn's prompt is the conversation so far with the
    model's own earlier answer in it (generate is replaced by a stub that records its prompts and
    answers "c a b"); the answer file is JSONL that round-trips through json with FastChat's keys."""
    questions = tmp_path / "question.jsonl"
    qs = [{"question_id": 81, "category": "writing", "turns": ["sort b a c", "now reverse it"]},
          {"question_id": 82, "category": "math", "turns": ["sort d c"]}]
    questions.write_text("".join(json.dumps(q) + "\n" for q in qs))
    tok = ChatTokenizer.from_pretrained(tiny / "model")
    prompts = []

    def stub(model, prompt_ids, max_new_tokens, **kw):
        prompts.append(list(prompt_ids))
        return tok.encode("c a b") + [tok.eos_id]

    monkeypatch.setattr(ev, "generate", stub)
    answers = tmp_path / "answers" / "tiny.jsonl"
    ev.main(["--model", str(tiny / "model"), "--generate", str(questions), "--answers", str(answers), "--model_id", "tiny-mnm"])
    convo = [{"role": "user", "content": "sort b a c"}]
    assert prompts[0] == tok.encode_prompt(convo)
    assert prompts[1] == tok.encode_prompt(convo + [{"role": "assistant", "content": "c a b"}, {"role": "user", "content": "now reverse it"}])
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question_id"] for r in records] == [81, 82]
    for r, q in zip(records, qs):
        assert set(r) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert isinstance(r["answer_id"], str) and isinstance(r["tstamp"], float) and r["model_id"] == "tiny-mnm"
        assert r["choices"] == [{"index": 0, "turns": ["c a b"] * len(q["turns"])}]
        assert json.loads(json.dumps(r)) == r


def test_alpaca_eval_answers_schema(tiny, tmp_path):
    """AlpacaEval instructions (a JSON list, with the optional 'dataset'): the output is one JSON
    list of {instruction, output, generator, dataset} in question order, from the real model."""
    questions = tmp_path / "alpaca_eval.json"
    qs = [{"instruction": "sort b a", "dataset": "helpful_base"}, {"instruction": "sort c a b"}]
    questions.write_text(json.dumps(qs))
    answers = tmp_path / "outputs.json"
    ev.main(["--model", str(tiny / "model"), "--generate", str(questions), "--answers", str(answers), "--max_new_tokens", "5"])
    records = json.loads(answers.read_text())
    assert [set(r) for r in records] == [{"instruction", "output", "generator", "dataset"}, {"instruction", "output", "generator"}]
    assert [r["instruction"] for r in records] == ["sort b a", "sort c a b"]
    assert all(isinstance(r["output"], str) and r["generator"] == "model" for r in records)


def test_bad_question_file(tmp_path):
    """A record with neither format's keys, and an MT-Bench turn that is not a string: one-line
    errors naming the file and line."""
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(ev.QuestionError, match=r"q.jsonl:1: neither MT-Bench"):
        ev.read_questions(str(bad))
    bad.write_text(json.dumps({"question_id": 1, "turns": ["a"]}) + "\n" + json.dumps({"question_id": 2, "turns": [3]}) + "\n")
    with pytest.raises(ev.QuestionError, match=r"q.jsonl:2: an MT-Bench question needs"):
        ev.read_questions(str(bad))
