"""gen_data.py against a fake OpenAI-compatible server on 127.0.0.1 (no network, no key, no money)."""
import csv
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gen_data  # noqa: E402
from minillava import fewshot, openai_jobs  # noqa: E402
from minillava.data import load_records, validate_record  # noqa: E402
from minillava.prompts import BRIEF_DESCRIPTION, DETAILED_DESCRIPTION  # noqa: E402

TYPES = ("conversation", "detail", "complex")


def caps_boxes(n):
    return [{"id": f"img{i}", "image": f"coco/img{i}.jpg",
             "captions": [f"A dog and {i} balls on grass.", f"A brown dog plays in a park ({i})."],
             "instances": [{"category": "dog", "bbox": [0.1, 0.2, 0.55555, 0.9]},
                           {"category": "sports ball", "bbox": [0.6, 0.7, 0.65, 0.75]}]} for i in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def good_answer(key):
    """The canned answer for a key (expected_record below is what it must turn into)."""
    image_id, kind = key.split(":")
    if kind == "detail":
        return f"A detailed description of {image_id}."
    text = (f"Question:\nWhat animal is in {image_id}?\n===\nAnswer:\nA dog.\n===\n"
            "Question:\nWhere is it?\n===\nAnswer:\nOn the grass.")
    if kind == "complex":
        text = f"Question:\nWhy is the dog in {image_id} happy?\n===\nAnswer:\nIt is playing.\nStep two."
    return text


class FakeOpenAI:
    """A tiny /v1/chat/completions server. `script(key, attempt)` picks each reply:
    ("ok", text) | ("status", code, retry_after or None) | ("hang",)."""

    def __init__(self, records, script):
        # The server knows every request gen_data may send, so an unexpected one is caught.
        self.keys = {json.dumps(fewshot.build_messages(r, k)): f"{r['id']}:{k}" for r in records for k in TYPES}
        self.script, self.lock, self.release = script, threading.RLock(), threading.Event()
        self.log = []  # (key, status) per request; "hang" for requests never answered
        self.bodies, self.auth = [], []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = outer.keys.get(json.dumps(body["messages"]), "UNKNOWN REQUEST")
                with outer.lock:
                    attempt = sum(1 for k, _ in outer.log if k == key)
                    reply = outer.script(key, attempt) if self.path == "/v1/chat/completions" else ("status", 404, None)
                    outer.bodies.append(body)
                    outer.auth.append(self.headers.get("Authorization"))
                    if reply[0] == "hang":
                        outer.log.append((key, "hang"))
                if reply[0] == "hang":  # never answer: the client is about to be killed
                    outer.release.wait(20)
                    return
                if reply[0] == "status":
                    payload, status = {"error": {"message": f"fake error {reply[1]}", "type": "x"}}, reply[1]
                else:
                    status = 200
                    payload = {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": reply[1]}}],
                               "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if reply[0] == "status" and reply[2] is not None:
                    self.send_header("Retry-After", str(reply[2]))
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()
                with outer.lock:
                    outer.log.append((key, status))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def successes(self):
        with self.lock:
            return Counter(k for k, status in self.log if status == 200)

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def no_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def expected_record(source, kind, seed=0):
    if kind == "detail":
        turns = [(gen_data.detail_prompt(source["id"], seed), f"A detailed description of {source['id']}.")]
    elif kind == "conversation":
        turns = [(f"What animal is in {source['id']}?", "A dog."), ("Where is it?", "On the grass.")]
    else:
        turns = [(f"Why is the dog in {source['id']} happy?", "It is playing.\nStep two.")]
    conv = []
    for i, (q, a) in enumerate(turns):
        conv += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q}, {"from": "gpt", "value": a}]
    return {"id": f"{source['id']}_{kind}", "image": source["image"], "conversations": conv}


# ---------------------------------------------------------------- the request format

