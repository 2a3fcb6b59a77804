"""
Decoding with the model's KV cache: `generate` continues one sequence; `generate_batch` decodes many
prompts of different lengths together (left padding, per-row positions and an attention mask), each row
stopping on its own; `sample_n` draws n answers to one prompt from one prefill.

Sampling follows Hugging Face's order: logits / temperature, then top-k, then top-p on what top-k kept.

As a command, on-policy groups for training: sample answers to every prompt of a data set, score them
with a reward model or a verifier, and write canonical groups that train.py reads unchanged:

$ python generate.py --model SFT --prompts prompts.jsonl --num_samples 8 --temperature 0.8 --top_p 0.95 \
      --reward_model Skywork-Reward-Llama-3.1-8B-v0.2 --out groups.jsonl
$ python generate.py ... --scorer demo/make_demo.py:judge --out groups.jsonl    # a verifier (prompt, response) -> score
$ torchrun --standalone --nproc_per_node 8 generate.py ...                       # prompts split across ranks
$ python train.py --model SFT --data groups.jsonl --loss pair_mnm --out out/onpolicy

Killed and run again with the same flags, it continues from the chunks it finished (see main).
"""

import hashlib
import importlib
import importlib.util
import json
import math
import os
import sys
import time

import torch


CANDIDATES = 1024  # top-p first looks among this many most likely tokens (see nucleus)


def nucleus(probs, top_p, top_k):
    """The tokens kept from probs (B, V): the top_k most likely (0: all), renormalised, then the shortest
    most-likely prefix of them whose mass reaches top_p (the first one always survives), renormalised.
    Returns (kept probabilities sorted descending, zeros past the cut (B, k); their token ids (B, k)).
    Sorting all V tokens is the slow part, so it sorts only the CANDIDATES most likely when that is exact:
    when every row is cut to at most that many (top_k), or holds top_p of its mass among them."""
    V = probs.shape[-1]
    k = min(int(top_k.max()), V) if bool((top_k > 0).all()) else V
    if k > CANDIDATES and V > CANDIDATES:
        sorted_probs, order = probs.topk(CANDIDATES, dim=-1)  # (B, C)
        enough = torch.where(top_k > 0, top_k <= CANDIDATES, sorted_probs.sum(-1) >= top_p)
        if not bool(enough.all()):
            sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
    else:  # every row cut to at most k tokens: only the k largest need sorting
        sorted_probs, order = probs.topk(k, dim=-1) if k < V else probs.sort(dim=-1, descending=True)  # (B, k)
    rank = torch.arange(sorted_probs.shape[-1], device=probs.device)
    sorted_probs = sorted_probs.masked_fill((top_k[:, None] > 0) & (rank >= top_k[:, None]), 0)
    # top-p sees what top-k kept; without top-k, all V (the candidates may hold less)
    sorted_probs = sorted_probs / torch.where(top_k > 0, sorted_probs.sum(-1), probs.sum(-1))[:, None]
    # keep the most likely tokens until their mass reaches top_p
    sorted_probs = sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs >= top_p[:, None], 0)
    return sorted_probs / sorted_probs.sum(-1, keepdim=True), order


def filter_probs(logits, temperature, top_p, top_k):
    """softmax(logits / T) cut by nucleus(), as (B, V) float32. logits (B, V); temperature (> 0), top_p and
    top_k (B,) tensors."""
    probs = torch.softmax(logits.float() / temperature[:, None], dim=-1)  # (B, V)
    if bool((top_p >= 1).all() and (top_k <= 0).all()):
        return probs
    kept, order = nucleus(probs, top_p, top_k)
    return torch.zeros_like(probs).scatter_(-1, order, kept)


