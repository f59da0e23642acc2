"""The graph memory's HTTP endpoints on the Gate.

``POST /v1/memory/documents``, ``GET /v1/memory/documents``,
``GET /v1/memory/documents/{id}``, ``PATCH /v1/memory/documents/{id}``,
``DELETE /v1/memory/documents/{id}`` and ``POST /v1/memory/query``; every
one needs an app key (``Authorization: Bearer APP_ID:APP_KEY``).

Memory belongs to apps. An app sees (lists, reads, queries) the documents it
added and those their owners shared (``"shared": true``), and changes
(replaces, shares, deletes) only its own; ``admin`` sees and changes every
document. A document another app has not shared does not exist for the
caller (404, and no fact of it in an answer), except that its id is taken
(409).

For: translating JSON to :class:`~qmesh.memory.service.Memory` calls and its
exceptions to HTTP statuses (400 bad input, 404 unknown document, 403 not
the owner, 409 id taken, 413 too large).

It is a boundary: the body is another party's bytes. Its size is checked
before it is parsed (413), and it is parsed with bounded nesting
(:func:`qmesh.peerjson.loads`). The work (conversion, extraction, SQL) runs
in worker threads on a :class:`trio.CapacityLimiter` of the memory's own
(``[gate.memory] threads``), never Trio's default one that tunnel
handshakes and other blocking work share, so no number of large documents
can starve them; and with ``abandon_on_cancel``, so that cancellation (a
client that hangs up, the Gate stopping on SIGTERM) is never held up by an
ingest. The abandoned work sees the cancellation at its next checkpoint
(:func:`trio.from_thread.check_cancelled`), rolls back and stops.

With a model service (``mesh``, the Gate's :class:`~qmesh.llm.service.LlmService`),
``"extractor": "llm"`` on a document adds a model's checked triples
(:class:`~qmesh.memory.llm.LlmExtractor`) and ``"compose": "llm"`` on a
query has a model compose the answer, verified sentence by sentence
(:func:`~qmesh.memory.llm.compose_answer`). Both are routed in-process
through the capability router by the DSNs of ``[gate.memory]``, charged to
the calling app.

Not for: ``qg://task=memory_query`` (``LlmService.attach_memory`` answers it).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, Final, Protocol, TypeVar

import trio

from qmesh import peerjson
from qmesh.config import MEMORY_EXTRACTORS, MemoryConfig
from qmesh.memory.errors import (
    DocumentConflict,
    DocumentNotFound,
    DocumentTooLarge,
    GraphMemoryError,
    InvalidDocument,
    InvalidQuestion,
    NotDocumentOwner,
)
from qmesh.memory.extraction import Extractor
from qmesh.memory.llm import LlmExtractor, compose_answer
from qmesh.memory.records import Access, Checkpoint, DocumentInfo, IngestReport
from qmesh.memory.service import Memory
from qmesh.web.auth import ADMIN_APP, AppAuthenticator
from qmesh.web.http import HttpError, Request, Response, Router

__all__ = ["add_routes", "document_body_limit"]

log = logging.getLogger(__name__)

_DOCUMENT_FIELDS: Final = frozenset(
    {"id", "title", "text", "format", "replace", "extractor", "shared"}
)
_SHARE_FIELDS: Final = frozenset({"shared"})
_QUERY_FIELDS: Final = frozenset({"question", "limit", "compose"})
_COMPOSERS: Final = ("extractive", "llm")
_SMALL_BODY_BYTES: Final = 64 * 1024
"""Bodies other than a document's: a question is at most 2,000 characters."""
# JSON may spell one byte of text as six ("\u0001"), and the other fields
# (id, title, flags) need a little room besides.
_JSON_EXPANSION: Final = 6
_FIELDS_ROOM: Final = 64 * 1024

T = TypeVar("T")


class Mesh(Protocol):
    """The Gate's model service, as the memory uses it."""

    async def complete_text(self, app: str, dsn_text: str, system: str, user: str) -> str: ...


def document_body_limit(max_document_bytes: int) -> int:
    """The largest ``POST /v1/memory/documents`` body that can hold a
    document of ``max_document_bytes``; a larger one is refused unread."""
    return _JSON_EXPANSION * max_document_bytes + _FIELDS_ROOM


