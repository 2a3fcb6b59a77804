"""
Dataset rows as the Hub ships them -> groups of (prompt, responses, scores): the format parsers,
their detection, reading files, folders, globs, Parquet and gzip, and the Report of what was kept.

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
well-formed row that cannot be trained on is skipped and counted, never dropped silently.
"""

import glob
import gzip
import json
import math
import numbers
import os
import re
from collections import deque
from dataclasses import dataclass, field
from functools import partial

import numpy as np

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
    read: int = 0  # rows read so far (progress while a data set is streamed: see iter_groups)
    kept: int = 0  # groups that went out
    skipped: dict[str, list] = field(default_factory=dict)  # reason -> line of every skipped row
    dropped: dict[str, list] = field(default_factory=dict)  # reason -> line, once per dropped completion
    truncated_prompts: int = 0  # prompts cut to max_prompt_length (their end kept)
    truncated_responses: int = 0  # responses cut to fit max_length
    cut_texts: int = 0  # texts so long they were cut to a character bound before tokenizing (also truncated)

    def skip(self, reason, line):
        self.skipped.setdefault(reason, []).append(line)

    def summary(self, first=5):
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


def _typename(x):
    names = {dict: "object", list: "list", str: "string", bool: "bool"}
    return "null" if x is None else names.get(type(x), type(x).__name__)


def _is_number(x):
    # numbers.Real takes numpy's scalars too (Parquet read through pandas gives np.float32, np.int64)
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _as_list(x):
    """x as a list if it is a sequence a reader produces (a JSON list, a tuple, a numpy array), else None."""
    return list(x) if isinstance(x, (list, tuple, np.ndarray)) else None


def _get(row, key, where):
    if key not in row:
        raise DataError(f"{where}: field '{key}': missing (row has {', '.join(map(repr, row)) or 'no fields'})")
    return row[key]


def _text(x, where, name):
    if not isinstance(x, str):
        raise DataError(f"{where}: field '{name}': expected a string, got {_typename(x)}")
    return str(x)


def _texts(x, where, name):
    xs = _as_list(x)
    if xs is None:
        raise DataError(f"{where}: field '{name}': expected a list of strings, got {_typename(x)}")
    return [_text(t, where, f"{name}[{i}]") for i, t in enumerate(xs)]


def _score(x, where, name):
    if not _is_number(x):
        raise DataError(f"{where}: field '{name}': expected a number, got {_typename(x)}")
    if not math.isfinite(x):
        raise DataError(f"{where}: field '{name}': score is {float(x)}, not a finite number")
    return float(x)


def _scores(x, where, name, n):
    xs = _as_list(x)
    if xs is None:
        raise DataError(f"{where}: field '{name}': expected a list of numbers, got {_typename(x)}")
    if len(xs) != n:
        raise DataError(f"{where}: field '{name}': {len(xs)} scores for {n} responses")
    return [_score(s, where, f"{name}[{i}]") for i, s in enumerate(xs)]


def _member(obj, key, where, name):
    if key not in obj:
        raise DataError(f"{where}: field '{name}.{key}': missing")
    return obj[key]


def _messages(x, where, name):
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


def _prompt(x, where, name):
    if isinstance(x, str):
        return str(x)
    if _as_list(x) is not None:
        return _simplify(_messages(x, where, name))
    raise DataError(f"{where}: field '{name}': expected a string or a list of messages, got {_typename(x)}")


def _simplify(conversation):
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


def _rating(c, key, where, name):
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
            raise DataError(
                f"{where}: field '{name}.{key}': expected a number or \"N/A\", got {json.dumps(x)}"
            ) from None
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
PAIR_SCORE_FIELDS = [
    ("score_chosen", "score_rejected"),
    ("chosen-rating", "rejected-rating"),
    ("chosen_rating", "rejected_rating"),
]


def _parse_pairwise(row, where):
    """chosen/rejected as strings (with a `prompt`), or as conversations ending in the assistant's
    answer, whose earlier turns are the prompt. Scores from the first pair of PAIR_SCORE_FIELDS the
    row has (both of a pair required), else 1 and 0."""
    chosen, rejected = _get(row, "chosen", where), _get(row, "rejected", where)
    if _as_list(chosen) is not None:
        convs = {"chosen": _messages(chosen, where, "chosen"), "rejected": _messages(rejected, where, "rejected")}
        for name, conv in convs.items():
            if conv[-1]["role"] != "assistant":
                raise DataError(
                    f"{where}: field '{name}[{len(conv) - 1}].role': "
                    f"the last message is '{conv[-1]['role']}', expected 'assistant'"
                )
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


def _nectar_prompt(text, where):
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
    turns = zip(roles[:-1], contents[:-1])
    return _simplify([{"role": "user" if r == "Human" else "assistant", "content": c.strip()} for r, c in turns])


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
        raise DataError(
            f"{where}: rows of one response each need the field to score by: pass score_field "
            f"(--score_field) one of {', '.join(fields) or '(no numeric field found)'}"
        )
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


