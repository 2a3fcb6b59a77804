"""
What train.py logs and eval.py reports about the reward p = exp(mean token log-prob) of each
response, and the evaluation pass that computes them on held-out groups.

Per group, the chosen responses are those tied for the best score and the rejected those scored
strictly lower (groups with no preference are not counted):

    p_chosen, p_rejected        mean p of the chosen / of the rejected responses
    margin                      p_chosen - p_rejected
    logps_chosen, logps_rejected  mean log p (the mean token log-prob) of the chosen / rejected:
                                TRL's logps/chosen and logps/rejected (mean p is not exp of this)
    reward_margin               mean over groups of (mean log p of its chosen - mean log p of its
                                rejected): TRL's rewards/margins for a reward of log p (beta = 1)
    pair_acc                    share of pairs (i, j) with score_i > score_j that have p_i > p_j
    top1_acc                    share of groups whose highest p is a chosen response

Metrics are ratios of sums over groups (SUMS), so they add up exactly over micro-batches and ranks.
"""

import json
import os
import time

import torch

from generate import generate
from mppo import best_mask, pair_mask
from packing import score_groups
from parallel import all_reduce_sum, rank_and_world

# names of the sums that ranking_sums returns, in order; metrics are ratios of these
SUMS = [
    "groups",
    "p_chosen",
    "p_rejected",
    "rejected",
    "pairs_correct",
    "pairs",
    "top1",
    "logps_chosen",
    "logps_rejected",
    "reward_margin",
]


def ranking_sums(logps, scores, mask):
    """Sums over the groups of a batch, in the order of SUMS, for ranking_metrics."""
    logps, scores = logps.detach().float(), scores.float()
    pairs = pair_mask(scores, mask)  # (B, K, K)
    pref = pairs.flatten(1).any(dim=1)  # (B,) groups with a preference
    best = best_mask(scores, mask)  # (B, K)
    chosen = best & pref[:, None]
    rejected = mask & ~best & pref[:, None]
    logps = torch.where(mask, logps, 0.0)
    p = torch.where(mask, logps.exp(), 0.0)
    n_chosen, n_rejected = chosen.sum(dim=1).clamp(min=1), rejected.sum(dim=1).clamp(min=1)  # (B,)
    group_mean = lambda x, m, n: (x * m).sum(dim=1) / n  # noqa: E731  (B,) mean over the marked responses
    correct = pairs & (p[:, :, None] > p[:, None, :])
    top1 = chosen.gather(1, p.masked_fill(~mask, -1.0).argmax(dim=1, keepdim=True)).squeeze(1)  # highest p is a chosen
    margins = group_mean(logps, chosen, n_chosen) - group_mean(logps, rejected, n_rejected)
    return [
        pref.sum().item(),
        group_mean(p, chosen, n_chosen).sum().item(),
        (p * rejected).sum().item(),
        rejected.sum().item(),
        correct.sum().item(),
        pairs.sum().item(),
        (top1 & pref).sum().item(),
        group_mean(logps, chosen, n_chosen).sum().item(),
        (logps * rejected).sum().item(),
        (margins * pref).sum().item(),
    ]


def ranking_metrics(sums):
    s = dict(zip(SUMS, sums))
    if s["groups"] == 0:  # e.g. SFT on single demonstrations: nothing to rank
        return {}
    groups, rejected = s["groups"], max(s["rejected"], 1)
    return {
        "p_chosen": s["p_chosen"] / groups,
        "p_rejected": s["p_rejected"] / rejected,
        "margin": s["p_chosen"] / groups - s["p_rejected"] / rejected,
        "logps_chosen": s["logps_chosen"] / groups,
        "logps_rejected": s["logps_rejected"] / rejected,
        "reward_margin": s["reward_margin"] / groups,
        "pair_acc": s["pairs_correct"] / max(s["pairs"], 1),
        "top1_acc": s["top1"] / groups,
    }


class StepStats:
    """What train.py adds up between two log lines: the loss, tokens and ranking sums of each micro-batch and
    the groups of each step; summary() sums them over ranks into the numbers of one record."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.loss, self.tokens, self.sums = 0.0, 0.0, [0.0] * len(SUMS)
        self.groups, self.skipped, self.steps, self.grad_norm = 0.0, 0.0, 0, None
        self.start = time.time()

    def add_micro_batch(self, loss, tokens, logps, scores, mask):
        """loss: the micro-batch's share of the step's loss on this rank."""
        self.loss += loss
        self.tokens += tokens
        self.sums = [a + b for a, b in zip(self.sums, ranking_sums(logps, scores, mask))]

    def add_step(self, groups, skipped, grad_norm):
        """groups, skipped: the step's groups over all ranks, and those without a preference."""
        self.groups += groups
        self.skipped += skipped
        self.steps += 1
        self.grad_norm = grad_norm

    def summary(self, device):
        """The record's numbers since the last reset: mean loss per step, the last gradient norm, the ranking
        metrics, groups skipped, throughput. Every rank calls it (an all-reduce)."""
        loss, tokens, *sums = all_reduce_sum([self.loss, self.tokens, *self.sums], device)
        seconds = time.time() - self.start
        return {
            "loss": loss / self.steps,
            "grad_norm": self.grad_norm,
            **ranking_metrics(sums),
            "no_pref_groups": int(self.skipped),
            "groups_per_s": self.groups / seconds,
            "tokens_per_s": tokens / seconds,
        }


