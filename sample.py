"""
Ask the model you trained: load a run's base and its trained adapters, wrap each question in the prompt it was
trained on, and stream the answer token by token (the name is nanoGPT's).

    python sample.py --out_dir out "Tom has 3 apples and buys 5 more. How many does he have?"
    python sample.py --out_dir out --no_adapter "..."          # the base alone, in its own format: for comparison
    python sample.py --out_dir out --routing "..."             # and each token's top-1 expert in every layer
    python sample.py --out_dir out --routing_png r.png "..."   # the same as a picture (needs matplotlib)
    python sample.py --out_dir out --file questions.txt        # one question a line; - or a pipe reads stdin
    python sample.py --out_dir out --temperature 0.8 --top_p 0.9 --seed 1 "..."

The run is opened as train.py --eval_only opens it (runs.load_run): its settings from run.json (which base, which
method, which prompt), the base checked against the one it trained on, the adapters from out_dir/adapter.safetensors
when it is there, else from ckpt.pt (--method full: all the weights). On a GPU the base is held in bf16 (or fp16) under
autocast, as train.py's --dtype auto does. Answers go to stdout; what was loaded, and after each answer its length,
speed and whether a limit cut it, go to stderr:

    (256 tokens, first after 0.05 s, 310 tok/s; cut at --max_new_tokens 256: raise it for a longer answer)
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

from data.prompts import eval_prompt_tokens
from data.tasks import DataError, read_text
from moelora import moelora_layers
from quantize import Int8Linear
from runs import load_run, open_run, setup_precision

COLOURS = [41, 42, 43, 44, 45, 46, 47, 100, 101, 102, 103, 104, 105, 106, 107]  # ANSI backgrounds, one per expert


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("questions", nargs="*", help="questions, answered in turn; - reads more from stdin, one a line (so does a "
      "pipe when no question is given)")
    a("--out_dir", default="out", help="the run: ckpt.pt and adapter.safetensors, as train.py wrote them (default %(default)s)")
    a("--model", default=None, help="the base model, if it is no longer where the run's run.json says (a run moved elsewhere)")
    a("--file", default=None, help="a text file of questions, one a line")
    a("--input", default="", help="the Alpaca template's input field, for every question (default: none)")
    a("--max_new_tokens", type=int, default=256, help="the longest answer in tokens (default %(default)s)")
    a("--temperature", type=float, default=0.0, help="0 = greedy (default %(default)s)")
    a("--top_p", type=float, default=1.0, help="sample from the smallest set of tokens this likely (default %(default)s)")
    a("--seed", type=int, default=1337, help="for sampling (default %(default)s)")
    a("--no_adapter", action="store_true", help="the base alone answers, in its own format: ChatML for a base whose "
      "tokenizer has <|im_start|> (an instruction-tuned one), else the run's --prompt_format")
    a("--routing", action="store_true", help="print each token's top-1 expert in each adapted layer, and the shares")
    a("--routing_png", default=None, help="draw that table as a PNG in this file (implies --routing; of the last question)")
    args = p.parse_args(argv)
    for ok, problem in ((args.max_new_tokens > 0, f"--max_new_tokens {args.max_new_tokens} must be > 0"),
                        (args.temperature >= 0, f"--temperature {args.temperature} must be >= 0"),
                        (0 < args.top_p <= 1, f"--top_p {args.top_p} must be in (0, 1]")):
        if not ok:
            raise SystemExit(f"error: {problem}")
    for i, text in enumerate(args.questions):
        check_utf8(text, f"question {i + 1}" if len(args.questions) > 1 else "the question")
    check_utf8(args.input, "--input")
    args.routing = args.routing or args.routing_png is not None
    return args


def check_utf8(text: str, what: str):
    """A command line's bytes that are not UTF-8 reach Python as surrogates, which the tokenizer refuses with a
    traceback after the model's load: one line now instead, as read_text gives for a file."""
    data = os.fsencode(text)  # the bytes as typed: fsencode turns those surrogates back into them
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {what} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} "
                         f"({e.reason}); set your terminal to UTF-8")


