"""
Evaluate a checkpoint the two ways the field does.

1. Reward ranking on held-out groups (--data): the model's reward of each response is the
   paper's p = exp(mean token log-prob), computed with the same code path as training
   (packing.score_groups). Reported: mean p of the chosen and of the
   rejected responses, top-1 accuracy (the best-scored response has the highest p), pairwise
   accuracy (share of scored pairs that p orders the same way) and Kendall's tau-b between p
   and the scores (per group, averaged over groups where it is defined), each with a
   percentile bootstrap confidence interval over groups.

    python eval.py --model out/mnm/final --data demo/eval.jsonl --bootstrap 1000

2. Answers for the public LLM-as-judge benchmarks (--generate): a question file in MT-Bench's
   format (question.jsonl: {"question_id", "category", "turns": [string, ...]}), Arena-Hard-Auto's
   ({"question_id", "category", "turns": [{"content": string}]}) or AlpacaEval's ({"instruction",
   ...} as a JSON list or JSONL), told apart by the keys. Questions are decoded --gen_batch_size
   at a time (generate.generate_batch); a multi-turn question's turn 2 is decoded after turn 1 of
   its whole batch, with the model's own first answer in its prompt. Each question samples at its
   category's temperature in FastChat's table (CATEGORY_TEMPERATURE; --temperature overrides it)
   with a generator seeded from (--seed, question id), so an answer does not depend on the order
   of the file, the batch or the number of processes. Each batch's answers are appended as soon
   as they are finished, and a restarted run skips the questions already answered. The answers
   are written in the format each benchmark's judge reads:
     MT-Bench (FastChat llm_judge: data/mt_bench/model_answer/MODEL_ID.jsonl; the judge names the
     model after the file's base name), one line per question:
       {"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [answer, ...]}], "tstamp"}
     Arena-Hard-Auto (data/arena-hard-v0.1/model_answer/MODEL_ID.jsonl), the same with each turn
       {"content": answer, "token_len": n} (n in tiktoken's gpt-3.5-turbo tokens where tiktoken can
       load that encoding, as its gen_answer.py counts; else in the model's own tokens)
     AlpacaEval (alpaca_eval --model_outputs FILE.json), a JSON list written at the end (FILE.json
     .partial.jsonl holds the answers until then):
       [{"instruction", "output", "generator", "dataset" (when the question has one)}, ...]

    python eval.py --model out/mnm/final --generate mt_bench/question.jsonl --answers mt_bench/model_answer/mnm.jsonl
    python eval.py --model out/mnm/final --generate arena-hard-v0.1/question.jsonl \
        --answers arena-hard-v0.1/model_answer/mnm.jsonl
    python eval.py --model out/mnm/final --generate alpaca_eval.json --answers mnm_outputs.json

Both parts spread over GPUs with torchrun (each rank takes a share of the questions and appends its
answers; rank 0 writes the final file):
$ torchrun --standalone --nproc_per_node 8 eval.py --model ... --generate question.jsonl --answers ...
"""

import hashlib
import json
import os
import time
import uuid
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

from cli import (
    ArgumentParser,
    check_at_least,
    check_device,
    check_lengths,
    check_model_fits,
    check_model_folder,
    fail,
    interruptible,
    one_line_errors,
)
from chat import TEMPLATES, ChatTokenizer
from data import tokenize_groups
from formats import data_files, read_groups
from metrics import SUMS, kendall_tau_b, ranking_metrics, ranking_sums
from generate import generate_batch
from model import Llama
from packing import Scoring, score_groups
from parallel import all_gather, barrier, setup_distributed

METRICS = ["p_chosen", "p_rejected", "margin", "top1_acc", "pair_acc", "kendall_tau"]

# -----------------------------------------------------------------------------
# reward-ranking metrics


def group_rows(logps, scores, mask):
    """(B, len(SUMS) + 1) float64: each group's share of metrics.ranking_sums, then its Kendall tau-b
    between log p (monotone in p, and free of p's underflow to 0) and the scores."""
    rows = [ranking_sums(logps[b : b + 1], scores[b : b + 1], mask[b : b + 1]) for b in range(len(logps))]
    tau = kendall_tau_b(logps.detach().float(), scores.float(), mask)
    return np.concatenate(
        [np.array(rows, dtype=np.float64).reshape(len(logps), len(SUMS)), tau.cpu().numpy()[:, None]], axis=1
    )


