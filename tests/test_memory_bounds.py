"""Memory ingest is linear and bounded, runs on threads of its own, and
never holds up a shutdown.

Before: 200 KB of ``"**a "`` took minutes in the Markdown converter (and a
heading line of spaces, a run of full stops, ``"<a "`` in HTML took as long
or longer), in the worker pool that tunnel handshakes share, without
cancellation, so SIGTERM could not stop the Gate. Here every construct
that was super-linear is converted within a generous bound (a subprocess,
so that a regression fails in bounded time instead of hanging the run); the
memory's threads and cancellation are checked in-process against a real
HTTP server; and a real Gate process, busy with a document, stops on
SIGTERM.
"""

from __future__ import annotations

import json
import math
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
from processkit import free_port, start_role, wait_for
from test_memory_api import Client

from qmesh.memory.api import add_routes
from qmesh.memory.convert import convert
from qmesh.memory.errors import DocumentTooLarge
from qmesh.memory.extract import RuleExtractor
from qmesh.memory.extraction import MAX_RELATIONS, Extraction
from qmesh.memory.mentions import RULE_MENTIONS
from qmesh.memory.records import OPERATOR
from qmesh.memory.service import MAX_SENTENCES, Memory
from qmesh.state import StateStore
from qmesh.web.auth import AppAuthenticator
from qmesh.web.http import Router
from qmesh.web.native import serve_http

# (format, Python expression of about 256 KB): each took minutes or more.
PATHOLOGICAL: tuple[tuple[str, str], ...] = (
    ("markdown", '"**a " * 64_000'),  # the finding: "(.+?)" from every opener
    ("markdown", '"__a " * 64_000'),
    ("markdown", '"*a " * 85_000'),
    ("markdown", '"_a " * 85_000'),
    ("markdown", '"~~a " * 64_000'),
    ("markdown", '"[a " * 85_000'),  # link label to the end
    ("markdown", '"[a](b " * 42_000'),  # link destination to the end
    ("markdown", '"![a](b " * 36_000'),
    ("markdown", '"<a " * 85_000'),  # inline tag to the end
    ("markdown", '"<http:" * 42_000'),  # autolink
    ("markdown", '"`" * 256_000 + "x"'),  # a run of backticks
    ("markdown", '"# a" + " " * 256_000 + "x"'),  # heading: cubic
    ("markdown", '"# a" + "\\t" * 256_000 + "x"'),
    ("markdown", '"---" + " " * 256_000 + "x"'),  # table separator
    ("markdown", '" " * 256_000 + "|x"'),
    ("markdown", '">" * 256_000 + "x"'),  # block quote markers
    ("html", '"<a " * 85_000'),  # the standard library's parser
    ("html", '"<!--" * 64_000'),
    ("html", '"<a x=\\"<a y=\'" * 21_000'),
    ("html", '"</a " * 64_000'),
    ("html", '"<![x[" * 51_000'),  # also raised AssertionError
    ("text", '"." * 256_000 + "x"'),  # sentence ends: a run of marks
    ("text", '"!" * 256_000 + "x"'),
    ("text", '"a. " * 85_000'),  # each candidate end stripped the rest
)
# One case takes well under a second here; before, minutes.
CASE_LIMIT_S = 20.0

_RUNNER = """
import json, sys, time
from qmesh.memory.convert import convert
from qmesh.memory.sentences import split_sentences
for fmt, expression in json.loads(sys.argv[1]):
    source = eval(expression)
    started = time.perf_counter()
    sentences = split_sentences("d", convert(source, fmt).text)
    print(json.dumps([fmt, expression, time.perf_counter() - started, len(sentences)]), flush=True)
"""


def test_pathological_documents_convert_in_linear_time() -> None:
    cases = list(PATHOLOGICAL)
    with subprocess.Popen(
        [sys.executable, "-c", _RUNNER, json.dumps(cases)],
        stdout=subprocess.PIPE,
        text=True,
    ) as runner:
        assert runner.stdout is not None
        done: list[tuple[str, str, float]] = []
        timer = threading.Timer(CASE_LIMIT_S * len(cases), runner.kill)
        timer.start()
        try:
            for line in runner.stdout:
                fmt, expression, seconds, _ = json.loads(line)
                done.append((fmt, expression, seconds))
        finally:
            timer.cancel()
            runner.kill()
    finished = {(fmt, expression) for fmt, expression, _ in done}
    unfinished = [case for case in cases if case not in finished]
    assert not unfinished, f"still converting after the time limit: {unfinished[0]}"
    slow = [case for case in done if case[2] > CASE_LIMIT_S]
    assert not slow, slow


def test_html_that_made_the_parser_raise_is_converted() -> None:
    for source in ("<![x[ a ]]> Acme is in Ohio.", "<p>Acme</p><![if x]><!-- open", "<a <b <c"):
        convert(source, "html")  # no AssertionError from html.parser
    assert convert("<p>a &lt; b</p><p>x < y <z</p>", "html").text == "a < b\n\nx < y <z"
    assert convert("<!DOCTYPE html><p>Hi<!-- not text --> there</p>", "html").text == "Hi there"


