"""
MPPO training: an SFT checkpoint and a grouped preference dataset in, an aligned model in
Hugging Face format out. One CPU, one GPU, or many GPUs with DDP, or with FSDP (--fsdp) for
models whose weights, gradients and AdamW state do not fit on one GPU (Llama-3-8B; see fsdp.py).

The embedded demo (no download; a tiny Llama learns to prefer sorting letters over copying
them; about two minutes on 2 CPU cores):
$ python train.py

One process (CPU or one GPU):
$ python train.py --model path/to/Llama-3-8B-SFT --data ultrafeedback.jsonl --loss pair_mnm --out out/mnm

DDP on 8 GPUs of one node (NCCL on CUDA, gloo on CPU):
$ torchrun --standalone --nproc_per_node 8 train.py --model ... --data ... --out ...

DDP across 2 nodes (run on each node, with its --node_rank):
$ torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST --master_port 29500 train.py ...

FSDP (parameters, gradients and optimizer state sharded over all ranks), on one node or several:
$ torchrun --standalone --nproc_per_node 8 train.py --fsdp --gradient_checkpointing --model ... --data ... --out ...

Resume an interrupted run from the newest complete checkpoint in --out:
$ python train.py ... --out out/mnm --resume
"""

import argparse
import glob
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from baselines import BASELINES
from data import ChatTokenizer, GroupLoader, micro_batches, read_groups, scale_scores, tokenize_groups
import fsdp
from model import Llama, LlamaConfig, generate
from mppo import LOSSES, has_preference
from packing import packed_batch, padded_batch, response_logps

HERE = os.path.dirname(os.path.abspath(__file__))
POINT_LOSSES = ("point_ce", "point_mse")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise SystemExit(f"error: {message} (see python train.py --help)")


