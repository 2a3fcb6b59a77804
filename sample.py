"""
Ask a checkpoint one question: render the prompt with the checkpoint's chat template, generate with a
KV cache, print the reply.

    python sample.py --model out/final --prompt "sort 3 1 4 1"
    python sample.py --model DIR --prompt "..." --temperature 0.7 --top_p 0.9 --seed 1 --device cuda --dtype bfloat16
"""

import torch

from cli import ArgumentParser, check_device, check_model_fits, check_model_folder, fail, interruptible, one_line_errors
from chat import TEMPLATES, ChatTokenizer
from generate import generate
from hf_format import CheckpointError, ConfigError
from model import Llama


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--model", required=True, help="checkpoint folder: config.json, safetensors weights, tokenizer.json")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--system", default=None, help="a system message to put before the user message")
    p.add_argument(
        "--template",
        default=None,
        choices=TEMPLATES,
        help="chat format; default: detected from the checkpoint's chat template",
    )
    p.add_argument("--date_string", default=None, help="the date Llama 3.2/3.3 chat templates print (default: today)")
    p.add_argument("--max_new_tokens", type=int, default=256, help="stop after this many tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument(
        "--top_p",
        type=float,
        default=1.0,
        help="nucleus sampling: keep the most likely tokens "
        "holding this much probability (only with --temperature > 0)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="torch device")
    p.add_argument(
        "--dtype",
        default="bfloat16" if cuda else "float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype to load the weights in",
    )
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        p.error("need --max_new_tokens >= 1, --temperature >= 0 and 0 < --top_p <= 1")
    check_device(args.device)
    check_model_folder(args.model)

    try:
        tok = ChatTokenizer.from_pretrained(args.model, template=args.template, date_string=args.date_string)
        model = Llama.from_pretrained(args.model, dtype=getattr(torch, args.dtype), device=args.device).eval()
    except (OSError, ConfigError, CheckpointError, ValueError) as e:
        fail(e)
    check_model_fits(model.config, tok, args.model)

    if tok.template == "none":  # a base model without chat template: the prompt is plain text
        if args.system:
            fail(f"{args.model} has no chat template, so --system has nowhere to go")
        prompt_ids = tok.encode_prompt(args.prompt)
    else:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompt_ids = tok.encode_prompt(system + [{"role": "user", "content": args.prompt}])
    generator = torch.Generator(args.device).manual_seed(args.seed)
    new = generate(
        model,
        prompt_ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        stop_ids=tok.stop_ids,
        generator=generator,
    )
    print(tok.decode([t for t in new if t not in tok.stop_ids]))


if __name__ == "__main__":
    one_line_errors(interruptible(main))()  # Ctrl-C: one line, no traceback