@torch.no_grad()
def evaluate(model, groups, loss_fn, scoring, parallel):
    """Mean loss and ranking metrics on held-out groups; each rank scores its share.
    loss_fn(logps, batch) -> (losses (B,), counted (B,) bool), as in training; scoring (packing.Scoring):
    the micro-batching and forward settings; parallel: the Replicated or Sharded the model runs under (its
    autocast, device and even)."""
    was_training = model.training
    model.eval()
    rank, world = rank_and_world()
    loss_sum, count, sums = 0.0, 0.0, [0.0] * len(SUMS)
    even = lambda mbs: parallel.even(mbs, filler=groups[:1])  # noqa: E731  repeats keep FSDP's forwards in step
    for batch, logps in score_groups(model, groups[rank::world], scoring, parallel.autocast, even):  # (B, K)
        losses, counted = loss_fn(logps, batch)
        loss_sum += (losses * counted).sum().item()
        count += counted.sum().item()
        sums = [a + b for a, b in zip(sums, ranking_sums(logps, batch.scores, batch.mask))]
    loss_sum, count, *sums = all_reduce_sum([loss_sum, count, *sums], parallel.device)
    model.train(was_training)
    return {"loss": loss_sum / max(count, 1), **ranking_metrics(sums)}


@torch.no_grad()
def generation_success(model, tok, groups, n, max_new_tokens=32):
    """Share of the first n prompts whose greedy reply equals a best-scored response."""
    hits = 0
    for g in groups[:n]:
        top = max(g.scores)
        best = {tok.decode(r).strip() for r, s in zip(g.response_ids, g.scores) if s == top}
        reply = generate(model, g.prompt_ids, max_new_tokens, temperature=0.0, stop_ids=tok.stop_ids)
        hits += tok.decode(reply).strip() in best
    return hits / max(min(n, len(groups)), 1)


def kendall_tau_b(x, y, mask=None):
    """(B,) Kendall's tau-b between x (B, K) and y (B, K) over each row's present entries:

        tau_b = (concordant - discordant) / sqrt((n0 - ties_x) * (n0 - ties_y))

    over the n0 = n (n - 1) / 2 pairs of a row of n entries; a pair tied in x or in y counts as
    neither concordant nor discordant. NaN where undefined (all x or all y of a row equal)."""
    if mask is None:
        mask = torch.ones(x.shape, dtype=torch.bool, device=x.device)
    K = x.shape[1]
    upper = torch.ones(K, K, dtype=torch.bool, device=x.device).triu(diagonal=1)  # each pair once
    pairs = mask[:, :, None] & mask[:, None, :] & upper  # (B, K, K)
    dx = torch.sign(x[:, :, None] - x[:, None, :]).masked_fill(~pairs, 0)  # (B, K, K)
    dy = torch.sign(y[:, :, None] - y[:, None, :]).masked_fill(~pairs, 0)
    numer = (dx * dy).sum(dim=(1, 2)).double()
    untied_x, untied_y = (dx != 0).sum(dim=(1, 2)).double(), (dy != 0).sum(dim=(1, 2)).double()
    return numer / (untied_x * untied_y).sqrt()  # 0 / 0 = NaN where undefined


# -----------------------------------------------------------------------------
# where the records go: OUT/metrics.jsonl, the console, and optionally TensorBoard or W&B

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report_to value: its pip package


def hms(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLog:
    """Appends each record to OUT/metrics.jsonl, prints a compact line, and sends the numbers to
    the tracker asked for (imported only then)."""

    CONSOLE = (
        "loss",
        "grad_norm",
        "lr",
        "logps_chosen",
        "logps_rejected",
        "reward_margin",
        "pair_acc",
        "top1_acc",
        "gen_success",
        "groups_per_s",
        "peak_mem_gb",
    )

    def __init__(self, out, total_steps, report_to="none", config=None):
        self.file = open(os.path.join(out, "metrics.jsonl"), "a")
        self.total_steps = total_steps
        self.tracker = None
        if report_to == "tensorboard":
            self.tracker = self.check_tracker(report_to)(log_dir=os.path.join(out, "tensorboard"))
        elif report_to == "wandb":
            wandb = self.check_tracker(report_to)
            name = os.path.basename(os.path.normpath(out))
            self.tracker = wandb.init(project="mppo", dir=out, config=config, name=name)

    @staticmethod
    def check_tracker(name):
        """The tracker's entry point, or a one-line error naming the package to install."""
        try:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                return SummaryWriter
            import wandb

            return wandb
        except ImportError:
            package = TRACKERS[name]
            raise SystemExit(f"error: --report_to {name} needs the {package} package: pip install {package}") from None

    def write(self, record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        split, step = record["split"], record["step"]
        parts = [f"{split} step {step}/{self.total_steps}"]
        parts += [f"{k} {record[k]:.4g}" for k in self.CONSOLE if k in record]
        if "elapsed_s" in record:
            parts += [f"elapsed {hms(record['elapsed_s'])}", f"eta {hms(record['eta_s'])}"]
        print(" | ".join(parts), flush=True)
        numbers = {f"{split}/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tracker is None:
            return
        if hasattr(self.tracker, "add_scalar"):  # TensorBoard
            for k, v in numbers.items():
                self.tracker.add_scalar(k, v, step)
            self.tracker.flush()
        else:  # a wandb run
            self.tracker.log(numbers, step=step)

    def close(self):
        self.file.close()
        if self.tracker is not None:
            (self.tracker.close if hasattr(self.tracker, "add_scalar") else self.tracker.finish)()
