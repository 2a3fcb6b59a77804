"""
Tests of eval.py: the ranking metrics on hand-made groups with known answers, Kendall's tau-b
against its definition (a naive loop) and scipy, the bootstrap intervals, the log-probs against
a one-response-at-a-time forward of the model, and the answer files against what FastChat's
MT-Bench judge, Arena-Hard-Auto and AlpacaEval read; batched turns, per-category temperatures, a
restart skipping finished answers, and sampled answers independent of file order, batch and ranks.

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
from conftest import DEMO, run_cli, save_demo_llama
from model import Llama
from packing import Scoring


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
    expected = {
        "p_chosen": 0.3,
        "p_rejected": 0.7 / 3,
        "margin": 0.3 - 0.7 / 3,
        "top1_acc": 0.5,
        "pair_acc": 0.75,
        "kendall_tau": 0.0,
    }
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
    """ranking_rows' mean log-probs (packed, several groups per forward) against the model run on
    prompt + response alone, log_softmax of its logits summed over the response tokens by a loop."""
    model = Llama.from_pretrained(tiny / "model")
    tok = ChatTokenizer.from_pretrained(tiny / "model")
    groups, _ = read_groups(os.path.join(DEMO, "eval.jsonl"))
    groups, _ = tokenize_groups(groups[:6], tok, 64, 32)
    rows = ev.ranking_rows(model, groups, Scoring(micro_batch_size=4))
    for g, row in zip(groups, rows):
        means = []
        for r in g.response_ids:
            ids = torch.tensor([g.prompt_ids + r])
            with torch.no_grad():
                logprobs = model(ids)[0].float().log_softmax(-1)  # (T, V)
            P = len(g.prompt_ids)
            means.append(sum(logprobs[P - 1 + i, t].item() for i, t in enumerate(r)) / len(r))
        tied_best = [
            k for k, s in enumerate(g.scores) if s == max(g.scores)
        ]  # every response tied for best is a chosen
        p_chosen = sum(math.exp(means[k]) for k in tied_best) / len(tied_best)
        assert abs(row[ev.SUMS.index("p_chosen")] - p_chosen) < 1e-6
        tau = ev.kendall_tau_b(torch.tensor([means]), torch.tensor([g.scores]))[0].item()
        assert abs(row[len(ev.SUMS)] - tau) < 1e-9


def test_eval_cli_metrics(tiny, tmp_path, capsys):
    """`eval.py --model --data --out`: the JSON has every metric, with an interval around it."""
    out = tmp_path / "metrics.json"
    ev.main(
        [
            "--model",
            str(tiny / "model"),
            "--data",
            os.path.join(DEMO, "eval.jsonl"),
            "--max_length",
            "64",
            "--max_prompt_length",
            "32",
            "--bootstrap",
            "100",
            "--out",
            str(out),
            "--micro_batch_size",
            "64",
        ]
    )
    res = json.loads(out.read_text())
    assert res["groups"] == 300 and res["bootstrap"] == 100
    for k in ev.METRICS:
        lo, hi = res["ci"][k]
        assert lo <= res["metrics"][k] <= hi
    assert "| top1_acc |" in capsys.readouterr().out


def fastchat_load_model_answers(answer_dir):
    """What FastChat's llm_judge/common.py load_model_answers does, restated: every *.jsonl file of
    the folder is a model named after the file's base name, its lines keyed by question_id."""
    out = {}
    for name in sorted(os.listdir(answer_dir)):
        if name.endswith(".jsonl"):
            with open(os.path.join(answer_dir, name)) as f:
                out[name[: -len(".jsonl")]] = {r["question_id"]: r for r in map(json.loads, f)}
    return out


def write_questions(path, qs):
    path.write_text("".join(json.dumps(q) + "\n" for q in qs))
    return path


def stub_generate_batch(tok, calls, reply="c a b"):
    """A generate_batch that records each call's prompts and settings and answers `reply` to all."""

    def stub(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, stop_ids=(), generators=None, **kw):
        calls.append(
            {"prompts": [list(p) for p in prompts], "temperature": list(temperature), "generators": generators}
        )
        return [tok.encode(reply) + [tok.eos_id] for _ in prompts]

    return stub


