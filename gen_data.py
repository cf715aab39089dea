"""Make LLaVA training data: GPT-4 instruction data (paper section 3) and stage-1 caption data.

  coco      COCO captions_*.json + instances_*.json -> caps_boxes JSONL (the symbolic image context)
  instruct  caps_boxes JSONL -> llava_instruct-style JSON, written by a GPT-4-class model
  captions  image-caption pairs (CSV or JSONL) -> stage-1 pretraining JSON

The model never sees the image. It reads the image's context: the captions, one per
line, and for `detail` and `complex` also, after a blank line, one line per object
`category: [x1, y1, x2, y2]` (box corners as fractions of the image size, 3 decimals).
Each request is: a system message, two hand-written (context, response) examples as
user/assistant turns (minillava/fewshot/), then the image's context as the last user turn.
Answers come back as `Question:\\n...\\n===\\nAnswer:\\n...` blocks separated by `===`
(conversation, complex) or as free text (detail).

Example: python gen_data.py instruct --input caps_boxes.jsonl --out instruct.json --dry-run
"""
import argparse
import csv
import json
import os
import random
import sys
from collections import defaultdict
from pathlib import Path

from minillava import fewshot
from minillava.constants import IMAGE_PLACEHOLDER
from minillava.data import DataError, validate_record
from minillava.openai_jobs import JobsError, Settings, estimate_tokens, make_client, read_journal, run_jobs
from minillava.prompts import BRIEF_DESCRIPTION, DETAILED_DESCRIPTION


class InputError(ValueError):
    """Input we cannot use; the message names the file and the record or line."""


# ---------------------------------------------------------------- reading inputs

def read_json(path):
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path):
    """[(line number, object)] for every non-blank line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path} line {n}: not valid JSON ({e})") from None
    return rows


def load_caps_boxes(path):
    """Read and check LLaVA's caps_boxes JSONL: {id, image, captions, instances: [{category, bbox}]}."""
    records, seen = [], set()
    for n, r in read_jsonl(path):
        where = f"{path} line {n}"
        if not isinstance(r, dict) or any(k not in r for k in ("id", "image", "captions", "instances")):
            raise InputError(f"{where}: expected an object with id, image, captions and instances")
        r = {**r, "id": str(r["id"])}
        if r["id"] in seen:
            raise InputError(f"{where}: duplicate id {r['id']!r}")
        seen.add(r["id"])
        caps = r["captions"]
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise InputError(f"{where} (id {r['id']}): 'captions' must be a non-empty list of strings")
        if not isinstance(r["instances"], list):
            raise InputError(f"{where} (id {r['id']}): 'instances' must be a list")
        for i, obj in enumerate(r["instances"]):
            box = obj.get("bbox") if isinstance(obj, dict) else None
            ok = (isinstance(obj, dict) and isinstance(obj.get("category"), str) and isinstance(box, list)
                  and len(box) == 4 and all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in box)
                  and box[0] <= box[2] and box[1] <= box[3])
            if not ok:
                raise InputError(f"{where} (id {r['id']}): instance {i} needs a 'category' and a 'bbox' "
                                 f"[x1, y1, x2, y2] normalized to [0, 1], got {obj!r}")
        records.append(r)
    return records


# ---------------------------------------------------------------- COCO -> caps_boxes

