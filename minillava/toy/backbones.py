"""The toy world's tiny pretrained backbones: a CLIP vision tower and a chat LLaMA, in the real layouts.

LLaVA starts from two pretrained models (paper section 4): CLIP ViT-L/14 and Vicuna. The toy run
trains miniature stand-ins on the toy world and saves them exactly as the hub ships the real ones
(an OpenAI CLIP folder, a LLaMA folder with tokenizer.model), so everything after this file goes
through the same loaders real weights use.

  * CLIP: trained as CLIP was (Radford et al. 2021): a symmetric InfoNCE loss over a batch of
    (image, caption) pairs, with a learned temperature. The image embedding is a linear projection
    of post_layernorm(CLS); the text encoder (a 2-layer transformer over caption words) is thrown
    away afterwards: only `vision_model.*` is saved, as LLaVA uses only CLIP's vision half.
    Plus an auxiliary loss, because contrastive training alone leaves the patch tokens (what
    LLaVA reads) vague about local detail, a known weakness of CLIP: a linear probe reads the
    shape of the object in a patch token for only 63% of objects after contrastive training.
    From the penultimate layer's patch tokens, three heads name the colour and the shape of the
    object in each grid cell (or "empty", read from the boxes) and the cell itself. They are
    cosine classifiers (CosineHead), so a property is named only if it takes up a real share of
    the token: with plain linear heads colour explained 73% of an occupied token's variance, shape
    1.6% and the cell 1.5%, and the LM never learned to read shape or to find a cell; with these
    15%, 34% and 30% (measured on the held-out scenes). The heads are thrown away too.
    One patch token per cell of the world's 3x3 grid.
  * LM: a SentencePiece BPE tokenizer with LLaMA's settings, then a LLaMA trained on lm_corpus.json
    (the scenes told in words, as chats) rendered in the vicuna_v1 template. It never sees an image.

Shapes: B batch, N_v patches (9 at 72 px, patch 24), D_v vision width, L words, T tokens, E embedding.
"""
import argparse
import io
import json
import math
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoint import save_clip, save_llama
from ..clip import CLIPEncoderLayer, CLIPVisionConfig, CLIPVisionTransformer
from ..constants import IGNORE_INDEX
from ..conversation import get_template, prompt_ids, render, tokenize_conversation
from ..image import open_image, preprocess
from ..llama import KVCache, LlamaConfig, LlamaForCausalLM
from ..tokenizer import Tokenizer
from ..training import cpu_has_bf16, lr_at, mixed_precision
from .teacher import SHORT_ANSWER, normalize_answer
from .world import COLORS, SHAPES

# CLIP ViT in miniature: 3 x 3 patches of 24 px -> N_v = 9 visual tokens for LLaVA, one per cell of
# the toy world's grid (the 64 px images are resized to 72 px by CLIP's preprocessing, as real ones are).
CLIP_CONFIG = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                               num_attention_heads=4, image_size=72, patch_size=24)
GRID = CLIP_CONFIG.image_size // CLIP_CONFIG.patch_size
# Weights of the auxiliary loss's three terms next to the contrastive loss (see the docstring). Shape
# is the hard one for a 4-layer ViT (colour is a pixel average); at (1, 1, 1) it explains 4% of a token.
AUX_WEIGHTS = (1.0, 5.0, 3.0)   # colour, shape, cell
# LLaMA in miniature: GQA as in TinyLlama (4 query heads share 2 key/value heads), SwiGLU width
# ~8/3 D as in LLaMA. Two layers, not four: on a copy task (a random 32-token sequence, then the same
# again) this model with 2 layers copies after 200-300 steps, with 4 layers it has not started after
# 300 and is still at loss 2.6 after 1000; copying from context is what LLaVA asks of its LM. 512 positions cover 9 visual tokens + the longest chat (~215 tokens), with room to spare.
LM_CONFIG = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
BACKBONES_VERSION = 2   # bumped when the recipe changes, so that `python -m minillava.toy` rebuilds old backbones
VOCAB_SIZE = 1000       # the toy world has ~220 distinct words: 1000 pieces make most of them one token
CONV_MODE = "vicuna_v1"  # the template LLaVA-1.5 trains with: the LM learns the exact chat format

# ---------------------------------------------------------------- shared training pieces


