"""Run many chat-completion requests as a resumable batch job.

Used by gen_data.py (the paper's GPT-4 instruction data, section 3) and meant to be
reused by any script that asks an OpenAI-compatible server many questions (e.g. a
GPT-4 judge). The whole API:

    client = make_client(base_url=None, timeout=60, max_retries=5)
    report = run_jobs(jobs, "out.journal.jsonl", client, Settings(model="gpt-4o", workers=8))
    report.results["000123:detail"]["text"]   # every answer, from this run and earlier ones

A job is {"key": unique str, "messages": [chat messages], "meta": optional JSON-able dict}.
Each answer is appended to the journal (JSONL, flushed and fsynced) the moment it
arrives, so a killed run loses nothing it has paid for, and a rerun skips every key
already answered. Retries with backoff (429, 5xx, timeouts, honouring Retry-After)
are the `openai` client's own: we only configure max_retries and timeout.
"""
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from tqdm import tqdm

# Used when --base-url points at a local server that wants no key: the openai
# client refuses to start without one, and a real key must never go to a stranger.
PLACEHOLDER_KEY = "no-key-needed"


class JobsError(RuntimeError):
    """A problem the user must fix (no API key, a damaged journal); the message says which."""


@dataclass
class Settings:
    model: str
    temperature: float = 0.2
    max_tokens: int = 1024  # caps each answer; an answer cut here is reported, not trusted
    workers: int = 4  # concurrent requests (threads: the work is waiting on the network)


@dataclass
class Report:
    results: dict  # key -> journal entry, for every key answered (this run or before)
    done: int = 0  # answered in this run
    skipped: int = 0  # already in the journal, not requested again
    failed: dict = field(default_factory=dict)  # key -> one-line error, after all retries
    retries: int = 0  # HTTP retries the client made (rate limits, 5xx, timeouts)
    tokens: int = 0  # prompt + completion tokens the server reported for this run


def estimate_tokens(text):
    """A rough token count: about 4 characters per token for English with GPT tokenizers.

    No tokenizer package is allowed here, so every number built on this is an estimate.
    """
    return (len(text) + 3) // 4


def make_client(base_url=None, timeout=60.0, max_retries=5):
    """An `openai.OpenAI` client whose key comes from OPENAI_API_KEY only (never a flag, never logged)."""
    import openai  # imported here so --dry-run and the converters work without a key or a server

    key = os.environ.get("OPENAI_API_KEY")
    if not key:
        if base_url is None:
            raise JobsError("set OPENAI_API_KEY (or pass --base-url for a local server that needs no key)")
        key = PLACEHOLDER_KEY
    return openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=max_retries)


def read_journal(path):
    """Every successful answer in the journal, as {key: entry}. A missing journal is empty."""
    return _read_journal(path)[0]


def _read_journal(path):
    # Returns (answers, bytes of complete lines). Only the last line can be half-written
    # (the process was killed mid-write): it is ignored and its request simply made again.
    # Damage anywhere else is an error, since guessing could lose or repeat answers.
    results, good = {}, 0
    if not os.path.exists(path):
        return results, good
    with open(path, "rb") as f:
        *lines, tail = f.read().split(b"\n")  # `tail` is what follows the last newline
    for n, line in enumerate(lines, 1):
        try:
            entry = json.loads(line) if line.strip() else {}
        except ValueError:
            raise JobsError(f"{path} line {n}: not valid JSON; the journal is damaged") from None
        if entry.get("ok"):
            results[entry["key"]] = entry
        good += len(line) + 1
    if tail.strip():
        print(f"warning: {path} line {len(lines) + 1}: ignoring a half-written line", file=sys.stderr)
    return results, good


def _retries_of(err):
    # The client tells the server how many retries preceded each attempt in this
    # header, so the last attempt's request says how many were made before giving up.
    request = getattr(err, "request", None)
    try:
        return int(request.headers.get("x-stainless-retry-count", 0)) if request is not None else 0
    except ValueError:
        return 0


def _request(client, job, settings):
    """One chat completion -> a journal entry ({"ok": True, "text": ...} or {"ok": False, "error": ...})."""
    import openai

    entry = {"key": job["key"], "meta": job.get("meta")}
    try:
        # with_raw_response gives the parsed answer plus how many retries it took.
        raw = client.chat.completions.with_raw_response.create(
            model=settings.model, messages=job["messages"],
            temperature=settings.temperature, max_tokens=settings.max_tokens)
        completion = raw.parse()
    except openai.APIError as err:
        status = getattr(err, "status_code", None)
        message = " ".join(str(err).split())[:300]  # one line, short: it goes to the log
        return {**entry, "ok": False, "retries": _retries_of(err),
                "error": f"HTTP {status}: {message}" if status else f"{type(err).__name__}: {message}"}
    if not completion.choices:
        return {**entry, "ok": False, "retries": raw.retries_taken, "error": "the server returned no choices"}
    choice = completion.choices[0]
    usage = completion.usage
    return {**entry, "ok": True, "text": choice.message.content or "",
            "finish_reason": choice.finish_reason, "model": completion.model,
            "usage": {"prompt_tokens": getattr(usage, "prompt_tokens", 0) or 0,
                      "completion_tokens": getattr(usage, "completion_tokens", 0) or 0},
            "retries": raw.retries_taken}


def run_jobs(jobs, journal_path, client, settings, desc="requests"):
    """Answer every job not yet in the journal with `settings.workers` threads; returns a Report.

    Failed requests are not journaled as answers, so running the same jobs again retries
    exactly those. Only this (main) thread writes the journal, so no lock is needed.
    """
    keys = [job["key"] for job in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError("run_jobs: job keys must be unique")
    results, good_bytes = _read_journal(journal_path)
    report = Report(results=results)
    pending = [job for job in jobs if job["key"] not in report.results]
    report.skipped = len(jobs) - len(pending)
    if not pending:
        return report

    if os.path.exists(journal_path):
        os.truncate(journal_path, good_bytes)  # drop a half-written last line, if any
    with open(journal_path, "a", encoding="utf-8") as journal, \
            tqdm(total=len(pending), desc=desc, unit="req", file=sys.stderr) as bar:

        def record(entry):
            journal.write(json.dumps(entry, ensure_ascii=False) + "\n")
            journal.flush()
            os.fsync(journal.fileno())  # on disk before we count it: a crash loses nothing paid for
            report.retries += entry["retries"]
            if entry["ok"]:
                report.results[entry["key"]] = entry
                report.done += 1
                report.tokens += sum(entry["usage"].values())
            else:
                report.failed[entry["key"]] = entry["error"]
            bar.set_postfix(done=report.done, failed=len(report.failed), retried=report.retries,
                            tokens=report.tokens, refresh=False)
            bar.update(1)

        pool = ThreadPoolExecutor(max_workers=max(1, settings.workers))
        futures = [pool.submit(_request, client, job, settings) for job in pending]
        finished = set()
        try:
            for future in as_completed(futures):
                record(future.result())
                finished.add(future)
        except KeyboardInterrupt:
            # Stop starting new requests, but keep the answers already on their way:
            # they are paid for. Killing the process instead loses only those.
            for future in futures:
                future.cancel()
            in_flight = [f for f in futures if not f.cancelled() and f not in finished]
            print(f"\ninterrupted: waiting for the {len(in_flight)} requests in flight to keep their answers",
                  file=sys.stderr)
            for future in as_completed(in_flight):
                record(future.result())
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
    return report

