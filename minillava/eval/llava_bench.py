"""LLaVA-Bench (paper section 5.1): free-form answers rated by a text-only judge model.

Input, in either published layout (LLaVA-Bench COCO, LLaVA-Bench In-the-Wild):
  --questions   JSONL {question_id, image, text, category}; category conv, detail or complex
  --context     JSONL keyed by `image`: {image, captions: [..], instances: [{category, bbox}]}
                (COCO: captions and boxes) or {image, caption: "..."} (In-the-Wild: a description)
  --references  JSONL {question_id, text}: the text-only GPT-4 answers
  --images      folder the `image` fields are relative to

The model answers each question (with "<image>\\n" in front, greedy). Then, per question, the
judge reads the context (it never sees the image), the question, the reference answer as
Assistant 1 and the model's answer as Assistant 2, and writes two 1-10 scores on its first
line. Per category, relative score = mean(model's scores) / mean(reference's scores) x 100.
A review whose first line is not two numbers is counted as unreadable and left out of both
means (the original averages in -1 for it). Requests go through minillava.openai_jobs: the key
comes from OPENAI_API_KEY only, 429/5xx are retried with backoff, and every review is journaled
in <out>/judge.journal.jsonl the moment it arrives, so a rerun only asks for what is missing.
The paper's judge was GPT-4 (gpt-4-0314, since retired): scores from another judge model are
not comparable with the paper's 67.3.
"""
import hashlib
import json
import sys
from collections import defaultdict
from pathlib import Path

from .. import fewshot
from ..openai_jobs import Settings, make_client, run_jobs
from .common import (EvalError, add_model_args, answer_questions, markdown_table, need, out_dir, pct,
                     read_jsonl, settings, write_results)

HELP = "LLaVA-Bench (COCO / In-the-Wild) with a judge model through the openai client"
CATEGORIES = {"conv": "conversation", "detail": "detail", "complex": "complex"}

JUDGE_SYSTEM = "You are a careful and impartial judge of how good answers to questions are."
JUDGE_INSTRUCTIONS = (
    "Two AI assistants have answered the user's question above. The question is about an image that you "
    "cannot see; the context above describes it in a few sentences (and, when given, lists its objects with "
    "boxes (x1, y1, x2, y2): the top-left and bottom-right corners as fractions of the image size).\n"
    "Judge each answer on helpfulness, relevance, accuracy and level of detail, and give each one overall "
    "score from 1 to 10, where higher is better.\n"
    "Write the two scores, for Assistant 1 and then Assistant 2, alone on the first line, separated by a "
    "space. From the second line on, explain your scores. Stay impartial: the order in which the answers "
    "are shown must not affect your judgment.")


def context_text(record):
    """The judge's picture of the image: captions one per line, then any boxes (as in gen_data)."""
    captions = record.get("captions", record.get("caption", []))
    captions = [captions] if isinstance(captions, str) else captions
    return fewshot.format_context({"captions": captions, "instances": record.get("instances") or []}, "detail")


def judge_messages(context, question, reference, answer):
    user = (f"[Context]\n{context}\n\n[Question]\n{question}\n\n"
            f"[Assistant 1]\n{reference}\n\n[End of Assistant 1]\n\n"
            f"[Assistant 2]\n{answer}\n\n[End of Assistant 2]\n\n[System]\n{JUDGE_INSTRUCTIONS}\n\n")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_scores(review):
    """(reference score, model score) from the review's first line, or None if it is not two numbers."""
    first = review.strip().split("\n")[0].replace(",", " ").split()
    try:
        return (float(first[0]), float(first[1])) if len(first) == 2 else None
    except ValueError:
        return None


def relative_scores(questions, reviews):
    """reviews {str(question_id): review text, absent if the request failed} -> {category: stats}.
    Relative = mean(model) / mean(reference) x 100 over the readable reviews of the category."""
    groups = defaultdict(list)
    for q in questions:
        name = CATEGORIES.get(q["category"], q["category"])
        groups[name].append(q)
        groups["all"].append(q)
    out = {}
    for name, qs in groups.items():
        parsed = [parse_scores(reviews[str(q["question_id"])]) for q in qs if str(q["question_id"]) in reviews]
        good = [s for s in parsed if s is not None]
        ref = sum(s[0] for s in good) / len(good) if good else None
        model = sum(s[1] for s in good) / len(good) if good else None
        out[name] = {"questions": len(qs), "judged": len(good), "unreadable": len(parsed) - len(good),
                     "failed": len(qs) - len(parsed), "reference": ref, "model": model,
                     "relative": 100 * model / ref if good and ref else None}
    order = [c for c in CATEGORIES.values() if c in out] + sorted(set(out) - set(CATEGORIES.values()) - {"all"})
    return {name: out[name] for name in order + ["all"]}


