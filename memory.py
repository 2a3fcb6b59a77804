"""
Per-GPU memory of a train.py run, known before launching it. One optimizer step of what train.py
runs with the same flags is simulated in one process on a CPU: fake tensors (shapes and dtypes, no
data), a fake process group of --nproc ranks, and PyTorch's FSDP memory tracker counting every
tensor a rank holds, by category. Only config.json is read; no weights, no GPU, torch only.

$ python memory.py --model llama3-8b --nproc 8 --fsdp --gradient_checkpointing --max_tokens 6500
$ python memory.py --model path/to/Llama-3.2-3B --micro_batch_size 2 --gpu_memory 24

What runs is train.py's own code: parallel.Sharded's FSDP units and mixed precision (or
parallel.Replicated: one process, or DDP), data.micro_batches -> packing.make_batch ->
packing.score_batch -> train.loss_of's loss -> backward under parallel.sync -> clip -> AdamW from
train.make_optimizer (fused, as on a GPU) -> zero_grad: train.train_step, less its .item() calls.
The AdamW moments exist before the step (as in every step after the first), and the step runs two
micro-batches, so `--fsdp_grad_sync last` shows the full gradients held between them. The
micro-batch is --micro_batch_size groups of --group_tokens tokens (prompt + --responses answers),
or, with --max_tokens, groups filling exactly that budget: the largest micro-batch the flag allows.
Attention 'auto' is what train.py picks on a GPU: SDPA with a dense mask.

DDP's reducer does not run on fake tensors: DDP is simulated as one process (every rank's memory is
the same), plus the gradient buckets DDP allocates (a float32 copy of the gradients), counted.

Left out: the CUDA context and kernel workspaces, NCCL's buffers and the caching allocator's
fragmentation, about 1-3 GB more on a real GPU; DPO's reference pass (before training, no
gradients: less than a training step).

Private PyTorch APIs this relies on (checked on torch 2.13; the test compares against real tensors):
the "fake" process-group backend, registered on importing torch.testing._internal.distributed.fake_pg;
torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker (and MemTracker without FSDP) and their
hooks; DTensor's sharding propagation, which runs on full-size fake tensors in whatever fake mode is
active, so it is given a fake mode of its own (else the tracker counts full-size phantom tensors).
"""

import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.distributed.tensor._sharding_prop as sharding_prop
import torch.testing._internal.distributed.fake_pg  # noqa: F401 -- registers the "fake" process-group backend
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker

from cli import ArgumentParser, fail
from data import micro_batches
from model import Llama, LlamaConfig
from packing import make_batch, score_batch
from parallel import Replicated, Sharded
from train import loss_of, make_optimizer, scoring_of