def sample_tokens(logits, temperature, top_p, top_k, generators=None):
    """One token id per row of logits (B, V): argmax where temperature is 0, else a draw from filter_probs.
    temperature, top_p, top_k: (B,) tensors. generators: None (the global generator), one torch.Generator
    drawing for every row, or a list with one per row (a row's draws then depend on nothing else in the
    batch; greedy rows draw nothing). Returns (B,) long."""
    hot = temperature > 0
    if not bool(hot.any()):
        return logits.argmax(-1)
    B, device = logits.shape[0], logits.device
    per_row = isinstance(generators, (list, tuple))
    rows = hot.nonzero()[:, 0].tolist() if per_row else []
    probs = torch.softmax(logits.float() / torch.where(hot, temperature, 1.0)[:, None], dim=-1)  # (B, V)
    if bool((top_p >= 1).all() and (top_k <= 0).all()):  # nothing cut: draw over all V
        if per_row:
            drawn = torch.zeros(B, dtype=torch.long, device=device)
            for i in rows:
                drawn[i] = torch.multinomial(probs[i], 1, generator=generators[i])[0]
        else:
            drawn = torch.multinomial(probs, 1, generator=generators)[:, 0]  # (B,)
    else:  # inverse CDF over the kept tokens only
        kept, order = nucleus(probs, top_p, top_k)  # (B, k)
        cdf = kept.cumsum(-1)  # (B, k)
        if per_row:
            u = torch.zeros(B, 1, device=device)
            for i in rows:
                u[i] = torch.rand(1, generator=generators[i], device=device)
        else:
            u = torch.rand(B, 1, generator=generators, device=device)  # (B, 1)
        # the first token whose cumulative mass exceeds u (a zeroed token never does: the CDF does not rise there)
        j = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=cdf.shape[-1] - 1)  # (B, 1)
        drawn = order.gather(-1, j)[:, 0]  # (B,)
    return drawn if bool(hot.all()) else torch.where(hot, drawn, logits.argmax(-1))


def sample_token(logits, temperature=0.0, top_p=1.0, generator=None, top_k=0):
    """One token id from logits (V,): argmax when temperature is 0, else top-k / nucleus sampling."""
    settings = [torch.tensor([x], device=logits.device) for x in (float(temperature), float(top_p), int(top_k))]
    return int(sample_tokens(logits[None], *settings, generators=[generator])[0])


@torch.no_grad()
def generate(model, input_ids, max_new_tokens, temperature=0.0, top_p=1.0, stop_ids=(), generator=None, top_k=0):
    """Continue one sequence (list of ids or a (T,) / (1, T) tensor) with a KV cache. Returns the new
    token ids only; the stop token, if one was produced, is the last of them. `generator` must live on
    the model's device. The plain reference for generate_batch."""
    device = model.model.embed_tokens.weight.device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).view(1, -1)  # (1, T)
    cache = model.new_kv_cache(1, ids.shape[1] + max_new_tokens)
    stop_ids, new = set(stop_ids), []
    while len(new) < max_new_tokens:
        h = model(ids, kv_cache=cache, return_hidden=True)[0, -1]  # (H,): lm_head on the last position only
        new.append(sample_token(model.lm_head(h).float(), temperature, top_p, generator, top_k))
        if new[-1] in stop_ids:
            break
        ids = torch.tensor([[new[-1]]], device=device)  # (1, 1)
    return new