def test_extraction_is_bounded_per_sentence() -> None:
    extractor = RuleExtractor()
    numbers = " ".join(str(n) for n in range(400)) + "."
    (extraction,) = extractor.extract([numbers])
    assert len(extraction.mentions) == RULE_MENTIONS
    names = ", ".join(f"Person{n} Smith" for n in range(40))
    listing = f"{names} and Ann Lee founded {names} and Bob Lee."
    (extraction,) = extractor.extract([listing[:999]])
    assert len(extraction.relations) <= MAX_RELATIONS


def test_documents_over_the_limits_are_refused(tmp_path: Path) -> None:
    with StateStore.open(tmp_path / "state.db") as state:
        memory = Memory(state, max_document_bytes=1_000_000)
        with pytest.raises(DocumentTooLarge, match="1,000,001 bytes; the limit is 1,000,000"):
            memory.add("x" * 1_000_001)
        with pytest.raises(DocumentTooLarge, match="1,000,002 bytes"):
            memory.add("é" * 500_001)  # two bytes each
        with pytest.raises(DocumentTooLarge, match=f"more than {MAX_SENTENCES:,} sentences"):
            memory.add("a\n\n" * (MAX_SENTENCES + 1))
        assert memory.documents(access=OPERATOR) == []


class GaveUp(Exception):
    """What a test's checkpoint raises: the caller gave up."""


def give_up_after(calls: int) -> Callable[[], None]:
    count = 0

    def checkpoint() -> None:
        nonlocal count
        count += 1
        if count > calls:
            raise GaveUp

    return checkpoint


def test_work_given_up_at_a_checkpoint_leaves_nothing_behind(state_location: str | Path) -> None:
    """The checkpoints are where a cancelled (abandoned) ingest or delete
    stops: during extraction, during the SQL, during a delete's cascades;
    each time the transaction is rolled back and the store stays usable."""
    with StateStore.open(state_location) as state:
        memory = Memory(state)
        text = "Jane Doe founded Acme Corp in 1998 in Springfield. " * 1500
        # 3: in the extraction (24 batches); 200: in the SQL (a sentence each).
        for calls in (3, 200):
            with pytest.raises(GaveUp):
                memory.add(text, document_id="big", checkpoint=give_up_after(calls))
            assert memory.documents(access=OPERATOR) == []
            assert not any(memory.store.integrity_problems().values())
        memory.add(text, document_id="big")
        with pytest.raises(GaveUp):
            memory.delete("big", access=OPERATOR, checkpoint=give_up_after(2))
        assert [d.sentences for d in memory.documents(access=OPERATOR)] == [1500]
        assert memory.ask("Who founded Acme?", access=OPERATOR).found
        assert memory.delete("big", access=OPERATOR).sentences == 1500
        assert memory.documents(access=OPERATOR) == []
        assert not any(memory.store.integrity_problems().values())


class BlockingExtractor:
    """Rules, after waiting for the test: memory work that is certainly
    in progress while the test looks at it."""

    name = "blocking"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.entered = 0

    def extract(self, sentences: Sequence[str]) -> list[Extraction]:
        with self.lock:
            self.entered += 1
        self.release.wait(timeout=60)  # never forever, even if the test fails
        return RuleExtractor().extract(sentences)


async def until(what: str, check: Callable[[], bool], limit_s: float = 20.0) -> None:
    """Poll ``check()`` (state that no event announces: a limiter's queue, a
    thread's exit) until it is true; AssertionError after ``limit_s``."""
    with trio.move_on_after(limit_s):
        while True:
            if check():
                return
            await trio.sleep(0.01)
    raise AssertionError(f"timed out after {limit_s} s waiting for {what}")


