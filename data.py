"""
Preference data for MPPO: tokenize grouped preference JSON with a checkpoint's chat template,
cut it to the length budget, scale scores for the point-wise losses, and batch it
deterministically across DDP ranks.

Groups are read by formats.py (every format people already have: canonical JSONL, SimPO, raw
UltraFeedback, pairwise, Nectar, HelpSteer2-style single rows, RRHF) and rendered by chat.py's
ChatTokenizer. Print the statistics of a data set before training with

    python data.py --model path/to/checkpoint --data train.jsonl --max_length 2048 --max_prompt_length 1800

Uses tokenizers, numpy and the standard library: no torch, no transformers.
"""

import sys
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from chat import TEMPLATES, ChatTokenizer
from cli import ArgumentParser
from formats import PARSERS, PROMPT_FILLS, DataError, Report, read_groups, unusable

# -----------------------------------------------------------------------------
# Tokenizing and truncating


@dataclass
class TokenizedGroup:
    prompt_ids: list[int]  # the rendered prompt, generation prompt included; one BOS first where the format has one
    response_ids: list[list[int]]  # each response as scored: content + end-of-turn token (cut to max_length)
    scores: list[float]  # one per response, higher is better
    line: int | str  # where the group came from in its data file (see Group.line)
    # DPO: each response's mean log-prob under the starting model (train.py fills it)
    ref_logps: list[float] | None = None


def _truncate(prompt, responses, max_length, max_prompt_length, bos_id):
    """Cut one group to the budget. An over-long prompt keeps its end (the question being asked,
    and the generation prompt) behind its BOS; each response is cut so that prompt + response fits
    max_length. Returns (prompt, responses, prompt_cut, n_responses_cut), or None when the prompt
    leaves no room for a response."""
    prompt_cut = max_prompt_length is not None and len(prompt) > max_prompt_length
    if prompt_cut:
        head = prompt[:1] if bos_id is not None and prompt[:1] == [bos_id] else []
        prompt = head + prompt[len(prompt) - (max_prompt_length - len(head)):]
    if max_length is None:
        return prompt, responses, prompt_cut, 0
    room = max_length - len(prompt)
    if room <= 0:
        return None
    return prompt, [r[:room] for r in responses], prompt_cut, sum(len(r) > room for r in responses)


def _char_bound(tok, tokens):
    """Characters enough for more than `tokens` tokens of any text: no token spans more than
    tok.max_token_chars characters, so the first `tokens` tokens lie within tokens x max_token_chars
    characters, and twice that leaves room for the word that straddles the bound (which a cut could
    tokenize differently) and for normalizers that merge characters (NFC). A text this long still
    tokenizes to more than `tokens` tokens, so cutting it changes neither the kept tokens nor the counts."""
    return 2 * tokens * tok.max_token_chars


def _cut_prompt(text, bound, bos):
    head = bos if bos and text.startswith(bos) else ""
    return head + text[len(text) - bound:]  # the end, behind its BOS, as _truncate keeps


def tokenize_groups(groups, tok, max_length, max_prompt_length,
                    min_responses=2, include_header=False,
                    require_preference=True, progress=None):
    """Tokenize groups and cut them to max_length tokens per prompt + response, prompts to
    max_prompt_length (None: no limit of their own, so a prompt that fills max_length skips its
    group). With include_header=True the assistant header moves from the prompt to every response.
    Groups a caller built by hand are checked for the same skips as read_groups applies.

    A text far longer than its budget (a 50 MB line) is first cut to a character bound (_char_bound:
    prompts keep their end, responses their beginning), so tokenizing it costs memory in proportion to
    the budget, not to the text; the tokens kept are the same as without the cut.
    progress(done, total), if given, is called after each chunk of texts is encoded."""
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be positive, got {max_prompt_length}")
    report = Report(source=f"tokenized to max_length {max_length}, max_prompt_length {max_prompt_length}")
    prompt_bound = None if max_length is None and max_prompt_length is None else _char_bound(tok, min(
        n for n in (max_length, max_prompt_length) if n is not None))
    response_bound = None if max_length is None else _char_bound(tok, max_length)
    prompts, responses = [], []
    for g in groups:
        try:
            p = tok.render_prompt(g.prompt, add_generation_prompt=not include_header)
            rs = [tok.render_response(r, include_header, g.prompt) for r in g.responses]
        except ValueError as e:
            raise DataError(f"group from line {g.line}: {e}") from None
        if prompt_bound is not None and len(p) > prompt_bound:
            p = _cut_prompt(p, prompt_bound, tok.bos_token)
            report.cut_texts += 1
        if response_bound is not None:
            report.cut_texts += sum(len(r) > response_bound for r in rs)
            rs = [r[:response_bound] for r in rs]
        prompts.append(p)
        responses += rs
    texts, chunk = prompts + responses, 8192
    ids = []
    for start in range(0, len(texts), chunk):
        ids += tok.encode_many(texts[start:start + chunk])
        if progress is not None:
            progress(len(ids), len(texts))
    prompt_ids, response_ids = ids[:len(prompts)], ids[len(prompts):]
    out, i = [], 0
    for g, p in zip(groups, prompt_ids):
        rs, i = response_ids[i:i + len(g.responses)], i + len(g.responses)
        report.rows += 1
        reason = unusable(g.responses, g.scores, min_responses, require_preference)
        cut = None if reason else _truncate(p, rs, max_length, max_prompt_length, tok.bos_id)
        if cut is None:
            report.skip(reason or PROMPT_FILLS, g.line)
            continue
        p, rs, prompt_cut, n_cut = cut
        report.truncated_prompts += prompt_cut
        report.truncated_responses += n_cut
        out.append(TokenizedGroup(p, rs, list(g.scores), g.line))
    report.kept = len(out)
    return out, report


