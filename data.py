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
import mmap
import os
import re
import shutil
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass, replace
from functools import partial
from itertools import chain, count, islice

import numpy as np

from chat import TEMPLATES, ChatTokenizer
from cli import ArgumentParser
from formats import PARSERS, PROMPT_FILLS, DataError, Report, count_rows, data_files, iter_groups, unusable

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
    def from_parts(cls, parts, score_span=None, tokens=None):
        """One set from consecutive pieces, each (tokens, sequence lengths, sequences per group, scores, lines);
        tokens= the pieces' tokens already end to end (a TokenBuffer's), their first places then unused."""
        parts = list(parts) or [_empty_part()]

        def cat(i, dtype):
            arrays = [p[i] for p in parts]
            if len(arrays) == 1:  # the common case: no copy
                return np.asarray(arrays[0], dtype=dtype)
            return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)

        tokens = cat(0, np.int32) if tokens is None else tokens
        seq_offsets = np.concatenate([[0], np.cumsum(cat(1, np.int64))]).astype(np.int64)
        group_offsets = np.concatenate([[0], np.cumsum(cat(2, np.int64))]).astype(np.int64)
        return cls(tokens, seq_offsets, group_offsets, cat(3, np.float64), [x for p in parts for x in p[4]], score_span)

    def fingerprint(self):
        """checkpoint.data_fingerprint of self.groups, hashed from the arrays: the same bytes (each sequence's ids
        as int64 and ';', each group's scores as float64 and '|'), without making a list per sequence."""
        h, so, go = hashlib.sha256(), self.seq_offsets.tolist(), self.group_offsets.tolist()
        for first, end in zip(go[:-1], go[1:]):
            for s in range(first, end):
                h.update(self.tokens[so[s] : so[s + 1]].astype(np.int64))
                h.update(b";")
            h.update(np.ascontiguousarray(self.scores[first + 1 : end], dtype=np.float64))
            h.update(b"|")
        return h.hexdigest()

    def parts(self):
        """This set as one piece of from_parts (what a rank sends when ranks share the tokenizing)."""
        return (self.tokens, np.diff(self.seq_offsets), np.diff(self.group_offsets), self.scores, self.lines)

    def rescale(self, lo, hi):
        """Scores mapped by (s - lo) / (hi - lo) (see score_rule)."""
        self.scores = (self.scores - lo) / (hi - lo)


class TokenBuffer:
    """int32 tokens appended end to end into an anonymous memory map that grows in place (mremap, Linux), so
    holding N tokens takes 4N bytes at every moment: joining pieces at the end would hold 8N for a while.
    Where a map cannot grow in place it is copied into a larger one."""

    def __init__(self, capacity=1 << 22):
        self.map, self.n = self._new(4 * capacity), 0

    @staticmethod
    def _new(size):  # private: a shared anonymous map would not grow its backing store (a bus error past it)
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE) if hasattr(mmap, "MAP_PRIVATE") else mmap.mmap(-1, size)

    def append(self, tokens):
        data = memoryview(np.ascontiguousarray(tokens, dtype=np.int32)).cast("B")
        end = 4 * self.n + len(data)
        if end > len(self.map):
            size = max(end, 2 * len(self.map))
            try:
                self.map.resize(size)
            except (OSError, SystemError, ValueError):  # no mremap here: a copy
                bigger = self._new(size)
                bigger[: 4 * self.n] = self.map[: 4 * self.n]
                self.map = bigger
        self.map[4 * self.n : end] = data
        self.n += len(tokens)

    def array(self):
        """The tokens as an (n,) int32 array over the map (append no more after this)."""
        return np.frombuffer(self.map, dtype=np.int32, count=self.n)


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
    encode = getattr(tok.tokenizer, "encode_batch_fast", tok.tokenizer.encode_batch)  # no offsets (tokenizers 0.20+)
    encodings = encode(texts, add_special_tokens=False)  # in parallel
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
    bound_lengths=None,
):
    """Tokenize groups into a TokenizedSet, cut to max_length tokens per prompt + response and prompts
    to max_prompt_length (None: no limit of their own, so a prompt that fills max_length skips its
    group); see tokenize_groups. Returns (TokenizedSet, Report). Groups are encoded CHUNK at a time, and
    `groups` may be any iterable (formats.iter_groups: each chunk's texts are freed once it is encoded).
    progress(done, total) is called with groups after each chunk (total: len(groups), None for an iterator).
    bound_lengths=(max_length, max_prompt_length) sets the character bound alone (default: the limits given),
    for statistics of full lengths that still never tokenize a 50 MB text whole."""
    total = len(groups) if hasattr(groups, "__len__") else None
    parts, reports, spans, done = [], [], [], 0
    for _, chunk, _, part, report, span in _encoded_chunks(
        groups, tok, max_length, max_prompt_length, include_header, min_responses, require_preference, bound_lengths
    ):
        parts.append(part)
        reports.append(report)
        spans.append(span)
        done += len(chunk)
        if progress is not None:
            progress(done, total)
    report = _merge_reports(reports, _tokenized_source(max_length, max_prompt_length))
    return TokenizedSet.from_parts(parts, score_span=_merge_spans(spans)), report