def test_request_is_system_then_fewshot_pairs_then_context_with_3_decimal_boxes():
    source = caps_boxes(1)[0]
    for kind in TYPES:
        system, examples = fewshot.load(kind)
        messages = fewshot.build_messages(source, kind)
        assert len(examples) >= 2
        assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * len(examples) + ["user"]
        assert messages[0]["content"] == system
        assert [(u["content"], a["content"]) for u, a in zip(messages[1:-1:2], messages[2:-1:2])] == list(examples)
    captions = "A dog and 0 balls on grass.\nA brown dog plays in a park (0)."
    assert fewshot.build_messages(source, "conversation")[-1]["content"] == captions
    boxes = "dog: [0.100, 0.200, 0.556, 0.900]\nsports ball: [0.600, 0.700, 0.650, 0.750]"
    for kind in ("detail", "complex"):
        assert fewshot.build_messages(source, kind)[-1]["content"] == captions + "\n\n" + boxes


def test_fewshot_examples_follow_their_own_documented_format():
    for kind in ("conversation", "complex"):
        for _, response in fewshot.load(kind)[1]:
            assert fewshot.parse_qa(response)  # the examples teach the format we parse
    for kind in ("detail", "complex"):
        for context, _ in fewshot.load(kind)[1]:
            captions, boxes = context.split("\n\n")
            assert all(": [" in line and line.endswith("]") for line in boxes.splitlines())


def test_parse_qa_takes_whole_answers_or_nothing():
    assert fewshot.parse_qa("Question:\nA?\n===\nAnswer:\nB.\n===\nQuestion:\nC?\n===\nAnswer:\nD.") == \
        [("A?", "B."), ("C?", "D.")]
    for bad in ("Sorry, I cannot help.", "Question:\nA?\n===\nAnswer:\nB.\n===\nQuestion:\nC?",
                "Answer:\nB.\n===\nQuestion:\nA?", "Question:\n\n===\nAnswer:\nB."):
        with pytest.raises(ValueError):
            fewshot.parse_qa(bad)


def test_detail_prompt_is_seeded_per_image_and_from_the_16():
    prompts = [gen_data.detail_prompt(f"img{i}", seed=0) for i in range(50)]
    assert prompts == [gen_data.detail_prompt(f"img{i}", seed=0) for i in range(50)]
    assert set(prompts) <= set(DETAILED_DESCRIPTION) and len(set(prompts)) > 5


# ---------------------------------------------------------------- a run against the fake server

def test_run_survives_429_and_500_reports_failure_and_malformed_then_rerun_finishes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret")
    sources = caps_boxes(3)
    always_fail = {"img2:complex"}

    def script(key, attempt):
        if key == "img0:conversation" and attempt == 0:
            return ("status", 429, 0.1)  # rate limited once, with Retry-After
        if key == "img1:detail" and attempt == 0:
            return ("status", 500, None)  # server error once: the client's own backoff
        if key in always_fail:
            return ("status", 503, 0.1)
        if key == "img2:conversation":
            return ("ok", "Sure! Here are some questions about the image: what is it?")
        return ("ok", good_answer(key))

    server = FakeOpenAI(sources, script)
    inp, out = write_jsonl(tmp_path / "caps.jsonl", sources), tmp_path / "instruct.json"
    argv = ["instruct", "--input", str(inp), "--out", str(out), "--base-url", server.url,
            "--workers", "3", "--max-retries", "2", "--timeout", "5", "--model", "fake-gpt", "--temperature", "0.2"]
    try:
        assert gen_data.main(argv) == 1  # a request failed: non-zero, but everything else is kept
        captured = capsys.readouterr()
        assert "img2:complex" in captured.err and "1 requests failed" in captured.err
        assert "4 retries" in captured.out  # 429 once + 500 once + 2 for the request that failed
        assert "sk-test-secret" not in captured.out + captured.err
        assert set(server.auth) == {"Bearer sk-test-secret"}
        assert all(b["model"] == "fake-gpt" and b["temperature"] == 0.2 for b in server.bodies)

        records = load_records(str(out))  # the training loader reads it unchanged
        done = [(s, k) for s in sources for k in TYPES if f"{s['id']}:{k}" not in always_fail | {"img2:conversation"}]
        assert records == [expected_record(s, k) for s, k in done]
        malformed = [json.loads(l) for l in open(f"{out}.malformed.jsonl")]
        assert [m["key"] for m in malformed] == ["img2:conversation"]
        assert malformed[0]["response"].startswith("Sure! Here are")  # raw text kept for inspection

        # The rerun asks only for the failed request, and the output becomes complete.
        always_fail.clear()
        n_before = len(server.log)
        assert gen_data.main(argv) == 0
        assert [k for k, _ in server.log[n_before:]] == ["img2:complex"]
        records = load_records(str(out))
        assert len(records) == 8 and records[-1] == expected_record(sources[2], "complex")
    finally:
        server.close()


