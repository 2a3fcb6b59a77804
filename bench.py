"""
Benchmark: MPPO training steps in the naive layout against the project's default, side by side.

    python bench.py                               # CPU: SmolLM2-135M shape, float32, 4 responses
    python bench.py --device cuda                 # GPU: Llama-3-8B width, 2 layers, bfloat16
    python bench.py --device cuda --shape llama3-8b --layers 4 --attn_impl sdpa segments flex --compile
    python bench.py --tiny                        # seconds; what the CI test runs
    python bench.py --generate                    # decoding: batched vs transformers' generate vs one at a time

--generate times decoding instead of training, on the same randomly initialised model: one prompt
repeated --gen_batch times, sampled (temperature 0.8, top-p 0.95, 128 new tokens) by
generate.generate_batch, by transformers' LlamaForCausalLM.generate with the same weights and
settings, and by generate.generate one sequence at a time; then --mt_questions two-turn questions
with MT-Bench-like lengths (random ids; 256 new tokens per turn) answered one at a time and
--gen_batch at a time, as eval.py answers them. Random weights never emit a stop token, so every
row decodes the full length.

A randomly initialised Llama of a real shape trains on synthetic groups (one prompt, K responses)
whose lengths follow UltraFeedback's profile: log-normal, median prompt ~120 tokens, median
response ~290, a long right tail, clipped to --max_len tokens per prompt + response. Each layout
times full training steps (forward, backward, AdamW) after warm-up, on the same groups:

  1. naive:   every response its own right-padded prompt + response row, full logits
              (padded_batch + response_logps(full_logits=True))
  2. default: the shared-prompt packed layout, head and log-softmax in chunks over the scored
              positions only (packed_batch + response_logps); one row per --attn_impl given
              (e.g. `--attn_impl sdpa segments flex`: 2., 3. and 4., each with its ratio to 1.)

--compile compiles each transformer block (`block.compile(dynamic=True)`) in every layout, during
the warm-up steps (2 by default with --compile), outside the timed steps. Dynamic from the start:
every step brings new sequence lengths, so dynamic shapes are where a trainer's compiled blocks
end up anyway (train.py --compile recompiles once to get there), and one compilation is saved.

Each layout runs in a fresh child process, so peak memory is its own: torch.cuda's peak allocation
on GPU, the process's peak resident memory (above what it held after importing torch) on CPU.

MFU = model FLOPs per step / step time / dense matmul throughput, the latter measured in the same
run on this device by timing the model's own matmul shapes in its dtype (and on GPU also against
the datasheet peak). Model FLOPs (PaLM, appendix B): 6 x (parameters of the blocks) x processed
tokens (padding included: it is computed), 6 x vocab x hidden x positions that go through the head,
and 12 x heads x head_dim per attended (query, key) pair per layer for attention, counting the
pairs the mask allows (a causal row of T: T(T+1)/2). A dense-mask SDPA kernel computes all T^2
scores of a packed row, so that work shows as lower MFU, not as more FLOPs. Recomputation (the
chunked head's backward) is not counted either, as MFU (unlike hardware FLOP utilisation) asks.
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch

from mppo import LOSSES

SHAPES = {  # hidden, layers, heads, kv_heads, intermediate, vocab, tied embeddings
    "smollm2-135m": dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152, tie=True),
    "llama3-8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256, tie=False),
    "llama3-8b-width": dict(hidden=4096, layers=2, heads=32, kv_heads=8, intermediate=14336, vocab=128256, tie=False),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, tie=False),
}
# dense (no sparsity) bf16/fp16 tensor-core peaks from the datasheets, FLOP/s, matched against
# torch.cuda.get_device_name() in this order, so the PCIe/NVL parts come before the SXM name they contain
DATASHEET_BF16 = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200 NVL": 835e12,
    "GH200": 989e12,
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
}
IMPL_NAMES = dict(
    causal="SDPA, causal",
    sdpa="SDPA with a dense mask",
    segments="SDPA per segment (packing.SegmentAttention)",
    flex="flex_attention (packing.FlexAttention)",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument(
        "--shape",
        default=None,
        choices=sorted(SHAPES),
        help="model shape preset (default: smollm2-135m on CPU, llama3-8b-width on CUDA); flags below override",
    )
    p.add_argument("--tiny", action="store_true", help="tiny shape, short groups, 1 step: a smoke test in seconds")
    p.add_argument("--layers", type=int, help="transformer blocks")
    p.add_argument("--hidden", type=int, help="hidden size")
    p.add_argument("--heads", type=int, help="query heads")
    p.add_argument("--kv_heads", type=int, help="key/value heads (grouped-query attention)")
    p.add_argument("--intermediate", type=int, help="MLP inner size")
    p.add_argument("--vocab", type=int, help="vocabulary size")
    p.add_argument("--responses", type=int, default=4, help="responses per group (K)")
    p.add_argument("--groups", type=int, default=None, help="groups per training step (default: 1 on CPU, 4 on CUDA)")
    p.add_argument("--prompt_median", type=float, default=120, help="median prompt length, tokens")
    p.add_argument("--response_median", type=float, default=290, help="median response length, tokens")
    p.add_argument("--sigma", type=float, default=0.7, help="log-normal sigma of both lengths (the right tail)")
    p.add_argument(
        "--max_len", type=int, default=2048, help="clip: prompt + response tokens, as a trainer's max_length"
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per layout (default: 2 on CPU, 10 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1; 2 with --compile)")
    p.add_argument("--chunk_size", type=int, default=1024, help="positions per chunk of the head in the default path")
    p.add_argument("--max_row_tokens", type=int, default=None, help="packed row budget (default: longest group)")
    p.add_argument(
        "--attn_impl",
        nargs="+",
        default=["auto"],
        choices=["auto", "sdpa", "segments", "flex"],
        help="attention of the default path (packing.choose_attention); several: one default row each",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block (in every layout)")
    p.add_argument(
        "--compile_backend",
        default="inductor",
        help="torch.compile backend of --compile "
        "(aot_eager: traces and recompiles the same, generates no code; a quick CPU check)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds one layout's run may take (a hung compile or kernel fails its row, not the whole bench)",
    )
    p.add_argument("--loss", default="pair_mnm", choices=sorted(LOSSES), help="MPPO loss (mppo.LOSSES)")
    p.add_argument("--seed", type=int, default=0, help="seed of the groups and the model")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run each layout this many times, alternating, and keep its fastest run (a busy machine)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads; default: torch's)")
    p.add_argument(
        "--generate",
        action="store_true",
        help="decoding instead of training: batched sampling against transformers' generate and one "
        "sequence at a time, then MT-Bench-like questions one at a time and batched",
    )
    p.add_argument("--gen_batch", type=int, default=16, help="--generate: rows decoded together")
    p.add_argument("--gen_prompt_len", type=int, default=32, help="--generate: tokens of the repeated prompt")
    p.add_argument("--gen_new_tokens", type=int, default=128, help="--generate: new tokens per row")
    p.add_argument("--gen_temperature", type=float, default=0.8, help="--generate: sampling temperature")
    p.add_argument("--gen_top_p", type=float, default=0.95, help="--generate: nucleus sampling threshold")
    p.add_argument("--gen_sequential", type=int, default=2, help="--generate: sequences timed one at a time")
    p.add_argument(
        "--mt_questions", type=int, default=80, help="--generate: MT-Bench-like two-turn questions (0: skip)"
    )
    p.add_argument("--mt_new_tokens", type=int, default=256, help="--generate: new tokens per turn of those questions")
    p.add_argument(
        "--mt_sequential",
        type=int,
        default=None,
        help="--generate: answer only the first this many questions one at a time, and scale (default: all)",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one layout, print JSON
    args = p.parse_args(argv)

    cuda = args.device.startswith("cuda")
    if "flex" in args.attn_impl and not cuda:
        p.error("--attn_impl flex needs CUDA (torch has no flex_attention backward on CPU)")
    if args.tiny:
        args.shape = args.shape or "tiny"
        args.prompt_median, args.response_median, args.max_len = 12, 20, 128
        args.groups, args.steps = args.groups or 2, args.steps or 1
        args.gen_batch, args.gen_new_tokens, args.mt_questions, args.mt_new_tokens = 4, 8, 6, 8
    args.shape = args.shape or ("llama3-8b-width" if cuda else "smollm2-135m")
    for k, v in SHAPES[args.shape].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.groups = args.groups or (4 if cuda else 1)
    args.steps = args.steps or (10 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.compile else 1)
    args.attn_impl = list(dict.fromkeys(args.attn_impl))  # each once, in the order given
    return args


def make_groups(args, num_groups, seed):
    """Synthetic groups with UltraFeedback-like lengths: log-normal around the medians, clipped."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(seed)

    def lognormal(median, lo, hi):
        n = math.exp(math.log(median) + args.sigma * float(torch.randn((), generator=g)))
        return int(min(max(round(n), lo), hi))

    groups = []
    for _ in range(num_groups):
        P = lognormal(args.prompt_median, 1, args.max_len // 2)
        prompt = torch.randint(0, args.vocab, (P,), generator=g).tolist()
        lengths = [lognormal(args.response_median, 1, args.max_len - P) for _ in range(args.responses)]
        responses = [torch.randint(0, args.vocab, (n,), generator=g).tolist() for n in lengths]
        scores = torch.randperm(args.responses, generator=g).float().tolist()  # distinct: every pair is a preference
        groups.append(SimpleNamespace(prompt_ids=prompt, response_ids=responses, scores=scores))
    return groups


def build_model(args, device=None):
    from model import Llama, LlamaConfig

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_len,
        rope_theta=500000.0,
        tie_word_embeddings=args.tie,
    )
    torch.manual_seed(args.seed)
    with torch.device(device or args.device):
        model = Llama(config)
    model = model.to(getattr(torch, args.dtype))
    if args.compile:
        for block in model.model.layers:
            block.compile(backend=args.compile_backend, dynamic=True)
    return model


