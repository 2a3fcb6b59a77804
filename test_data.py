"""
Tests of data.py: reading every accepted format, the chat templates against hand-written token ids
and against transformers' apply_chat_template, truncation, score scaling, sharding and resuming.

    python -m pytest test_data.py -q

Tokenizers are built here with the `tokenizers` library. The "byte" tokenizer has one token per
byte (id = byte value) and the special tokens after them (ids 256, 257, ...), so expected ids can
be written down by hand; the "trained" one is a byte-level BPE with merges (such as "\\n\\n"), to
check that no merge crosses the line between prompt and response.
"""

import gzip
import json
import os
import re
import sys

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import data
import formats
from chat import ChatTokenizer
from data import GroupLoader, TokenizedGroup, micro_batches, tokenize_groups
from formats import DataError, Group, read_groups
from hf_format import CheckpointError

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    """python data.py writes the tokenized set to the cache: here into the test's folder, never the user's home."""
    monkeypatch.setenv("MPPO_CACHE", str(tmp_path / "mppo-cache"))


# The special tokens of Llama 3 and of ChatML (Qwen2), with the byte tokenizer's ids.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
BOT, EOTX, SH, EH, EOT = 256, 257, 258, 259, 260
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]  # <s>: BOS of the ChatML variant that has one
ENDTEXT, IMS, IME, S = 256, 257, 258, 259

# Meta-Llama-3-8B-Instruct's chat template and Qwen2-Instruct's, as their tokenizer_config.json hold them.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A ChatML template that writes bos_token and no default system message (as some Mistral fine-tunes do).
CHATML_BOS_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama 3's pre-tokenizer split: newlines form their own pre-tokens, so "\n\n" never merges with the text after it.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


def byte_chars():
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table): printable Latin-1 bytes stand for
    themselves, the others map to chr(256 + n) in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, n = {}, 0
    for b in range(256):
        out[b] = chr(b) if b in printable else chr(256 + n)
        n += b not in printable
    return out


def finish(tok, specials, bos_post):
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    if bos_post:  # like Llama 3's tokenizer.json: the post-processor adds BOS when asked for special tokens
        bos = specials[0] if specials[0] != "<|endoftext|>" else "<s>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def byte_tokenizer(specials, bos_post=False):
    vocab = {c: b for b, c in byte_chars().items()}
    return finish(Tokenizer(models.BPE(vocab=vocab, merges=[])), specials, bos_post)


CORPUS = [
    "The capital of France is Paris.\n\nParis is a city.",
    "Hello there!\n\nHow are you today?",
    "user\n\nassistant\n\nsystem\n\n",
    "Tell me a joke about the weather.\n",
    "Line one\n\nLine two\n\nLine three",
    "You are a helpful assistant. You are terse.",
    "  indented text\n  more text\n\n",
] * 20


def trained_tokenizer(specials, bos_post=False):
    tok = Tokenizer(models.BPE())
    finish(tok, [], False)
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    assert tok.token_to_id("ĊĊ") is not None  # "\n\n" is one token, so a bad boundary would show
    return finish(tok, specials, bos_post)


def write_checkpoint(path, tok, config, jinja=None, generation=None, special_map=None):
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **config}, f)
    for name, obj in (("generation_config.json", generation), ("special_tokens_map.json", special_map)):
        if obj is not None:
            with open(os.path.join(path, name), "w") as f:
                json.dump(obj, f)
    if jinja is not None:
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(jinja)
    return str(path)


def llama3_dir(path, tok=None, template=LLAMA3_TEMPLATE, **kw):
    tok = tok or byte_tokenizer(LLAMA3_SPECIALS)
    cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": template}
    return write_checkpoint(path, tok, {k: v for k, v in cfg.items() if v is not None}, **kw)


def chatml_dir(path, tok=None, template=CHATML_TEMPLATE, **kw):
    tok = tok or byte_tokenizer(CHATML_SPECIALS)
    cfg = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": template}
    return write_checkpoint(path, tok, {k: v for k, v in cfg.items() if k == "bos_token" or v is not None}, **kw)


def B(s):  # the byte tokenizer's ids of plain text
    return list(s.encode())


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": " Hello! "},
    {"role": "user", "content": "  Tell me a joke.\n"},
]

# -----------------------------------------------------------------------------
# Chat templates against hand-written strings and ids


def test_llama3_single_turn_exact(tmp_path):
    """Llama 3, one user turn: the rendered string and ids against ones written out by hand from Meta's format."""
    tok = ChatTokenizer.from_pretrained(llama3_dir(tmp_path))
    assert tok.template == "llama3" and tok.bos_id == BOT and tok.eos_id == EOT
    text = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert tok.render_prompt("Hi") == text
    assert tok.encode_prompt("Hi") == [BOT, SH, *B("user"), EH, *B("\n\nHi"), EOT, SH, *B("assistant"), EH, *B("\n\n")]
    assert tok.encode_prompt([{"role": "user", "content": "Hi"}]) == tok.encode_prompt("Hi")


def test_llama3_multi_turn_with_system_exact(tmp_path):
    """Llama 3, system + earlier turns: one BOS, every content stripped (the template's `trim`), ids by hand."""
    tok = ChatTokenizer.from_pretrained(llama3_dir(tmp_path))

    def turn(role, text):
        return [SH, *B(role), EH, *B("\n\n" + text), EOT]

    expected = [
        BOT,
        *turn("system", "You are terse."),
        *turn("user", "Hi there"),
        *turn("assistant", "Hello!"),
        *turn("user", "Tell me a joke."),
        SH,
        *B("assistant"),
        EH,
        *B("\n\n"),
    ]
    assert tok.encode_prompt(CONVERSATION) == expected
    assert tok.render_prompt(CONVERSATION, add_generation_prompt=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nTell me a joke.<|eot_id|>"
    )
    # the response as scored: stripped content + <|eot_id|>; with the header when asked
    assert tok.encode_response(" Paris.\n") == [*B("Paris."), EOT]
    assert tok.encode_response(" Paris.\n", include_header=True) == [SH, *B("assistant"), EH, *B("\n\nParis."), EOT]


def test_chatml_default_system_exact(tmp_path):
    """ChatML (Qwen2): the template's default system message is added only when the conversation has none;
    no BOS; the response is content + <|im_end|>, unstripped. Ids by hand."""
    tok = ChatTokenizer.from_pretrained(chatml_dir(tmp_path))
    assert tok.template == "chatml" and tok.bos_id is None and tok.eos_id == IME and tok.pad_id == ENDTEXT
    assert tok.render_prompt("Hi") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.encode_prompt("Hi") == [
        IMS,
        *B("system\nYou are a helpful assistant."),
        IME,
        *B("\n"),
        IMS,
        *B("user\nHi"),
        IME,
        *B("\n"),
        IMS,
        *B("assistant\n"),
    ]

    def turn(role, text):
        return [IMS, *B(f"{role}\n{text}"), IME, *B("\n")]

    assert tok.encode_prompt(CONVERSATION) == [
        *turn("system", "You are terse."),
        *turn("user", "Hi there"),
        *turn("assistant", " Hello! "),
        *turn("user", "  Tell me a joke.\n"),
        IMS,
        *B("assistant\n"),
    ]
    assert tok.encode_response(" Paris.\n") == [*B(" Paris.\n"), IME]
    assert tok.encode_response("Paris.", include_header=True) == [IMS, *B("assistant\nParis."), IME]


@pytest.mark.parametrize("kind", ["llama3", "chatml_bos", "none"])
def test_exactly_one_bos_with_bos_adding_post_processor(tmp_path, kind):
    """A tokenizer whose post-processor adds BOS by itself (Llama 3's does) still gives exactly one BOS,
    first, since the template already writes it; checked against the tokenizer's own encode, which adds one."""
    specials = CHATML_SPECIALS if kind == "chatml_bos" else LLAMA3_SPECIALS
    raw = byte_tokenizer(specials, bos_post=True)
    bos = S if kind == "chatml_bos" else BOT
    assert raw.encode("Hi").ids == [bos, *B("Hi")]  # the post-processor does add one
    if kind == "llama3":
        tok = ChatTokenizer.from_pretrained(llama3_dir(tmp_path, raw))
    elif kind == "chatml_bos":
        tok = ChatTokenizer.from_pretrained(
            write_checkpoint(
                tmp_path, raw, {"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": CHATML_BOS_TEMPLATE}
            )
        )
        assert tok.encode_prompt("Hi") == [S, IMS, *B("user\nHi"), IME, *B("\n"), IMS, *B("assistant\n")]
    else:
        tok = ChatTokenizer.from_pretrained(llama3_dir(tmp_path, raw, template=None))
        assert tok.template == "none"
        assert tok.encode_prompt("Q: 2+2?\nA:") == [BOT, *B("Q: 2+2?\nA:")]
        assert tok.encode_response(" 4") == [*B(" 4"), EOT]  # raw text ends with eos
    for prompt in ("Hi", CONVERSATION)[: 1 if kind == "none" else 2]:
        ids = tok.encode_prompt(prompt)
        assert ids[0] == bos and ids.count(bos) == 1


