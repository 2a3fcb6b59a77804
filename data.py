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

import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass, replace
from itertools import chain

import numpy as np

from chat import TEMPLATES, ChatTokenizer
from cli import ArgumentParser
from formats import PARSERS, PROMPT_FILLS, DataError, Report, data_files, read_groups, unusable

# -----------------------------------------------------------------------------
# Tokenizing and truncating


@dataclass
class TokenizedGroup:
    prompt_ids: list[int]  # the rendered prompt, generation prompt included; one BOS first where the format has one
    response_ids: list[list[int]]  # each response as scored: content + end-of-turn token (cut to max_length)
    scores: list[float]  # one per response, higher is better
    line: int | str  # where the group came from in its data file (see formats.Group.line)
    # DPO: each response's mean log-prob under the starting model (train.py fills it)
    ref_logps: list[float] | None = None


class TokenizedSet:
    """A tokenized data set held as flat numpy arrays instead of lists of Python ints (4 bytes a token
    where a list of ints takes about 37). Every sequence lies end to end in `tokens`, group after
    group, each group's prompt first and then its responses:

        tokens         (N,) int32    the ids of every sequence
        seq_offsets    (S + 1,) int64  sequence s is tokens[seq_offsets[s]:seq_offsets[s + 1]]
        group_offsets  (G + 1,) int64  group i is sequences group_offsets[i] (its prompt) up to group_offsets[i + 1]
        scores         (S,) float64   each response's score; NaN in a prompt's slot
        lines          G labels       where each group came from (formats.Group.line)

    The arrays may be memory-mapped from the cache (see load_tokenized), so the ranks of one node share
    one copy. Indexing gives a GroupView, which reads like a TokenizedGroup; the views are made once
    and kept, so DPO's reference log-probs can be stored on them."""

    def __init__(self, tokens, seq_offsets, group_offsets, scores, lines, score_span=None):
        self.tokens, self.seq_offsets, self.group_offsets = tokens, seq_offsets, group_offsets
        self.scores, self.lines = scores, list(lines)
        self.score_span = score_span  # (lowest, highest) score of the groups read, skipped ones included
        self.groups = [GroupView(self, i) for i in range(len(self.lines))]

    def __len__(self):
        return len(self.groups)

    def __getitem__(self, i):
        return self.groups[i]

    def __iter__(self):
        return iter(self.groups)

    def nbytes(self):
        return self.tokens.nbytes + self.seq_offsets.nbytes + self.group_offsets.nbytes + self.scores.nbytes

    def arrays(self):
        return {
            "tokens": self.tokens,
            "seq_offsets": self.seq_offsets,
            "group_offsets": self.group_offsets,
            "scores": self.scores,
        }

    @classmethod
    def from_parts(cls, parts, score_span=None):
        """One set from consecutive pieces, each (tokens, sequence lengths, sequences per group, scores, lines)."""
        parts = list(parts) or [_empty_part()]

        def cat(i, dtype):
            arrays = [p[i] for p in parts]
            if len(arrays) == 1:  # the common case: no copy
                return np.asarray(arrays[0], dtype=dtype)
            return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)

        tokens = cat(0, np.int32)
        seq_offsets = np.concatenate([[0], np.cumsum(cat(1, np.int64))]).astype(np.int64)
        group_offsets = np.concatenate([[0], np.cumsum(cat(2, np.int64))]).astype(np.int64)
        return cls(tokens, seq_offsets, group_offsets, cat(3, np.float64), [x for p in parts for x in p[4]], score_span)

    def parts(self):
        """This set as one piece of from_parts (what a rank sends when ranks share the tokenizing)."""
        return (self.tokens, np.diff(self.seq_offsets), np.diff(self.group_offsets), self.scores, self.lines)

    def rescale(self, lo, hi):
        """Scores mapped by (s - lo) / (hi - lo) (see score_rule)."""
        self.scores = (self.scores - lo) / (hi - lo)


