"""The graph memory's HTTP API over real loopback sockets: the Gate's h11
server on port 0, a real state store, apps with real keys. Who may see and
change which document: tests/test_memory_access.py."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from memory_corpus import DOCUMENTS

from qmesh.memory.api import add_routes
from qmesh.memory.service import Memory
from qmesh.state import StateStore
from qmesh.web.auth import ADMIN_APP, AppAuthenticator
from qmesh.web.http import Router
from qmesh.web.native import serve_http


@attrs.frozen
class Reply:
    status: int
    body: Any


@attrs.define
class Client:
    port: int
    token: str | None

    async def send(self, raw: bytes, *, limit_s: float = 10) -> Reply:
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        async with stream:
            await stream.send_all(raw)
            received = bytearray()
            with trio.fail_after(limit_s):
                while data := await stream.receive_some(65536):
                    received += data
        head, _, body = bytes(received).partition(b"\r\n\r\n")
        return Reply(int(head.split(b" ", 2)[1]), json.loads(body))

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = "default",
        limit_s: float = 10,
    ) -> Reply:
        data = (
            b""
            if body is None
            else (body if isinstance(body, bytes) else json.dumps(body).encode())
        )
        token = self.token if token == "default" else token
        head = [f"{method} {path} HTTP/1.1", "Host: x", "Connection: close",
                f"Content-Length: {len(data)}"]  # fmt: skip
        if token is not None:
            head.append(f"Authorization: Bearer {token}")
        return await self.send(("\r\n".join(head) + "\r\n\r\n").encode() + data, limit_s=limit_s)


@pytest.fixture
async def api(
    tmp_path: Path, nursery: trio.Nursery
) -> AsyncIterator[tuple[Client, Client, Client]]:
    state = StateStore.open(tmp_path / "state.db")
    tokens = {app: f"{app}:{state.add_app(app)}" for app in ("app-a", "app-b", ADMIN_APP)}
    router = Router()
    add_routes(router, Memory(state, max_document_bytes=20_000), AppAuthenticator(state))
    port: int = await nursery.start(lambda task_status: serve_http(
        router, "127.0.0.1", 0, task_status=task_status))  # fmt: skip
    with state:
        yield (
            Client(port, tokens["app-a"]),
            Client(port, tokens["app-b"]),
            Client(port, tokens[ADMIN_APP]),
        )


async def add_corpus(client: Client) -> None:
    for document_id, (fmt, text) in DOCUMENTS.items():
        reply = await client.call(
            "POST", "/v1/memory/documents", {"id": document_id, "text": text, "format": fmt}
        )
        assert reply.status == 201, reply.body
        assert reply.body["id"] == document_id and reply.body["created"] is True


async def test_documents_are_added_listed_and_read(api: tuple[Client, Client, Client]) -> None:
    a, _, _ = api
    await add_corpus(a)
    listing = await a.call("GET", "/v1/memory/documents")
    assert listing.status == 200
    rows = {d["id"]: d for d in listing.body["documents"]}
    assert set(rows) == set(DOCUMENTS)
    assert rows["acme-wiki"]["title"] == "Acme Corp. – Wiki"
    assert rows["acme-wiki"]["added_by"] == "app-a"
    assert rows["acme-wiki"]["shared"] is False
    assert rows["globex-press"]["chars"] == len(DOCUMENTS["globex-press"][1])
    document = await a.call("GET", "/v1/memory/documents/globex-press")
    assert document.body["text"] == DOCUMENTS["globex-press"][1]
    for sentence in document.body["sentences"]:
        assert document.body["text"][sentence["start"] : sentence["end"]] == sentence["text"]
    fmt, text = DOCUMENTS["curie"]
    again = await a.call("POST", "/v1/memory/documents", {"id": "curie", "text": text,
                                                          "format": fmt})  # fmt: skip
    assert again.status == 200 and again.body["created"] is False
    generated = await a.call("POST", "/v1/memory/documents", {"text": "Initech is in Austin."})
    assert generated.status == 201 and generated.body["id"].startswith("doc-")


async def test_query_returns_cited_facts_and_an_extractive_answer(
    api: tuple[Client, Client, Client],
) -> None:
    a, _, _ = api
    await add_corpus(a)
    reply = await a.call("POST", "/v1/memory/query", {"question": "Who founded Acme?"})
    assert reply.status == 200
    body = reply.body
    assert body["found"] is True
    assert body["entities"] == ["Acme Corporation"]
    texts = {c["n"]: c for c in body["citations"]}
    assert body["answer"] == (f"{texts[1]['text']} [1] {texts[2]['text']} [2]")
    documents = {}
    for citation in body["citations"]:
        document_id = citation["document_id"]
        if document_id not in documents:
            stored = await a.call("GET", f"/v1/memory/documents/{document_id}")
            documents[document_id] = stored.body["text"]
        assert documents[document_id][citation["start"] : citation["end"]] == citation["text"]
    fact = body["facts"][0]
    assert fact["predicate"] == "founded" and fact["object"] == "Acme Corporation"
    assert all({"document_id", "sentence_id", "start", "end", "text"} <= set(c)
               for f in body["facts"] for c in f["citations"])  # fmt: skip
    assert body["conflicts"][0]["predicate"] == "founded"
    limited = await a.call("POST", "/v1/memory/query", {"question": "Acme?", "limit": 2})
    assert len(limited.body["facts"]) == 2
    unsupported = await a.call(
        "POST", "/v1/memory/query", {"question": "What is the capital of Mars?"}
    )
    assert unsupported.status == 200
    assert unsupported.body["found"] is False and unsupported.body["answer"] == "not found"


async def test_delete_is_for_the_owner_or_admin(api: tuple[Client, Client, Client]) -> None:
    a, b, admin = api
    await add_corpus(a)
    # Not shared: for app-b the document does not exist.
    hidden = await b.call("DELETE", "/v1/memory/documents/acme-wiki")
    assert hidden.status == 404
    shared = await a.call("PATCH", "/v1/memory/documents/acme-wiki", {"shared": True})
    assert shared.status == 200 and shared.body["shared"] is True
    # Shared: app-b may read it, never delete it.
    refused = await b.call("DELETE", "/v1/memory/documents/acme-wiki")
    assert refused.status == 403
    assert refused.body["error"]["type"] == "permission_error"
    deleted = await a.call("DELETE", "/v1/memory/documents/acme-wiki")
    assert deleted.status == 200
    assert deleted.body["sentences"] == 5 and deleted.body["relations_kept"] > 0
    assert (await a.call("GET", "/v1/memory/documents/acme-wiki")).status == 404
    assert (await a.call("DELETE", "/v1/memory/documents/acme-wiki")).status == 404
    assert (await admin.call("DELETE", "/v1/memory/documents/curie")).status == 200
    after = await a.call("POST", "/v1/memory/query", {"question": "Who founded Acme?"})
    assert {c["document_id"] for c in after.body["citations"]
            if f"[{c['n']}]" in after.body["answer"]} == {"acme-history"}  # fmt: skip


async def test_bad_requests_get_clear_errors(api: tuple[Client, Client, Client]) -> None:
    a, _, _ = api
    documents = "/v1/memory/documents"
    cases: list[tuple[str, str, Any, int, str]] = [
        ("POST", documents, {"text": ""}, 400, "text is empty"),
        ("POST", documents, {"text": "  \n"}, 400, "text is empty"),
        ("POST", documents, {}, 400, "text is required"),
        ("POST", documents, {"text": 3}, 400, "text must be a string"),
        ("POST", documents, {"text": "Hi.", "format": "pdf"}, 400, "format must be one of"),
        ("POST", documents, {"text": "Hi.", "id": "a/b"}, 400, "document id"),
        ("POST", documents, {"text": "Hi.", "colour": "red"}, 400, "unknown field(s) colour"),
        ("POST", documents, {"text": "Hi.", "replace": "yes"}, 400, "replace must be"),
        ("POST", documents, {"text": "x " * 10_001}, 413, "the limit is 20,000 bytes"),
        ("POST", documents, {"text": "é" * 10_001}, 413, "20,002 bytes; the limit is 20,000"),
        ("POST", documents, b"[" * 200_000, 413, "request body is 200,000 bytes"),
        ("POST", documents, b"[" * 100_000, 400, "nested too deep"),
        # An unterminated string full of escaped quotes: the nesting check
        # once started over at each of them (quadratic, on the event loop).
        ("POST", documents, b'{"text": "' + b'\\"' * 60_000, 400, "Unterminated string"),
        ("POST", documents, {"text": "\ud800 lone"}, 400, "lone surrogate"),
        ("POST", documents, {"text": "Hi.", "shared": "yes"}, 400, "shared must be"),
        ("PATCH", f"{documents}/missing", {"shared": "no"}, 400, "shared must be"),
        ("PATCH", f"{documents}/missing", {}, 400, "shared (true or false) is required"),
        ("PATCH", f"{documents}/missing", {"shared": True}, 404, "no document"),
        ("POST", documents, b"{not json", 400, "not valid JSON"),
        ("POST", documents, [1, 2], 400, "JSON object"),
        ("POST", "/v1/memory/query", {"question": ""}, 400, "non-empty"),
        ("POST", "/v1/memory/query", {"question": "Hi?", "limit": 0}, 400, "limit"),
        ("POST", "/v1/memory/query", {"question": "Hi?", "limit": "3"}, 400, "limit"),
        ("POST", "/v1/memory/query", {"query": "Hi?"}, 400, "unknown field(s) query"),
        ("GET", f"{documents}/missing", None, 404, "no document"),
        ("PUT", f"{documents}/missing", None, 405, "not allowed"),
    ]
    for method, path, body, status, message in cases:
        reply = await a.call(method, path, body)
        assert reply.status == status, (method, path, body, reply.body)
        assert message in reply.body["error"]["message"], reply.body
    await a.call("POST", documents, {"id": "d", "text": "Acme is in Springfield."})
    conflict = await a.call("POST", documents, {"id": "d", "text": "Acme is in Shelbyville."})
    assert conflict.status == 409 and conflict.body["error"]["code"] == "document_exists"
    replaced = await a.call(
        "POST", documents, {"id": "d", "text": "Acme is in Shelbyville.", "replace": True}
    )
    assert replaced.status == 201 and replaced.body["replaced"] is True


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/memory/documents"),
        ("GET", "/v1/memory/documents"),
        ("GET", "/v1/memory/documents/x"),
        ("PATCH", "/v1/memory/documents/x"),
        ("DELETE", "/v1/memory/documents/x"),
        ("POST", "/v1/memory/query"),
    ],
)
async def test_every_endpoint_needs_an_app_key(
    api: tuple[Client, Client, Client], method: str, path: str
) -> None:
    a, _, _ = api
    app, _, key = (a.token or "").partition(":")
    body = {"question": "x"} if path.endswith("query") else {"text": "Hi."}
    for token in (None, f"{app}:wrong-{key}", "nobody:" + key):
        reply = await a.call(method, path, body, token=token)
        assert reply.status == 401, (token, reply.body)
        assert reply.body["error"]["code"] == "invalid_api_key"