def _unusable(g, min_responses, require_preference):
    return unusable(g.responses, g.scores, min_responses, require_preference)


def _encoded_chunks(
    groups,
    tok,
    max_length,
    max_prompt_length,
    include_header,
    min_responses,
    require_preference,
    bounds=None,
    share=(0, 1),
):
    """Yield (index, groups, lengths, piece, Report, score span) for consecutive chunks of CHUNK groups of an
    iterable: each rendered and encoded (_encode_chunk, lengths as encoded) with the character bounds of the limits
    (bounds=(max_length, max_prompt_length) sets them alone: see tokenize_set), then cut to the limits and stripped
    of unusable groups (_cut_chunk: the piece for TokenizedSet.from_parts). With share=(slot, workers) only chunks
    index % workers == slot are encoded (slot None: none); the others are read past, dropped and yielded as
    (index, None, None, None, None, None), so the ranks of a job split the work, each holds the texts of one chunk
    at a time, and all of them see every index (to meet at the same ones)."""
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be positive, got {max_prompt_length}")
    limits = [n for n in (bounds or (max_length, max_prompt_length)) if n is not None]
    response_limit = (bounds or (max_length,))[0]
    char_bounds = (
        _char_bound(tok, min(limits)) if limits else None,
        None if response_limit is None else _char_bound(tok, response_limit),
    )
    skip = partial(_unusable, min_responses=min_responses, require_preference=require_preference)
    slot, workers = share
    it = iter(groups)
    for index in count():
        chunk = list(islice(it, CHUNK))
        if not chunk:
            return
        if index % workers == slot:
            report = Report(source=_tokenized_source(max_length, max_prompt_length))
            tokens, lengths = _encode_chunk(chunk, tok, include_header, char_bounds, report)
            part = _cut_chunk(chunk, tokens, lengths, max_length, max_prompt_length, tok.bos_id, skip, report)
            yield index, chunk, lengths, part, report, _span(chunk)
        else:
            yield index, None, None, None, None, None
        del chunk


def _span(groups):
    """(lowest, highest) score of these groups (skipped ones included: the scaling rule sees every score read)."""
    scores = [x for g in groups for x in g.scores]
    return (min(scores), max(scores)) if scores else None


def _merge_spans(spans):
    spans = [s for s in spans if s is not None]
    return (min(lo for lo, _ in spans), max(hi for _, hi in spans)) if spans else None


def _tokenized_source(max_length, max_prompt_length):
    return f"tokenized to max_length {max_length}, max_prompt_length {max_prompt_length}"


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
            if verify:  # an empty array is loaded whole, not mapped
                crc = _file_crc(a.filename, a.offset) if isinstance(a, np.memmap) else zlib.crc32(a)
                if crc != meta["crc32"]:
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


NPY_HEADER = 128  # bytes of every .npy header written here: fixed, so tokens.npy's can be filled in at the end


