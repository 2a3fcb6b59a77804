"""
Tests of baselines.py (SimPO, ORPO, DPO) and of their wiring into train.py's --loss.

Each loss is checked against a hand derivation with round numbers, against a naive per-group
Python loop (math module, no torch) on random batches with ties, and for its pair rule (best
against worst; the mean over the pairs when several tie for best or worst), its invariance to
the order of the responses, and its handling of groups without a preference. A short train.py run per baseline
checks the wiring: DPO starts at loss log 2 (policy = reference), and every loss falls.

    python -m pytest test_baselines.py -q
"""

import itertools
import math

import pytest
import torch

from baselines import BASELINES, dpo, orpo, simpo
from conftest import copy_demo_rows, records, run, save_demo_llama


def softplus(x):
    return math.log1p(math.exp(x))  # -log sigmoid(-x)


def test_simpo_hand_example():
    """logps (-1, -2), beta 2, gamma/beta 0.5 (gamma 1): z = 2 * (-1 - -2) - 1 = 1, loss = log(1 + e^-1).
    d loss / d logps_w = -beta * sigmoid(-z) = -2 / (1 + e), and the opposite for logps_l."""
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss = simpo(logps, torch.tensor([[5.0, 1.0]]), beta=2.0, gamma_beta_ratio=0.5)
    torch.testing.assert_close(loss, torch.tensor([math.log1p(math.exp(-1))]), rtol=0, atol=1e-6)
    loss.sum().backward()
    g = 2 / (1 + math.e)
    torch.testing.assert_close(logps.grad, torch.tensor([[-g, g]]), rtol=0, atol=1e-6)


def test_orpo_hand_example():
    """P_w = 0.5, P_l = 0.2: odds 1 and 1/4, log odds ratio = log 4, sigmoid(log 4) = 4/5, so
    loss = -log 0.5 + lam * -log(4/5) = log 2 + 0.1 * log 1.25."""
    logps = torch.tensor([[math.log(0.2), math.log(0.5)]])
    loss = orpo(logps, torch.tensor([[1.0, 2.0]]), lam=0.1)
    torch.testing.assert_close(loss, torch.tensor([math.log(2) + 0.1 * math.log(1.25)]), rtol=0, atol=1e-6)


def test_dpo_hand_example():
    """Chosen: mean logp -1.0 over 4 tokens, reference -1.5: summed ratio +2. Rejected: -2.0 over
    2 tokens, reference -1.0: ratio -2. beta 0.5: rewards +1 and -1, loss = log(1 + e^-2).
    At logps == ref_logps the loss is log 2 and d loss / d logps_k = -/+ beta * len_k / 2."""
    scores, lengths = torch.tensor([[9.0, 3.0]]), torch.tensor([[4, 2]])
    loss = dpo(torch.tensor([[-1.0, -2.0]]), scores, ref_logps=torch.tensor([[-1.5, -1.0]]), lengths=lengths, beta=0.5)
    torch.testing.assert_close(loss, torch.tensor([softplus(-2.0)]), rtol=0, atol=1e-6)
    logps = torch.tensor([[-1.2, -0.7]], requires_grad=True)
    loss = dpo(logps, scores, ref_logps=logps.detach().clone(), lengths=lengths, beta=0.5)
    torch.testing.assert_close(loss, torch.tensor([math.log(2)]), rtol=0, atol=1e-6)
    loss.sum().backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.5 * 4 / 2, 0.5 * 2 / 2]]), rtol=0, atol=1e-6)


def naive_pair(name, b, best, worst, logps, ref, lengths):
    """The loss of response `best` chosen over `worst` in group b, with the math module."""
    w, l = logps[b][best], logps[b][worst]
    if name == "simpo":
        return softplus(-(2.0 * (w - l) - 1.0))
    if name == "orpo":
        log_odds = lambda m: m - math.log(1 - math.exp(m))
        return -w + 0.1 * softplus(-(log_odds(w) - log_odds(l)))
    rw = 0.1 * lengths[b][best] * (w - ref[b][best])
    rl = 0.1 * lengths[b][worst] * (l - ref[b][worst])
    return softplus(-(rw - rl))


def naive(name, logps, scores, mask, ref, lengths):
    """One group at a time: the mean of naive_pair over every (tied-best, tied-worst) pair."""
    out = []
    for b in range(len(logps)):
        idx = [k for k in range(len(logps[b])) if mask[b][k]]
        top, bottom = max(scores[b][k] for k in idx), min(scores[b][k] for k in idx)
        if top == bottom:
            out.append(0.0)
            continue
        pairs = [(w, l) for w in idx for l in idx if scores[b][w] == top and scores[b][l] == bottom]
        out.append(sum(naive_pair(name, b, w, l, logps, ref, lengths) for w, l in pairs) / len(pairs))
    return out


