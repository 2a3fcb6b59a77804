"""
The eight MPPO losses (Xie et al., "MPPO: Multi Pair-wise Preference Optimization
for LLMs with Arbitrary Negative Samples", section 3.3), as pure functions of tensors.

The reward of a response y to a prompt x is the geometric mean of its token
probabilities (Eq. 4-5), with no reference model and no beta:

    p = prod_i pi(y_i | x, y_<i) ** (1 / |y|) = exp(mean_i log pi(y_i | x, y_<i))

Every loss takes the same three tensors and returns one loss per group, shape (B,);
the caller reduces (the trainer averages over groups that carry a preference):

    logps  (B, K) float  mean per-token log-likelihood of each response, so p = logps.exp()
    scores (B, K) float  the score of each response (higher is better)
    mask   (B, K) bool   False in the padding slots of groups with fewer than K responses;
                         None means every slot is a real response. Whatever a padding slot
                         holds (even NaN or inf) never reaches the loss or its gradient.

Who is compared with whom, decided once here for all eight losses. The rule: equal scores
never express a preference, so no loss depends on the order of the responses in a group.
  - the chosen (y_w of Eq. 8-10) is every present response tied for the top score
    (best_mask). The paper speaks of "the response with the highest score value"
    (section 3.3.2) and is silent on ties; Pair-Single, Pair-MNS and Pair-MNM take each
    tied-best response as the chosen in turn and average the loss over them, so neither
    of two equally good answers is favoured because of where it stands in the list.
  - the negatives (y_l of Eq. 8-10) are the responses scored strictly lower than the top,
    and N in Eq. 9-10 is their number. This DEVIATES from the paper's words, which make
    every response but the chosen a negative: "the response with the highest score value
    among the N + 1 answers as the positive sample, and all the others as negative
    samples" (section 3.3.2); "one of the remaining three responses was randomly chosen
    as negative" (section 4.1.2, Pair-Single); "classifies the remaining responses as
    negative" and "labels all others as negative" (section 5.3, Pair-MNM). With distinct
    scores both readings agree. With a tie for the top, the paper's words would push down
    one of two equally good answers, picked by its position in the list.
  - Pair-MCS / Pair-MCM use every ordered pair (i, j) with score_i > score_j (pair_mask):
    equal scores make no pair, as in "compare them based on their scores" (section 3.3.2).
  - List-MLE ranks by score ("all four responses were sorted by their scores", section
    4.1.2), with p as the Plackett-Luce utility. Eq. 13 assumes a strict order; tied
    responses form one block, scored with Breslow's rule for tied events (see list_mle).
  - Pair-Single pairs the chosen with one strictly worse response drawn uniformly at
    random, from an optional torch.Generator so runs are reproducible; one draw per group,
    shared by all the tied-best;
  - a group with no strict preference (every present score equal, or a single response)
    gets loss 0 with zero gradient from the pair-wise and list-wise losses;
    has_preference() lets a trainer count and drop such groups.
  - the point-wise losses see each response on its own, so ties do not arise; they expect
    scores already scaled into [0, 1] (the paper divides its 1-10 GPT-4 scores by 10,
    section 4.1.2) and raise ValueError otherwise;
  - Point-MSE is +MSE: the paper prints a minus sign in Eq. 7, which would push p away
    from the score;
  - Point-CE computes log(1 - p) = log(-expm1(logps)) from logps, so it stays finite as
    p -> 1 and as logps -> -inf.

best_mask, pair_mask and has_preference are public so that metrics use the same rule.

All arithmetic runs in float32 (float64 inputs stay float64), also for bf16 inputs.
Depends on torch only. To copy one loss into another code base, take it with the helpers its
docstring's last line names ("Copy with: ..."), and the two imports below.
"""

import torch
import torch.nn.functional as F


def _prepare(logps, scores, mask):
    """Promote to float32, fill padding slots with harmless values. Returns (p, logps, scores, mask)."""
    dtype = torch.promote_types(logps.dtype, torch.float32)
    if mask is None:
        mask = torch.ones(logps.shape, dtype=torch.bool, device=logps.device)
    mask = mask.bool()
    # torch.where (not multiplication) so NaN/inf in padding gives neither NaN values nor NaN gradients
    logps = torch.where(mask, logps.to(dtype), 0.0)
    scores = torch.where(mask, scores.to(dtype), 0.0)
    return logps.exp(), logps, scores, mask


def best_mask(scores, mask=None):
    """(B, K) bool: the present responses tied for their group's top score, i.e. the chosen.

    In a group without a preference every present response is tied for the top; use
    has_preference to tell such groups apart. best_mask(-scores, mask) gives the tied-worst.
    """
    if mask is None:
        mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    mask = mask.bool()
    top = scores.masked_fill(~mask, float("-inf")).amax(dim=1, keepdim=True)  # (B, 1)
    return mask & (scores == top)


