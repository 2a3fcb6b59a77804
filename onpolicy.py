"""
The demo, on-policy: one round of sampling, judging and Pair-MNM from the demo's SFT model, against
the offline Pair-MNM of `python train.py` on the same prompts with the same number of steps.

    python onpolicy.py                     # 3 seeds at the demo's size: the README's table
    python onpolicy.py --seeds 0 --sft_steps 20 --prompts 64 --steps 4 --eval_prompts 32   # seconds

For each seed:
  1. SFT: a random tiny Llama (demo/config.json, initialised with the seed) fine-tuned on the sloppy
     demonstrations of demo/sft.jsonl with the flags of train.py's demo.
  2. Offline Pair-MNM: from the SFT model on the first --prompts groups of demo/train.jsonl (answers
     written and scored by demo/make_demo.py), --steps steps of --batch_size groups.
  3. On-policy Pair-MNM: from the same SFT model, on the same prompts, the same steps and flags. Its
     groups are --num_samples answers per prompt sampled from the SFT model (generate.generate_batch:
     one prefill per prompt, its cache repeated) at --temperature / --top_p, scored by the demo's
     judge used as a verifier (demo/make_demo.py's judge), identical answers merged.
  4. Greedy answers of the three models to the held-out prompts of demo/eval.jsonl: the share the
     judge scores 10 (sorted, with spaces or commas).
The table gives the mean and standard deviation (n - 1) over seeds. Everything goes under --out.
"""

import importlib.util
import json
import os
import statistics
import time

import torch

import train
from chat import ChatTokenizer
from cli import ArgumentParser
from generate import generate_batch
from model import Llama, LlamaConfig

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(HERE, "demo")


