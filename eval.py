"""
Evaluate a checkpoint the two ways the field does.

1. Reward ranking on held-out groups (--data): the model's reward of each response is the
   paper's p = exp(mean token log-prob), computed with the same code path as training
   (packing.make_batch, packing.response_logps). Reported: mean p of the chosen and of the
   rejected responses, top-1 accuracy (the best-scored response has the highest p), pairwise
   accuracy (share of scored pairs that p orders the same way) and Kendall's tau-b between p
   and the scores (per group, averaged over groups where it is defined), each with a
   percentile bootstrap confidence interval over groups.

    python eval.py --model out/mnm/final --data demo/eval.jsonl --bootstrap 1000

2. Answers for the public LLM-as-judge benchmarks (--generate): a question file in
   MT-Bench's format (question.jsonl: {"question_id", "category", "turns": [...]}) or in
   AlpacaEval's ({"instruction", ...} as a JSON list or JSONL), detected from the keys.
   Multi-turn questions are answered turn by turn, the model's own earlier answers fed back.
   The answers are written in the format each benchmark's judge reads:
     MT-Bench (FastChat llm_judge, data/mt_bench/model_answer/MODEL_ID.jsonl), one line per question:
       {"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [answer, ...]}], "tstamp"}
     AlpacaEval (alpaca_eval --model_outputs FILE.json), a JSON list:
       [{"instruction", "output", "generator", "dataset" (when the question has one)}, ...]

    python eval.py --model out/mnm/final --generate mt_bench/question.jsonl --answers model_answer/mnm.jsonl
    python eval.py --model out/mnm/final --generate alpaca_eval.json --answers mnm_outputs.json

Both parts spread over GPUs with torchrun (each rank takes a share; rank 0 writes):
$ torchrun --standalone --nproc_per_node 8 eval.py --model ... --generate question.jsonl --answers ...
"""

import json
import os
import time
import uuid
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

from cli import ArgumentParser, fail
from chat import TEMPLATES, ChatTokenizer
from data import micro_batches, tokenize_groups
from formats import data_files, read_groups
from metrics import SUMS, kendall_tau_b, ranking_metrics, ranking_sums
from generate import generate
from model import Llama
from packing import make_batch, response_logps
from parallel import all_gather, setup_distributed

METRICS = ["p_chosen", "p_rejected", "margin", "top1_acc", "pair_acc", "kendall_tau"]

# -----------------------------------------------------------------------------
# reward-ranking metrics


def group_rows(logps, scores, mask):
    """(B, len(SUMS) + 1) float64: each group's share of metrics.ranking_sums, then its Kendall tau-b
    between log p (monotone in p, and free of p's underflow to 0) and the scores."""
    rows = [ranking_sums(logps[b : b + 1], scores[b : b + 1], mask[b : b + 1]) for b in range(len(logps))]
    tau = kendall_tau_b(logps.detach().float(), scores.float(), mask)
    return np.concatenate([np.array(rows, dtype=np.float64).reshape(len(logps), len(SUMS)), tau.cpu().numpy()[:, None]], axis=1)


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
def score_groups(model, groups, micro_batch_size=16, max_tokens=None, layout="packed", chunk_size=1024, autocast=nullcontext()):
    """Rows (see group_rows) of every group, in order: mean log-probs of the responses through
    packing.make_batch and packing.response_logps, the path training takes."""
    device = model.model.embed_tokens.weight.device
    out = []
    for mb in micro_batches(groups, micro_batch_size, max_tokens):
        batch = make_batch(mb, layout, 0, max_tokens).to(device)
        with autocast:
            logps = response_logps(model, batch, chunk_size=chunk_size)  # (B, K) float32
        out.append(group_rows(logps, batch.scores, batch.mask))
    return np.concatenate(out) if out else np.zeros((0, len(SUMS) + 1))


# -----------------------------------------------------------------------------
# answers for MT-Bench and AlpacaEval


class QuestionError(ValueError):
    """A question file we cannot read: names the file and the line or element."""