def pair_mask(scores, mask=None):
    """(B, K, K) bool: [b, i, j] is True when responses i and j are both present and score_i > score_j."""
    if mask is None:
        mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    mask = mask.bool()
    both = mask[:, :, None] & mask[:, None, :]
    return both & (scores[:, :, None] > scores[:, None, :])  # NaN in padding compares False


def has_preference(scores, mask=None):
    """(B,) bool: True where the group has at least two present responses with different scores."""
    if mask is None:
        mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    mask = mask.bool()
    top = scores.masked_fill(~mask, float("-inf")).amax(dim=1)
    bottom = scores.masked_fill(~mask, float("inf")).amin(dim=1)
    return top > bottom


def _check_unit_scores(scores, mask):
    present = scores[mask]
    if present.numel() and not bool(((present >= 0) & (present <= 1)).all()):
        raise ValueError(
            f"point-wise losses need scores scaled into [0, 1] (the paper divides 1-10 scores by 10); "
            f"got values in [{present.min().item():g}, {present.max().item():g}]"
        )


def point_ce(logps, scores, mask=None):
    """Point-CE, Eq. (6): cross-entropy between the score and p, per response.

        loss = mean over responses of -[score * log(p) + (1 - score) * log(1 - p)]

    log(p) is logps itself; log(1 - p) = log(-expm1(logps)), with logps clamped just below 0
    so that p = 1 gives a large finite loss instead of inf. Scores must lie in [0, 1].

    Copy with: _prepare, _check_unit_scores.
    """
    p, logps, scores, mask = _prepare(logps, scores, mask)
    _check_unit_scores(scores, mask)
    tiny = torch.finfo(logps.dtype).eps
    log1m_p = torch.log(-torch.expm1(logps.clamp(max=-tiny)))
    ce = -(scores * logps + (1 - scores) * log1m_p)
    return torch.where(mask, ce, 0.0).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # mean over present responses


def point_mse(logps, scores, mask=None):
    """Point-MSE, Eq. (7) with the sign corrected: squared error between p and the score.

        loss = mean over responses of (score - p)^2

    The paper prints -E[(score - p)^2]; minimising that would push p away from the score.
    Scores must lie in [0, 1].

    Copy with: _prepare, _check_unit_scores.
    """
    p, logps, scores, mask = _prepare(logps, scores, mask)
    _check_unit_scores(scores, mask)
    se = (scores - p) ** 2
    return torch.where(mask, se, 0.0).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # mean over present responses


def pair_single(logps, scores, mask=None, generator=None):
    """Pair-Single, Eq. (8): Bradley-Terry on p for the chosen and one random worse response.

        loss = -log sigmoid(p_w - p_l)

    y_l is drawn uniformly among the responses scored strictly lower than the top, with
    `generator` (a torch.Generator) for reproducible draws; the paper draws it from "the
    remaining three responses" (section 4.1.2), which with a tie for the top could draw
    the chosen's equal. One draw per group: when several responses tie for the top, each
    is a y_w against that same y_l, and the loss is the mean over them.

    Copy with: _prepare, best_mask.
    """
    p, logps, scores, mask = _prepare(logps, scores, mask)
    best = best_mask(scores, mask)
    negatives = mask & ~best  # strictly below the top
    device = generator.device if generator is not None else p.device
    u = torch.rand(p.shape, generator=generator, device=device).to(p.device)
    worse = torch.where(negatives, u, -1.0).argmax(dim=1, keepdim=True)  # (B, 1): a uniform draw among the negatives
    terms = -F.logsigmoid(p - p.gather(1, worse))  # (B, K): each response as y_w against the drawn y_l
    loss = torch.where(best, terms, 0.0).sum(dim=1) / best.sum(dim=1).clamp(min=1)
    return torch.where(negatives.any(dim=1), loss, 0.0)


def pair_mns(logps, scores, mask=None):
    """Pair-MNS (Multi-N-Separate), Eq. (9): the chosen against each of its N negatives, summed.

        loss = -sum_{i=1..N} log sigmoid(p_w - p_{l_i})

    The negatives are the N responses scored strictly lower than the top (the paper: "all
    the others", section 3.3.2); with several responses tied for the top, each is y_w in
    turn and the loss is the mean over them.

    Copy with: _prepare, best_mask.
    """
    p, logps, scores, mask = _prepare(logps, scores, mask)
    best = best_mask(scores, mask)
    negatives = mask & ~best
    pairs = best[:, :, None] & negatives[:, None, :]  # (B, K, K): [b, w, l] for a tied-best w and a negative l
    terms = -F.logsigmoid(p[:, :, None] - p[:, None, :])  # (B, K, K)
    return torch.where(pairs, terms, 0.0).sum(dim=(1, 2)) / best.sum(dim=1).clamp(min=1)


