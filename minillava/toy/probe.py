"""python -m minillava.toy.probe: where does a toy LLaVA's knowledge stop? Two measurements.

    python -m minillava.toy.probe --model runs/finetune [--llm data/toy/llm] [--data data/toy]

  1. Reading, without the image: the bench's questions asked of a language model with the scene
     told in words instead ("Picture this: a small red circle in the top left, ... What color is
     the shape in the top left?"), greedy, scored per category as the toy bench scores. This is
     the in-context skill LLaVA borrows from its LLM: find the object the question names, copy
     its attribute. --llm picks the LM (default: the toy world's pretrained one).
  2. Seeing: linear probes (least squares on 2/3 of the training scenes' occupied cells, accuracy
     on the other 1/3) that read an object's colour and shape from its cell's token, before the
     projector (Z_v, CLIP's features) and after it (H_v = W(Z_v), what the LLM receives).

If (2) is high and (1) is low, the image features carry the answer and the LM cannot use it yet.
"""
import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

import torch

from ..checkpoint import build_llava
from ..llava import LLaVA
from ..tokenizer import Tokenizer
from ..training import cli
from .backbones import GRID, greedy_answer, load_split
from .teacher import normalize_answer, scene_in_words
from .world import COLORS, SHAPES


def reading(llm, data, limit):
    """Per-category accuracy of `llm` on the bench questions, the scene given in words."""
    tok, lm = Tokenizer(llm), build_llava(Path(data) / "clip", llm).language_model.eval()
    scenes = {r["image"]: r for r in map(json.loads, (Path(data) / "caps_boxes_test.jsonl").open())}
    questions = [json.loads(line) for line in (Path(data) / "bench.jsonl").open()][:limit]
    right = defaultdict(list)
    with torch.no_grad():
        for q in questions:
            scene = scene_in_words(scenes[q["image"]], random.Random(q["question_id"]))
            answer = greedy_answer(lm, tok, f"{scene} {q['text']}", max_new_tokens=8)
            right[q["category"]].append(normalize_answer(answer) == normalize_answer(q["answer"]))
    return {c: round(100 * sum(v) / len(v), 1) for c, v in right.items()}


def linear_probe(features, targets, classes):
    """Least squares from features (N, D) to one-hot targets; accuracy on the last third."""
    A = torch.cat([features, torch.ones(len(features), 1)], 1).double()      # (N, D + 1)
    Y = torch.nn.functional.one_hot(targets, classes).double()              # (N, classes)
    n = 2 * len(A) // 3
    fit = torch.linalg.solve(A[:n].T @ A[:n] + 1e-3 * torch.eye(A.shape[1], dtype=A.dtype), A[:n].T @ Y[:n])
    return round(100 * ((A[n:] @ fit).argmax(1) == targets[n:]).double().mean().item(), 1)


def seeing(model_dir, data, n_images):
    model = LLaVA.from_pretrained(model_dir).eval()
    X_v, _, cells = load_split(data, "train")                               # as the tiny CLIP was trained
    X_v, cells = X_v[:n_images], cells[:n_images].flatten()                 # cells: 0 empty, else 1 + colour x shape
    with torch.no_grad():
        Z_v = model.vision_tower(X_v)                                       # (N, N_v, D_v)
        H_v = model.multi_modal_projector(Z_v)                              # (N, N_v, D)
    if Z_v.shape[1] != GRID * GRID:
        raise SystemExit(f"{model_dir}: {Z_v.shape[1]} visual tokens, the probe needs one per cell ({GRID * GRID})")
    occupied = cells > 0
    color, shape = (cells[occupied] - 1) // len(SHAPES), (cells[occupied] - 1) % len(SHAPES)
    out = {}
    for name, F in (("Z_v", Z_v), ("H_v", H_v)):
        F = F.flatten(0, 1)[occupied].float()
        out[name] = {"color": linear_probe(F, color, len(COLORS)), "shape": linear_probe(F, shape, len(SHAPES))}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minillava.toy.probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/finetune", help="a trained toy LLaVA (default: %(default)s)")
    p.add_argument("--llm", default=None, help="LM for the reading test (default: <data>/llm)")
    p.add_argument("--data", default="data/toy", help="the toy world (default: %(default)s)")
    p.add_argument("--questions", type=int, default=400, help="bench questions for the reading test")
    p.add_argument("--images", type=int, default=1500, help="training scenes for the probes")
    args = p.parse_args(argv)
    llm = args.llm or str(Path(args.data) / "llm")
    result = {"reading_in_words": {"llm": llm, **reading(llm, args.data, args.questions)},
              "probes_percent": seeing(args.model, args.data, args.images)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    cli(main)
