"""python -m minillava.toy.attention: where does a toy LLaVA look when a question names one shape of several?

    python -m minillava.toy.attention --model runs/finetune [--data data/toy] [--questions 150]

For the bench's colour, shape and position questions about held-out images with two or more shapes,
the attention of every head of every LLM layer, from every position of the prompt, to the N_v = 9
visual tokens (one per cell of the world's 3x3 grid). "target" is the weight on the token of the
shape the question is about (the cell it names, or the cell of the shape it names); "other" is the
mean weight on each other shape's token. A head that has found the shape puts much more on the
target than on the others; a head that reads "some shape" puts the same on all of them.

Printed per category and layer: for each head, the prompt position where target minus other is
largest, as the token there and its distance from the end of the prompt (-1 is the last token,
the one that predicts the answer's first word), with both weights, averaged over the questions.

Scaled dot-product attention does not return its weights, so they are recomputed here from each
attention layer's input, with the layer's own projections and RoPE: the same numbers, spelled out.
"""
import argparse
from collections import Counter
from pathlib import Path

import torch

from ..constants import IMAGE_TOKEN_INDEX
from ..conversation import prompt_ids
from ..eval.common import EvalError, read_jsonl
from ..image import open_image, preprocess
from ..llama import LlamaAttention, apply_rope
from ..llava import LLaVA
from ..tokenizer import Tokenizer
from ..training import cli
from .backbones import GRID, cell_labels
from .world import PHRASES, POSITIONS


def attention_weights(attn, x, cos, sin):
    """The (B, nh, T, T) causal softmax weights of LlamaAttention `attn` for its input x (B, T, D)."""
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, attn.nh, attn.hs).transpose(1, 2)      # (B, nh, T, hs)
    k = attn.k_proj(x).view(B, T, attn.nkv, attn.hs).transpose(1, 2)     # (B, nkv, T, hs)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = k.repeat_interleave(attn.nh // attn.nkv, dim=1)                  # GQA: nh / nkv queries per key head
    scores = q @ k.transpose(-1, -2) / attn.hs ** 0.5                    # (B, nh, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(-1)


def target_cell(question):
    """The grid cell a bench question is about: the place it names, or the answer's place."""
    text = question["text"].split("\n")[0]
    if question["category"] == "position":
        return POSITIONS.index(question["answer"])
    for place, phrase in sorted(PHRASES.items(), key=lambda kv: -len(kv[1])):   # "in the top left" before "left"
        if text.endswith(phrase + "?"):
            return POSITIONS.index(place)
    raise EvalError(f"bench question {question.get('question_id')}: no place in {text!r}")


def readable(piece):
    return piece.strip() or repr(piece)      # "\\n" rather than a line break


@torch.no_grad()
def looking(model_dir, data, n_questions=150):
    """{category: {layer: [(offset from the end, token, target, other) per head]}}, see the module docstring."""
    bench = read_jsonl(Path(data) / "bench.jsonl", "the toy bench; build the world with python -m minillava.toy")
    boxes = {r["image"]: r for r in read_jsonl(Path(data) / "caps_boxes_test.jsonl", "the toy world's boxes")}
    model = LLaVA.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = Tokenizer(model_dir)
    layers = [m for m in model.language_model.modules() if isinstance(m, LlamaAttention)]
    weights = {}                                              # layer index -> (1, nh, T, T) of the last forward
    def keep(layer, args):                                    # args = (x, cos, sin, mask, cache)
        weights[layer.layer_idx] = attention_weights(layer, *args[:3])
    hooks = [layer.register_forward_pre_hook(keep) for layer in layers]
    pairs, tokens, counts = {}, {}, {}                         # pairs: (cat, layer) -> [(2, nh, T_after)]
    for q in bench:
        cat = q["category"]
        occupied = cell_labels([boxes[q["image"]]])[0].nonzero().flatten().tolist()
        if cat not in ("color", "shape", "position") or len(occupied) < 2 or counts.get(cat, 0) >= n_questions:
            continue
        target = target_cell(q)
        others = [c for c in occupied if c != target]
        ids = torch.tensor(prompt_ids(tok, model.config.conv_mode, "<image>\n" + q["text"]))
        p = (ids == IMAGE_TOKEN_INDEX).nonzero().item()        # the 9 visual tokens are positions p .. p + 8
        image = preprocess(open_image(Path(data) / "images" / q["image"]), model.config.vision.image_size,
                           pad=model.config.image_aspect_ratio == "pad")
        model(ids[None], image[None])
        text_after = ids[p + 1:].tolist()                       # the prompt after the image, as token ids
        for layer, w in weights.items():
            v = w[0, :, p + GRID * GRID:, p:p + GRID * GRID]    # (nh, prompt after the image, 9)
            pairs.setdefault((cat, layer), []).append(torch.stack([v[..., target], v[..., others].mean(-1)]))
        for k, t in enumerate(reversed(text_after)):            # what stands k + 1 tokens from the end
            tokens.setdefault((cat, k), Counter())[t] += 1
        counts[cat] = counts.get(cat, 0) + 1
    for h in hooks:
        h.remove()
    result = {}
    for (cat, layer), rows in sorted(pairs.items()):
        K = min(r.shape[-1] for r in rows)                      # questions differ in length: align their ends
        mean = torch.stack([r[..., -K:] for r in rows]).mean(0) # (2, nh, K)
        best = (mean[0] - mean[1]).argmax(-1).tolist()          # the most selective position, per head
        result.setdefault(cat, {})[layer] = [
            (b - K, readable(tok.decode([tokens[cat, K - 1 - b].most_common(1)[0][0]])),
             round(mean[0, h, b].item(), 3), round(mean[1, h, b].item(), 3)) for h, b in enumerate(best)]
    return result, counts


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minillava.toy.attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/finetune", help="a trained toy LLaVA (default: %(default)s)")
    p.add_argument("--data", default="data/toy", help="the toy world (default: %(default)s)")
    p.add_argument("--questions", type=int, default=150, help="questions per category (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        result, counts = looking(args.model, args.data, args.questions)
    except EvalError as e:
        raise SystemExit(f"error: {e}") from None
    for cat, by_layer in result.items():
        print(f"\n{cat} ({counts[cat]} questions, images with 2+ shapes): per head, the most selective "
              "position (from the end), its token, weight on the target / on each other shape")
        for layer, heads in by_layer.items():
            cells = "  ".join(f"h{h} {off} {t!s:>8} {a:.2f}/{b:.2f}" for h, (off, t, a, b) in enumerate(heads))
            print(f"  layer {layer}: {cells}")


if __name__ == "__main__":
    cli(main)