def train_loop(params, loss_fn, steps, lr, betas, dtype, desc, progress, weight_decay=0.1):
    """The loop both backbones share: loss_fn() -> the loss of the next batch. Returns the loss of every
    step and the median time of a step in ms (after 3 warm-up steps: allocator, kernel choice).
    AdamW with the LLaVA stages' schedule (training.lr_at): 5% linear warmup, then cosine decay."""
    decay = [p for p in params if p.dim() >= 2]                   # matrices decay; norms, biases, scales don't
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], betas=betas)
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
    occupied = y > 0
    return torch.where(occupied, (y - 1) // len(SHAPES) + 1, 0), torch.where(occupied, (y - 1) % len(SHAPES) + 1, 0)


class CosineHead(nn.Module):
    """A linear classifier on the direction of a feature: logits = SCALE * cos(h, w_c). Unlike a plain
    linear head, it cannot rescale a faint direction of h into a confident answer: to be named, a
    property must take up a real share of the feature vector, which is what the LM will need."""
    SCALE = 10.0

    def __init__(self, dim, classes):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, dim) / dim ** 0.5)

    def forward(self, h):                                         # (..., D) -> (..., classes)
        return self.SCALE * F.normalize(h, dim=-1) @ F.normalize(self.weight, dim=-1).t()


def train_clip(world, out_dir, steps=480, batch_size=64, lr=5e-4, seed=0, dtype=None, progress=True):
    """Train the tiny CLIP contrastively on caps_boxes_train; save its vision half to out_dir (save_clip).
    Returns the measured figures, among them zero-shot retrieval on the held-out test images."""
    dtype = dtype or ("bf16" if cpu_has_bf16() else "fp32")
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

# ---------------------------------------------------------------- tokenizer and tiny chat LM


def tokenizer_corpus(world):
    """The text the tokenizer learns from: every chat the LM trains on, rendered in the template
    (so "USER", "ASSISTANT" and the system prompt get their own pieces), plus stage 2's turns (so
    the later stages write nothing new). Lines are cut at "</s>" (a special token, not text) and at
    newlines (which, as in LLaMA, are always the byte <0x0A>)."""
    lines = []
    for record in json.loads((Path(world) / "lm_corpus.json").read_text()):
        lines += render(CONV_MODE, [t["value"] for t in record["conversations"]]).split("</s>")
    for record in json.loads((Path(world) / "instruct.json").read_text()):
        lines += [t["value"].replace("<image>", "") for t in record["conversations"]]
    return [line for text in lines for line in text.split("\n") if line.strip()]


def train_tokenizer(world, out_file, vocab_size=VOCAB_SIZE):
    """A SentencePiece BPE model with LLaMA's settings: digits split, byte fallback for anything
    unseen, no normalization, ids 0/1/2 = <unk>/<s>/</s>, no pad piece (LLaVA pads with <unk>)."""
    model = io.BytesIO()          # written to memory: a file name would be recorded inside the model
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus(world)), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, hard_vocab_limit=False,           # a tiny world may offer fewer pieces
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    Path(out_file).write_bytes(model.getvalue())
    return Tokenizer(out_file)


@torch.no_grad()
def greedy_answer(lm, tok, question, max_new_tokens=80):
    """Greedy decoding through the static KV cache: the prompt once, then one token per step."""
    ids = prompt_ids(tok, CONV_MODE, question)
    cache = KVCache(lm.config, 1, len(ids) + max_new_tokens, "cpu", torch.float32)
    logits = lm(torch.tensor([ids]), cache=cache)[:, -1]          # (1, V)
    out = []
    for _ in range(max_new_tokens):
        token = logits.argmax(-1)                                 # (1,)
        if token.item() == tok.eos_id:
            break
        out.append(token.item())
        logits = lm(token[:, None], cache=cache)[:, -1]
    return tok.decode(out)


def lm_loss(lm, ids, labels):
    """Mean next-token cross-entropy over supervised tokens of a (B, T) batch."""
    logits = lm(ids)                                              # (B, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX)


def pad_batch(rows, pad_id):
    """[(ids, labels)] -> (B, T) ids and labels, right-padded (labels with IGNORE_INDEX)."""
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad_id)
    labels = torch.full((len(rows), T), IGNORE_INDEX)
    for b, (row_ids, row_labels) in enumerate(rows):
        ids[b, :len(row_ids)], labels[b, :len(row_labels)] = torch.tensor(row_ids), torch.tensor(row_labels)
    return ids, labels


def batches(rows, batch_size, g, pad_id):
    """Endless batches: shuffled each epoch, then sorted by length within runs of 32 batches, so a
    batch pads little (length bucketing), and the batches shuffled again."""
    while True:
        order = torch.randperm(len(rows), generator=g).tolist()
        run = 32 * batch_size
        runs = [sorted(order[i:i + run], key=lambda k: len(rows[k][0])) for i in range(0, len(order), run)]
        groups = [r[i:i + batch_size] for r in runs for i in range(0, len(r), batch_size)]
        for j in torch.randperm(len(groups), generator=g).tolist():
            yield pad_batch([rows[k] for k in groups[j]], pad_id)


