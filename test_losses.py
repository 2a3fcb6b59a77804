"""
Tests of the eight MPPO losses in mppo.py.

Each loss is checked against (1) small examples computed by hand, with the derivation in
the test's docstring, for distinct scores and for ties at the top, in the middle and at the
bottom, (2) a plain Python loop written independently below, on random ragged batches with
ties, and (3) the properties the conventions promise: padding and permutation invariance (ties
included, gradients too), the K = 2 identities, finite values and gradients at the extremes,
gradcheck, and that each loss runs when copied with only the helpers its docstring names.

    python -m pytest test_losses.py -q
"""

import inspect
import math
import random
import re

import pytest
import torch

import mppo
from mppo import LOSSES, best_mask, has_preference, pair_mask


def softplus_neg(x):
    """-log sigmoid(x) = log(1 + exp(-x)), in closed form."""
    return math.log1p(math.exp(-x))


def t(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


def logs(rows):
    """logps from rewards p: the losses take log p, the tests think in p."""
    return t(rows).log()


# ---------------------------------------------------------------------------
# hand-computed examples


def test_point_ce_hand():
    """p = [1/2, 1/4], score = [1, 1/2].
    response 1: -(1 * log 1/2 + 0 * log 1/2) = log 2
    response 2: -(1/2 * log 1/4 + 1/2 * log 3/4) = 1/2 * log(16/3)
    loss = (log 2 + 1/2 log(16/3)) / 2
    """
    loss = mppo.point_ce(logs([[0.5, 0.25]]), t([[1.0, 0.5]]))
    expected = (math.log(2) + 0.5 * math.log(16 / 3)) / 2
    torch.testing.assert_close(loss, t([expected]), rtol=1e-6, atol=0)


def test_point_mse_hand():
    """p = [1/2, 1/4], score = [1, 1/2]: ((1 - 1/2)^2 + (1/2 - 1/4)^2) / 2 = (1/4 + 1/16) / 2 = 5/32."""
    loss = mppo.point_mse(logs([[0.5, 0.25]]), t([[1.0, 0.5]]))
    torch.testing.assert_close(loss, t([5 / 32]), rtol=1e-6, atol=0)


def test_point_losses_reject_unscaled_scores():
    """Raw 1-10 scores must be scaled first; the error says how."""
    for fn in (mppo.point_ce, mppo.point_mse):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            fn(logs([[0.5, 0.25]]), t([[8.0, 3.0]]))


def test_pair_single_hand():
    """One negative: p_w = 3/4, p_l = 1/4, so loss = -log sigmoid(1/2) = log(1 + e^(-1/2))."""
    loss = mppo.pair_single(logs([[0.25, 0.75]]), t([[1.0, 2.0]]))
    torch.testing.assert_close(loss, t([softplus_neg(0.5)]), rtol=1e-6, atol=0)


def test_pair_mns_hand():
    """p = [1/2, 1/4, 3/4, 1/2], scores = [3, 1, 2, 3].
    chosen: indices 0 and 3 (tied at 3, both p = 1/2, so the mean over them is either one's
    loss). Negatives: strictly lower scores, indices 1 and 2 (the tied best is no negative).
    loss = -log s(1/2 - 1/4) - log s(1/2 - 3/4) = log(1 + e^(-1/4)) + log(1 + e^(1/4))
    """
    loss = mppo.pair_mns(logs([[0.5, 0.25, 0.75, 0.5]]), t([[3.0, 1.0, 2.0, 3.0]]))
    torch.testing.assert_close(loss, t([softplus_neg(0.25) + softplus_neg(-0.25)]), rtol=1e-6, atol=0)


def test_pair_mnm_hand():
    """Same group as Pair-MNS: N = 2, margin = 2 * 1/2 - (1/4 + 3/4) = 0 for either tied-best
    chosen, loss = -log s(0) = log 2 (a margin of 0 hides N: see test_pair_mnm_hand_margins)."""
    loss = mppo.pair_mnm(logs([[0.5, 0.25, 0.75, 0.5]]), t([[3.0, 1.0, 2.0, 3.0]]))
    torch.testing.assert_close(loss, t([math.log(2)]), rtol=1e-6, atol=0)


def test_pair_mcs_hand():
    """p = [1/2, 1/4, 3/4], scores = [3, 1, 2]. Pairs (better, worse) and their margins:
    (0, 1): 1/4; (0, 2): -1/4; (2, 1): 1/2.
    loss = log(1 + e^(-1/4)) + log(1 + e^(1/4)) + log(1 + e^(-1/2))
    """
    loss = mppo.pair_mcs(logs([[0.5, 0.25, 0.75]]), t([[3.0, 1.0, 2.0]]))
    expected = softplus_neg(0.25) + softplus_neg(-0.25) + softplus_neg(0.5)
    torch.testing.assert_close(loss, t([expected]), rtol=1e-6, atol=0)


def test_pair_mcm_hand():
    """Same group as Pair-MCS: summed margin 1/4 - 1/4 + 1/2 = 1/2, loss = log(1 + e^(-1/2))."""
    loss = mppo.pair_mcm(logs([[0.5, 0.25, 0.75]]), t([[3.0, 1.0, 2.0]]))
    torch.testing.assert_close(loss, t([softplus_neg(0.5)]), rtol=1e-6, atol=0)


def test_list_mle_hand_equal_rewards():
    """Three responses with the same p = 1/2 and distinct scores. Term i is
    p - log(sum over the n_i responses ranked at or after i of e^p) = -log n_i,
    with n = 3, 2, 1, so loss = log 3 + log 2 + log 1 = log 6.
    """
    loss = mppo.list_mle(logs([[0.5, 0.5, 0.5]]), t([[1.0, 3.0, 2.0]]))
    torch.testing.assert_close(loss, t([math.log(6)]), rtol=1e-6, atol=0)


def test_list_mle_hand_ranked():
    """p = [1/4, 1/2, 3/4], scores = [1, 3, 2]: ranked by score, p = (1/2, 3/4, 1/4).
    loss = -(1/2 - log(e^1/2 + e^3/4 + e^1/4)) - (3/4 - log(e^3/4 + e^1/4)) - 0
    """
    loss = mppo.list_mle(logs([[0.25, 0.5, 0.75]]), t([[1.0, 3.0, 2.0]]))
    e = math.exp
    expected = -(0.5 - math.log(e(0.5) + e(0.75) + e(0.25))) - (0.75 - math.log(e(0.75) + e(0.25)))
    torch.testing.assert_close(loss, t([expected]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_pair_mnm_hand_margins(n):
    """p_w = 3/4 against the first N of p_l = (1/4, 1/2, 1/4): the margin N * p_w - sum p_l is
    N = 1: 3/4 - 1/4 = 1/2;  N = 2: 3/2 - 3/4 = 3/4;  N = 3: 9/4 - 1 = 5/4,
    loss = log(1 + e^(-margin)). With q = sigmoid(-margin), d loss / d p_w = -N q and
    d loss / d p_l = q, and d / d logps = p * d / d p."""
    p = [0.75, 0.25, 0.5, 0.25][: n + 1]
    margin = {1: 0.5, 2: 0.75, 3: 1.25}[n]
    q = 1 / (1 + math.exp(margin))
    logps = logs([p]).requires_grad_()
    loss = mppo.pair_mnm(logps, t([[4.0, 3.0, 2.0, 1.0][: n + 1]]))
    torch.testing.assert_close(loss, t([softplus_neg(margin)]), rtol=1e-12, atol=0)
    loss.sum().backward()
    expected_grad = [p[0] * -n * q] + [x * q for x in p[1:]]
    torch.testing.assert_close(logps.grad, t([expected_grad]), rtol=1e-12, atol=0)


def test_pair_mnm_hand_margins_padded():
    """The three groups of test_pair_mnm_hand_margins (N = 1, 2, 3) in one batch padded to K = 4
    with NaN garbage, the chosen not in slot 0: the losses are log(1 + e^-m) for m = 1/2, 3/4,
    5/4, and padding gets zero gradient."""
    nan = float("nan")
    logps = logs([[0.25, 0.75, nan, nan], [0.5, 0.25, 0.75, nan], [0.25, 0.5, 0.25, 0.75]]).requires_grad_()
    scores = t([[3.0, 4.0, nan, 9.0], [2.0, 3.0, 4.0, nan], [1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[True, True, False, False], [True, True, True, False], [True, True, True, True]])
    loss = mppo.pair_mnm(logps, scores, mask)
    torch.testing.assert_close(loss, t([softplus_neg(0.5), softplus_neg(0.75), softplus_neg(1.25)]), rtol=1e-12, atol=0)
    loss.sum().backward()
    assert logps.grad[~mask].abs().max().item() == 0 and torch.isfinite(logps.grad).all()


# p = (3/4, 1/4, 1/2, 1/2), scores = (3, 1, 3, 2): responses 0 and 2 tie for the top.
TIE_TOP = ([[0.75, 0.25, 0.5, 0.5]], [[3.0, 1.0, 3.0, 2.0]])
# p = (3/4, 1/2, 1/4, 1/4), scores = (3, 2, 1, 2): responses 1 and 3 tie in the middle.
TIE_MIDDLE = ([[0.75, 0.5, 0.25, 0.25]], [[3.0, 2.0, 1.0, 2.0]])


def test_tie_at_top_hand():
    """TIE_TOP: chosen 0 and 2 (p 3/4, 1/2), negatives 1 and 3 (p 1/4, 1/2), N = 2.
    Pair-MNS: chosen 0: ls(1/2) + ls(1/4); chosen 2: ls(1/4) + ls(0); the mean of the two,
      with ls(x) = -log s(x) = log(1 + e^-x) and ls(0) = log 2.
    Pair-MNM: margins 2 * 3/4 - 3/4 = 3/4 and 2 * 1/2 - 3/4 = 1/4: (ls(3/4) + ls(1/4)) / 2.
    Pair-MCS: pairs (0,1) 1/2, (0,3) 1/4, (2,1) 1/4, (2,3) 0, (3,1) 1/4, and none between 0
      and 2: ls(1/2) + 3 ls(1/4) + log 2.  Pair-MCM: ls(1/2 + 1/4 + 1/4 + 0 + 1/4) = ls(5/4).
    List-MLE, blocks {0, 2}, {3}, {1}:
      -[(3/4 + 1/2) - 2 log(e^3/4 + e^1/4 + 2 e^1/2)] - [1/2 - log(e^1/2 + e^1/4)] - 0.
    """
    e, ls = math.exp, softplus_neg
    expected = {
        "pair_mns": (ls(0.5) + 2 * ls(0.25) + math.log(2)) / 2,
        "pair_mnm": (ls(0.75) + ls(0.25)) / 2,
        "pair_mcs": ls(0.5) + 3 * ls(0.25) + math.log(2),
        "pair_mcm": ls(1.25),
        "list_mle": -(1.25 - 2 * math.log(e(0.75) + e(0.25) + 2 * e(0.5))) - (0.5 - math.log(e(0.5) + e(0.25))),
    }
    p, scores = TIE_TOP
    for name, value in expected.items():
        torch.testing.assert_close(
            LOSSES[name](logs(p), t(scores)),
            t([value]),
            rtol=1e-12,
            atol=0,
            msg=lambda report, name=name: f"{name}: {report}",
        )


def test_tie_at_top_pair_single_hand():
    """TIE_TOP, 2000 copies: the drawn negative is 1 (p 1/4) or 3 (p 1/2), shared by both
    chosen, so the loss is (ls(1/2) + ls(1/4)) / 2 or (ls(1/4) + ls(0)) / 2, each about half
    the time, and never anything else (e.g. a pair between the two tied-best)."""
    p, scores = TIE_TOP
    loss = mppo.pair_single(logs(p * 2000), t(scores * 2000), generator=torch.Generator().manual_seed(0))
    ls = softplus_neg
    with_1 = torch.isclose(loss, t([(ls(0.5) + ls(0.25)) / 2]), rtol=1e-12, atol=0)
    with_3 = torch.isclose(loss, t([(ls(0.25) + math.log(2)) / 2]), rtol=1e-12, atol=0)
    assert bool((with_1 | with_3).all())
    assert abs(with_1.double().mean().item() - 0.5) < 0.05


def test_tie_in_middle_hand():
    """TIE_MIDDLE: the chosen is 0 (p 3/4), negatives 1, 2, 3 (p 1/2, 1/4, 1/4), N = 3.
    Pair-MNS: ls(1/4) + 2 ls(1/2).  Pair-MNM: ls(9/4 - 1) = ls(5/4).  Pair-Single (one draw):
      ls(1/4) or ls(1/2).
    Pair-MCS: pairs (0,1) 1/4, (0,2) 1/2, (0,3) 1/2, (1,2) 1/4, (3,2) 0, none between 1 and 3:
      2 ls(1/4) + 2 ls(1/2) + log 2.  Pair-MCM: ls(1/4 + 1/2 + 1/2 + 1/4 + 0) = ls(3/2).
    List-MLE, blocks {0}, {1, 3}, {2}:
      -[3/4 - log(e^3/4 + e^1/2 + 2 e^1/4)] - [(1/2 + 1/4) - 2 log(e^1/2 + 2 e^1/4)] - 0.
    """
    e, ls = math.exp, softplus_neg
    expected = {
        "pair_mns": ls(0.25) + 2 * ls(0.5),
        "pair_mnm": ls(1.25),
        "pair_mcs": 2 * ls(0.25) + 2 * ls(0.5) + math.log(2),
        "pair_mcm": ls(1.5),
        "list_mle": -(0.75 - math.log(e(0.75) + e(0.5) + 2 * e(0.25))) - (0.75 - 2 * math.log(e(0.5) + 2 * e(0.25))),
    }
    p, scores = TIE_MIDDLE
    for name, value in expected.items():
        torch.testing.assert_close(
            LOSSES[name](logs(p), t(scores)),
            t([value]),
            rtol=1e-12,
            atol=0,
            msg=lambda report, name=name: f"{name}: {report}",
        )
    single = mppo.pair_single(logs(p * 200), t(scores * 200), generator=torch.Generator().manual_seed(0))
    assert {round(x, 12) for x in single.tolist()} == {round(ls(0.25), 12), round(ls(0.5), 12)}


@pytest.mark.parametrize(
    "scores, expected",
    [
        ([1.0, 3.0, 2.0], math.log(6)),
        ([2.0, 2.0, 1.0], math.log(9)),
        ([2.0, 1.0, 1.0], math.log(12)),
        ([3.0, 2.0, 1.0, 2.0], math.log(36)),
    ],
)
def test_list_mle_hand_equal_rewards_with_ties(scores, expected):
    """Equal p for every response: a block of m tied responses with n responses at or after it
    contributes m p - m log(n e^p) = -m log n, so loss = sum over blocks of m log n:
    distinct (3, 2, 1 at or after): log 6; top tie (m 2, n 3), then n 1: 2 log 3 = log 9;
    bottom tie: log 3 + 2 log 2 = log 12; middle tie: log 4 + 2 log 3 + log 1 = log 36."""
    loss = mppo.list_mle(logs([[0.5] * len(scores)]), t([scores]))
    torch.testing.assert_close(loss, t([expected]), rtol=1e-12, atol=0)


def test_issue_example_both_orders_agree():
    """scores (3, 3, 1), logps (-0.1, -2.0, -1.0), so p = e^logps. Taking the first of the tied
    best gave 0.460 in one order and 0.816 in the other for Pair-Single/MNS/MNM, and List-MLE
    1.533 / 1.947. Now both orders give, with one negative (index 2):
      Pair-Single = Pair-MNS = Pair-MNM = (ls(p0 - p2) + ls(p1 - p2)) / 2 = 0.638
      List-MLE = -[(p0 + p1) - 2 log(e^p0 + e^p1 + e^p2)] - 0 = 2.203
    and Pair-MCS / MCM stay ls(p0 - p2) + ls(p1 - p2) = 1.276 and ls(p0 + p1 - 2 p2) = 0.552."""
    p0, p1, p2 = math.exp(-0.1), math.exp(-2.0), math.exp(-1.0)
    ls = softplus_neg
    expected = {
        "pair_single": (ls(p0 - p2) + ls(p1 - p2)) / 2,
        "pair_mns": (ls(p0 - p2) + ls(p1 - p2)) / 2,
        "pair_mnm": (ls(p0 - p2) + ls(p1 - p2)) / 2,
        "pair_mcs": ls(p0 - p2) + ls(p1 - p2),
        "pair_mcm": ls(p0 + p1 - 2 * p2),
        "list_mle": -((p0 + p1) - 2 * math.log(math.exp(p0) + math.exp(p1) + math.exp(p2))),
    }
    assert round(expected["pair_mnm"], 3) == 0.638 and round(expected["list_mle"], 3) == 2.203
    logps, scores = t([[-0.1, -2.0, -1.0]]), t([[3.0, 3.0, 1.0]])
    for name, value in expected.items():
        for order in ([0, 1, 2], [1, 0, 2]):
            torch.testing.assert_close(
                LOSSES[name](logps[:, order], scores),
                t([value]),
                rtol=1e-12,
                atol=0,
                msg=lambda report, name=name: f"{name}: {report}",
            )


# ---------------------------------------------------------------------------
# the masks that decide who is compared with whom


def test_best_mask_and_pair_mask_by_hand():
    """Rows: a top tie (3, 1, 3) with a NaN padding slot; all equal; one present response;
    a top tie (4, 4) above 1 and 2. best_mask marks the tied-top present slots, best_mask of
    -scores the tied-bottom ones, pair_mask every present (i, j) with score_i > score_j."""
    nan = float("nan")
    scores = t([[3.0, 1.0, 3.0, nan], [2.0, 2.0, 2.0, 2.0], [5.0, nan, 9.0, nan], [1.0, 4.0, 2.0, 4.0]])
    mask = torch.tensor([[True, True, True, False], [True] * 4, [True, False, False, False], [True] * 4])
    T, F_ = True, False
    assert best_mask(scores, mask).tolist() == [[T, F_, T, F_], [T, T, T, T], [T, F_, F_, F_], [F_, T, F_, T]]
    assert best_mask(-scores, mask).tolist() == [[F_, T, F_, F_], [T, T, T, T], [T, F_, F_, F_], [T, F_, F_, F_]]
    pairs = pair_mask(scores, mask)
    expected = [[(0, 1), (2, 1)], [], [], [(1, 0), (1, 2), (2, 0), (3, 0), (3, 2)]]
    for b in range(4):
        assert sorted(map(tuple, pairs[b].nonzero().tolist())) == expected[b]
    assert has_preference(scores, mask).tolist() == [True, False, False, True]
    assert best_mask(t([[1.0, 2.0, 2.0]])).tolist() == [[False, True, True]]  # mask None: all present
    assert pair_mask(t([[1.0, 2.0]])).tolist() == [[[False, False], [True, False]]]


def test_masks_match_naive_loop():
    """best_mask, pair_mask and has_preference against plain loops on random ragged batches with ties."""
    groups, logps, scores, mask = random_ragged_batch(3)
    best, pairs, pref = best_mask(scores, mask), pair_mask(scores, mask), has_preference(scores, mask)
    K = scores.shape[1]
    for b, (ps, ss) in enumerate(groups):
        n = len(ss)
        assert best[b].tolist() == [k < n and ss[k] == max(ss) for k in range(K)]
        assert pairs[b].tolist() == [[i < n and j < n and ss[i] > ss[j] for j in range(K)] for i in range(K)]
        assert pref[b].item() == (len(set(ss)) > 1)


def test_pair_single_draws_each_negative_uniformly():
    """The chosen (indices 0 and 2, tied at score 3 with equal p) must be paired with index 1
    or 3 (scores 1 and 2), never with each other nor with the padding slot. Over 4000 copies of the group
    both negatives are drawn, each about half the time, and the loss matches the drawn one."""
    p = [0.5, 0.25, 0.5, 0.75, 0.1]
    n = 4000
    logps = logs([p] * n)
    scores = t([[3.0, 1.0, 3.0, 2.0, 0.0]] * n)
    mask = torch.tensor([[True, True, True, True, False]] * n)
    loss = mppo.pair_single(logps, scores, mask, generator=torch.Generator().manual_seed(0))
    with_1 = torch.isclose(loss, t([softplus_neg(0.25)]), rtol=1e-9, atol=0)
    with_3 = torch.isclose(loss, t([softplus_neg(-0.25)]), rtol=1e-9, atol=0)
    assert bool((with_1 | with_3).all())
    assert abs(with_1.double().mean().item() - 0.5) < 0.05


def test_pair_single_generator_reproducible():
    """The same generator seed draws the same negatives; another seed draws others."""
    g = lambda s: torch.Generator().manual_seed(s)
    logps, scores = torch.randn(64, 6).clamp(max=-0.01), torch.randint(0, 5, (64, 6)).double()
    a = mppo.pair_single(logps, scores, generator=g(1))
    b = mppo.pair_single(logps, scores, generator=g(1))
    c = mppo.pair_single(logps, scores, generator=g(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------
# identities and the no-preference rule

PAIRWISE = ["pair_single", "pair_mns", "pair_mnm", "pair_mcs", "pair_mcm", "list_mle"]


def test_two_responses_all_pairwise_losses_agree():
    """With K = 2 (one negative) every pair-wise loss and List-MLE reduce to -log s(p_w - p_l)."""
    torch.manual_seed(0)
    logps = -torch.rand(32, 2, dtype=torch.float64) * 3
    scores = torch.rand(32, 2, dtype=torch.float64)
    p = logps.exp()
    w = scores.argmax(dim=1, keepdim=True)
    expected = -torch.nn.functional.logsigmoid(p.gather(1, w) - p.gather(1, 1 - w)).squeeze(1)
    for name in PAIRWISE:
        torch.testing.assert_close(
            LOSSES[name](logps, scores),
            expected,
            rtol=1e-12,
            atol=1e-12,
            msg=lambda report, name=name: f"{name}: {report}",
        )


@pytest.mark.parametrize("name", PAIRWISE)
def test_no_preference_gives_zero_loss_and_zero_gradient(name):
    """A group whose scores are all equal, and a group with one present response, carry no
    preference: loss 0 and gradient 0, while a normal group in the same batch is unaffected."""
    logps = torch.tensor(
        [[-0.5, -1.0, -2.0], [-0.3, -0.9, -1.1], [-0.7, -0.2, -3.0]], dtype=torch.float64, requires_grad=True
    )
    scores = t([[2.0, 2.0, 2.0], [3.0, 1.0, 2.0], [5.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, True], [True, False, False]])
    loss = LOSSES[name](logps, scores, mask)
    loss.sum().backward()
    assert loss[0].item() == 0 and loss[2].item() == 0 and loss[1].item() > 0
    assert logps.grad[0].abs().max().item() == 0 and logps.grad[2].abs().max().item() == 0
    assert logps.grad[1].abs().max().item() > 0
    assert has_preference(scores, mask).tolist() == [False, True, False]


def test_has_preference_ignores_padding():
    """Padding slots never create a preference, whatever their score (NaN included)."""
    scores = t([[1.0, 1.0, 7.0], [1.0, 2.0, float("nan")], [4.0, 4.0, 4.0]])
    mask = torch.tensor([[True, True, False], [True, True, False], [True, True, True]])
    assert has_preference(scores, mask).tolist() == [False, True, False]
    assert has_preference(t([[1.0, 2.0]])).tolist() == [True]


# ---------------------------------------------------------------------------
# independent reference: a plain Python loop over groups, written from the paper


def ls(x):
    """-log sigmoid(x), computed without overflow."""
    return math.log1p(math.exp(-x)) if x > -30 else -x


def naive_loss(name, ps, ss):
    """Loss of one group, from Python lists of present rewards p and scores (no padding).
    Ties: every response with the top score is a chosen (the pair losses average over them);
    negatives score strictly lower; List-MLE scores each block of equal scores with Breslow's rule."""
    n = len(ps)
    if name == "point_ce":
        return sum(-(s * math.log(p) + (1 - s) * math.log(1 - p)) for p, s in zip(ps, ss)) / n
    if name == "point_mse":
        return sum((s - p) ** 2 for p, s in zip(ps, ss)) / n
    chosen = [i for i in range(n) if ss[i] == max(ss)]
    negs = [i for i in range(n) if ss[i] < max(ss)]
    pairs = [(i, j) for i in range(n) for j in range(n) if ss[i] > ss[j]]
    if not pairs:
        return 0.0
    if name == "pair_mns":
        return sum(sum(ls(ps[w] - ps[i]) for i in negs) for w in chosen) / len(chosen)
    if name == "pair_mnm":
        return sum(ls(len(negs) * ps[w] - sum(ps[i] for i in negs)) for w in chosen) / len(chosen)
    if name == "pair_mcs":
        return sum(ls(ps[i] - ps[j]) for i, j in pairs)
    if name == "pair_mcm":
        return ls(sum(ps[i] - ps[j] for i, j in pairs))
    if name == "list_mle":
        total = 0.0
        for level in sorted(set(ss), reverse=True):  # blocks of equal score, best first
            block = [i for i in range(n) if ss[i] == level]
            at_or_after = [k for k in range(n) if ss[k] <= level]
            total += sum(ps[j] for j in block) - len(block) * math.log(sum(math.exp(ps[k]) for k in at_or_after))
        return -total
    raise KeyError(name)


def naive_pair_single_draws(ps, ss):
    """Every value Pair-Single may take on one group: for each strictly worse l, the mean over
    the tied-best w of -log s(p_w - p_l); [0.0] for a group without a preference."""
    chosen = [i for i in range(len(ps)) if ss[i] == max(ss)]
    negs = [i for i in range(len(ps)) if ss[i] < max(ss)]
    return [sum(ls(ps[w] - ps[l]) for w in chosen) / len(chosen) for l in negs] or [0.0]


def random_ragged_batch(seed, B=40, max_k=8, unit_scores=False):
    """Groups of 2..max_k responses with many ties, padded to K = max_k with NaN garbage."""
    rng = random.Random(seed)
    groups = []
    for _ in range(B):
        k = rng.randint(2, max_k)
        ps = [rng.uniform(0.02, 0.98) for _ in range(k)]
        if unit_scores:
            ss = [rng.choice([0.1, 0.3, 0.5, 0.7, 1.0]) for _ in range(k)]
        else:
            ss = [float(rng.randint(1, 4)) for _ in range(k)]  # few values: many ties
        groups.append((ps, ss))
    logps = torch.full((B, max_k), float("nan"), dtype=torch.float64)
    scores = torch.full((B, max_k), float("nan"), dtype=torch.float64)
    mask = torch.zeros(B, max_k, dtype=torch.bool)
    for b, (ps, ss) in enumerate(groups):
        logps[b, : len(ps)] = torch.tensor(ps, dtype=torch.float64).log()
        scores[b, : len(ss)] = torch.tensor(ss, dtype=torch.float64)
        mask[b, : len(ps)] = True
    return groups, logps, scores, mask


@pytest.mark.parametrize("name", [n for n in LOSSES if n != "pair_single"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_matches_naive_loop(name, seed):
    """Each vectorised loss equals the plain loop above on random ragged batches with ties."""
    groups, logps, scores, mask = random_ragged_batch(seed, unit_scores=name.startswith("point"))
    loss = LOSSES[name](logps, scores, mask)
    expected = t([naive_loss(name, ps, ss) for ps, ss in groups])
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_pair_single_matches_naive_choices(seed):
    """Pair-Single's loss is the mean over the tied-best w of -log s(p_w - p_l), for one of the
    strictly worse l (naive_pair_single_draws lists them), on random ragged batches with ties."""
    groups, logps, scores, mask = random_ragged_batch(seed)
    loss = mppo.pair_single(logps, scores, mask, generator=torch.Generator().manual_seed(seed))
    for b, (ps, ss) in enumerate(groups):
        allowed = naive_pair_single_draws(ps, ss)
        assert min(abs(loss[b].item() - a) for a in allowed) < 1e-12


# ---------------------------------------------------------------------------
# invariances, dtypes, extremes, gradcheck


def _loss_fn(name):
    if name == "pair_single":  # a fresh generator per call, so repeated calls draw the same pair
        return lambda *a: mppo.pair_single(*a, generator=torch.Generator().manual_seed(0))
    return LOSSES[name]


@pytest.mark.parametrize("name", list(LOSSES))
def test_padding_invariance(name):
    """A group padded with masked NaN/inf slots gives the same loss and gradient as unpadded.
    (The group has a single negative so Pair-Single's draw cannot differ.)"""
    base_logps = torch.tensor([[-0.7, -0.2, -1.5]], dtype=torch.float64)
    base_scores = t([[0.5, 0.9, 0.5]])
    a = base_logps.clone().requires_grad_()
    loss_a = _loss_fn(name)(a, base_scores, None)
    loss_a.sum().backward()
    padded = torch.cat([base_logps, t([[float("nan"), float("inf"), -float("inf")]])], dim=1).requires_grad_()
    scores = torch.cat([base_scores, t([[float("nan"), float("inf"), 5.0]])], dim=1)
    mask = torch.tensor([[True, True, True, False, False, False]])
    loss_b = _loss_fn(name)(padded, scores, mask)
    loss_b.sum().backward()
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=0)
    torch.testing.assert_close(padded.grad[:, :3], a.grad, rtol=1e-12, atol=0)
    assert padded.grad[:, 3:].abs().max().item() == 0


@pytest.mark.parametrize("name", [n for n in LOSSES if n != "pair_single"])
def test_permutation_invariance(name):
    """Reordering the responses of a group (distinct scores) does not change its loss."""
    torch.manual_seed(0)
    logps = -torch.rand(8, 5, dtype=torch.float64) * 2 - 0.01
    scores = torch.rand(8, 5, dtype=torch.float64)  # distinct almost surely
    perm = torch.randperm(5)
    torch.testing.assert_close(
        LOSSES[name](logps[:, perm], scores[:, perm]), LOSSES[name](logps, scores), rtol=1e-12, atol=1e-14
    )


def _permute_rows(x, perm):
    """x with each group's K slots reordered by its own row of perm (B, K)."""
    return x.gather(1, perm)


@pytest.mark.parametrize("name", [n for n in LOSSES if n != "pair_single"])
def test_permutation_invariance_with_ties(name):
    """Reordering each group's slots (responses and padding alike) by its own random permutation,
    on a ragged batch with many ties, leaves each group's loss unchanged and permutes the
    gradient alike. Pair-Single is tested below: its draw depends on the slots."""
    groups, logps, scores, mask = random_ragged_batch(4, unit_scores=name.startswith("point"))
    perm = torch.rand(scores.shape, generator=torch.Generator().manual_seed(0)).argsort(dim=1)
    x = logps.clone().requires_grad_()
    y = _permute_rows(logps, perm).requires_grad_()
    loss_x = LOSSES[name](x, scores, mask)
    loss_y = LOSSES[name](y, _permute_rows(scores, perm), _permute_rows(mask, perm))
    torch.testing.assert_close(loss_y, loss_x, rtol=1e-12, atol=1e-14)
    loss_x.sum().backward()
    loss_y.sum().backward()
    torch.testing.assert_close(y.grad, _permute_rows(x.grad, perm), rtol=1e-12, atol=1e-14)


def test_pair_single_permutation_invariance_one_negative():
    """Groups with one strictly worse response and 1-3 tied for the top, padded: Pair-Single's
    draw has one outcome, so a per-group permutation leaves loss and gradient (permuted alike)
    unchanged whatever the generator draws."""
    nan = float("nan")
    logps = torch.tensor(
        [[-0.1, -2.0, -1.0, nan], [-0.3, -0.2, -0.9, -1.7], [-1.2, -0.4, nan, nan]], dtype=torch.float64
    )
    scores = t([[3.0, 3.0, 1.0, nan], [2.0, 2.0, 0.0, 2.0], [0.5, 0.7, nan, nan]])
    mask = torch.tensor([[True, True, True, False], [True] * 4, [True, True, False, False]])
    perm = torch.tensor([[2, 3, 1, 0], [3, 2, 0, 1], [2, 1, 0, 3]])
    x = logps.clone().requires_grad_()
    y = _permute_rows(logps, perm).requires_grad_()
    loss_x = mppo.pair_single(x, scores, mask, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    loss_y = mppo.pair_single(y, _permute_rows(scores, perm), _permute_rows(mask, perm), generator=g)
    torch.testing.assert_close(loss_y, loss_x, rtol=1e-12, atol=0)
    loss_x.sum().backward()
    loss_y.sum().backward()
    torch.testing.assert_close(y.grad, _permute_rows(x.grad, perm), rtol=1e-12, atol=0)


def test_pair_single_permutation_invariance_of_draws():
    """With several negatives the drawn one depends on the slots, so what order cannot change is
    the distribution of the loss: 3000 copies of a group (two tied for the top, three negatives),
    each copy in its own random order, take exactly the three values naive_pair_single_draws
    lists, each about a third of the time, as the unpermuted copies do."""
    ps, ss = [0.9, 0.3, 0.6, 0.1, 0.2], [2.0, 1.0, 2.0, 0.0, 1.0]
    n = 3000
    logps, scores = logs([ps] * n), t([ss] * n)
    perm = torch.rand(n, 5, generator=torch.Generator().manual_seed(0)).argsort(dim=1)
    allowed = torch.tensor(naive_pair_single_draws(ps, ss), dtype=torch.float64)
    for lp, s in ((logps, scores), (_permute_rows(logps, perm), _permute_rows(scores, perm))):
        loss = mppo.pair_single(lp, s, generator=torch.Generator().manual_seed(1))  # not perm's seed
        hits = torch.isclose(loss[:, None], allowed[None, :], rtol=1e-12, atol=0)  # (n, 3)
        assert bool((hits.sum(dim=1) == 1).all())
        assert (hits.double().mean(dim=0) - 1 / 3).abs().max().item() < 0.04


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradcheck(name):
    """Analytic gradients match finite differences in float64, with padding present."""
    torch.manual_seed(0)
    logps = (-torch.rand(3, 4, dtype=torch.float64) * 2 - 0.05).requires_grad_()
    scores = t([[0.5, 0.2, 0.9, 0.1], [0.3, 0.3, 0.8, 0.0], [0.6, 0.4, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False], [True, True, False, False]])
    fn = _loss_fn(name)
    assert torch.autograd.gradcheck(lambda x: fn(x, scores, mask), (logps,))


@pytest.mark.parametrize("name", list(LOSSES))
def test_finite_at_extremes(name):
    """logps at 0 (p = 1), just below 0, and very negative (p -> 0) give finite losses and gradients."""
    logps = torch.tensor([[0.0, -1e-9, -80.0, -1e4]], requires_grad=True)
    scores = torch.tensor([[1.0, 0.2, 0.7, 0.0]])
    loss = _loss_fn(name)(logps, scores, None)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logps.grad).all()


@pytest.mark.parametrize("name", list(LOSSES))
def test_bf16_inputs_computed_in_float32(name):
    """bf16 logps give a float32 loss equal to the float32 computation on the same values."""
    torch.manual_seed(0)
    logps = (-torch.rand(4, 3) * 2 - 0.01).bfloat16()
    scores = torch.tensor([[0.2, 0.5, 0.9], [0.1, 0.3, 0.4], [1.0, 0.0, 0.5], [0.6, 0.7, 0.2]])
    out = _loss_fn(name)(logps, scores, None)
    assert out.dtype == torch.float32 and out.shape == (4,)
    torch.testing.assert_close(out, _loss_fn(name)(logps.float(), scores, None), rtol=0, atol=0)


# ---------------------------------------------------------------------------
# the copy promise: each loss runs with only the helpers its docstring names


def copy_with(fn):
    """The helper names of a loss's docstring line "Copy with: a, b." """
    m = re.search(r"^Copy with: ([\w, ]+)\.$", inspect.getdoc(fn), flags=re.M)
    assert m, f"{fn.__name__}'s docstring has no 'Copy with:' line"
    return [name.strip() for name in m.group(1).split(",")]


@pytest.mark.parametrize("name", list(LOSSES))
def test_copy_promise(name):
    """Execute the loss's source together with only the helpers named on its "Copy with:" line,
    in a fresh namespace holding just torch and F: on a random ragged batch with ties and NaN
    padding, and with mask None, the copy returns exactly what mppo.LOSSES[name] returns."""
    fn = LOSSES[name]
    helpers = copy_with(fn)
    assert 1 <= len(helpers) <= 2 and all(callable(getattr(mppo, h)) for h in helpers)
    namespace = {"torch": torch, "F": torch.nn.functional}
    for source in [inspect.getsource(getattr(mppo, h)) for h in helpers] + [inspect.getsource(fn)]:
        exec(source, namespace)
    copied = namespace[fn.__name__]
    _, logps, scores, mask = random_ragged_batch(5, unit_scores=name.startswith("point"))
    full = torch.where(mask, logps, -0.5), torch.where(mask, scores, 0.5)  # no padding: for mask None
    for args in ((logps, scores, mask), (*full, None)):
        kwargs = lambda: {"generator": torch.Generator().manual_seed(0)} if name == "pair_single" else {}
        assert torch.equal(copied(*args, **kwargs()), fn(*args, **kwargs())), name


def test_losses_registry():
    """LOSSES holds exactly the eight variants of the paper, under the paper's names."""
    assert sorted(LOSSES) == sorted(
        ["point_ce", "point_mse", "pair_single", "pair_mns", "pair_mnm", "pair_mcs", "pair_mcm", "list_mle"]
    )