class GroupView:
    """Group i of a TokenizedSet, read like a TokenizedGroup: prompt_ids, response_ids and scores are
    lists made from the arrays on each access (packing and the losses take them as they took lists)."""

    __slots__ = ("data", "index", "ref_logps")

    def __init__(self, data, index):
        self.data, self.index, self.ref_logps = data, index, None

    def _seq(self, s):
        offsets = self.data.seq_offsets
        return self.data.tokens[offsets[s] : offsets[s + 1]].tolist()

    @property
    def prompt_ids(self):
        return self._seq(self.data.group_offsets[self.index])

    @property
    def response_ids(self):
        first, end = self.data.group_offsets[self.index : self.index + 2]
        return [self._seq(s) for s in range(first + 1, end)]

    @property
    def scores(self):
        first, end = self.data.group_offsets[self.index : self.index + 2]
        return self.data.scores[first + 1 : end].tolist()

    @property
    def line(self):
        return self.data.lines[self.index]

    @property
    def num_tokens(self):
        """Prompt + every response: group_tokens without making the lists."""
        first, end = self.data.group_offsets[self.index : self.index + 2]
        return int(self.data.seq_offsets[end] - self.data.seq_offsets[first])

    def __repr__(self):
        return (
            f"GroupView(line={self.line!r}, prompt_ids={self.prompt_ids}, response_ids={self.response_ids}, "
            f"scores={self.scores})"
        )


def _truncate(prompt, responses, max_length, max_prompt_length, bos_id):
    """Cut one group to the budget. An over-long prompt keeps its end (the question being asked,
    and the generation prompt) behind its BOS; each response is cut so that prompt + response fits
    max_length. Returns (prompt, responses, prompt_cut, n_responses_cut), or None when the prompt
    leaves no room for a response."""
    prompt_cut = max_prompt_length is not None and len(prompt) > max_prompt_length
    if prompt_cut:
        head = prompt[:1] if bos_id is not None and prompt[:1] == [bos_id] else []
        prompt = head + prompt[len(prompt) - (max_prompt_length - len(head)) :]
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
    return head + text[len(text) - bound :]  # the end, behind its BOS, as _truncate keeps


CHUNK = 512  # groups rendered and encoded at a time: their texts are freed before the next chunk is read


def _encode_chunk(groups, tok, include_header, bounds, report):
    """Render and encode a chunk of groups: (tokens, sequence lengths) with each group's prompt and
    then its responses, texts over the character bounds cut first (see _char_bound)."""
    prompt_bound, response_bound = bounds
    texts = []
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
        texts += [p, *rs]
    encodings = tok.tokenizer.encode_batch(texts, add_special_tokens=False)  # in parallel
    del texts
    lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
    tokens = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=int(lengths.sum()))
    return tokens, lengths


def _cut_chunk(groups, tokens, lengths, max_length, max_prompt_length, bos_id, skip, report):
    """A piece for TokenizedSet.from_parts: the chunk's groups cut to the budget (see _truncate), the
    unusable ones skipped. Where nothing is cut or skipped the encoded arrays are kept as they are."""
    starts = np.concatenate([[0], np.cumsum(lengths)])
    pieces, seq_lens, per_group, scores, lines = [], [], [], [], []
    changed, s = False, 0
    for g in groups:
        k = len(g.responses)
        report.rows += 1
        reason = skip(g)
        first = s
        s += 1 + k
        plen = int(lengths[first])
        pstart = int(starts[first])
        prompt_len, prompt_pieces = plen, [(pstart, pstart + plen)]
        if max_prompt_length is not None and plen > max_prompt_length:  # its end, behind its BOS
            head = 1 if bos_id is not None and tokens[pstart] == bos_id else 0
            prompt_pieces = [(pstart, pstart + head), (pstart + plen - (max_prompt_length - head), pstart + plen)]
            prompt_len = max_prompt_length
        room = None if max_length is None else max_length - prompt_len
        if reason is None and room is not None and room <= 0:
            reason = PROMPT_FILLS
        if reason is not None:
            report.skip(reason, g.line)
            changed = True
            continue
        rlens = lengths[first + 1 : first + 1 + k]
        keep = rlens if room is None else np.minimum(rlens, room)
        n_cut = int((keep < rlens).sum())
        report.truncated_prompts += prompt_len != plen
        report.truncated_responses += n_cut
        changed = changed or n_cut > 0 or prompt_len != plen
        pieces += prompt_pieces + [
            (int(starts[first + 1 + j]), int(starts[first + 1 + j]) + int(keep[j])) for j in range(k)
        ]
        seq_lens += [prompt_len, *map(int, keep)]
        per_group.append(1 + k)
        scores += [math.nan, *g.scores]
        lines.append(g.line)
    report.kept += len(lines)
    if changed:
        tokens = np.concatenate([tokens[a:b] for a, b in pieces]) if pieces else np.zeros(0, np.int32)
        lengths = np.array(seq_lens, dtype=np.int64)
    return tokens, lengths, np.array(per_group, dtype=np.int64), np.array(scores, dtype=np.float64), lines


