"""
Preference data for MPPO: read groups of (prompt, responses, scores), tokenize them with a
checkpoint's chat template, and batch them deterministically across DDP ranks.

A group is one prompt with K >= 2 scored responses; K may differ from group to group. The
canonical file format is JSONL, one group per line:

    {"prompt": "What is 2+2?", "responses": ["4", "5"], "scores": [9.0, 2.0]}
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], ...}

read_groups() also reads the formats people already have, detected from the keys of each file's
first row (or named with format=):

    canonical      prompt, responses, scores
    simpo          prompt, all_generated_responses, all_rm_scores  (SimPO's on-policy sets,
                   princeton-nlp/llama3-ultrafeedback-armorm: every response and its reward, preferred
                   over the chosen/rejected pair the same rows carry)
    ultrafeedback  instruction, completions[].response, completions[].overall_score  (raw openbmb/UltraFeedback)
    pairwise       prompt, chosen, rejected [, score_chosen/score_rejected or Argilla's chosen-rating/
                   rejected-rating or chosen_rating/rejected_rating]  (e.g. HuggingFaceH4/ultrafeedback_binarized)
    nectar         prompt ("\\n\\nHuman: ...\\n\\nAssistant:"), answers[].answer, answers[].rank  (berkeley-nest/Nectar)
    single         prompt, response and numeric fields, one response per row, grouped by prompt; the score
                   is the field named by score_field=  (nvidia/HelpSteer2: helpfulness, correctness, ...)
    rrhf           query, responses, scores

A data argument is a file, a folder (every data file under it, as `huggingface-cli download
--repo-type dataset --local-dir D` leaves them), a glob, or a list of these; see data_files().
Files are JSON Lines or a JSON list (told from the content, whatever the extension), either one
gzipped (.jsonl.gz, .json.gz), or Parquet (through pyarrow, an optional dependency).

A structural problem (broken JSON, a missing or mistyped field, responses and scores of different
lengths, a non-finite score) is a DataError naming the file, line (or row) and field; a
well-formed row that cannot be trained on is skipped and counted, never dropped silently. Print
the statistics of a data set before training with

    python data.py --model path/to/checkpoint --data train.jsonl --max_length 2048 --max_prompt_length 1800

Uses tokenizers, numpy and the standard library: no torch, no transformers. The Llama 3, Llama
3.1-3.3 and ChatML chat templates are rendered in plain Python (and checked against transformers
in test_data.py); any other template is rendered with jinja2 when it is installed.
"""

import glob
import gzip
import json
import math
import numbers
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial

import numpy as np
from tokenizers import Tokenizer

from cli import ArgumentParser

# -----------------------------------------------------------------------------
# Reading groups


class DataError(ValueError):
    """A structural problem in a data file. The message is one line: "FILE:LINE: field 'x': problem"."""


class MissingDataError(DataError, FileNotFoundError):
    """A data argument that names no data file (an OSError too, as a missing file is)."""


@dataclass
class Group:
    prompt: str | list[dict]  # a string is one user message; else {"role", "content"} messages, earlier turns included
    # (a conversation of a single user message is stored as its string: the two render identically)
    responses: list[str]  # candidate answers to the prompt
    scores: list[float]  # one per response, higher is better
    line: int | str  # 1-based line of a JSONL file, 0-based index of a JSON list element or Parquet row;
    # "FILE:N" when the data set spans several files


# Reasons a well-formed row is skipped (or a completion dropped); Report counts each one.
FEW_RESPONSES = "fewer than {} responses"
EQUAL_SCORES = "all scores equal"
EMPTY_RESPONSE = "an empty response"
PROMPT_FILLS = "prompt fills max_length"
UNRATED = "UltraFeedback completions without a usable rating"


@dataclass
class Report:
    """What reading or tokenizing a data set kept, skipped and cut; summary() is the printable form."""

    source: str  # the data set (or step) this report is about
    rows: int = 0  # rows (groups) that came in
    kept: int = 0  # groups that went out
    skipped: dict[str, list] = field(default_factory=dict)  # reason -> line of every skipped row
    dropped: dict[str, list] = field(default_factory=dict)  # reason -> line, once per dropped completion
    truncated_prompts: int = 0  # prompts cut to max_prompt_length (their end kept)
    truncated_responses: int = 0  # responses cut to fit max_length
    cut_texts: int = 0  # texts so long they were cut to a character bound before tokenizing (also truncated)

    def skip(self, reason: str, line):
        self.skipped.setdefault(reason, []).append(line)

    def summary(self, first: int = 5) -> str:
        def lines(ls):
            shown = ", ".join(map(str, ls[:first]))
            return f"lines {shown}" + (", ..." if len(ls) > first else "")

        out = [f"{self.source}: {self.rows} groups in, {self.kept} kept"]
        for reason, ls in self.skipped.items():
            out.append(f"  skipped {len(ls)}: {reason} ({lines(ls)})")
        for reason, ls in self.dropped.items():
            out.append(f"  dropped {len(ls)} {reason} ({lines(list(dict.fromkeys(ls)))})")
        if self.truncated_prompts or self.truncated_responses:
            out.append(f"  truncated {self.truncated_prompts} prompts, {self.truncated_responses} responses")
        if self.cut_texts:
            out.append(f"  of which {self.cut_texts} texts were cut to a character bound before tokenizing")
        return "\n".join(out)

    __str__ = summary


def _typename(x) -> str:
    return "null" if x is None else {dict: "object", list: "list", str: "string", bool: "bool"}.get(type(x), type(x).__name__)


