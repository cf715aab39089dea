"""Download a model folder from the Hugging Face hub over plain HTTPS.

Two hub URLs are all we need (the same ones `huggingface_hub` uses under the hood):
  {endpoint}/api/models/{repo}/revision/{rev}   JSON listing, `siblings: [{rfilename}]`
  {endpoint}/{repo}/resolve/{rev}/{file}        the file (big ones redirect to a CDN)
A HEAD on the resolve URL, without following the redirect, carries the file's size
(X-Linked-Size) and, for LFS files, its sha256 as the ETag (X-Linked-Etag).

Each file streams into `<name>.incomplete`, resumes with an HTTP Range request after a
dropped connection or a restart, is checked (size, sha256) and only then renamed to
`<name>`: a file under its final name is always complete.
"""

import argparse
import fnmatch
import hashlib
import os
import re
import sys
import time
from urllib.parse import quote, urljoin

import requests
from tqdm import tqdm

DEFAULT_ENDPOINT = "https://huggingface.co"
TIMEOUT = (10, 60)  # (connect, read) seconds: a stalled connection fails instead of hanging forever
RETRIES = 5  # dropped connections per file before giving up; each retry resumes where it stopped
CHUNK = 1 << 16  # 64 KiB reads: a dropped connection loses at most one unwritten piece
# Weights minillava never reads: copies for other frameworks, always skipped by default ...
OTHER_FRAMEWORKS = ["*.msgpack*", "*.h5", "*.ot", "*.onnx*", "*.tflite", "*.gguf"]
# ... and pickled PyTorch copies, skipped when the repo also has the same tensors as safetensors.
PICKLED = ["*.bin", "*.bin.index.json", "*.pt", "*.pth"]
SHA256 = re.compile(r"[0-9a-f]{64}")  # LFS ETags are sha256; small git files get a 40-hex sha1


class DownloadError(Exception):
    """A problem the user can fix; main() prints it as one line, without a traceback."""


class Retry(Exception):
    """The transfer stopped early; the next attempt resumes from what is on disk."""


def check(r, repo, rev, endpoint, name=None):
    """Turn the hub's HTTP errors into one sentence that says what to do."""
    if r.status_code < 400:
        return
    code = r.headers.get("X-Error-Code", "")  # the hub says which thing is missing
    page = f"{endpoint}/{repo}"
    if r.headers.get("X-Error-Message") == "Invalid credentials in Authorization header":
        raise DownloadError(f"the hub rejected HF_TOKEN: make a new token at {endpoint}/settings/tokens")
    if code == "RevisionNotFound":
        raise DownloadError(f"revision {rev!r} does not exist in {repo}")
    if code == "EntryNotFound" or (r.status_code == 404 and name):
        raise DownloadError(f"file {name!r} does not exist in {repo} at revision {rev!r}")
    if code == "RepoNotFound":  # the hub answers 401 for unknown repos too, so private is possible
        raise DownloadError(f"repo {repo} not found on {endpoint}: check the name (if it is private, set HF_TOKEN)")
    if r.status_code in (401, 403):
        hint = "your HF_TOKEN has no access yet" if os.environ.get("HF_TOKEN") else "set HF_TOKEN to an access token"
        raise DownloadError(f"{repo} is gated or private: accept its licence at {page} while logged in, "
                            f"then {hint} (create one at {endpoint}/settings/tokens)")
    if r.status_code == 404:
        raise DownloadError(f"repo {repo} or revision {rev!r} does not exist on {endpoint}")
    if r.status_code in (429, 500, 502, 503, 504):
        raise Retry(f"HTTP {r.status_code}")  # busy or flaky server: worth another try
    raise DownloadError(f"HTTP {r.status_code} from {endpoint} for {name or repo}")


