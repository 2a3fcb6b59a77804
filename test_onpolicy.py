"""
Tests of the demo's judge (demo/make_demo.py's judge, a verifier) against the scores the demo's
data carry, of the demo data staying byte-identical, and of onpolicy.py end to end at a tiny size.

    python -m pytest -q test_onpolicy.py
"""

import filecmp
import importlib.util
import json
import os

import onpolicy
from conftest import DEMO
from formats import read_groups


def load_make_demo():
    spec = importlib.util.spec_from_file_location("make_demo", os.path.join(DEMO, "make_demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_judge_hand_examples():
    """'sort d b a c': sorted 10 (spaces or commas), the copy 2, reversed 3, a neighbour swap 6, a
    letter lost 5, anything else 1; a chat prompt is judged on its last user turn."""
    judge = onpolicy.demo_judge()
    p = "sort d b a c"
    cases = {
        "a b c d": 10,
        "a, b, c, d": 10,
        " a b c d ": 10,
        "d b a c": 2,
        "d c b a": 3,
        "b a c d": 6,
        "a b d c": 6,
        "a b c": 5,
        "a c d": 5,
        "c a b d": 1,
        "": 1,
        "a b c d e": 1,
    }
    assert {r: judge(p, r) for r in cases} == cases
    assert judge([{"role": "system", "content": "x"}, {"role": "user", "content": p}], "a b c d") == 10


def test_judge_agrees_with_the_demo_data():
    """On every response of demo/train.jsonl and eval.jsonl: the judge gives 10 exactly where the
    data does, and otherwise the data's score or, where make_demo.py drew the coarse score (a swap
    5 instead of 6, a reversal 2 instead of 3), the finer one; a shuffle that happens to be a
    neighbour swap (data 1) is the only other difference allowed."""
    judge = onpolicy.demo_judge()
    allowed = {
        (10.0, 10.0),
        (6.0, 6.0),
        (5.0, 5.0),
        (5.0, 6.0),
        (3.0, 3.0),
        (2.0, 2.0),
        (2.0, 3.0),
        (1.0, 1.0),
        (1.0, 6.0),
    }
    for name in ("train.jsonl", "eval.jsonl"):
        with open(os.path.join(DEMO, name)) as f:
            for line in f:
                g = json.loads(line)
                for r, s in zip(g["responses"], g["scores"]):
                    assert (s, judge(g["prompt"], r)) in allowed, (g["prompt"], r, s)


def test_demo_data_unchanged(tmp_path):
    """make_demo.py, run again into a fresh folder, writes files byte-identical to demo/ (the judge
    added beside the generator changes no data byte)."""
    load_make_demo().main(out=str(tmp_path))
    names = [
        "config.json",
        "eval.jsonl",
        "generation_config.json",
        "sft.jsonl",
        "tokenizer.json",
        "tokenizer_config.json",
        "train.jsonl",
        "valid.jsonl",
    ]
    match, mismatch, errors = filecmp.cmpfiles(DEMO, tmp_path, names, shallow=False)
    assert (mismatch, errors) == ([], [])


def test_onpolicy_groups():
    """Sampled answers to groups: duplicates merged (first occurrence kept), empty answers dropped, a
    prompt with fewer than 2 distinct answers no group; scores from the judge; counts as stated."""
    judge = onpolicy.demo_judge()
    groups, stats = onpolicy.onpolicy_groups(
        [["b a", "a b", "b a", ""], ["c a", "c a"], ["b c a", "a, b, c"]], ["sort b a", "sort c a", "sort b c a"], judge
    )
    assert groups == [
        {"prompt": "sort b a", "responses": ["b a", "a b"], "scores": [2.0, 10.0]},
        {"prompt": "sort b c a", "responses": ["b c a", "a, b, c"], "scores": [2.0, 10.0]},
    ]
    assert stats == {"prompts": 3, "single_answer": 1, "all_tied": 0, "with_10": 2, "answers": 4, "groups": 2}


def test_onpolicy_tiny_end_to_end(setup, tmp_path, capsys, monkeypatch):
    """onpolicy.py from the shared tiny SFT model (conftest's setup), 1 seed, 16 prompts x 4 samples,
    2 steps. That model writes no sorted answer yet (all its samples would tie at 1), so the sampler
    is wrapped to add each prompt's sorted answer to its real samples. The on-policy groups read back
    through formats.read_groups with every score equal to the judge's and distinct responses; both
    trained models exist; results.json and the printed table hold a greedy success in [0, 1] for each
    of the three models."""
    sample = onpolicy.answers

    def with_sorted_answer(model, tok, prompts, n, *a, **k):
        out = sample(model, tok, prompts, n, *a, **k)
        assert len(out) == len(prompts) and all(len(texts) == n for texts in out)
        return [texts + [" ".join(sorted(p.split()[1:]))] if n > 1 else texts for p, texts in zip(prompts, out)]

    monkeypatch.setattr(onpolicy, "answers", with_sorted_answer)
    out = tmp_path / "op"
    results = onpolicy.main(
        [
            "--sft_model",
            str(setup["model"]),
            "--seeds",
            "0",
            "--prompts",
            "16",
            "--num_samples",
            "4",
            "--temperature",
            "1.0",
            "--steps",
            "2",
            "--batch_size",
            "8",
            "--eval_prompts",
            "8",
            "--max_new_tokens",
            "12",
            "--out",
            str(out),
        ]
    )
    judge = onpolicy.demo_judge()
    groups, _ = read_groups(str(out / "seed0" / "onpolicy_groups.jsonl"))
    assert groups
    for g in groups:
        assert len(set(g.responses)) == len(g.responses)
        assert list(g.scores) == [judge(g.prompt, r) for r in g.responses]
    for name in ("offline", "onpolicy"):
        assert (out / "seed0" / name / "final" / "config.json").exists()
    saved = json.loads((out / "results.json").read_text())
    assert saved["success"] == results
    assert list(results[0]) == ["SFT", "SFT + offline Pair-MNM", "SFT + on-policy Pair-MNM"]
    assert all(0 <= v <= 1 for v in results[0].values())
    assert "| SFT + on-policy Pair-MNM | " in capsys.readouterr().out
