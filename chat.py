"""
Chat templates and ChatTokenizer: a checkpoint's tokenizer.json plus its chat format, rendering
prompts and responses to text exactly as transformers' apply_chat_template does.

Uses tokenizers and the standard library: no torch, no transformers. The Llama 3, Llama 3.1-3.3 and
ChatML chat templates are rendered in plain Python (and checked against transformers in test_data.py);
any other template is rendered with jinja2 when it is installed.
"""

import hashlib
import json
import os
import re
from datetime import datetime

from tokenizers import Tokenizer

from hf_format import CheckpointError

# -----------------------------------------------------------------------------
# Chat templates: Llama 3, Llama 3.1-3.3 and ChatML rendered in plain Python (the tokenizers library
# has no Jinja); any other template through jinja2, when it is installed


TEMPLATES = ("llama3", "llama3.1", "chatml", "jinja", "none")
# Per template: the text that opens the assistant's turn and the token that ends every turn.
LLAMA_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
ASSISTANT_HEADER = {"llama3": LLAMA_HEADER, "llama3.1": LLAMA_HEADER, "chatml": "<|im_start|>assistant\n"}
END_OF_TURN = {"llama3": "<|eot_id|>", "llama3.1": "<|eot_id|>", "chatml": "<|im_end|>"}
LLAMA_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
REQUIRED_TOKENS = {"llama3": LLAMA_TOKENS, "llama3.1": LLAMA_TOKENS, "chatml": ("<|im_start|>", "<|im_end|>")}
LLAMA31_DATE = "26 Jul 2024"  # the date Llama 3.1's template writes, and 3.2's when strftime_now is missing


def detect_template(text):
    """The format a Jinja chat template renders, from its text: 'llama3.1' for Llama 3.1-3.3 (a system
    header with 'Cutting Knowledge Date'), 'llama3', 'chatml', 'jinja' for any other, 'none' without one."""
    if not text:
        return "none"
    if "<|start_header_id|>" in text:
        return "llama3.1" if "Cutting Knowledge Date" in text else "llama3"
    if "<|im_start|>" in text:
        return "chatml"
    return "jinja"


def llama31_date(text, date_string=None, now=None):
    """The "Today Date" a Llama 3.1-3.3 template writes, as transformers renders it: date_string when
    given; today (strftime_now("%d %b %Y")) when the template asks strftime_now, as 3.2 and 3.3 do;
    else the date the template sets (3.1: "26 Jul 2024")."""
    if date_string is not None:
        return date_string
    if "strftime_now" in (text or ""):
        return (now or datetime.now()).strftime("%d %b %Y")
    m = re.search(r"set date_string = [\"']([^\"']*)[\"']", text or "")
    return m[1] if m else LLAMA31_DATE


def chatml_default_system(text):
    """The system message a ChatML template inserts when the conversation has none (Qwen's
    "You are a helpful assistant."), read from the string literal that holds it; None if it adds none."""
    m = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"]*?)<\|im_end\|>", text or "")
    if m is None:
        return None
    return re.sub(r"\\(.)", lambda e: {"n": "\n", "t": "\t"}.get(e[1], e[1]), m[1])  # Jinja string escapes


