"""The toy world's tiny pretrained backbones: a CLIP vision tower here, a chat LLaMA in lm.py, in the real layouts.

LLaVA starts from two pretrained models (paper section 4): CLIP ViT-L/14 and Vicuna. The toy run
trains miniature stand-ins on the toy world and saves them exactly as the hub ships the real ones
(an OpenAI CLIP folder, a LLaMA folder with tokenizer.model), so everything after this file goes
through the same loaders real weights use.

  * CLIP: trained as CLIP was (Radford et al. 2021): a symmetric InfoNCE loss over a batch of
    (image, caption) pairs, with a learned temperature. The image embedding is a linear projection
    of post_layernorm(CLS); the text encoder (a 2-layer transformer over caption words) is thrown
    away afterwards: only `vision_model.*` is saved, as LLaVA uses only CLIP's vision half.
    Plus an auxiliary loss, because contrastive training alone leaves the patch tokens (what LLaVA
    reads) vague about local detail, a known weakness of CLIP. From the penultimate layer's patch
    tokens, three cosine heads (CosineHead) name the colour and the shape of the object in each grid
    cell (or "empty", read from the boxes) and the cell itself; then they are thrown away. Cosine, so
    that a property is named only if it takes a real share of the token: with plain linear heads,
    colour explained 73% of an occupied token's variance, shape 1.1%, the cell 0.8%, and the LM never
    learned to read shape or find a cell; with these 20%, 26%, 34% (`python -m minillava.toy.probe`;
    colour took 13.5% weighted 1, not 4, the cell 30% weighted 3, not 6). One patch token per grid cell.
  * LM (lm.py): a SentencePiece tokenizer and a LLaMA trained on the scenes told in words, as chats.

Shapes: B batch, N_v patches (9 at 72 px, patch 24), D_v vision width, L words, E embedding.
"""
import argparse
import json
import math
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..saving import save_clip
from ..clip import CLIPEncoderLayer, CLIPVisionConfig, CLIPVisionTransformer
from ..image import open_image, preprocess
from ..training import cpu_dtype, lr_at, mixed_precision
from .world import COLORS, SHAPES

# CLIP ViT in miniature: 3 x 3 patches of 24 px -> N_v = 9 visual tokens for LLaVA, one per cell of
# the toy world's grid (the 64 px images are resized to 72 px by CLIP's preprocessing, as real ones are).
CLIP_CONFIG = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                               num_attention_heads=4, image_size=72, patch_size=24)
GRID = CLIP_CONFIG.image_size // CLIP_CONFIG.patch_size
# Weights of the auxiliary loss's terms next to the contrastive one; shape is the hard one for a 4-layer ViT,
# and the cell is what the bench's colour and shape questions look a shape up by (cell 3.0 -> 6.0: README).
# Colour 1.0 -> 4.0 (20% of an occupied token's variance, was 14%): with 1.0, places lists alone lost colour (README).
AUX_WEIGHTS = (4.0, 5.0, 6.0)   # colour, shape, cell
BACKBONES_VERSION = 5   # bumped when the recipe changes, so that `python -m minillava.toy` rebuilds old backbones

# ---------------------------------------------------------------- shared training pieces


def train_loop(params, loss_fn, steps, lr, betas, dtype, desc, progress, weight_decay=0.1):
    """The loop both backbones share: loss_fn() -> the loss of the next batch. Returns the loss of every
    step and the median time of a step in ms (after 3 warm-up steps: allocator, kernel choice).
    AdamW with the LLaVA stages' schedule (training.lr_at): 5% linear warmup, then cosine decay."""
    decay = [p for p in params if p.dim() >= 2]                   # matrices decay; norms, biases, scales don't
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], betas=betas,
                            fused=True)                       # one kernel: CPU's default loops over tensors
    schedule = argparse.Namespace(lr=lr, warmup_ratio=0.05)
    losses, times = [], []
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for step in bar:
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, schedule)
        with mixed_precision("cpu", dtype):
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses, round(1000 * statistics.median(times[3:] or times), 1)


def loss_curve(losses, every=10):
    """Mean training loss of each run of `every` steps: the curve, short enough for a JSON file."""
    return [round(sum(losses[i:i + every]) / len(losses[i:i + every]), 4) for i in range(0, len(losses), every)]

# ---------------------------------------------------------------- tiny CLIP


def words(caption):
    return re.findall(r"[a-z]+", caption.lower())   # punctuation and case carry nothing here


