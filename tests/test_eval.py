"""python -m minillava.eval: answer extraction, the three scorers against hand-computed numbers, and
CLI runs on a tiny random model (resume included) and a fake judge server on 127.0.0.1."""
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import sentencepiece as spm
from PIL import Image

import tiny
from minillava.eval.__main__ import main
from minillava.eval.llava_bench import parse_scores, relative_scores
from minillava.eval.scienceqa import extract_answer, render_prompt, finish_prompt, score_scienceqa
from minillava.eval.toy import by_shape_count, score_toy

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: ASSISTANT:",
    "Context: N/A Question: Which of these is a fish? Options: (A) shark (B) whale (C) dolphin",
    "Answer with the option's letter from the given choices directly. The answer is B.",
    "How many shapes are there in the image? What color is the shape in the top left? Where is the red circle?",
    "Answer the question using a single word or phrase. Describe the image in detail. What is the dog doing?",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random llava-hf checkpoint with a SentencePiece tokenizer of the same vocabulary."""
    d = tmp_path_factory.mktemp("tiny")
    (d / "corpus.txt").write_text("\n".join(CORPUS * 20))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "sp"), vocab_size=400, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    folder = tiny.llava_hf_folder(d / "model", tiny.hf_llava(seed=0, vocab_size=400, max_position_embeddings=4096))
    shutil.copy(d / "sp.model", folder / "tokenizer.model")
    return folder


def lines(path):
    return [json.loads(l) for l in path.read_text().splitlines()]

# ---------------------------------------------------------------- ScienceQA


@pytest.mark.parametrize("text, n, expected", [
    ("B", 4, "B"), ("  B\n", 4, "B"),                               # the bare letter
    ("B. A shark is a fish.", 4, "B"),                              # letter, period, space
    ("The answer is C.", 4, "C"), ("A shark has gills. The answer is C. Sharks are fish.", 4, "C"),
    ("The answer is A. The answer is A.", 4, None),                 # two matches: ambiguous
    ("The answer is A. No wait, The answer is B.", 4, None),
    ("b", 4, None), ("b. shark", 4, None), ("the answer is c.", 4, None),   # lower case
    ("B is the fish", 4, None), ("B.", 4, None), ("(B)", 4, None), ("The answer is C", 4, None),
    ("E", 4, None), ("E. none", 4, None), ("The answer is E.", 4, None), ("E", 5, "E"),   # past the choices
    ("", 4, None),
])
def test_extract_answer_follows_llava_rules(text, n, expected):
    assert extract_answer(text, n) == expected


FISH = {"question": "Which of these is a fish?", "choices": ["shark", "whale", "dolphin"], "answer": 0,
        "hint": "Sharks  live in the sea.", "image": "image.png", "subject": "natural science",
        "grade": "grade3", "split": "test"}
SUFFIX = "\nAnswer with the option's letter from the given choices directly."


def test_cqm_and_qcm_prompts_render_as_llava_does():
    assert render_prompt(FISH, "CQM") == ("<image>\nContext: Sharks live in the sea.\nQuestion: Which of these is a "
                                          "fish?\nOptions: (A) shark (B) whale (C) dolphin" + SUFFIX)
    assert render_prompt(FISH, "QCM") == ("<image>\nWhich of these is a fish?\nContext: Sharks live in the sea.\n"
                                          "Options: (A) shark (B) whale (C) dolphin" + SUFFIX)
    bare = {**FISH, "hint": "", "image": None}
    assert render_prompt(bare) == ("Context: N/A\nQuestion: Which of these is a fish?\n"
                                   "Options: (A) shark (B) whale (C) dolphin" + SUFFIX)
    # LLaVA's llava_test_CQM-A.json holds the same text with "\n<image>" after it: same prompt.
    converted = "Context: Sharks live in the sea.\nQuestion: Which of these is a fish?\nOptions: (A) shark (B) whale " \
                "(C) dolphin\n<image>"
    assert finish_prompt(converted, has_image=True) == render_prompt(FISH, "CQM")


def sqa_problems():
    """Seven problems across subjects, contexts and grades; 'p7' is in the train split."""
    def p(subject, hint, image, grade, answer, n=3):
        return {"question": f"Q {subject} {grade}?", "choices": [f"c{i}" for i in range(n)], "answer": answer,
                "hint": hint, "image": image, "subject": subject, "grade": grade, "split": "test"}
    problems = {
        "p1": p("natural science", "", "image.png", "grade2", 0),
        "p2": p("natural science", "a text", None, "grade8", 1),
        "p3": p("social science", "", None, "grade5", 2, n=4),
        "p4": p("language science", "a text", "image.png", "grade10", 0),
        "p5": p("social science", "", "image.png", "grade7", 1),
        "p6": p("language science", "", None, "grade1", 1),
        "p7": {**p("natural science", "", None, "grade1", 0), "split": "train"},
    }
    return problems, {"test": ["p1", "p2", "p3", "p4", "p5", "p6"], "train": ["p7"]}


def test_scienceqa_scores_from_answers_match_the_hand_computed_table():
    problems, splits = sqa_problems()
    answers = {"p1": "A", "p2": "A", "p3": "The answer is C.", "p4": "B. c1", "p6": "b", "p7": "A"}  # p5 missing
    results, scored = score_scienceqa(problems, splits["test"], answers)
    # right: p1 (NAT IMG G1-6), p3 (SOC NO G1-6); wrong: p2 (NAT TXT G7-12), p4 (LAN TXT IMG G7-12),
    # p5 missing (SOC IMG G7-12), p6 unreadable "b" (LAN NO G1-6).
    assert results["problems"] == {"NAT": 2, "SOC": 2, "LAN": 2, "TXT": 2, "IMG": 3, "NO": 2, "G1-6": 3,
                                   "G7-12": 3, "Average": 6}
    acc = {k: round(v, 2) for k, v in results["accuracy"].items()}
    assert acc == {"NAT": 50.0, "SOC": 50.0, "LAN": 0.0, "TXT": 0.0, "IMG": 33.33, "NO": 50.0, "G1-6": 66.67,
                   "G7-12": 0.0, "Average": 33.33}
    assert (results["correct"], results["total"], results["missing"], results["unreadable"]) == (2, 6, 1, 1)
    assert round(results["img_only_accuracy"], 2) == 33.33
    assert [(r["question_id"], r["pred"], r["gold"], r["correct"]) for r in scored] == [
        ("p1", "A", "A", True), ("p2", "A", "B", False), ("p3", "C", "C", True), ("p4", "B", "A", False),
        ("p5", None, "B", False), ("p6", None, "B", False)]


def write_scienceqa(root):
    problems, splits = sqa_problems()
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps(splits))
    for pid, prob in problems.items():
        if prob["image"]:
            (root / prob["split"] / pid).mkdir(parents=True)
            Image.new("RGB", (40, 30), (200, 30, 30)).save(root / prob["split"] / pid / "image.png")
    return problems


def test_scienceqa_cli_writes_answers_and_table_and_resumes(tmp_path, model_dir, capsys):
    write_scienceqa(tmp_path)
    out = tmp_path / "out"
    argv = ["scienceqa", "--data", str(tmp_path), "--model", str(model_dir), "--out", str(out),
            "--batch-size", "4", "--max-new-tokens", "3", "--device", "cpu"]
    assert main(argv + ["--limit", "2"]) == 0                       # a quick look first
    assert sorted(a["question_id"] for a in lines(out / "answers.jsonl")) == ["p1", "p2"]
    assert "first 2 only" in (out / "table.md").read_text()
    capsys.readouterr()

    assert main(argv) == 0                                          # resumes: answers only the other 4
    first = lines(out / "answers.jsonl")
    assert sorted(a["question_id"] for a in first) == ["p1", "p2", "p3", "p4", "p5", "p6"]
    assert "2 of 6 questions already answered" in capsys.readouterr().out
    a = {x["question_id"]: x for x in first}
    assert a["p1"]["prompt"].startswith("<image>\nContext: N/A\nQuestion:") and a["p2"]["image"] is None
    assert a["p1"]["conv_mode"] == "vicuna_v1"

    before = (out / "answers.jsonl").read_text()
    assert main(argv) == 0                                          # nothing new: the model is not even loaded
    printed = capsys.readouterr().out
    assert "6 of 6 questions already answered" in printed and "conv mode" not in printed
    assert (out / "answers.jsonl").read_text() == before
    results = json.loads((out / "results.json").read_text())
    assert results["total"] == 6 and results["settings"]["prompts"] == "CQM format"
    table = (out / "table.md").read_text()
    assert "| NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 | Average |" in table and "IMG-only" in table
    assert len(lines(out / "scored.jsonl")) == 6

    # The same --out with the other prompt format would mix two experiments: refused, in one line.
    assert main(argv + ["--prompt-format", "QCM"]) == 2
    err = capsys.readouterr().err
    assert "answered with another prompt" in err and len(err.strip().splitlines()) == 1


def test_scienceqa_bad_input_is_one_line(tmp_path, capsys):
    assert main(["scienceqa", "--data", str(tmp_path), "--model", "m", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "problems.json: no such file" in err and len(err.strip().splitlines()) == 1

# ---------------------------------------------------------------- LLaVA-Bench


def test_parse_scores_reads_two_numbers_on_the_first_line_only():
    assert parse_scores("8 6\nAssistant 1 is better.") == (8.0, 6.0)
    assert parse_scores("9, 7.5") == (9.0, 7.5)
    for bad in ("Assistant 1: 8, Assistant 2: 6", "8", "8 6 7", "I cannot rate this.\n8 6", ""):
        assert parse_scores(bad) is None


class FakeJudge:
    """/v1/chat/completions answering by the question in the request: script(question, attempt)
    -> ("ok", review) or ("status", code)."""

    def __init__(self, script):
        self.script, self.log, self.users, self.lock = script, [], {}, threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = body["messages"][-1]["content"]
                question = user.split("[Question]\n")[1].split("\n\n[Assistant 1]")[0]
                with outer.lock:
                    attempt = sum(q == question for q, _ in outer.log)
                    reply = outer.script(question, attempt)
                    outer.log.append((question, reply[0]))
                    outer.users[question] = user
                if reply[0] == "status":
                    status, payload = reply[1], {"error": {"message": "slow down", "type": "x"}}
                else:
                    status = 200
                    payload = {"id": "r", "object": "chat.completion", "created": 0, "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": reply[1]}}],
                               "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "0.1")
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


BENCH = [  # (question_id, category, question, the judge's review)
    (0, "conv", "What is the dog doing?", "8 6\nAssistant 2 misses the ball."),
    (1, "conv", "Where is the ball?", "9, 7.5\nBoth fine."),
    (2, "detail", "Describe the image in detail.", "I cannot compare these answers."),   # unreadable
    (3, "detail", "What colors are present?", "10 5\nAssistant 2 is vague."),           # 429 first
    (4, "complex", "Why might the dog be happy?", "6 6\nEqually good."),
]
# By hand: conversation (6 + 7.5) / (8 + 9) = 79.4; detail 5 / 10 = 50.0 (one unreadable, left out);
# complex 6 / 6 = 100.0; all (6 + 7.5 + 5 + 6) / (8 + 9 + 10 + 6) = 24.5 / 33 = 74.2.
EXPECTED = {"conversation": 79.4, "detail": 50.0, "complex": 100.0, "all": 74.2}


def test_llava_bench_against_fake_judge_gives_hand_computed_relative_scores(tmp_path, model_dir, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (50, 40), (30, 120, 30)).save(tmp_path / "images" / "dog.jpg")
    write = lambda name, rows: (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    write("questions.jsonl", [{"question_id": i, "image": "dog.jpg", "text": q, "category": c} for i, c, q, _ in BENCH])
    write("context.jsonl", [{"image": "dog.jpg", "caption": "A dog plays with a red ball on green grass."}])
    write("answers_gpt4.jsonl", [{"question_id": i, "text": f"Reference answer {i}."} for i, *_ in BENCH])
    reviews = {q: r for _, _, q, r in BENCH}
    judge = FakeJudge(lambda q, attempt: ("status", 429) if q == BENCH[3][2] and attempt == 0 else ("ok", reviews[q]))
    out = tmp_path / "out"
    argv = ["llava-bench", "--questions", str(tmp_path / "questions.jsonl"), "--context", str(tmp_path / "context.jsonl"),
            "--references", str(tmp_path / "answers_gpt4.jsonl"), "--images", str(tmp_path / "images"),
            "--model", str(model_dir), "--out", str(out), "--base-url", judge.url, "--judge-model", "fake-judge",
            "--max-retries", "2", "--timeout", "10", "--max-new-tokens", "4", "--device", "cpu"]
    try:
        assert main(argv) == 0
        results = json.loads((out / "results.json").read_text())
        scores = results["scores"]
        assert {k: round(v["relative"], 1) for k, v in scores.items()} == EXPECTED
        assert [scores[k]["unreadable"] for k in EXPECTED] == [0, 1, 0, 1]
        assert scores["detail"]["judged"] == 1 and results["judge_retries"] == 1
        assert len(judge.log) == 6                                   # 5 reviews + the 429
        table = (out / "table.md").read_text()
        assert "| conversation | 2 | 2 | 0 | 0 | 8.50 | 6.75 | 79.4 |" in table
        assert "| all | 5 | 4 | 1 | 0 | 8.25 | 6.12 | 74.2 |" in table
        # What the judge read: the context, the reference as Assistant 1, the model's answer as Assistant 2.
        answer0 = next(a for a in lines(out / "answers.jsonl") if a["question_id"] == 0)
        assert answer0["prompt"] == "<image>\nWhat is the dog doing?"
        assert judge.users["What is the dog doing?"].startswith(
            "[Context]\nA dog plays with a red ball on green grass.\n\n[Question]\nWhat is the dog doing?\n\n"
            f"[Assistant 1]\nReference answer 0.\n\n[End of Assistant 1]\n\n[Assistant 2]\n{answer0['text']}\n\n"
            "[End of Assistant 2]\n\n[System]\n")
        assert [r["scores"] for r in lines(out / "scored.jsonl")][:3] == [[8.0, 6.0], [9.0, 7.5], None]

        assert main(argv) == 0                                       # rerun: every review from the journal
        assert len(judge.log) == 6 and "5 from the journal" in capsys.readouterr().out
    finally:
        judge.close()


def test_relative_scores_count_failed_requests_apart():
    qs = [{"question_id": i, "category": c} for i, c, _, _ in BENCH]
    scores = relative_scores(qs, {"0": "8 6", "1": "4 4"})           # 2, 3, 4: requests failed
    assert scores["conversation"]["relative"] == pytest.approx(100 * 10 / 12)
    assert scores["detail"]["relative"] is None and scores["all"]["failed"] == 3

# ---------------------------------------------------------------- toy bench


def test_toy_scores_per_category_exact_and_normalized():
    questions = [{"question_id": i, "category": c, "answer": a} for i, (c, a) in enumerate([
        ("count", "3"), ("count", "2"), ("color", "red"), ("color", "blue"),
        ("position", "top left"), ("relation", "yes")])]
    answers = {"0": "3", "1": "Two.", "2": "Red", "3": "green", "4": "The top-left"}  # 5: no answer
    scores, scored = score_toy(questions, answers)
    assert {k: (v["questions"], round(v["exact"], 1), round(v["normalized"], 1)) for k, v in scores.items()} == {
        "count": (2, 50.0, 100.0), "color": (2, 0.0, 50.0), "position": (1, 0.0, 100.0),
        "relation": (1, 0.0, 0.0), "all": (6, 16.7, 66.7)}
    assert list(scores) == ["count", "color", "position", "relation", "all"]    # the bench's order
    assert [r["normalized"] for r in scored] == [True, True, True, False, True, False]


def test_toy_scores_split_by_the_number_of_shapes():
    rows = [{"category": "color", "shapes": n, "normalized": ok} for n, ok in
            [(1, True), (1, True), (2, True), (2, False), (3, False)]] + [{"category": "count", "shapes": None,
                                                                            "normalized": True}]
    assert by_shape_count(rows) == {"color": {1: 100.0, 2: 50.0, 3: 0.0}}


def test_toy_cli_on_tiny_model_and_world_batching_leaves_answers_unchanged(tmp_path, model_dir):
    from minillava.toy import build_world
    build_world(tmp_path / "toy", n_train=4, n_test=4, progress=False)
    n = len(lines(tmp_path / "toy" / "bench.jsonl"))
    out = tmp_path / "out"
    assert main(["toy", "--model", str(model_dir), "--data", str(tmp_path / "toy"), "--out", str(out),
                 "--max-new-tokens", "3", "--batch-size", "8", "--device", "cpu"]) == 0
    assert len(lines(out / "answers.jsonl")) == n and len(lines(out / "scored.jsonl")) == n
    table = (out / "table.md").read_text()
    assert "| category | questions | exact | normalized |" in table
    for category in ("count", "color", "shape", "position", "all"):
        assert f"| {category} |" in table
    results = json.loads((out / "results.json").read_text())
    assert results["scores"]["all"]["questions"] == n
    boxes = [json.loads(l) for l in (tmp_path / "toy" / "caps_boxes_test.jsonl").read_text().splitlines()]
    assert {n for per in results["by_shape_count"].values() for n in per} == {str(len(r["instances"])) for r in boxes}
    assert "Normalized accuracy by the number of shapes in the image:" in table
    # Left-padded batches of 8 give the answers of one question at a time (greedy, fp32).
    assert main(["toy", "--model", str(model_dir), "--data", str(tmp_path / "toy"), "--out", str(tmp_path / "one"),
                 "--max-new-tokens", "3", "--batch-size", "1", "--device", "cpu", "--limit", "8"]) == 0
    batched = {a["question_id"]: a["text"] for a in lines(out / "answers.jsonl")}
    assert {a["question_id"]: a["text"] for a in lines(tmp_path / "one" / "answers.jsonl")} == \
        {k: batched[k] for k in range(8)}