def parse_args(argv=None):
    p = ArgumentParser(description="MPPO preference optimization (and SFT) of a Llama 3 checkpoint.")
    a = p.add_argument
    a("--model", help="starting checkpoint: a Hugging Face-format Llama folder (config.json, *.safetensors, tokenizer.json)")
    a("--data", help="training groups: canonical JSONL or any format data.py reads")
    a("--eval_data", default=None, help="held-out groups, evaluated every --eval_every steps and at the end")
    a("--data_format", default=None, help="override the detected data format (canonical, simpo, ultrafeedback, pairwise, rrhf)")
    a("--template", default=None, help="chat template: llama3, chatml or none (default: detected from the checkpoint)")
    a("--loss", default="pair_mnm", choices=sorted(LOSSES) + sorted(BASELINES) + ["sft"],
      help="MPPO variant, a baseline of the paper's Table 2 (simpo, orpo, dpo; see baselines.py), or sft: NLL of the best response")
    a("--beta", type=float, default=None, help="simpo / dpo: reward scale beta (default: 2.0 for simpo, SimPO's Llama-3-Base recipe; 0.1 for dpo)")
    a("--gamma_beta_ratio", type=float, default=0.5, help="simpo: target margin gamma as a multiple of beta (SimPO's Llama-3-Base recipe: 0.5)")
    a("--orpo_lambda", type=float, default=0.1, help="orpo: weight lambda of the odds-ratio term beside the SFT loss (ORPO paper: 0.1)")
    a("--out", default="out/run", help="output folder: metrics.jsonl, checkpoint-STEP/, final/")
    a("--epochs", type=int, default=1, help="passes over the training data (ignored when --max_steps > 0)")
    a("--max_steps", type=int, default=0, help="optimizer steps to run; 0: --epochs passes")
    a("--batch_size", type=int, default=128, help="groups per optimizer step, over all ranks")
    a("--micro_batch_size", type=int, default=4, help="groups per forward/backward on one rank (gradient accumulation)")
    a("--max_tokens", type=int, default=None, help="optional token budget of one micro-batch (prompt + all responses)")
    a("--lr", type=float, default=5e-7, help="peak learning rate")
    a("--warmup_ratio", type=float, default=0.1, help="share of the steps spent in linear warmup before the cosine decay")
    a("--weight_decay", type=float, default=0.0, help="AdamW weight decay (matrices only; norms are never decayed)")
    a("--adam_betas", type=float, nargs=2, default=[0.9, 0.95], metavar=("BETA1", "BETA2"),
      help="AdamW's betas (0.9 0.95 as nanoGPT; TRL / SimPO's recipes use PyTorch's 0.9 0.999)")
    a("--grad_clip", type=float, default=1.0, help="clip the global gradient norm to this; 0 disables")
    a("--max_length", type=int, default=2048, help="longest prompt + response in tokens; responses are cut to fit")
    a("--max_prompt_length", type=int, default=1800, help="longest prompt in tokens; longer prompts keep their end")
    a("--score_header", action="store_true", help="score the assistant header tokens as part of the response")
    a("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="compute dtype (autocast; under --fsdp the dtype blocks are gathered and computed in); default bfloat16 on GPU, float32 on CPU")
    a("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a("--gradient_checkpointing", action="store_true", help="recompute each block's activations in backward")
    a("--fsdp", action="store_true", help="shard parameters, gradients and AdamW state over all ranks (FSDP2) instead of DDP's full replicas")
    a("--layout", default="packed", choices=["packed", "padded"], help="packed: one forward per group with a shared prompt; padded: naive baseline")
    a("--chunk_size", type=int, default=1024, help="positions per chunk of the language-model head in the loss")
    a("--attn_impl", default="auto", choices=["auto", "sdpa", "segments", "flex"],
      help="attention of packed rows: sdpa with a dense mask; segments: SDPA per prompt/response span; "
           "flex: flex_attention with a block mask (CUDA only); auto: on CPU segments for long groups and sdpa for short ones, sdpa on CUDA (packing.choose_attention)")
    a("--seed", type=int, default=0, help="seed of the data order, Pair-Single's draws and everything else random")
    a("--log_every", type=int, default=10, help="log training metrics every this many steps")
    a("--eval_every", type=int, default=0, help="evaluate on --eval_data every this many steps (0: only at the end)")
    a("--eval_generate", type=int, default=0, help="also greedy-decode this many eval prompts and report exact match with the best response")
    a("--save_every", type=int, default=0, help="write OUT/checkpoint-STEP/ every this many steps (0: only final/)")
    a("--save_total_limit", type=int, default=2, help="keep only the newest this many checkpoints")
    a("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    return p.parse_args(argv)


def fail(msg):
    """One line on stderr and exit code 1, instead of a traceback from deep inside."""
    raise SystemExit(f"error: {msg}")


# -----------------------------------------------------------------------------
# distributed setup and reproducibility


def setup_distributed(device_arg):
    """Returns (rank, world_size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK."""
    use_cuda = torch.cuda.is_available() if device_arg is None else device_arg.startswith("cuda")
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def all_reduce_sum(values, device):
    """Sum a list of floats over ranks (in float64, so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def rng_state(generator):
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, generator):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------
# loss and metrics on the (B, K) log-probabilities of a micro-batch


def group_losses(args, logps, batch, generator):
    """(B,) loss of each group of a batch. sft: negative mean token log-likelihood of the best response."""
    loss_name, scores, mask = args.loss, batch.scores, batch.mask
    if loss_name == "sft":
        best = scores.masked_fill(~mask, float("-inf")).argmax(dim=1, keepdim=True)
        return -logps.gather(1, best).squeeze(1)
    if loss_name == "pair_single":
        return LOSSES[loss_name](logps, scores, mask, generator=generator)
    beta = {} if args.beta is None else {"beta": args.beta}  # None: the function's default, from its paper
    if loss_name == "simpo":
        return BASELINES["simpo"](logps, scores, mask, gamma_beta_ratio=args.gamma_beta_ratio, **beta)
    if loss_name == "orpo":
        return BASELINES["orpo"](logps, scores, mask, lam=args.orpo_lambda)
    if loss_name == "dpo":
        return BASELINES["dpo"](logps, scores, mask, ref_logps=batch.ref_logps, lengths=batch.num_scored, **beta)
    return LOSSES[loss_name](logps, scores, mask)


def counted_groups(loss_name, scores, mask):
    """(B,) bool: groups whose loss enters the average. Pair-wise and list-wise losses need a preference."""
    if loss_name == "sft" or loss_name in POINT_LOSSES:
        return mask.any(dim=1)
    return has_preference(scores, mask)


# names of the sums that ranking_sums returns, in order; metrics are ratios of these
SUMS = ["groups", "p_chosen", "p_rejected", "rejected", "pairs_correct", "pairs", "top1"]


def ranking_sums(logps, scores, mask):
    """Sums over the groups of a batch for the reward-ranking metrics (reward p = exp(logps)):
    mean p of the chosen (best-scored) and of the rejected (strictly worse) responses,
    pairwise accuracy (share of pairs with score_i > score_j that have p_i > p_j) and
    top-1 accuracy (the chosen has the highest p). Only groups with a preference count."""
    logps, scores = logps.detach().float(), scores.float()
    pref = has_preference(scores, mask)
    p = torch.where(mask, logps.exp(), 0.0)
    best = scores.masked_fill(~mask, float("-inf")).argmax(dim=1, keepdim=True)
    rejected = mask & (scores < scores.gather(1, best)) & pref[:, None]
    pairs = mask[:, :, None] & mask[:, None, :] & (scores[:, :, None] > scores[:, None, :])  # (B, K, K)
    correct = pairs & (p[:, :, None] > p[:, None, :])
    top1 = p.masked_fill(~mask, -1.0).argmax(dim=1, keepdim=True) == best
    return [
        pref.sum().item(),
        (p.gather(1, best).squeeze(1) * pref).sum().item(),
        (p * rejected).sum().item(),
        rejected.sum().item(),
        correct.sum().item(),
        pairs.sum().item(),
        (top1.squeeze(1) & pref).sum().item(),
    ]


def ranking_metrics(sums):
    s = dict(zip(SUMS, sums))
    if s["groups"] == 0:  # e.g. SFT on single demonstrations: nothing to rank
        return {}
    p_chosen = s["p_chosen"] / max(s["groups"], 1)
    p_rejected = s["p_rejected"] / max(s["rejected"], 1)
    return {
        "p_chosen": p_chosen,
        "p_rejected": p_rejected,
        "margin": p_chosen - p_rejected,
        "pair_acc": s["pairs_correct"] / max(s["pairs"], 1),
        "top1_acc": s["top1"] / max(s["groups"], 1),
    }


def make_batch(groups, layout, pad_id, max_tokens):
    return packed_batch(groups, max_row_tokens=max_tokens) if layout == "packed" else padded_batch(groups, pad_id)


@torch.no_grad()
def reference_logps(model, groups, args, pad_id, device, autocast):
    """DPO's reference: each group's (K,) mean token log-probs under the starting model, computed
    once before training and stored in each group's ref_logps (a list of floats), so no second
    model stays in memory. Each rank scores an equal share; the shares are all-gathered."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    share = list(range(rank, len(groups), world))
    share += share[:1] * (math.ceil(len(groups) / world) - len(share))  # equal forwards on every rank
    mine = {}
    mbs = micro_batches([groups[i] for i in share], args.micro_batch_size, args.max_tokens)
    if args.fsdp:  # equal forwards also when the token budget splits the shares differently
        mbs = fsdp.pad_to_max_count(mbs, mbs[-1], device)
    for mb in mbs:
        batch = make_batch(mb, args.layout, pad_id, args.max_tokens).to(device)
        with autocast:
            logps = response_logps(model, batch, chunk_size=args.chunk_size, attn_impl=args.attn_impl)  # (B, K)
        for g, row in zip(mb, logps.tolist()):
            mine[id(g)] = row[: len(g.response_ids)]
    values = [mine[id(groups[i])] for i in share]
    gathered = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(gathered, (share, values))
    else:
        gathered = [(share, values)]
    for indices, rows in gathered:
        for i, row in zip(indices, rows):
            groups[i].ref_logps = row


@torch.no_grad()
def evaluate(model, groups, args, pad_id, device, autocast, generator):
    """Loss and ranking metrics on held-out groups; each rank scores its share."""
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    loss_sum, count, sums = 0.0, 0.0, [0.0] * len(SUMS)
    mbs = micro_batches(groups[rank::world], args.micro_batch_size, args.max_tokens)
    real = len(mbs)
    if args.fsdp:  # every rank must run as many forwards; the repeats are not counted
        mbs = fsdp.pad_to_max_count(mbs, mbs[-1] if mbs else groups[:1], device)
    for i, mb in enumerate(mbs):
        batch = make_batch(mb, args.layout, pad_id, args.max_tokens).to(device)
        with autocast:
            logps = response_logps(model, batch, chunk_size=args.chunk_size, attn_impl=args.attn_impl)
        if i >= real:
            continue
        counted = counted_groups(args.loss, batch.scores, batch.mask)
        loss_sum += (group_losses(args, logps, batch, generator) * counted).sum().item()
        count += counted.sum().item()
        sums = [a + b for a, b in zip(sums, ranking_sums(logps, batch.scores, batch.mask))]
    loss_sum, count, *sums = all_reduce_sum([loss_sum, count, *sums], device)
    model.train()
    return {"loss": loss_sum / max(count, 1), **ranking_metrics(sums)}


@torch.no_grad()
def generation_success(model, tok, groups, n, max_new_tokens=32):
    """Share of the first n prompts whose greedy reply equals the best-scored response."""
    hits = 0
    for g in groups[:n]:
        best = g.response_ids[max(range(len(g.scores)), key=lambda i: (g.scores[i], -i))]
        reply = generate(model, g.prompt_ids, max_new_tokens, temperature=0.0, stop_ids=tok.stop_ids)
        hits += tok.decode(reply).strip() == tok.decode(best).strip()
    return hits / max(min(n, len(groups)), 1)


# -----------------------------------------------------------------------------
# checkpoints: OUT/checkpoint-STEP/ = Hugging Face model + trainer_state.pt, written atomically


def latest_checkpoint(out):
    """The newest complete checkpoint folder in out, or None. Incomplete ones are *.tmp."""
    done = [d for d in glob.glob(os.path.join(out, "checkpoint-*")) if re.fullmatch(r"checkpoint-\d+", os.path.basename(d))]
    done = [d for d in done if os.path.exists(os.path.join(d, "trainer_state.pt"))]
    return max(done, key=lambda d: int(d.rsplit("-", 1)[1]), default=None)


def save_checkpoint(out, step, model, optimizer, scheduler, loader, generator, args, source_dir):
    """Every rank contributes its RNG state; rank 0 writes (under --fsdp every rank also writes its
    shards of model and AdamW state to sharded/). The folder appears complete or not at all."""
    states = [None] * dist.get_world_size() if dist.is_initialized() else None
    if dist.is_initialized():
        dist.all_gather_object(states, rng_state(generator))
    else:
        states = [rng_state(generator)]
    final = os.path.join(out, f"checkpoint-{step}")
    tmp = final + ".tmp"
    master = not dist.is_initialized() or dist.get_rank() == 0
    if master:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.fsdp:  # collective: the Hugging Face model gathered onto rank 0, then every rank's shards
        fsdp.save_hf(model, tmp, source_dir)
        fsdp.save_state(model, optimizer, os.path.join(tmp, "sharded"))
    elif master:
        model.save_pretrained(tmp, source_dir=source_dir)
    if master:
        state = {
            "step": step,
            "optimizer": None if args.fsdp else optimizer.state_dict(),  # --fsdp: in sharded/
            "scheduler": scheduler.state_dict(),
            "loader": loader.state_dict(),
            "rng": states,
            "world_size": len(states),
            "args": vars(args),
        }
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
        os.replace(tmp, final)  # atomic on POSIX: a crash leaves checkpoint-STEP.tmp, which is ignored
        checkpoints = sorted(glob.glob(os.path.join(out, "checkpoint-*[0-9]")), key=lambda d: int(d.rsplit("-", 1)[1]))
        for old in checkpoints[: -args.save_total_limit] if args.save_total_limit > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


# -----------------------------------------------------------------------------
# training


def train(args):
    """Runs one training job from parsed args; returns the path of the final model."""
    if args.loss not in LOSSES and args.loss not in BASELINES and args.loss != "sft":
        fail(f"unknown --loss {args.loss!r}; choose one of {', '.join(sorted(LOSSES) + sorted(BASELINES))}, sft")
    for flag in ("model", "data"):
        if not getattr(args, flag):
            fail(f"--{flag} is required (run `python train.py` with no arguments for the demo)")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        fail(f"--model {args.model}: no config.json there (expected a Hugging Face-format Llama folder)")
    for flag in ("data", "eval_data"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            fail(f"--{flag} {path}: no such file")
    if args.batch_size < 1 or args.micro_batch_size < 1:
        fail("--batch_size and --micro_batch_size must be positive")
    if not all(0 <= b < 1 for b in args.adam_betas):
        fail(f"--adam_betas {args.adam_betas[0]:g} {args.adam_betas[1]:g}: each must be in [0, 1)")

    rank, world, device = setup_distributed(args.device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # parameters and optimizer state stay float32; matmuls run in the compute dtype (under --fsdp
    # its mixed-precision policy casts the weights as it gathers them, instead of autocast)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 and not args.fsdp else nullcontext()
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    generator = torch.Generator(device=device).manual_seed(args.seed + rank)  # Pair-Single's draws
    if args.attn_impl == "flex" and device.type != "cuda":
        fail("--attn_impl flex needs CUDA (torch has no flex_attention backward on CPU): use segments or sdpa")
    if args.batch_size % world:
        fail(f"--batch_size {args.batch_size} must be divisible by the number of processes ({world})")

    # data: read, tokenize, report what was skipped or cut
    try:
        tok = ChatTokenizer.from_pretrained(args.model, template=args.template)
        min_responses = 1 if args.loss == "sft" else 2
        paths = [args.data] + ([args.eval_data] if args.eval_data else [])
        raw = [read_groups(path, format=args.data_format, min_responses=min_responses) for path in paths]
        if args.loss in POINT_LOSSES:  # one scaling rule for train and eval alike
            scaled = iter(scale_scores([g for groups, _ in raw for g in groups]))
            raw = [([next(scaled) for _ in groups], report) for groups, report in raw]
        splits = []
        for path, (groups, report) in zip(paths, raw):
            tokenized, stats = tokenize_groups(
                groups, tok, args.max_length, args.max_prompt_length, min_responses=min_responses, include_header=args.score_header
            )
            log(f"{path}: {len(tokenized)} groups\n{report.summary()}\n{stats.summary()}".rstrip())
            if not tokenized:
                fail(f"{path}: no usable group after reading and tokenizing (see the summary above)")
            splits.append(tokenized)
        train_groups, eval_groups = splits[0], (splits[1] if args.eval_data else [])
        loader = GroupLoader(train_groups, args.batch_size, rank=rank, world_size=world, seed=args.seed)
    except (OSError, ValueError) as e:  # DataError, a broken tokenizer, too few groups: all one-line errors
        fail(str(e) if args.data in str(e) or args.model in str(e) else f"{args.data}: {e}")
    total_steps = args.max_steps if args.max_steps > 0 else args.epochs * loader.steps_per_epoch
    warmup_steps = round(args.warmup_ratio * total_steps)

    # resume: weights, optimizer, schedule, data position and RNG come from the newest checkpoint
    resume_dir = latest_checkpoint(args.out) if args.resume else None
    if args.resume and resume_dir is None:
        log(f"--resume: no complete checkpoint in {args.out}, starting from {args.model}")
    state = torch.load(os.path.join(resume_dir, "trainer_state.pt"), map_location="cpu", weights_only=False) if resume_dir else None
    if state:
        for key in ("data", "batch_size", "seed", "loss"):
            if state["args"][key] != getattr(args, key):
                fail(f"--resume: --{key} is {getattr(args, key)!r} but {resume_dir} was trained with {state['args'][key]!r}")
        if state["args"].get("fsdp", False) != args.fsdp:  # AdamW state: one file, or DCP shards under --fsdp
            fail(f"--resume: {resume_dir} was written {'without' if args.fsdp else 'with'} --fsdp; resume the same way, "
                 f"or start a new run from its weights with --model {resume_dir} (AdamW state starts afresh)")

    if args.loss == "dpo":  # the reference is the starting model (also on resume): scored once, then freed
        if args.fsdp:  # sharded like the policy: a full copy on every rank is what --fsdp avoids
            ref_model = fsdp.load_model(args.model, device, param_dtype=dtype).eval()
        else:
            ref_model = Llama.from_pretrained(args.model, dtype=torch.float32, device=device).eval()
        reference_logps(ref_model, train_groups + eval_groups, args, tok.pad_id, device, autocast)
        del ref_model

    if args.fsdp:  # sharded from the start: each rank reads only its own rows of the checkpoint
        model = fsdp.load_model(resume_dir or args.model, device, param_dtype=dtype)
    else:
        model = Llama.from_pretrained(resume_dir or args.model, dtype=torch.float32, device=device)
    model.gradient_checkpointing = args.gradient_checkpointing
    raw_model = model
    if world > 1 and not args.fsdp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # AdamW; decay matrices only, never norm weights (nanoGPT's split)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    groups_ = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups_, lr=args.lr, betas=tuple(args.adam_betas), eps=1e-8, fused=device.type == "cuda")

    def lr_lambda(step):  # linear warmup, then cosine decay to 0
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    step = 0
    if state:
        if args.fsdp:  # model and AdamW state, resharded to this run's number of ranks
            fsdp.load_state(model, optimizer, os.path.join(resume_dir, "sharded"))
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        step = state["step"]
        if state["world_size"] == world:
            set_rng_state(state["rng"][rank], generator)
        else:
            log(f"--resume: {state['world_size']} processes wrote the checkpoint, {world} run now: RNG streams start afresh")
        log(f"resumed from {resume_dir} at step {step}")

    os.makedirs(args.out, exist_ok=True)
    metrics_file = open(os.path.join(args.out, "metrics.jsonl"), "a") if master else None

    def emit(record):
        if master:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()), flush=True)

    def run_eval():
        if eval_groups:
            metrics = evaluate(model, eval_groups, args, tok.pad_id, device, autocast, generator)
            if args.eval_generate:
                metrics["gen_success"] = generation_success(raw_model, tok, eval_groups, args.eval_generate)
            emit({"split": "eval", "step": step, **metrics})

    log(
        f"training {args.loss} on {len(train_groups)} groups: {total_steps} steps of {args.batch_size} groups "
        f"({loader.steps_per_epoch} steps/epoch), {world} process(es) on {device}, {dtype}"
    )
    if state is None and args.eval_every:
        run_eval()
    model.train()
    t_start = t_log = time.time()
    start_step = step
    acc = {"loss": 0.0, "groups": 0.0, "tokens": 0.0, "skipped": 0.0, "sums": [0.0] * len(SUMS), "steps": 0}
    while step < total_steps:
        for rank_groups in loader:
            # one optimizer step: this rank's share of the global batch, in micro-batches
            mbs = [make_batch(mb, args.layout, tok.pad_id, args.max_tokens) for mb in micro_batches(rank_groups, args.micro_batch_size, args.max_tokens)]
            # the loss is averaged over the groups that count in the whole global batch, so the
            # gradient is the same for any number of processes and micro-batches
            local = sum(counted_groups(args.loss, b.scores, b.mask).sum().item() for b in mbs)
            n_counted, n_total = all_reduce_sum([local, len(rank_groups)], device)
            real = len(mbs)
            if args.fsdp:  # every rank must run as many forwards and backwards; the repeats weigh zero
                mbs = fsdp.pad_to_max_count(mbs, mbs[-1], device)
            for i, batch in enumerate(mbs):
                batch = batch.to(device)
                last = i == len(mbs) - 1
                # DDP all-reduces (FSDP reduce-scatters) gradients in backward; only the last micro-step needs to
                if args.fsdp:
                    model.set_requires_gradient_sync(last)
                sync = model.no_sync() if world > 1 and not last and not args.fsdp else nullcontext()
                with sync:
                    with autocast:
                        logps = response_logps(model, batch, chunk_size=args.chunk_size, attn_impl=args.attn_impl)  # (B, K) float32
                    counted = counted_groups(args.loss, batch.scores, batch.mask)
                    losses = group_losses(args, logps, batch, generator)
                    # DDP (and FSDP) average gradients over ranks; multiply by world to get a sum over the global batch
                    loss = (losses * counted).sum() * world / max(n_counted, 1)
                    if i >= real:
                        loss = loss * 0
                    loss.backward()
                if i >= real:
                    continue
                acc["loss"] += loss.item() / world
                acc["tokens"] += batch.num_tokens
                acc["sums"] = [a + b for a, b in zip(acc["sums"], ranking_sums(logps, batch.scores, batch.mask))]
                del logps, losses, loss
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
            if isinstance(grad_norm, DTensor):  # FSDP: the norm over every rank's shards, replicated
                grad_norm = grad_norm.full_tensor()
            if not torch.isfinite(grad_norm):
                fail(f"step {step + 1}: the gradient norm is {grad_norm.item()} (non-finite loss or gradient); stopping before the weights are corrupted. Lower --lr or check the data")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            acc["groups"] += n_total
            acc["skipped"] += n_total - n_counted
            acc["steps"] += 1

            if step % args.log_every == 0 or step == total_steps:
                loss_sum, tokens, *sums = all_reduce_sum([acc["loss"], acc["tokens"], *acc["sums"]], device)
                now = time.time()
                elapsed = now - t_start
                if device.type == "cuda":
                    peak_gb = torch.cuda.max_memory_allocated(device) / 2**30
                    torch.cuda.reset_peak_memory_stats(device)
                else:  # peak resident memory of this process so far (Linux reports KiB)
                    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                emit(
                    {
                        "split": "train",
                        "step": step,
                        "epoch": round(step / loader.steps_per_epoch, 3),
                        "lr": scheduler.get_last_lr()[0],
                        "loss": loss_sum / acc["steps"],
                        "grad_norm": grad_norm.item(),
                        **ranking_metrics(sums),
                        "no_pref_groups": int(acc["skipped"]),
                        "groups_per_s": acc["groups"] / (now - t_log),
                        "tokens_per_s": tokens / (now - t_log),
                        "peak_mem_gb": round(peak_gb, 3),
                        "elapsed_s": round(elapsed, 1),
                        "eta_s": round(elapsed / (step - start_step) * (total_steps - step), 1),
                    }
                )
                acc = {"loss": 0.0, "groups": 0.0, "tokens": 0.0, "skipped": 0.0, "sums": [0.0] * len(SUMS), "steps": 0}
                t_log = time.time()
            if args.eval_every and step % args.eval_every == 0 and step < total_steps:
                run_eval()
            if args.save_every and step % args.save_every == 0 and step < total_steps:
                save_checkpoint(args.out, step, raw_model, optimizer, scheduler, loader, generator, args, args.model)
            if step >= total_steps:
                break

    run_eval()
    final = os.path.join(args.out, "final")
    if args.fsdp:  # every rank takes part in gathering the weights
        fsdp.save_hf(model, final, args.model)
    elif master:
        raw_model.save_pretrained(final, source_dir=args.model)
    if master:
        metrics_file.close()
        log(f"saved {final}")
    if dist.is_initialized():
        dist.barrier()
    return final


# -----------------------------------------------------------------------------
# the embedded demo: `python train.py` with no arguments


def demo(out="out/demo"):
    """Random tiny Llama -> short SFT on sloppy demonstrations -> Pair-MNM on scored groups.
    Prints held-out ranking accuracy of p and greedy task success before and after MPPO."""
    src = os.path.join(HERE, "demo")
    t0 = time.time()
    torch.manual_seed(0)
    init = os.path.join(out, "init")
    Llama(LlamaConfig.from_json(os.path.join(src, "config.json"))).save_pretrained(init, source_dir=src)
    common = ["--eval_data", os.path.join(src, "eval.jsonl"), "--max_length", "64", "--max_prompt_length", "32", "--log_every", "25", "--seed", "0"]
    print("== 1. SFT on demonstrations that mostly copy the letters instead of sorting them")
    sft = train(parse_args(["--model", init, "--data", os.path.join(src, "sft.jsonl"), "--loss", "sft", "--out", os.path.join(out, "sft"),
                            "--epochs", "2", "--batch_size", "32", "--micro_batch_size", "32", "--lr", "3e-3", "--warmup_ratio", "0.05", *common]))
    print("== 2. Pair-MNM on groups of 3-5 scored answers (sorted: 10, mistakes: 1-6)")
    mnm = train(parse_args(["--model", sft, "--data", os.path.join(src, "train.jsonl"), "--loss", "pair_mnm", "--out", os.path.join(out, "mnm"),
                            "--epochs", "2", "--batch_size", "32", "--micro_batch_size", "32", "--lr", "1e-3", "--warmup_ratio", "0.1", *common]))
    print("== 3. Held-out prompts, before and after MPPO")
    tok = ChatTokenizer.from_pretrained(src)
    groups, _ = read_groups(os.path.join(src, "eval.jsonl"))
    eval_groups, _ = tokenize_groups(groups, tok, 64, 32)
    args = parse_args(["--loss", "pair_mnm", "--micro_batch_size", "64"])
    rows = []
    for name, path in (("SFT", sft), ("SFT + Pair-MNM", mnm)):
        model = Llama.from_pretrained(path)
        m = evaluate(model, eval_groups, args, tok.pad_id, torch.device("cpu"), nullcontext(), None)
        m["gen_success"] = generation_success(model, tok, eval_groups, len(eval_groups))
        rows.append((name, m))
    print("| model | top-1 acc of p | pairwise acc | p chosen | p rejected | greedy answers sorted |")
    print("|---|---|---|---|---|---|")
    for name, m in rows:
        print(f"| {name} | {m['top1_acc']:.3f} | {m['pair_acc']:.3f} | {m['p_chosen']:.3f} | {m['p_rejected']:.3f} | {m['gen_success']:.3f} |")
    print(f"demo finished in {time.time() - t0:.0f} s; models in {out}/sft/final and {out}/mnm/final")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        demo()
    else:
        train(parse_args(argv))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