def tokenize_set(
    groups,
    tok,
    max_length,
    max_prompt_length,
    min_responses=2,
    include_header=False,
    require_preference=True,
    progress=None,
    free=False,
    bound_lengths=None,
):
    """Tokenize groups into a TokenizedSet, cut to max_length tokens per prompt + response and prompts
    to max_prompt_length (None: no limit of their own, so a prompt that fills max_length skips its
    group); see tokenize_groups. Returns (TokenizedSet, Report). Groups are encoded CHUNK at a time;
    with free=True each chunk's entries of the list `groups` are set to None once encoded, so the
    texts do not outlive their tokens. progress(done, total) is called with groups after each chunk.
    bound_lengths=(max_length, max_prompt_length) sets the character bound alone (default: the limits given),
    for statistics of full lengths that still never tokenize a 50 MB text whole."""
    parts, report, span = _tokenize_parts(
        groups,
        tok,
        max_length,
        max_prompt_length,
        min_responses,
        include_header,
        require_preference,
        progress,
        free,
        bound_lengths,
    )
    return TokenizedSet.from_parts(parts, score_span=span), report


def _tokenize_parts(
    groups,
    tok,
    max_length,
    max_prompt_length,
    min_responses,
    include_header,
    require_preference,
    progress,
    free,
    bound_lengths=None,
):
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be positive, got {max_prompt_length}")
    report = Report(source=f"tokenized to max_length {max_length}, max_prompt_length {max_prompt_length}")
    limits = [n for n in (bound_lengths or (max_length, max_prompt_length)) if n is not None]
    response_limit = (bound_lengths or (max_length,))[0]
    bounds = (
        _char_bound(tok, min(limits)) if limits else None,
        None if response_limit is None else _char_bound(tok, response_limit),
    )

    def skip(g):
        return unusable(g.responses, g.scores, min_responses, require_preference)

    parts, lo, hi = [], math.inf, -math.inf
    for start in range(0, len(groups), CHUNK):
        chunk = groups[start : start + CHUNK]
        lo = min([lo, *(min(g.scores) for g in chunk if g.scores)])
        hi = max([hi, *(max(g.scores) for g in chunk if g.scores)])
        tokens, lengths = _encode_chunk(chunk, tok, include_header, bounds, report)
        parts.append(_cut_chunk(chunk, tokens, lengths, max_length, max_prompt_length, tok.bos_id, skip, report))
        if free:
            groups[start : start + len(chunk)] = [None] * len(chunk)
        del chunk, tokens, lengths
        if progress is not None:
            progress(min(start + CHUNK, len(groups)), len(groups))
    return parts, report, (None if lo > hi else (lo, hi))


def _empty_part():
    return np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64), []