def test_mt_bench_batched_turns_temperatures_and_fastchat_loading(tiny, tmp_path, monkeypatch):
    """Three MT-Bench questions in one batch (generate_batch replaced by a stub that records its calls
    and answers "c a b"): turn 1 of all three is one call, then turn 2 of the two-turn ones, each
    prompt the conversation so far with the model's own first answer in it; temperatures are
    FastChat's per category (writing 0.7, math 0.0, a category not in its table 0.7), one seeded
    generator per row. The file loads with FastChat's load_model_answers (restated above) under its
    base name, and holds FastChat's keys: question_id, answer_id, model_id, choices[0].turns, tstamp."""
    qs = [
        {"question_id": 81, "category": "writing", "turns": ["sort b a c", "now reverse it"]},
        {"question_id": 111, "category": "math", "turns": ["sort d c"]},
        {"question_id": 7, "category": "other", "turns": ["sort e f d", "again"]},
    ]
    questions = write_questions(tmp_path / "question.jsonl", qs)
    tok = ChatTokenizer.from_pretrained(tiny / "model")
    calls = []
    monkeypatch.setattr(ev, "generate_batch", stub_generate_batch(tok, calls))
    answers = tmp_path / "mt_bench" / "model_answer" / "tiny-mnm.jsonl"
    ev.main(["--model", str(tiny / "model"), "--generate", str(questions), "--answers", str(answers)])
    user = lambda text: {"role": "user", "content": text}
    first = [[user(q["turns"][0])] for q in qs]
    assert calls[0]["prompts"] == [tok.encode_prompt(m) for m in first]
    assert calls[0]["temperature"] == [0.7, 0.0, 0.7]
    second = [first[i] + [{"role": "assistant", "content": "c a b"}, user(qs[i]["turns"][1])] for i in (0, 2)]
    assert calls[1]["prompts"] == [tok.encode_prompt(m) for m in second] and calls[1]["temperature"] == [0.7, 0.7]
    assert len(calls) == 2 and len(calls[0]["generators"]) == 3
    assert calls[1]["generators"] == [calls[0]["generators"][0], calls[0]["generators"][2]]  # a question's draws go on
    loaded = fastchat_load_model_answers(answers.parent)
    assert list(loaded) == ["tiny-mnm"] and sorted(loaded["tiny-mnm"]) == [7, 81, 111]
    assert [json.loads(line)["question_id"] for line in answers.read_text().splitlines()] == [81, 111, 7]  # file order
    for q in qs:
        r = loaded["tiny-mnm"][q["question_id"]]
        assert set(r) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert isinstance(r["answer_id"], str) and isinstance(r["tstamp"], float) and r["model_id"] == "tiny-mnm"
        assert r["choices"] == [{"index": 0, "turns": ["c a b"] * len(q["turns"])}]
    calls.clear()
    answers.unlink()
    ev.main(
        [
            "--model",
            str(tiny / "model"),
            "--generate",
            str(questions),
            "--answers",
            str(answers),
            "--temperature",
            "0.3",
        ]
    )
    assert calls[0]["temperature"] == [0.3] * 3 and calls[1]["temperature"] == [0.3] * 2


def test_arena_hard_answers(tiny, tmp_path, monkeypatch):
    """Arena-Hard-Auto questions (turns of {"content": ...}, category "arena-hard-v0.1", a hex
    question_id): greedy (the category is not in FastChat's table; Arena-Hard's config samples at 0),
    and each answer turn is {"content", "token_len"} as Arena-Hard's gen_answer.py writes it, read
    back as its show_result.py does (choices[0].turns[0].token_len); with no tiktoken encoding at
    hand token_len counts the model's tokens without the stop token (here 3 + 0)."""
    qs = [
        {
            "question_id": "328c149ed45a41c0b9d6f14659e63599",
            "category": "arena-hard-v0.1",
            "cluster": "ABC Sequence Puzzles & Groups",
            "turns": [{"content": "sort b a c"}],
        }
    ]
    questions = write_questions(tmp_path / "question.jsonl", qs)
    tok = ChatTokenizer.from_pretrained(tiny / "model")
    calls = []
    monkeypatch.setattr(ev, "generate_batch", stub_generate_batch(tok, calls, reply="a b c"))
    monkeypatch.setattr(ev, "token_counter", lambda: None)
    answers = tmp_path / "model_answer" / "tiny.jsonl"
    ev.main(["--model", str(tiny / "model"), "--generate", str(questions), "--answers", str(answers)])
    assert calls[0]["temperature"] == [0.0]
    assert calls[0]["prompts"] == [tok.encode_prompt([{"role": "user", "content": "sort b a c"}])]
    (r,) = [json.loads(line) for line in answers.read_text().splitlines()]
    assert r["question_id"] == qs[0]["question_id"] and r["model_id"] == "tiny"
    assert r["choices"] == [{"index": 0, "turns": [{"content": "a b c", "token_len": len(tok.encode("a b c"))}]}]
    assert r["choices"][0]["turns"][0]["token_len"] == 3