# -----------------------------------------------------------------------------
# Scores for the point-wise losses


def scale_scores(groups, score_range=None):
    """Map scores into [0, 1], where Point-CE and Point-MSE (Eq. 6-7) need them, and say how.

    The rule is chosen once from every score of the data set, so a group's scaling never depends
    on which scores it happens to hold:
      score_range=(lo, hi) given: (s - lo) / (hi - lo); a score outside [lo, hi] is an error.
      every score in [0, 1]: unchanged.
      every score in [0, 10]: s / 10, as the paper does with UltraFeedback's 1-10 ratings.
      otherwise (reward-model logits, say): an error asking for score_range, since the ends of an
      open scale cannot be read off the data without making every data set's best answer a 1.
    Works on Group and TokenizedGroup alike; returns new groups."""
    flat = [s for g in groups for s in g.scores]
    if not flat:
        return list(groups)
    lo_seen, hi_seen = min(flat), max(flat)
    if score_range is not None:
        lo, hi = score_range
        if not hi > lo:
            raise ValueError(f"score_range {score_range}: the upper end must exceed the lower")
        if lo_seen < lo or hi_seen > hi:
            raise ValueError(f"scores span [{lo_seen:g}, {hi_seen:g}], outside score_range [{lo:g}, {hi:g}]")
    elif 0 <= lo_seen and hi_seen <= 1:
        return list(groups)
    elif 0 <= lo_seen and hi_seen <= 10:
        lo, hi = 0.0, 10.0
    else:
        raise ValueError(f"scores span [{lo_seen:g}, {hi_seen:g}]: the point-wise losses need scores in [0, 1]; "
                         "give the scale's range (score_range=(lo, hi)) to map it linearly")
    return [replace(g, scores=[(s - lo) / (hi - lo) for s in g.scores]) for g in groups]


# -----------------------------------------------------------------------------
# Batching