def read_questions(path):
    """(format, questions) where format is 'mt_bench' or 'alpaca_eval', from the keys of the first
    record. Reads JSONL or a JSON list. Every question is checked: MT-Bench needs question_id and a
    non-empty list of string turns; AlpacaEval needs a string instruction."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise QuestionError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(records, list):
            raise QuestionError(f"{path}: expected a JSON list of questions")
        where = [f"{path}: element {i}" for i in range(len(records))]
    else:
        records, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise QuestionError(f"{path}:{n}: invalid JSON: {e.msg}") from None
                where.append(f"{path}:{n}")
    if not records:
        raise QuestionError(f"{path}: no questions")
    first = records[0] if isinstance(records[0], dict) else {}
    fmt = "mt_bench" if "turns" in first else "alpaca_eval" if "instruction" in first else None
    if fmt is None:
        raise QuestionError(f"{where[0]}: neither MT-Bench ('question_id', 'turns') nor AlpacaEval ('instruction') keys")
    for w, q in zip(where, records):
        if not isinstance(q, dict):
            raise QuestionError(f"{w}: expected a JSON object")
        if fmt == "mt_bench":
            turns = q.get("turns")
            if "question_id" not in q or not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
                raise QuestionError(f"{w}: an MT-Bench question needs 'question_id' and 'turns', a non-empty list of strings")
        elif not isinstance(q.get("instruction"), str):
            raise QuestionError(f"{w}: field 'instruction': expected a string")
    return fmt, records


@torch.no_grad()
def answer(model, tok, turns, max_new_tokens=1024, temperature=0.0, top_p=1.0, generator=None):
    """The model's answer to each user turn of one conversation, its own answers fed back."""
    if tok.template == "none" and len(turns) > 1:
        raise ValueError("a multi-turn question needs a chat template, and this checkpoint has none (pass --template)")
    messages, answers = [], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        prompt_ids = tok.encode_prompt(turn if tok.template == "none" else messages)
        new = generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_p=top_p, stop_ids=tok.stop_ids, generator=generator)
        text = tok.decode([t for t in new if t not in tok.stop_ids]).strip()
        answers.append(text)
        messages.append({"role": "assistant", "content": text})
    return answers


def answer_record(fmt, question, answers, model_id):
    """One answer in the format the benchmark's judge reads (see the module docstring)."""
    if fmt == "mt_bench":
        return {
            "question_id": question["question_id"],
            "answer_id": uuid.uuid4().hex,
            "model_id": model_id,
            "choices": [{"index": 0, "turns": answers}],
            "tstamp": time.time(),
        }
    record = {"instruction": question["instruction"], "output": answers[0], "generator": model_id}
    if "dataset" in question:  # AlpacaEval's leaderboard groups by it
        record["dataset"] = question["dataset"]
    return record