class TextTower(nn.Module):
    """CLIP's text half in miniature: word embeddings + positions -> 2 transformer blocks -> <cls>.
    The same pre-LN block as the vision tower; trained with it, then thrown away."""

    def __init__(self, vocab_size, max_len, cfg, n_layers=2):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Parameter(0.01 * torch.randn(max_len, cfg.hidden_size))
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(n_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids):                                       # (B, L), ids[:, 0] = <cls>
        # Padding is attended to: it is one learned token, and it tells the caption's length.
        x = self.token_embedding(ids) + self.position_embedding   # (B, L, D_v)
        for layer in self.layers:
            x = layer(x)
        return self.final_layer_norm(x[:, 0])                     # (B, D_v)


def encode_captions(captions, vocab, max_len):
    """Captions -> (len(captions), max_len) word ids: <cls>, the words, then <pad>."""
    out = torch.zeros(len(captions), max_len, dtype=torch.long)   # 0 = <pad>
    for i, caption in enumerate(captions):
        ids = [1] + [vocab.get(w, 2) for w in words(caption)]      # 1 = <cls>, 2 = <unk>
        out[i, :len(ids)] = torch.tensor(ids[:max_len])
    return out


def load_split(world, split):
    """All images of a split as one tensor (it is small: 4000 x 3 x 64 x 64) and their captions."""
    records = [json.loads(line) for line in (Path(world) / f"caps_boxes_{split}.jsonl").read_text().splitlines()]
    X_v = torch.stack([preprocess(open_image(Path(world) / "images" / r["image"]), CLIP_CONFIG.image_size, pad=True)
                       for r in records])                         # (N, 3, 72, 72)
    return X_v, [r["captions"] for r in records], cell_labels(records)


def cell_labels(records):
    """(N, GRID * GRID): for each grid cell, 0 if empty, else 1 + the colour x shape of the object
    whose box centre lies in it (the symbolic representation, read from the boxes)."""
    Y = torch.zeros(len(records), GRID * GRID, dtype=torch.long)
    for i, r in enumerate(records):
        for inst in r["instances"]:
            color, shape = inst["category"].split()
            x1, y1, x2, y2 = inst["bbox"]
            row, col = min(GRID - 1, int((y1 + y2) / 2 * GRID)), min(GRID - 1, int((x1 + x2) / 2 * GRID))
            Y[i, row * GRID + col] = 1 + list(COLORS).index(color) * len(SHAPES) + SHAPES.index(shape)
    return Y


def split_cells(y):
    """cell_labels -> (colour, shape) labels, each 0 for an empty cell, else 1 + its index."""
    return torch.where(y > 0, (y - 1) // len(SHAPES) + 1, 0), torch.where(y > 0, (y - 1) % len(SHAPES) + 1, 0)


class CosineHead(nn.Module):
    """logits = SCALE * cos(h, w_c): unlike a linear head, it cannot blow a faint direction of h up into a
    confident answer, so what it learns to name must take a real share of h."""
    SCALE = 10.0

    def __init__(self, dim, classes):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, dim) / dim ** 0.5)

    def forward(self, h):                                         # (..., D) -> (..., classes)
        return self.SCALE * F.normalize(h, dim=-1) @ F.normalize(self.weight, dim=-1).t()


