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
from data import ChatTokenizer, DataError, Group, GroupLoader, TokenizedGroup, micro_batches, read_groups, tokenize_groups

HERE = os.path.dirname(os.path.abspath(__file__))

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
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


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
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    if bos_post:  # like Llama 3's tokenizer.json: the post-processor adds BOS when asked for special tokens
        bos = specials[0] if specials[0] != "<|endoftext|>" else "<s>"
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def byte_tokenizer(specials, bos_post=False):
    vocab = {c: b for b, c in byte_chars().items()}
    return finish(Tokenizer(models.BPE(vocab=vocab, merges=[])), specials, bos_post)


CORPUS = [
    "The capital of France is Paris.\n\nParis is a city.", "Hello there!\n\nHow are you today?",
    "user\n\nassistant\n\nsystem\n\n", "Tell me a joke about the weather.\n", "Line one\n\nLine two\n\nLine three",
    "You are a helpful assistant. You are terse.", "  indented text\n  more text\n\n",
] * 20


def trained_tokenizer(specials, bos_post=False):
    tok = Tokenizer(models.BPE())
    finish(tok, [], False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
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
    text = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert tok.render_prompt("Hi") == text
    assert tok.encode_prompt("Hi") == [BOT, SH, *B("user"), EH, *B("\n\nHi"), EOT, SH, *B("assistant"), EH, *B("\n\n")]
    assert tok.encode_prompt([{"role": "user", "content": "Hi"}]) == tok.encode_prompt("Hi")


def test_llama3_multi_turn_with_system_exact(tmp_path):
    """Llama 3, system + earlier turns: one BOS, every content stripped (the template's `trim`), ids by hand."""
    tok = ChatTokenizer.from_pretrained(llama3_dir(tmp_path))
    turn = lambda role, text: [SH, *B(role), EH, *B("\n\n" + text), EOT]
    expected = [BOT, *turn("system", "You are terse."), *turn("user", "Hi there"), *turn("assistant", "Hello!"),
                *turn("user", "Tell me a joke."), SH, *B("assistant"), EH, *B("\n\n")]
    assert tok.encode_prompt(CONVERSATION) == expected
    assert tok.render_prompt(CONVERSATION, add_generation_prompt=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nTell me a joke.<|eot_id|>")
    # the response as scored: stripped content + <|eot_id|>; with the header when asked
    assert tok.encode_response(" Paris.\n") == [*B("Paris."), EOT]
    assert tok.encode_response(" Paris.\n", include_header=True) == [SH, *B("assistant"), EH, *B("\n\nParis."), EOT]


def test_chatml_default_system_exact(tmp_path):
    """ChatML (Qwen2): the template's default system message is added only when the conversation has none;
    no BOS; the response is content + <|im_end|>, unstripped. Ids by hand."""
    tok = ChatTokenizer.from_pretrained(chatml_dir(tmp_path))
    assert tok.template == "chatml" and tok.bos_id is None and tok.eos_id == IME and tok.pad_id == ENDTEXT
    assert tok.render_prompt("Hi") == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                       "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.encode_prompt("Hi") == [IMS, *B("system\nYou are a helpful assistant."), IME, *B("\n"),
                                       IMS, *B("user\nHi"), IME, *B("\n"), IMS, *B("assistant\n")]
    turn = lambda role, text: [IMS, *B(f"{role}\n{text}"), IME, *B("\n")]
    assert tok.encode_prompt(CONVERSATION) == [*turn("system", "You are terse."), *turn("user", "Hi there"),
                                               *turn("assistant", " Hello! "), *turn("user", "  Tell me a joke.\n"),
                                               IMS, *B("assistant\n")]
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
        tok = ChatTokenizer.from_pretrained(write_checkpoint(tmp_path, raw, {"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": CHATML_BOS_TEMPLATE}))
        assert tok.encode_prompt("Hi") == [S, IMS, *B("user\nHi"), IME, *B("\n"), IMS, *B("assistant\n")]
    else:
        tok = ChatTokenizer.from_pretrained(llama3_dir(tmp_path, raw, template=None))
        assert tok.template == "none"
        assert tok.encode_prompt("Q: 2+2?\nA:") == [BOT, *B("Q: 2+2?\nA:")]
        assert tok.encode_response(" 4") == [*B(" 4"), EOT]  # raw text ends with eos
    for prompt in ("Hi", CONVERSATION)[:1 if kind == "none" else 2]:
        ids = tok.encode_prompt(prompt)
        assert ids[0] == bos and ids.count(bos) == 1


# -----------------------------------------------------------------------------
# Parity with transformers' apply_chat_template

ANSWERS = ["Paris is the capital.\n", "  Why did the weather tell a joke? ", "Line one\n\nLine two"]
PROMPTS = ["What is the capital of France?", CONVERSATION,
           [{"role": "user", "content": "Line one\n\nLine two"}, {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "Again?"}]]


@pytest.mark.parametrize("kind,bos_post", [("llama3", False), ("llama3", True), ("chatml", False), ("chatml_bos", True), ("chatml_jinja", False)])
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
        path = write_checkpoint(tmp_path, trained_tokenizer(CHATML_SPECIALS, bos_post),
                                {"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": CHATML_BOS_TEMPLATE})
    hf = transformers.AutoTokenizer.from_pretrained(path)
    tok = ChatTokenizer.from_pretrained(path)
    assert tok.template == ("llama3" if kind == "llama3" else "chatml")

    def hf_ids(messages, add_generation_prompt=False):
        return list(hf.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt)["input_ids"])

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
    path = write_checkpoint(tmp_path, byte_tokenizer(LLAMA3_SPECIALS), {"chat_template": LLAMA3_TEMPLATE},
                            generation={"bos_token_id": BOT, "eos_token_id": [EOTX, EOT]},
                            special_map={"bos_token": {"content": "<|begin_of_text|>", "special": True}, "eos_token": "<|end_of_text|>"})
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
    assert ChatTokenizer.from_pretrained(llama3_dir(tmp_path / "d", template="Cutting Knowledge Date: <|start_header_id|>")).template == "llama3.1"
    pytest.importorskip("jinja2")
    assert ChatTokenizer.from_pretrained(llama3_dir(tmp_path / "e", template="{{ messages }}")).template == "jinja"
    monkeypatch.setitem(sys.modules, "jinja2", None)  # as if jinja2 were not installed: importing it fails
    with pytest.raises(data.CheckpointError, match=r"needs jinja2 \(pip install jinja2\); or pass --template"):
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