def _status(error: GraphMemoryError) -> HttpError:
    if isinstance(error, DocumentTooLarge):
        return HttpError(413, str(error), code="document_too_large")
    if isinstance(error, InvalidDocument | InvalidQuestion):
        return HttpError(400, str(error))
    if isinstance(error, DocumentNotFound):
        return HttpError(404, str(error), code="not_found")
    if isinstance(error, NotDocumentOwner):
        return HttpError(403, str(error), kind="permission_error")
    if isinstance(error, DocumentConflict):
        return HttpError(409, str(error), code="document_exists")
    # ProvenanceError: an extractor bug, never the caller's fault.
    return HttpError(500, "the memory could not store this document", kind="server_error")


def _object(request: Request, allowed: frozenset[str], max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object with only ``allowed`` keys: 413 over
    ``max_bytes`` (before parsing), 400 for anything else wrong with it."""
    if len(request.body) > max_bytes:
        raise HttpError(
            413,
            f"request body is {len(request.body):,} bytes; the limit here is {max_bytes:,}",
            code="document_too_large" if "text" in allowed else None,
        )
    try:
        body = peerjson.loads(request.body, max_bytes=max_bytes, what="request body")
    except peerjson.PeerJsonError as exc:
        raise HttpError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HttpError(400, "request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise HttpError(
            400,
            f"unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(allowed))}",
        )
    return body


def _flag(body: dict[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise HttpError(400, f"{key} must be true or false")
    return value


def _document_view(info: DocumentInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "title": info.title,
        "format": info.format,
        "chars": info.chars,
        "sentences": info.sentences,
        "sha256": info.sha256,
        "added_by": info.added_by,
        "shared": info.shared,
        "extractor": info.extractor,
        "created_at": info.created_at,
    }


def _choice(body: dict[str, Any], key: str, choices: tuple[str, ...], default: str) -> str:
    value = body.get(key, default)
    if value not in choices:
        raise HttpError(400, f"{key} must be one of {', '.join(choices)}; got {value!r}")
    return str(value)


def add_routes(
    router: Router,
    memory: Memory,
    auth: AppAuthenticator,
    *,
    mesh: Mesh | None = None,
    config: MemoryConfig | None = None,
) -> trio.CapacityLimiter:
    """Add the memory's routes to ``router``; the limiter that its blocking
    work runs on is returned (for metrics and tests). ``config``'s
    ``max_document_bytes``, if given, becomes ``memory``'s limit."""
    settings = config or MemoryConfig()
    if config is not None:
        # The configured limit is the memory's: the API and the work agree.
        memory.max_document_bytes = config.max_document_bytes
    body_limit = document_body_limit(memory.max_document_bytes)
    # The memory's own worker threads: Trio's default limiter is shared by
    # tunnel handshakes, vault reads and every other to_thread call, and a
    # few large documents must not take all of its tokens.
    limiter = trio.CapacityLimiter(settings.threads)

    async def run(work: Callable[[Checkpoint], T]) -> T:
        """``work(checkpoint)`` in a memory worker thread; abandoned (and told
        so at its next checkpoint) if this task is cancelled."""
        try:
            return await trio.to_thread.run_sync(
                work, trio.from_thread.check_cancelled, limiter=limiter, abandon_on_cancel=True
            )
        except GraphMemoryError as error:
            raise _status(error) from None

    async def caller(request: Request) -> tuple[str, Access]:
        app_id = await auth.require(request)
        access = Access(app_id, everything=True) if app_id == ADMIN_APP else Access.of_app(app_id)
        return app_id, access

    def blocking_complete(app_id: str, dsn: str) -> Callable[[str, str], str]:
        """A model call for code in a worker thread: back into the event loop."""
        assert mesh is not None

        def complete(system: str, user: str) -> str:
            return trio.from_thread.run(mesh.complete_text, app_id, dsn, system, user)

        return complete

    def need_mesh(what: str) -> Mesh:
        if mesh is None:
            raise HttpError(
                503, f"{what} needs the Gate's model service", kind="server_error", code="no_llm"
            )
        return mesh

    async def add_document(request: Request) -> Response:
        app_id, access = await caller(request)
        body = _object(request, _DOCUMENT_FIELDS, body_limit)
        if "text" not in body:
            raise HttpError(400, "text is required")
        replace = _flag(body, "replace") or False
        shared = _flag(body, "shared")
        choice = _choice(body, "extractor", MEMORY_EXTRACTORS, settings.extractor)
        llm_extractor: LlmExtractor | None = None
        extractor: Extractor | None = None
        if choice == "llm":
            need_mesh('"extractor": "llm"')
            llm_extractor = LlmExtractor(blocking_complete(app_id, settings.extract_dsn))
            extractor = llm_extractor
        text = body["text"]
        if isinstance(text, str):
            log.info(
                "memory: app %s adds a document of %d characters (format %s)",
                app_id,
                len(text),
                body.get("format", "text"),
            )
        document_format = body.get("format", "text")
        document_id, title = body.get("id"), body.get("title")

        def add(checkpoint: Checkpoint) -> IngestReport:
            return memory.add(
                text,
                format=document_format,
                document_id=document_id,
                title=title,
                added_by=app_id,
                shared=shared,
                replace=replace,
                extractor=extractor,
                access=access,
                checkpoint=checkpoint,
            )

        report = await run(add)
        out: dict[str, Any] = {
            "id": report.document_id,
            "created": report.created,
            "replaced": report.replaced,
            "sentences": report.sentences,
            "mentions": report.mentions,
            "relations": report.relations,
            "extractor": (extractor or memory.extractor).name,
        }
        if llm_extractor is not None:
            out["llm"] = llm_extractor.stats.to_json()
        return Response.json(out, status=201 if report.created else 200)

    async def list_documents(request: Request) -> Response:
        _, access = await caller(request)
        documents = await run(lambda _: memory.documents(access=access))
        return Response.json({"documents": [_document_view(d) for d in documents]})

    async def get_document(request: Request) -> Response:
        _, access = await caller(request)
        document_id = request.path_params["id"]
        info, text, sentences = await run(lambda _: memory.document(document_id, access=access))
        view = _document_view(info)
        view["text"] = text
        view["sentences"] = [
            {"id": s.id, "start": s.start, "end": s.end, "text": s.text} for s in sentences
        ]
        return Response.json(view)

    async def share_document(request: Request) -> Response:
        _, access = await caller(request)
        body = _object(request, _SHARE_FIELDS, _SMALL_BODY_BYTES)
        shared = _flag(body, "shared")
        if shared is None:
            raise HttpError(400, "shared (true or false) is required")
        document_id = request.path_params["id"]

        def share(_: Checkpoint) -> DocumentInfo:
            memory.share(document_id, shared, access=access)
            return memory.document(document_id, access=access)[0]

        return Response.json(_document_view(await run(share)))

    async def delete_document(request: Request) -> Response:
        _, access = await caller(request)
        document_id = request.path_params["id"]
        report = await run(
            lambda checkpoint: memory.delete(document_id, access=access, checkpoint=checkpoint)
        )
        return Response.json(
            {
                "id": report.document_id,
                "deleted": True,
                "sentences": report.sentences,
                "entities_removed": report.entities_removed,
                "entities_kept": report.entities_kept,
                "relations_removed": report.relations_removed,
                "relations_kept": report.relations_kept,
            }
        )

    async def query(request: Request) -> Response:
        app_id, access = await caller(request)
        body = _object(request, _QUERY_FIELDS, _SMALL_BODY_BYTES)
        compose = _choice(body, "compose", _COMPOSERS, "extractive")
        if compose == "llm":
            need_mesh('"compose": "llm"')
        question, limit = body.get("question"), body.get("limit")
        answer = await run(lambda _: memory.ask(question, limit, access=access))
        out = answer.to_json()
        out["composed_by"] = "extractive"
        if compose == "llm":
            complete = blocking_complete(app_id, settings.compose_dsn)
            stored = functools.partial(memory.stored_sentences, access=access)
            composed = await run(lambda _: compose_answer(answer, complete, stored))
            out["answer"] = composed.answer
            out["composed_by"] = composed.composed_by
            if composed.verified is not None:
                out["dropped"] = [
                    {"text": s.text, "reason": s.reason} for s in composed.verified.dropped
                ]
            if composed.error is not None:
                out["compose_error"] = composed.error
        return Response.json(out)

    router.add("POST", "/v1/memory/documents", add_document)
    router.add("GET", "/v1/memory/documents", list_documents)
    router.add("GET", "/v1/memory/documents/{id}", get_document)
    router.add("PATCH", "/v1/memory/documents/{id}", share_document)
    router.add("DELETE", "/v1/memory/documents/{id}", delete_document)
    router.add("POST", "/v1/memory/query", query)
    return limiter
