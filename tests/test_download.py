"""The downloader against a fake hub on 127.0.0.1 (offline, about a second).

The fake hub serves the two URLs the real one does: the API file list and the resolve
URL, which answers big "LFS" files with a redirect to a CDN path carrying X-Linked-Size
and X-Linked-Etag (the sha256), and small files directly with a git-sha1 ETag.
Switches on the fake make it gated, drop a connection halfway, or send corrupted bytes.
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

from minillava import download

ROOT = Path(__file__).resolve().parents[1]
REPO = "acme/tiny-llava"
WEIGHTS = os.urandom(300_000)  # big enough that half of it is a real partial file
FILES = {
    "config.json": b'{"model_type": "llava"}',
    "tokenizer.model": os.urandom(5_000),
    "model.safetensors": WEIGHTS,
    "pytorch_model.bin": os.urandom(1_000),  # the pickled duplicate the default skips
    "flax_model.msgpack": os.urandom(1_000),
}
LFS = {"model.safetensors", "pytorch_model.bin", "flax_model.msgpack", "tokenizer.model"}
TOKEN = "hf_secret_test_token"


class FakeHub:
    def __init__(self):
        self.gated = False  # resolve URLs answer 401 unless the right token is sent
        self.break_once = set()  # files whose next CDN transfer stops halfway
        self.break_always = set()
        self.corrupt = set()  # files served with one byte flipped
        self.ignore_range = False  # answer a Range request with the whole file (200)
        self.log = []  # (method, path, Range header, Authorization header)


def make_handler(hub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output quiet
            pass

        def do_HEAD(self):
            self.route(body=False)

        def do_GET(self):
            self.route(body=True)

        def reply(self, status, headers=(), body=b""):
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

        def route(self, body):
            path = unquote(self.path)
            hub.log.append((self.command, path, self.headers.get("Range"), self.headers.get("Authorization")))
            parts = path.strip("/").split("/")
            if path.startswith("/api/models/"):  # /api/models/{owner}/{name}/revision/{rev}
                if "/".join(parts[2:4]) != REPO:
                    return self.reply(404)
                if parts[5] != "main":
                    return self.reply(404, [("X-Error-Code", "RevisionNotFound")])
                listing = {"id": REPO, "siblings": [{"rfilename": n} for n in FILES]}
                return self.reply(200, [("Content-Type", "application/json")], json.dumps(listing).encode())
            if parts[0] == "cdn":
                return self.serve_bytes("/".join(parts[3:]))
            # /{owner}/{name}/resolve/{rev}/{file}
            name = "/".join(parts[4:])
            if "/".join(parts[:2]) != REPO:
                return self.reply(404, [("X-Error-Code", "RepoNotFound")])
            if hub.gated and self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self.reply(401, [("X-Error-Code", "GatedRepo")])
            if name not in FILES:
                return self.reply(404, [("X-Error-Code", "EntryNotFound")])
            data = FILES[name]
            if name in LFS:  # the hub redirects to the CDN and puts size and sha256 on the redirect
                sha = hashlib.sha256(data).hexdigest()
                return self.reply(302, [("Location", f"/cdn/{REPO}/{name}"), ("X-Linked-Size", str(len(data))),
                                        ("X-Linked-Etag", f'"{sha}"'), ("ETag", f'"{sha}"')])
            self.send_response(200)  # small git file: served directly, ETag is a 40-hex git sha1
            self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def serve_bytes(self, name):
            data = FILES[name]
            if name in hub.corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            start, status = 0, 200
            asked = self.headers.get("Range")
            if asked and not hub.ignore_range:
                start, status = int(asked.removeprefix("bytes=").rstrip("-")), 206
            self.send_response(status)
            self.send_header("Content-Length", str(len(data) - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if self.command != "GET":
                return
            if name in hub.break_once or name in hub.break_always:
                hub.break_once.discard(name)
                self.wfile.write(data[start:start + (len(data) - start) // 2])
                self.close_connection = True  # the socket closes with the body half sent
                return
            self.wfile.write(data[start:])

    return Handler


@pytest.fixture
def hub():
    fake = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(fake))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    fake.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)


def run(hub, tmp_path, *extra):
    return download.main([REPO, "--endpoint", hub.endpoint, "--dir", str(tmp_path), *extra])


def cdn_gets(hub, name):
    return [rng for method, path, rng, _ in hub.log if method == "GET" and path == f"/cdn/{REPO}/{name}"]


def leftovers(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


# ---------------------------------------------------------------- normal downloads

def test_include_patterns_fetch_exactly_the_matching_files_byte_for_byte(hub, tmp_path, capsys):
    assert run(hub, tmp_path, "--include", "*.json", "*.safetensors", "tokenizer.model") == 0
    assert leftovers(tmp_path) == ["config.json", "model.safetensors", "tokenizer.model"]
    for name in leftovers(tmp_path):
        assert (tmp_path / name).read_bytes() == FILES[name]
    assert "3 files" in capsys.readouterr().out  # the summary


def test_default_selection_prefers_safetensors_and_skips_other_frameworks():
    names = ["config.json", "model.safetensors", "model.safetensors.index.json",
             "pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack"]
    assert download.select(names, None) == ["config.json", "model.safetensors", "model.safetensors.index.json"]
    # no safetensors in the repo (e.g. an older checkpoint): the .bin weights are what there is
    assert download.select(["config.json", "pytorch_model.bin", "tf_model.h5"], None) == \
        ["config.json", "pytorch_model.bin"]


def test_second_run_skips_files_already_present_and_hf_endpoint_is_honoured(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    assert download.main([REPO, "--dir", str(tmp_path)]) == 0
    assert leftovers(tmp_path) == ["config.json", "model.safetensors", "tokenizer.model"]
    hub.log.clear()
    assert download.main([REPO, "--dir", str(tmp_path)]) == 0
    assert [m for m, *_ in hub.log].count("GET") == 1  # only the file list, no file bodies
    assert "3 already here" in capsys.readouterr().out


# ---------------------------------------------------------------- resume

def test_connection_dropped_mid_file_resumes_with_range_and_is_byte_identical(hub, tmp_path):
    hub.break_once.add("model.safetensors")
    assert run(hub, tmp_path, "--include", "model.safetensors") == 0
    first, second = cdn_gets(hub, "model.safetensors")
    assert first is None
    # asks only for the rest (what is on disk: the half sent, less at most one unwritten chunk)
    assert second.startswith("bytes=") and 0 < int(second[6:-1]) <= len(WEIGHTS) // 2
    assert (tmp_path / "model.safetensors").read_bytes() == WEIGHTS
    assert leftovers(tmp_path) == ["model.safetensors"]


@pytest.mark.parametrize("ignore_range", [False, True])
def test_restart_continues_an_incomplete_file(hub, tmp_path, ignore_range):
    # a previous run died after 1000 bytes; a server that ignores Range (200) means start over
    hub.ignore_range = ignore_range
    (tmp_path / "model.safetensors.incomplete").write_bytes(WEIGHTS[:1000])
    assert run(hub, tmp_path, "--include", "model.safetensors") == 0
    assert cdn_gets(hub, "model.safetensors") == ["bytes=1000-"]
    assert (tmp_path / "model.safetensors").read_bytes() == WEIGHTS
    assert leftovers(tmp_path) == ["model.safetensors"]


def test_connection_that_keeps_dropping_fails_and_keeps_only_the_incomplete_file(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(download, "RETRIES", 1)  # two tries, no back-off sleep
    hub.break_always.add("model.safetensors")
    assert run(hub, tmp_path, "--include", "model.safetensors") == 1
    assert "run the same command again" in capsys.readouterr().err
    assert leftovers(tmp_path) == ["model.safetensors.incomplete"]  # never under the final name


# ---------------------------------------------------------------- errors

def test_gated_repo_says_to_set_hf_token_and_works_with_it(hub, tmp_path, monkeypatch, capsys):
    hub.gated = True
    assert run(hub, tmp_path, "--include", "*.json") == 1
    err = capsys.readouterr().err
    assert "gated" in err and "HF_TOKEN" in err and "licence" in err
    assert leftovers(tmp_path) == []
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert run(hub, tmp_path, "--include", "*.json", "*.safetensors") == 0
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err  # never printed
    assert (tmp_path / "model.safetensors").read_bytes() == WEIGHTS


def test_missing_repo_revision_and_file_each_say_what_does_not_exist(hub, tmp_path, capsys):
    assert download.main(["acme/nope", "--endpoint", hub.endpoint, "--dir", str(tmp_path)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert run(hub, tmp_path, "--revision", "v9") == 1
    assert "revision 'v9' does not exist" in capsys.readouterr().err
    assert run(hub, tmp_path, "--include", "*.gguf") == 1
    assert "no file" in capsys.readouterr().err
    assert leftovers(tmp_path) == []


def test_command_line_error_is_one_line_without_traceback(hub, tmp_path):
    cmd = [sys.executable, "-m", "minillava.download", "acme/nope", "--endpoint", hub.endpoint,
           "--dir", str(tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "does not exist" in p.stderr


def test_corrupted_transfer_is_rejected_and_removed(hub, tmp_path, capsys):
    hub.corrupt.add("model.safetensors")
    assert run(hub, tmp_path, "--include", "model.safetensors") == 1
    assert "sha256" in capsys.readouterr().err
    assert leftovers(tmp_path) == []


def test_unreachable_endpoint_is_named_in_the_error(tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert download.main([REPO, "--endpoint", endpoint, "--dir", str(tmp_path)]) == 1
    assert f"cannot reach {endpoint}" in capsys.readouterr().err