def detect_format(row):
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


def unusable(responses, scores, min_responses, require_preference=True):
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


def data_files(spec):
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


def _folder_files(folder):
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # pruned in place: os.walk skips them
        out += [os.path.join(root, f) for f in files if not f.startswith(".") and f.endswith(DATA_SUFFIXES)]
    return sorted(out)


def _rows(path):
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


def _json_rows(path, f):
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


def _refuse_single_object(path, f):
    """A file whose first line is not a JSON row may hold one pretty-printed JSON object: say so."""
    f.seek(0)
    try:
        obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return
    if isinstance(obj, dict):
        raise DataError(
            f"{path}: expected a JSON list of rows or JSON Lines, "
            f"got one JSON object (fields {', '.join(map(repr, obj))})"
        )


def _parquet_rows(path):
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


def read_groups(spec, format=None, min_responses=2, require_preference=True, score_field=None):
    """Read every group of a data set (one file, a folder, a glob or a list: see data_files) as one
    set; see the module docstring for the formats, detected per file unless format= names one.

    A structural problem raises DataError naming the file, line and field. A well-formed row that
    cannot be trained on (fewer than min_responses responses, an empty response, all scores equal
    when min_responses >= 2 and require_preference) is skipped and counted in the returned Report.
    score_field names the score of the 'single' format (rows of one response each).
    Returns ([Group], Report); iter_groups gives the same groups one at a time."""
    report = Report(source="")
    groups = list(iter_groups(spec, format, min_responses, require_preference, score_field, report))
    return groups, report


def iter_groups(spec, format=None, min_responses=2, require_preference=True, score_field=None, report=None):
    """read_groups as a stream: yields the usable groups in the order read_groups lists them, as soon as each is
    complete, so a large data set never has all its texts in memory at once. Rows of a format gathered by prompt
    ('single') complete only when every file has been read, so from the first of them on the groups come at the
    end. report (a Report) is filled in as rows are read (report.read counts them) and is complete once the
    iterator is exhausted."""
    if format is not None and format not in PARSERS:
        raise ValueError(f"unknown data format {format!r}; choose one of {', '.join(PARSERS)}")
    paths = data_files(spec)
    several = len(paths) > 1
    report = Report(source="") if report is None else report
    report.source = spec if isinstance(spec, str) else ", ".join(spec)
    formats, rows = [], 0
    pending, by_prompt = deque(), {}  # pending: [line, prompt, responses, scores, open]; by_prompt: the open ones

    def complete(entry):
        label, prompt, responses, scores, _ = entry
        reason = unusable(responses, scores, min_responses, require_preference)
        if reason:
            report.skip(reason, label)
            return None
        report.kept += 1
        return Group(prompt, responses, scores, label)

    for path in paths:
        fmt = format
        for where, line, row in _rows(path):
            report.read += 1
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {_typename(row)}")
            if fmt is None:
                fmt = detect_format(row)
                if fmt is None:
                    raise DataError(
                        f"{where}: cannot tell the format from the fields {sorted(row)}; "
                        f"pass format= one of {', '.join(PARSERS)}"
                    )
                formats.append(fmt)
            if score_field is not None and fmt not in GROUPED_BY_PROMPT:
                raise DataError(
                    f"{where}: score_field applies to rows of one response each, but this file is in format {fmt!r}"
                )
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
                by_prompt[key] = [label, prompt, responses, scores, True]  # later rows may add to it
                pending.append(by_prompt[key])
            else:
                pending.append([label, prompt, responses, scores, False])
            rows += 1
            while pending and not pending[0][4]:  # everything before the first open group is final
                group = complete(pending.popleft())
                if group is not None:
                    yield group
    if not rows:
        raise DataError(f"{report.source}: no rows")
    while pending:
        group = complete(pending.popleft())
        if group is not None:
            yield group
    report.source += (f" ({len(paths)} files, " if several else " (") + ", ".join(dict.fromkeys(formats)) + ")"
    report.rows = rows


def count_rows(spec):
    """The number of rows in a data set's files, counted without parsing them (for progress), or None where that
    cannot be done cheaply (a JSON list file, Parquet without pyarrow)."""
    total = 0
    for path in data_files(spec):
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"PAR1":
            try:
                import pyarrow.parquet as pq

                total += pq.ParquetFile(path).metadata.num_rows
                continue
            except (ImportError, OSError, ValueError):
                return None
        opener = gzip.open if magic[:2] == b"\x1f\x8b" else open
        try:
            with opener(path, "rb") as f:
                head = f.read(4096).lstrip()
                if head.startswith(b"["):
                    return None
                f.seek(0)
                total += sum(1 for line in f if line.strip())
        except (OSError, EOFError):
            return None  # read_groups says what is wrong with it
    return total
