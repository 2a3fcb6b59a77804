"""
MPPO training: an SFT checkpoint and a grouped preference dataset in, an aligned model in
Hugging Face format out. One CPU, one GPU, or many GPUs with DDP, or with FSDP (--fsdp) for
models whose weights, gradients and AdamW state do not fit on one GPU (Llama-3-8B; parallel.py).

The embedded demo (no download; a tiny Llama learns to prefer sorting letters over copying
them; about a minute on 2 CPU cores):
$ python train.py

One process (CPU or one GPU):
$ python train.py --model path/to/Llama-3-8B-SFT --data ultrafeedback/ --loss pair_mnm --out out/mnm

DDP on 8 GPUs of one node (NCCL on CUDA, gloo on CPU):
$ torchrun --standalone --nproc_per_node 8 train.py --model ... --data ... --out ...

DDP across 2 nodes (run on each node, with its --node_rank):
$ torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST --master_port 29500 train.py ...

FSDP (parameters, gradients and optimizer state sharded over all ranks), on one node or several:
$ torchrun --standalone --nproc_per_node 8 train.py --fsdp --gradient_checkpointing --model ... --data ... --out ...

Continue an interrupted run from the newest complete checkpoint in --out (checkpoint.py says what
a run writes and what survives a crash):
$ python train.py ... --out out/mnm --resume
"""

import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from baselines import BASELINES
from checkpoint import (
    Preemption,
    check_out,
    check_out_flags,
    check_resumable,
    check_same_data,
    checkpoints,
    clear_out,
    data_fingerprint,
    lock_out,
    resume_point,
    save_checkpoint,
    saving,
    set_rng_state,
    trim_metrics,
    write_args,
)
from chat import TEMPLATES, ChatTokenizer
from cli import ArgumentParser, check_device, check_lengths, check_model_fits, fail, one_line_errors
from data import GroupLoader, default_cache_dir, load_tokenized, micro_batches, scale_sets, tokenize_groups
from formats import data_files, read_groups
from metrics import MetricsLog, StepStats, evaluate, generation_success
from model import Llama, LlamaConfig, check_pretrained
from mppo import LOSSES, has_preference
from packing import Scoring, make_batch, score_batch, score_groups
from parallel import Replicated, Sharded, all_gather, all_reduce_sum, barrier, setup_distributed

HERE = os.path.dirname(os.path.abspath(__file__))
POINT_LOSSES = ("point_ce", "point_mse")