@pytest.mark.parametrize("name", ["simpo", "orpo", "dpo"])
def test_against_naive_loop(name):
    """Random groups of 2-5 responses with tied scores and padding slots holding NaN: each loss
    (default hyperparameters) equals the naive loop, and padding never reaches loss or gradient."""
    g = torch.Generator().manual_seed(0)
    B, K = 64, 5
    logps = -torch.rand(B, K, generator=g) * 3 - 0.01
    scores = torch.randint(0, 4, (B, K), generator=g).float()  # many ties, some all-equal groups
    n = torch.randint(2, K + 1, (B,), generator=g)
    mask = torch.arange(K)[None] < n[:, None]
    ref = -torch.rand(B, K, generator=g) * 3
    lengths = torch.randint(1, 30, (B, K), generator=g)
    expected = naive(name, logps.tolist(), scores.tolist(), mask.tolist(), ref.tolist(), lengths.tolist())
    x = logps.masked_fill(~mask, float("nan")).requires_grad_()
    kwargs = {"ref_logps": ref.masked_fill(~mask, float("nan")), "lengths": lengths} if name == "dpo" else {}
    loss = BASELINES[name](x, scores, mask, **kwargs)
    torch.testing.assert_close(loss, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    loss.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()


@pytest.mark.parametrize("name", ["simpo", "orpo", "dpo"])
def test_pair_rule_and_no_preference(name):
    """A group of 4 is the pair (best, worst): scores (3, 0, 2, 1) give the same loss as the
    group of responses 0 and 1 alone, and the middle responses get no gradient. A group whose
    scores are all equal gets loss 0 and no gradient."""
    logps = torch.tensor([[-0.5, -1.5, -0.2, -3.0], [-0.5, -1.5, -0.2, -3.0]], requires_grad=True)
    scores = torch.tensor([[3.0, 0.0, 2.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    extra = lambda cols: {
        "ref_logps": torch.tensor([[-1.0, -1.0, -1.0, -1.0]])[:, cols],
        "lengths": torch.tensor([[3, 5, 7, 2]])[:, cols],
    }
    kw4 = {k: v.expand(2, -1) for k, v in extra([0, 1, 2, 3]).items()} if name == "dpo" else {}
    kw2 = extra([0, 1]) if name == "dpo" else {}
    loss = BASELINES[name](logps, scores, **kw4)
    pair = BASELINES[name](logps.detach()[:1, :2], scores[:1, :2], **kw2)
    torch.testing.assert_close(loss[0], pair[0], rtol=0, atol=1e-6)
    assert loss[1] == 0
    loss.sum().backward()
    assert logps.grad[0, 2] == 0 and logps.grad[0, 3] == 0 and (logps.grad[1] == 0).all()
    assert logps.grad[0, 0] < 0 < logps.grad[0, 1]  # raise the chosen, lower the rejected


def test_simpo_hand_ties():
    """beta 2, gamma 1. Tie for best: scores (5, 5, 1), logps (-1, -2, -2): the pairs (0, 2) and
    (1, 2) have z = 2 * 1 - 1 = 1 and z = 2 * 0 - 1 = -1, so the loss is their mean,
    (log(1 + e^-1) + log(1 + e)) / 2. Tie for worst: scores (5, 1, 1), logps (-1, -2, -1): the
    pairs (0, 1) and (0, 2) have the same z = 1 and -1, hence the same loss. Reordering either
    group does not change it (taking the first of the tied would give log(1 + e^-1) or log(1 + e))."""
    expected = (softplus(-1.0) + softplus(1.0)) / 2
    groups = [([-1.0, -2.0, -2.0], [5.0, 5.0, 1.0]), ([-1.0, -2.0, -1.0], [5.0, 1.0, 1.0])]
    for logps, scores in groups:
        for order in itertools.permutations(range(3)):
            loss = simpo(
                torch.tensor([logps])[:, order], torch.tensor([scores])[:, order], beta=2.0, gamma_beta_ratio=0.5
            )
            torch.testing.assert_close(loss, torch.tensor([expected]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["simpo", "orpo", "dpo"])
@pytest.mark.parametrize(
    "scores, pairs", [((3.0, 1.0, 2.0, 1.0), [[0, 1], [0, 3]]), ((3.0, 1.0, 3.0, 2.0), [[0, 1], [2, 1]])]
)
def test_ties_average_the_pairs(name, scores, pairs):
    """Scores (3, 1, 2, 1): the worst ties between responses 1 and 3, so the loss is the mean of
    the two-response losses of (0, 1) and (0, 3); (3, 1, 3, 2): the best ties, the mean of (0, 1)
    and (2, 1). The middle response gets no gradient; each tied response gets its share."""
    logps = torch.tensor([[-0.5, -1.5, -0.2, -3.0]], dtype=torch.float64)
    ref, lengths = torch.tensor([[-1.0, -0.7, -1.2, -2.0]], dtype=torch.float64), torch.tensor([[3, 5, 7, 2]])
    kw = lambda cols: {"ref_logps": ref[:, cols], "lengths": lengths[:, cols]} if name == "dpo" else {}
    fn, scores = BASELINES[name], torch.tensor([scores], dtype=torch.float64)
    x = logps.clone().requires_grad_()
    loss = fn(x, scores, **kw([0, 1, 2, 3]))
    expected = sum(fn(logps[:, c], scores[:, c], **kw(c)) for c in pairs) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    loss.sum().backward()
    middle = ({0, 1, 2, 3} - {k for c in pairs for k in c}).pop()
    assert x.grad[0, middle] == 0 and all(x.grad[0, k] != 0 for c in pairs for k in c)


@pytest.mark.parametrize("name", ["simpo", "orpo", "dpo"])
def test_order_invariance_with_ties(name):
    """Each group's slots (responses and NaN padding alike) reordered by its own random
    permutation, on a batch with many tied bests and worsts: each group's loss is unchanged and
    the gradient is permuted alike."""
    g = torch.Generator().manual_seed(1)
    B, K = 64, 5
    logps = -torch.rand(B, K, generator=g, dtype=torch.float64) * 3 - 0.01
    scores = torch.randint(0, 3, (B, K), generator=g).double()
    mask = torch.arange(K)[None] < torch.randint(2, K + 1, (B,), generator=g)[:, None]
    ref = -torch.rand(B, K, generator=g, dtype=torch.float64) * 3
    lengths = torch.randint(1, 30, (B, K), generator=g)
    logps, ref = logps.masked_fill(~mask, float("nan")), ref.masked_fill(~mask, float("nan"))
    perm = torch.rand(B, K, generator=g).argsort(dim=1)
    shuffle = lambda v: v.gather(1, perm)
    x, y = logps.clone().requires_grad_(), shuffle(logps).requires_grad_()
    kw_x = {"ref_logps": ref, "lengths": lengths} if name == "dpo" else {}
    kw_y = {"ref_logps": shuffle(ref), "lengths": shuffle(lengths)} if name == "dpo" else {}
    loss_x = BASELINES[name](x, scores, mask, **kw_x)
    loss_y = BASELINES[name](y, shuffle(scores), shuffle(mask), **kw_y)
    torch.testing.assert_close(loss_y, loss_x, rtol=1e-12, atol=1e-14)
    loss_x.sum().backward()
    loss_y.sum().backward()
    torch.testing.assert_close(y.grad, shuffle(x.grad), rtol=1e-12, atol=1e-14)


# -----------------------------------------------------------------------------
# train.py --loss simpo / orpo / dpo


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Llama with the demo's tokenizer and 32 of the demo's preference groups."""
    root = tmp_path_factory.mktemp("baselines")
    save_demo_llama(root / "init")
    copy_demo_rows("train.jsonl", 32, root / "train.jsonl")
    return root


@pytest.mark.parametrize("name", ["simpo", "orpo", "dpo"])
def test_train_with_baseline(tiny, tmp_path, name):
    """Four full-batch steps on the same 32 groups with each baseline: the
    training loss falls. DPO's first logged loss is log 2 exactly as the derivation says: before
    the first update the policy is the reference, so every reward is 0."""
    out = tmp_path / name
    argv = [
        "--model",
        tiny / "init",
        "--data",
        tiny / "train.jsonl",
        "--loss",
        name,
        "--out",
        out,
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
        1,
        "--warmup_ratio",
        0.0,
        "--epochs",
        4,
    ]
    run(*argv)
    rows = records(out, "train")
    assert len(rows) == 4
    if name == "dpo":
        assert abs(rows[0]["loss"] - math.log(2)) < 1e-5
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.01