def _is_number(x) -> bool:
    # numbers.Real takes numpy's scalars too (Parquet read through pandas gives np.float32, np.int64)
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _as_list(x):
    """x as a list if it is a sequence a reader produces (a JSON list, a tuple, a numpy array), else None."""
    return list(x) if isinstance(x, (list, tuple, np.ndarray)) else None


def _get(row: dict, key: str, where: str):
    if key not in row:
        raise DataError(f"{where}: field '{key}': missing (row has {', '.join(map(repr, row)) or 'no fields'})")
    return row[key]


def _text(x, where: str, name: str) -> str:
    if not isinstance(x, str):
        raise DataError(f"{where}: field '{name}': expected a string, got {_typename(x)}")
    return str(x)


def _texts(x, where: str, name: str) -> list[str]:
    xs = _as_list(x)
    if xs is None:
        raise DataError(f"{where}: field '{name}': expected a list of strings, got {_typename(x)}")
    return [_text(t, where, f"{name}[{i}]") for i, t in enumerate(xs)]


def _score(x, where: str, name: str) -> float:
    if not _is_number(x):
        raise DataError(f"{where}: field '{name}': expected a number, got {_typename(x)}")
    if not math.isfinite(x):
        raise DataError(f"{where}: field '{name}': score is {float(x)}, not a finite number")
    return float(x)


def _scores(x, where: str, name: str, n: int) -> list[float]:
    xs = _as_list(x)
    if xs is None:
        raise DataError(f"{where}: field '{name}': expected a list of numbers, got {_typename(x)}")
    if len(xs) != n:
        raise DataError(f"{where}: field '{name}': {len(xs)} scores for {n} responses")
    return [_score(s, where, f"{name}[{i}]") for i, s in enumerate(xs)]


def _member(obj: dict, key: str, where: str, name: str):
    if key not in obj:
        raise DataError(f"{where}: field '{name}.{key}': missing")
    return obj[key]