def _per_row(value, n, name, dtype, device):
    """A setting given once or once per prompt, as an (n,) tensor."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} values for {n} prompts")
    return torch.tensor(values, dtype=dtype, device=device)


@torch.no_grad()
def generate_batch(
    model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, stop_ids=(), generators=None, num_samples=1
):
    """Continue many prompts (lists of token ids, any lengths) together with one KV cache.

    The prompts are left-padded to the longest; each row's positions start at 0 on its first real token
    and an attention mask hides the padding, so a row computes what generate() computes for it alone
    (up to float rounding). Each prompt is prefilled once and its cache repeated num_samples times.
    temperature / top_p / top_k: one value, or a list with one per prompt. generators: None, one
    torch.Generator for all rows, or a list with one per output row (len(prompts) * num_samples, on the
    model's device) so that a row's draws do not depend on the rest of the batch. A row stops after one
    of stop_ids (kept as its last id) or max_new_tokens; finished rows leave the batch.
    Returns the new ids of each output row: prompt i's samples are rows i * num_samples ... + num_samples - 1."""
    device = model.model.embed_tokens.weight.device
    B, n = len(prompts), num_samples
    if B == 0 or max_new_tokens < 1:
        return [[] for _ in range(B * n)]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate_batch: every prompt needs at least one token")
    if isinstance(generators, (list, tuple)) and len(generators) != B * n:
        raise ValueError(f"generators: {len(generators)} for {B * n} output rows")
    settings = [
        _per_row(v, B, name, dtype, device).repeat_interleave(n)
        for v, name, dtype in (
            (temperature, "temperature", torch.float32),
            (top_p, "top_p", torch.float32),
            (top_k, "top_k", torch.long),
        )
    ]
    L = max(len(p) for p in prompts)
    ids = torch.zeros(B, L, dtype=torch.long, device=device)
    valid = torch.zeros(B, L + max_new_tokens, dtype=torch.bool, device=device)  # which cache slots hold a token
    for i, p in enumerate(prompts):
        ids[i, L - len(p) :] = torch.as_tensor(p, dtype=torch.long)
        valid[i, L - len(p) :] = True  # the slots of generated tokens count as valid from the start
    positions = (valid[:, :L].cumsum(-1) - 1).clamp(min=0)  # (B, L): 0 on each row's first real token
    mask = None  # causal: no padding anywhere
    if not bool(valid[:, :L].all()):
        causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        # a padding query sees itself, so that no softmax row is empty (SDPA would return NaN)
        mask = (valid[:, None, :L] & causal) | torch.eye(L, dtype=torch.bool, device=device)  # (B, L, L)
    cache = model.new_kv_cache(B, L + max_new_tokens)
    h = model(ids, position_ids=positions, attn_mask=mask, kv_cache=cache, return_hidden=True)[:, -1]  # (B, H)
    if n > 1:  # every sample of a prompt continues from the same prefill
        for c in cache:
            c.k, c.v = c.k.repeat_interleave(n, dim=0), c.v.repeat_interleave(n, dim=0)
        h, valid = h.repeat_interleave(n, dim=0), valid.repeat_interleave(n, dim=0)
    next_pos = valid[:, :L].sum(-1)  # (B * n,) position of each row's next token = its prompt length
    return _decode(model, cache, h, valid, next_pos, max_new_tokens, settings, set(stop_ids), generators)


def _decode(model, cache, h, valid, next_pos, max_new_tokens, settings, stop_ids, generators):
    """The decoding loop of generate_batch, from the last prefill hidden states h (R, H)."""
    R = h.shape[0]
    rows = torch.arange(R, device=h.device)  # output row of each live row
    out = [[] for _ in range(R)]
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=h.device)
    padded = not bool(valid.all())
    for step in range(max_new_tokens):
        gens = [generators[i] for i in rows.tolist()] if isinstance(generators, (list, tuple)) else generators
        tokens = sample_tokens(model.lm_head(h).float(), *settings, generators=gens)  # (r,)
        for row, t in zip(rows.tolist(), tokens.tolist()):
            out[row].append(t)
        live = ~torch.isin(tokens, stop)  # (r,)
        if step == max_new_tokens - 1 or not bool(live.any()):
            break
        if not bool(live.all()):  # finished rows leave the batch and its cache
            rows, tokens, next_pos, valid = rows[live], tokens[live], next_pos[live], valid[live]
            settings = [s[live] for s in settings]
            for c in cache:
                c.k, c.v = c.k[live], c.v[live]
        S = cache[0].length + 1  # cache slots in use once this token is in
        mask = valid[:, None, :S] if padded else None  # (r, 1, S)
        h = model(tokens[:, None], position_ids=next_pos[:, None], attn_mask=mask, kv_cache=cache, return_hidden=True)[
            :, -1
        ]  # (r, H)
        next_pos = next_pos + 1
    return out


def sample_n(model, prompt, n, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, stop_ids=(), generator=None):
    """n answers to one prompt (a list of token ids): the prompt's prefill is computed once and its cache
    repeated n times. generator: None, one torch.Generator for all n rows, or a list of n."""
    return generate_batch(
        model, [prompt], max_new_tokens, temperature, top_p, top_k, stop_ids, generator, num_samples=n
    )


# ----------------------------------------------------------------------------------------------
# From prompts to scored groups (the command line). The imports of data, scoring and distributed code
# live in these functions, so that importing generate.py for decoding pulls none of it.


