"""LLaVA JSON data: validation, the training dataset, and batching (llava-facts section 5)."""
import json
import os

import torch
from torch.nn.utils.rnn import pad_sequence

from .constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from .conversation import tokenize_record
from .image import ImageError, open_image, preprocess


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
    path = str(path)
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


def check_images(records, image_folder, name):
    """Fail before training, not at step 3000: every referenced image file must exist."""
    for i, r in enumerate(records):
        if "image" in r and not os.path.isfile(os.path.join(image_folder, r["image"])):
            raise DataError(f"{name} record {i} (id {r['id']}): image {os.path.join(image_folder, r['image'])} not found")


class LLaVADataset(torch.utils.data.Dataset):
    """LLaVA JSON records -> (input_ids, labels, image) for training. Tokenized lazily, per item,
    so that 665K records start training at once; every record was validated when loaded."""

    def __init__(self, records, image_folder, tokenizer, conv_mode, image_size, pad, n_image_tokens,
                 max_length, name="data"):
        self.records, self.image_folder, self.tok, self.conv_mode = records, image_folder, tokenizer, conv_mode
        self.image_size, self.pad, self.n_v, self.max_length, self.name = image_size, pad, n_image_tokens, max_length, name

    def __len__(self):
        return len(self.records)

    def lengths(self):
        """A cheap length per record for --group-by-length, without tokenizing: words in the turns,
        plus N_v for an image (as LLaVA's modality_lengths counts words)."""
        return [sum(len(t["value"].split()) for t in r["conversations"]) + (self.n_v if "image" in r else 0)
                for r in self.records]

    def __getitem__(self, i):
        r = self.records[i]
        where = f"{self.name} record {i} (id {r['id']})"
        ids, labels = tokenize_record(self.tok, r, self.conv_mode, where)
        image = None
        if "image" in r:
            path = os.path.join(self.image_folder, r["image"])
            try:
                image = preprocess(open_image(path), self.image_size, self.pad)
            except ImageError as e:
                raise DataError(f"{where}: {e}") from None
        # max_length counts the sequence the LLM sees: the image expands to N_v tokens.
        budget = self.max_length - ((self.n_v - 1) if image is not None else 0)
        truncated = len(ids) > budget
        if truncated:
            ids, labels = ids[:budget], labels[:budget]
            if IMAGE_TOKEN_INDEX not in ids and image is not None:
                raise DataError(f"{where}: --max-length {self.max_length} cuts off the image itself")
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "image": image,
                "length": len(ids) + (self.n_v - 1 if image is not None else 0),
                "truncated": truncated, "where": where}


def collate(items, pad_id=0):
    """Right-pad ids with pad_id (0 = <unk>, as LLaVA) and labels with IGNORE_INDEX; stack the
    images of the rows that have one, in row order (the order of the placeholders)."""
    images = [it["image"] for it in items if it["image"] is not None]
    return {
        "input_ids": pad_sequence([it["input_ids"] for it in items], batch_first=True, padding_value=pad_id),
        "labels": pad_sequence([it["labels"] for it in items], batch_first=True, padding_value=IGNORE_INDEX),
        "images": torch.stack(images) if images else None,
        "n_tokens": sum(it["length"] for it in items),             # what the LLM sees, image expanded
        "truncated": [it["where"] for it in items if it["truncated"]],
        "empty": [it["where"] for it in items if (it["labels"][1:] == IGNORE_INDEX).all()],
    }