class GroupLoader:
    """Deterministic batches of groups for one DDP rank, with an exactly resumable position.

    Every optimizer step takes `batch_size` groups (the global batch): rank r gets the r-th slice
    of batch_size // world_size of them, so the ranks see disjoint groups and together the whole
    batch. Each epoch visits the groups in a permutation drawn from (seed, epoch), the same on every
    rank; the last len(groups) % batch_size groups of an epoch's order are dropped, so every step
    is full. Iterating yields the remaining steps of the current epoch and then moves to the next
    epoch (the caller loops over epochs); state_dict() after a yielded batch points at the step
    after it, so a resumed run sees exactly the batches it has not seen yet."""

    def __init__(self, groups, batch_size, rank=0, world_size=1, seed=0, shuffle=True):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if len(groups) < batch_size:
            raise ValueError(f"{len(groups)} groups are fewer than one batch of {batch_size}")
        self.groups, self.batch_size, self.rank, self.world_size = groups, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.step = 0, 0  # the next step to produce

    @property
    def steps_per_epoch(self):
        return len(self.groups) // self.batch_size

    def order(self, epoch):
        if not self.shuffle:
            return np.arange(len(self.groups))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.groups))

    def __iter__(self):
        order, per_rank = self.order(self.epoch), self.batch_size // self.world_size
        while self.step < self.steps_per_epoch:
            start = self.step * self.batch_size + self.rank * per_rank
            self.step += 1  # before the yield: a checkpoint taken with this batch in hand must not replay it
            yield [self.groups[i] for i in order[start:start + per_rank]]
        self.epoch, self.step = self.epoch + 1, 0

    def state_dict(self):
        return {"epoch": self.epoch, "step": self.step, "num_groups": len(self.groups), "batch_size": self.batch_size,
                "seed": self.seed}

    def load_state_dict(self, state):
        for key in ("num_groups", "batch_size", "seed"):  # the order, and so the resume, depends on them
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ValueError(f"loader state has {key}={state[key]}, but this loader has {mine}: "
                                 "the epoch order would differ")
        if not 0 <= state["step"] <= self.steps_per_epoch:
            raise ValueError(f"loader state step {state['step']} outside 0..{self.steps_per_epoch}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def group_tokens(g):
    """Tokens of a group laid out with its prompt once: prompt + every response."""
    return len(g.prompt_ids) + sum(map(len, g.response_ids))


def micro_batches(groups, micro_batch_size, max_tokens=None):
    """Split one rank's step into consecutive micro-batches of at most micro_batch_size groups and,
    if max_tokens is given, at most max_tokens tokens (prompt + all responses). A group over
    max_tokens by itself gets a micro-batch of its own."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
    out, cur, cur_tokens = [], [], 0
    for g in groups:
        n = group_tokens(g)
        if cur and (len(cur) == micro_batch_size or (max_tokens is not None and cur_tokens + n > max_tokens)):
            out.append(cur)
            cur, cur_tokens = [], 0
        cur.append(g)
        cur_tokens += n
    if cur:
        out.append(cur)
    return out


# -----------------------------------------------------------------------------
# python data.py --model DIR --data FILE: statistics to choose lengths by


def main(argv=None):
    parser = ArgumentParser(prog="data.py",
                            description="Print the statistics of a preference data set under a checkpoint's tokenizer.")
    a = parser.add_argument
    a("--model", required=True, help="checkpoint directory with tokenizer.json (and tokenizer_config.json)")
    a("--data", required=True, nargs="+",
      help="data: files (.jsonl, .json, .parquet, .jsonl.gz, .json.gz), folders or globs, read as one set")
    a("--format", choices=list(PARSERS), default=None,
      help="data format (default: detected from each file's first row)")
    a("--score_field", default=None, help="the score of rows of one response each (format 'single'), e.g. helpfulness")
    a("--template", choices=TEMPLATES, default=None, help="chat format (default: detected from the chat template)")
    a("--date_string", default=None,
      help="the 'Today Date' of Llama 3.1-3.3 templates (default: as the template sets it)")
    a("--max_length", type=int, default=2048, help="token budget of prompt + one response")
    a("--max_prompt_length", type=int, default=1800, help="prompts longer than this keep their end")
    a("--min_responses", type=int, default=2, help="groups with fewer responses are skipped (1 for SFT)")
    a("--keep_ties", action="store_true",
      help="keep groups whose scores are all equal (the point-wise losses can use them)")
    a("--include_header", action="store_true", help="score the assistant header as part of each response")
    args = parser.parse_args(argv)
    data = args.data[0] if len(args.data) == 1 else args.data
    try:
        tok = ChatTokenizer.from_pretrained(args.model, args.template, args.date_string)
        groups, report = read_groups(data, args.format, args.min_responses, not args.keep_ties, args.score_field)
        full, _ = tokenize_groups(groups, tok, None, None, args.min_responses, args.include_header, not args.keep_ties)
    except (OSError, ValueError) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    cut = Report(source=f"truncation to max_length {args.max_length}, max_prompt_length {args.max_prompt_length}")
    for g in full:
        cut.rows += 1
        r = _truncate(g.prompt_ids, g.response_ids, args.max_length, args.max_prompt_length, tok.bos_id)
        if r is None:
            cut.skip(PROMPT_FILLS, g.line)
            continue
        cut.kept += 1
        cut.truncated_prompts += r[2]
        cut.truncated_responses += r[3]

    def pct(xs):
        q = np.percentile(xs, [50, 90, 95, 99]) if xs else [0] * 4
        return "p50 {:.0f}  p90 {:.0f}  p95 {:.0f}  p99 {:.0f}  max {}".format(*q, max(xs, default=0))

    k = Counter(len(g.response_ids) for g in full)
    print(f"tokenizer: template {tok.template}, bos {tok.bos_id}, eos {tok.eos_id}, stop ids {sorted(tok.stop_ids)}, "
          f"vocab {tok.vocab_size}")
    print(report.summary())
    print(f"groups: {len(full)}, responses: {sum(len(g.response_ids) for g in full)}")
    print("responses per group: " + ", ".join(f"{n}: {k[n]}" for n in sorted(k)))
    print(f"{'prompt tokens:':28}" + pct([len(g.prompt_ids) for g in full]))
    print(f"{'response tokens:':28}" + pct([len(r) for g in full for r in g.response_ids]))
    print(f"{'prompt + longest response:':28}" + pct([len(g.prompt_ids) + max(map(len, g.response_ids)) for g in full]))
    print(f"{'prompt + all responses:':28}" + pct([group_tokens(g) for g in full]))
    nothing_cut = not (cut.skipped or cut.truncated_prompts or cut.truncated_responses)
    print(f"{cut.source}: nothing cut" if nothing_cut else cut.summary())


if __name__ == "__main__":
    main()