def read_prompts(spec, format=None):
    """The distinct prompts of a data set, in first-seen order: any format formats.read_groups reads (its
    responses and scores are ignored), or rows holding only a "prompt" (a string or a list of messages)."""
    from formats import DataError, _prompt, _rows, data_files, detect_format, read_groups

    prompts = {}
    for path in data_files(spec):
        rows = _rows(path)
        first = next(rows, None)
        if first is None:
            continue
        where, _, row = first
        if format is None and isinstance(row, dict) and detect_format(row) is None and "prompt" in row:
            for where, _, row in [first, *rows]:
                if not isinstance(row, dict) or "prompt" not in row:
                    raise DataError(f"{where}: expected a row with a 'prompt' field")
                p = _prompt(row["prompt"], where, "prompt")
                prompts.setdefault(json.dumps(p, sort_keys=True), p)
            continue
        groups, report = read_groups(path, format, min_responses=0, require_preference=False)
        if report.skipped:
            print(report.summary())
        for g in groups:
            prompts.setdefault(json.dumps(g.prompt, sort_keys=True), g.prompt)
    return list(prompts.values())


def load_scorer(spec):
    """score(prompt, response) -> float from "module:function" (an importable module, or a .py file)."""
    module_name, _, name = spec.rpartition(":")
    if not module_name or not name:
        raise ValueError(f"--scorer {spec}: expected module:function (e.g. demo/make_demo.py:judge)")
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise ValueError(f"--scorer {spec}: no such file {module_name}")
        loaded = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
    else:
        sys.path.insert(0, os.getcwd())  # as `python -m` would find it
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"--scorer {spec}: cannot import {module_name} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--scorer {spec}: {module_name} has no function {name}")
    return fn