def test_killed_run_resumes_without_repeating_or_losing_a_request(tmp_path, no_key):
    sources, K = caps_boxes(4), 5
    server = FakeOpenAI(sources, lambda key, attempt: ("ok", good_answer(key)))
    inp, out = write_jsonl(tmp_path / "caps.jsonl", sources), tmp_path / "instruct.json"
    cmd = [sys.executable, str(ROOT / "gen_data.py"), "instruct", "--input", str(inp), "--out", str(out),
           "--base-url", server.url, "--workers", "2", "--timeout", "30"]
    journal = Path(f"{out}.journal.jsonl")
    try:
        # After K answers the server stops answering; kill the client while it waits.
        granted = []  # the script runs under the server's lock, so this count is exact

        def answer_k_then_hang(key, attempt):
            granted.append(key)
            return ("ok", good_answer(key)) if len(granted) <= K else ("hang",)
        server.script = answer_k_then_hang
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 20
        while time.time() < deadline:
            hung = sum(1 for _, s in server.log if s == "hang")
            lines = journal.read_text().count("\n") if journal.exists() else 0
            if hung == 2 and lines == K:
                break
            time.sleep(0.05)
        proc.kill()
        proc.communicate()
        assert sum(server.successes().values()) == K and journal.read_text().count("\n") == K
        assert not out.exists()  # it never got to the end

        server.release.set()
        server.script = lambda key, attempt: ("ok", good_answer(key))
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert f"{K} from the journal" in done.stdout
        every_key = {f"{s['id']}:{k}" for s in sources for k in TYPES}
        assert server.successes() == Counter(every_key)  # each answered exactly once, over both runs
        records = load_records(str(out))
        assert records == [expected_record(s, k) for s in sources for k in TYPES]
    finally:
        server.close()


def test_half_written_journal_line_is_dropped_and_its_request_made_again(tmp_path, no_key):
    sources = caps_boxes(1)
    server = FakeOpenAI(sources, lambda key, attempt: ("ok", good_answer(key)))
    jobs = [{"key": f"img0:{k}", "messages": fewshot.build_messages(sources[0], k)} for k in TYPES]
    journal = tmp_path / "j.jsonl"
    journal.write_text(json.dumps({"key": "img0:conversation", "ok": True, "text": "kept", "retries": 0}) + "\n"
                       + '{"key": "img0:detail", "ok": tr')  # killed mid-write
    try:
        client = openai_jobs.make_client(base_url=server.url, timeout=5, max_retries=0)
        report = openai_jobs.run_jobs(jobs, str(journal), client, openai_jobs.Settings(model="m", workers=2))
        assert (report.done, report.skipped, report.failed) == (2, 1, {})
        assert report.results["img0:conversation"]["text"] == "kept"
        assert sorted(k for k, _ in server.log) == ["img0:complex", "img0:detail"]
        lines = [json.loads(l) for l in journal.read_text().splitlines()]  # every line whole again
        assert sorted(e["key"] for e in lines) == sorted(f"img0:{k}" for k in TYPES)
    finally:
        server.close()