def list_files(session, repo, rev, endpoint):
    r = session.get(f"{endpoint}/api/models/{repo}/revision/{quote(rev, safe='')}", timeout=TIMEOUT)
    check(r, repo, rev, endpoint)
    try:
        return [s["rfilename"] for s in r.json()["siblings"]]
    except (ValueError, KeyError, TypeError):
        raise DownloadError(f"{endpoint} did not answer like a Hugging Face hub (no file list for {repo})") from None


def select(names, include):
    """Files matching any --include glob; with none given, everything minillava may use."""
    if include:
        return [n for n in names if any(fnmatch.fnmatch(n, p) for p in include)]
    skip = list(OTHER_FRAMEWORKS)
    if any(n.endswith(".safetensors") for n in names):
        skip += PICKLED  # the same tensors twice: safetensors loads faster and runs no pickle code
    return [n for n in names if not any(fnmatch.fnmatch(n, p) for p in skip)]


def head(session, url):
    """HEAD the resolve URL. The size and hash headers sit on the hub's redirect to the CDN, so we
    stop there; only a same-host redirect without them (a renamed repo) is followed."""
    for _ in range(5):
        r = session.head(url, allow_redirects=False, timeout=TIMEOUT)
        location = r.headers.get("Location", "")
        if not r.is_redirect or "X-Linked-Size" in r.headers or not location.startswith("/"):
            return r
        url = urljoin(url, location)
    return r


