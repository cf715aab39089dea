"""Prompts, ids and labels exactly as the original LLaVA builds them, token by token."""
import pytest
import sentencepiece as spm

from minillava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from minillava.conversation import (ConversationError, render, segments, tokenize_conversation,
                                    tokenize_record)
from minillava.tokenizer import Tokenizer

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
CORPUS = [
    VICUNA_SYSTEM, "USER: What is in the image? ASSISTANT: A red circle and a blue square.",
    "How many shapes are there? There are 3 shapes.", "The triangle is at the top left of the picture.",
    "Describe the image concisely. A small green star on a gray background.",
    "[INST] <<SYS>> You are a helpful language and vision assistant. <</SYS>> [/INST]",
] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A SentencePiece model trained here with LLaMA's settings (BPE, byte fallback, dummy prefix)."""
    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return Tokenizer(d / "tokenizer.model")


def reference_tokenizer_image_token(sp, prompt):
    """The original repo's `tokenizer_image_token`, restated: tokenize each chunk around <image>
    (each with BOS), keep the first BOS only, put -200 between the chunks."""
    chunks = [[1] + sp.encode(c) for c in prompt.split("<image>")]
    ids = [chunks[0][0]]
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids += chunk[1:]
    return ids


def test_vicuna_v1_renders_exactly():
    turns = ["<image>\nWhat is it?", "A circle.", "And its color?", "Red."]
    assert render("vicuna_v1", turns) == (
        f"{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT: A circle.</s>USER: And its color? ASSISTANT: Red.</s>")
    assert render("vicuna_v1", turns[:3]).endswith("USER: And its color? ASSISTANT:")


def test_llava_v1_llama_2_and_plain_render_exactly():
    assert render("llava_v1", ["Hi", "Hello"]).startswith("A chat between a curious human")
    assert "the human's questions. USER: Hi ASSISTANT: Hello</s>" in render("llava_v1", ["Hi", "Hello"])
    sys_ = ("You are a helpful language and vision assistant. You are able to understand the visual content "
            "that the user provides, and assist the user with a variety of tasks using natural language.")
    assert render("llava_llama_2", ["q1", "a1", "q2", "a2"]) == (
        f"[INST] <<SYS>>\n{sys_}\n<</SYS>>\n\nq1 [/INST] a1 </s><s>[INST] q2 [/INST] a2 </s>")
    assert render("plain", ["Describe the image concisely.\n<image>", "A red circle."]) == "<image>A red circle.\n"


def test_image_placeholder_moves_to_the_front_of_its_turn():
    assert render("plain", ["<image>", "x"]) == render("plain", ["Describe.<image>", "x"])
    assert "USER: <image>\nWhat is it? ASSISTANT:" in render("vicuna_v1", ["What is it?\n<image>", "A."])


def test_prompt_ids_equal_the_chunkwise_reference(tok):
    prompt = render("vicuna_v1", ["<image>\nHow many shapes are there?", None])
    ids = tok.encode_prompt(prompt)
    assert ids == reference_tokenizer_image_token(tok.sp, prompt)
    k = ids.index(IMAGE_TOKEN_INDEX)
    # ... 'USER' ':' '▁' <-200> '▁' '<0x0A>' 'How' ...: each chunk keeps its dummy-prefix space
    assert [tok.sp.id_to_piece(i) for i in ids[k - 2:k]] == [":", "▁"]
    assert [tok.sp.id_to_piece(i) for i in ids[k + 1:k + 3]] == ["▁", "<0x0A>"]


def test_vicuna_two_turn_labels_token_by_token(tok):
    q1, a1, q2, a2 = "<image>\nHow many shapes are there?", "There are 3 shapes.", "What color?", "Red."
    ids, labels = tokenize_conversation(tok, "vicuna_v1", [q1, a1, q2, a2])
    enc = tok.sp.encode
    head = reference_tokenizer_image_token(tok.sp, f"{VICUNA_SYSTEM} USER: {q1} ASSISTANT:")
    mid = enc("USER: What color? ASSISTANT:")
    assert ids == head + enc(a1) + [2] + mid + enc(a2) + [2]
    assert labels == ([IGNORE_INDEX] * len(head) + enc(a1) + [2] + [IGNORE_INDEX] * len(mid) + enc(a2) + [2])
    assert ids == tok.encode_prompt(render("vicuna_v1", [q1, a1, q2, a2]))


def test_plain_labels_cover_the_caption_and_its_newline_only(tok):
    record = {"id": "1", "image": "a.png", "conversations": [
        {"from": "human", "value": "Describe the image concisely.\n<image>"},
        {"from": "gpt", "value": "A small green star."}]}
    ids, labels = tokenize_record(tok, record, "plain")
    caption = tok.sp.encode("A small green star.\n")
    assert ids == [1, IMAGE_TOKEN_INDEX] + caption
    assert labels == [IGNORE_INDEX, IGNORE_INDEX] + caption
    assert tok.sp.id_to_piece(caption[-1]) == "<0x0A>"               # no </s> in plain: the newline ends it


def test_llama_2_labels_supervise_answers_and_eos(tok):
    ids, labels = tokenize_conversation(tok, "llava_llama_2", ["<image>\nq one", "a one", "q two", "a two"])
    supervised = [i for i, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert tok.sp.decode([i for i in supervised if i != 2]).split() == ["a", "one", "a", "two"]
    assert supervised.count(2) == 2 and ids.count(1) == 2            # </s> twice; <s> twice (start, turn 2)


def test_segments_tag_each_turn_for_chat():
    segs = segments("vicuna_v1", ["q1", "a1", "q2", None])
    assert [(t, turn) for t, _, turn in segs if turn >= 2] == [("USER: q2 ASSISTANT:", 2)]


class CharTokenizer:
    """A tokenizer without SentencePiece's dummy prefix: one id per character, spaces included."""
    bos_id, eos_id = 1, 2

    def encode(self, text):
        return [ord(c) for c in text]

    def encode_prompt(self, text):
        return [1] + self.encode(text)


def test_a_tokenizer_that_disagrees_segment_by_segment_fails_loudly_naming_the_record():
    with pytest.raises(ConversationError, match="data.json record 4"):
        tokenize_conversation(CharTokenizer(), "vicuna_v1", ["What is it?", "A circle."], where="data.json record 4")


def test_decode_skips_special_tokens_and_placeholders(tok):
    ids = tok.encode_prompt("<image>\nA red circle.</s>")
    assert tok.decode(ids).strip() == "A red circle."