def pair_mnm(logps, scores, mask=None):
    """Pair-MNM (Multi-N-Merge), Eq. (10), the paper's best: one sigmoid over the merged margin.

        loss = -log sigmoid(N * p_w - sum_{i=1..N} p_{l_i})

    The negatives are the N responses scored strictly lower than the top (the paper: "all
    the others", sections 3.3.2 and 5.3); with several responses tied for the top, each is
    y_w in turn and the loss is the mean over them.

    Copy with: _prepare, best_mask.
    """
    p, logps, scores, mask = _prepare(logps, scores, mask)
    best = best_mask(scores, mask)
    negatives = mask & ~best
    n = negatives.sum(dim=1, keepdim=True)  # (B, 1)
    margin = n * p - torch.where(negatives, p, 0.0).sum(dim=1, keepdim=True)  # (B, K): each response as y_w
    loss = torch.where(best, -F.logsigmoid(margin), 0.0).sum(dim=1) / best.sum(dim=1).clamp(min=1)
    return torch.where(n.squeeze(1) > 0, loss, 0.0)


def pair_mcs(logps, scores, mask=None):
    """Pair-MCS (Multi-Combination-Separate), Eq. (11): every scored pair on its own, summed.

        loss = -sum_{(i, j): score_i > score_j} log sigmoid(p_i - p_j)

    With N + 1 responses of distinct scores there are C(N+1, 2) pairs; equal scores make none.

    Copy with: _prepare, pair_mask.
    """
    p, logps, scores, mask = _prepare(logps, scores, mask)
    pairs = pair_mask(scores, mask)  # (B, K, K)
    terms = -F.logsigmoid(p[:, :, None] - p[:, None, :])  # (B, K, K)
    return torch.where(pairs, terms, 0.0).sum(dim=(1, 2))


def pair_mcm(logps, scores, mask=None):
    """Pair-MCM (Multi-Combination-Merge), Eq. (12): one sigmoid over the summed pair margins.

        loss = -log sigmoid(sum_{(i, j): score_i > score_j} (p_i - p_j))

    Copy with: _prepare, pair_mask.
    """
    p, logps, scores, mask = _prepare(logps, scores, mask)
    pairs = pair_mask(scores, mask)  # (B, K, K)
    margin = torch.where(pairs, p[:, :, None] - p[:, None, :], 0.0).sum(dim=(1, 2))
    return torch.where(pairs.flatten(1).any(dim=1), -F.logsigmoid(margin), 0.0)


def list_mle(logps, scores, mask=None):
    """List-MLE, Eq. (13): Plackett-Luce likelihood of the score ranking, with p as the utility.

        loss = -sum_{i=1..N+1} [p_i - log sum_{j=i..N+1} exp(p_j)]

    with the responses indexed in descending score order. Eq. (13) assumes a strict order;
    here the responses tied on a score form one block, and a block of m responses
    contributes, by Breslow's rule for tied events,

        sum_{j in block} p_j  -  m * log sum_{k at or after the block} exp(p_k)

    which is Eq. (13) when every block has one response. Equivalently, each response i
    contributes p_i - log sum_{k: score_k <= score_i} exp(p_k), which needs no sort. A tied
    block at the bottom (m >= 2) contributes m log m at equal p, not 0, and pulls its p
    together; a group that is one block (no preference) gets loss 0.

    Copy with: _prepare, has_preference.
    """
    p, logps, scores, mask = _prepare(logps, scores, mask)
    # at_or_below[b, i, k]: k is present and ranked at or below i (its block or a later one)
    at_or_below = mask[:, None, :] & (scores[:, None, :] <= scores[:, :, None])  # (B, K, K)
    tails = torch.where(at_or_below, p[:, None, :], float("-inf"))  # (B, K, K)
    # row i of a padding slot may be all -inf; give it a finite dummy so logsumexp has a finite gradient
    tails = torch.where(mask[:, :, None], tails, 0.0)
    terms = p - torch.logsumexp(tails, dim=2)  # (B, K)
    loss = -torch.where(mask, terms, 0.0).sum(dim=1)
    return torch.where(has_preference(scores, mask), loss, 0.0)


LOSSES = {
    "point_ce": point_ce,
    "point_mse": point_mse,
    "pair_single": pair_single,
    "pair_mns": pair_mns,
    "pair_mnm": pair_mnm,
    "pair_mcs": pair_mcs,
    "pair_mcm": pair_mcm,
    "list_mle": list_mle,
}