def _messages(x, where: str, name: str) -> list[dict]:
    xs = _as_list(x)
    if xs is None:
        raise DataError(f"{where}: field '{name}': expected a list of messages, got {_typename(x)}")
    if not xs:
        raise DataError(f"{where}: field '{name}': empty conversation")
    out = []
    for i, m in enumerate(xs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: field '{name}[{i}]': expected a message object, got {_typename(m)}")
        # Parquet gives every message every key of the column's schema, so an absent tool call is a null
        if m.get("tool_calls") is not None and len(m["tool_calls"]):
            raise DataError(f"{where}: field '{name}[{i}].tool_calls': conversations with tool calls are not supported")
        role = _text(_member(m, "role", where, f"{name}[{i}]"), where, f"{name}[{i}].role")
        content = _text(_member(m, "content", where, f"{name}[{i}]"), where, f"{name}[{i}].content")
        out.append({"role": role, "content": content})
    return out


def _prompt(x, where: str, name: str) -> str | list[dict]:
    if isinstance(x, str):
        return str(x)
    if _as_list(x) is not None:
        return _simplify(_messages(x, where, name))
    raise DataError(f"{where}: field '{name}': expected a string or a list of messages, got {_typename(x)}")


def _simplify(conversation: list[dict]) -> str | list[dict]:
    # A lone user message and a plain string render identically with every chat template; keeping
    # the string lets raw-text (template 'none') training use pairwise sets that store message lists.
    if len(conversation) == 1 and conversation[0]["role"] == "user":
        return conversation[0]["content"]
    return conversation


# A parser turns one row into (prompt, responses, scores, number of completions it dropped).


def _parse_canonical(row, where):
    prompt = _prompt(_get(row, "prompt", where), where, "prompt")
    responses = _texts(_get(row, "responses", where), where, "responses")
    return prompt, responses, _scores(_get(row, "scores", where), where, "scores", len(responses)), 0


def _parse_simpo(row, where):
    prompt = _prompt(_get(row, "prompt", where), where, "prompt")
    responses = _texts(_get(row, "all_generated_responses", where), where, "all_generated_responses")
    return prompt, responses, _scores(_get(row, "all_rm_scores", where), where, "all_rm_scores", len(responses)), 0


def _parse_rrhf(row, where):
    prompt = _prompt(_get(row, "query", where), where, "query")
    responses = _texts(_get(row, "responses", where), where, "responses")
    return prompt, responses, _scores(_get(row, "scores", where), where, "scores", len(responses)), 0


def _rating(c: dict, key: str, where: str, name: str) -> float | None:
    """An UltraFeedback rating, or None when it is absent or not given ("N/A", null, NaN)."""
    x = c.get(key)
    if x is None or (_is_number(x) and math.isnan(x)):
        return None
    if isinstance(x, str):
        if x.strip().upper() == "N/A":
            return None
        try:
            x = float(x)  # some exports store ratings as strings: "7.5"
        except ValueError:
            raise DataError(f"{where}: field '{name}.{key}': expected a number or \"N/A\", got {json.dumps(x)}") from None
    return _score(x, where, f"{name}.{key}")


def _parse_ultrafeedback(row, where):
    """Raw openbmb/UltraFeedback. A group is scored by `overall_score` (1-10) when every completion
    has one; otherwise by `fine-grained_score` (the mean of the 1-5 aspect ratings) times 2, so that
    both lie on 1-10 and one group never mixes the two judgements. A completion with no usable rating
    in the field chosen ("N/A") is dropped from its group and counted in the report."""
    prompt = _prompt(_get(row, "instruction", where), where, "instruction")
    completions = _as_list(_get(row, "completions", where))
    if completions is None:
        raise DataError(f"{where}: field 'completions': expected a list, got {_typename(row['completions'])}")
    responses, overall, fine = [], [], []
    for i, c in enumerate(completions):
        name = f"completions[{i}]"
        if not isinstance(c, dict):
            raise DataError(f"{where}: field '{name}': expected an object, got {_typename(c)}")
        responses.append(_text(_member(c, "response", where, name), where, f"{name}.response"))
        if "overall_score" not in c and "fine-grained_score" not in c:
            raise DataError(f"{where}: field '{name}.overall_score': missing (and no 'fine-grained_score' either)")
        overall.append(_rating(c, "overall_score", where, name))
        f = _rating(c, "fine-grained_score", where, name)
        fine.append(None if f is None else 2 * f)
    scores = overall if all(s is not None for s in overall) else fine
    keep = [i for i, s in enumerate(scores) if s is not None]
    return prompt, [responses[i] for i in keep], [scores[i] for i in keep], len(completions) - len(keep)


# The score fields of pairwise sets: the binarized UltraFeedback sets' names, then Argilla's two spellings.
PAIR_SCORE_FIELDS = [("score_chosen", "score_rejected"), ("chosen-rating", "rejected-rating"), ("chosen_rating", "rejected_rating")]


def _parse_pairwise(row, where):
    """chosen/rejected as strings (with a `prompt`), or as conversations ending in the assistant's
    answer, whose earlier turns are the prompt. Scores from the first pair of PAIR_SCORE_FIELDS the
    row has (both of a pair required), else 1 and 0."""
    chosen, rejected = _get(row, "chosen", where), _get(row, "rejected", where)
    if _as_list(chosen) is not None:
        convs = {"chosen": _messages(chosen, where, "chosen"), "rejected": _messages(rejected, where, "rejected")}
        for name, conv in convs.items():
            if conv[-1]["role"] != "assistant":
                raise DataError(f"{where}: field '{name}[{len(conv) - 1}].role': the last message is '{conv[-1]['role']}', expected 'assistant'")
        if convs["chosen"][:-1] != convs["rejected"][:-1]:
            raise DataError(f"{where}: field 'rejected': its turns before the answer differ from those of 'chosen'")
        history = convs["chosen"][:-1]
        prompt = _simplify(history) if history else _prompt(_get(row, "prompt", where), where, "prompt")
        responses = [convs["chosen"][-1]["content"], convs["rejected"][-1]["content"]]
    else:
        prompt = _prompt(_get(row, "prompt", where), where, "prompt")
        responses = [_text(chosen, where, "chosen"), _text(rejected, where, "rejected")]
    scores = [1.0, 0.0]
    for pair in PAIR_SCORE_FIELDS:
        if any(k in row for k in pair):
            scores = [_score(_get(row, k, where), where, k) for k in pair]
            break
    return prompt, responses, scores, 0


def _nectar_prompt(text: str, where: str) -> str | list[dict]:
    """Nectar's (Anthropic HH's) "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nAssistant:" transcript as messages:
    Human turns become user messages, Assistant turns assistant messages (each stripped), and the final
    empty Assistant turn is the place of the answer. A prompt without these markers is plain text."""
    parts = re.split(r"(?:^|\n\n)(Human|Assistant):", text)
    if len(parts) == 1:
        return text
    roles, contents = parts[1::2], parts[2::2]
    problem = None
    if parts[0].strip():
        problem = "text before the first 'Human:' turn"
    elif roles[-1] != "Assistant" or contents[-1].strip():
        problem = "it does not end with an empty 'Assistant:' turn"
    elif any(r != ("Human", "Assistant")[i % 2] for i, r in enumerate(roles)):
        problem = "its turns do not alternate Human, Assistant"
    if problem:
        raise DataError(f"{where}: field 'prompt': {problem}")
    return _simplify([{"role": "user" if r == "Human" else "assistant", "content": c.strip()} for r, c in zip(roles[:-1], contents[:-1])])


def _parse_nectar(row, where):
    """berkeley-nest/Nectar: K answers ranked 1 (best) to K. Rank r becomes the score (K - r) / (K - 1):
    1 for the best, 0 for the worst, evenly spaced, so the pair-wise losses see the ranking and the
    point-wise ones get [0, 1] as they need (reading the ordinal ranks as evenly spaced)."""
    prompt = _nectar_prompt(_text(_get(row, "prompt", where), where, "prompt"), where)
    answers = _as_list(_get(row, "answers", where))
    if answers is None:
        raise DataError(f"{where}: field 'answers': expected a list, got {_typename(row['answers'])}")
    responses, scores, k = [], [], len(answers)
    for i, a in enumerate(answers):
        name = f"answers[{i}]"
        if not isinstance(a, dict):
            raise DataError(f"{where}: field '{name}': expected an object, got {_typename(a)}")
        responses.append(_text(_member(a, "answer", where, name), where, f"{name}.answer"))
        rank = _score(_member(a, "rank", where, name), where, f"{name}.rank")
        if not 1 <= rank <= k:
            raise DataError(f"{where}: field '{name}.rank': rank {rank:g} outside 1..{k}")
        scores.append((k - rank) / (k - 1) if k > 1 else 1.0)
    return prompt, responses, scores, 0


def _parse_single(row, where, score_field=None):
    """One response per row (nvidia/HelpSteer2: prompt, response, helpfulness, correctness, ...); read_groups
    gathers the rows of one prompt into a group. The score is the numeric field score_field names."""
    prompt = _prompt(_get(row, "prompt", where), where, "prompt")
    response = _text(_get(row, "response", where), where, "response")
    if score_field is None:
        fields = [k for k, v in row.items() if _is_number(v)]
        raise DataError(f"{where}: rows of one response each need the field to score by: pass score_field "
                        f"(--score_field) one of {', '.join(fields) or '(no numeric field found)'}")
    return prompt, [response], [_score(_get(row, score_field, where), where, score_field)], 0


PARSERS = {
    "canonical": _parse_canonical,
    "simpo": _parse_simpo,
    "ultrafeedback": _parse_ultrafeedback,
    "pairwise": _parse_pairwise,
    "nectar": _parse_nectar,
    "single": _parse_single,
    "rrhf": _parse_rrhf,
}
GROUPED_BY_PROMPT = {"single"}  # formats whose rows are gathered into groups by their prompt


def detect_format(row: dict) -> str | None:
    """The format a row's keys identify, or None. SimPO rows also carry chosen/rejected, so they go first."""
    keys = set(row)
    if "all_generated_responses" in keys:
        return "simpo"
    if {"instruction", "completions"} <= keys:
        return "ultrafeedback"
    if {"query", "responses"} <= keys:
        return "rrhf"
    if {"chosen", "rejected"} <= keys:
        return "pairwise"
    if {"prompt", "responses"} <= keys:
        return "canonical"
    if {"prompt", "answers"} <= keys:
        return "nectar"
    if {"prompt", "response"} <= keys:
        return "single"
    return None


def _unusable(responses: list[str], scores: list[float], min_responses: int, require_preference: bool = True) -> str | None:
    """Why a well-formed group cannot be trained on, or None."""
    if len(responses) < min_responses:
        return FEW_RESPONSES.format(min_responses)
    if any(not r.strip() for r in responses):
        return EMPTY_RESPONSE
    # min_responses=1 asks for demonstrations (SFT), which need no preference between responses; the
    # point-wise losses learn from each score alone, so they can keep ties (require_preference=False)
    if require_preference and min_responses >= 2 and min(scores) == max(scores):
        return EQUAL_SCORES
    return None


# -----------------------------------------------------------------------------
# Data files


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")


def data_files(spec: str | list[str]) -> list[str]:
    """The data files a data argument names, in order: a file as given; a folder's data files
    (DATA_SUFFIXES) at any depth, sorted, skipping hidden files and folders (.cache, .gitattributes)
    and the rest (README.md); a glob's matches, sorted (folders among them expanded the same way);
    a list, each item in turn. Raises DataError when an item names no data file."""
    out = []
    for item in [spec] if isinstance(spec, str) else list(spec):
        if os.path.isfile(item):
            out.append(item)
        elif os.path.isdir(item):
            found = _folder_files(item)
            if not found:
                raise MissingDataError(f"{item}: no data files ({', '.join(DATA_SUFFIXES)}) in this folder")
            out += found
        elif glob.has_magic(item) and glob.glob(item, recursive=True):
            for match in sorted(glob.glob(item, recursive=True)):
                out += _folder_files(match) if os.path.isdir(match) else [match]
        else:
            raise MissingDataError(f"no such data file: {item}")
    if not out:
        raise MissingDataError(f"no data files in {spec}")
    return out


def _folder_files(folder: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # pruned in place: os.walk skips them
        out += [os.path.join(root, f) for f in files if not f.startswith(".") and f.endswith(DATA_SUFFIXES)]
    return sorted(out)


def _rows(path: str):
    """Yield (where, line, row) for every row of a data file: JSON Lines (1-based line numbers, blank
    lines ignored) or a JSON list (0-based element indices), told apart by the first character, either
    one gzipped; or Parquet (0-based row indices). The kind is read from the file's first bytes."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PAR1":
        yield from _parquet_rows(path)
        return
    opener = gzip.open if magic[:2] == b"\x1f\x8b" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            yield from _json_rows(path, f)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except (OSError, EOFError) as e:  # a truncated or corrupt .gz
        raise DataError(f"{path}: cannot read: {e}") from None


def _json_rows(path: str, f):
    first = ""
    while not first:
        ch = f.read(1)
        if not ch or not ch.isspace():
            first = ch or "EOF"
    f.seek(0)
    if first == "[":
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        for i, row in enumerate(data):
            yield f"{path}: element {i}", i, row
        return
    seen = False
    for n, text in enumerate(f, 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            if first == "{" and not seen:
                _refuse_single_object(path, f)
            raise DataError(f"{path}:{n}: invalid JSON: {e.msg} (column {e.colno})") from None
        seen = True
        yield f"{path}:{n}", n, row


def _refuse_single_object(path: str, f):
    """A file whose first line is not a JSON row may hold one pretty-printed JSON object: say so."""
    f.seek(0)
    try:
        obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return
    if isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON list of rows or JSON Lines, got one JSON object (fields {', '.join(map(repr, obj))})")


def _parquet_rows(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        i = 0
        for batch in batches:
            for row in batch.to_pylist():  # plain Python values: lists of dicts for messages, None for nulls
                yield f"{path}: row {i}", i, row
                i += 1
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: cannot read Parquet: {str(e).splitlines()[0]}") from None


def read_groups(spec: str | list[str], format: str | None = None, min_responses: int = 2, require_preference: bool = True,
                score_field: str | None = None) -> tuple[list[Group], Report]:
    """Read every group of a data set (one file, a folder, a glob or a list: see data_files) as one
    set; see the module docstring for the formats, detected per file unless format= names one.

    A structural problem raises DataError naming the file, line and field. A well-formed row that
    cannot be trained on (fewer than min_responses responses, an empty response, all scores equal
    when min_responses >= 2 and require_preference) is skipped and counted in the returned Report.
    score_field names the score of the 'single' format (rows of one response each)."""
    if format is not None and format not in PARSERS:
        raise ValueError(f"unknown data format {format!r}; choose one of {', '.join(PARSERS)}")
    paths = data_files(spec)
    several = len(paths) > 1
    report, formats = Report(source=spec if isinstance(spec, str) else ", ".join(spec)), []
    entries, by_prompt = [], {}  # entries: [line, prompt, responses, scores]; by_prompt: grouped formats' index
    for path in paths:
        fmt = format
        for where, line, row in _rows(path):
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {_typename(row)}")
            if fmt is None:
                fmt = detect_format(row)
                if fmt is None:
                    raise DataError(f"{where}: cannot tell the format from the fields {sorted(row)}; pass format= one of {', '.join(PARSERS)}")
                formats.append(fmt)
            if score_field is not None and fmt not in GROUPED_BY_PROMPT:
                raise DataError(f"{where}: score_field applies to rows of one response each, but this file is in format {fmt!r}")
            parse = partial(PARSERS[fmt], score_field=score_field) if fmt in GROUPED_BY_PROMPT else PARSERS[fmt]
            prompt, responses, scores, dropped = parse(row, where)
            label = f"{path}:{line}" if several else line
            if dropped:
                report.dropped.setdefault(UNRATED, []).extend([label] * dropped)
            if fmt in GROUPED_BY_PROMPT:
                key = json.dumps(prompt, sort_keys=True)
                if key in by_prompt:
                    entry = by_prompt[key]
                    entry[2].extend(responses)
                    entry[3].extend(scores)
                    continue
                by_prompt[key] = [label, prompt, responses, scores]
                entries.append(by_prompt[key])
            else:
                entries.append([label, prompt, responses, scores])
    if not entries:
        raise DataError(f"{report.source}: no rows")
    groups = []
    for label, prompt, responses, scores in entries:
        reason = _unusable(responses, scores, min_responses, require_preference)
        if reason:
            report.skip(reason, label)
        else:
            groups.append(Group(prompt, responses, scores, label))
    report.source += (f" ({len(paths)} files, " if several else " (") + ", ".join(dict.fromkeys(formats)) + ")"
    report.rows, report.kept = len(entries), len(groups)
    return groups, report


# -----------------------------------------------------------------------------
# Chat templates: Llama 3, Llama 3.1-3.3 and ChatML rendered in plain Python (the tokenizers library
# has no Jinja); any other template through jinja2, when it is installed


class CheckpointError(ValueError):
    """A problem in a checkpoint's tokenizer files or chat template; the message is one line naming it."""


TEMPLATES = ("llama3", "llama3.1", "chatml", "jinja", "none")
# Per template: the text that opens the assistant's turn and the token that ends every turn.
LLAMA_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
ASSISTANT_HEADER = {"llama3": LLAMA_HEADER, "llama3.1": LLAMA_HEADER, "chatml": "<|im_start|>assistant\n"}
END_OF_TURN = {"llama3": "<|eot_id|>", "llama3.1": "<|eot_id|>", "chatml": "<|im_end|>"}
LLAMA_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
REQUIRED_TOKENS = {"llama3": LLAMA_TOKENS, "llama3.1": LLAMA_TOKENS, "chatml": ("<|im_start|>", "<|im_end|>")}
LLAMA31_DATE = "26 Jul 2024"  # the date Llama 3.1's template writes, and 3.2's when strftime_now is missing


def detect_template(text: str | None) -> str:
    """The format a Jinja chat template renders, from its text: 'llama3.1' for Llama 3.1-3.3 (a system
    header with 'Cutting Knowledge Date'), 'llama3', 'chatml', 'jinja' for any other, 'none' without one."""
    if not text:
        return "none"
    if "<|start_header_id|>" in text:
        return "llama3.1" if "Cutting Knowledge Date" in text else "llama3"
    if "<|im_start|>" in text:
        return "chatml"
    return "jinja"


def llama31_date(text: str | None, date_string: str | None = None, now: datetime | None = None) -> str:
    """The "Today Date" a Llama 3.1-3.3 template writes, as transformers renders it: date_string when
    given; today (strftime_now("%d %b %Y")) when the template asks strftime_now, as 3.2 and 3.3 do;
    else the date the template sets (3.1: "26 Jul 2024")."""
    if date_string is not None:
        return date_string
    if "strftime_now" in (text or ""):
        return (now or datetime.now()).strftime("%d %b %Y")
    m = re.search(r"set date_string = [\"']([^\"']*)[\"']", text or "")
    return m[1] if m else LLAMA31_DATE


def chatml_default_system(text: str | None) -> str | None:
    """The system message a ChatML template inserts when the conversation has none (Qwen's
    "You are a helpful assistant."), read from the string literal that holds it; None if it adds none."""
    m = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"]*?)<\|im_end\|>", text or "")
    if m is None:
        return None
    return re.sub(r"\\(.)", lambda e: {"n": "\n", "t": "\t"}.get(e[1], e[1]), m[1])  # Jinja string escapes


def compile_jinja(text: str, now: datetime):
    """A chat template compiled the way transformers compiles it (sandboxed, trim_blocks, lstrip_blocks,
    loop controls, raise_exception, strftime_now, a tojson that keeps non-ASCII text and takes indent),
    with strftime_now frozen at `now` so one run renders every prompt alike."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise CheckpointError("the chat template is neither Llama 3 nor ChatML, and rendering it needs jinja2 "
                              "(pip install jinja2); or pass --template llama3, chatml or none") from None

    class Generation(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %}, which marks the assistant's text for transformers'
        assistant masks, renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = now.strftime
    try:
        return env.from_string(text)
    except jinja2.TemplateError as e:
        raise CheckpointError(f"the chat template does not compile: {e}") from None


class ChatTokenizer:
    """A `tokenizers.Tokenizer` plus the chat format of one checkpoint.

    Prompts and responses are rendered to text exactly as transformers' apply_chat_template renders
    the checkpoint's template (with its defaults), then tokenized without the post-processor's special
    tokens (as apply_chat_template does), so a prompt has exactly one BOS even when the post-processor
    adds one. Llama 3, Llama 3.1-3.3 and ChatML are rendered in Python; any other template ('jinja')
    through jinja2, the response being what rendering prompt + response adds to the prompt's rendering.

    The prompt is tokenized on its own, exactly as the model sees it when generating, and so is each
    response. With the pre-tokenizers of Llama 3 and Qwen, which make a run of newlines a piece of
    its own, the two concatenate to apply_chat_template of the whole conversation: the Llama 3
    header ends in "\\n\\n" and the content is stripped, so no token spans the boundary; for ChatML
    the same holds unless a response starts with a newline. (GPT-2's byte-level split cuts
    "\\n\\nText" into "\\n" "\\n" "Text" but keeps a final "\\n\\n" whole, so there the two differ
    at the boundary.) What a template writes after the response's last stop token (ChatML's "\\n"
    after <|im_end|>) is not scored: the model stops there and never generates it."""

    def __init__(self, tokenizer: Tokenizer, template: str, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, default_system: str | None = None, add_bos: bool | None = None,
                 extra_stop_ids=(), chat_template: str | None = None, date_string: str | None = None,
                 template_vars: dict | None = None):
        if template not in TEMPLATES:
            raise ValueError(f"unknown chat template {template!r}; choose one of {', '.join(TEMPLATES)}")
        for t in REQUIRED_TOKENS.get(template, ()):
            if tokenizer.token_to_id(t) is None:
                raise ValueError(f"template {template!r} needs the token {t}, which the tokenizer lacks")
        if template == "jinja" and not chat_template:
            raise ValueError("template 'jinja' renders the checkpoint's chat template, and this checkpoint has none")
        self.tokenizer, self.template, self.default_system = tokenizer, template, default_system
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = self._token_id(bos_token)
        self.eos_id = self._token_id(eos_token)
        if self.eos_id is None:
            raise ValueError("the tokenizer has no eos token (looked in tokenizer_config.json, special_tokens_map.json, generation_config.json)")
        self.pad_id = self._token_id(pad_token) if pad_token is not None else self.eos_id
        # Llama 3 starts every prompt with <|begin_of_text|>; a ChatML template writes bos_token only
        # if it says so (Qwen's do not); a raw-text prompt gets one if the tokenizer has one; a Jinja
        # template writes it itself.
        self.add_bos = (template not in ("chatml", "jinja")) if add_bos is None else add_bos
        self.add_bos = self.add_bos and self.bos_id is not None
        self.stop_ids = {self.eos_id, *extra_stop_ids}
        if template in END_OF_TURN:
            self.stop_ids.add(tokenizer.token_to_id(END_OF_TURN[template]))
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        # The most characters one token can stand for: no token spans more, which bounds how much text
        # max_length tokens can cover (see tokenize_groups). Byte-level BPE spells each byte as one
        # character, so a token's spelling is never shorter than the text it covers.
        self.max_token_chars = max(map(len, tokenizer.get_vocab(with_added_tokens=True)), default=1)
        now = datetime.now()  # read once: a run that crosses midnight renders every prompt alike
        self.date_string = llama31_date(chat_template, date_string, now) if template == "llama3.1" else date_string
        self.template_vars = {k: v for k, v in (template_vars or {}).items() if v is not None}
        if date_string is not None:
            self.template_vars["date_string"] = date_string
        self.jinja = compile_jinja(chat_template, now) if template == "jinja" else None

    def _token_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        ids = self.tokenizer.encode(token, add_special_tokens=False).ids
        if len(ids) != 1:
            raise ValueError(f"special token {token!r} is not a single token of the tokenizer")
        return ids[0]

    @classmethod
    def from_pretrained(cls, model_dir: str, template: str | None = None, date_string: str | None = None) -> "ChatTokenizer":
        """Load tokenizer.json and the special tokens and chat template of a Hugging Face checkpoint
        directory. template=None detects the format from the template text (see detect_template);
        name one to override. date_string pins the "Today Date" of Llama 3.1-3.3 templates (and is
        passed to a Jinja template as transformers passes it), which 3.2 and 3.3 otherwise take from today."""

        def load(name):
            p = os.path.join(model_dir, name)
            if not os.path.isfile(p):
                return {}
            with open(p, encoding="utf-8") as f:
                try:
                    return json.load(f)
                except json.JSONDecodeError as e:
                    raise CheckpointError(f"{p}:{e.lineno}: invalid JSON: {e.msg}") from None

        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file (the checkpoint needs a fast tokenizer's tokenizer.json)")
        try:
            tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # the tokenizers library raises a bare Exception for a broken file
            raise CheckpointError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        config, gen = load("tokenizer_config.json"), load("generation_config.json")
        special = {**load("special_tokens_map.json"), **config}  # tokenizer_config.json wins, as in transformers

        def token(key):  # a special token is saved as a string or as an AddedToken dict
            v = special.get(key)
            return v.get("content") if isinstance(v, dict) else v

        chat_template = config.get("chat_template")
        if isinstance(chat_template, list):  # several named templates: the default one renders chats
            chat_template = next((t["template"] for t in chat_template if t.get("name") == "default"), None)
        jinja = os.path.join(model_dir, "chat_template.jinja")
        if os.path.isfile(jinja):  # newer transformers save the template here, and read it first
            with open(jinja, encoding="utf-8") as f:
                chat_template = f.read()

        def ids(v):
            return [] if v is None else [v] if isinstance(v, int) else list(v)

        # the variables apply_chat_template gives a template: the special tokens the config names
        template_vars = {k: token(k) for k in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")}
        bos, eos, pad = token("bos_token"), token("eos_token"), token("pad_token")
        if bos is None and ids(gen.get("bos_token_id")):
            bos = tokenizer.id_to_token(ids(gen["bos_token_id"])[0])
        if eos is None and ids(gen.get("eos_token_id")):
            eos = tokenizer.id_to_token(ids(gen["eos_token_id"])[0])
        template = template or detect_template(chat_template)
        return cls(tokenizer, template, bos_token=bos, eos_token=eos, pad_token=pad,
                   default_system=chatml_default_system(chat_template) if template == "chatml" else None,
                   add_bos=("bos_token" in (chat_template or "")) if template == "chatml" else None,
                   extra_stop_ids=ids(gen.get("eos_token_id")), chat_template=chat_template, date_string=date_string,
                   template_vars=template_vars)

    def _render_jinja(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.jinja.render(messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                                     **self.template_vars)
        except Exception as e:  # a template is a program: raise_exception, a type error, a missing key
            raise ValueError(f"the chat template failed on this conversation: {type(e).__name__}: {e}") from None

    def render_prompt(self, prompt: str | list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt as text, equal to apply_chat_template(messages, tokenize=False, add_generation_prompt=...);
        for template 'none', BOS and the raw text."""
        bos = self.bos_token if self.add_bos else ""
        if self.template == "none":
            if not isinstance(prompt, str):
                raise ValueError("template 'none' takes plain-text prompts, but this prompt is a conversation; choose a chat template")
            return bos + prompt
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if self.template == "jinja":
            return self._render_jinja(messages, add_generation_prompt)
        if self.template in ("llama3", "llama3.1"):
            head = ""
            if self.template == "llama3.1":  # the system turn always comes, dated, the user's system message after
                if any(m["role"] in ("tool", "ipython") for m in messages):
                    raise ValueError("conversations with tool results are not supported (Llama 3.1 renders them as tool calls)")
                system = ""
                if messages[0]["role"] == "system":
                    system, messages = messages[0]["content"].strip(), messages[1:]
                head = ("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                        f"Today Date: {self.date_string}\n\n{system}<|eot_id|>")
            turns = [head] + [f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages]
        else:
            if self.default_system is not None and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": self.default_system}, *messages]
            turns = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
        return bos + "".join(turns) + (ASSISTANT_HEADER[self.template] if add_generation_prompt else "")

    def render_response(self, text: str, include_header: bool = False, prompt: str | list[dict] | None = None) -> str:
        """A response as scored: its content and the end-of-turn token, the assistant header first
        with include_header=True (the SimPO code base scores it; it changes the mean log-prob p).
        A Jinja template needs the prompt: the response is what the template renders after it."""
        if self.template == "none":
            return text + self.eos_token
        if self.template == "jinja":
            return self._jinja_response(text, include_header, prompt)
        content = text if self.template == "chatml" else text.strip()  # the Llama 3 templates trim
        return (ASSISTANT_HEADER[self.template] if include_header else "") + content + END_OF_TURN[self.template]

    def _jinja_response(self, text: str, include_header: bool, prompt) -> str:
        if prompt is None:
            raise ValueError("a Jinja chat template renders a response only after its prompt: pass prompt=")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        head = self._render_jinja(messages, add_generation_prompt=not include_header)
        full = self._render_jinja(messages + [{"role": "assistant", "content": text}], add_generation_prompt=False)
        if not full.startswith(head):
            raise ValueError("the chat template renders prompt + response so that it does not begin with the prompt "
                             "as rendered for generation, so the response cannot be told apart; pass --template")
        tail = full[len(head):]
        stops = [s for s in (self.tokenizer.id_to_token(i) for i in self.stop_ids) if s and s in tail]
        if not stops:
            raise ValueError("the chat template ends the assistant's turn with no stop token "
                             f"({', '.join(sorted(self.tokenizer.id_to_token(i) for i in self.stop_ids))}), so generation would not stop")
        return tail[:max(tail.rfind(s) + len(s) for s in stops)]  # what follows the last stop token is never generated

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]  # in parallel

    def encode_prompt(self, prompt: str | list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_prompt(prompt, add_generation_prompt))

    def encode_response(self, text: str, include_header: bool = False, prompt: str | list[dict] | None = None) -> list[int]:
        return self.encode(self.render_response(text, include_header, prompt))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


