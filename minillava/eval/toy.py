"""The toy bench: short-answer questions about held-out toy-world images (minillava.toy).

Input: the toy world folder (python -m minillava.toy ...), whose bench.jsonl holds one line per
question {question_id, image, text, answer, category} and whose images/ the `image` fields are
relative to. Categories: count, color, shape, position, relation (one question of each per
test image; no relation question for a lone shape).

Prompt: "<image>\\n" + the question (which ends with LLaVA-1.5's "Answer the question using a
single word or phrase."), in the checkpoint's conv mode; greedy decoding.

Two scores per category:
  exact       the answer, stripped of surrounding whitespace, equals the gold answer exactly
              (gold answers are written the way training answers are: "3", "top left", "yes")
  normalized  the two are equal after normalize_answer: lower case, punctuation -> spaces,
              no a/an/the, number words -> digits ("Three." -> "3", "The Top-Left" -> "top left")
Exact match shows whether the model learned the format; normalized match whether it knows the
answer. A question without an answer counts as wrong in both. A second table splits the normalized
score by how many shapes the image holds (from caps_boxes_test.jsonl): with one shape nothing needs
binding; with several, the model must find the one shape the question names.
"""
from collections import defaultdict
from pathlib import Path

from ..toy.teacher import BENCH_CATEGORIES, normalize_answer
from .common import (add_model_args, answer_questions, markdown_table, need, out_dir, pct, read_jsonl,
                     settings, write_results)

HELP = "the toy world's held-out short-answer bench, per category"


def score_toy(questions, answers):
    """answers {str(question_id): model text} -> ({category: {questions, exact, normalized}}, verdict rows).
    Accuracies in percent; "all" covers every question."""
    counts = defaultdict(lambda: {"questions": 0, "exact": 0, "normalized": 0})
    scored = []
    for q in questions:
        text = answers.get(str(q["question_id"]))
        exact = text is not None and text.strip() == q["answer"]
        normalized = text is not None and normalize_answer(text) == normalize_answer(q["answer"])
        for name in (q["category"], "all"):
            counts[name]["questions"] += 1
            counts[name]["exact"] += exact
            counts[name]["normalized"] += normalized
        scored.append({"question_id": q["question_id"], "category": q["category"], "gold": q["answer"],
                       "text": text, "exact": exact, "normalized": normalized})
    order = [c for c in BENCH_CATEGORIES if c in counts] + sorted(set(counts) - set(BENCH_CATEGORIES) - {"all"})
    results = {}
    for name in order + ["all"]:
        c = counts[name]
        results[name] = {"questions": c["questions"], "exact": 100 * c["exact"] / c["questions"],
                         "normalized": 100 * c["normalized"] / c["questions"]}
    return results, scored


def by_shape_count(scored):
    """{category: {n shapes: normalized accuracy in percent}} over the rows that carry "shapes"."""
    hits = defaultdict(lambda: defaultdict(list))
    for row in scored:
        if row.get("shapes"):
            hits[row["category"]][row["shapes"]].append(row["normalized"])
    return {c: {n: 100 * sum(v) / len(v) for n, v in sorted(per.items())} for c, per in hits.items()}


def format_table(scores, title, split=None):
    rows = [[name, s["questions"], pct(s["exact"], 1), pct(s["normalized"], 1)] for name, s in scores.items()]
    text = [f"## {title}", "", markdown_table(["category", "questions", "exact", "normalized"], rows),
            "", "exact: the stripped answer equals the gold answer; normalized: equal after "
            "normalize_answer (case, punctuation, articles, number words)."]
    if split:
        counts = sorted({n for per in split.values() for n in per})
        rows = [[c] + [pct(split[c].get(n), 1) for n in counts] for c in scores if c in split]
        text += ["", "Normalized accuracy by the number of shapes in the image:", "",
                 markdown_table(["category"] + [f"{n} shape{'s' if n > 1 else ''}" for n in counts], rows)]
    return "\n".join(text)


def add_arguments(p):
    p.add_argument("--data", default="data/toy", help="toy world folder with bench.jsonl and images/ "
                   "(default: %(default)s)")
    add_model_args(p, model="runs/finetune", max_new_tokens=32, batch_size=32)


def run(args):
    out = out_dir(args, "toy")
    path = Path(args.data) / "bench.jsonl"
    questions = read_jsonl(path, "the toy bench; build the world with python -m minillava.toy")[:args.limit]
    for k, q in enumerate(questions):
        need(q, ("question_id", "image", "text", "answer", "category"), f"{path} line {k + 1}")
    items = [{"question_id": q["question_id"], "prompt": "<image>\n" + q["text"],
              "image": Path(args.data) / "images" / q["image"]} for q in questions]
    answers = answer_questions(items, args, out / "answers.jsonl", desc="toy bench")
    scores, scored = score_toy(questions, {k: e["text"] for k, e in answers.items()})
    boxes = Path(args.data) / "caps_boxes_test.jsonl"
    shapes = {r["image"]: len(r["instances"]) for r in read_jsonl(boxes, "the toy world's boxes")
              } if boxes.exists() else {}
    for q, row in zip(questions, scored):
        row["shapes"] = shapes.get(q["image"])
    split = by_shape_count(scored)
    results = {"scores": scores, "by_shape_count": split, "settings": settings(args, answers, data=str(args.data))}
    limited = " (--limit)" if args.limit else ""
    write_results(out, results, format_table(scores, f"Toy bench: {len(questions)} questions{limited}, "
                                                     f"model {args.model}", split), scored)
    return 0
