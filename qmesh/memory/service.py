"""The graph memory as one object: validate, convert, split, extract, store;
delete; list; ask.

For: the single entry point that the HTTP API and the CLI share, so both
accept and refuse exactly the same input (sizes, formats, ids) with the same
messages. Extraction runs before the write transaction, so the state
store's lock is held only for the SQL.

Not for: async code. Every method blocks (SQLite and CPU work); Trio
callers wrap them in ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Final

from qmesh.memory.convert import FORMATS, convert
from qmesh.memory.errors import DocumentTooLarge, InvalidDocument
from qmesh.memory.extract import Extractor, RuleExtractor, check_extraction
from qmesh.memory.query import DEFAULT_LIMIT, Answer, ask, check_question
from qmesh.memory.sentences import split_sentences
from qmesh.memory.store import (
    DeleteReport,
    DocumentInfo,
    IngestReport,
    MemoryStore,
    PreparedDocument,
    StoredSentence,
)
from qmesh.state import StateStore

__all__ = ["MAX_DOCUMENT_CHARS", "MAX_TITLE_CHARS", "Memory", "check_document_id"]

MAX_DOCUMENT_CHARS: Final = 1_000_000
"""Characters of submitted source per document (about 10,000 sentences)."""
MAX_TITLE_CHARS: Final = 300
# No ":" in ids: a sentence id is DOC_ID:START-END:HASH.
_DOCUMENT_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_document_id(document_id: object) -> str:
    if not isinstance(document_id, str) or not _DOCUMENT_ID_RE.fullmatch(document_id):
        raise InvalidDocument(
            "document id must be 1-128 letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit; got {document_id!r}"
        )
    return document_id


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Memory:
    """Graph memory over the Gate's state store."""

    def __init__(
        self,
        state: StateStore,
        extractor: Extractor | None = None,
        *,
        max_document_chars: int = MAX_DOCUMENT_CHARS,
    ) -> None:
        self.store = MemoryStore(state)
        self.extractor: Extractor = extractor or RuleExtractor()
        self.max_document_chars = max_document_chars

    def prepare(
        self,
        text: object,
        *,
        format: object = "text",
        document_id: object = None,
        title: object = None,
        added_by: str | None = None,
        extractor: Extractor | None = None,
    ) -> PreparedDocument:
        """Validate, convert, split and extract (with ``extractor``, or the
        memory's own); raises InvalidDocument."""
        extractor = extractor or self.extractor
        if not isinstance(format, str) or format not in FORMATS:
            raise InvalidDocument(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
        if not isinstance(text, str):
            raise InvalidDocument("text must be a string")
        if len(text) > self.max_document_chars:
            raise DocumentTooLarge(
                f"document is {len(text)} characters; the limit is {self.max_document_chars}"
            )
        if not text.strip():
            raise InvalidDocument("text is empty")
        if title is not None and (not isinstance(title, str) or len(title) > MAX_TITLE_CHARS):
            raise InvalidDocument(f"title must be a string of at most {MAX_TITLE_CHARS} characters")
        source_sha256 = _sha256(text)
        if document_id is None:
            document_id = f"doc-{source_sha256[:16]}"
        document_id = check_document_id(document_id)
        converted = convert(text, format)
        sentences = split_sentences(document_id, converted.text)
        if not sentences:
            raise InvalidDocument(f"no text left to store after converting from {format}")
        extractions = extractor.extract([s.text for s in sentences])
        if len(extractions) != len(sentences):
            raise InvalidDocument(
                f"extractor {extractor.name!r} returned {len(extractions)} results "
                f"for {len(sentences)} sentences"
            )
        for sentence, extraction in zip(sentences, extractions, strict=True):
            check_extraction(sentence.text, extraction)
        return PreparedDocument(
            id=document_id,
            title=title if title else converted.title,
            format=format,
            text=converted.text,
            sha256=_sha256(converted.text),
            source_sha256=source_sha256,
            sentences=sentences,
            extractions=extractions,
            extractor=extractor.name,
            added_by=added_by,
        )

    def add(
        self,
        text: object,
        *,
        format: object = "text",
        document_id: object = None,
        title: object = None,
        added_by: str | None = None,
        replace: bool = False,
        extractor: Extractor | None = None,
    ) -> IngestReport:
        document = self.prepare(
            text,
            format=format,
            document_id=document_id,
            title=title,
            added_by=added_by,
            extractor=extractor,
        )
        return self.store.ingest(document, replace=replace)

    def delete(self, document_id: str, *, owner: str | None = None) -> DeleteReport:
        """See :meth:`MemoryStore.delete`; ``owner=None`` is the operator."""
        return self.store.delete(check_document_id(document_id), owner=owner)

    def documents(self) -> list[DocumentInfo]:
        return self.store.list_documents()

    def document(self, document_id: str) -> tuple[DocumentInfo, str, list[StoredSentence]]:
        return self.store.get_document(check_document_id(document_id))

    def ask(self, question: object, limit: object = DEFAULT_LIMIT) -> Answer:
        """Answer from the memory; InvalidQuestion for an empty or over-long
        question or a limit outside 1-100 (None means the default)."""
        text, count = check_question(question, limit)
        return ask(self.store, text, count)

    def stored_sentences(self, sentence_ids: Iterable[str]) -> dict[str, str]:
        """Sentence id → stored text, for :func:`qmesh.memory.verify.verify_answer`."""
        with self.store.reader() as reader:
            return {i: s.text for i, s in reader.sentences_by_id(sentence_ids).items()}