@pytest.mark.parametrize("name,fmt,lines", [
    ("canonical.jsonl", "canonical", [1, 2, 3]), ("simpo.jsonl", "simpo", [1, 2, 3]), ("rrhf.jsonl", "rrhf", [1, 2, 3]),
    ("pairwise.jsonl", "pairwise", [1, 2, 3]), ("ultrafeedback.json", "ultrafeedback", [0, 1, 2]),
])
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
GOOD_ROW = {"canonical": GOOD, "rrhf": {"query": "q", "responses": ["a", "b"], "scores": [1, 2]},
            "simpo": {"prompt": "p", "all_generated_responses": ["a", "b"], "all_rm_scores": [1, 2]},
            "pairwise": {"prompt": "p", "chosen": "a", "rejected": "b"},
            "ultrafeedback": {"instruction": "p", "completions": [{"response": "a", "overall_score": 2}, {"response": "b", "overall_score": 1}]}}
BAD_ROWS = [  # (row on line 3 of a .jsonl file, format override, expected message after "FILE:3: ")
    ('{"prompt": "p", "responses": ["a", "b"],', None, "invalid JSON"),
    ("[1, 2]", None, "expected a JSON object, got list"),
    ({"prompt": "p", "responses": ["a", "b"]}, "canonical", "field 'scores': missing"),
    ({"prompt": "p", "responses": "a", "scores": [1]}, "canonical", "field 'responses': expected a list of strings, got string"),
    ({"prompt": "p", "responses": ["a", 3], "scores": [1, 2]}, None, "field 'responses[1]': expected a string, got int"),
    ({"prompt": 5, "responses": ["a", "b"], "scores": [1, 2]}, None, "field 'prompt': expected a string or a list of messages, got int"),
    ({"prompt": [{"role": "user"}], "responses": ["a", "b"], "scores": [1, 2]}, None, "field 'prompt[0].content': missing"),
    ({"prompt": [], "responses": ["a", "b"], "scores": [1, 2]}, None, "field 'prompt': empty conversation"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, "2"]}, None, "field 'scores[1]': expected a number, got string"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, True]}, None, "field 'scores[1]': expected a number, got bool"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, 2, 3]}, None, "field 'scores': 3 scores for 2 responses"),
    ('{"prompt": "p", "responses": ["a", "b"], "scores": [1, NaN]}', None, "field 'scores[1]': score is nan, not a finite number"),
    ('{"prompt": "p", "responses": ["a", "b"], "scores": [-Infinity, 1]}', None, "field 'scores[0]': score is -inf, not a finite number"),
    ({"prompt": "p", "all_generated_responses": ["a", "b"], "all_rm_scores": [1]}, "simpo", "field 'all_rm_scores': 1 scores for 2 responses"),
    ({"query": "q", "responses": ["a", "b"], "scores": [1, None]}, "rrhf", "field 'scores[1]': expected a number, got null"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, 2]}, "rrhf", "field 'query': missing"),
    ({"chosen": [{"role": "user", "content": "p"}], "rejected": [{"role": "user", "content": "p"}]}, "pairwise",
     "field 'chosen[0].role': the last message is 'user', expected 'assistant'"),
    ({"chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}, "pairwise",
     "field 'rejected': its turns before the answer differ from those of 'chosen'"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 2}, "pairwise", "field 'score_rejected': missing"),
    ({"instruction": "p", "completions": [{"response": "a", "overall_score": "great"}]}, "ultrafeedback",
     "field 'completions[0].overall_score': expected a number or \"N/A\", got \"great\""),
    ({"instruction": "p", "completions": [{"overall_score": 3}]}, "ultrafeedback", "field 'completions[0].response': missing"),
    ({"instruction": "p", "completions": [{"response": "a"}]}, "ultrafeedback", "field 'completions[0].overall_score': missing"),
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
    with pytest.raises(DataError, match=re.escape(f"{path}: expected a JSON list of rows or JSON Lines, got one JSON object (fields 'rows')")):
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
    rows = [GOOD,
            {"prompt": "p", "responses": ["a"], "scores": [1]},
            {"prompt": "p", "responses": ["a", "b", "c"], "scores": [2, 2, 2]},
            {"prompt": "p", "responses": ["a", " \n"], "scores": [1, 2]},
            GOOD,
            {"prompt": "p", "responses": [], "scores": []}]
    path = write(tmp_path, "skips.jsonl", rows)
    groups, report = read_groups(path)
    assert [g.line for g in groups] == [1, 5]
    assert report.skipped == {"fewer than 2 responses": [2, 6], "all scores equal": [3], "an empty response": [4]}
    assert (report.rows, report.kept) == (6, 2)
    assert report.summary().splitlines() == [
        f"{path} (canonical): 6 groups in, 2 kept",
        "  skipped 2: fewer than 2 responses (lines 2, 6)",
        "  skipped 1: all scores equal (lines 3)",
        "  skipped 1: an empty response (lines 4)"]
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

    rows = [{"instruction": "p0", "completions": [c("a", 8, 4), c("b", "N/A", 3), c("c", 3, 2.5)]},
            {"instruction": "p1", "completions": [c("a", "9"), c("b", 2.0)]},
            {"instruction": "p2", "completions": [c("a", None), c("b", "N/A", 4.5)]},
            {"instruction": "p3", "completions": [c("a", 7, None), c("b", "N/A", 2), c("c", "N/A", "N/A")]}]
    groups, report = read_groups(write(tmp_path, "uf.jsonl", rows))
    assert [(g.prompt, g.responses, g.scores) for g in groups] == [
        ("p0", ["a", "b", "c"], [8.0, 6.0, 5.0]), ("p1", ["a", "b"], [9.0, 2.0])]
    assert report.skipped == {"fewer than 2 responses": [3, 4]}
    assert report.dropped == {data.UNRATED: [3, 4, 4]}
    assert "dropped 3 UltraFeedback completions without a usable rating (lines 3, 4)" in report.summary()