def train_lm(world, out_dir, steps=360, batch_size=16, lr=2e-3, seed=0, dtype=None,
             supervise="all", heldout_scenes=50, progress=True):
    """Train the tokenizer and the tiny chat LLaMA on lm_corpus.json; save both to out_dir (save_llama).

    supervise="answers" trains as Vicuna's chat fine-tuning and LLaVA's stage 2 do: only the assistant's
    answers and their </s> are targets. "all" (default) also makes the questions, with the scenes told in
    words, targets (not the system prompt, the same in every chat): 3.6x the targets for the same compute,
    standing in for the all-token pretraining LLaMA had before Vicuna. Measured over 400 steps of 16 chats,
    both reach the same held-out answer loss (0.439 "all", 0.446 "answers").
    Held out: the records of the last `heldout_scenes` scenes, scored on their answers."""
    dtype = dtype or ("bf16" if cpu_has_bf16() else "fp32")
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory()
    tok = train_tokenizer(world, os.path.join(tmp.name, "tokenizer.model"))
    t_tok = time.perf_counter() - t_start

    records = json.loads((Path(world) / "lm_corpus.json").read_text())
    scene_of = lambda r: r["id"].rsplit("-lm-", 1)[0]             # "train_000123-lm-4" -> "train_000123"
    scenes = sorted({scene_of(r) for r in records})
    held = set(scenes[len(scenes) - min(heldout_scenes, len(scenes) // 5):])   # whole scenes held out
    system = len(tok.encode_prompt(get_template(CONV_MODE).system))   # BOS + the system prompt's tokens
    train_rows, test_rows, test_chats = [], [], []
    for r in records:
        turns = [t["value"] for t in r["conversations"]]
        ids, answers = tokenize_conversation(tok, CONV_MODE, turns, f"lm_corpus record {r['id']}")
        if scene_of(r) in held:
            test_rows.append((ids, answers))
            test_chats.append((scene_of(r), turns))
        elif supervise == "answers":
            train_rows.append((ids, answers))
        else:   # every token after the system prompt (the same in every record: nothing to learn)
            train_rows.append((ids, [IGNORE_INDEX] * system + ids[system:]))

    cfg = LlamaConfig(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                      pad_token_id=tok.pad_id, **LM_CONFIG)
    lm = LlamaForCausalLM(cfg).train()
    for name, p in lm.named_parameters():   # LLaMA's init, N(0, 0.02), residual outputs scaled as in GPT-2
        if p.dim() >= 2:
            residual = name.endswith(("o_proj.weight", "down_proj.weight"))
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.num_hidden_layers) if residual else 0.02)
    data = batches(train_rows, batch_size, torch.Generator().manual_seed(seed), tok.pad_id)
    tokens = []

    def loss_fn():
        ids, labels = next(data)
        tokens.append(ids.numel())
        return lm_loss(lm, ids, labels)

    losses, ms = train_loop(list(lm.parameters()), loss_fn, steps, lr, (0.9, 0.95), dtype, "tiny LLaMA", progress)

    # Held out: the loss per answer token; greedy short answers scored as the bench scores them
    # (the first question of each short-answer chat); sample answers, one chat of each kind.
    lm.eval()
    with torch.no_grad(), mixed_precision("cpu", dtype):
        total = count = 0
        for i in range(0, len(test_rows), 64):
            ids, labels = pad_batch(test_rows[i:i + 64], tok.pad_id)
            n = (labels[:, 1:] != IGNORE_INDEX).sum().item()
            total, count = total + lm_loss(lm, ids, labels).item() * n, count + n
    short = [turns for _, turns in test_chats if turns[0].endswith(SHORT_ANSWER)]
    correct = sum(normalize_answer(greedy_answer(lm, tok, q, 8)) == normalize_answer(a) for q, a, *_ in short)
    samples = sorted(({"question": turns[0], "reference": turns[1], "answer": greedy_answer(lm, tok, turns[0])}
                      for scene, turns in test_chats if scene == min(held)), key=lambda s: len(s["reference"]))
    save_llama(lm, out_dir, tok.file)
    tmp.cleanup()
    return {"config": cfg.to_dict(), "params": sum(p.numel() for p in lm.parameters()),
            "vocab_size": tok.vocab_size, "tokenizer_seconds": round(t_tok, 1),
            "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "dtype": dtype,
            "supervise": supervise, "tokens_seen": sum(tokens), "train_records": len(train_rows),
            "longest_chat_tokens": max(len(ids) for ids, _ in train_rows + test_rows),
            "step_ms": ms, "seconds": round(time.perf_counter() - t_start, 1),
            "heldout_answer_loss": round(total / max(count, 1), 4), "heldout_records": len(test_rows),
            "heldout_short_answer_accuracy": round(correct / max(len(short), 1), 4), "heldout_short_questions": len(short),
            "samples": samples, "loss_per_10_steps": loss_curve(losses)}