# -----------------------------------------------------------------------------
# Tokenizing and truncating


@dataclass
class TokenizedGroup:
    prompt_ids: list[int]  # the rendered prompt, generation prompt included; one BOS first where the format has one
    response_ids: list[list[int]]  # each response as scored: content + end-of-turn token (cut to max_length)
    scores: list[float]  # one per response, higher is better
    line: int | str  # where the group came from in its data file (see Group.line)
    ref_logps: list[float] | None = None  # DPO: each response's mean log-prob under the starting model (train.py fills it)


def _truncate(prompt: list[int], responses: list[list[int]], max_length, max_prompt_length, bos_id):
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


def _char_bound(tok: ChatTokenizer, tokens: int) -> int:
    """Characters enough for more than `tokens` tokens of any text: no token spans more than
    tok.max_token_chars characters, so the first `tokens` tokens lie within tokens x max_token_chars
    characters, and twice that leaves room for the word that straddles the bound (which a cut could
    tokenize differently) and for normalizers that merge characters (NFC). A text this long still
    tokenizes to more than `tokens` tokens, so cutting it changes neither the kept tokens nor the counts."""
    return 2 * tokens * tok.max_token_chars


def _cut_prompt(text: str, bound: int, bos: str | None) -> str:
    head = bos if bos and text.startswith(bos) else ""
    return head + text[len(text) - bound:]  # the end, behind its BOS, as _truncate keeps