def tokenize_groups(
    groups,
    tok,
    max_length,
    max_prompt_length,
    min_responses=2,
    include_header=False,
    require_preference=True,
    progress=None,
):
    """Tokenize groups and cut them to max_length tokens per prompt + response, prompts to
    max_prompt_length (None: no limit of their own, so a prompt that fills max_length skips its
    group). With include_header=True the assistant header moves from the prompt to every response.
    Groups a caller built by hand are checked for the same skips as read_groups applies.
    Returns ([TokenizedGroup], Report); tokenize_set gives the compact form of the same groups.

    A text far longer than its budget (a 50 MB line) is first cut to a character bound (_char_bound:
    prompts keep their end, responses their beginning), so tokenizing it costs memory in proportion to
    the budget, not to the text; the tokens kept are the same as without the cut.
    progress(done, total), if given, is called with groups after each chunk is encoded."""
    data, report = tokenize_set(
        groups, tok, max_length, max_prompt_length, min_responses, include_header, require_preference, progress
    )
    return [TokenizedGroup(g.prompt_ids, g.response_ids, g.scores, g.line) for g in data], report


# -----------------------------------------------------------------------------
# Tokenized once per job, kept between jobs: the cache


FORMAT_VERSION = 1  # of what the cache stores and how it was made: raise it when either changes
ARRAYS = {"tokens": np.int32, "seq_offsets": np.int64, "group_offsets": np.int64, "scores": np.float64}