def format_table(scores, title):
    rows = [[name, s["questions"], s["judged"], s["unreadable"], s["failed"], pct(s["reference"]),
             pct(s["model"]), pct(s["relative"], 1)] for name, s in scores.items()]
    table = markdown_table(["category", "questions", "judged", "unreadable", "failed", "reference",
                            "model", "relative"], rows)
    return "\n".join([f"## {title}", "", table, "",
                      "relative = mean(model) / mean(reference) x 100 over the judged reviews; unreadable "
                      "reviews and failed requests are left out of the means."])

# ---------------------------------------------------------------- command line


def add_arguments(p):
    p.add_argument("--questions", required=True, help="questions JSONL {question_id, image, text, category}")
    p.add_argument("--context", required=True, help="captions/description JSONL keyed by image")
    p.add_argument("--references", required=True, help="reference answers JSONL {question_id, text} (GPT-4)")
    p.add_argument("--images", required=True, help="folder the questions' image paths are relative to")
    j = p.add_argument_group("judge")
    j.add_argument("--judge-model", default="gpt-4o", help="chat model that writes the reviews (default: "
                   "%(default)s; the paper used gpt-4-0314)")
    j.add_argument("--base-url", default=None, help="any OpenAI-compatible server; the key is OPENAI_API_KEY")
    j.add_argument("--workers", type=int, default=4, help="concurrent judge requests (default: %(default)s)")
    j.add_argument("--max-retries", type=int, default=5, help="retries on 429/5xx/timeouts (default: %(default)s)")
    j.add_argument("--timeout", type=float, default=120.0, help="seconds per request attempt (default: %(default)s)")
    add_model_args(p)


def load_questions(args):
    questions = read_jsonl(args.questions, "LLaVA-Bench questions")[:args.limit]
    for k, q in enumerate(questions):
        need(q, ("question_id", "image", "text", "category"), f"{args.questions} line {k + 1}")
    contexts = {}
    for k, c in enumerate(read_jsonl(args.context, "LLaVA-Bench context")):
        contexts[need(c, ("image",), f"{args.context} line {k + 1}")["image"]] = c
    references = {str(need(r, ("question_id", "text"), f"{args.references} line {k + 1}")["question_id"]): r["text"]
                  for k, r in enumerate(read_jsonl(args.references, "LLaVA-Bench reference answers"))}
    for q in questions:
        if q["image"] not in contexts:
            raise EvalError(f"{args.context}: no context for image {q['image']} (question {q['question_id']})")
        if str(q["question_id"]) not in references:
            raise EvalError(f"{args.references}: no reference answer for question {q['question_id']}")
    return questions, contexts, references


def run(args):
    out = out_dir(args, "llava-bench")
    questions, contexts, references = load_questions(args)
    # The client first: a missing key should stop us before the model spends time answering.
    client = make_client(base_url=args.base_url, timeout=args.timeout, max_retries=args.max_retries)
    items = [{"question_id": q["question_id"], "prompt": "<image>\n" + q["text"],
              "image": Path(args.images) / q["image"]} for q in questions]
    answers = answer_questions(items, args, out / "answers.jsonl", desc="llava-bench")

    # One judge request per question. Its key holds a hash of the request, so a changed answer or
    # judge model is judged again instead of reusing a stale review from the journal.
    jobs, key_of = [], {}
    for q in questions:
        qid = str(q["question_id"])
        messages = judge_messages(context_text(contexts[q["image"]]), q["text"], references[qid], answers[qid]["text"])
        digest = hashlib.sha1(json.dumps([args.judge_model, messages]).encode()).hexdigest()[:12]
        key_of[qid] = f"{qid}:{digest}"
        jobs.append({"key": key_of[qid], "messages": messages, "meta": {"question_id": q["question_id"]}})
    report = run_jobs(jobs, str(out / "judge.journal.jsonl"), client,
                      Settings(model=args.judge_model, temperature=0.2, max_tokens=1024, workers=args.workers),
                      desc="judge")
    reviews = {qid: report.results[key]["text"] for qid, key in key_of.items() if key in report.results}

    scores = relative_scores(questions, reviews)
    scored = []
    for q in questions:
        qid = str(q["question_id"])
        review = reviews.get(qid)
        scored.append({"question_id": q["question_id"], "category": q["category"], "answer": answers[qid]["text"],
                       "scores": parse_scores(review) if review is not None else None, "review": review})
    results = {"scores": scores, "judge_retries": report.retries,
               "settings": settings(args, answers, judge_model=args.judge_model, questions=str(args.questions))}
    title = (f"LLaVA-Bench {Path(args.questions).name}: {len(questions)} questions, model {args.model}, "
             f"judge {args.judge_model}")
    write_results(out, results, format_table(scores, title), scored)
    print(f"judge: {report.done} reviews now, {report.skipped} from the journal, {report.retries} retries")
    if report.failed:
        for key, error in sorted(report.failed.items()):
            print(f"judge request {key} failed: {error}", file=sys.stderr)
        print(f"{len(report.failed)} judge requests failed; run the same command again to retry them", file=sys.stderr)
        return 1
    return 0