def test_alpaca_eval_answers_schema(tiny, tmp_path):
    """AlpacaEval instructions (a JSON list, with the optional 'dataset'): the output is one JSON
    list of {instruction, output, generator, dataset} in question order, from the real model; the
    progress file beside it is gone once the list is written."""
    questions = tmp_path / "alpaca_eval.json"
    qs = [{"instruction": "sort b a", "dataset": "helpful_base"}, {"instruction": "sort c a b"}]
    questions.write_text(json.dumps(qs))
    answers = tmp_path / "outputs.json"
    ev.main(
        [
            "--model",
            str(tiny / "model"),
            "--generate",
            str(questions),
            "--answers",
            str(answers),
            "--max_new_tokens",
            "5",
        ]
    )
    records = json.loads(answers.read_text())
    assert [set(r) for r in records] == [
        {"instruction", "output", "generator", "dataset"},
        {"instruction", "output", "generator"},
    ]
    assert [r["instruction"] for r in records] == ["sort b a", "sort c a b"]
    assert all(isinstance(r["output"], str) and r["generator"] == "model" for r in records)
    assert sorted(os.listdir(tmp_path)) == ["alpaca_eval.json", "outputs.json"]


def test_restart_skips_answered_questions(tiny, tmp_path, monkeypatch):
    """A run killed after its first answer, in the middle of appending the second (a torn last
    line): the restart answers only the two questions not finished (the stub sees their prompts
    only), keeps the first answer as it was, and leaves one answer per question in file order.
    Answers of another model in the file are refused in one line."""
    qs = [{"question_id": i, "category": "math", "turns": [f"sort {c} a"]} for i, c in ((1, "b"), (2, "c"), (3, "d"))]
    questions = write_questions(tmp_path / "question.jsonl", qs)
    answers = tmp_path / "m.jsonl"
    argv = [
        "--model",
        str(tiny / "model"),
        "--generate",
        str(questions),
        "--answers",
        str(answers),
        "--max_new_tokens",
        "4",
    ]
    ev.main(argv)
    lines = answers.read_text().splitlines(keepends=True)
    answers.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # killed while writing the second line
    tok = ChatTokenizer.from_pretrained(tiny / "model")
    calls = []
    monkeypatch.setattr(ev, "generate_batch", stub_generate_batch(tok, calls))
    ev.main(argv)
    expected = [tok.encode_prompt([{"role": "user", "content": q["turns"][0]}]) for q in qs[1:]]
    assert [c["prompts"] for c in calls] == [expected]
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question_id"] for r in records] == [1, 2, 3]
    assert records[0] == json.loads(lines[0]) and [r["choices"][0]["turns"] for r in records[1:]] == [["c a b"]] * 2
    calls.clear()
    ev.main(argv)  # all done: nothing decoded, the file unchanged but for being rewritten in order
    assert calls == [] and [json.loads(line) for line in answers.read_text().splitlines()] == records
    with pytest.raises(SystemExit):
        ev.main(argv + ["--model_id", "other"])


def answer_texts(path):
    return {r["question_id"]: r["choices"][0]["turns"] for r in map(json.loads, path.read_text().splitlines())}


