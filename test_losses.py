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
        torch.testing.assert_close(LOSSES[name](logps, scores), expected, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("name", PAIRWISE)
def test_no_preference_gives_zero_loss_and_zero_gradient(name):
    """A group whose scores are all equal, and a group with one present response, carry no
    preference: loss 0 and gradient 0, while a normal group in the same batch is unaffected."""
    logps = torch.tensor([[-0.5, -1.0, -2.0], [-0.3, -0.9, -1.1], [-0.7, -0.2, -3.0]], dtype=torch.float64, requires_grad=True)
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
    torch.testing.assert_close(LOSSES[name](logps[:, perm], scores[:, perm]), LOSSES[name](logps, scores), rtol=1e-12, atol=1e-14)


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


def test_losses_registry():
    """LOSSES holds exactly the eight variants of the paper, under the paper's names."""
    assert sorted(LOSSES) == sorted(
        ["point_ce", "point_mse", "pair_single", "pair_mns", "pair_mnm", "pair_mcs", "pair_mcm", "list_mle"]
    )