def step_flops(model, batch, full_logits):
    """Model FLOPs of one training step (forward + backward), see the module docstring."""
    c = model.config
    head = c.vocab_size * c.hidden_size
    blocks = sum(p.numel() for name, p in model.named_parameters() if ".layers." in name)
    head_positions = batch.num_tokens if full_logits else batch.target_ids.numel()
    R, T = batch.input_ids.shape
    pairs = R * T * (T + 1) // 2 if batch.attn_mask is None else int(batch.attn_mask.sum())
    attention = 12 * c.num_attention_heads * c.head_dim * pairs * c.num_hidden_layers
    return 6 * blocks * batch.num_tokens + 6 * head * head_positions + attention


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_layout(args):
    """Child process: train --warmup + --steps steps in one layout (--child: naive, or default:IMPL);
    return its measurements."""
    from packing import choose_attention, packed_batch, padded_batch, response_logps

    cuda = args.device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    rss0 = rss_bytes()  # torch imported, nothing allocated yet
    model = build_model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=cuda or None)
    loss_fn = LOSSES[args.loss]
    naive = args.child == "naive"
    attn_impl = None if naive else args.child.split(":", 1)[1]
    attention = set()  # what the default path's attention was, step by step (packing.choose_attention)

    times, flops, groups, tokens, logical = [], 0, 0, 0, 0
    for step in range(args.warmup + args.steps):
        batch_groups = make_groups(args, args.groups, seed=args.seed * 1000 + step)
        sync(args.device)
        t0 = time.perf_counter()
        # building the batch is part of the step: it is host work a trainer pays for every step
        if naive:
            batch = padded_batch(batch_groups, pad_id=0).to(args.device)
            logps = response_logps(model, batch, full_logits=True)
        else:
            batch = packed_batch(batch_groups, max_row_tokens=args.max_row_tokens).to(args.device)
            logps = response_logps(model, batch, chunk_size=args.chunk_size, attn_impl=attn_impl)
        loss = loss_fn(logps, batch.scores, batch.mask).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(args.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            if not naive:  # which attention response_logps took, asked again outside the timed step
                attention.add(choose_attention(model, batch, attn_impl))
            flops += step_flops(model, batch, full_logits=naive)
            groups += len(batch_groups)
            tokens += batch.num_tokens
            logical += batch.num_logical_tokens
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"{args.child}: loss is {loss.item()} at step {step}")
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    del model, opt, batch, logps, loss
    # after the steps, so that memory the matmuls leave with the allocator does not hide in rss0
    matmul = matmul_throughput(args, seconds=0.02 if args.tiny else 0.3)
    total = sum(times)
    return dict(
        layout=args.child,
        seconds=total,
        groups=groups,
        tokens=tokens,
        logical=logical,
        flops=flops,
        peak=peak,
        matmul=matmul,
        attention=sorted(attention) or ["causal"],
    )


