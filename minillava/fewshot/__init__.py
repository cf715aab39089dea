"""The requests of GPT-4 data generation (paper section 3), and the parser for their answers.

One folder per response type holds `system.txt` (the task and the input format, in our
own words) and the hand-written few-shot pairs `exampleN_context.txt` /
`exampleN_response.txt`: plain text, so they can be read and changed without code.
A request is: system message, each example as a user turn (context) and an assistant
turn (response), then the image's own context as the last user turn.
"""
import functools
import re
from pathlib import Path

TYPES = ("conversation", "detail", "complex")
_HERE = Path(__file__).parent


@functools.lru_cache(maxsize=None)  # read once, not once per request
def load(kind):
    """(system message, ((context, response), ...)) for one response type."""
    if kind not in TYPES:
        raise ValueError(f"unknown response type {kind!r}; expected one of {', '.join(TYPES)}")
    folder = _HERE / kind
    system = (folder / "system.txt").read_text(encoding="utf-8").strip()
    examples = []
    for context_file in sorted(folder.glob("example*_context.txt")):
        response_file = context_file.with_name(context_file.name.replace("_context", "_response"))
        examples.append((context_file.read_text(encoding="utf-8").strip(),
                         response_file.read_text(encoding="utf-8").strip()))
    if not examples:
        raise FileNotFoundError(f"no few-shot examples in {folder}")
    return system, tuple(examples)


def format_context(record, kind):
    """The symbolic context GPT reads: captions, then (detail, complex) one line per box."""
    lines = [c.strip() for c in record["captions"]]
    if kind != "conversation" and record["instances"]:
        lines.append("")
        for obj in record["instances"]:
            lines.append(f"{obj['category']}: [{', '.join(f'{v:.3f}' for v in obj['bbox'])}]")
    return "\n".join(lines)


def build_messages(record, kind):
    """System message, few-shot examples as user/assistant turns, then this image's context."""
    system, examples = load(kind)
    messages = [{"role": "system", "content": system}]
    for context, response in examples:
        messages += [{"role": "user", "content": context}, {"role": "assistant", "content": response}]
    return messages + [{"role": "user", "content": format_context(record, kind)}]


def parse_qa(text):
    """'Question:\\n..\\n===\\nAnswer:\\n..' blocks separated by '===' -> [(question, answer)].

    Anything else raises ValueError saying what is wrong: a response is used whole or not at all.
    """
    blocks = [b.strip() for b in re.split(r"^[ \t]*={3,}[ \t]*$", text.strip(), flags=re.M)]
    if len(blocks) < 2 or len(blocks) % 2:
        raise ValueError(f"{len(blocks)} '==='-separated block(s); expected Question/Answer pairs")
    pairs = []
    for i in range(0, len(blocks), 2):
        (q, a), turn = blocks[i:i + 2], []
        for block, label in ((q, "Question:"), (a, "Answer:")):
            if not block.startswith(label) or not block[len(label):].strip():
                raise ValueError(f"block {i + len(turn) + 1} should be '{label}' followed by text")
            turn.append(block[len(label):].strip())
        pairs.append(tuple(turn))
    return pairs