async def test_memory_work_has_its_own_threads_and_is_abandoned_on_cancel(
    tmp_path: Path,
) -> None:
    state = StateStore.open(tmp_path / "state.db")
    token = f"app-a:{state.add_app('app-a')}"
    extractor = BlockingExtractor()
    router = Router()
    memory = Memory(state, extractor)
    limiter = add_routes(router, memory, AppAuthenticator(state))
    assert isinstance(limiter, trio.CapacityLimiter)
    threads = int(limiter.total_tokens)
    default = trio.to_thread.current_default_thread_limiter()
    # More documents at once than the memory has threads, and than Trio's
    # default pool (which tunnel handshakes use) has tokens.
    documents = int(default.total_tokens) + threads + 1

    async def post(client: Client, n: int) -> None:
        try:
            # No client-side limit: the ingest is held until the Gate stops,
            # which on a loaded machine may come later than any fixed wait,
            # and a client that gave up would leave the queue it is counted in.
            await client.call(
                "POST", "/v1/memory/documents", {"id": f"d{n}", "text": "Hi."}, limit_s=math.inf
            )
        except (OSError, IndexError, ValueError, trio.BrokenResourceError):
            pass  # the server went away: it is being shut down

    # If cancellation waited for the ingests, they would end only when this
    # releases them: the shutdown would take this long, not an instant.
    held_up = threading.Timer(10, extractor.release.set)
    try:
        async with trio.open_nursery() as gate:
            port: int = await gate.start(
                lambda task_status: serve_http(router, "127.0.0.1", 0, task_status=task_status)
            )
            client = Client(port, token)
            for n in range(documents):
                gate.start_soon(post, client, n)
            # A thread holds its token before it reaches the extractor: wait
            # for both, or a slow thread start reads as a missing ingest.
            await until(
                "every document to be running or queued on the memory's threads",
                lambda: (
                    limiter.borrowed_tokens == threads
                    and limiter.statistics().tasks_waiting == documents - threads
                    and extractor.entered == threads
                ),
                limit_s=60,
            )
            # Trio's default pool is untouched: a handshake's thread starts.
            assert default.borrowed_tokens == 0
            with trio.fail_after(10):
                assert await trio.to_thread.run_sync(lambda: 42) == 42
            # The Gate stopping, with two ingests in progress.
            held_up.start()
            stopping = time.monotonic()
            gate.cancel_scope.cancel()
        stopped_s = time.monotonic() - stopping
    finally:
        held_up.cancel()
        extractor.release.set()
    assert stopped_s < 5, stopped_s
    # The abandoned threads see the cancellation at their next checkpoint,
    # store nothing and give their threads back.
    await until("the abandoned ingests to end", lambda: limiter.borrowed_tokens == 0)
    assert extractor.entered == threads
    assert memory.documents(access=OPERATOR) == []
    assert not any(memory.store.integrity_problems().values())
    state.close()


# -- a real Gate process ------------------------------------------------------------


def qmesh(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qmesh", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def http(port: int, method: str, path: str, token: str, body: Any, timeout: float) -> int:
    """One request on a fresh connection; the status code."""
    data = json.dumps(body).encode() if body is not None else b""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(head.encode() + data)
        received = bytearray()
        while chunk := conn.recv(65536):
            received += chunk
    return int(received.split(b" ", 2)[1])


def test_sigterm_stops_a_gate_busy_with_memory_work(tmp_path: Path) -> None:
    gate_dir = tmp_path / "gate"
    assert qmesh(gate_dir, "keys", "init").returncode == 0
    added = qmesh(gate_dir, "apps", "add", "app-a")
    assert added.returncode == 0, added.stderr
    token = f"app-a:{added.stdout.strip()}"
    http_port = free_port()
    config = tmp_path / "gate.toml"
    config.write_text(
        f'data_dir = "{gate_dir}"\n'
        f'[gate]\ntunnel_listen = "127.0.0.1:{free_port()}"\n'
        f'http_listen = "127.0.0.1:{http_port}"\n'
        # SIGTERM drains first: the ingest in flight gets this long to finish.
        "drain_timeout_s = 1\n"
        "[gate.memory]\nmax_document_bytes = 8_388_608\n"
    )
    log = tmp_path / "gate.log"
    gate = start_role("gate", config, log)
    try:
        wait_for(
            "the Gate's HTTP API",
            lambda: http(http_port, "GET", "/v1/memory/documents", token, None, 5) == 200,
            timeout=60,
        )
        # The finding's document: answered (before: minutes of work).
        pathological = {"id": "p", "format": "markdown", "text": "**a " * 50_000}
        assert http(http_port, "POST", "/v1/memory/documents", token, pathological, 60) == 201

        # A document that keeps the memory busy for a long while (long
        # sentences full of names), and SIGTERM while it is being worked on.
        sentence = ", ".join(f"Name{n} Person{n}" for n in range(50)) + " met in Ohio. "
        heavy = {"id": "heavy", "text": sentence * (7_000_000 // len(sentence))}

        def post_heavy() -> None:
            try:
                http(http_port, "POST", "/v1/memory/documents", token, heavy, 120)
            except (OSError, IndexError):
                pass  # the Gate went away mid-request, as it should

        poster = threading.Thread(target=post_heavy, daemon=True)
        poster.start()
        wait_for(
            "the Gate to start on the document",
            lambda: "adds a document of 6" in log.read_text(),
            timeout=60,
        )
        started = time.monotonic()
        gate.send_signal(signal.SIGTERM)
        # The promise is the drain (1 s here) and then 5 s; the limit here is
        # generous (a loaded machine) but far below the minutes the work would take.
        code = gate.wait(timeout=20)
        stopped_s = time.monotonic() - started
    finally:
        if gate.poll() is None:
            gate.kill()
            gate.wait()
    text = log.read_text()
    assert code == 0, text
    print(f"stopped {stopped_s:.2f} s after SIGTERM")
    assert stopped_s < 20, stopped_s
    assert "Traceback" not in text, text