# -----------------------------------------------------------------------------
# Parity with transformers' apply_chat_template

ANSWERS = ["Paris is the capital.\n", "  Why did the weather tell a joke? ", "Line one\n\nLine two"]
PROMPTS = [
    "What is the capital of France?",
    CONVERSATION,
    [
        {"role": "user", "content": "Line one\n\nLine two"},
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": "Again?"},
    ],
]


@pytest.mark.parametrize(
    "kind,bos_post",
    [("llama3", False), ("llama3", True), ("chatml", False), ("chatml_bos", True), ("chatml_jinja", False)],
)
def test_ids_equal_apply_chat_template(tmp_path, kind, bos_post):
    """Against transformers: AutoTokenizer loads the same checkpoint directory (so it reads the same config files),
    and apply_chat_template(tokenize=True) must equal our ids, for prompts with the generation prompt, for the
    full conversation = prompt + response (ChatML's final "\\n" after <|im_end|> is not ours to score), and for
    the include_header split. The tokenizer is a BPE with merges such as "\\n\\n", so a merge across the
    prompt/response boundary would show."""
    transformers = pytest.importorskip("transformers")
    if kind == "llama3":
        path = llama3_dir(tmp_path, trained_tokenizer(LLAMA3_SPECIALS, bos_post))
    elif kind == "chatml":
        path = chatml_dir(tmp_path, trained_tokenizer(CHATML_SPECIALS))
    elif kind == "chatml_jinja":  # the template in chat_template.jinja, which newer transformers save
        path = chatml_dir(tmp_path, trained_tokenizer(CHATML_SPECIALS), template=None, jinja=CHATML_TEMPLATE)
    else:
        path = write_checkpoint(
            tmp_path,
            trained_tokenizer(CHATML_SPECIALS, bos_post),
            {"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": CHATML_BOS_TEMPLATE},
        )
    hf = transformers.AutoTokenizer.from_pretrained(path)
    tok = ChatTokenizer.from_pretrained(path)
    assert tok.template == ("llama3" if kind == "llama3" else "chatml")

    def hf_ids(messages, add_generation_prompt=False):
        return list(
            hf.apply_chat_template(
                messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
            )["input_ids"]
        )

    tail = [] if kind == "llama3" else tok.encode("\n")
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        assert tok.render_prompt(prompt) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.encode_prompt(prompt) == hf_ids(messages, add_generation_prompt=True)
        assert tok.encode_prompt(prompt, add_generation_prompt=False) == hf_ids(messages)
        for answer in ANSWERS:
            full = hf_ids(messages + [{"role": "assistant", "content": answer}])
            assert tok.encode_prompt(prompt) + tok.encode_response(answer) + tail == full
            assert tok.encode_prompt(prompt, False) + tok.encode_response(answer, include_header=True) + tail == full


# -----------------------------------------------------------------------------
# Checkpoint configuration


def test_stop_ids_pad_and_special_tokens_map(tmp_path):
    """Llama 3 Instruct's files: eos from special_tokens_map.json (saved as an AddedToken dict), extra stop ids
    from generation_config.json, <|eot_id|> always a stop id, pad falling back to eos."""
    path = write_checkpoint(
        tmp_path,
        byte_tokenizer(LLAMA3_SPECIALS),
        {"chat_template": LLAMA3_TEMPLATE},
        generation={"bos_token_id": BOT, "eos_token_id": [EOTX, EOT]},
        special_map={"bos_token": {"content": "<|begin_of_text|>", "special": True}, "eos_token": "<|end_of_text|>"},
    )
    tok = ChatTokenizer.from_pretrained(path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (BOT, EOTX, EOTX, {EOTX, EOT})
    assert tok.vocab_size == 256 + len(LLAMA3_SPECIALS)
    assert tok.decode(tok.encode_prompt("Hi")) == "user\n\nHiassistant\n\n"  # specials skipped
    assert tok.decode(tok.encode_response("ok"), skip_special_tokens=False) == "ok<|eot_id|>"


def test_template_detection(tmp_path, monkeypatch):
    """Template choice from the text: a list of named templates, chat_template.jinja with escaped "\\n" in its
    default system message, no template ('none'), an explicit override, Llama 3.1-3.3 by its 'Cutting Knowledge
    Date', any other template rendered through jinja2 ('jinja') or, without jinja2, an error naming the pip package
    and --template; clear errors for a template whose tokens the tokenizer lacks."""
    named = [{"name": "tool_use", "template": "{{ tools }}"}, {"name": "default", "template": LLAMA3_TEMPLATE}]
    assert ChatTokenizer.from_pretrained(llama3_dir(tmp_path / "a", template=named)).template == "llama3"
    jinja = CHATML_TEMPLATE.replace("\n", "\\n").replace("helpful assistant.", "helpful\\tassistant.")
    tok = ChatTokenizer.from_pretrained(chatml_dir(tmp_path / "b", template="{{ ignored }}", jinja=jinja))
    assert tok.template == "chatml" and tok.default_system == "You are a helpful\tassistant."
    assert ChatTokenizer.from_pretrained(llama3_dir(tmp_path / "c", template=None)).template == "none"
    assert ChatTokenizer.from_pretrained(str(tmp_path / "c"), template="llama3").encode_prompt("x")[0] == BOT
    assert (
        ChatTokenizer.from_pretrained(
            llama3_dir(tmp_path / "d", template="Cutting Knowledge Date: <|start_header_id|>")
        ).template
        == "llama3.1"
    )
    pytest.importorskip("jinja2")
    assert ChatTokenizer.from_pretrained(llama3_dir(tmp_path / "e", template="{{ messages }}")).template == "jinja"
    monkeypatch.setitem(sys.modules, "jinja2", None)  # as if jinja2 were not installed: importing it fails
    with pytest.raises(CheckpointError, match=r"needs jinja2 \(pip install jinja2\); or pass --template"):
        ChatTokenizer.from_pretrained(str(tmp_path / "e"))
    assert ChatTokenizer.from_pretrained(str(tmp_path / "e"), template="llama3").template == "llama3"
    with pytest.raises(ValueError, match="needs the token <|im_start|>"):
        ChatTokenizer.from_pretrained(str(tmp_path / "c"), template="chatml")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        ChatTokenizer.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="plain-text prompts"):
        ChatTokenizer.from_pretrained(str(tmp_path / "c")).encode_prompt(CONVERSATION)


# -----------------------------------------------------------------------------
# Reading: one fixture per format, bad rows, skips

EXPECTED = [
    ("What is the capital of France?", ["Paris.", "Lyon is the capital."], [9.0, 3.0]),
    ("Name a prime number.", ["7", "8"], [8.0, 1.0]),
    ("Say hi in French.", ["Bonjour!", "Hello."], [7.5, 6.0]),
]


@pytest.mark.parametrize(
    "name,fmt,lines",
    [
        ("canonical.jsonl", "canonical", [1, 2, 3]),
        ("simpo.jsonl", "simpo", [1, 2, 3]),
        ("rrhf.jsonl", "rrhf", [1, 2, 3]),
        ("pairwise.jsonl", "pairwise", [1, 2, 3]),
        ("ultrafeedback.json", "ultrafeedback", [0, 1, 2]),
    ],
)
def test_fixture_formats_give_the_same_groups(name, fmt, lines):
    """Each fixture in testdata/ holds the same three groups in its own format; all must read to EXPECTED,
    with the format detected from the first row's keys (SimPO rows also carry chosen/rejected)."""
    groups, report = read_groups(os.path.join(HERE, "testdata", name))
    assert [(g.prompt, g.responses, g.scores) for g in groups] == EXPECTED
    assert [g.line for g in groups] == lines
    assert f"({fmt})" in report.source and report.rows == report.kept == 3 and not report.skipped


def write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


