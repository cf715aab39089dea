"""LLaVA JSON data: validation, the training dataset, and batching."""
import json
import os

from .constants import IMAGE_PLACEHOLDER


class DataError(ValueError):
    """A record that cannot be trained on; the message names the file and the record."""


def validate_record(record, where):
    """Check one LLaVA JSON record; `where` names it in errors, e.g. 'data.json record 17 (id 000123)'.

    The rules are those of LCS-558K / llava_instruct_158k / mix665k: an `id`, an optional
    `image` path, and turns that alternate human, gpt, human, gpt, ... with non-empty text.
    A record with an image has exactly one `<image>`, in its first human turn; a text-only
    record has none.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if "id" not in record:
        raise DataError(f"{where}: no 'id'")
    conv = record.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2:
        raise DataError(f"{where}: 'conversations' must be a list of at least 2 turns")
    if len(conv) % 2:
        raise DataError(f"{where}: {len(conv)} turns; turns must come in human/gpt pairs")
    for i, turn in enumerate(conv):
        expected = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected:
            got = turn.get("from") if isinstance(turn, dict) else turn
            raise DataError(f"{where}: turn {i} is from {got!r}, expected {expected!r} (turns must alternate)")
        if not isinstance(turn.get("value"), str) or not turn["value"].strip():
            raise DataError(f"{where}: turn {i} has no text")
    n_placeholders = [turn["value"].count(IMAGE_PLACEHOLDER) for turn in conv]
    if "image" in record:
        if not isinstance(record["image"], str) or not record["image"]:
            raise DataError(f"{where}: 'image' must be a relative path")
        if n_placeholders[0] != 1 or sum(n_placeholders) != 1:
            raise DataError(f"{where}: a record with an image needs exactly one {IMAGE_PLACEHOLDER}, in its first human turn")
    elif sum(n_placeholders):
        raise DataError(f"{where}: {IMAGE_PLACEHOLDER} in a record that has no 'image'")


def load_records(path):
    """Read a LLaVA JSON list (or JSONL) and validate every record, naming the first bad one."""
    with open(path, encoding="utf-8") as f:
        try:
            records = json.load(f) if not path.endswith(".jsonl") else [json.loads(l) for l in f if l.strip()]
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records")
    name = os.path.basename(path)
    for i, r in enumerate(records):
        validate_record(r, f"{name} record {i} (id {r.get('id') if isinstance(r, dict) else '?'})")
    return records
