"""
The preference-optimisation baselines of the MPPO paper's Table 2, beside the MPPO losses:
SimPO and ORPO (reference-free, like MPPO) and DPO (with a reference model).

Each is a pure function with the interface of mppo.py: it takes

    logps  (B, K) float  mean per-token log-likelihood of each response (what packing.response_logps returns)
    scores (B, K) float  the score of each response (higher is better)
    mask   (B, K) bool   False in padding slots; None means every slot is a real response

and returns one loss per group, shape (B,). The caller averages over the groups that carry a
preference (mppo.has_preference); a group without one gets loss 0 with zero gradient.

All three are pair-wise losses. A group of K > 2 responses is reduced to its best-against-worst
pairs: chosen = a response with the highest score, rejected = a response with the lowest.
This is how SimPO builds its on-policy UltraFeedback pairs (the best and the worst of five
generations by reward-model score), whose setup the MPPO paper follows;
HuggingFaceH4/ultrafeedback_binarized instead draws the rejected at random from the rest.
Pair-MNM (mppo.pair_mnm) differs exactly here: it uses every worse response, not one.

Ties follow mppo.py's rule, that equal scores never express a preference: when several
responses tie for the highest score, or for the lowest, the loss is the mean over every
(tied-best, tied-worst) pair, so it does not depend on the order of the responses. With a
unique best and a unique worst this is the single pair. (For ORPO the mean of its SFT term
over those pairs is the mean NLL of the tied-best responses.)

Depends on torch and on mppo's _prepare, best_mask and has_preference.
"""

import torch
import torch.nn.functional as F

from mppo import _prepare, best_mask, has_preference


def best_worst_mean(pair_loss, scores, mask):
    """Mean of pair_loss (B, K, K), [b, w, l] the loss of w chosen over l rejected, over the pairs
    of a tied-best w and a tied-worst l of each group; 0 for a group without a preference."""
    best = best_mask(scores, mask)
    worst = best_mask(-scores, mask)  # the lowest score is the top of the negated scores
    pairs = best[:, :, None] & worst[:, None, :]  # (B, K, K)
    loss = torch.where(pairs, pair_loss, 0.0).sum(dim=(1, 2)) / pairs.sum(dim=(1, 2)).clamp(min=1)
    return torch.where(has_preference(scores, mask), loss, 0.0)


def simpo(logps, scores, mask=None, beta=2.0, gamma_beta_ratio=0.5):
    """SimPO (Meng, Xia and Chen 2024, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward", Eq. 6): Bradley-Terry on the length-normalised log-likelihood,
    scaled by beta, with a target margin gamma = gamma_beta_ratio * beta.

        loss = -log sigmoid(beta * (logps_w - logps_l) - gamma)

    logps is already the mean over tokens, i.e. (beta / |y|) log pi(y | x) / beta. The defaults
    are SimPO's Llama-3-8B-Base recipe (beta 2.0, gamma / beta 0.5). MPPO's Pair-Single is the
    same pair on p = exp(logps) instead of logps, with no beta and no margin.
    """
    p, logps, scores, mask = _prepare(logps, scores, mask)
    gamma = gamma_beta_ratio * beta
    pair_loss = -F.logsigmoid(beta * (logps[:, :, None] - logps[:, None, :]) - gamma)  # (B, K, K)
    return best_worst_mean(pair_loss, scores, mask)


def orpo(logps, scores, mask=None, lam=0.1):
    """ORPO (Hong, Lee and Thorne 2024, "ORPO: Monolithic Preference Optimization without
    Reference Model", Eq. 6-8): the SFT loss of the chosen plus lam times a log odds-ratio term.

        odds(y)  = P(y|x) / (1 - P(y|x)),   P(y|x) = exp(logps)   (length-normalised, ORPO Eq. 4)
        loss     = -logps_w  -  lam * log sigmoid(log odds(y_w) - log odds(y_l))

    log odds = logps - log(1 - exp(logps)), with log(1 - exp(.)) = log(-expm1(.)) and logps
    clamped just below 0, as in mppo.point_ce. The SFT term is the chosen's mean token NLL.
    lam 0.1 is the paper's value.
    """
    p, logps, scores, mask = _prepare(logps, scores, mask)
    tiny = torch.finfo(logps.dtype).eps
    log_odds = logps - torch.log(-torch.expm1(logps.clamp(max=-tiny)))  # (B, K)
    ratio = -F.logsigmoid(log_odds[:, :, None] - log_odds[:, None, :])  # (B, K, K)
    pair_loss = -logps[:, :, None] + lam * ratio
    return best_worst_mean(pair_loss, scores, mask)


def dpo(logps, scores, mask=None, *, ref_logps, lengths, beta=0.1):
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly
    a Reward Model", Eq. 7): Bradley-Terry on the log-likelihood ratio to a frozen reference.

        r(y)  = beta * (log pi(y|x) - log pi_ref(y|x))      summed over the tokens of y
        loss  = -log sigmoid(r(y_w) - r(y_l))

    ref_logps (B, K): the reference model's mean token log-likelihoods of the same responses,
    computed once before training (train.py does it with the starting model, so no second model
    is held in memory); lengths (B, K): the number of scored tokens of each response, so that
    log pi(y|x) - log pi_ref(y|x) = lengths * (logps - ref_logps). beta 0.1 is the paper's value.
    """
    p, logps, scores, mask = _prepare(logps, scores, mask)
    ref_logps = torch.where(mask, ref_logps.to(logps), 0.0)  # padding may hold NaN
    lengths = torch.where(mask, lengths.to(logps), 0.0)
    reward = beta * lengths * (logps - ref_logps)  # (B, K)
    pair_loss = -F.logsigmoid(reward[:, :, None] - reward[:, None, :])  # (B, K, K)
    return best_worst_mean(pair_loss, scores, mask)


BASELINES = {"simpo": simpo, "orpo": orpo, "dpo": dpo}