GOOD = {"prompt": "p", "responses": ["a", "b"], "scores": [1, 2]}
GOOD_ROW = {
    "canonical": GOOD,
    "rrhf": {"query": "q", "responses": ["a", "b"], "scores": [1, 2]},
    "simpo": {"prompt": "p", "all_generated_responses": ["a", "b"], "all_rm_scores": [1, 2]},
    "pairwise": {"prompt": "p", "chosen": "a", "rejected": "b"},
    "ultrafeedback": {
        "instruction": "p",
        "completions": [{"response": "a", "overall_score": 2}, {"response": "b", "overall_score": 1}],
    },
}
BAD_ROWS = [  # (row on line 3 of a .jsonl file, format override, expected message after "FILE:3: ")
    ('{"prompt": "p", "responses": ["a", "b"],', None, "invalid JSON"),
    ("[1, 2]", None, "expected a JSON object, got list"),
    ({"prompt": "p", "responses": ["a", "b"]}, "canonical", "field 'scores': missing"),
    (
        {"prompt": "p", "responses": "a", "scores": [1]},
        "canonical",
        "field 'responses': expected a list of strings, got string",
    ),
    (
        {"prompt": "p", "responses": ["a", 3], "scores": [1, 2]},
        None,
        "field 'responses[1]': expected a string, got int",
    ),
    (
        {"prompt": 5, "responses": ["a", "b"], "scores": [1, 2]},
        None,
        "field 'prompt': expected a string or a list of messages, got int",
    ),
    (
        {"prompt": [{"role": "user"}], "responses": ["a", "b"], "scores": [1, 2]},
        None,
        "field 'prompt[0].content': missing",
    ),
    ({"prompt": [], "responses": ["a", "b"], "scores": [1, 2]}, None, "field 'prompt': empty conversation"),
    (
        {"prompt": "p", "responses": ["a", "b"], "scores": [1, "2"]},
        None,
        "field 'scores[1]': expected a number, got string",
    ),
    (
        {"prompt": "p", "responses": ["a", "b"], "scores": [1, True]},
        None,
        "field 'scores[1]': expected a number, got bool",
    ),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, 2, 3]}, None, "field 'scores': 3 scores for 2 responses"),
    (
        '{"prompt": "p", "responses": ["a", "b"], "scores": [1, NaN]}',
        None,
        "field 'scores[1]': score is nan, not a finite number",
    ),
    (
        '{"prompt": "p", "responses": ["a", "b"], "scores": [-Infinity, 1]}',
        None,
        "field 'scores[0]': score is -inf, not a finite number",
    ),
    (
        {"prompt": "p", "all_generated_responses": ["a", "b"], "all_rm_scores": [1]},
        "simpo",
        "field 'all_rm_scores': 1 scores for 2 responses",
    ),
    (
        {"query": "q", "responses": ["a", "b"], "scores": [1, None]},
        "rrhf",
        "field 'scores[1]': expected a number, got null",
    ),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, 2]}, "rrhf", "field 'query': missing"),
    (
        {"chosen": [{"role": "user", "content": "p"}], "rejected": [{"role": "user", "content": "p"}]},
        "pairwise",
        "field 'chosen[0].role': the last message is 'user', expected 'assistant'",
    ),
    (
        {
            "chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
        },
        "pairwise",
        "field 'rejected': its turns before the answer differ from those of 'chosen'",
    ),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 2}, "pairwise", "field 'score_rejected': missing"),
    (
        {"instruction": "p", "completions": [{"response": "a", "overall_score": "great"}]},
        "ultrafeedback",
        'field \'completions[0].overall_score\': expected a number or "N/A", got "great"',
    ),
    (
        {"instruction": "p", "completions": [{"overall_score": 3}]},
        "ultrafeedback",
        "field 'completions[0].response': missing",
    ),
    (
        {"instruction": "p", "completions": [{"response": "a"}]},
        "ultrafeedback",
        "field 'completions[0].overall_score': missing",
    ),
]


@pytest.mark.parametrize("row,fmt,message", BAD_ROWS)
def test_bad_row_errors_name_file_line_and_field(tmp_path, row, fmt, message):
    """Every structural problem raises DataError with one line "FILE:LINE: field ...: problem"; the bad row sits on
    line 3, after a good row and a blank line, so the line count is checked too."""
    path = write(tmp_path, "bad.jsonl", [GOOD_ROW[fmt or "canonical"], "", row])
    with pytest.raises(DataError) as e:
        read_groups(path, format=fmt)
    assert str(e.value).startswith(f"{path}:3: {message}")
    assert "\n" not in str(e.value)