def matmul_throughput(args, rows=2048, seconds=0.3):
    """FLOP/s of torch.matmul on this device at the model's shapes and dtype: (rows, in) @ (in, out)
    for each projection of a block (weighted by the number of layers) and for the head (once), each
    timed for about `seconds` after a warm-up, so the mix of shapes is the model's own."""
    dtype = getattr(torch, args.dtype)
    hd = args.hidden // args.heads
    block = [
        (args.hidden, args.heads * hd),
        (args.hidden, 2 * args.kv_heads * hd),
        (args.heads * hd, args.hidden),
        (args.hidden, 2 * args.intermediate),
        (args.intermediate, args.hidden),
    ]
    total_flops, total_time = 0, 0.0
    for (n_in, n_out), count in [(shape, args.layers) for shape in block] + [((args.hidden, args.vocab), 1)]:
        x = torch.randn(rows, n_in, device=args.device, dtype=dtype)
        w = torch.randn(n_in, n_out, device=args.device, dtype=dtype)
        x @ w
        sync(args.device)
        t0, n = time.perf_counter(), 0
        while n < 2 or time.perf_counter() - t0 < seconds:
            x @ w
            n += 1
            sync(args.device)
        total_time += count * (time.perf_counter() - t0) / n
        total_flops += count * 2 * rows * n_in * n_out
        del x, w
    return total_flops / total_time