def row_generator(seed, prompt_index, sample, device):
    """The generator of one answer, seeded from (seed, prompt index, sample number) only: an answer does not
    depend on the batch, the chunk, the rank or an earlier interrupted run."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{sample}".encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def merge_answers(answers):
    """(distinct answers in first-seen order, how often each was drawn)."""
    counts = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    return list(counts), list(counts.values())


def sample_groups(model, tok, indexed_prompts, args, score):
    """Canonical group rows for [(prompt index, prompt)]: args.num_samples answers to each (generate_batch,
    args.batch_size prompts at a time, each prefilled once), empty answers dropped, identical ones merged,
    each distinct answer scored once by score(prompts, responses) -> scores. Returns (rows, stats)."""
    device = model.model.embed_tokens.weight.device
    n, stop = args.num_samples, sorted(tok.stop_ids)
    encoded = [(i, p, tok.encode_prompt(p)) for i, p in indexed_prompts]
    encoded.sort(key=lambda e: len(e[2]))  # similar lengths together: less padding
    answers, stats = {}, dict(tokens=0, unfinished=0, empty=0)
    for start in range(0, len(encoded), args.batch_size):
        batch = encoded[start : start + args.batch_size]
        gens = [row_generator(args.seed, i, j, device) for i, _, _ in batch for j in range(n)]
        new = generate_batch(
            model,
            [ids for _, _, ids in batch],
            args.max_new_tokens,
            args.temperature,
            args.top_p,
            args.top_k,
            stop,
            gens,
            num_samples=n,
        )
        for k, (i, _, _) in enumerate(batch):
            texts = []
            for ids in new[k * n : (k + 1) * n]:
                stats["tokens"] += len(ids)
                stats["unfinished"] += not ids or ids[-1] not in tok.stop_ids
                text = tok.decode([t for t in ids if t not in tok.stop_ids])
                stats["empty"] += not text.strip()
                texts += [text] if text.strip() else []
            answers[i] = merge_answers(texts)
    flat = [(i, r) for i, _ in indexed_prompts for r in answers[i][0]]
    prompt_of = dict(indexed_prompts)
    scores = score([prompt_of[i] for i, _ in flat], [r for _, r in flat])
    rows, at = [], 0
    for i, p in indexed_prompts:
        responses, counts = answers[i]
        row_scores = [float(s) for s in scores[at : at + len(responses)]]
        at += len(responses)
        rows.append({"prompt": p, "responses": responses, "scores": row_scores, "counts": counts, "index": i})
    return rows, stats


def write_atomic(path, text):
    """path holds the old content or text, never part of it (a temporary file renamed over it)."""
    from hf_format import crash_point

    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    crash_point()  # test hook: MPPO_CRASH_AFTER=N kills the process here or after the rename
    os.replace(tmp, path)
    crash_point()


def parse_args(argv=None):
    from cli import ArgumentParser

    p = ArgumentParser(
        prog="generate.py",
        description="Sample answers to every prompt of a data set with a "
        "policy, score them with a reward model or a verifier, and write canonical groups.",
    )
    a = p.add_argument
    a("--model", required=True, help="the policy: a Hugging Face-format Llama folder")
    a(
        "--prompts",
        required=True,
        nargs="+",
        help="data file(s), folder or glob in any format train.py reads "
        "(only the prompts are used), or JSONL rows with just a 'prompt'",
    )
    a("--format", default=None, help="data format of --prompts (default: detected per file)")
    a("--out", required=True, help="the groups file to write (JSONL); its chunks go to OUT.parts/ until done")
    a("--num_samples", type=int, default=8, help="answers sampled per prompt")
    a("--max_new_tokens", type=int, default=512, help="longest answer, in tokens")
    a("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    a("--top_p", type=float, default=0.95, help="nucleus sampling: keep the most likely tokens holding this mass")
    a("--top_k", type=int, default=0, help="keep only the k most likely tokens (0: all)")
    a("--seed", type=int, default=0, help="each answer's generator is seeded from (seed, prompt index, sample)")
    a("--reward_model", default=None, help="a LlamaForSequenceClassification folder scoring each answer")
    a(
        "--scorer",
        default=None,
        help="a verifier module:function (prompt, response) -> score, e.g. demo/make_demo.py:judge",
    )
    a("--batch_size", type=int, default=4, help="prompts decoded together (each with --num_samples rows)")
    a("--rm_batch_size", type=int, default=8, help="answers scored together by --reward_model")
    a("--chunk_size", type=int, default=64, help="prompts per chunk: the unit written atomically and resumed")
    a("--template", default=None, help="chat template of --model (default: detected from its tokenizer files)")
    a("--device", default=None, help="torch device (default: cuda when available; one GPU per rank under torchrun)")
    a(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the weights (default: bfloat16 on cuda, float32 on cpu)",
    )
    args = p.parse_args(argv)
    if (args.reward_model is None) == (args.scorer is None):
        p.error("give exactly one of --reward_model and --scorer")
    for flag in ("num_samples", "max_new_tokens", "batch_size", "rm_batch_size", "chunk_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        p.error("need --temperature >= 0, 0 < --top_p <= 1 and --top_k >= 0")
    return args


SETTINGS = (
    "model",
    "prompts",
    "format",
    "num_samples",
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "reward_model",
    "scorer",
    "chunk_size",
    "template",
)  # what a resumed run must share


def main(argv=None):
    """Prompts -> OUT. The prompts are cut into chunks of --chunk_size; rank r of a torchrun job samples
    chunks r, r + world, ... and writes each to OUT.parts/chunk-NNNNNN.jsonl atomically. A run started again
    with the same flags skips the chunks on disk (a chunk is all there or absent), so a kill loses at most
    the chunks in progress and duplicates nothing. When every chunk is done, rank 0 joins them into OUT in
    prompt order and removes OUT.parts/."""
    from chat import ChatTokenizer
    from cli import check_device, check_model_folder, fail
    from formats import DataError
    from hf_format import CheckpointError, ConfigError
    from model import Llama
    from parallel import barrier, setup_distributed

    args = parse_args(argv)
    check_device(args.device)
    check_model_folder(args.model)
    parts = f"{args.out}.parts"
    if os.path.exists(args.out) and not os.path.isdir(parts):
        fail(f"--out {args.out} exists (a finished run); remove it or choose another --out")
    rank, world, device = setup_distributed(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        prompts = read_prompts(args.prompts, args.format)
        verifier = load_scorer(args.scorer) if args.scorer else None
        tok = ChatTokenizer.from_pretrained(args.model, template=args.template)
        model = Llama.from_pretrained(args.model, dtype=dtype, device=device).eval()
        if args.reward_model:
            from reward import RewardModel

            rm = RewardModel.from_pretrained(
                args.reward_model, dtype=dtype, device=device, batch_size=args.rm_batch_size
            )
    except (OSError, DataError, ConfigError, CheckpointError, ValueError) as e:
        fail(e)

    def score(ps, rs):
        if args.reward_model:
            return rm.score_texts(ps, rs)
        out = [verifier(p, r) for p, r in zip(ps, rs)]
        for p, s in zip(ps, out):
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                fail(f"--scorer {args.scorer} returned {s!r} for the prompt {str(p)[:60]!r}; expected a finite number")
        return out

    settings = {k: getattr(args, k) for k in SETTINGS} | {"prompt_count": len(prompts)}
    settings_file = os.path.join(parts, "settings.json")
    if rank == 0 and not os.path.exists(settings_file):
        os.makedirs(parts, exist_ok=True)
        write_atomic(settings_file, json.dumps(settings, indent=1) + "\n")
    barrier()  # every rank checks the settings on disk, so a mismatch ends all of them
    with open(settings_file) as f:
        before = json.load(f)
    changed = [f"--{k} {before.get(k)!r}" for k in settings if before.get(k) != settings[k]]
    if changed:
        fail(
            f"{parts} was started with other settings ({', '.join(changed)}); run with the same flags to "
            "continue it, or remove it"
        )

    chunks = [list(enumerate(prompts))[i : i + args.chunk_size] for i in range(0, len(prompts), args.chunk_size)]
    names = [os.path.join(parts, f"chunk-{c:06d}.jsonl") for c in range(len(chunks))]
    mine = [c for c in range(rank, len(chunks), world) if not os.path.exists(names[c])]
    done = len(chunks) - sum(not os.path.exists(n) for n in names)
    log(
        f"{len(prompts)} prompts in {len(chunks)} chunks of {args.chunk_size}"
        + (f"; resuming: {done} chunks already done" if done else "")
        + (f"; {world} ranks" if world > 1 else "")
    )
    sampling = {
        k: getattr(args, k) for k in ("model", "temperature", "top_p", "top_k", "max_new_tokens", "num_samples", "seed")
    }
    sampling["scored_by"] = args.reward_model or args.scorer
    t0, tokens, prompts_done = time.time(), 0, 0
    for k, c in enumerate(mine):
        rows, stats = sample_groups(model, tok, chunks[c], args, score)
        for row in rows:
            row["sampling"] = sampling
        write_atomic(names[c], "".join(json.dumps(r) + "\n" for r in rows))
        tokens, prompts_done = tokens + stats["tokens"], prompts_done + len(rows)
        elapsed = time.time() - t0
        left = sum(len(chunks[c]) for c in mine[k + 1 :])
        log(
            f"chunk {c + 1}/{len(chunks)}: {prompts_done / elapsed:.2f} prompts/s, {tokens / elapsed:.0f} tokens/s, "
            f"ETA {left * elapsed / prompts_done:.0f}s"
            + (f" ({stats['unfinished']} answers hit --max_new_tokens)" if stats["unfinished"] else "")
        )
    barrier()
    if rank == 0:
        total, ties, merged, single = 0, 0, 0, 0
        lines = []
        for name in names:
            with open(name) as f:
                for line in f:
                    row = json.loads(line)
                    total += 1
                    ties += len(row["scores"]) > 0 and len(set(row["scores"])) == 1
                    single += len(row["responses"]) < 2
                    merged += sum(row["counts"]) - len(row["counts"])
                    lines.append(line)
        write_atomic(args.out, "".join(lines))
        for name in [*names, settings_file]:
            os.remove(name)
        os.rmdir(parts)
        log(
            f"{args.out}: {total} groups; {ties} with all scores tied (kept: the point-wise losses use them), "
            f"{single} with fewer than 2 distinct answers; {merged} identical answers merged"
        )


if __name__ == "__main__":
    from cli import interruptible, one_line_errors

    one_line_errors(interruptible(main))()