def stream(session, url, part, size, name, repo, rev, endpoint):
    """One GET into `part`: asks only for the missing bytes when part of the file is on disk."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    if size is not None and have == size:
        return  # a previous run got every byte; only the checks are left
    if size is not None and have > size:
        have = 0  # longer than the file: not ours, start over
    headers = {"Range": f"bytes={have}-"} if have else {}
    with session.get(url, headers=headers, stream=True, timeout=TIMEOUT) as r:
        if r.status_code == 416:  # the range does not fit the file: start from zero next try
            os.remove(part)
            raise Retry("range not satisfiable")
        check(r, repo, rev, endpoint, name)
        if r.status_code == 206 and not r.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            raise DownloadError(f"{name}: the server resumed at the wrong byte offset")
        if r.status_code != 206:
            have = 0  # 200: no Range asked, or the server ignored it and sends the whole file
        with open(part, "ab" if have else "wb") as f, \
                tqdm(desc=name, total=size, initial=have, unit="B", unit_scale=True) as bar:
            for chunk in r.iter_content(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
            got = f.tell()
    if size is not None and got < size:  # the server closed the connection early
        raise Retry(f"got {got} of {size} bytes")


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def fetch(session, repo, rev, endpoint, name, out_dir):
    """Download one file; returns (downloaded, its size in bytes)."""
    if name.startswith("/") or ".." in name.split("/"):
        raise DownloadError(f"refusing a file name that leaves the folder: {name!r}")
    url = f"{endpoint}/{repo}/resolve/{quote(rev, safe='')}/{quote(name)}"
    path = os.path.join(out_dir, *name.split("/"))
    r = head(session, url)
    check(r, repo, rev, endpoint, name)
    size = r.headers.get("X-Linked-Size") or (None if r.is_redirect else r.headers.get("Content-Length"))
    size = int(size) if size else None
    etag = (r.headers.get("X-Linked-Etag") or r.headers.get("ETag") or "").removeprefix("W/").strip('"')
    if os.path.isfile(path) and (size is None or os.path.getsize(path) == size):
        print(f"{name}: already here, skipped")
        return False, os.path.getsize(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    part = path + ".incomplete"
    for attempt in range(RETRIES + 1):
        try:
            stream(session, url, part, size, name, repo, rev, endpoint)
            break
        except (Retry, requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError):
            if attempt == RETRIES:
                raise DownloadError(f"{name}: the connection to {endpoint} kept dropping; "
                                    f"run the same command again to resume") from None
            time.sleep(min(attempt, 5))  # first retry at once, then back off a little
    got = os.path.getsize(part)
    if size is not None and got != size:
        os.remove(part)
        raise DownloadError(f"{name}: got {got} bytes, the hub says {size}; removed it, run again")
    if SHA256.fullmatch(etag) and sha256_of(part) != etag:
        os.remove(part)  # resuming corrupt bytes would never help
        raise DownloadError(f"{name}: sha256 differs from the hub's (corrupted transfer); removed it, run again")
    os.replace(part, path)  # atomic: the final name only ever holds a checked file
    return True, got


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m minillava.download",
        description="Download a model folder from the Hugging Face hub (plain HTTPS, resumable, "
                    "size and sha256 checked).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""\
without --include: every file except weights minillava never reads (Flax, TF, ONNX, ...),
and the pickled *.bin copy when the repo also has *.safetensors.

LLaVA-1.5-7B ready to run, and the two parts it is trained from (sizes approximate):
  python -m minillava.download llava-hf/llava-1.5-7b-hf          # ~14 GB, the whole LLaVA model
  python -m minillava.download openai/clip-vit-large-patch14-336 # ~1.7 GB, vision encoder
  python -m minillava.download lmsys/vicuna-7b-v1.5              # ~13.5 GB, language model
or pick files yourself:
  python -m minillava.download llava-hf/llava-1.5-7b-hf --include "*.json" "*.safetensors" tokenizer.model
  python -m minillava.download lmsys/vicuna-7b-v1.5 --include "*.json"   # configs only, a quick look

gated or private repos (LLaMA-2): accept the licence on the model's web page, then
  export HF_TOKEN=hf_...   (from https://huggingface.co/settings/tokens)
an interrupted download resumes when you run the same command again.""")
    p.add_argument("repo_id", help="owner/name on the hub, e.g. lmsys/vicuna-7b-v1.5")
    p.add_argument("--include", nargs="+", metavar="GLOB",
                   help='fnmatch patterns of files to fetch, e.g. "*.json" "*.safetensors" tokenizer.model')
    p.add_argument("--dir", help="where to put the files (default: checkpoints/<owner>--<name>)")
    p.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    p.add_argument("--endpoint", default=os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT),
                   help="hub address, for a mirror (default: $HF_ENDPOINT or %(default)s)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    repo, rev, endpoint = args.repo_id.strip("/"), args.revision, args.endpoint.rstrip("/")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo):
        print(f"error: {repo!r} is not a repo id: write owner/name, e.g. lmsys/vicuna-7b-v1.5", file=sys.stderr)
        return 2
    out_dir = args.dir or os.path.join("checkpoints", repo.replace("/", "--"))
    session = requests.Session()
    session.headers["User-Agent"] = "minillava-download"
    session.headers["Accept-Encoding"] = "identity"  # no gzip: the bytes we count are the file's bytes
    if os.environ.get("HF_TOKEN"):  # requests drops this header when redirected to another host (the CDN)
        session.headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    try:
        names = select(list_files(session, repo, rev, endpoint), args.include)
        if not names:
            raise DownloadError(f"no file in {repo} matches {args.include or 'the default selection'}")
        print(f"{repo} @ {rev}: {len(names)} files -> {out_dir}")
        results = [fetch(session, repo, rev, endpoint, name, out_dir) for name in names]
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (requests.ConnectionError, requests.Timeout) as e:  # before any file started streaming
        print(f"error: cannot reach {endpoint} ({type(e).__name__}): check the network, "
              f"or --endpoint / HF_ENDPOINT", file=sys.stderr)
        return 1
    except Retry as e:  # a 5xx or 429 outside a file transfer
        print(f"error: {endpoint} is not answering properly ({e}): try again later", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return 130
    fetched = sum(done for done, _ in results)
    total = sum(size for _, size in results)
    print(f"done: {len(results)} files, {tqdm.format_sizeof(total, 'B')} in {out_dir} "
          f"({fetched} downloaded, {len(results) - fetched} already here)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
