"""What the three benchmarks share: the model flags, greedy batched answering with a resumable
answers file, and writing results.

An output folder (--out) holds:
  answers.jsonl   one line per answered question {question_id, prompt, image, text, model, conv_mode},
                  flushed after every batch; a rerun skips the ids already in it
  scored.jsonl    one line per question with the verdict (what was extracted, the gold, correct or not)
  results.json    the numbers, with the settings that produced them
  table.md        the same numbers as the human-readable table that is also printed
"""
import json
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ..conversation import TEMPLATES, prompt_ids
from ..image import open_image, preprocess
from ..tokenizer import Tokenizer


class EvalError(ValueError):
    """Input we cannot evaluate on; the message names the file and the record."""


def add_model_args(p, model=None, max_new_tokens=1024, batch_size=8):
    """The flags every benchmark takes. `model`: a default checkpoint (None: --model is required)."""
    g = p.add_argument_group("model and generation")
    g.add_argument("--model", default=model, required=model is None,
                   help="checkpoint folder (llava-hf, minillava or original LLaVA)"
                        + (" (default: %(default)s)" if model else ""))
    g.add_argument("--vision-tower", default=None,
                   help="local CLIP folder, for original LLaVA checkpoints whose config names a hub CLIP")
    g.add_argument("--tokenizer", default=None, help="folder or file with tokenizer.model (default: --model)")
    g.add_argument("--conv-mode", default=None, choices=list(TEMPLATES),
                   help="prompt template (default: the checkpoint's own, vicuna_v1 for LLaVA-1.5)")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda if there is one)")
    g.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="weights and activations (default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help="questions per generate() call, left-padded (default: %(default)s); in bf16 the "
                        "padding can flip a rare near-tie, --batch-size 1 decodes exactly one at a time")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help="cap on each answer; decoding is greedy (default: %(default)s)")
    g.add_argument("--limit", type=int, default=None, help="only the first N questions: a quick look, "
                   "not a comparable number")
    g.add_argument("--out", default=None, help="output folder (default: runs/eval/<benchmark>-<model folder name>)")


def resolve_device(args):
    """Fill in the default device and dtype, so that results.json records what was used."""
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")


def out_dir(args, benchmark):
    return Path(args.out or os.path.join("runs", "eval", f"{benchmark}-{Path(args.model).resolve().name}"))


def read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise EvalError(f"{path}: no such file ({what})") from None
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path, what):
    """Every non-blank line of a JSONL file, parsed; errors name the line."""
    if not os.path.exists(path):
        raise EvalError(f"{path}: no such file ({what})")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise EvalError(f"{path} line {n}: not valid JSON ({e})") from None
    return rows


def need(row, keys, where):
    missing = [k for k in keys if k not in row]
    if missing:
        raise EvalError(f"{where}: no {', '.join(repr(k) for k in missing)}")
    return row

# ---------------------------------------------------------------- the answers file


def read_answers(path):
    """({str(question_id): entry}, bytes of whole lines). A run killed mid-write leaves at most a
    half-written last line: it is ignored (and cut off before appending), its question asked again."""
    if not os.path.exists(path):
        return {}, 0
    with open(path, "rb") as f:
        *lines, tail = f.read().split(b"\n")
    answers, good = {}, 0
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                entry = json.loads(line)
                answers[str(entry["question_id"])] = entry
            except (ValueError, KeyError, TypeError):
                raise EvalError(f"{path} line {n}: not an answer; delete the line to answer it again") from None
        good += len(line) + 1
    if tail.strip():
        print(f"warning: {path}: ignoring a half-written last line", file=sys.stderr)
    return answers, good


def changed(old, item, args):
    """What differs between an answer on file and the question about to be asked, or None."""
    if old is None:
        return None
    if old.get("prompt") != item["prompt"]:
        return "prompt"
    if Path(old.get("model", "")).resolve() != Path(args.model).resolve():
        return f"model ({old.get('model')})"
    if args.conv_mode and args.conv_mode != old.get("conv_mode"):
        return f"conv mode ({old.get('conv_mode')})"
    return None