def default_cache_dir():
    """$MPPO_CACHE, else $XDG_CACHE_HOME/mppo, else ~/.cache/mppo: one folder shared by every run of a user, so a
    sweep whose runs each have their own --out tokenizes its data once."""
    if os.environ.get("MPPO_CACHE"):
        return os.environ["MPPO_CACHE"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mppo")


def cache_key(spec, tok, **settings):
    """What decides a tokenized set's content: each data file (path, size, modification time), the tokenizer and
    chat format (ChatTokenizer.fingerprint: tokenizer.json, template, date string, special tokens), the settings
    (lengths, the assistant header, the format and the loss family's filters) and FORMAT_VERSION."""
    files = []
    for path in data_files(spec):
        st = os.stat(path)
        files.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    return {"version": FORMAT_VERSION, "data": files, "tokenizer": tok.fingerprint(), **settings}


def cache_path(cache_dir, key):
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    name = re.sub(r"[^\w.-]", "_", os.path.basename(key["data"][0][0]))[:40]
    return os.path.join(cache_dir, f"{name}-{digest}")


class CacheMiss(Exception):
    """No usable cache: reason is None when there is none, else why the one there cannot be trusted."""

    def __init__(self, reason=None):
        super().__init__(reason)
        self.reason = reason


def read_cache(path, key, verify=True):
    """(TokenizedSet, summary) stored at path, its tokens memory-mapped. Raises CacheMiss when the folder is
    absent, written for another key, or damaged: a file missing or cut short, an array of the wrong length, or
    (verify=True) a checksum that differs from the header's."""
    if not os.path.isdir(path):
        raise CacheMiss()
    try:
        with open(os.path.join(path, "header.json"), encoding="utf-8") as f:
            header = json.load(f)
        if header["key"] != key:
            raise CacheMiss("its header was written for other data or settings")
        arrays = {}
        for name, dtype in ARRAYS.items():
            meta = header["arrays"][name]
            a = np.load(os.path.join(path, name + ".npy"), mmap_mode="r" if meta["length"] else None)
            if a.dtype != dtype or a.shape != (meta["length"],):
                raise CacheMiss(f"{name}.npy holds {a.dtype} {a.shape}, the header says {meta['length']}")
            if verify and zlib.crc32(a) != meta["crc32"]:
                raise CacheMiss(f"{name}.npy does not match its checksum")
            arrays[name] = a
        data = TokenizedSet(**arrays, lines=header["lines"], score_span=header["score_span"])
    except (OSError, ValueError, KeyError, TypeError) as e:  # a truncated .npy is a ValueError, a bad header too
        raise CacheMiss(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    ends = (data.seq_offsets[-1:], data.group_offsets[-1:])
    if (
        len(data.scores) != len(data.seq_offsets) - 1
        or len(data.lines) != len(data.group_offsets) - 1
        or list(ends[0]) != [len(data.tokens)]
        or list(ends[1]) != [len(data.seq_offsets) - 1]
    ):
        raise CacheMiss("its arrays do not fit together")
    if data.score_span is not None:
        data.score_span = tuple(data.score_span)
    return data, header["summary"]


def _write_npy(path, pieces, dtype):
    """One .npy array of the pieces end to end, written piece by piece (never joined in memory); its CRC-32."""
    n, crc = sum(len(p) for p in pieces), 0
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": (n,)})
        for p in pieces:
            p = np.ascontiguousarray(p, dtype=dtype)
            f.write(memoryview(p).cast("B"))
            crc = zlib.crc32(p, crc)
        f.flush()
        os.fsync(f.fileno())
    return {"length": n, "crc32": crc}


def write_cache(path, key, parts, summary, score_span):
    """Write the pieces of a tokenized set (see TokenizedSet.from_parts) to the cache folder path, atomically:
    into path.tmp.PID, renamed into place once complete, so a reader sees a whole cache or none."""
    tmp = f"{path}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    seq_offsets = np.concatenate([[0], np.cumsum(np.concatenate([p[1] for p in parts]))]) if parts else np.zeros(1)
    group_offsets = np.concatenate([[0], np.cumsum(np.concatenate([p[2] for p in parts]))]) if parts else np.zeros(1)
    arrays = {
        "tokens": _write_npy(os.path.join(tmp, "tokens.npy"), [p[0] for p in parts], np.int32),
        "seq_offsets": _write_npy(os.path.join(tmp, "seq_offsets.npy"), [seq_offsets], np.int64),
        "group_offsets": _write_npy(os.path.join(tmp, "group_offsets.npy"), [group_offsets], np.int64),
        "scores": _write_npy(os.path.join(tmp, "scores.npy"), [p[3] for p in parts], np.float64),
    }
    header = {
        "key": key,
        "arrays": arrays,
        "summary": summary,
        "score_span": score_span,
        "lines": [x for p in parts for x in p[4]],
    }
    with open(os.path.join(tmp, "header.json"), "w", encoding="utf-8") as f:
        json.dump(header, f)
        f.flush()
        os.fsync(f.fileno())
    old = f"{path}.old.{os.getpid()}"
    if os.path.exists(path):  # a stale or damaged cache: moved aside, then removed
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:  # another job wrote the same cache meanwhile: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return path


class Progress:
    """progress(done, total): a line at most every `every` seconds with the groups done, the rate and the ETA."""

    def __init__(self, what, log, every=10.0):
        self.what, self.log, self.every = what, log, every
        self.start = self.last = time.time()

    def __call__(self, done, total):
        now = time.time()
        if now - self.last >= self.every or (done == total and now - self.start >= self.every):
            rate = done / max(now - self.start, 1e-9)
            self.log(f"{self.what}: {done}/{total} groups, {rate:.0f} groups/s, ETA {(total - done) / rate:.0f} s")
            self.last = now


def tokenizer_threads(local_world):
    """Size the tokenizer's thread pool to this process's share of the cores, so N ranks on one machine do not start
    N pools of every core. Rayon reads RAYON_NUM_THREADS when the pool starts (the first batch encode); a value the
    user set is kept."""
    if "RAYON_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["RAYON_NUM_THREADS"] = str(max(1, cores // max(1, local_world)))


def _merge_reports(reports):
    out = replace(reports[0], skipped={}, dropped={})
    out.rows = out.kept = out.truncated_prompts = out.truncated_responses = out.cut_texts = 0
    for r in reports:
        for name in ("rows", "kept", "truncated_prompts", "truncated_responses", "cut_texts"):
            setattr(out, name, getattr(out, name) + getattr(r, name))
        for reason, ls in r.skipped.items():
            out.skipped.setdefault(reason, []).extend(ls)
    return out


def load_tokenized(
    spec,
    tok,
    max_length,
    max_prompt_length,
    format=None,
    min_responses=2,
    require_preference=True,
    score_field=None,
    include_header=False,
    cache_dir=None,
    rank=0,
    world=1,
    gather=None,
    log=print,
):
    """Read and tokenize a data set once per job, or take it from the cache. Returns (TokenizedSet, summary), the
    summary being the read and tokenize reports as text. The arguments are those of read_groups and tokenize_set.

    cache_dir (None: no cache) holds one folder per cache_key; a folder that matches is memory-mapped (the ranks of
    a node share its pages), one that is stale or damaged is rebuilt with a one-line notice. With world > 1 ranks,
    gather(obj) -> [every rank's obj] (parallel.all_gather) shares the work: every rank reads the data, tokenizes a
    contiguous 1/world of the groups with its share of the cores, and the pieces are gathered in order; rank 0
    writes the cache, and every rank that can see it then maps it instead of keeping its own copy."""
    say = log if rank == 0 else (lambda *a: None)
    settings = dict(
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        format=format,
        min_responses=min_responses,
        require_preference=require_preference,
        score_field=score_field,
        include_header=include_header,
    )
    path = key = None
    if cache_dir is not None:
        key = cache_key(spec, tok, **settings)
        path = cache_path(cache_dir, key)
        status = "hit"
        if rank == 0:
            try:
                data, summary = read_cache(path, key)
            except CacheMiss as e:
                status = e.reason or "missing"
                if e.reason:
                    say(f"cache {path} is damaged or stale ({e.reason}): rebuilding it")
        status = gather(status)[0] if world > 1 else status
        if status == "hit":
            if rank != 0:
                data, summary = read_cache(path, key, verify=False)  # rank 0 checked it
            say(f"tokenized data from the cache {path}")
            return data, summary
    tokenizer_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    start = time.time()
    groups, read_report = read_groups(spec, format, min_responses, require_preference, score_field)
    n = len(groups)
    mine = groups[n * rank // world : n * (rank + 1) // world]
    del groups  # this rank's share only: the other texts are freed now, its own as they are encoded
    what = "tokenizing" + (f" (rank 0's share of {n})" if world > 1 else "")
    parts, report, span = _tokenize_parts(
        mine,
        tok,
        max_length,
        max_prompt_length,
        min_responses,
        include_header,
        require_preference,
        Progress(what, say),
        free=True,
    )
    if world > 1:
        shares = gather((parts, report, span))
        parts = [p for share in shares for p in share[0]]
        report = _merge_reports([share[1] for share in shares])
        spans = [share[2] for share in shares if share[2] is not None]
        span = (min(s[0] for s in spans), max(s[1] for s in spans)) if spans else None
    say(f"tokenized {n} groups in {time.time() - start:.0f} s")
    summary = f"{read_report.summary()}\n{report.summary()}"
    if path is not None:
        if rank == 0:
            write_cache(path, key, parts, summary, span)
            say(f"wrote the cache {path}")
        if world > 1:
            gather(None)  # the cache is complete before another rank looks for it
        try:
            data, _ = read_cache(path, key, verify=False)
            return data, summary
        except CacheMiss:  # this rank cannot see rank 0's cache folder (another node): keep the gathered copy
            pass
    return TokenizedSet.from_parts(parts, score_span=span), summary


# -----------------------------------------------------------------------------
# Scores for the point-wise losses


def score_rule(lo_seen, hi_seen, score_range=None):
    """(lo, hi) of the map s -> (s - lo) / (hi - lo) that scale_scores applies to scores spanning [lo_seen,
    hi_seen], or None when they stay as they are; a ValueError when no rule fits (see scale_scores)."""
    if score_range is not None:
        lo, hi = score_range
        if not hi > lo:
            raise ValueError(f"score_range {score_range}: the upper end must exceed the lower")
        if lo_seen < lo or hi_seen > hi:
            raise ValueError(f"scores span [{lo_seen:g}, {hi_seen:g}], outside score_range [{lo:g}, {hi:g}]")
        return lo, hi
    if 0 <= lo_seen and hi_seen <= 1:
        return None
    if 0 <= lo_seen and hi_seen <= 10:
        return 0.0, 10.0
    raise ValueError(
        f"scores span [{lo_seen:g}, {hi_seen:g}]: the point-wise losses need scores in [0, 1]; "
        "give the scale's range (score_range=(lo, hi)) to map it linearly"
    )


def scale_sets(sets, score_range=None):
    """scale_scores for TokenizedSets: one rule from the scores every set read (score_span), applied to each."""
    spans = [s.score_span for s in sets if s.score_span is not None]
    if not spans:
        return
    rule = score_rule(min(lo for lo, _ in spans), max(hi for _, hi in spans), score_range)
    if rule is not None:
        for s in sets:
            s.rescale(*rule)


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
    rule = score_rule(min(flat), max(flat), score_range) if flat else None
    if rule is None:
        return list(groups)
    lo, hi = rule
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
            yield [self.groups[i] for i in order[start : start + per_rank]]
        self.epoch, self.step = self.epoch + 1, 0

    def state_dict(self):
        return {
            "epoch": self.epoch,
            "step": self.step,
            "num_groups": len(self.groups),
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state):
        for key in ("num_groups", "batch_size", "seed"):  # the order, and so the resume, depends on them
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ValueError(
                    f"loader state has {key}={state[key]}, but this loader has {mine}: the epoch order would differ"
                )
        if not 0 <= state["step"] <= self.steps_per_epoch:
            raise ValueError(f"loader state step {state['step']} outside 0..{self.steps_per_epoch}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def group_tokens(g):
    """Tokens of a group laid out with its prompt once: prompt + every response."""
    if isinstance(g, GroupView):  # read off the offsets, without making lists
        return g.num_tokens
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
    parser = ArgumentParser(
        prog="data.py",
        description="Print the statistics of a preference data set under a checkpoint's tokenizer, "
        "and write the tokenized set to the cache train.py reads.",
    )
    a = parser.add_argument
    a("--model", required=True, help="checkpoint directory with tokenizer.json (and tokenizer_config.json)")
    a(
        "--data",
        required=True,
        nargs="+",
        help="data: files (.jsonl, .json, .parquet, .jsonl.gz, .json.gz), folders or globs, read as one set",
    )
    a(
        "--format",
        choices=list(PARSERS),
        default=None,
        help="data format (default: detected from each file's first row)",
    )
    a("--score_field", default=None, help="the score of rows of one response each (format 'single'), e.g. helpfulness")
    a("--template", choices=TEMPLATES, default=None, help="chat format (default: detected from the chat template)")
    a(
        "--date_string",
        default=None,
        help="the 'Today Date' of Llama 3.1-3.3 templates (default: as the template sets it)",
    )
    a("--max_length", type=int, default=2048, help="token budget of prompt + one response")
    a("--max_prompt_length", type=int, default=1800, help="prompts longer than this keep their end")
    a("--min_responses", type=int, default=2, help="groups with fewer responses are skipped (1 for SFT)")
    a(
        "--keep_ties",
        action="store_true",
        help="keep groups whose scores are all equal (the point-wise losses can use them)",
    )
    a("--include_header", action="store_true", help="score the assistant header as part of each response")
    a("--cache_dir", default=None, help="where tokenized sets are kept (default: $MPPO_CACHE, else ~/.cache/mppo)")
    a("--no_cache", action="store_true", help="print the statistics only; write no cache")
    args = parser.parse_args(argv)
    data = args.data[0] if len(args.data) == 1 else args.data
    try:
        tok = ChatTokenizer.from_pretrained(args.model, args.template, args.date_string)
        groups, report = read_groups(data, args.format, args.min_responses, not args.keep_ties, args.score_field)
        # full lengths, but texts far over the budget cut to train.py's character bound first (a 50 MB row)
        full, bounded = tokenize_set(
            groups,
            tok,
            None,
            None,
            args.min_responses,
            args.include_header,
            not args.keep_ties,
            bound_lengths=(args.max_length, args.max_prompt_length),
        )
    except (OSError, ValueError) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    prompt_lens = np.diff(full.seq_offsets)[full.group_offsets[:-1]] if len(full) else np.zeros(0, np.int64)
    is_prompt = np.zeros(len(full.seq_offsets) - 1, bool)
    is_prompt[full.group_offsets[:-1]] = True
    seq_lens = np.diff(full.seq_offsets)
    response_lens = seq_lens[~is_prompt]
    per_group = np.diff(full.group_offsets) - 1
    group_of = np.repeat(np.arange(len(full)), per_group)  # each response's group
    longest = np.zeros(len(full), np.int64)
    np.maximum.at(longest, group_of, response_lens)

    def pct(xs):
        q = np.percentile(xs, [50, 90, 95, 99]) if len(xs) else [0] * 4
        return "p50 {:.0f}  p90 {:.0f}  p95 {:.0f}  p99 {:.0f}  max {}".format(*q, int(max(xs, default=0)))

    k = Counter(per_group.tolist())
    print(
        f"tokenizer: template {tok.template}, bos {tok.bos_id}, eos {tok.eos_id}, stop ids {sorted(tok.stop_ids)}, "
        f"vocab {tok.vocab_size}"
    )
    print(report.summary())
    print(f"groups: {len(full)}, responses: {len(response_lens)}")
    print("responses per group: " + ", ".join(f"{n}: {k[n]}" for n in sorted(k)))
    print(f"{'prompt tokens:':28}" + pct(prompt_lens))
    print(f"{'response tokens:':28}" + pct(response_lens))
    print(f"{'prompt + longest response:':28}" + pct(prompt_lens + longest))
    print(f"{'prompt + all responses:':28}" + pct(np.diff(full.seq_offsets[full.group_offsets])))
    if bounded.cut_texts:
        print(
            f"{bounded.cut_texts} texts were cut to the character bound of max_length / max_prompt_length before "
            "tokenizing (as train.py cuts them): their token counts above are lower bounds, all over the budget"
        )

    # the set train.py trains on: each chunk of the full set cut to the budget (a copy only where something is cut)
    cut = Report(source=f"tokenized to max_length {args.max_length}, max_prompt_length {args.max_prompt_length}")
    cut.cut_texts = bounded.cut_texts
    starts = full.seq_offsets[full.group_offsets]

    def skip(g):
        return unusable(g.responses, g.scores, args.min_responses, not args.keep_ties)

    parts = []
    for i in range(0, len(groups), CHUNK):
        chunk = groups[i : i + CHUNK]
        end = min(i + CHUNK, len(groups))
        tokens = full.tokens[starts[i] : starts[end]]
        lengths = seq_lens[full.group_offsets[i] : full.group_offsets[end]]
        parts.append(_cut_chunk(chunk, tokens, lengths, args.max_length, args.max_prompt_length, tok.bos_id, skip, cut))
    nothing_cut = not (cut.skipped or cut.truncated_prompts or cut.truncated_responses)
    print(
        f"truncation to max_length {args.max_length}, max_prompt_length {args.max_prompt_length}: nothing cut"
        if nothing_cut
        else cut.summary()
    )
    if args.no_cache:
        return
    settings = dict(
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        format=args.format,
        min_responses=args.min_responses,
        require_preference=not args.keep_ties,
        score_field=args.score_field,
        include_header=args.include_header,
    )
    key = cache_key(data, tok, **settings)
    cache_dir = args.cache_dir or default_cache_dir()
    path = write_cache(cache_path(cache_dir, key), key, parts, f"{report.summary()}\n{cut.summary()}", full.score_span)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    print(
        f"cache: {path} ({size / 2**20:.1f} MiB); train.py with the same data, tokenizer and settings "
        f"(and --cache_dir {cache_dir} if not the default) reads it"
    )


if __name__ == "__main__":
    main()