def test_json_list_errors_name_the_element(tmp_path):
    """A .json list names the element index; a .json file that holds one object, or broken JSON, says so; a missing
    file is a DataError that is also a FileNotFoundError (as it was before data_files)."""
    path = tmp_path / "x.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "prompt": 3}]))
    with pytest.raises(DataError, match=re.escape(f"{path}: element 1: field 'prompt': expected a string")):
        read_groups(str(path))
    path.write_text(json.dumps({"rows": [GOOD]}, indent=1))  # one pretty-printed object: neither a list nor JSON Lines
    with pytest.raises(
        DataError,
        match=re.escape(f"{path}: expected a JSON list of rows or JSON Lines, got one JSON object (fields 'rows')"),
    ):
        read_groups(str(path))
    path.write_text(json.dumps({"rows": [GOOD]}))  # on one line it is one JSON Lines row, of no known format
    with pytest.raises(DataError, match=re.escape(f"{path}:1: cannot tell the format from the fields ['rows']")):
        read_groups(str(path))
    path.write_text('[\n{"prompt": "p",\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:3: invalid JSON")):
        read_groups(str(path))
    with pytest.raises(DataError, match="cannot tell the format"):
        read_groups(write(tmp_path, "y.jsonl", [{"text": "hello"}]))
    with pytest.raises(DataError, match="no rows"):
        read_groups(write(tmp_path, "z.jsonl", [""]))
    with pytest.raises(FileNotFoundError, match="no such data file"):
        read_groups(str(tmp_path / "nope.jsonl"))


def test_unusable_rows_are_skipped_and_counted(tmp_path):
    """Well-formed but unusable rows are skipped, each counted under its reason with its line numbers;
    min_responses=1 (SFT) keeps 1-response rows and equal scores, but never an empty response."""
    rows = [
        GOOD,
        {"prompt": "p", "responses": ["a"], "scores": [1]},
        {"prompt": "p", "responses": ["a", "b", "c"], "scores": [2, 2, 2]},
        {"prompt": "p", "responses": ["a", " \n"], "scores": [1, 2]},
        GOOD,
        {"prompt": "p", "responses": [], "scores": []},
    ]
    path = write(tmp_path, "skips.jsonl", rows)
    groups, report = read_groups(path)
    assert [g.line for g in groups] == [1, 5]
    assert report.skipped == {"fewer than 2 responses": [2, 6], "all scores equal": [3], "an empty response": [4]}
    assert (report.rows, report.kept) == (6, 2)
    assert report.summary().splitlines() == [
        f"{path} (canonical): 6 groups in, 2 kept",
        "  skipped 2: fewer than 2 responses (lines 2, 6)",
        "  skipped 1: all scores equal (lines 3)",
        "  skipped 1: an empty response (lines 4)",
    ]
    groups, report = read_groups(path, min_responses=1)
    assert [g.line for g in groups] == [1, 2, 3, 5]
    assert report.skipped == {"fewer than 1 responses": [6], "an empty response": [4]}
    _, report = read_groups(write(tmp_path, "many.jsonl", [{"prompt": "p", "responses": ["a"], "scores": [1]}] * 7))
    assert "skipped 7: fewer than 2 responses (lines 1, 2, 3, 4, 5, ...)" in report.summary()


def test_ultrafeedback_missing_ratings(tmp_path):
    """UltraFeedback: overall_score when every completion has one (numeric strings accepted); else
    fine-grained_score x 2 for the whole group; completions without a rating are dropped and counted, and a
    group left with one response is skipped."""

    def c(resp, overall, fine="N/A"):
        return {"response": resp, "overall_score": overall, "fine-grained_score": fine}

    rows = [
        {"instruction": "p0", "completions": [c("a", 8, 4), c("b", "N/A", 3), c("c", 3, 2.5)]},
        {"instruction": "p1", "completions": [c("a", "9"), c("b", 2.0)]},
        {"instruction": "p2", "completions": [c("a", None), c("b", "N/A", 4.5)]},
        {"instruction": "p3", "completions": [c("a", 7, None), c("b", "N/A", 2), c("c", "N/A", "N/A")]},
    ]
    groups, report = read_groups(write(tmp_path, "uf.jsonl", rows))
    assert [(g.prompt, g.responses, g.scores) for g in groups] == [
        ("p0", ["a", "b", "c"], [8.0, 6.0, 5.0]),
        ("p1", ["a", "b"], [9.0, 2.0]),
    ]
    assert report.skipped == {"fewer than 2 responses": [3, 4]}
    assert report.dropped == {formats.UNRATED: [3, 4, 4]}
    assert "dropped 3 UltraFeedback completions without a usable rating (lines 3, 4)" in report.summary()


def test_pairwise_variants(tmp_path):
    """Pairwise rows: string chosen/rejected with a conversation prompt; conversations whose earlier turns
    (system message included) become the prompt; no scores means chosen 1, rejected 0."""
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    rows = [
        {"prompt": conv, "chosen": "good", "rejected": "bad"},
        {
            "prompt": "ignored",
            "chosen": conv + [{"role": "assistant", "content": "good"}],
            "rejected": conv + [{"role": "assistant", "content": "bad"}],
            "score_chosen": 7,
            "score_rejected": 7.5,
        },
    ]
    groups, _ = read_groups(write(tmp_path, "pw.jsonl", rows))
    assert [(g.prompt, g.responses, g.scores) for g in groups] == [
        (conv, ["good", "bad"], [1.0, 0.0]),
        (conv, ["good", "bad"], [7.0, 7.5]),
    ]


# -----------------------------------------------------------------------------
# Tokenizing and truncation


def test_truncation_keeps_prompt_end_and_budget(tmp_path):
    """An over-long prompt keeps its BOS and its last tokens (the generation prompt included); responses are cut
    to max_length - prompt; counts reported. Expected ids sliced from the untruncated encoding by hand."""
    tok = ChatTokenizer.from_pretrained(llama3_dir(tmp_path))
    g = Group("x" * 50, ["abcdefghijklmnop", "ok", "abcdefghi"], [3.0, 1.0, 2.0], line=7)
    full_prompt = tok.encode_prompt(g.prompt)
    (t,), report = tokenize_groups([g], tok, max_length=30, max_prompt_length=20)
    assert t.prompt_ids == [BOT] + full_prompt[-19:] and t.prompt_ids[-3:] == [EH, *B("\n\n")]
    assert t.response_ids == [B("abcdefghij"), [*B("ok"), EOT], [*B("abcdefghi"), EOT]]  # 10 = 30 - 20 tokens of room
    assert (t.scores, t.line) == ([3.0, 1.0, 2.0], 7)
    assert (report.truncated_prompts, report.truncated_responses, report.kept) == (1, 1, 1)
    assert all(len(t.prompt_ids) + len(r) <= 30 for r in t.response_ids)
    # no prompt limit of its own: a prompt filling max_length skips its group
    out, report = tokenize_groups(
        [g, replace_line(g, 8, "y")], tok, max_length=len(full_prompt), max_prompt_length=None
    )
    assert [t.line for t in out] == [8] and report.skipped == {data.PROMPT_FILLS: [7]}
    # include_header moves the assistant header from the prompt into each response
    (h,), _ = tokenize_groups(
        [replace_line(g, 7, "y")], tok, max_length=None, max_prompt_length=None, include_header=True
    )
    assert h.prompt_ids == tok.encode_prompt("y", add_generation_prompt=False)
    assert h.response_ids[1] == [SH, *B("assistant"), EH, *B("\n\nok"), EOT]


def replace_line(g, line, prompt):
    return Group(prompt, g.responses, g.scores, line)


def test_tokenize_rechecks_hand_built_groups(tmp_path):
    """tokenize_groups applies read_groups' skips to groups built by hand."""
    tok = ChatTokenizer.from_pretrained(llama3_dir(tmp_path))
    groups = [Group("p", ["a"], [1.0], 1), Group("p", ["a", "b"], [1.0, 1.0], 2), Group("p", ["a", "b"], [1.0, 2.0], 3)]
    out, report = tokenize_groups(groups, tok, 100, 50)
    assert [t.line for t in out] == [3] and report.skipped == {"fewer than 2 responses": [1], "all scores equal": [2]}
    out, _ = tokenize_groups(groups, tok, 100, 50, min_responses=1)
    assert [t.line for t in out] == [1, 2, 3]


# -----------------------------------------------------------------------------
# Score scaling


def test_scale_scores():
    """Point-wise scores: [0, 1] unchanged; 1-10 ratings divided by 10 (the paper); an explicit range mapped
    linearly; an open scale without a range is an error. Expected values by hand."""

    def g(*s):
        return Group("p", ["a"] * len(s), list(s), 1)

    assert data.scale_scores([g(0.2, 0.9)])[0].scores == [0.2, 0.9]
    out = data.scale_scores([g(1, 10), g(7.5, 3)])
    assert [x.scores for x in out] == [[0.1, 1.0], [0.75, 0.3]]
    out = data.scale_scores([g(-5, 5), g(0, 2.5)], score_range=(-5, 5))
    assert [x.scores for x in out] == [[0.0, 1.0], [0.5, 0.75]]
    with pytest.raises(ValueError, match="score_range"):
        data.scale_scores([g(-1.5, 3.0)])
    with pytest.raises(ValueError, match="outside score_range"):
        data.scale_scores([g(0, 11)], score_range=(0, 10))
    t = TokenizedGroup([1], [[2], [3]], [4.0, 8.0], 1)
    assert data.scale_scores([t])[0].scores == [0.4, 0.8]


# -----------------------------------------------------------------------------
# Batching


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_sharding_gives_every_group_to_one_rank(world_size):
    """Over one epoch of 23 groups in global batches of 8: the ranks' shares of each step are disjoint and
    together equal the single-process batch; the epoch covers 16 distinct groups (the last 7 dropped)."""
    groups = list(range(23))
    single = list(GroupLoader(groups, 8, seed=3))
    ranks = [list(GroupLoader(groups, 8, rank=r, world_size=world_size, seed=3)) for r in range(world_size)]
    assert len(single) == 2 and all(len(rb) == 2 for rb in ranks)
    for step in range(2):
        shares = [ranks[r][step] for r in range(world_size)]
        assert all(len(s) == 8 // world_size for s in shares)
        assert sorted(sum(shares, [])) == sorted(single[step])
    seen = sum(single, [])
    assert len(set(seen)) == 16 and set(seen) <= set(groups)


def test_shuffle_is_deterministic_per_seed_and_epoch():
    """The epoch order is a function of (seed, epoch) only: equal for equal pairs, different otherwise;
    shuffle=False keeps the file order."""
    groups = list(range(50))
    a, b = GroupLoader(groups, 5, seed=1), GroupLoader(groups, 5, seed=1)
    assert (a.order(0) == b.order(0)).all() and not (a.order(0) == a.order(1)).all()
    assert not (a.order(0) == GroupLoader(groups, 5, seed=2).order(0)).all()
    assert sorted(a.order(4)) == groups
    assert sum(GroupLoader(groups, 5, shuffle=False), []) == groups
    epochs = [sum(a, []) for _ in range(3)]  # each pass over the loader is the next epoch
    assert a.epoch == 3 and epochs[0] != epochs[1] and [sorted(e) for e in epochs] == [groups] * 3


@pytest.mark.parametrize("stop_after", [0, 1, 3, 4])
def test_resume_sees_exactly_the_unseen_batches(stop_after):
    """Reference: one loader running 3 epochs uninterrupted (4 steps each). A run stopped after `stop_after`
    steps of epoch 1 (4 = right after its last batch) and a fresh loader restored from its state_dict must
    together produce exactly the reference sequence, on every rank."""
    groups = [f"g{i}" for i in range(17)]
    for rank in range(2):
        ref_loader = GroupLoader(groups, 4, rank, 2, seed=7)
        ref = [b for _ in range(3) for b in ref_loader]
        run = GroupLoader(groups, 4, rank, 2, seed=7)
        seen = list(run) + take(run, stop_after) if stop_after else list(run)
        state = json.loads(json.dumps(run.state_dict()))  # as a checkpoint would store it
        resumed = GroupLoader(groups, 4, rank, 2, seed=7)
        resumed.load_state_dict(state)
        assert (resumed.epoch, resumed.step) == (1, stop_after)
        seen += list(resumed)
        while resumed.epoch < 3:
            seen += list(resumed)
        assert seen == ref


def test_loader_errors():
    """Clear errors: a batch the ranks cannot split evenly, fewer groups than a batch, and a state saved for
    another data set (its order would differ)."""
    with pytest.raises(ValueError, match="not divisible by world_size 4"):
        GroupLoader(list(range(10)), 6, rank=0, world_size=4)
    with pytest.raises(ValueError, match="fewer than one batch"):
        GroupLoader(list(range(3)), 4)
    state = GroupLoader(list(range(10)), 2).state_dict()
    with pytest.raises(ValueError, match="num_groups=10"):
        GroupLoader(list(range(12)), 2).load_state_dict(state)


def test_micro_batches():
    """Greedy consecutive split, worked by hand: groups of 5, 4, 9, 30, 2, 2, 2 tokens with at most 2 groups and
    10 tokens each give [5, 4] [9] [30] [2, 2] [2]; the 30-token group goes alone."""
    sizes = [(2, [1, 2]), (2, [2]), (4, [3, 2]), (10, [20]), (1, [1]), (1, [1]), (1, [1])]
    groups = [TokenizedGroup([0] * p, [[0] * n for n in rs], [0.0] * len(rs), i) for i, (p, rs) in enumerate(sizes)]
    assert [data.group_tokens(g) for g in groups] == [5, 4, 9, 30, 2, 2, 2]
    mbs = micro_batches(groups, micro_batch_size=2, max_tokens=10)
    assert [[g.line for g in mb] for mb in mbs] == [[0, 1], [2], [3], [4, 5], [6]]
    assert [[g.line for g in mb] for mb in micro_batches(groups, 3)] == [[0, 1, 2], [3, 4, 5], [6]]


# -----------------------------------------------------------------------------
# python data.py


def test_cli_statistics(tmp_path, capsys):
    """The statistics mode on a fixture: groups, responses per group, length percentiles, truncation. Token counts
    by hand for the byte tokenizer: a prompt of n bytes renders to BOS + (SH "user" EH "\\n\\n" text EOT) +
    (SH "assistant"
    EH "\\n\\n") = 1 + (8 + n + 1) + 13 = 23 + n tokens: 53, 43, 40 for the three prompts, so the median is 43. At
    max_prompt_length 45 only the first prompt is cut (to 45, leaving 5 tokens for "Paris." + EOT and its rival)."""
    path = llama3_dir(tmp_path)
    data.main(
        [
            "--model",
            path,
            "--data",
            os.path.join(HERE, "testdata", "canonical.jsonl"),
            "--max_length",
            "50",
            "--max_prompt_length",
            "45",
        ]
    )
    out = capsys.readouterr().out
    assert "template llama3" in out and "groups: 3, responses: 6" in out and "responses per group: 2: 3" in out
    assert re.search(r"prompt tokens: +p50 43 .* max 53\n", out)
    assert "truncated 1 prompts, 2 responses" in out


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    """A missing file or a bad row ends with one "error: ..." line on stderr and exit code 2, no traceback."""
    path = llama3_dir(tmp_path)
    for args in (
        ["--model", path, "--data", str(tmp_path / "nope.jsonl")],
        ["--model", str(tmp_path / "nope"), "--data", os.path.join(HERE, "testdata", "rrhf.jsonl")],
        ["--model", path, "--data", write(tmp_path, "bad.jsonl", ["{"])],
    ):
        with pytest.raises(SystemExit) as e:
            data.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1


# -----------------------------------------------------------------------------
# Llama 3.1-3.3 templates and any other template (jinja2), against apply_chat_template

TESTDATA = os.path.join(HERE, "testdata")


def read_testdata(name):
    with open(os.path.join(TESTDATA, name), encoding="utf-8") as f:
        return f.read()


LLAMA32_TEMPLATE = read_testdata("llama-3.2-instruct.chat_template.jinja")
LLAMA31_TEMPLATE = read_testdata("llama-3.1-instruct.chat_template.jinja")
# zephyr-7b-beta's template (the alignment-handbook's), and Mistral-7B-Instruct's, as their tokenizer_config.json
# hold them
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
MISTRAL_SPECIALS = ["<s>", "</s>", "<unk>"]
LLAMA31_PROMPTS = [
    "What is the capital of France?",
    [{"role": "system", "content": "  You are terse.\n"}, {"role": "user", "content": " Hi there "}],
    CONVERSATION,
    [
        {"role": "user", "content": "Line one\n\nLine two"},
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": "Again?"},
    ],
]


def hf_parity(hf, tok, prompts, tail=(), **kwargs):
    """Our prompt text and ids against apply_chat_template with the generation prompt, and prompt + response ids
    (with the header in the prompt or in the response) against apply_chat_template of the whole conversation."""

    def hf_ids(messages, add_generation_prompt=False):
        return list(
            hf.apply_chat_template(
                messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt, **kwargs
            )["input_ids"]
        )

    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        assert tok.render_prompt(prompt) == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **kwargs
        )
        assert tok.encode_prompt(prompt) == hf_ids(messages, add_generation_prompt=True)
        for answer in ANSWERS:
            full = hf_ids(messages + [{"role": "assistant", "content": answer}])
            assert tok.encode_prompt(prompt) + tok.encode_response(answer, prompt=prompt) + list(tail) == full
            assert (
                tok.encode_prompt(prompt, False)
                + tok.encode_response(answer, include_header=True, prompt=prompt)
                + list(tail)
                == full
            )


@pytest.mark.parametrize("version", ["3.1", "3.2"])
def test_llama31_and_32_equal_apply_chat_template(tmp_path, version):
    """Llama 3.1 and 3.2 Instruct (3.3 ships 3.1's template text with strftime_now, like 3.2): rendered in Python,
    against transformers' apply_chat_template on the same checkpoint directory, for no system message, a system
    message with surrounding spaces (trimmed, after the dated header) and multi-turn conversations, one BOS, with
    a BPE tokenizer whose post-processor adds BOS. 3.1 writes its fixed date; 3.2's date is pinned on both sides
    with date_string. The 3.1 fixture is the 3.2 template with its strftime_now block replaced by 3.1's fixed date
    (testdata/README.md): checked here too."""
    transformers = pytest.importorskip("transformers")
    assert LLAMA31_TEMPLATE == LLAMA32_TEMPLATE.replace(
        "{%- if strftime_now is defined %}\n"
        '        {%- set date_string = strftime_now("%d %b %Y") %}\n    {%- else %}\n'
        '        {%- set date_string = "26 Jul 2024" %}\n    {%- endif %}',
        '{%- set date_string = "26 Jul 2024" %}',
    )
    template = LLAMA31_TEMPLATE if version == "3.1" else LLAMA32_TEMPLATE
    path = llama3_dir(tmp_path, trained_tokenizer(LLAMA3_SPECIALS, bos_post=True), template=None, jinja=template)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    pin = {} if version == "3.1" else {"date_string": "05 Mar 2025"}
    tok = ChatTokenizer.from_pretrained(path, **pin)
    assert tok.template == "llama3.1" and tok.date_string == ("26 Jul 2024" if version == "3.1" else "05 Mar 2025")
    hf_parity(hf, tok, LLAMA31_PROMPTS, **pin)
    text = tok.render_prompt([{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": "Hi"}])
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        f"Today Date: {tok.date_string}\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tok.encode_prompt("Hi")
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1  # the post-processor's BOS is not added a second time


def test_llama32_date_is_today_unless_pinned(tmp_path):
    """Llama 3.2 without date_string: today's date, as transformers' strftime_now gives it (both read the clock, so
    this compares against apply_chat_template on the same day); date_string on both sides pins it; forcing the
    'llama3.1' template on a checkpoint without one takes 3.1's fixed date."""
    transformers = pytest.importorskip("transformers")
    path = llama3_dir(tmp_path, byte_tokenizer(LLAMA3_SPECIALS), template=LLAMA32_TEMPLATE)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "Hi"}]
    assert ChatTokenizer.from_pretrained(path).render_prompt("Hi") == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert "Today Date: 01 Jan 2030\n" in ChatTokenizer.from_pretrained(path, date_string="01 Jan 2030").render_prompt(
        "Hi"
    )
    plain = llama3_dir(tmp_path / "plain", byte_tokenizer(LLAMA3_SPECIALS))
    assert "Today Date: 26 Jul 2024\n" in ChatTokenizer.from_pretrained(plain, template="llama3.1").render_prompt("Hi")


def test_tool_conversations_are_refused(tmp_path):
    """A message with tool calls is refused when read (its calls would be dropped), naming file, line and message;
    a tool result under a Llama 3.1 template is refused when tokenized, naming the group's line. A null
    tool_calls (as Parquet gives every message of a column that has them anywhere) is no tool call."""
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}],
    }
    no_call = {"role": "assistant", "content": "a", "tool_calls": None}
    rows = [
        {**GOOD, "prompt": [{"role": "user", "content": "u"}, no_call, {"role": "user", "content": "w"}]},
        {**GOOD, "prompt": [{"role": "user", "content": "u"}, call, {"role": "user", "content": "v"}]},
    ]
    with pytest.raises(
        DataError,
        match=r"tools\.jsonl:2: field 'prompt\[1\]\.tool_calls': conversations with tool calls are not supported",
    ):
        read_groups(write(tmp_path, "tools.jsonl", rows))
    groups, _ = read_groups(write(tmp_path, "ok.jsonl", rows[:1]))
    tok = ChatTokenizer.from_pretrained(
        llama3_dir(tmp_path / "m", template=LLAMA32_TEMPLATE), date_string="01 Jan 2025"
    )
    tool = Group([{"role": "user", "content": "u"}, {"role": "tool", "content": "42"}], ["a", "b"], [1.0, 2.0], 9)
    with pytest.raises(DataError, match="group from line 9: conversations with tool results are not supported"):
        tokenize_groups(groups + [tool], tok, 100, 50)


