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

Conventions the paper leaves open (or prints with a typo), decided once here:
  - chosen = the response with the highest score, the first one on ties;
  - the negatives of Pair-MNS / Pair-MNM are the responses scored strictly lower than
    the chosen; N in Pair-MNM is the number of such negatives in that group;
  - Pair-MCS / Pair-MCM use every ordered pair (i, j) with score_i > score_j, so equal
    scores make no pair (the paper: "compare them based on their scores");
  - List-MLE orders the responses by score, descending, with a stable sort (ties keep
    their input order), and evaluates its log-sum-exp terms stably;
  - the point-wise losses expect scores already scaled into [0, 1] (the paper divides
    its 1-10 GPT-4 scores by 10) and raise ValueError otherwise;
  - Point-MSE is +MSE: the paper prints a minus sign in Eq. 7, which would push p away
    from the score;
  - Point-CE computes log(1 - p) = log(-expm1(logps)) from logps, so it stays finite as
    p -> 1 and as logps -> -inf;
  - Pair-Single pairs the chosen with one strictly worse response drawn uniformly at
    random, from an optional torch.Generator so runs are reproducible;
  - a group with no strict preference (every present score equal, or a single response)
    gets loss 0 with zero gradient from the pair-wise and list-wise losses;
    has_preference() lets a trainer count and drop such groups.

All arithmetic runs in float32 (float64 inputs stay float64), also for bf16 inputs.
Depends on torch only: copy any single function together with _prepare.
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


def _chosen(scores, mask):
    """Index of the best response of each group (first on ties), and the mask of its strict negatives."""
    best = scores.masked_fill(~mask, float("-inf")).argmax(dim=1)  # argmax returns the first maximum
    best_score = scores.gather(1, best[:, None])  # (B, 1)
    negatives = mask & (scores < best_score)  # (B, K)
    return best, negatives


def _pairs(scores, mask):
    """(B, K, K) bool: pair (i, j) exists when both are present and score_i > score_j."""
    both = mask[:, :, None] & mask[:, None, :]
    return both & (scores[:, :, None] > scores[:, None, :])


def has_preference(scores, mask=None):
    """(B,) bool: True where the group has at least two present responses with different scores."""
    if mask is None:
        mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    mask = mask.bool()
    return _pairs(torch.where(mask, scores, 0.0), mask).flatten(1).any(dim=1)


def _check_unit_scores(scores, mask):
    present = scores[mask]
    if present.numel() and not bool(((present >= 0) & (present <= 1)).all()):
        raise ValueError(
            f"point-wise losses need scores scaled into [0, 1] (the paper divides 1-10 scores by 10); "
            f"got values in [{present.min().item():g}, {present.max().item():g}]"
        )


def _group_mean(values, mask):
    """Mean of values over each group's present responses; 0 for a group with none."""
    count = mask.sum(dim=1).clamp(min=1)
    return torch.where(mask, values, 0.0).sum(dim=1) / count


def point_ce(logps, scores, mask=None):
    """Point-CE, Eq. (6): cross-entropy between the score and p, per response.

        loss = mean over responses of -[score * log(p) + (1 - score) * log(1 - p)]

    log(p) is logps itself; log(1 - p) = log(-expm1(logps)), with logps clamped just below 0
    so that p = 1 gives a large finite loss instead of inf. Scores must lie in [0, 1].
    """
    p, logps, scores, mask = _prepare(logps, scores, mask)
    _check_unit_scores(scores, mask)
    tiny = torch.finfo(logps.dtype).eps
    log1m_p = torch.log(-torch.expm1(logps.clamp(max=-tiny)))
    ce = -(scores * logps + (1 - scores) * log1m_p)
    return _group_mean(ce, mask)


def point_mse(logps, scores, mask=None):
    """Point-MSE, Eq. (7) with the sign corrected: squared error between p and the score.

        loss = mean over responses of (score - p)^2

    The paper prints -E[(score - p)^2]; minimising that would push p away from the score.
    Scores must lie in [0, 1].
    """
    p, logps, scores, mask = _prepare(logps, scores, mask)
    _check_unit_scores(scores, mask)
    return _group_mean((scores - p) ** 2, mask)