def parse_args(argv=None):
    p = ArgumentParser(prog="train.py", description="MPPO preference optimization (and SFT) of a Llama 3 checkpoint.")
    a = p.add_argument
    a(
        "--model",
        help="starting checkpoint: a Hugging Face-format Llama folder (config.json, *.safetensors, tokenizer.json)",
    )
    a(
        "--data",
        nargs="+",
        help="training groups: files, folders or globs in any format data.py reads (.jsonl, .json, .parquet, .gz)",
    )
    a("--eval_data", nargs="+", default=None, help="held-out groups, evaluated every --eval_every steps and at the end")
    a("--data_format", default=None, help="override the detected data format (see data.py)")
    a(
        "--score_field",
        default=None,
        help="rows of one response each (HelpSteer2-style): the numeric field that scores them",
    )
    a(
        "--score_range",
        type=float,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="point-wise losses: the scale of the scores, mapped onto [0, 1] "
        "(default: [0, 1] as is, 1-10 divided by 10)",
    )
    a(
        "--template",
        default=None,
        choices=TEMPLATES,
        help="chat template (default: detected from the checkpoint's template text)",
    )
    a(
        "--date_string",
        default=None,
        help="the date Llama 3.2/3.3 chat templates print (default: today, as transformers does); "
        "pin it for reproducible data",
    )
    a(
        "--loss",
        default="pair_mnm",
        choices=sorted(LOSSES) + sorted(BASELINES) + ["sft"],
        help="MPPO variant, a baseline of the paper's Table 2 (simpo, orpo, dpo; see baselines.py), "
        "or sft: NLL of the best response",
    )
    a(
        "--beta",
        type=float,
        default=None,
        help="simpo / dpo: reward scale beta (default: 2.0 for simpo, SimPO's Llama-3-Base recipe; 0.1 for dpo)",
    )
    a(
        "--gamma_beta_ratio",
        type=float,
        default=0.5,
        help="simpo: target margin gamma as a multiple of beta (SimPO's Llama-3-Base recipe)",
    )
    a(
        "--orpo_lambda",
        type=float,
        default=0.1,
        help="orpo: weight lambda of the odds-ratio term beside the SFT loss (ORPO paper)",
    )
    a("--out", default="out/run", help="output folder: args.json, metrics.jsonl, checkpoint-STEP/, final/")
    a(
        "--overwrite",
        action="store_true",
        help="delete the outputs of an earlier run in --out first (else such an --out is refused)",
    )
    a(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in --out (from --model if there is none yet)",
    )
    a(
        "--allow_change",
        nargs="+",
        default=[],
        metavar="FLAG",
        help="--resume with these flags (names without --) changed from the checkpoint's, e.g. lr max_steps; "
        "args.json records the change (without it, a resume with a changed flag that defines the run is refused)",
    )
    a("--epochs", type=int, default=1, help="passes over the training data (ignored when --max_steps > 0)")
    a("--max_steps", type=int, default=0, help="optimizer steps to run; 0: --epochs passes")
    a("--batch_size", type=int, default=128, help="groups per optimizer step, over all ranks")
    a("--micro_batch_size", type=int, default=4, help="groups per forward/backward on one rank (gradient accumulation)")
    a("--max_tokens", type=int, default=None, help="optional token budget of one micro-batch (prompt + all responses)")
    a("--lr", type=float, default=5e-7, help="peak learning rate")
    a(
        "--warmup_ratio",
        type=float,
        default=0.1,
        help="share of the steps spent in linear warmup before the cosine decay",
    )
    a("--weight_decay", type=float, default=0.0, help="AdamW weight decay (matrices only; norms are never decayed)")
    a(
        "--adam_betas",
        type=float,
        nargs=2,
        default=[0.9, 0.999],
        metavar=("BETA1", "BETA2"),
        help="AdamW's betas (PyTorch's, TRL's and SimPO's recipe; nanoGPT uses 0.9 0.95)",
    )
    a("--grad_clip", type=float, default=1.0, help="clip the global gradient norm to this; 0 disables")
    a("--max_length", type=int, default=2048, help="longest prompt + response in tokens; responses are cut to fit")
    a("--max_prompt_length", type=int, default=1800, help="longest prompt in tokens; longer prompts keep their end")
    a("--score_header", action="store_true", help="score the assistant header tokens as part of the response")
    a(
        "--cache_dir",
        default=None,
        help="where tokenized data sets are kept between runs (default: $MPPO_CACHE, else ~/.cache/mppo)",
    )
    a("--no_cache", action="store_true", help="tokenize the data afresh and keep nothing on disk")
    a(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="compute dtype (None: bfloat16 on GPU, float32 on CPU); weights and AdamW stay float32. "
        "float16 is refused: it needs a gradient scaler, bfloat16 does not",
    )
    a(
        "--save_dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="dtype of final/ (None: the starting checkpoint's torch_dtype); "
        "checkpoint-STEP/ is always float32 for exact resume",
    )
    a(
        "--device",
        default=None,
        help="cpu, cuda or cuda:N (None: cuda when available; under torchrun each rank takes cuda:LOCAL_RANK)",
    )
    a("--gradient_checkpointing", action="store_true", help="recompute each block's activations in backward")
    a("--compile", action="store_true", help="torch.compile each transformer block")
    a(
        "--fsdp",
        action="store_true",
        help="shard parameters, gradients and AdamW state over all ranks (FSDP2) instead of DDP's full replicas",
    )
    a(
        "--fsdp_grad_sync",
        default="every",
        choices=["every", "last"],
        help="--fsdp with gradient accumulation: reduce-scatter gradients every micro-step, so each rank holds "
        "only its shard of them (every), or only on the last micro-step, holding full unsharded gradients "
        "until then (last: less communication)",
    )
    a(
        "--layout",
        default="packed",
        choices=["packed", "padded"],
        help="packed: one forward per group with a shared prompt; padded: naive baseline",
    )
    a("--chunk_size", type=int, default=1024, help="positions per chunk of the language-model head in the loss")
    a(
        "--attn_impl",
        default="auto",
        choices=["auto", "sdpa", "segments", "flex"],
        help="attention of packed rows: sdpa with a dense mask; segments: SDPA per prompt/response span; "
        "flex: flex_attention with a block mask (CUDA only); auto: packing.choose_attention",
    )
    a("--seed", type=int, default=0, help="seed of the data order, Pair-Single's draws and everything else random")
    a("--log_every", type=int, default=10, help="log training metrics every this many steps")
    a("--report_to", default="none", choices=["none", "tensorboard", "wandb"], help="also send the logged metrics here")
    a("--eval_every", type=int, default=0, help="evaluate on --eval_data every this many steps (0: only at the end)")
    a(
        "--eval_generate",
        type=int,
        default=0,
        help="also greedy-decode this many eval prompts and report exact match with a best response",
    )
    a("--save_every", type=int, default=0, help="write OUT/checkpoint-STEP/ every this many steps (0: only final/)")
    a("--save_total_limit", type=int, default=2, help="keep only the newest this many checkpoints (0: all)")
    return p.parse_args(argv)


def check_args(args):
    """Every flag checked before anything is loaded, each fault in one line."""
    for flag in ("model", "data"):
        if not getattr(args, flag):
            fail(f"--{flag} is required (run `python train.py` with no arguments for the demo)")
    positive = ["batch_size", "micro_batch_size", "log_every", "chunk_size", "max_length", "max_prompt_length"]
    positive += ["epochs"] * (args.max_steps == 0) + ["max_tokens"] * (args.max_tokens is not None)
    for flag in positive:
        if getattr(args, flag) < 1:
            fail(f"--{flag} {getattr(args, flag)}: must be at least 1")
    for flag in ("max_steps", "eval_every", "eval_generate", "save_every", "save_total_limit"):
        if getattr(args, flag) < 0:
            fail(f"--{flag} {getattr(args, flag)}: must be 0 or more")
    if not (math.isfinite(args.lr) and args.lr > 0):
        fail(f"--lr {args.lr}: must be a positive number")
    for flag, lo, hi in (("warmup_ratio", 0, 1), ("weight_decay", 0, math.inf), ("grad_clip", 0, math.inf)):
        if not lo <= getattr(args, flag) <= hi:  # NaN fails too
            fail(f"--{flag} {getattr(args, flag)}: must be in [{lo}, {hi}]")
    if not all(0 <= b < 1 for b in args.adam_betas):
        fail(f"--adam_betas {args.adam_betas[0]:g} {args.adam_betas[1]:g}: each must be in [0, 1)")
    if args.beta is not None and not args.beta > 0:
        fail(f"--beta {args.beta}: must be positive")
    if args.dtype == "float16":
        fail("--dtype float16 trains without a gradient scaler here (fp16 gradients underflow): use --dtype bfloat16")
    check_device(args.device)
    check_lengths(args.max_length, args.max_prompt_length)
    check_out_flags(args)
    for flag in ("eval_every", "eval_generate"):
        if getattr(args, flag) and not args.eval_data:
            fail(f"--{flag} {getattr(args, flag)} evaluates on --eval_data, which is not given")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.attn_impl == "flex" and not device.startswith("cuda"):
        fail("--attn_impl flex needs CUDA (torch has no flex_attention backward on CPU): use segments or sdpa")
    if args.report_to != "none":
        MetricsLog.check_tracker(args.report_to)


def counted_groups(loss_name, scores, mask):
    """(B,) bool: the groups whose loss enters the average. Pair- and list-wise losses need a
    preference; point-wise losses (all-tie groups still carry targets) and sft take every group."""
    return mask.any(dim=1) if loss_name in POINT_LOSSES + ("sft",) else has_preference(scores, mask)


def make_loss(name, generator=None, beta=None, gamma_beta_ratio=0.5, orpo_lambda=0.1):
    """loss_fn(logps, batch) -> ((B,) loss of each group, (B,) bool: counted_groups), for the loss called name.
    sft: negative mean token log-likelihood of the best response. generator: Pair-Single's draws; beta None:
    the function's default, from its paper."""
    beta = {} if beta is None else {"beta": beta}
    hyper = {
        "pair_single": {"generator": generator},
        "simpo": {"gamma_beta_ratio": gamma_beta_ratio, **beta},
        "orpo": {"lam": orpo_lambda},
        "dpo": beta,
    }.get(name, {})

    def loss_fn(logps, batch):
        scores, mask = batch.scores, batch.mask
        counted = counted_groups(name, scores, mask)
        if name == "sft":
            best = scores.masked_fill(~mask, float("-inf")).argmax(dim=1, keepdim=True)
            return -logps.gather(1, best).squeeze(1), counted
        if name == "dpo":
            hyper.update(ref_logps=batch.ref_logps, lengths=batch.num_scored)
        return {**LOSSES, **BASELINES}[name](logps, scores, mask, **hyper), counted

    return loss_fn


def loss_of(args, generator):
    """make_loss with the loss flags."""
    return make_loss(args.loss, generator, args.beta, args.gamma_beta_ratio, args.orpo_lambda)


def scoring_of(args, pad_id):
    """The packing.Scoring of the flags: how groups become forwards."""
    return Scoring(
        layout=args.layout,
        micro_batch_size=args.micro_batch_size,
        max_tokens=args.max_tokens,
        chunk_size=args.chunk_size,
        attn_impl=args.attn_impl,
        pad_id=pad_id,
    )


def load_data(args, tok, rank, world, log):
    """Tokenize --data and --eval_data once per job (the ranks share the work) or take them from the cache;
    report what was skipped or cut. The groups are views into compact arrays (data.TokenizedSet)."""
    min_responses = 1 if args.loss == "sft" else 2
    pointwise = args.loss in POINT_LOSSES  # all-tie groups still carry point-wise targets
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    splits = []
    for spec in [args.data] + ([args.eval_data] if args.eval_data else []):
        tokenized, summary = load_tokenized(
            spec,
            tok,
            args.max_length,
            args.max_prompt_length,
            format=args.data_format,
            min_responses=min_responses,
            require_preference=not pointwise,
            score_field=args.score_field,
            include_header=args.score_header,
            cache_dir=cache_dir,
            rank=rank,
            world=world,
            gather=all_gather,
            log=log,
        )
        name = " ".join(spec)
        log(f"{name}: {len(tokenized)} groups\n{summary}".rstrip())
        if not len(tokenized):
            fail(f"{name}: no usable group after reading and tokenizing (see the summary above)")
        splits.append(tokenized)
    if pointwise:  # one scaling rule for train and eval alike
        scale_sets(splits, args.score_range)
    groups = [s.groups for s in splits]
    loader = GroupLoader(groups[0], args.batch_size, rank=rank, world_size=world, seed=args.seed)
    return loader, groups[0], (groups[1] if args.eval_data else [])


class Progress:
    """progress(done, total) prints a line at most every 10 s, so a long phase shows it is moving."""

    def __init__(self, what, log, every=10.0):
        self.what, self.log, self.every, self.last = what, log, every, time.time()

    def __call__(self, done, total):
        if time.time() - self.last >= self.every:
            self.log(f"{self.what} {done}/{total}")
            self.last = time.time()


@torch.no_grad()
def reference_logps(parallel, model_dir, groups, scoring, log):
    """DPO's reference: each group's (K,) mean token log-probs under the model in model_dir, computed
    once before training and stored on each group (ref_logps), so no second model stays in memory
    while training. Each rank scores an equal share; the shares are all-gathered."""
    model = parallel.load_frozen(model_dir)
    rank, world = parallel.rank, parallel.world
    share = list(range(rank, len(groups), world))
    share += share[:1] * (math.ceil(len(groups) / world) - len(share))  # equal forwards on every rank
    mine, rows, progress = [groups[i] for i in share], [], Progress("reference log-probs, groups on rank 0:", log)
    for _, logps in score_groups(model, mine, scoring, parallel.autocast, parallel.even):  # (B, K) each
        rows += logps.tolist()
        progress(len(rows), len(mine))
    rows = [row[: len(g.response_ids)] for g, row in zip(mine, rows)]
    for indices, their_rows in all_gather((share, rows)):
        for i, row in zip(indices, their_rows):
            groups[i].ref_logps = row


def make_optimizer(args, module, total_steps):
    """AdamW, decaying matrices only, never norm weights (nanoGPT's split); linear warmup, then cosine to 0."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        groups, lr=args.lr, betas=tuple(args.adam_betas), eps=1e-8, fused=module.lm_head.weight.is_cuda
    )
    warmup = round(args.warmup_ratio * total_steps)

    def lr_lambda(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(total_steps - warmup, 1), 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


def restore_flags(args, optimizer, scheduler):
    """On resume, loading the optimizer and schedule brought back the checkpoint's lr, betas and weight decay;
    this run's flags win (the same, unless changed with --allow_change). The next step's lr is the schedule's
    at this step, computed as LambdaLR computes it (so an unchanged run resumes bit-identical)."""
    for group, decay in zip(optimizer.param_groups, (args.weight_decay, 0.0)):  # make_optimizer's two groups
        group.update(betas=tuple(args.adam_betas), weight_decay=decay, initial_lr=args.lr)
    scheduler.base_lrs = [args.lr] * len(optimizer.param_groups)
    for group, lr_lambda in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = args.lr * lr_lambda(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def peak_memory_gb(device):
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak resident memory so far (Linux: KiB)


def quiet(*args, **kwargs):
    """What log is on ranks other than 0: only rank 0 prints."""


@dataclass
class Run:
    """What setup() hands the training loop."""

    args: object  # the parsed flags
    log: object  # print on rank 0, quiet elsewhere: every console line of a run goes through it
    parallel: object  # Replicated (one process, DDP) or Sharded (FSDP): the model, its gradient sync, saving
    model: torch.nn.Module  # parallel's model, the one to call (a DDP wrapper under DDP)
    tok: object  # the chat tokenizer (eval --eval_generate decodes with it)
    scoring: Scoring  # how groups become forwards (layout, micro-batches, head chunks, attention)
    loader: GroupLoader  # this rank's share of each global batch, epoch after epoch
    eval_groups: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator  # Pair-Single's draws in training
    loss_fn: object  # make_loss: (logps, batch) -> (losses, counted)
    total_steps: int
    step: int  # the step to start from: 0, or the resumed checkpoint's
    resumed: bool  # from a checkpoint of --out (False: from --model)
    save_dtype: object  # dtype of final/ (None: float32)
    records: MetricsLog | None  # metrics.jsonl and the console, on rank 0 only

    def emit(self, record):
        if self.records is not None:
            self.records.write(record)


def setup(args):
    """Checks and loads, in order, everything the loop needs: flags, processes, --out, the model folder,
    data, model, optimizer and resume state. A fault ends the run with one line, before any work."""
    check_args(args)
    rank, world, device = setup_distributed(args.device)
    log = print if rank == 0 else quiet
    if args.batch_size % world:
        fail(f"--batch_size {args.batch_size} must be divisible by the number of processes ({world})")
    try:
        if rank == 0:  # --out is this run's alone (a lock), and a used one is refused unless --resume/--overwrite
            lock_out(args.out)
            check_out(args.out, args.resume, args.overwrite)
        barrier()  # no rank looks for checkpoints while rank 0 repairs --out
        data_files(args.data + (args.eval_data or []))
        config = check_pretrained(args.model)
        tok = ChatTokenizer.from_pretrained(args.model, template=args.template, date_string=args.date_string)
        check_model_fits(config, tok, args.model, args.max_length, log)
        resume_dir, state = resume_point(args.out, log) if args.resume else (None, None)
    except (OSError, ValueError) as e:  # a bad model folder, data path or --out: one line, before any work
        fail(e)
    changed = check_resumable(state, args, resume_dir) if state else None
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    generator = torch.Generator(device=device).manual_seed(args.seed + rank)  # Pair-Single's draws
    try:
        loader, train_groups, eval_groups = load_data(args, tok, rank, world, log)
    except (OSError, ValueError) as e:  # DataError, too few groups: one line naming file and row
        fail(e)
    if state:
        check_same_data(state, train_groups, args, resume_dir)
    if rank == 0:  # everything checked: only now is an earlier run deleted (--overwrite) and args.json written
        if args.overwrite:
            clear_out(args.out)
        write_args(args.out, args, world, (state["step"], changed) if state else None)
    total_steps = args.max_steps if args.max_steps > 0 else args.epochs * loader.steps_per_epoch
    if args.resume and state is None:
        log(f"--resume: no complete checkpoint in {args.out} yet, starting from {args.model}")

    parallel = Sharded(device, dtype, grad_sync=args.fsdp_grad_sync) if args.fsdp else Replicated(device, dtype)
    scoring = scoring_of(args, tok.pad_id)
    if args.loss == "dpo":  # the reference is the starting model (also on resume): scored once, then freed
        reference_logps(parallel, args.model, train_groups + eval_groups, scoring, log)
    model = parallel.load(resume_dir or args.model, gradient_checkpointing=args.gradient_checkpointing)
    if args.compile:
        for block in parallel.module.model.layers:
            block.compile()
    optimizer, scheduler = make_optimizer(args, parallel.module, total_steps)
    step = 0
    if state:
        parallel.load_state(optimizer, resume_dir)
        scheduler.load_state_dict(state["scheduler"])
        restore_flags(args, optimizer, scheduler)
        try:
            loader.load_state_dict(state["loader"])
        except ValueError as e:  # --allow_change data, and the new data has another size
            fail(f"--resume: the data position of {resume_dir} does not fit this data ({e})")
        step = state["step"]
        if state["world_size"] == world:
            set_rng_state(state["rng"][rank], {"train": generator})
        else:
            log(
                f"--resume: {state['world_size']} processes wrote the checkpoint, {world} run now: "
                "RNG streams start afresh"
            )
        log(f"resumed from {resume_dir} at step {step}")
    if args.resume and rank == 0:  # what a killed run logged after its checkpoint is logged again below
        trim_metrics(args.out, step if state else None)
    records = MetricsLog(args.out, total_steps, args.report_to, vars(args)) if rank == 0 else None
    log(
        f"training {args.loss} on {len(train_groups)} groups: {total_steps} steps of {args.batch_size} groups "
        f"({loader.steps_per_epoch} steps/epoch), {world} process(es) on {device}, {dtype}"
    )
    return Run(
        args,
        log,
        parallel,
        model,
        tok,
        scoring,
        loader,
        eval_groups,
        optimizer,
        scheduler,
        generator,
        loss_of(args, generator),
        total_steps,
        step,
        state is not None,
        args.save_dtype or config.torch_dtype,
        records,
    )


def train_step(run, rank_groups, step, stats):
    """One optimizer step on this rank's share of the global batch: micro-batches -> log-probs -> loss ->
    backward, then clip the gradient norm and step. Adds the step's numbers to stats (metrics.StepStats)."""
    parallel, world, device = run.parallel, run.parallel.world, run.parallel.device
    s = run.scoring
    micro = micro_batches(rank_groups, s.micro_batch_size, s.max_tokens)
    mbs = [make_batch(mb, s.layout, s.pad_id, s.max_tokens) for mb in micro]
    # the loss is averaged over the groups that count in the whole global batch, so the
    # gradient is the same for any number of processes and micro-batches
    local = sum(counted_groups(run.args.loss, b.scores, b.mask).sum().item() for b in mbs)
    n_counted, n_total = all_reduce_sum([local, len(rank_groups)], device)
    steps = parallel.even(mbs)
    for i, (batch, real) in enumerate(steps):
        batch = batch.to(device)
        with parallel.sync(last=i == len(steps) - 1):
            logps = score_batch(run.model, batch, s, parallel.autocast)  # (B, K) float32
            losses, counted = run.loss_fn(logps, batch)
            # DDP and FSDP average gradients over ranks; times world gives the sum over the global batch
            loss = (losses * counted).sum() * world / max(n_counted, 1) * real  # a repeat (FSDP) weighs zero
            loss.backward()
        if real:
            stats.add_micro_batch(loss.item() / world, batch.num_tokens, logps, batch.scores, batch.mask)
        del logps, losses, loss
    grad_norm = parallel.clip_grad_norm(run.args.grad_clip)
    if not torch.isfinite(grad_norm):
        fail(
            f"step {step + 1}: the gradient norm is {grad_norm.item()} (non-finite loss or gradient); stopped "
            "before the weights were changed. Lower --lr or check the data; --resume continues from the last "
            "checkpoint"
        )
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    stats.add_step(n_total, n_total - n_counted, grad_norm.item())


def run_eval(run, step):
    """Loss and ranking metrics on --eval_data (and greedy success on --eval_generate prompts), logged at step.
    Its own Pair-Single generator, seeded alike every time: evaluating never changes training."""
    if not run.eval_groups:
        return
    args, parallel = run.args, run.parallel
    loss_fn = loss_of(args, torch.Generator(device=parallel.device).manual_seed(args.seed + parallel.rank))
    metrics = evaluate(run.model, run.eval_groups, loss_fn, run.scoring, parallel)
    if args.eval_generate:
        metrics["gen_success"] = generation_success(parallel.module, run.tok, run.eval_groups, args.eval_generate)
    run.emit({"split": "eval", "step": step, **metrics})


def save(run, step):
    """OUT/checkpoint-STEP/: weights, AdamW, scheduler, data order and RNG streams (checkpoint.py)."""
    args = run.args
    trainer_state = {
        "scheduler": run.scheduler.state_dict(),
        "loader": run.loader.state_dict(),
        "world_size": run.parallel.world,
        "args": vars(args),
        "data_sha256": data_fingerprint(run.loader.groups),
    }
    save_checkpoint(
        args.out, step, run.parallel, run.optimizer, trainer_state, {"train": run.generator}, args.save_total_limit
    )


def train(args):
    """Runs one training job from parsed args; returns the path of the final model."""
    run = setup(args)
    step, total, device = run.step, run.total_steps, run.parallel.device
    if not run.resumed and args.eval_every:
        run_eval(run, step)
    run.model.train()
    t_start, start_step, stats = time.time(), step, StepStats()
    preemption = Preemption(loud=run.parallel.rank == 0)  # SIGTERM: finish the step, save, exit
    try:
        while step < total:
            for rank_groups in run.loader:
                train_step(run, rank_groups, step, stats)
                step += 1
                if step % args.log_every == 0 or step == total:
                    now = time.time()
                    run.emit(
                        {
                            "split": "train",
                            "step": step,
                            "epoch": round(step / run.loader.steps_per_epoch, 3),
                            "lr": run.scheduler.get_last_lr()[0],
                            **stats.summary(device),
                            "peak_mem_gb": round(peak_memory_gb(device), 3),
                            "elapsed_s": round(now - t_start, 1),
                            "eta_s": round((now - t_start) / (step - start_step) * (total - step), 1),
                        }
                    )
                    stats.reset()
                if args.eval_every and step % args.eval_every == 0 and step < total:
                    run_eval(run, step)
                if args.save_every and step % args.save_every == 0 and step < total:
                    save(run, step)
                if preemption.agreed(device):  # every rank stops after the same step
                    folder = os.path.join(args.out, f"checkpoint-{step}")
                    if not os.path.isdir(folder):
                        save(run, step)
                    fail(
                        f"stopped by SIGTERM after step {step}, saved in {folder}: run the same command with "
                        f"--resume to continue"
                    )
                if step >= total:
                    break
    except KeyboardInterrupt:
        last = (checkpoints(args.out) or [args.model])[-1]
        fail(f"interrupted at step {step}; --resume would continue from {last}")
    finally:
        preemption.restore()

    run_eval(run, step)
    final = os.path.join(args.out, "final")
    with saving(args.out, "final") as tmp:
        run.parallel.save(tmp, source_dir=args.model, dtype=run.save_dtype)
    if run.records is not None:
        run.records.close()
    run.log(f"saved {final} ({run.save_dtype or 'float32'})")
    barrier()  # every rank returns (and may tear the process group down) only once rank 0 is done
    return final


# -----------------------------------------------------------------------------
# the embedded demo: `python train.py` with no arguments


def demo(out="out/demo", seed=0):
    """Random tiny Llama -> short SFT on sloppy demonstrations -> Pair-MNM on scored groups.
    Prints held-out ranking accuracy of p and greedy task success before and after MPPO, and returns
    them as [(name, metrics)]. seed sets the initial weights and --seed of both stages."""
    src = os.path.join(HERE, "demo")
    t0 = time.time()
    torch.manual_seed(seed)
    init = os.path.join(out, "init")
    Llama(LlamaConfig.from_json(os.path.join(src, "config.json"))).save_pretrained(init, source_dir=src)
    # the demo's rates were tuned with nanoGPT's betas; --overwrite: each `python train.py` starts afresh
    common = [
        "--eval_data",
        os.path.join(src, "eval.jsonl"),
        "--max_length",
        "64",
        "--max_prompt_length",
        "32",
        "--log_every",
        "25",
        "--seed",
        str(seed),
        "--adam_betas",
        "0.9",
        "0.95",
        "--overwrite",
        "--epochs",
        "2",
        "--batch_size",
        "32",
        "--micro_batch_size",
        "32",
    ]
    print("== 1. SFT on demonstrations that mostly copy the letters instead of sorting them")
    sft = train(
        parse_args(
            [
                "--model",
                init,
                "--data",
                os.path.join(src, "sft.jsonl"),
                "--loss",
                "sft",
                "--out",
                os.path.join(out, "sft"),
                "--lr",
                "3e-3",
                "--warmup_ratio",
                "0.05",
                *common,
            ]
        )
    )
    print(
        "== 2. Pair-MNM on groups of 3-6 scored answers "
        "(sorted: 10, also with commas in a fifth of them; mistakes: 1-6, often tied)"
    )
    mnm = train(
        parse_args(
            [
                "--model",
                sft,
                "--data",
                os.path.join(src, "train.jsonl"),
                "--loss",
                "pair_mnm",
                "--out",
                os.path.join(out, "mnm"),
                "--lr",
                "1e-3",
                "--warmup_ratio",
                "0.1",
                *common,
                "--log_every",
                "10",
                "--eval_every",
                "25",
            ]
        )
    )
    print("== 3. Held-out prompts, before and after MPPO")
    tok = ChatTokenizer.from_pretrained(src)
    groups, _ = read_groups(os.path.join(src, "eval.jsonl"))
    eval_groups, _ = tokenize_groups(groups, tok, 64, 32)
    scoring = Scoring(micro_batch_size=64, pad_id=tok.pad_id)  # train.py's other defaults
    parallel = Replicated(torch.device("cpu"))
    rows = []
    for name, path in (("SFT", sft), ("SFT + Pair-MNM", mnm)):
        model = Llama.from_pretrained(path)
        m = evaluate(model, eval_groups, make_loss("pair_mnm"), scoring, parallel)
        m["gen_success"] = generation_success(model, tok, eval_groups, len(eval_groups))
        rows.append((name, m))
    print("| model | top-1 acc of p | pairwise acc | p chosen | p rejected | greedy answers sorted |")
    print("|---|---|---|---|---|---|")
    for name, m in rows:
        print(
            f"| {name} | {m['top1_acc']:.3f} | {m['pair_acc']:.3f} | {m['p_chosen']:.3f} | {m['p_rejected']:.3f} "
            f"| {m['gen_success']:.3f} |"
        )
    print(f"demo finished in {time.time() - t0:.0f} s; models in {out}/sft/final and {out}/mnm/final")
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        demo() if not argv else train(parse_args(argv))
    except KeyboardInterrupt:  # outside the training loop (reading data, evaluating, writing final/)
        fail("interrupted (Ctrl-C)")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    one_line_errors(main)()