def read_questions(args) -> list:
    """The questions of the command line, --file and stdin, in that order; blank lines of a file are skipped."""
    given = [q.strip() for q in args.questions]
    if any(not q.strip() for q in given):
        raise SystemExit("error: empty question: ask something")
    lines = []
    if args.file:
        try:
            lines += read_text(args.file, "--file").splitlines()
        except DataError as e:
            raise SystemExit(f"error: {e}")
    if "-" in given or (not given and not args.file and not sys.stdin.isatty()):
        lines += read_stdin().splitlines()
    questions = [q for q in given if q != "-"] + [line.strip() for line in lines if line.strip()]
    if not questions and args.file and not given:
        raise SystemExit(f"error: --file {args.file} holds no question: only blank lines, or none")
    if not questions:
        raise SystemExit("error: no question: give one on the command line, in --file, or on stdin")
    return questions


def read_stdin() -> str:
    """stdin decoded as UTF-8, as read_text decodes a file: the bytes themselves, since sys.stdin's own decoding
    depends on the locale and may let bad bytes through as surrogates that fail later, inside the tokenizer."""
    if not hasattr(sys.stdin, "buffer"):  # already text (a StringIO in the tests)
        return sys.stdin.read()
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: stdin is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} "
                         f"({e.reason}); convert it to UTF-8 (iconv -t UTF-8)")


def load_model(args, precision):
    """(the run's base with its trained weights, or without them for --no_adapter, in eval mode; tokenizer), opened by
    runs.load_run; what was loaded goes to stderr."""
    model, tok, saved = load_run(Path(args.out_dir), precision, args.model, adapter=not args.no_adapter)
    dtype = precision.weights_dtype(saved.settings["method"] == "full")
    described = str(dtype)
    if saved.settings.get("quantize") == "int8":  # as train.py: the base is quantised before the adapters go in
        group = next(m.group_size for m in model.modules() if isinstance(m, Int8Linear))
        described = f"int8 base (a scale per {group} weights), computing in {str(precision.amp_dtype).removeprefix('torch.')}"
    elif saved.settings.get("quantize") == "nf4":
        described = f"NF4 base (4 bits, a scale per 64 weights), computing in {str(precision.amp_dtype).removeprefix('torch.')}"
    print(f"{saved.base} + {saved.weights or 'no adapter'} ({saved.settings['method']}, step {saved.step}), "
          f"{precision.device}, {described}", file=sys.stderr)
    return model, tok


def stream_answer(model, tok, prompt: list, max_new_tokens: int, temperature: float, top_p: float, generator,
                  precision, out=None) -> tuple:
    """Continue prompt (token ids) with model.generate, writing the text as it grows. Returns (the new ids, ending
    with EOS if the model stopped; seconds from the call to the first token (the prefill); seconds from the first
    token to the last (the decoding))."""
    out, new, shown, arrived = out or sys.stdout, [], "", []

    def show(ids):  # ids: the one sequence's new token
        nonlocal shown
        # ids are host ints: generate's .tolist() has waited for the GPU's step, so on CUDA too this clock reads when
        # the token exists, without a torch.cuda.synchronize (and start, below, follows the last .tolist() or .cpu())
        arrived.append(time.perf_counter())
        new.append(ids[0])
        if ids[0] == tok.eos_id:
            return
        # decode the whole answer each time: SentencePiece drops a leading space only at the start of a text, and a
        # character made of several byte pieces reads U+FFFD until its last byte; print what can no longer change
        text = tok.decode(new)
        if text.startswith(shown) and not text.endswith("\ufffd"):
            out.write(text[len(shown):])
            out.flush()
            shown = text
    start = time.perf_counter()
    with precision.autocast():
        answer = model.generate([prompt], max_new_tokens, temperature, top_p, eos_id=tok.eos_id, pad_id=tok.pad_id,
                                generator=generator, on_token=show)[0]
    text = tok.decode(answer)
    out.write((text[len(shown):] if text.startswith(shown) else "") + "\n")
    out.flush()
    return answer, arrived[0] - start, arrived[-1] - arrived[0]


