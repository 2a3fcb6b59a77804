"""
Tests of the compact storage and the cache of tokenized sets (data.py): the flat arrays against a
per-text reference, cache hits, misses and damaged caches, two gloo ranks sharing the tokenizing.

    python -m pytest test_cache.py -q

Every cache here lives under the test's tmp_path (never the user's ~/.cache).
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

import data
from chat import ChatTokenizer
from data import tokenize_groups
from formats import read_groups

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(HERE, "demo")


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MPPO_CACHE", str(tmp_path / "default-cache"))


def demo_rows(path, n=200):
    with open(os.path.join(DEMO, "train.jsonl")) as f, open(path, "w") as g:
        g.writelines(f.readlines()[:n])
    return str(path)


def as_lists(groups):
    return [(g.prompt_ids, g.response_ids, g.scores, g.line) for g in groups]


class Log(list):
    def __call__(self, line):
        self.append(line)


def load(path, tok, cache_dir, max_length=24, max_prompt_length=16, **kw):
    log = Log()
    out, summary = data.load_tokenized(path, tok, max_length, max_prompt_length, cache_dir=cache_dir, log=log, **kw)
    return out, summary, log


def test_compact_set_equals_per_text_reference(tmp_path):
    """tokenize_set's arrays against a reference built text by text: each prompt and response encoded
    alone (ChatTokenizer.encode_prompt / encode_response) and cut by _truncate on lists, groups whose
    prompt fills max_length skipped. Lengths 24 / 16 cut some prompts and responses and skip none of the
    demo's groups, 12 / None skips some. Storage: the arrays' bytes, counted by hand."""
    tok = ChatTokenizer.from_pretrained(DEMO)
    groups, _ = read_groups(demo_rows(tmp_path / "d.jsonl"))
    for max_length, max_prompt_length in ((24, 16), (12, None), (None, None)):
        compact, report = data.tokenize_set(groups, tok, max_length, max_prompt_length)
        expected = []
        for g in groups:
            cut = data._truncate(
                tok.encode_prompt(g.prompt),
                [tok.encode_response(r) for r in g.responses],
                max_length,
                max_prompt_length,
                tok.bos_id,
            )
            if cut is not None:
                expected.append((cut[0], cut[1], g.scores, g.line))
        assert as_lists(compact) == expected
        assert report.kept == len(expected) and report.rows == len(groups)
        # 4 bytes a token, 16 a sequence (its offset and score), 8 a group (real data: ~350 tokens a sequence)
        n, s, g = len(compact.tokens), len(compact.scores), len(compact)
        assert compact.tokens.dtype == np.int32 and compact.nbytes() == 4 * n + 16 * s + 8 + 8 * (g + 1)
    assert report.truncated_prompts == 0  # (None, None): nothing cut


def test_nothing_cut_keeps_the_encoded_array(tmp_path):
    """A chunk in which nothing is cut or skipped is kept as encoded (the same array object, no copy)."""
    tok = ChatTokenizer.from_pretrained(DEMO)
    groups, _ = read_groups(demo_rows(tmp_path / "d.jsonl", 20))
    tokens, lengths = data._encode_chunk(groups, tok, False, (None, None), data.Report("x"))
    part = data._cut_chunk(groups, tokens, lengths, None, None, tok.bos_id, lambda g: None, data.Report("x"))
    assert part[0] is tokens and part[1] is lengths


@pytest.mark.parametrize("grows", ["in place", "by a copy"])
def test_token_buffer_equals_the_pieces_end_to_end(monkeypatch, grows):
    """data.TokenBuffer (where --no_cache keeps a set's tokens) against np.concatenate of the pieces appended:
    pieces of 0 to 9 tokens, then of up to 9,000 (the map's pages past its first, where a shared anonymous map
    faults), into a buffer of capacity 3, so it grows many times, in place (mremap) and, where a map cannot grow,
    by copying into a larger one (resize refused by a stand-in)."""
    import mmap

    if grows == "by a copy":

        class Fixed(mmap.mmap):
            def resize(self, size):
                raise SystemError("mmap: resizing not available--no mremap()")

        monkeypatch.setattr(data.mmap, "mmap", Fixed)
    rng = np.random.default_rng(0)
    sizes = [*rng.integers(0, 10, size=40), *rng.integers(0, 9000, size=20)]
    pieces = [rng.integers(0, 2**31 - 1, size=int(n), dtype=np.int64) for n in sizes]
    buffer = data.TokenBuffer(capacity=3)
    for p in pieces:
        buffer.append(p)
    got = buffer.array()
    assert got.dtype == np.int32 and got.tolist() == np.concatenate(pieces).tolist()


def test_cache_hit_gives_identical_arrays(tmp_path):
    """The first load tokenizes and writes the cache; the second maps it (memory-mapped tokens) and gives
    the same arrays, lines, score span and summary, equal to a load without cache."""
    tok = ChatTokenizer.from_pretrained(DEMO)
    path, cache = demo_rows(tmp_path / "d.jsonl"), str(tmp_path / "cache")
    plain, plain_summary, _ = load(path, tok, None)
    first, summary, log1 = load(path, tok, cache)
    second, summary2, log2 = load(path, tok, cache)
    assert not any("from the cache" in x for x in log1) and any("from the cache" in x for x in log2)
    assert isinstance(second.tokens, np.memmap)
    for a in (first, second):
        for name, array in plain.arrays().items():
            np.testing.assert_array_equal(a.arrays()[name], array)
        assert a.lines == plain.lines and a.score_span == plain.score_span
    assert summary == summary2 == plain_summary
    assert as_lists(second) == as_lists(plain)
    assert os.listdir(cache) == [
        os.path.basename(
            data.cache_path(
                cache, json.loads(open(os.path.join(cache, os.listdir(cache)[0], "header.json")).read())["key"]
            )
        )
    ]  # no temporary left


def test_changed_tokenizer_template_length_or_data_misses(tmp_path):
    """Each input of the key, changed, gives another cache folder and a fresh tokenizing; the unchanged
    inputs hit. Data: a line appended to the file (size and mtime change)."""
    tok = ChatTokenizer.from_pretrained(DEMO)
    path, cache = demo_rows(tmp_path / "d.jsonl"), str(tmp_path / "cache")
    load(path, tok, cache)
    other_tok = str(tmp_path / "tok")
    shutil.copytree(DEMO, other_tok)
    spec = json.load(open(os.path.join(other_tok, "tokenizer.json")))
    extra = {**spec["added_tokens"][-1], "content": "<|extra|>"}
    extra["id"] = 1 + max(max(spec["model"]["vocab"].values()), *(t["id"] for t in spec["added_tokens"]))
    spec["added_tokens"].append(extra)  # one special token more: another tokenizer
    json.dump(spec, open(os.path.join(other_tok, "tokenizer.json"), "w"))
    misses = {
        "tokenizer": (ChatTokenizer.from_pretrained(other_tok), {}),
        "template": (ChatTokenizer.from_pretrained(DEMO, template="none"), {}),
        "max_length": (tok, {"max_length": 23}),
        "max_prompt_length": (tok, {"max_prompt_length": 15}),
        "score header": (tok, {"include_header": True}),
        "ties kept": (tok, {"require_preference": False}),
    }
    for what, (t, kw) in misses.items():
        _, _, log = load(path, t, cache, **kw)
        assert not any("from the cache" in x for x in log), what
        _, _, log = load(path, t, cache, **kw)
        assert any("from the cache" in x for x in log), what
    with open(path, "a") as f:
        f.write(json.dumps({"prompt": "sort b a", "responses": ["a b", "b a"], "scores": [1, 0]}) + "\n")
    changed, _, log = load(path, tok, cache)
    assert not any("from the cache" in x for x in log) and len(changed) == 201
    assert len(os.listdir(cache)) == 1 + len(misses) + 1


def damage(folder, how):
    if how == "truncated tokens.npy":
        p = os.path.join(folder, "tokens.npy")
        os.truncate(p, os.path.getsize(p) - 100)
    elif how == "flipped byte":
        p = os.path.join(folder, "tokens.npy")
        with open(p, "r+b") as f:
            f.seek(os.path.getsize(p) - 7)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 1]))
    elif how == "bad header":
        with open(os.path.join(folder, "header.json"), "w") as f:
            f.write('{"key": ')
    elif how == "missing scores.npy":
        os.remove(os.path.join(folder, "scores.npy"))


@pytest.mark.parametrize("how", ["truncated tokens.npy", "flipped byte", "bad header", "missing scores.npy"])
def test_damaged_cache_is_rebuilt_with_a_notice(tmp_path, how):
    """A cache cut short, with a flipped bit (checksum), an unreadable header or a missing array is never
    trusted: one notice line naming the folder, a rebuild equal to the original, a sound cache after."""
    tok = ChatTokenizer.from_pretrained(DEMO)
    path, cache = demo_rows(tmp_path / "d.jsonl"), str(tmp_path / "cache")
    good, _, _ = load(path, tok, cache)
    expected = as_lists(good)
    (folder,) = [os.path.join(cache, f) for f in os.listdir(cache)]
    damage(folder, how)
    rebuilt, _, log = load(path, tok, cache)
    notices = [x for x in log if "damaged or stale" in x]
    assert len(notices) == 1 and folder in notices[0] and "\n" not in notices[0] and "rebuilding" in notices[0]
    assert as_lists(rebuilt) == expected
    again, _, log = load(path, tok, cache)
    assert any("from the cache" in x for x in log) and as_lists(again) == expected
    assert os.listdir(cache) == [os.path.basename(folder)]


def _rank_worker(rank, world, store, path, cache, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from parallel import all_gather

    tok = ChatTokenizer.from_pretrained(DEMO)
    encoded = []
    real = tok.tokenizer

    class Counting:  # counts the texts this rank encodes
        def encode_batch(self, texts, **kw):
            encoded.append(len(texts))
            return real.encode_batch(texts, **kw)

        encode_batch_fast = encode_batch

        def __getattr__(self, name):
            return getattr(real, name)

    tok.tokenizer = Counting()
    cache = cache[rank] if isinstance(cache, list) else cache  # a list: each rank's own folder (another node's disk)
    try:
        got, summary = data.load_tokenized(
            path, tok, 24, 16, cache_dir=cache, rank=rank, world=world, gather=all_gather, log=lambda line: None
        )
    except data.DataError as e:
        with open(os.path.join(out, f"rank{rank}.error"), "w") as f:
            f.write(str(e))
        return
    np.savez(
        os.path.join(out, f"rank{rank}.npz"),
        encoded=sum(encoded),
        mapped=isinstance(got.tokens, np.memmap),
        **got.arrays(),
    )
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"lines": got.lines, "summary": summary}, f)
    dist.destroy_process_group()


def two_ranks_end_as(one, one_summary, tmp_path, path, cache):
    """Fork two gloo ranks that load path (cache: a folder, one per rank, or None) and check that each ends with
    one's arrays, lines and summary; returns each rank's (arrays memory-mapped, texts it encoded)."""
    # forked, not spawned: a spawned child re-imports torch (seconds); the tokenizer turns its threads off in a fork
    mp.start_processes(
        _rank_worker, args=(2, str(tmp_path / "store"), path, cache, str(tmp_path)), nprocs=2, start_method="fork"
    )
    out = []
    for rank in range(2):
        got = np.load(tmp_path / f"rank{rank}.npz")
        for name, array in one.arrays().items():
            np.testing.assert_array_equal(got[name], array)
        meta = json.load(open(tmp_path / f"rank{rank}.json"))
        assert meta["lines"] == one.lines and meta["summary"] == one_summary
        out.append((bool(got["mapped"]), int(got["encoded"])))
    return out


@pytest.mark.parametrize("cores", [4, 2])
def test_two_gloo_ranks_split_tokenizing_and_end_identical(tmp_path, monkeypatch, cores):
    """Two gloo ranks, chunks of 32 groups: on 4 cores each encodes the texts (prompt + responses) of every other
    chunk, rank 0 the first; on 2 cores rank 0 encodes them all and rank 1 only reads along (one encoding rank
    per data.CORES_PER_ENCODER = 2 cores). Both end with the arrays, lines and summary of one process run with the
    default chunks of 512; rank 0 writes the cache and both map it."""
    cached = True
    tok = ChatTokenizer.from_pretrained(DEMO)
    path = demo_rows(tmp_path / "d.jsonl")
    one, one_summary, _ = load(path, tok, None)
    cache = str(tmp_path / "cache") if cached else None
    groups, _ = read_groups(path)
    monkeypatch.setattr(data, "CHUNK", 32)  # before the fork: the ranks inherit it
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    chunks = [groups[i : i + 32] for i in range(0, len(groups), 32)]  # 7 chunks: 4 for rank 0, 3 for rank 1
    encoders = cores // 2
    half = [sum(1 + len(g.responses) for c in chunks[r::encoders] for g in c) if r < encoders else 0 for r in (0, 1)]
    ranks = two_ranks_end_as(one, one_summary, tmp_path, path, cache)
    assert ranks == [(cached, half[0]), (cached, half[1])]
    if cached:
        assert len(os.listdir(cache)) == 1


def test_a_group_one_rank_cannot_render_stops_every_rank(tmp_path, monkeypatch):
    """Two gloo ranks on 4 cores, chunks of 32: the group of line 41 (chunk 1, rank 1's) fails to render. Only rank
    1 renders it, yet both ranks end with the same one-line DataError naming line 41 (rank 0 learns it at the
    gather where it waits for rank 1), and no cache is left behind."""
    from chat import ChatTokenizer as Chat

    path = demo_rows(tmp_path / "d.jsonl")
    groups, _ = read_groups(path)
    bad, render = groups[40].prompt, Chat.render_prompt

    def refuse(self, prompt, **kw):
        if prompt == bad:
            raise ValueError("this conversation cannot be rendered")
        return render(self, prompt, **kw)

    monkeypatch.setattr(Chat, "render_prompt", refuse)
    monkeypatch.setattr(data, "CHUNK", 32)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    cache = str(tmp_path / "cache")
    mp.start_processes(
        _rank_worker, args=(2, str(tmp_path / "store"), path, cache, str(tmp_path)), nprocs=2, start_method="fork"
    )
    errors = [(tmp_path / f"rank{rank}.error").read_text() for rank in range(2)]
    assert errors[0] == errors[1] == "group from line 41: this conversation cannot be rendered"
    assert not os.path.exists(cache) or not os.listdir(cache)


def test_a_rank_that_cannot_see_the_cache_makes_all_tokenize(tmp_path, monkeypatch):
    """Two gloo ranks with a cache folder each, as two nodes with their own disks: rank 0's holds the set, rank 1's
    is empty. Both ranks tokenize (chunks of 32 groups: a share each), rank 1 keeps the gathered copy, rank 0
    maps its cache again, and both end with one process's arrays, lines and summary."""
    tok = ChatTokenizer.from_pretrained(DEMO)
    path = demo_rows(tmp_path / "d.jsonl")
    caches = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    one, one_summary, _ = load(path, tok, caches[0])
    monkeypatch.setattr(data, "CHUNK", 32)  # both ranks have chunks to encode (on 4 cores: 2 encoding ranks)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    (mapped0, encoded0), (mapped1, encoded1) = two_ranks_end_as(one, one_summary, tmp_path, path, caches)
    assert mapped0 and not mapped1 and encoded0 > 0 and encoded1 > 0
    assert not os.path.exists(caches[1]) or not os.listdir(caches[1])  # only rank 0 writes


def test_texts_are_streamed_a_chunk_at_a_time(tmp_path, monkeypatch):
    """load_tokenized reads the data as it tokenizes it: counted with the garbage collector each time a chunk of
    16 groups is encoded, at most two chunks of formats.Group objects (their texts) are alive, never all 200
    groups (read_groups followed by tokenizing holds every one); the result equals tokenize_set over
    read_groups' list with the default chunk size."""
    import gc

    from formats import Group

    tok = ChatTokenizer.from_pretrained(DEMO)
    path = demo_rows(tmp_path / "d.jsonl")
    groups, _ = read_groups(path)
    expected, _ = data.tokenize_set(groups, tok, 24, 16)
    del groups
    monkeypatch.setattr(data, "CHUNK", 16)
    alive, encode = [], data._encode_chunk

    def counting(chunk, *args):
        gc.collect()
        alive.append(sum(type(o) is Group for o in gc.get_objects()))
        return encode(chunk, *args)

    monkeypatch.setattr(data, "_encode_chunk", counting)
    got, _, _ = load(path, tok, None)
    assert len(alive) == 13 and max(alive) <= 2 * 16
    for name, array in expected.arrays().items():
        np.testing.assert_array_equal(got.arrays()[name], array)


def test_fingerprint_from_the_arrays_equals_the_per_group_hash(tmp_path):
    """checkpoint.data_fingerprint of a whole TokenizedSet (hashed from its arrays, TokenizedSet.fingerprint)
    against the same function over a plain list of the groups (the per-group loop over id lists): one digest,
    so checkpoints written before keep resuming; and a changed score or token changes it."""
    from checkpoint import data_fingerprint

    tok = ChatTokenizer.from_pretrained(DEMO)
    groups, _ = read_groups(demo_rows(tmp_path / "d.jsonl", 60))
    compact, _ = data.tokenize_set(groups, tok, 24, 16)
    fast = data_fingerprint(compact.groups)
    assert fast == data_fingerprint(list(compact.groups)) == data_fingerprint(tokenize_groups(groups, tok, 24, 16)[0])
    compact.scores = compact.scores.copy()
    compact.scores[-1] += 1
    changed = data_fingerprint(compact.groups)
    compact.tokens = compact.tokens.copy()
    compact.tokens[0] += 1
    assert len({fast, changed, data_fingerprint(compact.groups)}) == 3


def test_cli_writes_the_cache_train_reads(tmp_path, capsys):
    """python data.py prints where it wrote the cache; load_tokenized with the same settings then reads
    that folder, and its groups equal a load without cache."""
    tok = ChatTokenizer.from_pretrained(DEMO)
    path, cache = demo_rows(tmp_path / "d.jsonl"), str(tmp_path / "cache")
    data.main(
        ["--model", DEMO, "--data", path, "--max_length", "24", "--max_prompt_length", "16", "--cache_dir", cache]
    )
    out = capsys.readouterr().out
    (folder,) = [os.path.join(cache, f) for f in os.listdir(cache)]
    assert f"cache: {folder}" in out
    got, _, log = load(path, tok, cache)
    assert any("from the cache" in x for x in log)
    assert as_lists(got) == as_lists(load(path, tok, None)[0])
    data.main(["--model", DEMO, "--data", path, "--no_cache"])
    assert "cache:" not in capsys.readouterr().out and os.listdir(cache) == [os.path.basename(folder)]


def test_cli_cuts_long_texts_before_tokenizing(tmp_path, capsys):
    """python data.py applies train.py's character bound before tokenizing (issue 22 item 8): no text longer
    than 2 x max_length x the longest token's characters reaches the tokenizer, and the output says so."""
    tok = ChatTokenizer.from_pretrained(DEMO)
    long_text = "sort " + "a b c d " * 20000
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": long_text, "responses": [long_text, "a"], "scores": [1, 0]}) + "\n")
    longest, bound = [], 2 * 40 * tok.max_token_chars
    tok = ChatTokenizer.from_pretrained(DEMO)
    real_tok = tok.tokenizer

    class Spy:
        def encode_batch(self, texts, **kw):
            longest.append(max(map(len, texts)))
            return real_tok.encode_batch(texts, **kw)

        encode_batch_fast = encode_batch

        def __getattr__(self, name):
            return getattr(real_tok, name)

    tok.tokenizer = Spy()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(data.ChatTokenizer, "from_pretrained", classmethod(lambda cls, *a, **k: tok))
        data.main(
            ["--model", DEMO, "--data", str(path), "--max_length", "40", "--max_prompt_length", "30", "--no_cache"]
        )
    out = capsys.readouterr().out
    assert longest and max(longest) <= bound + len(tok.bos_token) and len(long_text) > 10 * bound
    assert "2 texts were cut to the character bound" in out
    assert "truncated 1 prompts, 1 responses" in out


# -----------------------------------------------------------------------------
# train.py from the cache


def test_train_from_the_cache_equals_no_cache_dpo(tmp_path, capsys):
    """train.py --loss dpo on a tiny Llama: the run that writes the cache, a --no_cache run and a run that
    reads the cache end with bit-identical weights (the reference log-probs are stored on the cached groups'
    views, and every step's batch is built from them)."""
    import torch

    from conftest import run, save_demo_llama, weights

    model = save_demo_llama(tmp_path / "init")
    flags = [
        "--model",
        model,
        "--data",
        demo_rows(tmp_path / "d.jsonl", 64),
        "--loss",
        "dpo",
        "--batch_size",
        8,
        "--micro_batch_size",
        4,
        "--lr",
        1e-3,
        "--max_length",
        24,
        "--max_prompt_length",
        16,
        "--max_steps",
        3,
        "--log_every",
        1,
        "--warmup_ratio",
        0.0,
        "--seed",
        0,
    ]
    cache = tmp_path / "cache"
    first = weights(run(*flags, "--out", tmp_path / "first", "--cache_dir", cache))
    assert "wrote the cache" in capsys.readouterr().out
    plain = weights(run(*flags, "--out", tmp_path / "plain", "--no_cache"))
    out = capsys.readouterr().out
    assert "from the cache" not in out and "wrote the cache" not in out
    cached = weights(run(*flags, "--out", tmp_path / "cached", "--cache_dir", cache))
    assert "tokenized data from the cache" in capsys.readouterr().out
    assert plain.keys() == cached.keys() == first.keys()
    for name in plain:
        assert torch.equal(plain[name], cached[name]) and torch.equal(plain[name], first[name]), name
    assert os.listdir(cache) and not os.path.exists(tmp_path / "default-cache")  # --no_cache wrote nothing
