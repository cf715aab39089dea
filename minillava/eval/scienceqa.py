"""ScienceQA (Lu et al. 2022) the way LLaVA-1.5 evaluates it: multiple choice, greedy, one letter.

Input: the public release, a folder with problems.json ({pid: {question, choices, answer (index),
hint, image (file name or null), subject, grade, split, ...}}), pid_splits.json ({"test": [pids]})
and the images as <split>/<pid>/image.png (or images/<split>/<pid>/image.png). The prompts are
rendered from problems.json, or read from LLaVA's converted question file (--questions
llava_test_CQM-A.json: records {id, image, conversations} whose human turn is the prompt).

Prompt formats. The letters are ScienceQA's names for the parts of a prompt: C = context (the
problem's text `hint`, or "N/A"), Q = question, M = the multiple-choice options; in file names
like QCM-LEA, what follows the dash is what the answer holds: L = lecture, E = explanation,
A = answer.
  CQM  "Context: {hint or N/A}\\nQuestion: {q}\\nOptions: (A) {c1} (B) {c2} ..."
       LLaVA-1.5's zero-shot evaluation (llava_test_CQM-A.json). The default.
  QCM  "{q}\\nContext: {hint or N/A}\\nOptions: (A) {c1} (B) {c2} ..."
       the order the LLaVA paper fine-tuned on ScienceQA with (llava_train_QCM-LEA.json); LLaVA's
       converter drops the leading "Question: " label, and so does this one.
Problems with an image get "<image>\\n" in front, and every prompt ends with LLaVA-1.5's
"\\nAnswer with the option's letter from the given choices directly."

Scoring (extract_answer): an answer counts if it is the bare letter ("B"), starts with the
letter, a period and a space ("B. Paris"), or contains exactly one "The answer is B.". Anything
else is wrong: lower case, "B)", two "The answer is" sentences, a letter past the last choice.
Accuracy is over every problem of the split: a problem without an answer counts as wrong.
Columns, as in the official ScienceQA evaluation: NAT / SOC / LAN = subject natural / social /
language science; TXT = has a text context (hint), IMG = has an image (with or without a hint),
NO = has neither; G1-6 / G7-12 = grade; Average = all problems.
"""
import re
from collections import Counter
from pathlib import Path

from .common import (EvalError, add_model_args, answer_questions, markdown_table, need, out_dir, pct,
                     read_json, settings, write_results)

HELP = "ScienceQA multiple choice, scored as in the LLaVA papers"
LETTERS = "ABCDE"                  # ScienceQA problems have 2 to 5 choices
INSTRUCTION = "Answer with the option's letter from the given choices directly."
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
COLUMNS = ["NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Average"]
# A literal period, as documented; the original repo's pattern leaves it unescaped (any character).
ANSWER_IS = re.compile(r"The answer is ([A-Z])\.")


def extract_answer(text, n_choices):
    """The letter a model's answer picks, or None when it picks none of the n_choices clearly."""
    options = list(LETTERS[:n_choices])
    text = text.strip()
    if text in options:                                            # "B"
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":   # "B. Paris"
        return text[0]
    found = ANSWER_IS.findall(text)                                # "... The answer is B."
    if len(found) == 1 and found[0] in options:
        return found[0]
    return None

# ---------------------------------------------------------------- prompts


def render_prompt(problem, prompt_format="CQM"):
    """The question text for the model (with "<image>" if the problem has an image)."""
    context = (problem.get("hint") or "").strip() or "N/A"
    options = " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(problem["choices"]))
    if prompt_format == "CQM":
        text = f"Context: {context}\nQuestion: {problem['question']}\nOptions: {options}\n"
    elif prompt_format == "QCM":
        text = f"Question: {problem['question']}\nContext: {context}\nOptions: {options}\n"
    else:
        raise ValueError(f"prompt format {prompt_format!r}: expected CQM or QCM")
    text = text.replace("  ", " ").strip()            # as ScienceQA's prompt builder does
    text = text.removeprefix("Question: ")            # as LLaVA's converter does
    return finish_prompt(text, bool(problem.get("image")))


def finish_prompt(text, has_image):
    """LLaVA-1.5's eval: the image first, the one-letter instruction last."""
    text = text.replace("<image>", "").strip()
    if not text.endswith(INSTRUCTION):
        text += "\n" + INSTRUCTION
    return "<image>\n" + text if has_image else text


def image_folder(args, problems, pids):
    if args.images:
        return Path(args.images)
    for folder in (Path(args.data) / args.split, Path(args.data) / "images" / args.split):
        if folder.is_dir():
            return folder
    if any(problems[pid].get("image") for pid in pids):
        raise EvalError(f"{args.data}: no image folder {args.split}/ or images/{args.split}/; pass --images")
    return None


