"""The graph memory's HTTP endpoints on the Gate.

``POST /v1/memory/documents``, ``GET /v1/memory/documents``,
``GET /v1/memory/documents/{id}``, ``DELETE /v1/memory/documents/{id}`` and
``POST /v1/memory/query``; every one needs an app key
(``Authorization: Bearer APP_ID:APP_KEY``). The memory is one graph per Gate
that every app may read and add to; a document can be deleted only by the
app that added it, or by ``admin``.

For: translating JSON to :class:`~qmesh.memory.service.Memory` calls and its
exceptions to HTTP statuses (400 bad input, 404 unknown document, 403 not
the owner, 409 id taken, 413 too large). The work (conversion, extraction,
SQL) runs in a worker thread so the event loop keeps serving.

With a model service (``mesh``, the Gate's :class:`~qmesh.gate.llm.LlmService`),
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
from collections.abc import Callable
from typing import Any, Final, Protocol, TypeVar

import trio

from qmesh.config import MEMORY_EXTRACTORS, MemoryConfig
from qmesh.gate.auth import ADMIN_APP, AppAuthenticator
from qmesh.memory.errors import (
    DocumentConflict,
    DocumentNotFound,
    DocumentTooLarge,
    GraphMemoryError,
    InvalidDocument,
    InvalidQuestion,
    NotDocumentOwner,
)
from qmesh.memory.extract import Extractor
from qmesh.memory.llm import LlmExtractor, compose_answer
from qmesh.memory.service import Memory
from qmesh.memory.store import DocumentInfo
from qmesh.web.http import HttpError, Request, Response, Router

__all__ = ["add_routes"]

_DOCUMENT_FIELDS: Final = frozenset({"id", "title", "text", "format", "replace", "extractor"})
_QUERY_FIELDS: Final = frozenset({"question", "limit", "compose"})
_COMPOSERS: Final = ("extractive", "llm")

T = TypeVar("T")


class Mesh(Protocol):
    """The Gate's model service, as the memory uses it."""

    async def complete_text(self, app: str, dsn_text: str, system: str, user: str) -> str: ...


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


async def _run(fn: Callable[[], T]) -> T:
    try:
        return await trio.to_thread.run_sync(fn)
    except GraphMemoryError as error:
        raise _status(error) from None


def _object(request: Request, allowed: frozenset[str]) -> dict[str, Any]:
    body = request.json()
    if not isinstance(body, dict):
        raise HttpError(400, "request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise HttpError(
            400,
            f"unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(allowed))}",
        )
    return body


def _document_view(info: DocumentInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "title": info.title,
        "format": info.format,
        "chars": info.chars,
        "sentences": info.sentences,
        "sha256": info.sha256,
        "added_by": info.added_by,
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
) -> None:
    settings = config or MemoryConfig()

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
        app_id = await auth.require(request)
        body = _object(request, _DOCUMENT_FIELDS)
        if "text" not in body:
            raise HttpError(400, "text is required")
        replace = body.get("replace", False)
        if not isinstance(replace, bool):
            raise HttpError(400, "replace must be true or false")
        choice = _choice(body, "extractor", MEMORY_EXTRACTORS, settings.extractor)
        llm_extractor: LlmExtractor | None = None
        extractor: Extractor | None = None
        if choice == "llm":
            need_mesh('"extractor": "llm"')
            llm_extractor = LlmExtractor(blocking_complete(app_id, settings.extract_dsn))
            extractor = llm_extractor
        report = await _run(
            functools.partial(
                memory.add,
                body["text"],
                format=body.get("format", "text"),
                document_id=body.get("id"),
                title=body.get("title"),
                added_by=app_id,
                replace=replace,
                extractor=extractor,
            )
        )
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
        await auth.require(request)
        documents = await _run(memory.documents)
        return Response.json({"documents": [_document_view(d) for d in documents]})

    async def get_document(request: Request) -> Response:
        await auth.require(request)
        info, text, sentences = await _run(
            functools.partial(memory.document, request.path_params["id"])
        )
        view = _document_view(info)
        view["text"] = text
        view["sentences"] = [
            {"id": s.id, "start": s.start, "end": s.end, "text": s.text} for s in sentences
        ]
        return Response.json(view)

    async def delete_document(request: Request) -> Response:
        app_id = await auth.require(request)
        owner = None if app_id == ADMIN_APP else app_id
        report = await _run(
            functools.partial(memory.delete, request.path_params["id"], owner=owner)
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
        app_id = await auth.require(request)
        body = _object(request, _QUERY_FIELDS)
        compose = _choice(body, "compose", _COMPOSERS, "extractive")
        if compose == "llm":
            need_mesh('"compose": "llm"')
        answer = await _run(functools.partial(memory.ask, body.get("question"), body.get("limit")))
        out = answer.to_json()
        out["composed_by"] = "extractive"
        if compose == "llm":
            composed = await _run(
                functools.partial(
                    compose_answer,
                    answer,
                    blocking_complete(app_id, settings.compose_dsn),
                    memory.stored_sentences,
                )
            )
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
    router.add("DELETE", "/v1/memory/documents/{id}", delete_document)
    router.add("POST", "/v1/memory/query", query)
