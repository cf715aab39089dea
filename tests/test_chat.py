"""chat.py: a one-shot answer is exactly generate's on every checkpoint layout; later turns feed the
KV cache only the new tokens, which add up to the ids of the whole conversation, and answer as a fresh
generate on it would; bad input gives one line on stderr and a non-zero exit, never a traceback."""
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

import chat
import minillava.llava
import tiny
from minillava import LLaVA
from minillava.conversation import encode_segments, render, segments
from minillava.image import open_image, preprocess
from minillava.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
V = 400         # the tokenizer's vocabulary, and so the tiny models'
N = 8           # --max-new-tokens: enough to see an answer, short enough to be quick
Q1, Q2, Q3, Q4 = ("What is in the image?", "How many shapes are there?", "What color is the circle?",
                  "Describe the image concisely.")


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    """The three layouts chat reads, each with the same tokenizer.model, and two images."""
    d = tmp_path_factory.mktemp("chat")
    tok_file = tiny.train_tokenizer(d / "sp", V)
    hf = tiny.llava_hf_folder(d / "hf", tiny.hf_llava(seed=1, vocab_size=V))
    orig = tiny.original_llava_folder(d / "orig", d / "clip", tiny.hf_llava(seed=2, vocab_size=V), "mlp2x_gelu")
    for folder in (hf, orig):
        shutil.copy(tok_file, folder / "tokenizer.model")
    src = tiny.llava_hf_folder(d / "src", tiny.hf_llava(seed=3, vocab_size=V))
    LLaVA.from_pretrained(src).save_pretrained(d / "mini", tokenizer_file=tok_file)
    for name, seed, size in (("red.png", 0, (80, 60)), ("other.png", 1, (50, 70))):   # not square: padded
        pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(d / name)
    return SimpleNamespace(dir=d, hf=hf, orig=orig, clip=d / "clip", mini=d / "mini", tok=Tokenizer(tok_file),
                           red=d / "red.png", other=d / "other.png")


def run_chat(*args, stdin=None):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "chat.py", "--device", "cpu", *map(str, args)], cwd=ROOT, env=env,
                          input=stdin, capture_output=True, text=True, encoding="utf-8", timeout=120)


def pixels(model, path):
    return preprocess(open_image(path), model.config.vision.image_size, model.config.image_aspect_ratio == "pad")


def greedy(model, ids, image=None, n=N):
    """The reference: a fresh generate on the whole prompt, no cache carried over."""
    images = None if image is None else pixels(model, image)[None]
    return model.generate(torch.tensor([ids]), images, n, temperature=0.0)[0].tolist()


def one_line_error(r, pattern):
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert re.search(pattern, r.stderr), r.stderr
    assert r.stdout == ""

# ---------------------------------------------------------------- one-shot answers


@pytest.mark.parametrize("layout", ["hf", "orig", "mini"])
def test_prompt_prints_exactly_the_greedy_answer_on_every_layout(ck, layout):
    folder = getattr(ck, layout)
    tower = ["--vision-tower", ck.clip] if layout == "orig" else []
    r = run_chat("--model", folder, *tower, "--image", ck.red, "--prompt", Q1, "--temperature", 0,
                 "--max-new-tokens", N)
    assert r.returncode == 0, r.stderr
    model = LLaVA.from_pretrained(folder, vision_tower=ck.clip if layout == "orig" else None)
    ids = ck.tok.encode_prompt(render(model.config.conv_mode, ["<image>\n" + Q1, None]))
    assert r.stdout == ck.tok.decode(greedy(model, ids, ck.red)) + "\n"


def test_stats_go_to_stderr_and_count_the_answer_tokens(ck):
    plain = run_chat("--model", ck.hf, "--image", ck.red, "--prompt", Q1, "--temperature", 0, "--max-new-tokens", N)
    timed = run_chat("--model", ck.hf, "--image", ck.red, "--prompt", Q1, "--temperature", 0, "--max-new-tokens", N,
                     "--stats")
    assert timed.returncode == 0 and timed.stdout == plain.stdout
    model = LLaVA.from_pretrained(ck.hf)
    n = len(greedy(model, ck.tok.encode_prompt(render(model.config.conv_mode, ["<image>\n" + Q1, None])), ck.red))
    assert re.fullmatch(rf"\({n} tokens; first after \d+ ms, then [\d.]+ tokens/s\)", timed.stderr.strip()), timed.stderr


# ---------------------------------------------------------------- multi-turn through one KV cache


def script(monkeypatch, tokens):
    """generate "samples" these tokens first (the model still runs every step and fills the cache),
    then decodes greedily: a first answer whose text re-encodes to the same ids, by construction."""
    queue, real = list(tokens), minillava.llava.sample
    monkeypatch.setattr(minillava.llava, "sample",
                        lambda logits, *a: torch.tensor([queue.pop(0)]) if queue else real(logits, 0.0, 1.0))