def pair_single(logps, scores, mask=None, generator=None):
    """Pair-Single, Eq. (8): Bradley-Terry on p for the chosen and one random worse response.

        loss = -log sigmoid(p_w - p_l)

    y_w is the best-scored response; y_l is drawn uniformly among the responses scored
    strictly lower, with `generator` (a torch.Generator) for reproducible draws.
    """
    p, logps, scores, mask = _prepare(logps, scores, mask)
    best, negatives = _chosen(scores, mask)
    device = generator.device if generator is not None else p.device
    u = torch.rand(p.shape, generator=generator, device=device).to(p.device)
    worse = torch.where(negatives, u, -1.0).argmax(dim=1)  # a uniform draw among the negatives
    p_w = p.gather(1, best[:, None]).squeeze(1)
    p_l = p.gather(1, worse[:, None]).squeeze(1)
    loss = -F.logsigmoid(p_w - p_l)
    return torch.where(negatives.any(dim=1), loss, 0.0)


def pair_mns(logps, scores, mask=None):
    """Pair-MNS (Multi-N-Separate), Eq. (9): the chosen against each of its N negatives, summed.

        loss = -sum_{i=1..N} log sigmoid(p_w - p_{l_i})
    """
    p, logps, scores, mask = _prepare(logps, scores, mask)
    best, negatives = _chosen(scores, mask)
    p_w = p.gather(1, best[:, None])  # (B, 1)
    terms = -F.logsigmoid(p_w - p)  # (B, K)
    return torch.where(negatives, terms, 0.0).sum(dim=1)


def pair_mnm(logps, scores, mask=None):
    """Pair-MNM (Multi-N-Merge), Eq. (10), the paper's best: one sigmoid over the merged margin.

        loss = -log sigmoid(N * p_w - sum_{i=1..N} p_{l_i})
    """
    p, logps, scores, mask = _prepare(logps, scores, mask)
    best, negatives = _chosen(scores, mask)
    n = negatives.sum(dim=1)  # (B,)
    p_w = p.gather(1, best[:, None]).squeeze(1)
    margin = n * p_w - torch.where(negatives, p, 0.0).sum(dim=1)
    return torch.where(n > 0, -F.logsigmoid(margin), 0.0)


def pair_mcs(logps, scores, mask=None):
    """Pair-MCS (Multi-Combination-Separate), Eq. (11): every scored pair on its own, summed.

        loss = -sum_{(i, j): score_i > score_j} log sigmoid(p_i - p_j)

    With N + 1 responses of distinct scores there are C(N+1, 2) pairs.
    """
    p, logps, scores, mask = _prepare(logps, scores, mask)
    pairs = _pairs(scores, mask)  # (B, K, K)
    terms = -F.logsigmoid(p[:, :, None] - p[:, None, :])  # (B, K, K)
    return torch.where(pairs, terms, 0.0).sum(dim=(1, 2))


def pair_mcm(logps, scores, mask=None):
    """Pair-MCM (Multi-Combination-Merge), Eq. (12): one sigmoid over the summed pair margins.

        loss = -log sigmoid(sum_{(i, j): score_i > score_j} (p_i - p_j))
    """
    p, logps, scores, mask = _prepare(logps, scores, mask)
    pairs = _pairs(scores, mask)
    margin = torch.where(pairs, p[:, :, None] - p[:, None, :], 0.0).sum(dim=(1, 2))
    return torch.where(pairs.flatten(1).any(dim=1), -F.logsigmoid(margin), 0.0)


def list_mle(logps, scores, mask=None):
    """List-MLE, Eq. (13): Plackett-Luce likelihood of the score ranking, with p as the utility.

        loss = -sum_{i=1..N+1} [p_i - log sum_{j=i..N+1} exp(p_j)]

    Responses are indexed in descending score order (stable sort: ties keep input order).
    """
    p, logps, scores, mask = _prepare(logps, scores, mask)
    keys = scores.masked_fill(~mask, float("-inf"))  # padding sorts last
    order = keys.argsort(dim=1, descending=True, stable=True)
    p_sorted = p.gather(1, order)  # (B, K)
    m_sorted = mask.gather(1, order)
    K = p.shape[1]
    # later[i, j]: j is at or after position i in the ranking, and present
    later = torch.ones(K, K, dtype=torch.bool, device=p.device).triu()[None] & m_sorted[:, None, :]
    tails = p_sorted[:, None, :].expand(-1, K, -1).masked_fill(~later, float("-inf"))  # (B, K, K)
    # row i of a padding slot is all -inf; give it a finite dummy so logsumexp has a finite gradient
    tails = torch.where(m_sorted[:, :, None], tails, 0.0)
    terms = p_sorted - torch.logsumexp(tails, dim=2)  # (B, K)
    loss = -torch.where(m_sorted, terms, 0.0).sum(dim=1)
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