def test_sampled_answers_independent_of_order_batch_and_ranks(tiny, tmp_path):
    """Sampling (--temperature 1) with the real tiny model: the same answers whether the file is read
    forwards in one batch of 5, backwards in batches of 2, or split over 2 processes by torchrun
    (each appending to the same file) in batches of 3, because each question's generator is seeded
    from (--seed, question id) alone. Another --seed changes them (the draws are really sampled)."""
    qs = [{"question_id": i, "category": "writing", "turns": [f"sort {c} a b", "again"]} for i, c in enumerate("cdefg")]
    fwd = write_questions(tmp_path / "fwd.jsonl", qs)
    bwd = write_questions(tmp_path / "bwd.jsonl", qs[::-1])
    common = ["--model", str(tiny / "model"), "--max_new_tokens", "6", "--temperature", "1.0"]
    ev.main(common + ["--generate", str(fwd), "--answers", str(tmp_path / "a" / "m.jsonl"), "--gen_batch_size", "5"])
    ev.main(common + ["--generate", str(bwd), "--answers", str(tmp_path / "b" / "m.jsonl"), "--gen_batch_size", "2"])
    ev.main(common + ["--generate", str(fwd), "--answers", str(tmp_path / "s" / "m.jsonl"), "--seed", "1"])
    out = run_cli(
        *common,
        "--generate",
        fwd,
        "--answers",
        tmp_path / "c" / "m.jsonl",
        "--gen_batch_size",
        "3",
        nproc=2,
        script="eval.py",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    a = answer_texts(tmp_path / "a" / "m.jsonl")
    assert answer_texts(tmp_path / "b" / "m.jsonl") == a
    assert answer_texts(tmp_path / "c" / "m.jsonl") == a
    assert answer_texts(tmp_path / "s" / "m.jsonl") != a
    lines = (tmp_path / "c" / "m.jsonl").read_text().splitlines()
    assert [json.loads(line)["question_id"] for line in lines] == [0, 1, 2, 3, 4]


def test_bad_question_file(tmp_path):
    """A record with neither format's keys, an MT-Bench turn that is not a string, an Arena-Hard turn
    without content, a question id twice: one-line errors naming the file and line."""
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(ev.QuestionError, match=r"q.jsonl:1: neither MT-Bench"):
        ev.read_questions(str(bad))
    bad.write_text(
        json.dumps({"question_id": 1, "turns": ["a"]}) + "\n" + json.dumps({"question_id": 2, "turns": [3]}) + "\n"
    )
    with pytest.raises(ev.QuestionError, match=r"q.jsonl:2: an MT-Bench question needs"):
        ev.read_questions(str(bad))
    bad.write_text(
        json.dumps({"question_id": "x", "turns": [{"content": "a"}]})
        + "\n"
        + json.dumps({"question_id": "y", "turns": [{"text": "b"}]})
        + "\n"
    )
    with pytest.raises(ev.QuestionError, match=r"q.jsonl:2: an Arena-Hard question needs"):
        ev.read_questions(str(bad))
    bad.write_text(
        json.dumps({"question_id": 1, "turns": ["a"]}) + "\n" + json.dumps({"question_id": 1, "turns": ["b"]}) + "\n"
    )
    with pytest.raises(ev.QuestionError, match=r"q.jsonl:2: question_id 1 appears twice"):
        ev.read_questions(str(bad))


def test_question_seed_and_temperature():
    """The seed is a function of (seed, question id) only, and tells 81 from "81"; the temperature
    is FastChat's per category, --temperature over all, and a category missing from the table is
    sampled as FastChat (0.7) or Arena-Hard-Auto (0.0) does."""
    assert ev.question_seed(0, 81) == ev.question_seed(0, 81) != ev.question_seed(1, 81)
    assert ev.question_seed(0, 81) != ev.question_seed(0, "81") and 0 <= ev.question_seed(0, 81) < 2**63
    temperature = lambda category: ev.question_temperature("mt_bench", {"category": category})
    assert [temperature(c) for c in ("writing", "roleplay", "stem", "humanities")] == [0.7, 0.7, 0.1, 0.1]
    assert [temperature(c) for c in ("extraction", "math", "coding", "reasoning")] == [0.0] * 4
    assert temperature("new") == 0.7
    assert ev.question_temperature("arena_hard", {"category": "arena-hard-v0.1"}) == 0.0
    assert ev.question_temperature("alpaca_eval", {}) == 0.0
    assert ev.question_temperature("mt_bench", {"category": "math"}, 0.5) == 0.5