def coco_to_caps_boxes(captions_path, instances_path, limit=None):
    """COCO caption + instance annotations -> caps_boxes records, sorted by image id.

    COCO boxes are [x, y, width, height] in pixels; caps_boxes wants the top-left and
    bottom-right corners as fractions of the image size, which is what GPT reads.
    """
    caps, inst = read_json(captions_path), read_json(instances_path)
    for path, data, keys in ((captions_path, caps, ("images", "annotations")),
                             (instances_path, inst, ("annotations", "categories"))):
        if not isinstance(data, dict) or any(k not in data for k in keys):
            raise InputError(f"{path}: not a COCO annotation file (needs {', '.join(keys)})")
    try:
        images = {img["id"]: img for img in caps["images"]}
        names = {c["id"]: c["name"] for c in inst["categories"]}
    except (KeyError, TypeError) as e:
        raise InputError(f"{captions_path} / {instances_path}: image or category entry without {e}") from None
    captions = defaultdict(list)
    for i, a in enumerate(caps["annotations"]):
        if a.get("image_id") not in images or not isinstance(a.get("caption"), str):
            raise InputError(f"{captions_path} annotation {i}: needs a known image_id and a caption")
        captions[a["image_id"]].append(a["caption"].strip())
    instances = defaultdict(list)
    for i, a in enumerate(inst["annotations"]):
        img = images.get(a.get("image_id"))
        if img is None or a.get("category_id") not in names or len(a.get("bbox") or []) != 4:
            raise InputError(f"{instances_path} annotation {i}: needs an image_id from {captions_path}, "
                             "a known category_id and a bbox [x, y, w, h]")
        x, y, w, h = a["bbox"]
        W, H = img["width"], img["height"]
        corners = (x / W, y / H, (x + w) / W, (y + h) / H)
        # Clip (COCO boxes can poke a pixel outside) and round: GPT sees 3 decimals anyway.
        box = [round(min(max(v, 0.0), 1.0), 3) for v in corners]
        instances[a["image_id"]].append({"category": names[a["category_id"]], "bbox": box})
    ids = sorted(i for i in images if captions[i])[:limit]
    return [{"id": Path(images[i]["file_name"]).stem, "image": images[i]["file_name"],
             "captions": captions[i], "instances": instances[i]} for i in ids]


# ---------------------------------------------------------------- answers -> records

def detail_prompt(image_id, seed):
    # Seeded per image (not one stream for the run), so --limit and resumed runs agree.
    return random.Random(f"{seed}:{image_id}").choice(DETAILED_DESCRIPTION)

def to_record(source, kind, entry, seed):
    """One journaled answer -> one LLaVA JSON record; ValueError if the answer is unusable."""
    if entry.get("finish_reason") == "length":
        raise ValueError("the answer was cut off at --max-tokens")
    text = entry["text"]
    if kind == "detail":
        if not text.strip():
            raise ValueError("empty description")
        turns = [(detail_prompt(source["id"], seed), text.strip())]
    else:
        turns = fewshot.parse_qa(text)
    conversations = []
    for i, (question, answer) in enumerate(turns):
        # The image goes with the first question only, as `<image>\n` + text (section 4).
        human = f"{IMAGE_PLACEHOLDER}\n{question}" if i == 0 else question
        conversations += [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]
    record = {"id": f"{source['id']}_{kind}", "image": source["image"], "conversations": conversations}
    validate_record(record, f"answer {entry['key']}")  # e.g. a stray <image> in the answer
    return record


def write_atomic(path, text):
    # A reader (or a crash) never sees a half-written file: write aside, then rename.
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- the subcommands

