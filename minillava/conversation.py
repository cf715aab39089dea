"""Conversation templates, and the one place that turns turns into a prompt, ids and labels.

The templates are rendered exactly as the original repo renders them (llava-facts section 4),
because the published checkpoints were trained on these strings:

  vicuna_v1      "{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"
  llava_v1       the same, with "curious human" in the system prompt
  llava_llama_2  "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q1} [/INST] {a1} </s><s>[INST] {q2} [/INST] {a2} </s>"
  plain          "<image>{caption}\\n"  (stage-1 pretraining: the instruction is dropped)

A prompt is built as a list of segments (text, supervised). Labels are then exact by
construction: each segment is tokenized on its own, and its ids are copied into the labels
when the segment is an answer (or the `</s>` that ends it) and set to IGNORE_INDEX otherwise.
An assertion checks that the segments' ids, put together, equal the ids of the whole prompt,
so a tokenizer that disagrees fails loudly instead of silently zeroing the loss (the original's
"tokenization mismatch" bug).
"""
from dataclasses import dataclass

from .constants import IGNORE_INDEX, IMAGE_PLACEHOLDER


@dataclass(frozen=True)
class Template:
    style: str                          # "vicuna", "llama_2" or "plain"
    system: str = ""
    roles: tuple = ("USER", "ASSISTANT")


TEMPLATES = {
    "vicuna_v1": Template("vicuna", "A chat between a curious user and an artificial intelligence assistant. "
                                    "The assistant gives helpful, detailed, and polite answers to the user's questions."),
    "llava_v1": Template("vicuna", "A chat between a curious human and an artificial intelligence assistant. "
                                   "The assistant gives helpful, detailed, and polite answers to the human's questions."),
    "llava_llama_2": Template("llama_2", "You are a helpful language and vision assistant. You are able to understand "
                                         "the visual content that the user provides, and assist the user with a variety "
                                         "of tasks using natural language."),
    "plain": Template("plain"),
}


class ConversationError(ValueError):
    """A record the template cannot render; the message names the record."""


def get_template(conv_mode):
    if conv_mode not in TEMPLATES:
        raise ValueError(f"conv mode {conv_mode!r}: expected one of {', '.join(TEMPLATES)}")
    return TEMPLATES[conv_mode]


def normalize_turns(turns):
    """Strip every turn; the turn holding "<image>" becomes "<image>\\n" + its text, as in the original
    (raw data has the placeholder first or last). Whitespace at the ends of a turn would only make
    the segment-wise and whole-prompt tokenizations disagree."""
    out = []
    for text in turns:
        if text is not None and IMAGE_PLACEHOLDER in text:
            text = IMAGE_PLACEHOLDER + "\n" + text.replace(IMAGE_PLACEHOLDER, "").strip()
        out.append(text.strip() if text is not None else None)
    return out


def segments(conv_mode, turns):
    """turns = [q1, a1, q2, a2, ...]; end with a question (or None) for a generation prompt.
    Returns [(text, supervised, turn)]: "".join of the texts is the rendered prompt; turn is
    the index in `turns` the segment belongs to (chat uses it to send only the new turns)."""
    t = get_template(conv_mode)
    turns = normalize_turns(turns)
    if len(turns) % 2 == 0 and turns[-1] is None:
        turns = turns[:-1]
    user, assistant = t.roles
    out = []
    for i, text in enumerate(turns):
        is_question = i % 2 == 0
        if t.style == "plain":       # stage 1: only the image and the caption
            out += [(IMAGE_PLACEHOLDER, False, i)] if is_question else [(text + "\n", True, i)]
        elif t.style == "vicuna":
            if is_question:
                head = t.system + " " if i == 0 else ""
                out.append((f"{head}{user}: {text} {assistant}:", False, i))
            else:
                out += [(" " + text, True, i), ("</s>", True, i)]
        elif t.style == "llama_2":
            if is_question:
                if i == 0:
                    text = f"<<SYS>>\n{t.system}\n<</SYS>>\n\n{text}"
                else:
                    out.append(("<s>", False, i))
                out.append((f"[INST] {text} [/INST]", False, i))
            else:
                out += [(" " + text + " ", True, i), ("</s>", True, i)]
    return out


def render(conv_mode, turns):
    """The prompt string; with a final question, it ends where the assistant starts to answer."""
    return "".join(text for text, _, _ in segments(conv_mode, turns))


def encode_segments(tokenizer, segs, first=True):
    """Ids and labels of segments. The first segment of a prompt starts with BOS and may hold the
    image; every later one follows either a special token or a space, and SentencePiece splits on
    whitespace, so each is encoded on its own (its leading space becomes the dummy prefix)."""
    ids, labels = [], []
    for k, (text, supervised, _) in enumerate(segs):
        if k == 0 and first:
            piece = tokenizer.encode_prompt(text)
        else:
            piece = tokenizer.encode(text[1:] if text.startswith(" ") else text)
        ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    return ids, labels


def tokenize_conversation(tokenizer, conv_mode, turns, where="conversation"):
    """input_ids and labels for training: answers and their `</s>` supervised, all else IGNORE_INDEX."""
    segs = segments(conv_mode, turns)
    ids, labels = encode_segments(tokenizer, segs)
    whole = tokenizer.encode_prompt(render(conv_mode, turns))
    if ids != whole:
        raise ConversationError(
            f"{where}: tokenizing segment by segment gives different ids than tokenizing the whole "
            f"prompt ({len(ids)} vs {len(whole)} tokens); this tokenizer does not split on whitespace "
            f"the way LLaMA's does")
    return ids, labels


def tokenize_record(tokenizer, record, conv_mode, where=None):
    """A LLaVA JSON record (validated by data.validate_record) -> (input_ids, labels)."""
    turns = [turn["value"] for turn in record["conversations"]]
    return tokenize_conversation(tokenizer, conv_mode, turns, where or f"record {record.get('id')}")


def prompt_ids(tokenizer, conv_mode, question, history=()):
    """Ids of a generation prompt: earlier (q, a) turns, then `question` (with "<image>" in the
    first question if there is an image); the model's answer follows."""
    turns = [text for pair in history for text in pair] + [question]
    return tokenizer.encode_prompt(render(conv_mode, turns))