def metrics_of(rows, weights=None):
    """The metrics of a set of groups from their rows; weights (G,) counts each group (bootstrap)."""
    w = np.ones(len(rows)) if weights is None else weights
    tau = rows[:, len(SUMS)]
    defined = ~np.isnan(tau)
    m = ranking_metrics(list(w @ rows[:, : len(SUMS)]))
    n_tau = w[defined].sum()
    m["kendall_tau"] = float(w[defined] @ tau[defined] / n_tau) if n_tau else float("nan")
    return m


def bootstrap(rows, n, seed=0, level=0.95):
    """Percentile bootstrap over groups: {metric: (low, high)} from n resamples of the groups,
    drawn with replacement by a numpy Generator seeded with seed."""
    rng = np.random.default_rng(seed)
    G = len(rows)
    draws = {k: [] for k in METRICS}
    for _ in range(n):
        weights = np.bincount(rng.integers(0, G, G), minlength=G).astype(np.float64)  # times each group is drawn
        m = metrics_of(rows, weights)
        for k in METRICS:
            draws[k].append(m.get(k, float("nan")))
    tail = (1 - level) / 2
    return {k: tuple(float(q) for q in np.nanquantile(v, [tail, 1 - tail])) for k, v in draws.items()}


@torch.no_grad()
def ranking_rows(model, groups, scoring, autocast=nullcontext()):
    """Rows (see group_rows) of every group, in order, from the mean log-probs of packing.score_groups,
    the path training takes; scoring: a packing.Scoring."""
    scored = score_groups(model, groups, scoring, autocast)
    rows = [group_rows(logps, batch.scores, batch.mask) for batch, logps in scored]
    return np.concatenate(rows) if rows else np.zeros((0, len(SUMS) + 1))


# -----------------------------------------------------------------------------
# answers for MT-Bench, Arena-Hard-Auto and AlpacaEval

# FastChat's llm_judge/common.py `temperature_config`: the temperature gen_model_answer.py samples
# each MT-Bench category at (0.0: greedy). Arena-Hard-Auto's gen_answer.py reads the same table.
CATEGORY_TEMPERATURE = {
    "writing": 0.7,
    "roleplay": 0.7,
    "stem": 0.1,
    "humanities": 0.1,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
}
# a question whose category is not in the table: FastChat samples at 0.7; Arena-Hard-Auto takes its
# gen_answer_config.yaml temperature (0.0, and its questions' category "arena-hard-v0.1" is not in
# the table); AlpacaEval has no categories and no fixed setting: greedy
OTHER_TEMPERATURE = {"mt_bench": 0.7, "arena_hard": 0.0, "alpaca_eval": 0.0}


class QuestionError(ValueError):
    """A question or answer file we cannot read: names the file and the line or element."""