def demo_judge():
    """judge(prompt, response) -> 1-10 from demo/make_demo.py (a script, not a package)."""
    spec = importlib.util.spec_from_file_location("make_demo", os.path.join(DEMO, "make_demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.judge


def read_jsonl(path, n=None):
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:n] if n else rows


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


@torch.no_grad()
def answers(model, tok, prompts, n, max_new_tokens, temperature, top_p, generator, batch_prompts=64):
    """n answers (texts) to each prompt, batch_prompts prompts (x n rows) per generate_batch call."""
    out = []
    for i in range(0, len(prompts), batch_prompts):
        chunk = [tok.encode_prompt([{"role": "user", "content": p}]) for p in prompts[i : i + batch_prompts]]
        new = generate_batch(
            model,
            chunk,
            max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop_ids=tok.stop_ids,
            generators=generator,
            num_samples=n,
        )
        texts = [tok.decode([t for t in ids if t not in tok.stop_ids]).strip() for ids in new]
        out += [texts[j * n : (j + 1) * n] for j in range(len(chunk))]
    return out


def onpolicy_groups(samples, prompts, judge):
    """Canonical groups from sampled answers: identical answers merged, empty ones dropped, each scored
    by the judge. Returns (groups, stats); a prompt with fewer than 2 distinct answers is no group."""
    groups, stats = [], {"prompts": len(prompts), "single_answer": 0, "all_tied": 0, "with_10": 0, "answers": 0}
    for prompt, texts in zip(prompts, samples):
        distinct = list(dict.fromkeys(t for t in texts if t))  # an empty answer is no response to train on
        if len(distinct) < 2:
            stats["single_answer"] += 1
            continue
        scores = [judge(prompt, r) for r in distinct]
        groups.append({"prompt": prompt, "responses": distinct, "scores": scores})
        stats["answers"] += len(distinct)
        stats["all_tied"] += len(set(scores)) == 1
        stats["with_10"] += max(scores) == 10
    stats["groups"] = len(groups)
    return groups, stats


def greedy_success(path, tok, prompts, judge, max_new_tokens):
    """Share of prompts whose greedy answer the judge scores 10."""
    model = Llama.from_pretrained(path).eval()
    replies = answers(model, tok, prompts, 1, max_new_tokens, 0.0, 1.0, None, batch_prompts=100)
    return sum(judge(p, r[0]) == 10 for p, r in zip(prompts, replies)) / len(prompts)


def run_seed(args, seed, tok, judge):
    """SFT, then offline and on-policy Pair-MNM from it; returns {model: greedy success}, group stats."""
    out = os.path.join(args.out, f"seed{seed}")
    os.makedirs(out, exist_ok=True)
    # train.py's demo flags (its rates were tuned with nanoGPT's betas)
    common = [
        "--max_length",
        "64",
        "--max_prompt_length",
        "32",
        "--seed",
        str(seed),
        "--adam_betas",
        "0.9",
        "0.95",
        "--overwrite",
        "--batch_size",
        str(args.batch_size),
        "--micro_batch_size",
        str(args.batch_size),
        "--log_every",
        "25",
    ]
    sft = args.sft_model.format(seed=seed) if args.sft_model else None
    if sft is None:
        torch.manual_seed(seed)
        init = os.path.join(out, "init")
        Llama(LlamaConfig.from_json(os.path.join(DEMO, "config.json"))).save_pretrained(init, source_dir=DEMO)
        rows = read_jsonl(os.path.join(DEMO, "sft.jsonl"), args.sft_rows)
        sft_data = write_jsonl(os.path.join(out, "sft.jsonl"), rows)
        sft_len = ["--max_steps", str(args.sft_steps)] if args.sft_steps else ["--epochs", "2"]
        sft = train.train(
            train.parse_args(
                [
                    "--model",
                    init,
                    "--data",
                    sft_data,
                    "--loss",
                    "sft",
                    "--out",
                    os.path.join(out, "sft"),
                    "--lr",
                    "3e-3",
                    "--warmup_ratio",
                    "0.05",
                    *sft_len,
                    *common,
                ]
            )
        )
    offline_groups = read_jsonl(os.path.join(DEMO, "train.jsonl"), args.prompts)
    prompts = [g["prompt"] for g in offline_groups]
    mnm = ["--loss", "pair_mnm", "--lr", "1e-3", "--warmup_ratio", "0.1", "--max_steps", str(args.steps), *common]

    t0 = time.time()
    model = Llama.from_pretrained(sft).eval()
    generator = torch.Generator().manual_seed(seed)
    samples = answers(
        model, tok, prompts, args.num_samples, args.max_new_tokens, args.temperature, args.top_p, generator
    )
    groups, stats = onpolicy_groups(samples, prompts, judge)
    stats["sample_s"] = round(time.time() - t0, 1)
    onpolicy_data = write_jsonl(os.path.join(out, "onpolicy_groups.jsonl"), groups)
    offline_data = write_jsonl(os.path.join(out, "offline_groups.jsonl"), offline_groups)
    print(
        f"seed {seed}: {stats['groups']} on-policy groups from {len(prompts)} prompts x {args.num_samples} samples "
        f"({stats['answers'] / max(stats['groups'], 1):.2f} distinct answers per group, {stats['with_10']} with a "
        f"sorted answer, {stats['all_tied']} all tied, {stats['single_answer']} prompts with one distinct answer "
        f"dropped) in {stats['sample_s']} s"
    )
    offline = train.train(
        train.parse_args(["--model", sft, "--data", offline_data, "--out", os.path.join(out, "offline"), *mnm])
    )
    onpolicy = train.train(
        train.parse_args(["--model", sft, "--data", onpolicy_data, "--out", os.path.join(out, "onpolicy"), *mnm])
    )

    held_out = [g["prompt"] for g in read_jsonl(os.path.join(DEMO, "eval.jsonl"), args.eval_prompts)]
    success = {
        name: greedy_success(path, tok, held_out, judge, args.max_new_tokens)
        for name, path in (("SFT", sft), ("SFT + offline Pair-MNM", offline), ("SFT + on-policy Pair-MNM", onpolicy))
    }
    print(f"seed {seed}: greedy success " + ", ".join(f"{k} {v:.3f}" for k, v in success.items()))
    return success, stats


def table(results):
    """Markdown rows: each model's greedy success, mean +- std over seeds, and the seeds' values."""
    lines = ["| model | greedy answers sorted (mean ± std) | per seed |", "|---|---|---|"]
    for name in results[0]:
        values = [r[name] for r in results]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        each = ", ".join(f"{v:.3f}" for v in values)
        lines.append(f"| {name} | {statistics.mean(values):.3f} ± {std:.3f} | {each} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = ArgumentParser(
        prog="onpolicy.py", description="The demo on-policy: sample, judge, Pair-MNM; against offline Pair-MNM."
    )
    a = p.add_argument
    a(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="one run of all three stages per seed (init, data order, sampling)",
    )
    a(
        "--out",
        default="out/onpolicy",
        help="output folder: seedS/{init,sft,offline,onpolicy}, the groups, results.json",
    )
    a(
        "--sft_model",
        default=None,
        help="start from this SFT checkpoint instead of training one per seed; {seed} in it is replaced by the seed "
        "(e.g. out/onpolicy/seed{seed}/sft/final: an earlier run's SFT models)",
    )
    a("--sft_rows", type=int, default=None, help="SFT demonstrations used (default: all of demo/sft.jsonl)")
    a("--sft_steps", type=int, default=0, help="SFT steps (0: 2 epochs, as train.py's demo)")
    a("--prompts", type=int, default=2400, help="training prompts: the first this many groups of demo/train.jsonl")
    a("--steps", type=int, default=150, help="Pair-MNM steps of both runs (150: the demo's 2 epochs of 2,400 groups)")
    a("--batch_size", type=int, default=32, help="groups per step of every stage")
    a("--num_samples", type=int, default=8, help="answers sampled per prompt for the on-policy groups")
    a("--temperature", type=float, default=0.8, help="sampling temperature (SimPO's on-policy data: 0.8)")
    a("--top_p", type=float, default=0.95, help="nucleus sampling threshold (SimPO's on-policy data: 0.95)")
    a("--max_new_tokens", type=int, default=24, help="longest answer, in tokens (a sorted 6-letter answer is ~12)")
    a("--eval_prompts", type=int, default=300, help="held-out prompts of demo/eval.jsonl for the greedy success")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    tok = ChatTokenizer.from_pretrained(DEMO)
    judge = demo_judge()
    runs = [run_seed(args, seed, tok, judge) for seed in args.seeds]
    results = [success for success, _ in runs]
    text = table(results)
    print(
        f"\non-policy vs offline Pair-MNM, {args.steps} steps of {args.batch_size} groups on {args.prompts} prompts, "
        f"seeds {' '.join(map(str, args.seeds))}; {time.time() - t0:.0f} s\n{text}"
    )
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(
            {"args": vars(args), "success": results, "groups": [stats for _, stats in runs], "table": text}, f, indent=2
        )
    return results


if __name__ == "__main__":
    main()