def load_items(args):
    """(problems, the pids to score, the items to answer)."""
    problems = read_json(Path(args.data) / "problems.json", "ScienceQA's problems.json")
    splits = read_json(Path(args.data) / "pid_splits.json", "ScienceQA's pid_splits.json")
    if args.split not in splits:
        raise EvalError(f"{args.data}/pid_splits.json: no split {args.split!r} (has {', '.join(splits)})")
    pids = [str(pid) for pid in splits[args.split]][:args.limit]
    for pid in pids:
        if pid not in problems:
            raise EvalError(f"{args.data}/problems.json: no problem {pid} (listed in split {args.split})")
        need(problems[pid], ("question", "choices", "answer", "subject", "grade"), f"problems.json problem {pid}")
    folder = image_folder(args, problems, pids)
    wanted = set(pids)
    items = []
    if args.questions:             # LLaVA's converted file: its human turn is the prompt
        for k, record in enumerate(read_json(args.questions, "LLaVA question file")):
            where = f"{args.questions} record {k}"
            turns = need(record, ("id", "conversations"), where)["conversations"]
            if not turns or not isinstance(turns[0], dict) or "value" not in turns[0]:
                raise EvalError(f"{where}: no human turn to take the prompt from")
            if str(record["id"]) in wanted:
                image = record.get("image")
                if image and folder is None:
                    raise EvalError(f"{where}: has an image but there is no image folder; pass --images")
                items.append({"question_id": str(record["id"]), "image": folder / image if image else None,
                              "prompt": finish_prompt(turns[0]["value"], bool(image))})
    else:
        for pid in pids:
            image = problems[pid].get("image")
            items.append({"question_id": pid, "image": folder / pid / image if image else None,
                          "prompt": render_prompt(problems[pid], args.prompt_format or "CQM")})
    return problems, pids, items

# ---------------------------------------------------------------- scoring


def columns_of(problem):
    """The table columns a problem counts in (official ScienceQA definitions)."""
    if problem["subject"] not in SUBJECTS:
        raise EvalError(f"subject {problem['subject']!r}: expected one of {', '.join(SUBJECTS)}")
    has_text, has_image = bool(problem.get("hint")), bool(problem.get("image"))
    cols = [SUBJECTS[problem["subject"]]]
    cols += ["TXT"] * has_text + ["IMG"] * has_image + ["NO"] * (not has_text and not has_image)
    grade = int(str(problem["grade"]).removeprefix("grade"))
    return cols + ["G1-6" if grade <= 6 else "G7-12", "Average"]


def score_scienceqa(problems, split_pids, answers):
    """answers {pid: model text} -> (results dict, one verdict row per problem). Every pid of the
    split counts: no answer is a wrong answer, and so is one extract_answer cannot read."""
    total, right = Counter(), Counter()
    scored, missing, unreadable = [], 0, 0
    for pid in split_pids:
        problem = problems[pid]
        text = answers.get(pid)
        pred = None if text is None else extract_answer(text, len(problem["choices"]))
        gold = LETTERS[problem["answer"]]
        missing += text is None
        unreadable += text is not None and pred is None
        for col in columns_of(problem):
            total[col] += 1
            right[col] += pred == gold
        scored.append({"question_id": pid, "pred": pred, "gold": gold, "correct": pred == gold, "text": text})
    accuracy = {c: 100 * right[c] / total[c] if total[c] else None for c in COLUMNS}
    return {"accuracy": accuracy, "problems": {c: total[c] for c in COLUMNS},
            "correct": right["Average"], "total": total["Average"], "missing": missing, "unreadable": unreadable,
            "img_only_accuracy": accuracy["IMG"]}, scored


def format_table(results, title):
    acc, n = results["accuracy"], results["problems"]
    table = markdown_table([""] + COLUMNS, [["accuracy"] + [pct(acc[c]) for c in COLUMNS],
                                            ["problems"] + [n[c] for c in COLUMNS]])
    return "\n".join([
        f"## {title}", "", table, "",
        f"IMG-only accuracy: {pct(results['img_only_accuracy'])} over the {n['IMG']} problems with an image "
        "(LLaVA-1.5's 'ScienceQA-IMG'; the same problems as the IMG column).",
        f"{results['correct']} of {results['total']} correct; {results['unreadable']} answers without a readable "
        f"letter and {results['missing']} problems without an answer count as wrong."])

# ---------------------------------------------------------------- command line


def add_arguments(p):
    p.add_argument("--data", required=True, help="ScienceQA folder with problems.json and pid_splits.json")
    p.add_argument("--split", default="test", help="split of pid_splits.json to score (default: %(default)s)")
    p.add_argument("--images", default=None,
                   help="folder of <pid>/image.png (default: <data>/<split> or <data>/images/<split>)")
    p.add_argument("--questions", default=None,
                   help="LLaVA's converted question file (e.g. llava_test_CQM-A.json) to take the prompts from")
    p.add_argument("--prompt-format", default=None, choices=["CQM", "QCM"],
                   help="how prompts are rendered from problems.json: CQM (LLaVA-1.5, the default) or "
                        "QCM (see the description above)")
    add_model_args(p)


def run(args):
    if args.questions and args.prompt_format:
        raise EvalError("--prompt-format renders prompts from problems.json; --questions already holds them")
    out = out_dir(args, "scienceqa")
    problems, pids, items = load_items(args)
    answers = answer_questions(items, args, out / "answers.jsonl", desc="scienceqa")
    results, scored = score_scienceqa(problems, pids, {k: e["text"] for k, e in answers.items()})
    prompts = f"from {args.questions}" if args.questions else f"{args.prompt_format or 'CQM'} format"
    results["settings"] = settings(args, answers, data=str(args.data), split=args.split, prompts=prompts)
    limited = f" (first {len(pids)} only: --limit)" if args.limit else ""
    title = f"ScienceQA {args.split}: {len(pids)} problems{limited}, prompts {prompts}, model {args.model}"
    write_results(out, results, format_table(results, title), scored)
    return 0