def _npy_header(dtype, n):
    """A .npy (format 1.0) header for a 1-D array of n values, padded with spaces to NPY_HEADER bytes."""
    text = f"{{'descr': '{np.dtype(dtype).str}', 'fortran_order': False, 'shape': ({n},), }}"
    return b"\x93NUMPY\x01\x00" + (NPY_HEADER - 10).to_bytes(2, "little") + text.ljust(NPY_HEADER - 11).encode() + b"\n"


class CacheWriter:
    """Writes a tokenized set into the cache folder path piece by piece (add: one piece of TokenizedSet.from_parts,
    in order), so the tokens never need to be in memory all at once: they go to tokens.npy as they come, the small
    arrays (offsets, scores, lines) are kept until finish. Atomic: everything goes into path.tmp.PID, renamed into
    place by finish, so a reader sees a whole cache or none; abort removes the temporary folder."""

    def __init__(self, path, key):
        self.path, self.key = path, key
        self.tmp = f"{path}.tmp.{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        self.tokens = open(os.path.join(self.tmp, "tokens.npy"), "wb")
        self.tokens.write(_npy_header(np.int32, 0))  # the length is filled in by finish
        self.n_tokens, self.crc = 0, 0
        self.seq_lens, self.per_group, self.scores, self.lines = [], [], [], []

    def add(self, part):
        tokens, seq_lens, per_group, scores, lines = part
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        self.tokens.write(memoryview(tokens).cast("B"))
        self.n_tokens += len(tokens)
        self.crc = zlib.crc32(tokens, self.crc)
        self.seq_lens.append(seq_lens)
        self.per_group.append(per_group)
        self.scores.append(scores)
        self.lines += lines

    def _write(self, name, array, dtype):
        array = np.ascontiguousarray(array, dtype=dtype)
        with open(os.path.join(self.tmp, name + ".npy"), "wb") as f:
            f.write(_npy_header(dtype, len(array)))
            f.write(memoryview(array).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        return {"length": len(array), "crc32": zlib.crc32(array)}

    def finish(self, summary, score_span):
        """Write the rest, fsync, rename into place; returns path."""
        self.tokens.seek(0)
        self.tokens.write(_npy_header(np.int32, self.n_tokens))
        self.tokens.flush()
        os.fsync(self.tokens.fileno())
        self.tokens.close()

        def offsets(lengths):
            return np.concatenate([[0], np.cumsum(np.concatenate(lengths))]) if lengths else np.zeros(1)

        header = {
            "key": self.key,
            "arrays": {
                "tokens": {"length": self.n_tokens, "crc32": self.crc},
                "seq_offsets": self._write("seq_offsets", offsets(self.seq_lens), np.int64),
                "group_offsets": self._write("group_offsets", offsets(self.per_group), np.int64),
                "scores": self._write("scores", np.concatenate(self.scores) if self.scores else [], np.float64),
            },
            "summary": summary,
            "score_span": score_span,
            "lines": self.lines,
        }
        with open(os.path.join(self.tmp, "header.json"), "w", encoding="utf-8") as f:
            json.dump(header, f)
            f.flush()
            os.fsync(f.fileno())
        old = f"{self.path}.old.{os.getpid()}"
        if os.path.exists(self.path):  # a stale or damaged cache: moved aside, then removed
            os.replace(self.path, old)
        try:
            os.replace(self.tmp, self.path)
        except OSError:  # another job wrote the same cache meanwhile: keep theirs
            shutil.rmtree(self.tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        return self.path

    def abort(self):
        self.tokens.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_cache(path, key, parts, summary, score_span):
    """Write the pieces of a tokenized set (see TokenizedSet.from_parts) to the cache folder path (CacheWriter)."""
    writer = CacheWriter(path, key)
    for part in parts:
        writer.add(part)
    return writer.finish(summary, score_span)


def _file_crc(path, offset, block=1 << 24):
    """CRC-32 of a file from offset on, read a block at a time: checking a cache this way leaves its pages in the
    page cache (shared, reclaimable), not in this process's resident memory as reading through the mapping would."""
    crc = 0
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(block):
            crc = zlib.crc32(chunk, crc)
    return crc


class Progress:
    """progress(done, total): a line at most every `every` seconds with how many `unit` are done, the rate and,
    where total is known (not None), the ETA."""

    def __init__(self, what, log, every=10.0, unit="groups"):
        self.what, self.log, self.every, self.unit = what, log, every, unit
        self.start = self.last = time.time()

    def __call__(self, done, total):
        now = time.time()
        if now - self.last >= self.every or (done == total and now - self.start >= self.every):
            rate = done / max(now - self.start, 1e-9)
            eta = "" if total is None else f", ETA {(total - done) / max(rate, 1e-9):.0f} s"
            of = "" if total is None else f"/{total}"
            self.log(f"{self.what}: {done}{of} {self.unit}, {rate:.0f} {self.unit}/s{eta}")
            self.last = now


CORES_PER_ENCODER = 2  # a rank encodes only with at least this many cores of its own (see local_encoders)


def local_encoders(local_world):
    """How many of the local_world ranks on this machine encode: one per CORES_PER_ENCODER cores, at least one.
    Measured on 2 cores, 64,000 groups: two ranks of one thread each cost 1.11 x the CPU of one rank with two
    threads (each rank reads every row, holds its own tokenizer, and waits at each gather), and took longer."""
    return max(1, min(local_world, _cores() // CORES_PER_ENCODER))


def tokenizer_threads(local_world):
    """Size the tokenizer's thread pool to this process's share of the cores, so N ranks on one machine do not start
    N pools of every core: the cores are split among the ranks that encode (local_encoders). Rayon reads
    RAYON_NUM_THREADS when the pool starts (the first batch encode); a value the user set is kept."""
    if "RAYON_NUM_THREADS" not in os.environ:
        os.environ["RAYON_NUM_THREADS"] = str(max(1, _cores() // local_encoders(local_world)))


def _cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _merge_reports(reports, source):
    """One Report of the chunks' reports, their skipped lines in the order the reports come (the chunks')."""
    out = Report(source=source)
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
    gather(obj) -> [every rank's obj] (parallel.all_gather) shares the work: every rank reads the data, the encoding
    ranks (one per CORES_PER_ENCODER cores of each machine, see encoding_ranks) take the chunks of CHUNK groups in
    turn with their share of the cores, and the pieces are gathered in order every few chunks (_tokenize_shared).
    Rank 0 writes them into the cache as they come, so no rank holds the whole set in memory: every rank that can
    see the finished cache maps it; one that cannot (another node's disk) keeps a copy of its own, as every rank
    does with no cache."""
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
        try:  # rank 0 checks the checksums; the others that the folder is whole (rank 0 vouches for its bytes)
            data, summary = read_cache(path, key, verify=rank == 0)
            status = "hit"
        except CacheMiss as e:
            status = e.reason or "missing"
            if e.reason and rank == 0:
                say(f"cache {path} is damaged or stale ({e.reason}): rebuilding it")
        statuses = gather(status) if world > 1 else [status]
        if all(s == "hit" for s in statuses):  # a rank that cannot see it (another node's disk) makes all tokenize
            say(f"tokenized data from the cache {path}")
            return data, summary
    tokenizer_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    share = gather if world > 1 else (lambda obj: [obj])
    writer = CacheWriter(path, key) if path is not None and rank == 0 else None
    try:
        # ranks that will map rank 0's cache keep nothing; one that cannot see its folder (another node) keeps all
        suffix = share(writer and writer.tmp[len(path) :])[0]  # rank 0's temporary folder: path + suffix
        keep = path is None or not os.path.isdir(path + suffix)
        data, summary, span = _tokenize_shared(spec, tok, settings, (rank, world), share, writer, keep, say)
        if writer is not None:
            writer.finish(summary, span)
            say(f"wrote the cache {path}")
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if path is not None:
        share(None)  # the cache is complete before another rank looks for it
        if not keep:
            return read_cache(path, key, verify=False)[0], summary
    return data, summary


GATHER_EVERY = 4  # chunks each encoding rank does between two gathers: fewer meetings, less waiting on the slowest


class SharedDataError(DataError):
    """One rank's DataError, raised on every rank of the job (see _tokenize_shared)."""


def encoding_ranks(rank, world, share):
    """The ranks that encode, in rank order: the first local_encoders() of each machine (by LOCAL_RANK); the others
    read along without competing for the cores (on 2 cores one rank encodes, with both)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    encodes = int(os.environ.get("LOCAL_RANK", rank)) < local_encoders(local_world)
    return [r for r, yes in enumerate(share(encodes)) if yes] if world > 1 else [0]


def _tokenize_shared(spec, tok, settings, ranks, share, writer, keep, say):
    """load_tokenized's reading and tokenizing (settings: its arguments from max_length to include_header, as
    cache_key takes them). Every rank reads the rows; of the E ranks that encode (encoding_ranks), the j-th encodes
    chunks j, j + E, ..., and after every GATHER_EVERY rounds of E chunks share(obj) -> [every rank's obj] (an
    all-gather) hands every rank those pieces, put in the order of the data. writer (rank 0's CacheWriter, or None)
    writes them as they come; a rank with keep=True holds them all for its TokenizedSet.
    Returns (TokenizedSet or None, summary, score span)."""
    rank, world = ranks
    max_length, max_prompt_length = settings["max_length"], settings["max_prompt_length"]
    min_responses, require_preference = settings["min_responses"], settings["require_preference"]
    start, read_report = time.time(), Report(source="")
    stream = iter_groups(
        spec, settings["format"], min_responses, require_preference, settings["score_field"], read_report
    )
    workers = encoding_ranks(rank, world, share)
    slot = workers.index(rank) if rank in workers else None  # None: reads along, encodes nothing
    progress = Progress("tokenizing" + (f" ({len(workers)} ranks)" if world > 1 else ""), say, unit="rows")
    total, block = count_rows(spec), len(workers) * GATHER_EVERY
    parts, reports, spans, mine, index, held = [], [], [], [], -1, TokenBuffer() if keep else None

    def take(pieces):  # every rank's pieces since the last gather
        pieces = [p for ps in pieces for p in ps]
        failed = [p[1] for p in pieces if p[0] is None]
        if failed:  # a rank could not render a group of its chunk: every rank stops with its line
            raise SharedDataError(failed[0])
        for _, part, report, span in sorted(pieces, key=lambda p: p[0]):
            if writer is not None:
                writer.add(part)
            if keep:  # the tokens into the buffer, the small arrays kept as they are
                held.append(part[0])
                parts.append((None, *part[1:]))
            reports.append(report)
            spans.append(span)

    try:
        for index, chunk, _, part, report, span in _encoded_chunks(
            stream,
            tok,
            max_length,
            max_prompt_length,
            settings["include_header"],
            min_responses,
            require_preference,
            share=(slot, len(workers)),
        ):
            if chunk is not None:  # this rank's chunk
                mine.append((index, part, report, span))
            if (index + 1) % block == 0:
                take(share(mine))
                mine = []
            progress(read_report.read, total)
        if (index + 1) % block:  # the last chunks, short of a whole block
            take(share(mine))
    except DataError as e:
        # a row every rank reads fails on every rank alike; a group only this rank renders fails here alone, and
        # the others wait at their next gather: this rank meets them there with its error
        if world == 1 or isinstance(e, SharedDataError):
            raise
        take(share([(None, str(e))]))
    say(f"tokenized {read_report.kept} groups in {time.time() - start:.0f} s")
    report = _merge_reports(reports, _tokenized_source(max_length, max_prompt_length))
    summary, span = f"{read_report.summary()}\n{report.summary()}", _merge_spans(spans)
    return (TokenizedSet.from_parts(parts, span, held.array()) if keep else None), summary, span


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
    # one pass, CHUNK groups at a time: full lengths for the statistics (texts far over the budget cut to
    # train.py's character bound first, so a 50 MB row never tokenizes whole), and the set train.py trains on
    # (each chunk cut to the budget: a copy only where something is cut) for the cache
    settings = dict(
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        format=args.format,
        min_responses=args.min_responses,
        require_preference=not args.keep_ties,
        score_field=args.score_field,
        include_header=args.include_header,
    )
    cache_dir = args.cache_dir or default_cache_dir()
    seq_lens, per_group, reports, spans, writer = [], [], [], [], None
    try:
        tok = ChatTokenizer.from_pretrained(args.model, args.template, args.date_string)
        if not args.no_cache:  # the cut chunks go to the cache as they come (CacheWriter)
            key = cache_key(data, tok, **settings)
            writer = CacheWriter(cache_path(cache_dir, key), key)
        report, total = Report(source=""), count_rows(data)
        stream = iter_groups(data, args.format, args.min_responses, not args.keep_ties, args.score_field, report)
        progress = Progress("tokenizing", partial(print, file=sys.stderr), unit="rows")
        for _, chunk, lengths, part, cut, span in _encoded_chunks(
            stream,
            tok,
            args.max_length,
            args.max_prompt_length,
            args.include_header,
            args.min_responses,
            not args.keep_ties,
        ):
            seq_lens.append(lengths)
            per_group.append([len(g.responses) for g in chunk])
            spans.append(span)
            if writer is not None:
                writer.add(part)
            reports.append(cut)
            progress(report.read, total)
    except BaseException as e:  # nothing half-written is left in the cache folder
        if writer is not None:
            writer.abort()
        if not isinstance(e, (OSError, ValueError)):  # DataError is a ValueError: one line below
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    cut = _merge_reports(reports, _tokenized_source(args.max_length, args.max_prompt_length))

    seq_lens = np.concatenate(seq_lens) if seq_lens else np.zeros(0, np.int64)
    per_group = np.array([k for ks in per_group for k in ks], dtype=np.int64)
    firsts = np.cumsum(1 + per_group) - (1 + per_group)  # each group's prompt among the sequences
    is_prompt = np.zeros(len(seq_lens), bool)
    is_prompt[firsts] = True
    prompt_lens, response_lens = seq_lens[firsts], seq_lens[~is_prompt]
    group_of = np.repeat(np.arange(len(per_group)), per_group)  # each response's group
    longest = np.zeros(len(per_group), np.int64)
    np.maximum.at(longest, group_of, response_lens)
    group_lens = np.add.reduceat(seq_lens, firsts) if len(firsts) else np.zeros(0, np.int64)

    def pct(xs):
        q = np.percentile(xs, [50, 90, 95, 99]) if len(xs) else [0] * 4
        return "p50 {:.0f}  p90 {:.0f}  p95 {:.0f}  p99 {:.0f}  max {}".format(*q, int(max(xs, default=0)))

    k = Counter(per_group.tolist())
    print(
        f"tokenizer: template {tok.template}, bos {tok.bos_id}, eos {tok.eos_id}, stop ids {sorted(tok.stop_ids)}, "
        f"vocab {tok.vocab_size}"
    )
    print(report.summary())
    print(f"groups: {len(per_group)}, responses: {len(response_lens)}")
    print("responses per group: " + ", ".join(f"{n}: {k[n]}" for n in sorted(k)))
    print(f"{'prompt tokens:':28}" + pct(prompt_lens))
    print(f"{'response tokens:':28}" + pct(response_lens))
    print(f"{'prompt + longest response:':28}" + pct(prompt_lens + longest))
    print(f"{'prompt + all responses:':28}" + pct(group_lens))
    if cut.cut_texts:
        print(
            f"{cut.cut_texts} texts were cut to the character bound of max_length / max_prompt_length before "
            "tokenizing (as train.py cuts them): their token counts above are lower bounds, all over the budget"
        )
    nothing_cut = not (cut.skipped or cut.truncated_prompts or cut.truncated_responses)
    print(
        f"truncation to max_length {args.max_length}, max_prompt_length {args.max_prompt_length}: nothing cut"
        if nothing_cut
        else cut.summary()
    )
    if writer is None:
        return
    path = writer.finish(f"{report.summary()}\n{cut.summary()}", _merge_spans(spans))
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    print(
        f"cache: {path} ({size / 2**20:.1f} MiB); train.py with the same data, tokenizer and settings "
        f"(and --cache_dir {cache_dir} if not the default) reads it"
    )


if __name__ == "__main__":
    main()