def test_pairwise_variants(tmp_path):
    """Pairwise rows: string chosen/rejected with a conversation prompt; conversations whose earlier turns
    (system message included) become the prompt; no scores means chosen 1, rejected 0."""
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    rows = [{"prompt": conv, "chosen": "good", "rejected": "bad"},
            {"prompt": "ignored", "chosen": conv + [{"role": "assistant", "content": "good"}],
             "rejected": conv + [{"role": "assistant", "content": "bad"}], "score_chosen": 7, "score_rejected": 7.5}]
    groups, _ = read_groups(write(tmp_path, "pw.jsonl", rows))
    assert [(g.prompt, g.responses, g.scores) for g in groups] == [(conv, ["good", "bad"], [1.0, 0.0]), (conv, ["good", "bad"], [7.0, 7.5])]


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
    out, report = tokenize_groups([g, replace_line(g, 8, "y")], tok, max_length=len(full_prompt), max_prompt_length=None)
    assert [t.line for t in out] == [8] and report.skipped == {data.PROMPT_FILLS: [7]}
    # include_header moves the assistant header from the prompt into each response
    (h,), _ = tokenize_groups([replace_line(g, 7, "y")], tok, max_length=None, max_prompt_length=None, include_header=True)
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
    g = lambda *s: Group("p", ["a"] * len(s), list(s), 1)
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
    by hand for the byte tokenizer: a prompt of n bytes renders to BOS + (SH "user" EH "\\n\\n" text EOT) + (SH "assistant"
    EH "\\n\\n") = 1 + (8 + n + 1) + 13 = 23 + n tokens: 53, 43, 40 for the three prompts, so the median is 43. At
    max_prompt_length 45 only the first prompt is cut (to 45, leaving 5 tokens for "Paris." + EOT and its rival)."""
    path = llama3_dir(tmp_path)
    data.main(["--model", path, "--data", os.path.join(HERE, "testdata", "canonical.jsonl"), "--max_length", "50", "--max_prompt_length", "45"])
    out = capsys.readouterr().out
    assert "template llama3" in out and "groups: 3, responses: 6" in out and "responses per group: 2: 3" in out
    assert re.search(r"prompt tokens: +p50 43 .* max 53\n", out)
    assert "truncated 1 prompts, 2 responses" in out


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    """A missing file or a bad row ends with one "error: ..." line on stderr and exit code 2, no traceback."""
    path = llama3_dir(tmp_path)
    for args in (["--model", path, "--data", str(tmp_path / "nope.jsonl")],
                 ["--model", str(tmp_path / "nope"), "--data", os.path.join(HERE, "testdata", "rrhf.jsonl")],
                 ["--model", path, "--data", write(tmp_path, "bad.jsonl", ["{"])]):
        with pytest.raises(SystemExit) as e:
            data.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
