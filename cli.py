"""
The command-line conventions every entry point shares (train.py, eval.py, compare.py, sample.py,
data.py): `--help` shows each flag's default, and a mistake ends in one line on stderr with exit
code 1, never in argparse's usage block or a traceback. The checks that more than one entry point
makes (the device, the model folder, the tokenizer against the model, Ctrl-C) live here, so that
train.py, eval.py and sample.py answer the same mistake with the same line.
"""

import argparse
import os
import sys

import torch


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to each flag's help, unless the help already says its default in words."""

    def _get_help_string(self, action):
        return action.help if "(default:" in (action.help or "") else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the defaults in --help and one-line errors."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise SystemExit(f"error: {message} (see python {self.prog} --help)")


def fail(msg):
    """One line on stderr and exit code 1, instead of a traceback from deep inside."""
    raise SystemExit(f"error: {msg}")


def check_device(device):
    """--device names cpu, cuda or cuda:N, and this machine has it (None: choose later)."""
    if device is None:
        return
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        fail(f"--device {device}: expected cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        fail(f"--device {device}: this machine has no CUDA GPU that torch can use")
    if index and kind == "cuda" and int(index) >= torch.cuda.device_count():
        fail(f"--device {device}: only {torch.cuda.device_count()} GPU(s) here")


def check_at_least(args, minimum, *flags):
    """Each named flag (when set) is at least minimum."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value < minimum:
            fail(f"--{flag} {value}: must be {'at least 1' if minimum == 1 else '0 or more'}")


def check_lengths(max_length, max_prompt_length):
    """A prompt longer than the whole sequence leaves no room for any response."""
    if max_prompt_length > max_length:
        fail(f"--max_prompt_length {max_prompt_length} is longer than --max_length {max_length}: no response would fit")


def check_model_folder(path):
    """--model is a folder (before any file inside it is named in an error)."""
    if not os.path.isdir(path):
        fail(f"--model {path}: no such folder" if not os.path.exists(path) else f"--model {path}: not a folder")


def check_model_fits(config, tok, path, max_length=None, log=print):
    """The tokenizer and the model of one folder agree: every token id has a row in the embedding
    (a larger id would fail with an IndexError deep inside the first forward). A --max_length past
    max_position_embeddings is a warning, not an error: transformers runs such sequences too (RoPE is
    computed for any position, and Llama 3.1's long-context checkpoints are used past their training
    length), but the model never saw those positions in pretraining."""
    largest = max(tok.tokenizer.get_vocab(with_added_tokens=True).values(), default=0)
    if largest >= config.vocab_size:
        fail(
            f"{path}: tokenizer.json has token id {largest}, but config.json's vocab_size is {config.vocab_size} "
            f"(the embedding has no row for it): the tokenizer belongs to another model"
        )
    if max_length is not None and max_length > config.max_position_embeddings:
        log(
            f"warning: --max_length {max_length} exceeds {path}/config.json's max_position_embeddings "
            f"{config.max_position_embeddings}; positions past it were never trained"
        )


def one_line_errors(main):
    """main(argv) as a command: fail()'s line goes to stderr in one write. Python prints an uncaught SystemExit's
    message and its newline in two writes, and where stderr is not a terminal each is a write of its own, so the
    lines of several torchrun ranks failing at once can run together ("...continueerror: ...")."""

    def run(argv=None):
        try:
            return main(argv)
        except SystemExit as e:
            if not isinstance(e.code, str):
                raise
            sys.stderr.write(e.code + "\n")
            sys.stderr.flush()
            raise SystemExit(1) from None

    return run


def interruptible(main):
    """main(argv) with Ctrl-C ending in one line instead of a traceback from wherever it struck."""

    def run(argv=None):
        try:
            return main(argv)
        except KeyboardInterrupt:
            fail("interrupted (Ctrl-C)")

    return run