def read_records(path):
    """(records, where): the JSON objects of a JSONL file or a JSON list, and where each one is."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json") and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise QuestionError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        return records, [f"{path}: element {i}" for i in range(len(records))]
    records, where = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise QuestionError(f"{path}:{n}: invalid JSON: {e.msg}") from None
            where.append(f"{path}:{n}")
    return records, where


def read_questions(path):
    """(format, questions), format 'mt_bench', 'arena_hard' or 'alpaca_eval' told from the first
    record: MT-Bench's turns are strings, Arena-Hard-Auto's are {"content": ...} objects, AlpacaEval
    has an instruction. Every question is checked, and question ids (AlpacaEval: instructions) must
    be unique: they key the seeds and the answers a restarted run skips."""
    records, where = read_records(path)
    if not isinstance(records, list):
        raise QuestionError(f"{path}: expected a JSON list of questions")
    if not records:
        raise QuestionError(f"{path}: no questions")
    first = records[0] if isinstance(records[0], dict) else {}
    turns = first.get("turns")
    if "instruction" in first:
        fmt = "alpaca_eval"
    elif isinstance(turns, list) and turns and isinstance(turns[0], dict):
        fmt = "arena_hard"
    elif "turns" in first:
        fmt = "mt_bench"
    else:
        raise QuestionError(
            f"{where[0]}: neither MT-Bench / Arena-Hard ('question_id', 'turns') nor AlpacaEval ('instruction') keys"
        )
    seen = set()
    for w, q in zip(where, records):
        if not isinstance(q, dict):
            raise QuestionError(f"{w}: expected a JSON object")
        if fmt == "alpaca_eval" and not isinstance(q.get("instruction"), str):
            raise QuestionError(f"{w}: field 'instruction': expected a string")
        if fmt != "alpaca_eval":
            turns = q.get("turns")
            arena = fmt == "arena_hard"
            ok = (
                isinstance(turns, list)
                and turns
                and all(
                    isinstance(t.get("content"), str)
                    if arena and isinstance(t, dict)
                    else isinstance(t, str) and not arena
                    for t in turns
                )
            )
            if "question_id" not in q or not ok:
                shape = 'a non-empty list of {"content": string}' if arena else "a non-empty list of strings"
                raise QuestionError(
                    f"{w}: {'an Arena-Hard' if fmt == 'arena_hard' else 'an MT-Bench'} question needs "
                    f"'question_id' and 'turns', {shape}"
                )
        key = question_key(fmt, q)
        if key in seen:
            field = "instruction" if fmt == "alpaca_eval" else "question_id"
            raise QuestionError(f"{w}: {field} {key!r} appears twice")
        seen.add(key)
    return fmt, records


def question_key(fmt, q):
    return q["instruction"] if fmt == "alpaca_eval" else q["question_id"]


def user_turns(fmt, q):
    if fmt == "alpaca_eval":
        return [q["instruction"]]
    return [t["content"] for t in q["turns"]] if fmt == "arena_hard" else q["turns"]


def question_temperature(fmt, q, override=None):
    """--temperature when given, else the question's category's in FastChat's table (see above)."""
    if override is not None:
        return override
    return CATEGORY_TEMPERATURE.get(q.get("category"), OTHER_TEMPERATURE[fmt])