def answer_stats(n_tokens: int, first_s: float, rest_s: float, cut: str = "") -> str:
    """The line on stderr after an answer: its tokens (EOS included: it took a step too), the time to the first
    (the prefill), the decoding speed over the tokens after the first, and the limit that cut it, if one did."""
    stats = f"{n_tokens} token{'s' * (n_tokens != 1)}, first after {first_s:.2f} s"
    if n_tokens > 1:
        rate = (n_tokens - 1) / max(rest_s, 1e-9)
        stats += f", {rate:.1f} tok/s" if rate < 10 else f", {rate:.0f} tok/s"
    return f"({stats}; {cut})" if cut else f"({stats})"


def cut_by(answer: list, eos_id: int, max_new_tokens: int, n_prompt: int, max_seq_len: int) -> str:
    """Which limit stopped the answer before the model's EOS, and how to move it; "" when the model ended it."""
    room = max_seq_len - n_prompt  # what the context leaves after the prompt
    if answer[-1] == eos_id or len(answer) < min(max_new_tokens, room):
        return ""
    if max_new_tokens < room:
        return f"cut at --max_new_tokens {max_new_tokens}: raise it for a longer answer"
    return (f"cut at the model's context: {max_seq_len} tokens, {n_prompt} of them the prompt; a shorter question "
            "leaves more room")


@torch.inference_mode()
def top1_experts(model, ids: list, precision):
    """(layer names, [T, layers] int64: each token's top-1 expert in each adapted layer) from one forward over ids."""
    layers = moelora_layers(model)
    with precision.autocast():
        model(torch.tensor([ids], device=precision.device))
    # last_top_idx: [T, k], the k chosen experts by falling gate; column 0 is the top-1
    return [name for name, _ in layers], torch.stack([layer.last_top_idx[:, 0] for _, layer in layers], 1).cpu()


def short_name(name: str) -> str:
    parts = name.split(".")  # "layers.3.attention.wq" -> "3wq"
    return parts[1] + parts[-1] if parts[0] == "layers" and len(parts) > 2 else name


def print_routing(pieces: list, n_prompt: int, names: list, top1, num_experts: int, colour: bool):
    labels = [short_name(n) for n in names]
    w = max(len(str(num_experts - 1)), *map(len, labels))
    print(f"top-1 expert of each token (rows; \u2581 or \u0120 is a space) in each adapted layer (columns); {len(pieces)} "
          "tokens: the prompt, then after the line the answer")
    print(f"{'token':>14} " + " ".join(label.rjust(w) for label in labels))
    for t, (piece, row) in enumerate(zip(pieces, top1.tolist())):
        if t == n_prompt:
            print("-" * (15 + (w + 1) * len(labels)))
        cells = [str(e).rjust(w) for e in row]
        if colour:  # more experts than colours: the colours repeat, the numbers tell them apart
            cells = [f"\033[30;{COLOURS[e % len(COLOURS)]}m{c}\033[0m" for e, c in zip(row, cells)]  # black on colour
        print(f"{piece[:14]:>14} " + " ".join(cells))
    share = torch.bincount(top1.flatten(), minlength=num_experts).double() / top1.numel()
    print(f"expert share (top-1, all {len(pieces)} tokens x {len(labels)} layers together): "
          + "  ".join(f"e{e} {100 * s:.1f}%" for e, s in enumerate(share.tolist())))


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: --routing_png needs matplotlib (pip install matplotlib); --routing prints the table")
    return plt


def check_routing_png(path: str):
    """Fail now, not after the model's load and the answers (minutes on a large base), if the picture cannot be
    written or drawn."""
    png, folder = Path(path), Path(path).parent
    if not folder.is_dir():
        raise SystemExit(f"error: --routing_png {path}: " + (f"{folder} is a file, not a folder" if folder.exists()
                                                             else f"there is no folder {folder}"))
    if not os.access(folder, os.W_OK):
        raise SystemExit(f"error: --routing_png {path}: cannot write in the folder {folder}")
    if png.is_dir():
        raise SystemExit(f"error: --routing_png {path} is a folder: give a file name, e.g. {png / 'routing.png'}")
    if png.suffix.lower() != ".png":
        raise SystemExit(f"error: --routing_png {path} must be a file name ending in .png")
    if png.exists() and not os.access(png, os.W_OK):
        raise SystemExit(f"error: --routing_png {path}: the file is there and cannot be overwritten")
    pyplot()


