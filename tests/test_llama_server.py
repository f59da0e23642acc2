"""The daemon's model server: llama.cpp's API, same answers, no per-token hop.

Real parts only: the Gemma GGUF, the server as the daemon starts it
(``python -m qmesh.daemon.runtimes.model_server PID …``), llama-cpp-python's
own ``llama_cpp.server`` as the reference, and the ``openai`` package as the
client.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from daemonkit import GEMMA_ID, free_port, gemma_path, require_llama
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam
from processkit import stop

START_TIMEOUT_S = 120.0
PROMPT = "The three primary colours are"


def _start(command: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = ["--model", str(gemma_path()), "--model_alias", GEMMA_ID, "--host", "127.0.0.1",
            "--port", str(port), "--n_ctx", "512", "--n_threads", "1",
            "--chat_format", "gemma"]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen([*command, *args], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5):
                return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop(process, timeout=5)
                raise RuntimeError(f"{command} did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.1)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[str, Path]]]:
    """Ours (as the daemon starts it) and llama-cpp-python's, same model and flags."""
    require_llama()
    logs = tmp_path_factory.mktemp("llama-servers")
    ours_command = [sys.executable, "-m", "qmesh.daemon.runtimes.model_server", str(os.getpid())]
    reference_command = [sys.executable, "-m", "llama_cpp.server"]
    started: list[subprocess.Popen[bytes]] = []
    try:
        ours, ours_url = _start(ours_command, logs / "ours.log")
        started.append(ours)
        reference, reference_url = _start(reference_command, logs / "reference.log")
        started.append(reference)
        yield {
            "ours": (ours_url, logs / "ours.log"),
            "reference": (reference_url, logs / "reference.log"),
        }
    finally:
        for process in started:
            stop(process, timeout=15)


def _exchange(host: str, port: int, raw: bytes) -> tuple[int, bytes]:
    """Send ``raw``; the status and body of the answer (read up to its length)."""
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(raw)
        answer = b""
        while b"\r\n\r\n" not in answer and (data := sock.recv(65536)):
            answer += data
        head, _, body = answer.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        while length and len(body) < int(length[1]) and (data := sock.recv(65536)):
            body += data
    return int(head.split(b" ", 2)[1]), body


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_lists_its_model(servers: dict[str, tuple[str, Path]]) -> None:
    url, _ = servers["ours"]
    assert [m.id for m in _client(url).models.list()] == [GEMMA_ID]


def test_streamed_completion_equals_llama_cpp_server(servers: dict[str, tuple[str, Path]]) -> None:
    texts = {}
    for name, (url, _) in servers.items():
        chunks = list(
            _client(url).completions.create(
                model=GEMMA_ID, prompt=PROMPT, max_tokens=24, temperature=0, stream=True
            )
        )
        texts[name] = "".join(c.choices[0].text for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        # One event per token: what the daemon counts and times.
        assert len([c for c in chunks if c.choices and c.choices[0].text]) >= 10
    assert texts["ours"].strip()
    assert texts["ours"] == texts["reference"]


def test_chat_equals_llama_cpp_server(servers: dict[str, tuple[str, Path]]) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name a colour."}]
    answers = {}
    # The same requests in the same order on both: llama.cpp reuses the
    # previous prompt's cache, so only equal histories give equal answers.
    for name, (url, _) in servers.items():
        streamed: openai.Stream[ChatCompletionChunk] = _client(url).chat.completions.create(
            model=GEMMA_ID, messages=messages, max_tokens=12, temperature=0, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        whole = _client(url).chat.completions.create(
            model=GEMMA_ID, messages=messages, max_tokens=12, temperature=0
        )
        assert whole.usage is not None and whole.usage.completion_tokens > 0
        answers[name] = (text, whole.choices[0].message.content)
    assert answers["ours"][0].strip()
    assert answers["ours"] == answers["reference"]


def test_bad_requests_are_refused_and_the_server_serves_on(
    servers: dict[str, tuple[str, Path]],
) -> None:
    url, _ = servers["ours"]
    client = _client(url)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=GEMMA_ID, prompt="x", max_tokens=-5)
    # Refused by llama.cpp itself (logprobs need --logits_all true, which the
    # daemon does not ask for): a status even when streaming was asked for.
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="logits_all"):
            client.completions.create(
                model=GEMMA_ID, prompt="x", max_tokens=2, logprobs=1, stream=stream
            )
    host, port = url.removeprefix("http://").split(":")
    for raw in (
        b"POST /v1/completions HTTP/1.1\r\ncontent-length: 9\r\n\r\n{not json",
        b"POST /v1/completions HTTP/1.1\r\ncontent-length: 999999999999\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00garbage\r\n\r\n",
    ):
        status, body = _exchange(host, int(port), raw)
        assert 400 <= status < 500, (raw[:40], status, body[:200])
        if body:
            assert json.loads(body)["error"]["message"]
    done = client.completions.create(model=GEMMA_ID, prompt=PROMPT, max_tokens=3, temperature=0)
    assert done.choices[0].text


def test_a_client_that_leaves_ends_its_generation(servers: dict[str, tuple[str, Path]]) -> None:
    url, log = servers["ours"]
    client = _client(url)
    stream = client.completions.create(
        model=GEMMA_ID, prompt=PROMPT, max_tokens=400, temperature=0, stream=True
    )
    for _, _ in zip(range(3), stream, strict=False):
        pass
    stream.close()
    # The next request is served only once the abandoned one has ended (one
    # generation at a time), and the server says when it stopped one.
    done = client.completions.create(model=GEMMA_ID, prompt=PROMPT, max_tokens=2, temperature=0)
    assert done.choices[0].text
    stopped = re.findall(r"generation stopped after (\d+) events", log.read_text(errors="replace"))
    assert len(stopped) == 1 and int(stopped[0]) < 50, stopped