def compile_jinja(text, now):
    """A chat template compiled the way transformers compiles it (sandboxed, trim_blocks, lstrip_blocks,
    loop controls, raise_exception, strftime_now, a tojson that keeps non-ASCII text and takes indent),
    with strftime_now frozen at `now` so one run renders every prompt alike."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise CheckpointError(
            "the chat template is neither Llama 3 nor ChatML, and rendering it needs jinja2 "
            "(pip install jinja2); or pass --template llama3, chatml or none"
        ) from None

    class Generation(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %}, which marks the assistant's text for transformers'
        assistant masks, renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = now.strftime
    try:
        return env.from_string(text)
    except jinja2.TemplateError as e:
        raise CheckpointError(f"the chat template does not compile: {e}") from None


class ChatTokenizer:
    """A `tokenizers.Tokenizer` plus the chat format of one checkpoint.

    Prompts and responses are rendered to text exactly as transformers' apply_chat_template renders
    the checkpoint's template (with its defaults), then tokenized without the post-processor's special
    tokens (as apply_chat_template does), so a prompt has exactly one BOS even when the post-processor
    adds one. Llama 3, Llama 3.1-3.3 and ChatML are rendered in Python; any other template ('jinja')
    through jinja2, the response being what rendering prompt + response adds to the prompt's rendering.

    The prompt is tokenized on its own, exactly as the model sees it when generating, and so is each
    response. With the pre-tokenizers of Llama 3 and Qwen, which make a run of newlines a piece of
    its own, the two concatenate to apply_chat_template of the whole conversation: the Llama 3
    header ends in "\\n\\n" and the content is stripped, so no token spans the boundary; for ChatML
    the same holds unless a response starts with a newline. (GPT-2's byte-level split cuts
    "\\n\\nText" into "\\n" "\\n" "Text" but keeps a final "\\n\\n" whole, so there the two differ
    at the boundary.) What a template writes after the response's last stop token (ChatML's "\\n"
    after <|im_end|>) is not scored: the model stops there and never generates it."""

    def __init__(
        self,
        tokenizer,
        template,
        bos_token=None,
        eos_token=None,
        pad_token=None,
        default_system=None,
        add_bos=None,
        extra_stop_ids=(),
        chat_template=None,
        date_string=None,
        template_vars=None,
    ):
        if template not in TEMPLATES:
            raise ValueError(f"unknown chat template {template!r}; choose one of {', '.join(TEMPLATES)}")
        for t in REQUIRED_TOKENS.get(template, ()):
            if tokenizer.token_to_id(t) is None:
                raise ValueError(f"template {template!r} needs the token {t}, which the tokenizer lacks")
        if template == "jinja" and not chat_template:
            raise ValueError("template 'jinja' renders the checkpoint's chat template, and this checkpoint has none")
        self.tokenizer, self.template, self.default_system = tokenizer, template, default_system
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = self._token_id(bos_token)
        self.eos_id = self._token_id(eos_token)
        if self.eos_id is None:
            raise ValueError(
                "the tokenizer has no eos token (looked in tokenizer_config.json, "
                "special_tokens_map.json, generation_config.json)"
            )
        self.pad_id = self._token_id(pad_token) if pad_token is not None else self.eos_id
        # Llama 3 starts every prompt with <|begin_of_text|>; a ChatML template writes bos_token only
        # if it says so (Qwen's do not); a raw-text prompt gets one if the tokenizer has one; a Jinja
        # template writes it itself.
        self.add_bos = (template not in ("chatml", "jinja")) if add_bos is None else add_bos
        self.add_bos = self.add_bos and self.bos_id is not None
        self.stop_ids = {self.eos_id, *extra_stop_ids}
        if template in END_OF_TURN:
            self.stop_ids.add(tokenizer.token_to_id(END_OF_TURN[template]))
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        # The most characters one token can stand for: no token spans more, which bounds how much text
        # max_length tokens can cover (see tokenize_groups). Byte-level BPE spells each byte as one
        # character, so a token's spelling is never shorter than the text it covers.
        self.max_token_chars = max(map(len, tokenizer.get_vocab(with_added_tokens=True)), default=1)
        now = datetime.now()  # read once: a run that crosses midnight renders every prompt alike
        self.date_string = llama31_date(chat_template, date_string, now) if template == "llama3.1" else date_string
        self.template_vars = {k: v for k, v in (template_vars or {}).items() if v is not None}
        if date_string is not None:
            self.template_vars["date_string"] = date_string
        self.jinja = compile_jinja(chat_template, now) if template == "jinja" else None
        self.chat_template = chat_template

    def _token_id(self, token):
        if token is None:
            return None
        ids = self.tokenizer.encode(token, add_special_tokens=False).ids
        if len(ids) != 1:
            raise ValueError(f"special token {token!r} is not a single token of the tokenizer")
        return ids[0]

    @classmethod
    def from_pretrained(cls, model_dir, template=None, date_string=None):
        """Load tokenizer.json and the special tokens and chat template of a Hugging Face checkpoint
        directory. template=None detects the format from the template text (see detect_template);
        name one to override. date_string pins the "Today Date" of Llama 3.1-3.3 templates (and is
        passed to a Jinja template as transformers passes it), which 3.2 and 3.3 otherwise take from today."""

        def load(name):
            p = os.path.join(model_dir, name)
            if not os.path.isfile(p):
                return {}
            with open(p, encoding="utf-8") as f:
                try:
                    return json.load(f)
                except json.JSONDecodeError as e:
                    raise CheckpointError(f"{p}:{e.lineno}: invalid JSON: {e.msg}") from None

        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file (the checkpoint needs a fast tokenizer's tokenizer.json)")
        try:
            tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # the tokenizers library raises a bare Exception for a broken file
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{path}: not a valid tokenizer.json ({why})") from None
        config, gen = load("tokenizer_config.json"), load("generation_config.json")
        special = {**load("special_tokens_map.json"), **config}  # tokenizer_config.json wins, as in transformers

        def token(key):  # a special token is saved as a string or as an AddedToken dict
            v = special.get(key)
            return v.get("content") if isinstance(v, dict) else v

        chat_template = config.get("chat_template")
        if isinstance(chat_template, list):  # several named templates: the default one renders chats
            chat_template = next((t["template"] for t in chat_template if t.get("name") == "default"), None)
        jinja = os.path.join(model_dir, "chat_template.jinja")
        if os.path.isfile(jinja):  # newer transformers save the template here, and read it first
            with open(jinja, encoding="utf-8") as f:
                chat_template = f.read()

        def ids(v):
            return [] if v is None else [v] if isinstance(v, int) else list(v)

        # the variables apply_chat_template gives a template: the special tokens the config names
        names = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
        template_vars = {k: token(k) for k in names}
        bos, eos, pad = token("bos_token"), token("eos_token"), token("pad_token")
        if bos is None and ids(gen.get("bos_token_id")):
            bos = tokenizer.id_to_token(ids(gen["bos_token_id"])[0])
        if eos is None and ids(gen.get("eos_token_id")):
            eos = tokenizer.id_to_token(ids(gen["eos_token_id"])[0])
        template = template or detect_template(chat_template)
        return cls(
            tokenizer,
            template,
            bos_token=bos,
            eos_token=eos,
            pad_token=pad,
            default_system=chatml_default_system(chat_template) if template == "chatml" else None,
            add_bos=("bos_token" in (chat_template or "")) if template == "chatml" else None,
            extra_stop_ids=ids(gen.get("eos_token_id")),
            chat_template=chat_template,
            date_string=date_string,
            template_vars=template_vars,
        )

    def _render_jinja(self, messages, add_generation_prompt):
        try:
            return self.jinja.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.template_vars,
            )
        except Exception as e:  # a template is a program: raise_exception, a type error, a missing key
            raise ValueError(f"the chat template failed on this conversation: {type(e).__name__}: {e}") from None

    def render_prompt(self, prompt, add_generation_prompt=True):
        """The prompt as text, equal to apply_chat_template(messages, tokenize=False, add_generation_prompt=...);
        for template 'none', BOS and the raw text."""
        bos = self.bos_token if self.add_bos else ""
        if self.template == "none":
            if not isinstance(prompt, str):
                raise ValueError(
                    "template 'none' takes plain-text prompts, but this prompt is a conversation; "
                    "choose a chat template"
                )
            return bos + prompt
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if self.template == "jinja":
            return self._render_jinja(messages, add_generation_prompt)
        if self.template in ("llama3", "llama3.1"):
            head = ""
            if self.template == "llama3.1":  # the system turn always comes, dated, the user's system message after
                if any(m["role"] in ("tool", "ipython") for m in messages):
                    raise ValueError(
                        "conversations with tool results are not supported (Llama 3.1 renders them as tool calls)"
                    )
                system = ""
                if messages[0]["role"] == "system":
                    system, messages = messages[0]["content"].strip(), messages[1:]
                head = (
                    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                    f"Today Date: {self.date_string}\n\n{system}<|eot_id|>"
                )
            turns = [head] + [
                f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages
            ]
        else:
            if self.default_system is not None and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": self.default_system}, *messages]
            turns = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
        return bos + "".join(turns) + (ASSISTANT_HEADER[self.template] if add_generation_prompt else "")

    def render_response(self, text, include_header=False, prompt=None):
        """A response as scored: its content and the end-of-turn token, the assistant header first
        with include_header=True (the SimPO code base scores it; it changes the mean log-prob p).
        A Jinja template needs the prompt: the response is what the template renders after it."""
        if self.template == "none":
            return text + self.eos_token
        if self.template == "jinja":
            return self._jinja_response(text, include_header, prompt)
        content = text if self.template == "chatml" else text.strip()  # the Llama 3 templates trim
        return (ASSISTANT_HEADER[self.template] if include_header else "") + content + END_OF_TURN[self.template]

    def _jinja_response(self, text, include_header, prompt):
        if prompt is None:
            raise ValueError("a Jinja chat template renders a response only after its prompt: pass prompt=")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        head = self._render_jinja(messages, add_generation_prompt=not include_header)
        full = self._render_jinja(messages + [{"role": "assistant", "content": text}], add_generation_prompt=False)
        if not full.startswith(head):
            raise ValueError(
                "the chat template renders prompt + response so that it does not begin with the prompt "
                "as rendered for generation, so the response cannot be told apart; pass --template"
            )
        tail = full[len(head) :]
        stops = [s for s in (self.tokenizer.id_to_token(i) for i in self.stop_ids) if s and s in tail]
        if not stops:
            names = ", ".join(sorted(self.tokenizer.id_to_token(i) for i in self.stop_ids))
            raise ValueError(
                f"the chat template ends the assistant's turn with no stop token ({names}), "
                "so generation would not stop"
            )
        return tail[: max(tail.rfind(s) + len(s) for s in stops)]  # what follows the last stop token is never generated

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def fingerprint(self):
        """A hash of everything that decides the ids of a rendered text: the tokenizer (tokenizer.json as
        loaded), the template and its text, the date, the special tokens, BOS and stop ids."""
        settings = [
            self.template,
            self.chat_template,
            self.date_string,
            self.template_vars,
            self.default_system,
            self.bos_token,
            self.eos_token,
            self.add_bos,
            sorted(self.stop_ids),
        ]
        h = hashlib.sha256(self.tokenizer.to_str().encode())
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
        return h.hexdigest()

    def encode_many(self, texts):
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]  # in parallel

    def encode_prompt(self, prompt, add_generation_prompt=True):
        return self.encode(self.render_prompt(prompt, add_generation_prompt))

    def encode_response(self, text, include_header=False, prompt=None):
        return self.encode(self.render_response(text, include_header, prompt))

    def decode(self, ids, skip_special_tokens=True):
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