@pytest.mark.parametrize("kind", ["zephyr", "mistral"])
def test_jinja_templates_equal_apply_chat_template(tmp_path, kind):
    """Templates that are neither Llama nor ChatML, rendered through jinja2 as transformers does: Zephyr's (text
    role markers, eos after every turn, a "\\n" after it that is not scored) and Mistral-Instruct's (bos_token from
    the config, raise_exception on roles out of order). Prompt text and ids, and prompt + response ids with the
    template's trailing text added, against apply_chat_template; the response as scored ends at its stop token."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("jinja2")
    if kind == "zephyr":
        cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": ZEPHYR_TEMPLATE}
        prompts, tail = LLAMA31_PROMPTS, None
    else:
        cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": MISTRAL_TEMPLATE}
        prompts, tail = [LLAMA31_PROMPTS[0], LLAMA31_PROMPTS[3]], []
    path = write_checkpoint(tmp_path, trained_tokenizer(MISTRAL_SPECIALS, bos_post=True), cfg)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    tok = ChatTokenizer.from_pretrained(path)
    assert tok.template == "jinja" and tok.stop_ids == {tok.eos_id}
    hf_parity(hf, tok, prompts, tail=tok.encode("\n") if tail is None else tail)
    if kind == "zephyr":
        assert tok.render_prompt("Hi") == "<|user|>\nHi</s>\n<|assistant|>\n"
        assert tok.render_response("Paris.", prompt="Hi") == "Paris.</s>"
        assert tok.render_response("Paris.", include_header=True, prompt="Hi") == "<|assistant|>\nParis.</s>"
    else:
        assert tok.render_prompt("Hi") == "<s>[INST] Hi [/INST]" and tok.encode_prompt("Hi").count(tok.bos_id) == 1
        with pytest.raises(ValueError, match="Conversation roles must alternate") as e:
            tok.render_prompt([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
        assert "\n" not in str(e.value)
        # through tokenize_groups: one DataError naming the group's line
        with pytest.raises(DataError, match="group from line 4: the chat template failed"):
            tokenize_groups([Group([{"role": "assistant", "content": "a"}], ["x", "y"], [1.0, 0.0], 4)], tok, 64, 32)


def test_jinja_template_errors(tmp_path):
    """A template whose prompt + response rendering does not start with the prompt's rendering, one whose
    assistant turn has no stop token, and one that does not compile: each a one-line error."""
    pytest.importorskip("jinja2")
    tok = byte_tokenizer(MISTRAL_SPECIALS)
    reverse = "{% for m in messages | reverse %}{{ m['content'] + eos_token }}{% endfor %}"
    t = ChatTokenizer.from_pretrained(
        write_checkpoint(tmp_path / "a", tok, {"eos_token": "</s>", "chat_template": reverse})
    )
    with pytest.raises(ValueError, match="does not begin with the prompt"):
        t.render_response("a", prompt="q")
    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    t = ChatTokenizer.from_pretrained(
        write_checkpoint(tmp_path / "b", tok, {"eos_token": "</s>", "chat_template": plain})
    )
    with pytest.raises(ValueError, match=r"no stop token \(</s>\)"):
        t.render_response("a", prompt="q")
    with pytest.raises(CheckpointError, match="does not compile"):
        ChatTokenizer.from_pretrained(
            write_checkpoint(tmp_path / "c", tok, {"eos_token": "</s>", "chat_template": "{% for %}"})
        )


def test_broken_tokenizer_json_is_one_line(tmp_path):
    """A truncated tokenizer.json (a download cut short) is a CheckpointError (a ValueError) naming the file, in one
    line; so is invalid JSON in tokenizer_config.json."""
    path = llama3_dir(tmp_path)
    full = (tmp_path / "tokenizer.json").read_text()
    (tmp_path / "tokenizer.json").write_text(full[: len(full) // 2])
    with pytest.raises(
        CheckpointError, match=re.escape(f"{tmp_path / 'tokenizer.json'}: not a valid tokenizer.json")
    ) as e:
        ChatTokenizer.from_pretrained(path)
    assert "\n" not in str(e.value)
    (tmp_path / "tokenizer.json").write_text(full)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": ')
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'tokenizer_config.json'}:1: invalid JSON")):
        ChatTokenizer.from_pretrained(path)


# -----------------------------------------------------------------------------
# Data files as downloaded


def test_data_files_folder_glob_list(tmp_path):
    """A folder as `huggingface-cli download --local-dir` leaves it (data files at any depth, README.md,
    .gitattributes, a .cache folder holding data-like files): its data files, sorted; a glob; a list; and one-line
    errors for a missing file, an empty glob and a folder without data files. Expected lists written by hand."""
    (tmp_path / "d" / "data" / "sub").mkdir(parents=True)
    (tmp_path / "d" / ".cache" / "huggingface").mkdir(parents=True)
    for name in (
        "data/b.jsonl",
        "data/a.parquet",
        "data/sub/c.json.gz",
        "top.json",
        "README.md",
        ".gitattributes",
        ".cache/huggingface/x.jsonl",
        "data/.hidden.jsonl",
        "data/notes.txt",
    ):
        (tmp_path / "d" / name).write_text("")
    d = str(tmp_path / "d")
    assert formats.data_files(d) == [
        f"{d}/data/a.parquet",
        f"{d}/data/b.jsonl",
        f"{d}/data/sub/c.json.gz",
        f"{d}/top.json",
    ]
    assert formats.data_files(f"{d}/data/*.jsonl") == [f"{d}/data/b.jsonl"]
    assert formats.data_files(f"{d}/**/*.gz") == [f"{d}/data/sub/c.json.gz"]
    assert formats.data_files([f"{d}/top.json", f"{d}/data/sub"]) == [f"{d}/top.json", f"{d}/data/sub/c.json.gz"]
    assert formats.data_files(f"{d}/data/notes.txt") == [
        f"{d}/data/notes.txt"
    ]  # a file named explicitly is read whatever its name
    with pytest.raises(DataError, match=re.escape(f"no such data file: {d}/nope.jsonl")):
        formats.data_files([f"{d}/top.json", f"{d}/nope.jsonl"])
    with pytest.raises(DataError, match=re.escape(f"no such data file: {d}/*.parquet")):
        formats.data_files(f"{d}/*.parquet")
    (tmp_path / "d" / "docs" / ".cache").mkdir(parents=True)
    (tmp_path / "d" / "docs" / "README.md").write_text("")
    (tmp_path / "d" / "docs" / ".cache" / "x.jsonl").write_text("")
    with pytest.raises(
        DataError,
        match=re.escape(f"{d}/docs: no data files (.jsonl, .json, .parquet, .jsonl.gz, .json.gz) in this folder"),
    ):
        formats.data_files(f"{d}/docs")  # a README and a hidden folder's file: nothing to read
    with pytest.raises(FileNotFoundError):  # DataError and FileNotFoundError both, as before
        formats.data_files(f"{d}/nope")


def test_ultrafeedback_folder_gzip_and_json_lines_in_json(tmp_path):
    """openbmb/UltraFeedback as downloaded: one JSONL file per source in a folder, with README.md and .gitattributes;
    read as one set (the fixture's three groups split over two files), lines named per file. The same rows as
    JSON Lines in a .json file (what `datasets`' to_json writes) and gzipped (.jsonl.gz) read alike."""
    rows = json.loads(read_testdata("ultrafeedback.json"))
    (tmp_path / "uf").mkdir()
    write(tmp_path / "uf", "evol_instruct.jsonl", rows[:2])
    write(tmp_path / "uf", "flan.jsonl", rows[2:])
    (tmp_path / "uf" / "README.md").write_text("---\nlicense: mit\n---\n")
    (tmp_path / "uf" / ".gitattributes").write_text("*.jsonl filter=lfs\n")
    groups, report = read_groups(str(tmp_path / "uf"))
    assert [(g.prompt, g.responses, g.scores) for g in groups] == EXPECTED
    uf = tmp_path / "uf"
    assert [g.line for g in groups] == [
        f"{uf}/evol_instruct.jsonl:1",
        f"{uf}/evol_instruct.jsonl:2",
        f"{uf}/flan.jsonl:1",
    ]
    assert report.source == f"{uf} (2 files, ultrafeedback)" and report.kept == 3
    lines = write(tmp_path, "x.json", rows)
    with gzip.open(tmp_path / "x.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(map(json.dumps, rows)))
    for path in (lines, str(tmp_path / "x.jsonl.gz")):
        groups, _ = read_groups(path)
        assert [(g.prompt, g.responses, g.scores) for g in groups] == EXPECTED and [g.line for g in groups] == [1, 2, 3]
    # a skip in a set of several files names the file
    write(tmp_path / "uf", "z.jsonl", [{"instruction": "p", "completions": [{"response": "a", "overall_score": 2}]}])
    _, report = read_groups([str(uf / "flan.jsonl"), str(uf / "z.jsonl")])
    assert report.skipped == {"fewer than 2 responses": [f"{uf}/z.jsonl:1"]}


def parquet_rows(path, rows):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def msgs(*turns):
    return [{"content": c, "role": r} for r, c in zip(("user", "assistant") * len(turns), turns)]


def test_parquet_armorm_and_binarized(tmp_path):
    """princeton-nlp/llama3-ultrafeedback-armorm's and HuggingFaceH4/ultrafeedback_binarized's data/*.parquet, rows
    shaped as their cards say: armorm reads as SimPO's format (all responses and their reward-model scores, not the
    chosen/rejected pair); binarized as pairwise with score_chosen/score_rejected. Row indices name the rows."""
    q = EXPECTED[0][0]
    armorm = [
        {
            "prompt_id": "a0",
            "prompt": q,
            "all_generated_responses": ["Paris.", "Lyon.", "Nice."],
            "all_rm_scores": [0.17, 0.05, 0.11],
            "chosen": msgs(q, "Paris."),
            "rejected": msgs(q, "Lyon."),
        }
    ] * 2
    path = parquet_rows(tmp_path / "armorm" / "data" / "train-00000-of-00001.parquet", armorm)
    groups, report = read_groups(str(tmp_path / "armorm"))
    assert [(g.prompt, g.responses, g.scores, g.line) for g in groups] == [
        (q, ["Paris.", "Lyon.", "Nice."], [0.17, 0.05, 0.11], i) for i in (0, 1)
    ]
    assert report.source == f"{tmp_path / 'armorm'} (simpo)"
    binarized = [
        {
            "prompt": p,
            "prompt_id": f"id{i}",
            "chosen": msgs(p, r[0]),
            "rejected": msgs(p, r[1]),
            "messages": msgs(p, r[0]),
            "score_chosen": s[0],
            "score_rejected": s[1],
        }
        for i, (p, r, s) in enumerate(EXPECTED)
    ]
    for split in ("train_prefs", "test_prefs"):
        parquet_rows(tmp_path / "h4" / "data" / f"{split}-00000-of-00001.parquet", binarized)
    groups, report = read_groups(str(tmp_path / "h4" / "data" / "train_prefs-*.parquet"))
    assert [(g.prompt, g.responses, g.scores) for g in groups] == EXPECTED and [g.line for g in groups] == [0, 1, 2]
    bad = parquet_rows(tmp_path / "bad.parquet", [{**armorm[0], "all_rm_scores": [0.1, None, 0.3]}])
    with pytest.raises(
        DataError, match=re.escape(f"{bad}: row 0: field 'all_rm_scores[1]': expected a number, got null")
    ):
        read_groups(bad)
    (tmp_path / "cut.parquet").write_bytes(open(path, "rb").read()[:100])
    with pytest.raises(DataError, match="cut.parquet: cannot read Parquet"):
        read_groups(str(tmp_path / "cut.parquet"))


def test_parquet_without_pyarrow_and_numpy_values(tmp_path, monkeypatch):
    """Without pyarrow a Parquet file is a one-line error naming `pip install pyarrow`. Rows holding numpy values (as
    pandas gives them: np.float32 scores, arrays of strings) pass the same validation as plain ones, and a numpy
    NaN or bool is refused the same way."""
    np = pytest.importorskip("numpy")
    path = parquet_rows(tmp_path / "x.parquet", [GOOD])
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=re.escape(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)")):
        read_groups(path)
    row = {
        "prompt": "p",
        "all_generated_responses": np.array(["a", "b"], dtype=object),
        "all_rm_scores": np.array([1.5, 2.0], dtype=np.float32),
    }
    assert formats.PARSERS["simpo"](row, "w") == ("p", ["a", "b"], [1.5, 2.0], 0)
    assert formats.PARSERS["pairwise"](
        {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": np.int64(3), "score_rejected": np.float64(1)},
        "w",
    )[2] == [3.0, 1.0]
    with pytest.raises(DataError, match=r"w: field 'all_rm_scores\[1\]': score is nan"):
        formats.PARSERS["simpo"]({**row, "all_rm_scores": np.array([1.0, np.nan])}, "w")
    with pytest.raises(DataError, match=r"w: field 'all_rm_scores\[0\]': expected a number, got bool"):
        formats.PARSERS["simpo"]({**row, "all_rm_scores": [np.bool_(True), 1.0]}, "w")


# -----------------------------------------------------------------------------
# More formats


def test_nectar_ranks_and_turns():
    """berkeley-nest/Nectar rows: the Human/Assistant transcript becomes messages (one turn: a plain prompt; two
    turns: user, assistant, user), and rank r of K becomes (K - r) / (K - 1), by hand for K = 3: ranks 1, 2, 3 give
    1, 0.5, 0; already in [0, 1], so scale_scores leaves them."""
    groups, report = read_groups(os.path.join(TESTDATA, "nectar.jsonl"))
    assert "(nectar)" in report.source
    assert [(g.prompt, g.responses, g.scores) for g in groups] == [
        (
            "What is the capital of France?",
            ["Paris.", "Lyon is the capital.", "It is Paris, I think."],
            [1.0, 0.0, 0.5],
        ),
        (
            [
                {"role": "user", "content": "Name a prime number."},
                {"role": "assistant", "content": "7 is one."},
                {"role": "user", "content": "Another one?"},
            ],
            ["8", "11", "13 is prime."],
            [0.0, 1.0, 0.5],
        ),
    ]
    assert data.scale_scores(groups)[0].scores == [1.0, 0.0, 0.5]


@pytest.mark.parametrize(
    "prompt,message",
    [
        ("Question\n\nHuman: hi\n\nAssistant:", "text before the first 'Human:' turn"),
        ("\n\nHuman: hi\n\nAssistant: done", "does not end with an empty 'Assistant:' turn"),
        ("\n\nHuman: hi\n\nHuman: again\n\nAssistant:", "do not alternate Human, Assistant"),
    ],
)
def test_nectar_bad_rows(tmp_path, prompt, message):
    """Malformed Nectar transcripts and ranks: one line naming file, line and field."""
    answers = [{"answer": "a", "model": "m", "rank": 1}, {"answer": "b", "model": "m", "rank": 2}]
    with pytest.raises(DataError, match=re.escape(":1: field 'prompt': ") + ".*" + re.escape(message)):
        read_groups(write(tmp_path, "n.jsonl", [{"prompt": prompt, "answers": answers}]))
    with pytest.raises(DataError, match=re.escape(":1: field 'answers[1].rank': rank 3 outside 1..2")):
        read_groups(write(tmp_path, "n.jsonl", [{"prompt": "x", "answers": [answers[0], {**answers[1], "rank": 3}]}]))


def test_argilla_ratings_are_scores():
    """Pairwise rows with Argilla's ratings (chosen-rating/rejected-rating, or chosen_rating/rejected_rating) score by
    them, not 1/0: so a tie (3.0 and 3.0 on line 3) is skipped as any tie is."""
    groups, report = read_groups(os.path.join(TESTDATA, "argilla_pairwise.jsonl"))
    assert [(g.prompt, g.responses, g.scores) for g in groups] == [
        ("What is the capital of France?", ["Paris.", "Lyon is the capital."], [5.0, 1.5]),
        ("Name a prime number.", ["7", "8"], [4.0, 2.0]),
    ]
    assert report.skipped == {"all scores equal": [3]}


def test_iter_groups_streams_rows_as_read(tmp_path):
    """formats.iter_groups yields each group as soon as its row is read: two good rows come out before the
    broken third line raises its one-line error (read_groups would raise before returning any), a skipped row
    is counted as it passes, and report.read counts the rows read so far. Rows gathered by prompt (HelpSteer2)
    come out once the file is read, in read_groups' order; count_rows counts the rows of both without parsing
    them (blank lines left out)."""
    path = write(tmp_path, "d.jsonl", [GOOD, {**GOOD, "scores": [3, 3]}, "", GOOD, "{broken", GOOD])
    report = formats.Report(source="")
    stream = formats.iter_groups(path, report=report)
    first = next(stream)
    assert (first.line, first.responses, report.read, report.kept) == (1, ["a", "b"], 1, 1)
    second = next(stream)
    assert (second.line, report.read, report.kept, report.skipped) == (4, 3, 2, {"all scores equal": [2]})
    with pytest.raises(DataError, match=re.escape(f"{path}:5: invalid JSON")):
        next(stream)
    assert formats.count_rows(path) == 5

    single = os.path.join(TESTDATA, "helpsteer2.jsonl")
    report = formats.Report(source="")
    stream = formats.iter_groups(single, score_field="correctness", report=report)
    first = next(stream)
    with open(single) as f:
        n_rows = sum(1 for line in f if line.strip())
    assert report.read == n_rows == formats.count_rows(single) and first.line == 1
    expected, _ = read_groups(single, score_field="correctness")
    assert [first, *stream] == expected and report.kept == len(expected)


def test_count_rows_of_each_file_kind(tmp_path):
    """count_rows against the rows written: JSON Lines plain and gzipped, a folder of both, Parquet (its
    metadata), and None for a JSON list (counting it means parsing it)."""
    rows = [GOOD] * 7
    (tmp_path / "x").mkdir()
    plain = write(tmp_path / "x", "a.jsonl", rows)
    with gzip.open(tmp_path / "x" / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows[:3]) + "\n\n")
    assert formats.count_rows(plain) == 7
    assert formats.count_rows(str(tmp_path / "x")) == 10
    listed = tmp_path / "l.json"
    listed.write_text(json.dumps(rows))
    assert formats.count_rows(str(listed)) is None
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows * 3), tmp_path / "p.parquet")
    assert formats.count_rows(str(tmp_path / "p.parquet")) == 21


def test_single_response_rows_grouped_by_prompt(tmp_path):
    """nvidia/HelpSteer2-style rows (one response each) are grouped by prompt, in order of first appearance, scored
    by score_field; without one, a one-line error lists the numeric fields; score_field on other data is refused."""
    path = os.path.join(TESTDATA, "helpsteer2.jsonl")
    groups, report = read_groups(path, score_field="correctness")
    assert [(g.prompt, g.responses, g.scores, g.line) for g in groups] == [
        ("What is the capital of France?", ["Paris.", "Lyon is the capital."], [4.0, 0.0], 1),
        ("Name a prime number.", ["7", "8"], [4.0, 0.0], 3),
        ("Say hi in French.", ["Bonjour!", "Hello."], [4.0, 1.0], 5),
    ]
    assert "(single)" in report.source and (report.rows, report.kept) == (3, 3)
    _, report = read_groups(path, score_field="helpfulness")
    assert report.skipped == {"all scores equal": [5]}
    with pytest.raises(
        DataError,
        match=re.escape(
            f"{path}:1: rows of one response each need the field to score by: pass score_field "
            "(--score_field) one of helpfulness, correctness, coherence, complexity, verbosity"
        ),
    ):
        read_groups(path)
    with pytest.raises(DataError, match="score_field applies to rows of one response each"):
        read_groups(os.path.join(TESTDATA, "canonical.jsonl"), score_field="helpfulness")


def test_ties_kept_for_point_wise_losses(tmp_path):
    """require_preference=False keeps groups whose scores are all equal (the point-wise losses learn from each score
    alone), in read_groups and tokenize_groups alike; other skips still apply."""
    rows = [
        GOOD,
        {"prompt": "p", "responses": ["a", "b"], "scores": [3, 3]},
        {"prompt": "p", "responses": ["a"], "scores": [3]},
    ]
    groups, report = read_groups(write(tmp_path, "t.jsonl", rows), require_preference=False)
    assert [g.line for g in groups] == [1, 2] and report.skipped == {"fewer than 2 responses": [3]}
    tok = ChatTokenizer.from_pretrained(llama3_dir(tmp_path / "m"))
    assert [t.line for t in tokenize_groups(groups, tok, 100, 50)[0]] == [1]
    assert [t.line for t in tokenize_groups(groups, tok, 100, 50, require_preference=False)[0]] == [1, 2]


# -----------------------------------------------------------------------------
# Long texts cut before tokenizing


def test_long_texts_cut_before_tokenizing_keep_the_same_tokens(tmp_path):
    """Texts far over the character bound (2 x max_length x the longest token's characters) are cut before
    tokenizing, and the ids kept equal the token-level truncation of the uncut texts, computed here by encoding
    them whole and slicing: a response keeps its beginning, a prompt its end behind BOS. The cuts are counted."""
    tok = ChatTokenizer.from_pretrained(llama3_dir(tmp_path, trained_tokenizer(LLAMA3_SPECIALS)))
    assert tok.max_token_chars == len("<|start_header_id|>")  # the longest special token; merged tokens are shorter
    max_length, max_prompt_length = 40, 20
    bound = 2 * max_length * tok.max_token_chars
    long_text = " ".join(CORPUS) * 3
    assert len(long_text) > 4 * bound
    g = Group(
        [{"role": "system", "content": long_text}, {"role": "user", "content": "Hello there!"}],
        [long_text, "ok"],
        [2.0, 1.0],
        1,
    )
    (t,), report = tokenize_groups([g], tok, max_length, max_prompt_length)
    full_prompt = tok.encode_prompt(g.prompt)
    assert t.prompt_ids == [tok.bos_id] + full_prompt[-(max_prompt_length - 1) :]
    room = max_length - max_prompt_length
    assert t.response_ids == [tok.encode_response(long_text)[:room], tok.encode_response("ok")]
    assert (report.cut_texts, report.truncated_prompts, report.truncated_responses) == (2, 1, 1)
    assert "of which 2 texts were cut to a character bound before tokenizing" in report.summary()
    # without max_prompt_length a cut prompt still fills max_length, and skips its group as the uncut one does
    _, report = tokenize_groups([g], tok, max_length, None)
    assert report.skipped == {data.PROMPT_FILLS: [1]}
    # no budget, no cut
    (t,), report = tokenize_groups([g], tok, None, None)
    assert t.prompt_ids == full_prompt and report.cut_texts == 0


# -----------------------------------------------------------------------------
# python data.py on what people download


def test_cli_reads_folders_lists_and_formats(tmp_path, capsys):
    """The statistics mode takes a folder and a list of files, and --score_field, --date_string, --keep_ties."""
    path = llama3_dir(tmp_path / "m", template=LLAMA32_TEMPLATE)
    (tmp_path / "d").mkdir()
    for name in ("canonical.jsonl", "rrhf.jsonl"):
        (tmp_path / "d" / name).write_text(read_testdata(name))
    data.main(
        [
            "--model",
            path,
            "--data",
            str(tmp_path / "d"),
            os.path.join(TESTDATA, "simpo.jsonl"),
            "--date_string",
            "01 Jan 2025",
        ]
    )
    out = capsys.readouterr().out
    assert (
        "template llama3.1" in out and "(3 files, canonical, rrhf, simpo)" in out and "groups: 9, responses: 18" in out
    )
    data.main(
        [
            "--model",
            path,
            "--data",
            os.path.join(TESTDATA, "helpsteer2.jsonl"),
            "--score_field",
            "helpfulness",
            "--keep_ties",
        ]
    )
    assert "groups: 3, responses: 6" in capsys.readouterr().out