def test_dry_run_prints_requests_tokens_and_cost_and_sends_nothing(tmp_path, no_key, capsys):
    inp = write_jsonl(tmp_path / "caps.jsonl", caps_boxes(2))
    assert gen_data.main(["instruct", "--input", str(inp), "--out", str(tmp_path / "o.json"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: 6 requests to gpt-4o" in out and "[system]" in out
    assert sum(line.startswith("  img") for line in out.splitlines()) == 6  # one line per request
    assert "ESTIMATE" in out and "estimated cost: $" in out
    assert not (tmp_path / "o.json").exists()


# ---------------------------------------------------------------- converters and bad input

def test_coco_boxes_become_normalized_corners(tmp_path, no_key):
    images = [{"id": 42, "file_name": "000000000042.jpg", "width": 640, "height": 480},
              {"id": 7, "file_name": "000000000007.jpg", "width": 200, "height": 100},
              {"id": 9, "file_name": "000000000009.jpg", "width": 10, "height": 10}]  # no captions: skipped
    caps = {"images": images, "annotations": [{"id": 1, "image_id": 42, "caption": " A cat. "},
                                              {"id": 2, "image_id": 7, "caption": "A bus."},
                                              {"id": 3, "image_id": 42, "caption": "A cat on a mat."}]}
    inst = {"images": images, "categories": [{"id": 17, "name": "cat"}, {"id": 6, "name": "bus"}],
            "annotations": [{"id": 5, "image_id": 42, "category_id": 17, "bbox": [64, 48, 320, 240]},
                            {"id": 6, "image_id": 7, "category_id": 6, "bbox": [150, 50, 60, 60]}]}
    (tmp_path / "c.json").write_text(json.dumps(caps))
    (tmp_path / "i.json").write_text(json.dumps(inst))
    out = tmp_path / "caps.jsonl"
    assert gen_data.main(["coco", "--captions", str(tmp_path / "c.json"), "--instances", str(tmp_path / "i.json"),
                          "--out", str(out)]) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert rows == [  # sorted by image id; [x, y, w, h] px -> [x1, y1, x2, y2] / size, clipped to 1
        {"id": "000000000007", "image": "000000000007.jpg", "captions": ["A bus."],
         "instances": [{"category": "bus", "bbox": [0.75, 0.5, 1.0, 1.0]}]},  # 210/200, 110/100 clipped
        {"id": "000000000042", "image": "000000000042.jpg", "captions": ["A cat.", "A cat on a mat."],
         "instances": [{"category": "cat", "bbox": [0.1, 0.1, 0.6, 0.6]}]}]  # 64/640, 48/480, 384/640, 288/480
    assert len(gen_data.load_caps_boxes(str(out))) == 2  # and `instruct` accepts it


def test_caption_pairs_become_seeded_valid_stage1_records(tmp_path):
    pairs = tmp_path / "pairs.csv"
    with open(pairs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows([[f"cc/{i}.jpg", f"caption number {i}"] for i in range(40)])
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert gen_data.main(["captions", "--input", str(pairs), "--out", str(tmp_path / f"{name}.json"),
                              "--seed", str(seed)]) == 0
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]
    for i, r in enumerate(runs["a"]):
        validate_record(r, f"record {i}")
        assert r["image"] == f"cc/{i}.jpg" and r["conversations"][1]["value"] == f"caption number {i}"
        assert r["conversations"][0]["value"].split("\n", 1) == ["<image>", r["conversations"][0]["value"][8:]]
        assert r["conversations"][0]["value"][8:] in BRIEF_DESCRIPTION
    assert len({r["conversations"][0]["value"] for r in runs["a"]}) > 5
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", [{"id": "x1", "image": "a.jpg", "caption": "A cat."}])
    assert gen_data.main(["captions", "--input", str(jsonl), "--out", str(tmp_path / "j.json")]) == 0
    assert json.loads((tmp_path / "j.json").read_text())[0]["id"] == "x1"


@pytest.mark.parametrize("name, content, args, expected", [
    ("caps.jsonl", json.dumps(caps_boxes(1)[0]) + "\n" + json.dumps({**caps_boxes(1)[0], "id": "b",
     "instances": [{"category": "dog", "bbox": [0.5, 0.5, 1.2, 0.9]}]}) + "\n",
     ["instruct", "--dry-run"], "caps.jsonl line 2 (id b): instance 0"),
    ("caps.jsonl", "{not json\n", ["instruct", "--dry-run"], "caps.jsonl line 1: not valid JSON"),
    ("pairs.csv", "image,caption\na.jpg,A cat.\nb.jpg,\n", ["captions"], "pairs.csv line 3: needs a non-empty"),
])
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, name, content, args, expected):
    path = tmp_path / name
    path.write_text(content)
    cmd = [sys.executable, str(ROOT / "gen_data.py"), args[0], "--input", str(path), "--out", str(tmp_path / "o")]
    done = subprocess.run(cmd + args[1:], capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert expected in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_no_key_and_no_base_url_is_refused_before_any_request(tmp_path, no_key, capsys):
    inp = write_jsonl(tmp_path / "caps.jsonl", caps_boxes(1))
    assert gen_data.main(["instruct", "--input", str(inp), "--out", str(tmp_path / "o.json")]) == 2
    assert "OPENAI_API_KEY" in capsys.readouterr().err
