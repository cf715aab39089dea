"""Chat with a LLaVA checkpoint in the terminal: the original's `llava/serve/cli.py`, plus a KV
cache that is kept from one turn to the next.

    python chat.py --model checkpoints/llava-hf--llava-1.5-7b-hf --image view.jpg
    python chat.py --model ... --image view.jpg --prompt "What is unusual here?"    # one answer, for scripts

In the chat: /clear starts a new conversation about the same image, /image PATH_OR_URL switches
the image (and starts a new conversation), /exit, Ctrl-D or Ctrl-C leaves.

Multi-turn without re-encoding the history. The original renders the whole conversation again
at every turn and runs all of it through the model from scratch. Here one KVCache lives for the
session: turn 1 sends the full prompt (BOS, system, image, question) and every later turn sends
only what the cache lacks:
  * the last token of the previous answer: generate samples it but never runs it through the model;
  * a `</s>`, if that answer was cut at --max-new-tokens: the template puts one after every answer;
  * the new question's segments, tokenized exactly as conversation.py tokenizes them for training.
So the cache holds the ids of the whole rendered conversation, as if it had been encoded at once.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from minillava import LLaVA
from minillava.checkpoint import CheckpointError
from minillava.constants import IMAGE_PLACEHOLDER
from minillava.conversation import TEMPLATES, encode_segments, get_template, segments
from minillava.image import ImageError, open_image, preprocess
from minillava.llama import KVCache
from minillava.tokenizer import Tokenizer

COMMANDS = "/clear: new conversation   /image PATH_OR_URL: new image   /exit (or Ctrl-D): quit"


class ChatError(ValueError):
    """A turn that cannot run (it does not fit the context, ...); the chat says why and goes on."""


class Chat:
    """One conversation at a time, on a single KV cache allocated once for the whole session."""

    def __init__(self, model, tokenizer, conv_mode, max_new_tokens=512, temperature=0.2, top_p=1.0):
        self.model, self.tok, self.conv_mode = model, tokenizer, conv_mode
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        cfg, w = model.config.text, model.language_model.lm_head.weight
        # The context the model was trained for; for LLaVA-1.5-7B (4096 positions, bf16) the cache
        # is 2 (k, v) x 32 layers x 4096 x 4096 x 2 bytes = 2 GiB, next to 14 GB of weights.
        self.cache = KVCache(cfg, 1, cfg.max_position_embeddings, w.device, w.dtype)
        self.reset(image=None)

    def reset(self, image=None):
        """A new conversation about `image` (3, S, S), or about no image. The cache's memory is
        reused: attention only reads positions below `cache.length`."""
        self.image, self.turns, self.unsent, self.cache.length = image, [], [], 0

    def ask(self, question, streamer=None):
        """Answer `question`, continuing the conversation; returns the answer's token ids
        (ending with `</s>` unless --max-new-tokens or the context cut it)."""
        question = question.replace(IMAGE_PLACEHOLDER, "").strip()   # the image has one place: turn 1
        if self.conv_mode == "plain":
            if self.image is None:
                raise ChatError("conv mode 'plain' (stage 1) only captions an image: give one with --image")
            self.reset(self.image)              # the stage-1 template has no dialogue: one caption per turn
        first = not self.turns
        if first and self.image is not None:
            question = IMAGE_PLACEHOLDER + "\n" + question
        turns = self.turns + [question]
        # Only the new question's segments (turn index >= its index); earlier ones are in the cache.
        new = [seg for seg in segments(self.conv_mode, turns) if seg[2] >= len(self.turns)]
        ids = self.unsent + encode_segments(self.tok, new, first=first)[0]
        images = self.image[None] if first and self.image is not None else None     # (1, 3, S, S)
        n_v = self.model.config.num_image_tokens
        n = len(ids) + (n_v - 1 if images is not None else 0)         # after the splice: -200 becomes N_v rows
        room = self.cache.max_len - self.cache.length - n
        if room < 0 and self.turns:
            raise ChatError(f"the conversation so far ({self.cache.length} tokens) and this turn ({n}) exceed the "
                            f"model's context of {self.cache.max_len} tokens; /clear starts a new conversation")
        if room < 0:
            image = f", the image's {n_v} included" if images is not None else ""
            raise ChatError(f"the prompt is {n} tokens{image}: more than the model's context of {self.cache.max_len}")
        # The last answer token is sampled without being run, so `room` positions give room + 1 tokens.
        out = self.model.generate(torch.tensor([ids]), images, min(self.max_new_tokens, room + 1),
                                  self.temperature, self.top_p, eos_token_id=self.tok.eos_id,
                                  cache=self.cache, streamer=streamer)[0].tolist()
        eos = self.tok.eos_id
        self.turns = turns + [self.tok.decode(out)]
        self.unsent = out[-1:] + ([] if out[-1] == eos else [eos])
        return out


class Printer:
    """generate's streamer: prints the answer as its tokens arrive. SentencePiece puts a word's
    space on the word itself ("▁cat") and spells rare characters as several byte tokens, so each
    step decodes the whole answer so far and prints only what is new, holding back a character
    that is still incomplete (it decodes as U+FFFD until its last byte arrives)."""

    def __init__(self, tokenizer, prefix=""):
        self.tok, self.prefix, self.ids, self.shown = tokenizer, prefix, [], None
        self.start, self.times = time.perf_counter(), []

    def __call__(self, token):                  # token: (B,) = (1,), this step's new token
        self.ids.append(int(token[0]))
        self.times.append(time.perf_counter())
        self.show(final=False)

    def stats(self):
        """--stats: time to the first token (image, prompt and one step) and the decoding rate after it."""
        rate = (len(self.times) - 1) / (self.times[-1] - self.times[0]) if len(self.times) > 1 else float("nan")
        return f"({len(self.ids)} tokens; first after {1000 * (self.times[0] - self.start):.0f} ms, then {rate:.1f} tokens/s)"

    def show(self, final=True):
        text = self.tok.decode(self.ids)
        if self.shown is None:                  # the role prefix comes once the model has read the prompt
            print(self.prefix, end="")
            self.shown = ""
        if final or not text.endswith("\ufffd"):
            print(text[len(self.shown):], end="\n" if final else "", flush=True)
            self.shown = text


def tokenizer_file(folder):
    """The checkpoint folder's tokenizer.model; a stage-1 output (the projector alone) uses its LLM's."""
    folder = Path(folder)
    meta = folder / "projector_config.json"
    if not (folder / "tokenizer.model").exists() and meta.exists():
        return Path(json.loads(meta.read_text())["llm"]) / "tokenizer.model"
    return folder


def run(args):
    # Read the image before the model: a wrong path fails in a second, not after loading 14 GB.
    picture = open_image(args.image) if args.image else None
    model = LLaVA.from_pretrained(args.model, vision_tower=args.vision_tower, dtype=args.dtype, device=args.device)
    tok = Tokenizer(tokenizer_file(args.model))
    if tok.vocab_size > model.config.text.vocab_size:
        raise ChatError(f"{tok.file} has {tok.vocab_size} tokens but the model only {model.config.text.vocab_size}: "
                        "the tokenizer belongs to another model")
    if args.seed is not None:
        torch.manual_seed(args.seed)            # seeds the CPU and CUDA generators that sampling uses
    vision = model.config.vision

    def pixels(image):                          # X_v as the checkpoint was trained to see it
        pad = model.config.image_aspect_ratio == "pad"
        return preprocess(image, vision.image_size, pad).to(args.device)

    chat = Chat(model, tok, args.conv_mode or model.config.conv_mode, args.max_new_tokens,
                args.temperature, args.top_p)
    chat.reset(pixels(picture) if picture is not None else None)

    if args.prompt is not None:                 # one answer, and nothing else, on stdout
        printer = Printer(tok)
        chat.ask(args.prompt, printer)
        printer.show()
        if args.stats:
            note(printer.stats())
        return 0

    user, assistant = get_template(chat.conv_mode).roles
    if sys.stdin.isatty():
        import readline  # noqa: F401  (gives input() line editing and history)
    about = f"image {args.image}" if args.image else "no image"
    note(f"minillava chat: {Path(args.model).name}, {about}, {chat.conv_mode}, {args.device} {args.dtype}\n{COMMANDS}")
    while True:
        try:
            line = input(f"{user}: ").strip()
        except EOFError:                        # Ctrl-D
            print()
            return 0
        if line == "/exit":
            return 0
        if line == "/clear":
            chat.reset(chat.image)
            note("(new conversation)")
        elif line.split(maxsplit=1)[:1] == ["/image"]:
            source = line[len("/image"):].strip()
            if not source:
                note("usage: /image PATH_OR_URL")
                continue
            try:
                chat.reset(pixels(open_image(source)))
                note(f"(new image: {source}; new conversation)")
            except ImageError as e:             # the old image and conversation go on
                note(f"error: {e}")
        elif line.startswith("/"):
            note(f"unknown command {line.split()[0]}; {COMMANDS}")
        elif line:
            printer = Printer(tok, prefix=f"{assistant}: ")
            try:
                chat.ask(line, printer)
                printer.show()
                if args.stats:
                    note(printer.stats())
            except ChatError as e:
                note(f"error: {e}")


def note(text):
    """Everything that is not the conversation goes to stderr, so stdout holds only the dialogue."""
    print(text, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="checkpoint folder with its tokenizer.model: llava-hf, original LLaVA or minillava")
    p.add_argument("--image", help="image file or http(s) URL (default: none, a text-only chat)")
    p.add_argument("--prompt", help="answer this one question, print only the answer and exit")
    p.add_argument("--vision-tower", help="local CLIP folder, for original LLaVA folders whose config names a hub CLIP")
    p.add_argument("--conv-mode", choices=list(TEMPLATES), help="prompt template (default: the checkpoint's)")
    p.add_argument("--temperature", type=float, default=0.2,
                   help="0 = greedy and deterministic (default: %(default)s, as the original cli.py)")
    # The original cli.py passes no top_p: plain temperature sampling. At 0.2 the distribution is
    # already sharp; lower it (the LLaVA web demo uses 0.7) to cut the unlikely tail as well.
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: keep the likeliest tokens up to this total probability (default: 1 = all)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="answer length cap (default: %(default)s)")
    p.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda if present, else cpu)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--seed", type=int, help="seed for sampling, to repeat answers at temperature > 0")
    p.add_argument("--stats", action="store_true", help="after each answer, its time to first token and tokens/s (stderr)")
    args = p.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        p.error("need --temperature >= 0, 0 < --top-p <= 1 and --max-new-tokens >= 1")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible to PyTorch")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:                   # Ctrl-C: leave without a traceback
        print(file=sys.stderr)
        return 0 if args.prompt is None else 130
    except torch.OutOfMemoryError:
        note(f"error: out of memory on {args.device}: try --dtype bf16, or a smaller model")
    except (ChatError, CheckpointError, ImageError, OSError, ValueError) as e:
        note(f"error: {e}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