def tokenize_groups(groups: list[Group], tok: ChatTokenizer, max_length: int | None, max_prompt_length: int | None,
                    min_responses: int = 2, include_header: bool = False,
                    require_preference: bool = True, progress=None) -> tuple[list[TokenizedGroup], Report]:
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
        reason = _unusable(g.responses, g.scores, min_responses, require_preference)
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


def scale_scores(groups: list, score_range: tuple[float, float] | None = None) -> list:
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

    def __init__(self, groups: list, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
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
    def steps_per_epoch(self) -> int:
        return len(self.groups) // self.batch_size

    def order(self, epoch: int) -> np.ndarray:
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

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "num_groups": len(self.groups), "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict):
        for key in ("num_groups", "batch_size", "seed"):  # the order, and so the resume, depends on them
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ValueError(f"loader state has {key}={state[key]}, but this loader has {mine}: the epoch order would differ")
        if not 0 <= state["step"] <= self.steps_per_epoch:
            raise ValueError(f"loader state step {state['step']} outside 0..{self.steps_per_epoch}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def group_tokens(g: TokenizedGroup) -> int:
    """Tokens of a group laid out with its prompt once: prompt + every response."""
    return len(g.prompt_ids) + sum(map(len, g.response_ids))


def micro_batches(groups: list[TokenizedGroup], micro_batch_size: int, max_tokens: int | None = None) -> list[list[TokenizedGroup]]:
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
    parser = ArgumentParser(prog="data.py", description="Print the statistics of a preference data set under a checkpoint's tokenizer.")
    parser.add_argument("--model", required=True, help="checkpoint directory with tokenizer.json (and tokenizer_config.json)")
    parser.add_argument("--data", required=True, nargs="+",
                        help="data: files (.jsonl, .json, .parquet, .jsonl.gz, .json.gz), folders or globs, read as one set")
    parser.add_argument("--format", choices=list(PARSERS), default=None, help="data format (default: detected from each file's first row)")
    parser.add_argument("--score_field", default=None, help="the score of rows of one response each (format 'single'), e.g. helpfulness")
    parser.add_argument("--template", choices=TEMPLATES, default=None, help="chat format (default: detected from the chat template)")
    parser.add_argument("--date_string", default=None, help="the 'Today Date' of Llama 3.1-3.3 templates (default: as the template sets it)")
    parser.add_argument("--max_length", type=int, default=2048, help="token budget of prompt + one response")
    parser.add_argument("--max_prompt_length", type=int, default=1800, help="prompts longer than this keep their end")
    parser.add_argument("--min_responses", type=int, default=2, help="groups with fewer responses are skipped (1 for SFT)")
    parser.add_argument("--keep_ties", action="store_true", help="keep groups whose scores are all equal (the point-wise losses can use them)")
    parser.add_argument("--include_header", action="store_true", help="score the assistant header as part of each response")
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
    print(f"tokenizer: template {tok.template}, bos {tok.bos_id}, eos {tok.eos_id}, stop ids {sorted(tok.stop_ids)}, vocab {tok.vocab_size}")
    print(report.summary())
    print(f"groups: {len(full)}, responses: {sum(len(g.response_ids) for g in full)}")
    print("responses per group: " + ", ".join(f"{n}: {k[n]}" for n in sorted(k)))
    print(f"{'prompt tokens:':28}" + pct([len(g.prompt_ids) for g in full]))
    print(f"{'response tokens:':28}" + pct([len(r) for g in full for r in g.response_ids]))
    print(f"{'prompt + longest response:':28}" + pct([len(g.prompt_ids) + max(map(len, g.response_ids)) for g in full]))
    print(f"{'prompt + all responses:':28}" + pct([group_tokens(g) for g in full]))
    print(cut.summary() if cut.skipped or cut.truncated_prompts or cut.truncated_responses else f"{cut.source}: nothing cut")


if __name__ == "__main__":
    main()