def datasheet_peak(device_name):
    """Dense bf16 FLOP/s of a GPU from its torch.cuda.get_device_name(), or None when unknown."""
    return next((v for k, v in DATASHEET_BF16.items() if k in device_name), None)


def child_result(args, layout):
    """Run one layout in a fresh process (its peak memory is its own) and read its JSON line.
    A run that fails or outlives --timeout returns {"layout", "error"}: its row says so, the others run."""
    argv = sys.argv[1:]
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", layout]
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"bench.py: {layout}: no result within --timeout {args.timeout:g} s", file=sys.stderr)
        return dict(layout=layout, error=f"timed out after {args.timeout:g} s")
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        last = (out.stderr.strip().splitlines() or ["no message"])[-1]
        print(f"bench.py: {layout} failed (exit {out.returncode}): {last}", file=sys.stderr)
        return dict(layout=layout, error=last)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # as each layout finishes, so a run stopped from outside still shows what it measured
    print(
        f"bench.py: {layout}: {result['groups'] / result['seconds']:.3g} groups/s, "
        f"peak {result['peak'] / 1024**3:.2f} GiB",
        file=sys.stderr,
        flush=True,
    )
    return result


def row_name(layout, args):
    if layout == "naive":
        return "1. naive (padded, full logits)"
    impl = layout.split(":", 1)[1]
    number = 2 + args.attn_impl.index(impl)
    return f"{number}. default (packed, chunked head)" + ("" if impl == "auto" else f", attention {impl}")


def table(args, results, matmul_flops, datasheet):
    """The Markdown table: one row per layout run (a failed one says so), then each default row's
    ratio to the naive row. Returns (text, {layout: values})."""
    gib = 1024**3
    header = ["layout", "groups/s", "processed tok/s", "logical tok/s", "peak memory (GiB)", "MFU (measured matmul)"]
    keys = ["gps", "tps", "lps", "mem", "mfu"]
    if datasheet:
        header.append("MFU (datasheet)")
        keys.append("mfu_ds")
    rows, values = [], {}
    for r in results:
        if "error" in r:
            rows.append([row_name(r["layout"], args)] + ["failed"] * len(keys))
            continue
        s = r["seconds"]
        v = dict(
            gps=r["groups"] / s,
            tps=r["tokens"] / s,
            lps=r["logical"] / s,
            mem=r["peak"] / gib,
            mfu=r["flops"] / s / matmul_flops,
        )
        if datasheet:
            v["mfu_ds"] = r["flops"] / s / datasheet
        values[r["layout"]] = v
        cells = [f"{v['gps']:.3g}", f"{v['tps']:.0f}", f"{v['lps']:.0f}", f"{v['mem']:.2f}", f"{100 * v['mfu']:.1f}%"]
        if datasheet:
            cells.append(f"{100 * v['mfu_ds']:.1f}%")
        rows.append([row_name(r["layout"], args)] + cells)
    b = values.get("naive")
    for r in results[1:]:
        a = values.get(r["layout"])
        if a and b:
            number = row_name(r["layout"], args).split(".")[0]
            rows.append([f"ratio {number} / 1"] + [f"{a[k] / b[k]:.2f}x" for k in keys])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines), values


# -----------------------------------------------------------------------------
# --generate: decoding speed, batched against transformers' generate and one sequence at a time