def question_seed(seed, key):
    """A 63-bit seed from (--seed, question id): a question's draws depend on nothing else, not on
    its place in the file, the batch it lands in or the number of processes."""
    digest = hashlib.sha256(json.dumps([seed, key]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@torch.no_grad()
def answer_batch(model, tok, conversations, temperatures, generators, max_new_tokens=1024, top_p=1.0):
    """The model's answers to several conversations (lists of user turns) at once. Turn t of every
    conversation that has one is decoded in one batch, after turn t - 1 of all of them, its prompt
    holding the model's own earlier answers. Returns, per conversation, [(text, tokens), ...]."""
    if tok.template == "none" and any(len(c) > 1 for c in conversations):
        raise ValueError("a multi-turn question needs a chat template, and this checkpoint has none (pass --template)")
    messages, answers = [[] for _ in conversations], [[] for _ in conversations]
    for t in range(max(map(len, conversations))):
        rows = [i for i, turns in enumerate(conversations) if t < len(turns)]
        prompts = []
        for i in rows:
            messages[i].append({"role": "user", "content": conversations[i][t]})
            prompts.append(tok.encode_prompt(conversations[i][t] if tok.template == "none" else messages[i]))
        new = generate_batch(
            model,
            prompts,
            max_new_tokens,
            temperature=[temperatures[i] for i in rows],
            top_p=top_p,
            stop_ids=tok.stop_ids,
            generators=[generators[i] for i in rows],
        )
        for i, ids in zip(rows, new):
            ids = [x for x in ids if x not in tok.stop_ids]
            text = tok.decode(ids).strip()
            answers[i].append((text, len(ids)))
            messages[i].append({"role": "assistant", "content": text})
    return answers


def token_counter():
    """Arena-Hard-Auto records token_len in tiktoken's gpt-3.5-turbo encoding; where tiktoken and its
    encoding file are at hand that count is used, else None (the model's own token count is)."""
    try:
        import tiktoken

        enc = tiktoken.encoding_for_model("gpt-3.5-turbo")
        return lambda text: len(enc.encode(text, disallowed_special=()))
    except (ImportError, OSError, ValueError, KeyError):  # not installed, or its encoding file cannot be downloaded
        return None


def answer_record(fmt, question, answers, model_id, count_tokens=None):
    """One answered question in the format the benchmark's judge reads (see the module docstring);
    answers: [(text, model tokens), ...], one per turn."""
    if fmt == "alpaca_eval":
        record = {"instruction": question["instruction"], "output": answers[0][0], "generator": model_id}
        if "dataset" in question:  # AlpacaEval's leaderboard groups by it
            record["dataset"] = question["dataset"]
        return record
    if fmt == "arena_hard":
        turns = [{"content": text, "token_len": count_tokens(text) if count_tokens else n} for text, n in answers]
    else:
        turns = [text for text, _ in answers]
    return {
        "question_id": question["question_id"],
        "answer_id": uuid.uuid4().hex,
        "model_id": model_id,
        "choices": [{"index": 0, "turns": turns}],
        "tstamp": time.time(),
    }


def progress_path(path, fmt):
    """Where answers are appended as they are finished: the answer file itself for the JSONL
    benchmarks; beside it for AlpacaEval, whose file is one JSON list written at the end."""
    return path + ".partial.jsonl" if fmt == "alpaca_eval" else path


def drop_torn_line(path):
    """A run killed while appending can leave a last line without its newline: cut it off, so the
    restart rewrites that answer instead of refusing the file."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def finished_answers(path, fmt, model_id):
    """{question key: record} of what earlier runs of this model wrote to path (and the progress
    file beside it), which a restart skips. Answers of another model in the file are refused."""
    done = {}
    for p in dict.fromkeys([path, progress_path(path, fmt)]):
        if not os.path.isfile(p):
            continue
        records, where = read_records(p)
        for w, r in zip(where, records):
            owner = r.get("generator" if fmt == "alpaca_eval" else "model_id") if isinstance(r, dict) else None
            if owner != model_id:
                raise QuestionError(
                    f"{w}: an answer of model {owner!r}, not {model_id!r}: "
                    f"pass another --answers (or --model_id), or delete the file to start afresh"
                )
            done[question_key(fmt, r)] = r
    return done


def append_answers(path, records):
    """Append records as JSON lines with one write of an O_APPEND descriptor each (several ranks may
    append to one file; a line is never split between two writes)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for r in records:
            data = (json.dumps(r, ensure_ascii=False) + "\n").encode()
            if os.write(fd, data) != len(data):
                raise OSError(f"{path}: short write")
    finally:
        os.close(fd)


def write_answers(path, fmt, records):
    """The final answer file, in question-file order, written atomically: JSONL for MT-Bench and
    Arena-Hard-Auto (as FastChat's reorg_answer_file leaves it), one JSON list for AlpacaEval."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        if fmt == "alpaca_eval":
            json.dump(records, f, ensure_ascii=False, indent=2)
        else:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.replace(path + ".tmp", path)


def generate_answers(model, tok, args, rank, world, autocast):
    """--generate: answer every question of the file not answered yet, --gen_batch_size at a time,
    each batch's answers appended as it finishes; rank 0 then writes the final file in question order."""
    fmt, questions = read_questions(args.generate)
    stem = os.path.splitext(os.path.basename(args.answers))[0]
    # FastChat and Arena-Hard-Auto name the judged model after the answer file's base name
    model_id = args.model_id or (os.path.basename(os.path.normpath(args.model)) if fmt == "alpaca_eval" else stem)
    if rank == 0 and fmt != "alpaca_eval" and model_id != stem:
        print(f"note: the judge will name these answers {stem!r} (the file's base name), not --model_id {model_id!r}")
    os.makedirs(os.path.dirname(os.path.abspath(args.answers)), exist_ok=True)
    progress = progress_path(args.answers, fmt)
    if rank == 0:
        drop_torn_line(progress)
    barrier()
    done = finished_answers(args.answers, fmt, model_id)
    todo = [q for q in questions if question_key(fmt, q) not in done]
    mine = todo[rank::world]
    count_tokens = token_counter() if fmt == "arena_hard" else None
    if rank == 0:
        temps = "per category (FastChat's table)" if args.temperature is None else f"--temperature {args.temperature:g}"
        print(
            f"{fmt}: {len(questions)} questions, {len(done)} answered before, {len(todo)} to answer over {world} "
            f"process(es), {args.gen_batch_size} at a time; temperature {temps}"
        )
    t0 = time.time()
    for start in range(0, len(mine), args.gen_batch_size):
        batch = mine[start : start + args.gen_batch_size]
        device = model.model.embed_tokens.weight.device
        gens = [torch.Generator(device).manual_seed(question_seed(args.seed, question_key(fmt, q))) for q in batch]
        temps = [question_temperature(fmt, q, args.temperature) for q in batch]
        with autocast:
            conversations = [user_turns(fmt, q) for q in batch]
            answers = answer_batch(model, tok, conversations, temps, gens, args.max_new_tokens, args.top_p)
        append_answers(progress, [answer_record(fmt, q, a, model_id, count_tokens) for q, a in zip(batch, answers)])
        if rank == 0:
            n, rate = start + len(batch), (start + len(batch)) / (time.time() - t0)
            eta = (len(mine) - n) / rate
            print(f"answered {n}/{len(mine)} on rank 0, {rate:.2f} questions/s, ETA {eta:.0f} s", flush=True)
    barrier()
    if rank == 0:
        done = finished_answers(args.answers, fmt, model_id)
        write_answers(args.answers, fmt, [done[question_key(fmt, q)] for q in questions])
        if progress != args.answers and os.path.exists(progress):
            os.remove(progress)
        print(f"wrote {len(questions)} {fmt} answers of {model_id} to {args.answers}")
    return args.answers


# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = ArgumentParser(prog="eval.py", description="Reward-ranking metrics and benchmark answers of a checkpoint.")
    a = p.add_argument
    a(
        "--model",
        required=True,
        help="checkpoint folder (Hugging Face format: config.json, *.safetensors, tokenizer.json)",
    )
    a(
        "--data",
        nargs="+",
        default=None,
        help="held-out preference groups (files, folders or globs in any format data.py reads) for the ranking metrics",
    )
    a("--data_format", default=None, help="override the detected data format")
    a(
        "--template",
        default=None,
        choices=TEMPLATES,
        help="chat template (default: detected from the checkpoint's template text)",
    )
    a(
        "--date_string",
        default=None,
        help="the date Llama 3.2/3.3 chat templates print (default: today), as in training",
    )
    a("--max_length", type=int, default=2048, help="longest prompt + response in tokens, as in training")
    a("--max_prompt_length", type=int, default=1800, help="longest prompt in tokens, as in training")
    a("--score_header", action="store_true", help="score the assistant header tokens too (use what training used)")
    a("--micro_batch_size", type=int, default=16, help="groups per forward")
    a("--max_tokens", type=int, default=None, help="optional token budget of one forward")
    a("--chunk_size", type=int, default=1024, help="positions per chunk of the language-model head")
    a(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap resamples of the groups for the confidence intervals (0: none)",
    )
    a("--ci", type=float, default=0.95, help="confidence level of the intervals")
    a("--seed", type=int, default=0, help="seed of the bootstrap and of sampling")
    a("--out", default=None, help="also write the metrics as JSON here")
    a(
        "--generate",
        default=None,
        help="question file: MT-Bench or Arena-Hard-Auto question.jsonl, AlpacaEval instructions (.json/.jsonl)",
    )
    a(
        "--answers",
        default=None,
        help="answer file (required with --generate); answers are appended as they finish and a restart skips them. "
        "MT-Bench / Arena-Hard: data/BENCH/model_answer/MODEL_ID.jsonl (the judge names the model after it)",
    )
    a(
        "--model_id",
        default=None,
        help="model name in the answer file (default: the --answers base name; AlpacaEval: the --model folder's name)",
    )
    a("--gen_batch_size", type=int, default=16, help="questions decoded together (one batch per turn)")
    a("--max_new_tokens", type=int, default=1024, help="longest answer per turn, in tokens (FastChat's default)")
    a(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature of every question; 0 = greedy (default: per category, FastChat's table: writing, "
        "roleplay 0.7; stem, humanities 0.1; extraction, math, coding, reasoning 0; other MT-Bench 0.7, "
        "Arena-Hard and AlpacaEval 0)",
    )
    a("--top_p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature > 0)")
    a("--device", default="cuda" if cuda else "cpu", help="torch device")
    a(
        "--dtype",
        default="bfloat16" if cuda else "float32",
        choices=["float32", "bfloat16", "float16"],
        help="compute dtype (autocast; weights stay float32, as in training)",
    )
    args = p.parse_args(argv)
    if not args.data and not args.generate:
        p.error("nothing to do: pass --data (ranking metrics) and/or --generate (benchmark answers)")
    if args.generate and not args.answers:
        p.error("--generate needs --answers, the file to write")
    check_device(args.device)  # train.py's checks, in cli.py: the same mistake gets the same line
    check_at_least(
        args,
        1,
        "max_length",
        "max_prompt_length",
        "micro_batch_size",
        "max_tokens",
        "chunk_size",
        "gen_batch_size",
        "max_new_tokens",
    )
    check_at_least(args, 0, "bootstrap")
    check_lengths(args.max_length, args.max_prompt_length)
    if not 0 < args.ci < 1:
        p.error(f"--ci {args.ci}: the confidence level must lie between 0 and 1")
    if (args.temperature is not None and not args.temperature >= 0) or not 0 < args.top_p <= 1:
        p.error("need --temperature >= 0 and 0 < --top_p <= 1")
    check_model_folder(args.model)
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    try:
        if args.data:
            data_files(args.data)
        if args.generate and not os.path.isfile(args.generate):
            raise FileNotFoundError(f"{args.generate}: no such file")
        tok = ChatTokenizer.from_pretrained(args.model, template=args.template, date_string=args.date_string)
        model = Llama.from_pretrained(args.model, dtype=torch.float32, device=device).eval()
    except (OSError, ValueError) as e:
        fail(e)
    check_model_fits(
        model.config, tok, args.model, args.max_length if args.data else None, print if rank == 0 else (lambda *a: None)
    )
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    results = {}

    if args.data:
        try:
            groups, report = read_groups(args.data, format=args.data_format)
            groups, stats = tokenize_groups(
                groups, tok, args.max_length, args.max_prompt_length, include_header=args.score_header
            )
        except ValueError as e:
            fail(e)
        if rank == 0:
            print(f"{report.summary()}\n{stats.summary()}".rstrip())
        if not groups:
            fail(f"{' '.join(args.data)}: no usable group")
        scoring = Scoring(
            micro_batch_size=args.micro_batch_size, max_tokens=args.max_tokens, chunk_size=args.chunk_size
        )
        rows = ranking_rows(model, groups[rank::world], scoring, autocast)
        rows = (
            np.array([r for part in all_gather([list(r) for r in rows]) for r in part]) if world > 1 else rows
        )  # group order does not matter here
        point = metrics_of(rows)
        ci = bootstrap(rows, args.bootstrap, args.seed, args.ci) if args.bootstrap else {}
        results = {
            "data": args.data,
            "groups": len(rows),
            "tau_groups": int((~np.isnan(rows[:, len(SUMS)])).sum()),
            "metrics": {k: point.get(k) for k in METRICS},
            "ci_level": args.ci,
            "ci": ci,
            "bootstrap": args.bootstrap,
            "seed": args.seed,
        }
        if rank == 0:
            print(f"\n{args.model} on {args.data}: {len(rows)} groups with a preference")
            print(f"| metric | value | {args.ci:.0%} CI |\n|---|---|---|")
            for k in METRICS:
                lo, hi = ci.get(k, (float("nan"), float("nan")))
                print(f"| {k} | {point.get(k, float('nan')):.4f} | [{lo:.4f}, {hi:.4f}] |")

    if args.generate:
        try:
            results["answers"] = generate_answers(model, tok, args, rank, world, autocast)
        except (OSError, ValueError) as e:  # QuestionError: a bad question or answer file, in one line
            fail(e)

    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    one_line_errors(interruptible(main))()  # Ctrl-C: one line, no traceback
