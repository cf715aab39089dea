"""The toy world's tiny chat LLaMA and its tokenizer, the stand-in for Vicuna (see backbones.py for CLIP).

A SentencePiece BPE tokenizer with LLaMA's settings, then a LLaMA trained on lm_corpus.json (the scenes
told in words, as chats) rendered in the vicuna_v1 template. It never sees an image. Saved as a LLaMA
folder with tokenizer.model (saving.save_llama), so the toy run loads it as real weights are loaded.

Shapes: B batch, T tokens, V vocabulary.
"""
import io
import json
import math
import os
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..saving import save_llama
from ..constants import IGNORE_INDEX
from ..conversation import get_template, prompt_ids, render, tokenize_conversation
from ..llama import KVCache, LlamaConfig, LlamaForCausalLM
from ..tokenizer import Tokenizer
from ..training import cpu_dtype, mixed_precision
from .backbones import loss_curve, train_loop
from .teacher import SHORT_ANSWER, normalize_answer
from .world import COLORS, SHAPES, SIZES

# LLaMA in miniature: GQA as in TinyLlama (4 query heads share 2 key/value heads), SwiGLU width
# ~8/3 D as in LLaMA. Two layers, as copying from the context (what LLaVA asks of its LM) comes far sooner:
# `python -m minillava.toy.probe --copy-task 400`, loss on the repeat 0.15 with 2 layers, 6.9 (guessing)
# with 4. 512 positions cover 9 visual tokens + the longest chat (~215 tokens), with room to spare.
LM_CONFIG = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
VOCAB_SIZE = 1000       # the toy world has ~220 distinct words: 1000 pieces make most of them one token
CONV_MODE = "vicuna_v1"  # the template LLaVA-1.5 trains with: the LM learns the exact chat format
# The world's words, each kept as one piece; the rest may merge across spaces into phrases ("▁Where▁is▁the"), so
# that a name's words stand next to each other and each is a token of its own (docs/toy-world.md, "The names as words
# and the rest in phrases"). A phrase piece can hold no name, so a name is never hidden inside a larger token.
KEPT_WORDS = [*COLORS, *SIZES, *SHAPES, "top", "bottom", "left", "right", "center"]  # the last five: POSITIONS' words


def new_llama(cfg):
    """A fresh LlamaForCausalLM with LLaMA's init, N(0, 0.02), residual outputs scaled as in GPT-2."""
    lm = LlamaForCausalLM(cfg).train()
    for name, p in lm.named_parameters():
        if p.dim() >= 2:
            residual = name.endswith(("o_proj.weight", "down_proj.weight"))
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.num_hidden_layers) if residual else 0.02)
    return lm


def tokenizer_corpus(world):
    """The text the tokenizer learns from: every chat the LM trains on, rendered in the template
    (so "USER", "ASSISTANT" and the system prompt get their own pieces), and nothing of stage 2's
    data, as LLaMA's tokenizer predates LLaVA's (so changing instruct.json does not redraw the LM;
    a word the LM never read is spelt in smaller pieces). Lines are cut at "</s>" (a special token,
    not text) and at newlines (which, as in LLaMA, are always the byte <0x0A>)."""
    lines = []
    for record in json.loads((Path(world) / "lm_corpus.json").read_text()):
        lines += render(CONV_MODE, [t["value"] for t in record["conversations"]]).split("</s>")
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
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
        split_by_whitespace=False, user_defined_symbols=["▁" + w for w in KEPT_WORDS])
    Path(out_file).write_bytes(model.getvalue())
    return Tokenizer(out_file)


@torch.no_grad()
def greedy_answer(lm, tok, question, max_new_tokens=80):
    """The LM's greedy answer to one question in its chat template."""
    ids = torch.tensor([prompt_ids(tok, CONV_MODE, question)])                     # (1, T)
    return tok.decode(greedy_ids(lm, lm.model.embed_tokens(ids), tok.eos_id, max_new_tokens))


@torch.no_grad()
def greedy_ids(lm, x, eos_id, max_new_tokens):
    """Greedy decoding after the embeddings x (1, T, D) through the static KV cache: the prompt once, then one
    token per step. Returns the new token ids."""
    cache = KVCache(lm.config, 1, x.shape[1] + max_new_tokens, "cpu", torch.float32)
    logits = lm.lm_head(lm.model(x, cache=cache))[:, -1]          # (1, V)
    out = []
    for _ in range(max_new_tokens):
        token = logits.argmax(-1)                                 # (1,)
        if token.item() == eos_id:
            break
        out.append(token.item())
        logits = lm(token[:, None], cache=cache)[:, -1]
    return out


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
    dtype = dtype or cpu_dtype()
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
    lm = new_llama(cfg)
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