HERE = os.path.dirname(os.path.abspath(__file__))
GB = 1e9
# config.json of named shapes, as the Hub ships them (only the keys that size the model)
LLAMA3 = dict(
    vocab_size=128256,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
)
LLAMA32 = dict(
    LLAMA3,
    intermediate_size=8192,
    max_position_embeddings=131072,
    tie_word_embeddings=True,
    rope_scaling=dict(
        rope_type="llama3",
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
)
SHAPES = {
    "llama3-8b": dict(
        LLAMA3,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "llama3-70b": dict(
        LLAMA3,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
    "llama3.2-1b": dict(
        LLAMA32, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64
    ),
    "llama3.2-3b": dict(
        LLAMA32, hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128
    ),
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    ),
}
# the tracker's categories (FSDPMemTracker's, MemTracker's), as the report names them
ROWS = [
    ("float32 weights, this rank's (shards under FSDP)", ("Sharded Param", "Parameter")),
    ("float32 gradients, this rank's", ("Sharded Grad", "Gradient")),
    ("AdamW moments", ("OptState", "Optstate")),
    ("gathered weights (compute dtype)", ("Unsharded Param", "All Gather")),
    ("unsharded gradients", ("Unsharded Grad",)),
    ("reduce-scatter buffers", ("Reduce Scatter",)),
    ("activations (saved for backward)", ("Activation",)),
    ("temporaries of backward", ("Temp",)),
    ("inputs, buffers, other", ("Inputs", "Buffer", "Other")),
]


def parse_args(argv=None):
    p = ArgumentParser(prog="memory.py", description="Per-GPU memory of a train.py run, simulated on a CPU.")
    a = p.add_argument
    a(
        "--model",
        default="llama3-8b",
        help=f"a checkpoint folder (only config.json is read) or a named shape: {', '.join(SHAPES)}",
    )
    a("--nproc", type=int, default=1, help="processes (GPUs) in all, over every node: the world size")
    a("--fsdp", action="store_true", help="train.py --fsdp: shard weights, gradients and AdamW state (else DDP)")
    a("--fsdp_grad_sync", default="every", choices=Sharded.GRAD_SYNCS, help="train.py --fsdp_grad_sync")
    a("--micro_batch_size", type=int, default=4, help="groups per forward/backward on one rank")
    a("--max_tokens", type=int, default=None, help="token budget of one micro-batch; the plan fills it exactly")
    a(
        "--group_tokens",
        type=int,
        default=1625,
        help="without --max_tokens: tokens of one group, prompt + all responses (a packed UltraFeedback group: ~1.6k)",
    )
    a("--responses", type=int, default=4, help="responses per group")
    a("--gradient_checkpointing", action="store_true", help="recompute each block's activations in backward")
    a("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="compute dtype (train.py's on a GPU)")
    a("--chunk_size", type=int, default=1024, help="positions per chunk of the language-model head in the loss")
    a("--attn_impl", default="auto", choices=["auto", "sdpa", "segments"], help="attention of packed rows (auto: sdpa)")
    a("--layout", default="packed", choices=["packed", "padded"], help="packed or padded groups")
    a("--loss", default="pair_mnm", help="train.py --loss (the loss barely matters: it acts on (B, K) numbers)")
    a("--gpu_memory", type=float, default=80.0, help="GB of one GPU, to say whether the run fits")
    a("--fit", action="store_true", help="also simulate the largest --max_tokens estimated to fit --gpu_memory")
    args = p.parse_args(argv)
    for flag in ("nproc", "micro_batch_size", "group_tokens", "responses", "chunk_size"):
        if getattr(args, flag) < 1:
            fail(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.max_tokens is not None and args.max_tokens < 2 * args.micro_batch_size * (args.responses + 1):
        fail(
            f"--max_tokens {args.max_tokens}: too small for {args.micro_batch_size} groups of "
            f"{args.responses} responses"
        )
    # what train.py reads besides these, at its defaults
    args.beta, args.gamma_beta_ratio, args.orpo_lambda = None, 0.5, 0.1
    args.lr, args.adam_betas, args.weight_decay, args.warmup_ratio, args.grad_clip = 5e-7, [0.9, 0.999], 0.0, 0.1, 1.0
    return args


def read_shape(model):
    """LlamaConfig of a named shape or of model/config.json."""
    try:
        if model in SHAPES:
            return LlamaConfig.from_dict(SHAPES[model])
        return LlamaConfig.from_json(Path(model) / "config.json")
    except (OSError, ValueError) as e:
        fail(e)


def micro_batch_groups(args, tokens):
    """micro_batch_size groups of `tokens` tokens in all: each a prompt (a fifth) and equal responses, with
    distinct scores."""
    groups = []
    for b in range(args.micro_batch_size):
        n = tokens // args.micro_batch_size + (b < tokens % args.micro_batch_size)
        P = max(1, n // 5)
        lengths = [(n - P) // args.responses + (k < (n - P) % args.responses) for k in range(args.responses)]
        groups.append(
            SimpleNamespace(
                prompt_ids=[1] * P,
                response_ids=[[2] * L for L in lengths],
                scores=[float(k) for k in range(args.responses)],
                ref_logps=[-1.0] * args.responses,
            )
        )
    return groups


class Tracker:
    """The tracker of the FSDP (or plain) model, also noting where its peak happened: the innermost module running,
    or the FSDP unit last gathered, and forward or backward."""

    def __init__(self, model, optimizer, fsdp):
        self.where, self.unit, self.micro_step = None, None, 0
        outer = self
        base = FSDPMemTracker if fsdp else MemTracker

        class _Tracker(base):
            def _update_peak_stats(self, peak_state):
                before = dict(self._peak_mem)
                super()._update_peak_stats(peak_state)
                if self._peak_mem != before:
                    outer.note(self._mod_tracker)

            def _fsdp_param_group_pre_backward(self, fsdp_mod, orig):  # FSDPMemTracker only
                inner = super()._fsdp_param_group_pre_backward(fsdp_mod, orig)

                def pre_backward(*args, **kwargs):
                    outer.unit = self._mod_tracker.get_known_fqn(fsdp_mod)
                    return inner(*args, **kwargs)

                return pre_backward

            def _instrument_fsdp_module(self):
                super()._instrument_fsdp_module()
                # parallel.Sharded's lm_head computes the loss in a registered forward method, not in forward:
                # route it through the tracker's forward hooks too
                for module in self._root_mod.modules():
                    if hasattr(module, "target_logprobs"):
                        outer.instrument_head(self, module)

        self.tracker = _Tracker(model, optimizer) if fsdp else _Tracker()
        if not fsdp:
            self.tracker.track_external(model, optimizer)
        self.fsdp = fsdp

    def instrument_head(self, tracker, head):
        state = head._get_fsdp_state()
        pre = tracker._fsdp_state_pre_forward(head, state._pre_forward)
        post = tracker._fsdp_state_post_forward(head, state._post_forward)
        method = head.target_logprobs.__wrapped__  # the unwrapped method register_fsdp_forward_method wrapped

        def target_logprobs(*args):
            self.unit = tracker._mod_tracker.get_known_fqn(head)
            args, kwargs = pre(head, args, {})
            return post(head, args, method(*args, **kwargs))

        head.target_logprobs = target_logprobs

    def note(self, mod_tracker):
        names = [n for n in mod_tracker.parents if n != "Global"]
        inner = max(names, key=lambda n: (n.count("."), len(n)), default=None)
        if inner is None or inner.count(".") == 0:  # only the root runs: name the FSDP unit last gathered
            inner = self.unit or "the root module"
        inner = inner.split(".", 1)[1] if "." in inner else inner  # without the root's class name
        frame, code = sys._getframe(), None  # the innermost line of this project's code running
        while frame is not None and code is None:
            name = frame.f_code.co_filename
            if os.path.dirname(name) == HERE and name != __file__:
                code = f"{os.path.basename(name)}:{frame.f_code.co_qualname}"
            frame = frame.f_back
        phase = "backward" if mod_tracker.is_bw else "forward"
        self.where = f"{inner} {phase}{f', in {code}' if code else ''}, micro-step {self.micro_step + 1}"

    def peak(self):
        """(total bytes, {row: bytes}) of the peak."""
        snap = next(iter(self.tracker.get_tracker_snapshot("peak").values()))
        rows = {name: sum(v for k, v in snap.items() if k != "Total" and k.value in keys) for name, keys in ROWS}
        return snap["Total"], rows


def simulate(args, config, tokens, real=False):
    """One train.py step of a micro-batch of `tokens` tokens, on fake tensors and a fake process group of
    args.nproc ranks; returns a dict of what the tracker saw. real=True: the same on real tensors, in a process
    group already started (torchrun): what test_memory.py compares the simulation against. The fake process
    group and DTensor's patched fake-mode lookup are undone on return, so a caller in the same process (a test,
    then train.py) finds torch as it was."""
    started = not real and not dist.is_initialized()
    if started:
        dist.init_process_group("fake", store=dist.HashStore(), rank=0, world_size=args.nproc)
    detect_fake_mode = sharding_prop.detect_fake_mode
    try:
        return _simulate(args, config, tokens, real)
    finally:
        sharding_prop.detect_fake_mode = detect_fake_mode
        if started:
            dist.destroy_process_group()


def _simulate(args, config, tokens, real):
    world = args.nproc
    device, dtype = torch.device("cpu"), getattr(torch, args.dtype)
    if not real:
        # DTensor works out its outputs' shapes on full-size fake tensors: in a fake mode of its own, so the
        # tracker (which counts what runs in the active mode) does not see them
        propagation = FakeTensorMode()
        sharding_prop.detect_fake_mode = lambda *a, **k: propagation
    fake = nullcontext() if real else FakeTensorMode(allow_non_fake_inputs=True)  # the batch stays real: Python ints
    args.attn_impl = "sdpa" if args.attn_impl == "auto" else args.attn_impl
    parallel = Sharded(device, dtype, grad_sync=args.fsdp_grad_sync) if args.fsdp else Replicated(device, dtype)
    with fake:
        if args.fsdp:
            model = parallel.model = parallel.module = parallel.empty_model(config)
            if real:  # uninitialised memory could hold NaNs
                with torch.no_grad():
                    for p in model.parameters():
                        p.to_local().normal_(std=0.02)
        else:  # Replicated.load without the checkpoint: a float32 model, as one process (DDP: see the docstring)
            model = parallel.model = parallel.module = Llama(config)
            parallel.world = 1
        parallel.module.gradient_checkpointing = args.gradient_checkpointing
        optimizer, _ = make_optimizer(args, parallel.module, total_steps=1)
        for group in optimizer.param_groups:  # train.py on a GPU: fused AdamW, no full-size temporaries in step
            group["fused"], group["foreach"] = True, False
        params = list(parallel.module.parameters())
        for p in params:  # a first step creates the AdamW moments
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    scoring = scoring_of(args, pad_id=0)
    groups = micro_batch_groups(args, tokens)
    first = micro_batches(groups, scoring.micro_batch_size, scoring.max_tokens)[0]
    batch = make_batch(first, scoring.layout, 0, scoring.max_tokens)
    batches = [batch, batch]  # two micro-steps of the largest micro-batch
    loss_fn = loss_of(args, generator=None)
    t = Tracker(model, optimizer, args.fsdp)
    with fake, t.tracker:
        for i, batch in enumerate(batches):
            t.micro_step = i
            t.tracker.reset_mod_stats()  # the tracker refuses a second forward of the root otherwise
            with parallel.sync(last=i == len(batches) - 1):
                logps = score_batch(model, batch, scoring, parallel.autocast)  # (B, K) float32
                losses, counted = loss_fn(logps, batch)
                loss = (losses * counted).sum() * world / batch.mask.shape[0]
                loss.backward()
            del logps, losses, loss
        parallel.clip_grad_norm(args.grad_clip)
        optimizer.step()
        held = next(iter(t.tracker.get_tracker_snapshot().values()))  # weights, gradients and moments, all there now
        optimizer.zero_grad(set_to_none=True)
    total, rows = t.peak()
    # the batch on the GPU (train.py moves each micro-batch there): real tensors here, so counted, not traced
    rows["the micro-batch (token ids, attention mask)"] = on_gpu = sum(
        v.nbytes for v in vars(batch).values() if torch.is_tensor(v)
    )
    total += on_gpu
    if not args.fsdp and world > 1:  # DDP's reducer cannot run on fake tensors: its buckets are counted, not traced
        rows["DDP's gradient buckets (4 B x parameters, counted)"] = ddp = 4 * sum(p.numel() for p in params)
        total += ddp
    counters = sum(s["step"].nbytes for s in optimizer.state.values())  # AdamW's step counts, 4 bytes per tensor
    state = sum(v for k, v in held.items() if k != "Total" and any(k.value in keys for _, keys in ROWS[:3]))
    return dict(
        total=total,
        rows=rows,
        where=t.where,
        tokens=batch.num_tokens,
        state=state - counters,
        n_params=sum(p.numel() for p in params),
        shape=tuple(batch.input_ids.shape),
    )


def plan(args):
    config = read_shape(args.model)
    tokens = args.max_tokens or args.group_tokens * args.micro_batch_size
    t0 = time.time()
    main = simulate(args, config, tokens)
    sync = "every micro-step" if args.fsdp_grad_sync == "every" else "the last micro-step"
    mode = f"FSDP, gradients reduce-scattered on {sync}" if args.fsdp else "DDP" if args.nproc > 1 else "one process"
    n = main["n_params"]
    print(
        f"{args.model}: {f'{n / 1e9:.2f}B' if n >= 1e9 else f'{n / 1e6:.1f}M'} parameters on {args.nproc} GPU(s), "
        f"{mode}, {args.dtype}, {'with' if args.gradient_checkpointing else 'without'} gradient checkpointing"
    )
    R, T = main["shape"]
    print(
        f"micro-batch: {args.micro_batch_size} groups, {main['tokens']} tokens ({R} row(s) of {T}), {args.responses} "
        f"responses each; loss {args.loss}, head chunks of {args.chunk_size}, attention {args.attn_impl}"
    )
    print(f"\nper GPU at the peak ({main['where']}):\n")
    print("| memory | GB |\n|---|---|")
    for name, b in main["rows"].items():
        if b:
            print(f"| {name} | {b / GB:.2f} |")
    print(f"| **total** | **{main['total'] / GB:.2f}** of {args.gpu_memory:g} |")
    print(
        f"\n{'fits' if main['total'] / GB <= args.gpu_memory else 'does NOT fit'} in {args.gpu_memory:g} GB "
        f"(plus 1-3 GB for the CUDA context, NCCL buffers and fragmentation, which the simulation leaves out)"
    )
    # activations and temporaries grow with the tokens, the rest does not: the budget that fills the GPU
    scaling = sum(main["rows"][name] for name, _ in ROWS[6:8])
    fit = main["tokens"] * (args.gpu_memory * GB - (main["total"] - scaling)) / scaling
    print(
        f"largest --max_tokens for {args.gpu_memory:g} GB, activations and temporaries scaled with the tokens: "
        f"about {max(0, int(fit)) // 256 * 256}"
    )
    if args.fit and fit > 0:
        args.max_tokens = max(0, int(fit)) // 256 * 256
        check = simulate(args, config, args.max_tokens)
        print(f"simulated at --max_tokens {args.max_tokens}: {check['total'] / GB:.2f} GB ({check['where']})")
    print(f"({time.time() - t0:.0f} s)")
    return main


def main(argv=None):
    plan(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