@pytest.mark.parametrize("conv_mode, ended", [("vicuna_v1", True), ("vicuna_v1", False), ("llava_llama_2", True)])
def test_second_turn_feeds_only_new_ids_and_answers_as_the_whole_conversation(ck, monkeypatch, conv_mode, ended):
    model, tok = LLaVA.from_pretrained(ck.hf), ck.tok
    a1 = "There are 3 shapes." + (" " if conv_mode == "llava_llama_2" else "")   # as the template renders it
    A = tok.encode(a1)
    assert tok.encode(tok.decode(A)) == A
    fed, generate = [], model.generate
    model.generate = lambda input_ids, *a, **k: fed.append(input_ids[0].tolist()) or generate(input_ids, *a, **k)
    # ended=False: the answer is cut at --max-new-tokens, so chat must add the `</s>` itself.
    session = chat.Chat(model, tok, conv_mode, max_new_tokens=len(A) + ended, temperature=0.0)
    session.reset(pixels(model, ck.red))
    script(monkeypatch, A + [tok.eos_id] if ended else A)
    out1 = session.ask(Q1)
    assert out1 == (A + [tok.eos_id] if ended else A)
    out2 = session.ask(Q3)
    # The cache holds everything fed and every answer token but the last (sampled, never run).
    whole = tok.encode_prompt(render(conv_mode, ["<image>\n" + Q1, a1, Q3]))
    assert fed[0] + out1[:-1] + fed[1] == whole
    assert fed[1][:1 if ended else 2] == ([tok.eos_id] if ended else [A[-1], tok.eos_id])
    assert session.cache.length == len(whole) - 1 + model.config.num_image_tokens + len(out2) - 1
    assert out2 == greedy(model, whole, ck.red, n=session.max_new_tokens)


def test_interactive_session_with_clear_and_image_switch(ck):
    stdin = "\n".join([Q1, Q2, "/clear", Q3, "/image " + str(ck.dir / "missing.png"), "/image " + str(ck.other),
                       Q4, "/exit"]) + "\n"
    r = run_chat("--model", ck.hf, "--image", ck.red, "--temperature", 0, "--max-new-tokens", N, stdin=stdin)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert re.search(r"missing\.png: cannot read", r.stderr)      # and the chat went on
    model, tok, eos = LLaVA.from_pretrained(ck.hf), ck.tok, ck.tok.eos_id
    first = lambda q: tok.encode_prompt(render("vicuna_v1", ["<image>\n" + q, None]))
    out1 = greedy(model, first(Q1), ck.red)
    # Turn 2's whole prompt at the token level: what the cache holds (the random answer's text need
    # not re-encode to the same ids; the scripted test above checks the text-level equality).
    turns = ["<image>\n" + Q1, tok.decode(out1), Q2]
    new = encode_segments(tok, [s for s in segments("vicuna_v1", turns) if s[2] >= 2], first=False)[0]
    out2 = greedy(model, first(Q1) + out1 + ([] if out1[-1] == eos else [eos]) + new, ck.red)
    out3 = greedy(model, first(Q3), ck.red)              # after /clear: a new conversation, same image
    out4 = greedy(model, first(Q4), ck.other)            # after /image: the new image
    U, A = "USER: ", "ASSISTANT: "
    answer = lambda out: A + tok.decode(out) + "\n"
    assert r.stdout == (U + answer(out1) + U + answer(out2) + U + U + answer(out3) + U + U + U + answer(out4) + U)


def test_text_only_chat_that_outgrows_the_context_says_clear_and_goes_on(ck):
    long = "shapes " * 50      # 101 tokens: turn 1 takes ~180 of the tiny context's 256, turn 2 does not fit
    r = run_chat("--model", ck.hf, "--temperature", 0, "--max-new-tokens", N,
                 stdin="\n".join([long, long, "/clear", Q1]) + "\n")     # then end of input: Ctrl-D
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert re.search(r"the conversation so far \(\d+ tokens\) and this turn \(\d+\) exceed the model's context "
                     r"of 256 tokens; /clear starts a new conversation", r.stderr)
    model, tok = LLaVA.from_pretrained(ck.hf), ck.tok
    text_only = lambda q: tok.encode_prompt(render("vicuna_v1", [q, None]))
    answer = lambda q: "ASSISTANT: " + tok.decode(greedy(model, text_only(q))) + "\n"
    U = "USER: "
    assert r.stdout == U + answer(long) + U + U + U + answer(Q1) + U + "\n"    # no image: text-only prompts


def test_ctrl_c_leaves_without_a_traceback(ck, monkeypatch, capsys):
    def interrupt(prompt):
        raise KeyboardInterrupt
    monkeypatch.setattr("builtins.input", interrupt)
    assert chat.main(["--model", str(ck.hf), "--device", "cpu"]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_seed_repeats_a_sampled_answer(ck, capsys):
    answers = []
    for seed in (5, 5, 6):
        assert chat.main(["--model", str(ck.hf), "--device", "cpu", "--prompt", Q1, "--temperature", "1",
                          "--seed", str(seed), "--max-new-tokens", "16"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] != answers[2]


# ---------------------------------------------------------------- bad input: one line, non-zero exit


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["missing", "text_file", "url", "no_checkpoint", "too_long"])
def test_bad_input_is_one_line_on_stderr_and_exit_1(ck, case):
    (ck.dir / "notes.txt").write_text("not an image")
    (ck.dir / "empty").mkdir(exist_ok=True)
    args, pattern = {
        "missing": (["--image", ck.dir / "missing.png"], r"missing\.png: cannot read"),
        "text_file": (["--image", ck.dir / "notes.txt"], r"notes\.txt: not an image"),
        "url": (["--image", f"http://127.0.0.1:{closed_port()}/x.png"], r"x\.png: cannot fetch"),
        "no_checkpoint": (["--model", ck.dir / "empty"], r"empty: not a checkpoint folder \(no config\.json\)"),
        "too_long": (["--image", ck.red, "--prompt", "shapes " * 150],
                     r"the prompt is \d+ tokens, the image's 16 included: more than the model's context of 256"),
    }[case]
    r = run_chat("--model", ck.hf, "--prompt", Q1, *args)      # a later --model / --prompt wins
    one_line_error(r, pattern)