def cmd_instruct(args):
    kinds = [k.strip() for k in args.types.split(",") if k.strip()]
    for kind in kinds:
        if kind not in fewshot.TYPES:
            raise InputError(f"--types: unknown type {kind!r}; choose from {','.join(fewshot.TYPES)}")
    sources = load_caps_boxes(args.input)[:args.limit]
    # One request per (image, type); the key is what the journal uses to resume.
    jobs = [{"key": f"{s['id']}:{kind}", "messages": fewshot.build_messages(s, kind),
             "meta": {"id": s["id"], "type": kind}} for s in sources for kind in kinds]
    journal = f"{args.out}.journal.jsonl"
    if args.dry_run:
        return dry_run(jobs, journal, args)

    client = make_client(args.base_url, timeout=args.timeout, max_retries=args.max_retries)
    settings = Settings(args.model, args.temperature, args.max_tokens, args.workers)
    report = run_jobs(jobs, journal, client, settings, desc="gen_data")

    # Assemble --out from the journal: every answer ever received for these jobs.
    records, malformed = [], []
    by_id = {s["id"]: s for s in sources}
    for job in jobs:
        entry = report.results.get(job["key"])
        if entry is None:
            continue
        try:
            records.append(to_record(by_id[job["meta"]["id"]], job["meta"]["type"], entry, args.seed))
        except ValueError as e:  # logged with the raw text, never dropped silently
            malformed.append({"key": job["key"], "error": str(e), "response": entry["text"]})
    write_atomic(args.out, json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    bad_path = f"{args.out}.malformed.jsonl"
    write_atomic(bad_path, "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in malformed))

    print(f"{len(records)} records -> {args.out} ({report.done} answered now, {report.skipped} from the journal, "
          f"{report.retries} retries, {report.tokens} tokens)")
    if malformed:
        print(f"{len(malformed)} malformed responses (raw text in {bad_path}): "
              + ", ".join(m["key"] for m in malformed[:5]) + (" ..." if len(malformed) > 5 else ""))
    if report.failed:
        for key, error in list(report.failed.items())[:10]:
            print(f"failed: {key}: {error}", file=sys.stderr)
        print(f"{len(report.failed)} requests failed; run the same command again to retry only those",
              file=sys.stderr)
        return 1
    return 0


def dry_run(jobs, journal, args):
    """Print what would be sent and what it would roughly cost; sends nothing."""
    done = read_journal(journal)
    pending = [job for job in jobs if job["key"] not in done]
    print(f"dry run: {len(pending)} requests to {args.model} ({len(jobs) - len(pending)} already in {journal})")
    if pending:
        print(f"--- first request ({pending[0]['key']}) ---")
        for m in pending[0]["messages"]:
            print(f"[{m['role']}]\n{m['content']}\n")
    # Expected answer length: that of the few-shot answers, which the model tends to imitate.
    expected_out = {}
    for kind in fewshot.TYPES:
        answers = [response for _, response in fewshot.load(kind)[1]]
        expected_out[kind] = min(args.max_tokens, sum(map(estimate_tokens, answers)) // len(answers))
    total_in = total_out = 0
    for i, job in enumerate(pending):
        n_in = sum(estimate_tokens(m["content"]) + 4 for m in job["messages"])  # +4: per-message overhead
        n_out = expected_out[job["meta"]["type"]]
        total_in, total_out = total_in + n_in, total_out + n_out
        if i < 100:
            print(f"  {job['key']}: ~{n_in} input + ~{n_out} output tokens")
    if len(pending) > 100:
        print(f"  ... and {len(pending) - 100} more")
    cost = total_in * args.price_in / 1e6 + total_out * args.price_out / 1e6
    print(f"total: ~{total_in} input + ~{total_out} output tokens (ESTIMATE: 4 characters per token; "
          "output sized like the few-shot answers)")
    print(f"estimated cost: ${cost:.3f} at ${args.price_in:.2f}/${args.price_out:.2f} per 1M input/output tokens "
          "(--price-in/--price-out; check your provider's current prices)")
    return 0


def cmd_coco(args):
    records = coco_to_caps_boxes(args.captions, args.instances, args.limit)
    write_atomic(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(f"{len(records)} images -> {args.out}")
    return 0


def cmd_captions(args):
    """Image-caption pairs -> stage-1 records: a random brief-description prompt, the caption as answer."""
    if args.input.endswith(".csv"):
        with open(args.input, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            rows = [(reader.line_num, row) for row in reader]
    else:
        rows = read_jsonl(args.input)
    records, seen = [], set()
    for index, (n, row) in enumerate(rows[:args.limit]):
        where = f"{args.input} line {n}"
        if not isinstance(row, dict) or not str(row.get("image") or "").strip() \
                or not str(row.get("caption") or "").strip():
            raise InputError(f"{where}: needs a non-empty 'image' and 'caption'")
        rid = str(row.get("id") or f"{index:09d}")
        if rid in seen:
            raise InputError(f"{where}: duplicate id {rid!r}")
        seen.add(rid)
        prompt = random.Random(f"{args.seed}:{rid}").choice(BRIEF_DESCRIPTION)  # seeded per record
        record = {"id": rid, "image": str(row["image"]).strip(), "conversations": [
            {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{prompt}"},
            {"from": "gpt", "value": str(row["caption"]).strip()}]}
        try:
            validate_record(record, where)
        except DataError as e:
            raise InputError(str(e)) from None
        records.append(record)
    write_atomic(args.out, json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(records)} records -> {args.out}")
    return 0


# ---------------------------------------------------------------- command line

def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{instruct,coco,captions}")

    p = sub.add_parser("instruct", help="caps_boxes JSONL -> instruction data, via a GPT-4-class model",
                       description="Ask a chat model for conversation / detail / complex data per image. "
                       "The API key is read from OPENAI_API_KEY only. Answers are journaled in "
                       "<out>.journal.jsonl as they arrive, so rerunning a killed or failed run "
                       "sends only the requests still missing.")
    p.add_argument("--input", required=True, help="caps_boxes JSONL (from `coco`, LLaVA, or the toy world)")
    p.add_argument("--out", required=True, help="output llava_instruct-style JSON")
    p.add_argument("--types", default="conversation,detail,complex", help="comma-separated response types")
    p.add_argument("--model", default="gpt-4o", help="chat model name (default: %(default)s)")
    p.add_argument("--base-url", default=None,
                   help="any OpenAI-compatible server, e.g. http://localhost:8080/v1 (llama.cpp, vLLM, Ollama)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=1024, help="cap per answer; cut answers count as malformed")
    p.add_argument("--workers", type=int, default=4, help="concurrent requests (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--max-retries", type=int, default=5,
                   help="retries per request on 429/5xx/timeouts, with backoff and Retry-After (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request attempt (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for the detailed-description prompt per image")
    p.add_argument("--dry-run", action="store_true", help="print the requests and an estimated cost; send nothing")
    p.add_argument("--price-in", type=float, default=2.50,
                   help="USD per 1M input tokens, for --dry-run (default: gpt-4o's list price)")
    p.add_argument("--price-out", type=float, default=10.00, help="USD per 1M output tokens for --dry-run")
    p.set_defaults(func=cmd_instruct)

    p = sub.add_parser("coco", help="COCO annotations -> caps_boxes JSONL",
                       description="Convert COCO captions_*.json + instances_*.json of one split to caps_boxes JSONL "
                       "(boxes normalized to [0, 1] as top-left, bottom-right corners).")
    p.add_argument("--captions", required=True, help="COCO captions_<split>.json")
    p.add_argument("--instances", required=True, help="COCO instances_<split>.json")
    p.add_argument("--out", required=True, help="output caps_boxes JSONL")
    p.add_argument("--limit", type=int, default=None, help="only the first N images (by image id)")
    p.set_defaults(func=cmd_coco)

    p = sub.add_parser("captions", help="image-caption pairs -> stage-1 pretraining JSON",
                       description="Turn a CSV (header: image,caption[,id]) or JSONL of image-caption pairs into "
                       "LLaVA stage-1 records: one of the 11 brief-description prompts (drawn per record, "
                       "seeded) with the image, and the caption as the answer.")
    p.add_argument("--input", required=True, help="pairs as .csv or .jsonl")
    p.add_argument("--out", required=True, help="output LLaVA JSON")
    p.add_argument("--limit", type=int, default=None, help="only the first N pairs")
    p.add_argument("--seed", type=int, default=0, help="seed for the prompt drawn per record")
    p.set_defaults(func=cmd_captions)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (InputError, JobsError, OSError) as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # answers received so far are in the journal
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