def write_answers(path, fmt, records):
    """MT-Bench: JSONL, one answer per line; AlpacaEval: one JSON list. Written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        if fmt == "mt_bench":
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        else:
            json.dump(records, f, ensure_ascii=False, indent=2)
    os.replace(path + ".tmp", path)


# -----------------------------------------------------------------------------
# command line


def interleave(parts, n):
    """Undo the rank::world split: parts[r] holds items r, r + world, ... of n items."""
    world, out = len(parts), [None] * n
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = ArgumentParser(prog="eval.py", description="Reward-ranking metrics and benchmark answers of a checkpoint.")
    a = p.add_argument
    a("--model", required=True, help="checkpoint folder (Hugging Face format: config.json, *.safetensors, tokenizer.json)")
    a("--data", nargs="+", default=None, help="held-out preference groups (files, folders or globs in any format data.py reads) for the ranking metrics")
    a("--data_format", default=None, help="override the detected data format")
    a("--template", default=None, choices=TEMPLATES, help="chat template (default: detected from the checkpoint's template text)")
    a("--date_string", default=None, help="the date Llama 3.2/3.3 chat templates print (default: today), as in training")
    a("--max_length", type=int, default=2048, help="longest prompt + response in tokens, as in training")
    a("--max_prompt_length", type=int, default=1800, help="longest prompt in tokens, as in training")
    a("--score_header", action="store_true", help="score the assistant header tokens too (use what training used)")
    a("--micro_batch_size", type=int, default=16, help="groups per forward")
    a("--max_tokens", type=int, default=None, help="optional token budget of one forward")
    a("--chunk_size", type=int, default=1024, help="positions per chunk of the language-model head")
    a("--bootstrap", type=int, default=1000, help="bootstrap resamples of the groups for the confidence intervals (0: none)")
    a("--ci", type=float, default=0.95, help="confidence level of the intervals")
    a("--seed", type=int, default=0, help="seed of the bootstrap and of sampling")
    a("--out", default=None, help="also write the metrics as JSON here")
    a("--generate", default=None, help="question file to answer: MT-Bench question.jsonl or AlpacaEval instructions (.json/.jsonl)")
    a("--answers", default=None, help="where to write the answers (required with --generate)")
    a("--model_id", default=None, help="model name in the answer file (default: the --model folder's name)")
    a("--max_new_tokens", type=int, default=1024, help="longest answer per turn, in tokens (FastChat's default)")
    a("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    a("--top_p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature > 0)")
    a("--device", default="cuda" if cuda else "cpu", help="torch device")
    a("--dtype", default="bfloat16" if cuda else "float32", choices=["float32", "bfloat16", "float16"], help="compute dtype (autocast; weights stay float32, as in training)")
    args = p.parse_args(argv)
    if not args.data and not args.generate:
        p.error("nothing to do: pass --data (ranking metrics) and/or --generate (benchmark answers)")
    if args.generate and not args.answers:
        p.error("--generate needs --answers, the file to write")
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
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    results = {}

    if args.data:
        try:
            groups, report = read_groups(args.data, format=args.data_format)
            groups, stats = tokenize_groups(groups, tok, args.max_length, args.max_prompt_length, include_header=args.score_header)
        except ValueError as e:
            fail(e)
        if rank == 0:
            print(f"{report.summary()}\n{stats.summary()}".rstrip())
        if not groups:
            fail(f"{' '.join(args.data)}: no usable group")
        rows = score_groups(model, groups[rank::world], args.micro_batch_size, args.max_tokens, chunk_size=args.chunk_size, autocast=autocast)
        rows = np.array([r for part in all_gather([list(r) for r in rows]) for r in part]) if world > 1 else rows  # group order does not matter here
        point = metrics_of(rows)
        ci = bootstrap(rows, args.bootstrap, args.seed, args.ci) if args.bootstrap else {}
        results = {"data": args.data, "groups": len(rows), "tau_groups": int((~np.isnan(rows[:, len(SUMS)])).sum()),
                   "metrics": {k: point.get(k) for k in METRICS}, "ci_level": args.ci, "ci": ci, "bootstrap": args.bootstrap, "seed": args.seed}
        if rank == 0:
            print(f"\n{args.model} on {args.data}: {len(rows)} groups with a preference")
            print(f"| metric | value | {args.ci:.0%} CI |\n|---|---|---|")
            for k in METRICS:
                lo, hi = ci.get(k, (float("nan"), float("nan")))
                print(f"| {k} | {point.get(k, float('nan')):.4f} | [{lo:.4f}, {hi:.4f}] |")

    if args.generate:
        try:
            fmt, questions = read_questions(args.generate)
        except (OSError, QuestionError) as e:
            fail(e)
        model_id = args.model_id or os.path.basename(os.path.normpath(args.model))
        generator = torch.Generator(device).manual_seed(args.seed + rank)
        mine = []
        for i, q in enumerate(questions[rank::world]):
            turns = q["turns"] if fmt == "mt_bench" else [q["instruction"]]
            with autocast:
                mine.append(answer_record(fmt, q, answer(model, tok, turns, args.max_new_tokens, args.temperature, args.top_p, generator), model_id))
            if rank == 0:
                print(f"answered {i + 1}/{len(questions[rank::world])} on rank 0", end="\r", flush=True)
        parts = all_gather(mine)
        if rank == 0:
            write_answers(args.answers, fmt, interleave(parts, len(questions)))
            print(f"\nwrote {len(questions)} {fmt} answers of {model_id} to {args.answers}")
        results["answers"] = args.answers

    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