def save_routing_png(path: str, pieces: list, n_prompt: int, names: list, top1, num_experts: int):
    plt = pyplot()
    T, L = top1.shape
    fig, ax = plt.subplots(figsize=(2 + 0.4 * L, 1 + 0.16 * T))
    cmap = plt.get_cmap("tab10" if num_experts <= 10 else "tab20", num_experts)
    im = ax.imshow(top1.numpy(), cmap=cmap, vmin=-0.5, vmax=num_experts - 0.5, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(L), [short_name(n) for n in names], rotation=90, fontsize=7)
    ax.set_yticks(range(T), [p.replace("$", r"\$") for p in pieces], fontsize=6)  # "$" would start mathtext
    ax.axhline(n_prompt - 0.5, color="black", linewidth=1)  # the answer starts below the line
    fig.colorbar(im, ticks=range(num_experts), label="top-1 expert")
    ax.set_title("top-1 expert per token and layer")
    try:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    except OSError as e:  # checked before the answers, but a disk fills and a folder goes
        raise SystemExit(f"error: cannot write --routing_png {path} ({e.strerror})")
    finally:
        plt.close(fig)


def prompt_format(settings: dict, tok, no_adapter: bool) -> str:
    """The run's --prompt_format (alpaca for a run that recorded none); the base alone is asked in its own format:
    ChatML if its tokenizer holds <|im_start|> as one token (an instruction-tuned base), else the run's."""
    if no_adapter and len(tok.encode("<|im_start|>", bos=False)) == 1:
        return "chatml"
    return settings.get("prompt_format", "alpaca")


def main(argv=None):
    args = parse_args(argv)
    settings = open_run(Path(args.out_dir), need_checkpoint=True).settings  # read now: a bad run is said before loading
    method = settings["method"]
    num_experts = settings["num_experts"] if method == "moelora" else 1
    if args.routing and (args.no_adapter or num_experts < 2):
        raise SystemExit("error: --routing shows the experts of a MoELoRA run with more than one; " +
                         ("--no_adapter has none" if args.no_adapter else f"this is a --method {method} run"))
    if args.routing_png:
        check_routing_png(args.routing_png)
    questions = read_questions(args)
    precision = setup_precision()  # as train.py's --dtype auto
    model, tok = load_model(args, precision)
    generator = torch.Generator(precision.device).manual_seed(args.seed)
    fmt = prompt_format(settings, tok, args.no_adapter)
    prompts = [eval_prompt_tokens(tok, {"instruction": q, "input": args.input}, fmt) for q in questions]  # BOS + template
    for i, prompt in enumerate(prompts):  # all of them before the first answer
        if len(prompt) >= model.args.max_seq_len:
            which = f"question {i + 1}'s prompt" if len(prompts) > 1 else "the prompt"
            raise SystemExit(f"error: {which} has {len(prompt)} tokens; the model reads at most "
                             f"{model.args.max_seq_len}, answer included: shorten it")
    results = []
    for q, prompt in zip(questions, prompts):
        if len(questions) > 1:
            print(f"> {q}")
        budget = min(args.max_new_tokens, model.args.max_seq_len - len(prompt))
        answer, first_s, rest_s = stream_answer(model, tok, prompt, budget, args.temperature, args.top_p, generator,
                                                precision)
        cut = cut_by(answer, tok.eos_id, args.max_new_tokens, len(prompt), model.args.max_seq_len)
        print(answer_stats(len(answer), first_s, rest_s, cut), file=sys.stderr)
        top1 = None  # [T, layers] with --routing
        if args.routing:
            names, top1 = top1_experts(model, prompt + answer, precision)
            pieces = [tok.piece(i).replace("\n", "\\n") for i in prompt + answer]  # "▁" or "Ġ" marks a space
            print_routing(pieces, len(prompt), names, top1, num_experts, sys.stdout.isatty())
            if args.routing_png:
                save_routing_png(args.routing_png, pieces, len(prompt), names, top1, num_experts)
                print(f"(routing picture in {args.routing_png})")
        results.append({"question": q, "prompt": prompt, "answer": answer, "routing": top1, "cut": bool(cut)})
    return results


if __name__ == "__main__":
    main()