def hf_twin(model):
    """transformers' LlamaForCausalLM with the same config and weights (the names are Hugging Face's)."""
    import transformers

    transformers.logging.set_verbosity_error()
    c = model.config
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    hf = transformers.LlamaForCausalLM(config).to(dtype=next(model.parameters()).dtype).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights do not match transformers' names: missing {missing}, unexpected {unexpected}")
    return hf


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def mt_bench_like(args, g):
    """--mt_questions two-turn conversations of random token ids with MT-Bench-like lengths: turns
    log-normal around 60 and 40 tokens (sigma 0.5), plus 10 tokens of chat template each."""

    def turn(median):
        n = int(min(max(round(math.exp(math.log(median) + 0.5 * float(torch.randn((), generator=g)))), 4), 400)) + 10
        return torch.randint(0, args.vocab, (n,), generator=g).tolist()

    return [(turn(60), turn(40)) for _ in range(args.mt_questions)]


def answer_conversations(model, conversations, args, batch, generator):
    """Both turns of each conversation, `batch` conversations at a time (1: generate() per sequence);
    turn 2's prompt holds turn 1's prompt and answer. Returns the number of new tokens."""
    from generate import generate, generate_batch

    settings = dict(temperature=args.gen_temperature, top_p=args.gen_top_p)
    tokens = 0
    for i in range(0, len(conversations), batch):
        chunk = conversations[i : i + batch]
        prompts = [first for first, _ in chunk]
        for t in range(2):
            if batch == 1:
                new = [generate(model, prompts[0], args.mt_new_tokens, generator=generator, **settings)]
            else:
                new = generate_batch(model, prompts, args.mt_new_tokens, generators=generator, **settings)
            tokens += sum(map(len, new))
            prompts = [p + a + second for p, a, (_, second) in zip(prompts, new, chunk)]
    return tokens


@torch.no_grad()
def generation_bench(args):
    """Decoding tokens/s of one prompt repeated --gen_batch times (batched, transformers, one at a
    time), then the wall time of --mt_questions two-turn questions one at a time and batched."""
    from generate import generate, generate_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    model = build_model(args).eval()
    hf = hf_twin(model)
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, args.vocab, (args.gen_prompt_len,), generator=g).tolist()
    B, N, T, P = args.gen_batch, args.gen_new_tokens, args.gen_temperature, args.gen_top_p
    gen = torch.Generator(args.device).manual_seed(args.seed)
    ids = torch.tensor([prompt] * B, device=args.device)  # (B, P)

    def ours_one():
        return [
            len(generate(model, prompt, N, temperature=T, top_p=P, generator=gen)) for _ in range(args.gen_sequential)
        ]

    def ours_batch():
        return [len(x) for x in generate_batch(model, [prompt] * B, N, temperature=T, top_p=P, generators=gen)]

    def theirs():  # top_k=0: transformers' default top-k of 50 off, as ours; no EOS: every row runs N tokens
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=T,
            top_p=P,
            top_k=0,
            max_new_tokens=N,
            min_new_tokens=N,
            pad_token_id=0,
        )
        return [out.shape[1] - ids.shape[1]] * B

    # a short warm-up of each path outside the timing (allocator, first-call overheads)
    generate(model, prompt, 2, temperature=T, top_p=P, generator=gen)
    generate_batch(model, [prompt] * 2, 2, temperature=T, top_p=P, generators=gen)
    hf.generate(
        ids[:2], attention_mask=torch.ones_like(ids[:2]), do_sample=True, max_new_tokens=2, pad_token_id=0, top_k=0
    )
    rows = []
    for name, fn in (
        (f"1. one at a time (generate.generate), {args.gen_sequential} sequence(s)", ours_one),
        (f"2. transformers generate, batch {B}", theirs),
        (f"3. batched (generate.generate_batch), batch {B}", ours_batch),
    ):
        seconds, lengths = timed(fn, args.device)
        rows.append((name, sum(lengths) / seconds))
        print(f"bench.py: {name}: {sum(lengths)} tokens in {seconds:.1f} s", file=sys.stderr, flush=True)
    one, hf_rate, batched = (r[1] for r in rows)

    print(
        f"mppo bench --generate: CPU, {torch.get_num_threads()} threads, {os.cpu_count()} cores, {args.dtype}, "
        f"torch {torch.__version__}, transformers {sys.modules['transformers'].__version__}; load average "
        f"{load_before:.2f} before"
    )
    print(f"model: {args.shape} shape, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, random weights")
    print(
        f"\none prompt of {args.gen_prompt_len} tokens, {N} new tokens per row, temperature {T:g}, top-p {P:g} "
        "(top-k off)\n"
    )
    print("| decoding | tokens/s | ratio to 1 |\n|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} | {rate / one:.2f}x |")
    print(f"| ratio 3 / 2 (batched / transformers) | | {batched / hf_rate:.2f}x |")

    if args.mt_questions:
        conversations = mt_bench_like(args, g)
        k = args.mt_sequential if args.mt_sequential is not None else len(conversations)
        t_batch, n_batch = timed(lambda: answer_conversations(model, conversations, args, B, gen), args.device)
        t_one, n_one = (
            timed(lambda: answer_conversations(model, conversations[:k], args, 1, gen), args.device) if k else (0, 0)
        )
        scaled = t_one * len(conversations) / k if k else float("nan")
        print(
            f"\n{len(conversations)} MT-Bench-like questions x 2 turns, {args.mt_new_tokens} new tokens per turn "
            f"(random weights never stop: every answer is full length)\n"
        )
        print("| answering | wall time (s) | tokens/s |\n|---|---|---|")
        what = "" if k == len(conversations) else f" (measured on {k} of them: {t_one:.0f} s, scaled)"
        print(f"| one at a time{what} | {scaled:.0f} | {n_one / t_one if k else float('nan'):.1f} |")
        print(f"| batched, {B} questions per batch | {t_batch:.0f} | {n_batch / t_batch:.1f} |")
        print(f"| ratio | {scaled / t_batch:.2f}x faster | |")
    print(f"\nload average {os.getloadavg()[0]:.2f} after")