def answer_questions(items, args, path, desc="answering"):
    """Answer each item {question_id, prompt (with "<image>" where the image goes), image (path
    or None)} greedily, appending to the answers file; returns {str(question_id): entry} for `items`.

    The model is loaded only if something is left to answer, so rescoring a finished run is instant.
    """
    done, good_bytes = read_answers(path)
    for it in items:     # one answers file, one experiment: mixing two would make the score meaningless
        what = changed(done.get(str(it["question_id"])), it, args)
        if what:
            raise EvalError(f"{path}: question {it['question_id']} was answered with another {what}; "
                            "use a fresh --out for each model, prompt format and conv mode")
    pending = [it for it in items if str(it["question_id"]) not in done]
    print(f"{len(items) - len(pending)} of {len(items)} questions already answered in {path}; "
          f"{len(pending)} to answer")
    if pending:
        model, tokenizer, conv_mode = load_model(args)
        # Similar prompt lengths in a batch mean less left padding.
        pending.sort(key=lambda it: len(it["prompt"]))
        if os.path.exists(path):
            os.truncate(path, good_bytes)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f, \
                tqdm(total=len(pending), desc=desc, unit="q", file=sys.stderr) as bar:
            for i in range(0, len(pending), args.batch_size):
                batch = pending[i:i + args.batch_size]
                texts = generate_answers(model, tokenizer, conv_mode, batch, args.max_new_tokens)
                for it, text in zip(batch, texts):
                    entry = {"question_id": it["question_id"], "prompt": it["prompt"],
                             "image": str(it["image"]) if it["image"] else None, "text": text,
                             "model": args.model, "conv_mode": conv_mode}
                    f.write(json.dumps(entry, ensure_ascii=False) + "\n")
                    done[str(it["question_id"])] = entry
                f.flush()    # a killed run keeps every finished batch
                bar.update(len(batch))
    return {str(it["question_id"]): done[str(it["question_id"])] for it in items}

# ---------------------------------------------------------------- the model


def load_model(args):
    """(model, tokenizer, conv_mode) from the model flags."""
    from ..llava import LLaVA
    resolve_device(args)
    model = LLaVA.from_pretrained(args.model, vision_tower=args.vision_tower, dtype=args.dtype,
                                  device=args.device).eval()
    tokenizer = Tokenizer(args.tokenizer or args.model)
    conv_mode = args.conv_mode or model.config.conv_mode
    print(f"model {args.model} ({args.dtype} on {args.device}), conv mode {conv_mode}")
    return model, tokenizer, conv_mode


def generate_answers(model, tokenizer, conv_mode, batch, max_new_tokens):
    """One greedy generate() call for a batch of items -> their answers as stripped text."""
    cfg = model.config
    ids = [torch.tensor(prompt_ids(tokenizer, conv_mode, it["prompt"])) for it in batch]
    # One image per row that has one, in row order: what generate() expects.
    pixels = [preprocess(open_image(it["image"]), cfg.vision.image_size, pad=cfg.image_aspect_ratio == "pad")
              for it in batch if it["image"]]
    device = model.language_model.lm_head.weight.device
    images = torch.stack(pixels).to(device) if pixels else None
    out = model.generate(ids, images, max_new_tokens=max_new_tokens, temperature=0.0,
                         eos_token_id=tokenizer.eos_id)                       # (B, <= max_new_tokens)
    return [tokenizer.decode(row).strip() for row in out.tolist()]

# ---------------------------------------------------------------- results


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def pct(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def write_results(out, results, table, scored=()):
    """results.json, table.md and scored.jsonl in `out`; the table is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scored.jsonl", "w", encoding="utf-8") as f:
        for row in scored:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(out / "results.json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
    (out / "table.md").write_text(table + "\n", encoding="utf-8")
    print("\n" + table + f"\n\nwritten to {out}/: answers.jsonl, scored.jsonl, results.json, table.md")


def settings(args, answers, **extra):
    """The flags that produced a result, for results.json; the conv mode as the answers record it."""
    keep = ("model", "vision_tower", "dtype", "batch_size", "max_new_tokens", "limit")
    modes = sorted({str(e.get("conv_mode")) for e in answers.values()})
    return {k: getattr(args, k) for k in keep} | {"conv_mode": ", ".join(modes)} | extra