def train_clip(world, out_dir, steps=480, batch_size=64, lr=5e-4, seed=0, dtype=None, progress=True):
    """Train the tiny CLIP contrastively on caps_boxes_train; save its vision half to out_dir (save_clip).
    Returns the measured figures, among them zero-shot retrieval on the held-out test images."""
    dtype = dtype or cpu_dtype()
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    X_v, captions, cells = load_split(world, "train")
    vocab_words = sorted({w for caps in captions for c in caps for w in words(c)})
    vocab = {w: i + 3 for i, w in enumerate(vocab_words)}        # after <pad>, <cls>, <unk>
    max_len = 2 + max(len(words(c)) for caps in captions for c in caps)
    text_ids = torch.stack([encode_captions(caps, vocab, max_len) for caps in captions])   # (N, 5, L)

    vision = CLIPVisionTransformer(CLIP_CONFIG)
    emb = vision.embeddings      # OpenAI CLIP's init: nn.Embedding's N(0, 1) positions would drown the pixels
    nn.init.normal_(emb.class_embedding, std=CLIP_CONFIG.hidden_size ** -0.5)
    nn.init.normal_(emb.position_embedding.weight, std=0.02)
    text = TextTower(len(vocab) + 3, max_len, CLIP_CONFIG)
    E = CLIP_CONFIG.hidden_size
    visual_projection = nn.Linear(E, E, bias=False)               # CLIP's names for the two heads
    text_projection = nn.Linear(E, E, bias=False)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # learned temperature, CLIP's init
    color_head = CosineHead(E, 1 + len(COLORS))                   # the auxiliary loss's three heads: the
    shape_head = CosineHead(E, 1 + len(SHAPES))                   # colour and shape of what is in a cell
    where_head = CosineHead(E, GRID * GRID)                       # (0 = empty), and which cell it is
    parts = [vision, text, visual_projection, text_projection, color_head, shape_head, where_head]
    params = [p for m in parts for p in m.parameters()] + [logit_scale]

    def embed_images(x):
        """-> image embeddings (B, E) from the last layer's CLS, and the penultimate layer (B, 1 + N_v, D_v)."""
        h = vision(x, feature_layer=-2)                           # what LLaVA will read
        cls = vision.encoder.layers[-1](h)[:, 0]                  # (B, D_v): last layer, CLS token
        return F.normalize(visual_projection(vision.post_layernorm(cls)).float(), dim=-1), h

    def embed_texts(ids):
        return F.normalize(text_projection(text(ids)).float(), dim=-1)                      # (B, E)

    B, g = min(batch_size, len(X_v)), torch.Generator().manual_seed(seed)   # the data order follows the seed

    def pairs():    # endless full batches, a new order each epoch, one of its 5 captions for each image
        while True:
            for idx in torch.randperm(len(X_v), generator=g).split(B)[:len(X_v) // B]:
                yield X_v[idx], text_ids[idx, torch.randint(0, 5, (B,), generator=g)], cells[idx]
    data = pairs()

    def loss_fn():
        images, captions, cell_targets = next(data)
        (I, h), T = embed_images(images), embed_texts(captions)
        logits = logit_scale.exp().clamp(max=100) * I @ T.t()      # (B, B): image i should pick caption i
        target = torch.arange(B)
        contrastive = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2   # symmetric InfoNCE
        patches = h[:, 1:].flatten(0, 1)                           # (B * N_v, D_v)
        color, shape = split_cells(cell_targets.flatten())
        cell = torch.arange(GRID * GRID).repeat(B)
        aux = sum(w * F.cross_entropy(head(patches).float(), y) for w, head, y in
                  zip(AUX_WEIGHTS, (color_head, shape_head, where_head), (color, shape, cell)))
        return contrastive + aux

    losses, ms = train_loop(params, loss_fn, steps, lr, (0.9, 0.98), dtype, "tiny CLIP", progress)

    # Zero-shot retrieval on held-out images: each test image against every test image's first caption.
    X_test, test_captions, test_cells = load_split(world, "test")
    firsts = [caps[0] for caps in test_captions]
    for m in parts:
        m.eval()
    with torch.no_grad():
        I, h = embed_images(X_test)
        sim = I @ embed_texts(encode_captions(firsts, vocab, max_len)).t()   # (N_test, N_test)
        color, shape = split_cells(test_cells)
        named = (color_head(h[:, 1:]).argmax(-1) == color) & (shape_head(h[:, 1:]).argmax(-1) == shape)
        cells_right = named[test_cells > 0].float().mean().item()
        where_right = (where_head(h[:, 1:]).argmax(-1) == torch.arange(GRID * GRID)).float().mean().item()
    best = sim.argmax(1).tolist()
    # Two scenes can share a first caption (e.g. one small red circle); the right text counts as right.
    top1 = sum(firsts[j] == firsts[i] for i, j in enumerate(best)) / len(firsts)
    save_clip(vision, out_dir)
    return {"config": CLIP_CONFIG.to_dict(), "params": sum(p.numel() for p in vision.parameters()),
            "steps": steps, "batch_size": B, "lr": lr, "seed": seed, "dtype": dtype,
            "step_ms": ms, "seconds": round(time.perf_counter() - t_start, 1),
            "temperature": round(1 / logit_scale.exp().item(), 4),
            "retrieval_top1": round(top1, 4), "retrieval_chance": round(1 / len(firsts), 4),
            "retrieval_images": len(firsts), "heldout_objects_named_from_their_cell": round(cells_right, 4),
            "heldout_cells_named_from_their_token": round(where_right, 4),
            "loss_per_10_steps": loss_curve(losses)}