def main():
    args = parse_args()
    if args.generate:
        generation_bench(args)
        return
    if args.child:
        print(json.dumps(run_layout(args)))
        return
    cuda = args.device.startswith("cuda")
    if cuda:
        machine = torch.cuda.get_device_name()
        datasheet = datasheet_peak(machine) if args.dtype in ("bfloat16", "float16") else None
    else:
        machine = f"CPU, {args.threads or torch.get_num_threads()} threads, {os.cpu_count()} cores"
        datasheet = None
    load_before = os.getloadavg()[0]
    n_params = sum(p.numel() for p in build_model(args, device="meta").parameters())  # shapes only, no memory
    layouts = ["naive"] + [f"default:{impl}" for impl in args.attn_impl]
    # alternate the layouts round by round and keep each one's fastest round: another process
    # that slows the machine for a while then hurts all layouts alike, not just one of them
    rounds = [[child_result(args, layout) for layout in layouts] for _ in range(args.rounds)]
    results = []
    for i in range(len(layouts)):
        done = [r[i] for r in rounds if "error" not in r[i]]
        results.append(min(done, key=lambda r: r["seconds"]) if done else rounds[-1][i])
    # each child times the matmuls just after its steps; the best is the device's throughput
    matmul = max((r["matmul"] for rs in rounds for r in rs if "error" not in r), default=float("nan"))
    text, _ = table(args, results, matmul, datasheet)
    tied = " (tied embeddings)" if args.tie else ""
    # other processes on the machine slow one layout more than the other: the load tells
    print(
        f"mppo bench: {machine}, {args.dtype}, torch {torch.__version__}{', compiled blocks' if args.compile else ''}; "
        f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print(
        f"model: {args.shape} shape, {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, "
        f"MLP {args.intermediate}, vocab {args.vocab}{tied}, {n_params / 1e6:.1f}M parameters"
    )
    best = f", fastest of {args.rounds} alternating runs per layout" if args.rounds > 1 else ""
    print(
        f"groups: {args.groups} per step x {args.steps} steps (+{args.warmup} warm-up){best}, "
        f"{args.responses} responses, "
        f"log-normal lengths, median prompt {args.prompt_median:g} / response {args.response_median:g}, "
        f"sigma {args.sigma:g}, max_len {args.max_len}"
    )
    for r in results:
        what = f"failed: {r['error']}" if "error" in r else " and ".join(IMPL_NAMES[a] for a in r["attention"])
        print(f"attention of {row_name(r['layout'], args).split(' (')[0]}: {what}")
    print(
        f"dense matmul throughput measured at the model's shapes: {matmul / 1e9:.1f} GFLOP/s"
        + (f"; datasheet peak {datasheet / 1e12:.0f} TFLOP/s" if datasheet else "")
    )
    print()
    print(text)
    failed = [r["layout"] for r in results if "error" in r]
    if failed:
        raise SystemExit(f"error: {', '.join(failed)} failed (see above)")


if __name__ == "__main__":
    main()
