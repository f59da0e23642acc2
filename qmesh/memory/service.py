"""The graph memory as one object: validate, convert, split, extract, store;
delete; list; share; ask.

For: the single entry point that the HTTP API and the CLI share, so both
accept and refuse exactly the same input (sizes, formats, ids) with the same
messages, and so that every read says who is reading (:class:`Access`,
required: there is no "everything" by default). Extraction runs before the
write transaction, so the state store's lock is held only for the SQL.

Bounded work. A document is at most ``max_document_bytes`` of UTF-8 and
:data:`MAX_SENTENCES` sentences, each extraction at most
:data:`~qmesh.memory.extraction.MAX_MENTIONS` mentions, and the document at
most :data:`MAX_DOCUMENT_MENTIONS` in all; everything from conversion to SQL
is linear in the document. ``checkpoint`` (see
:data:`~qmesh.memory.store.Checkpoint`) is called between conversion,
splitting, every :data:`_EXTRACT_BATCH` sentences of extraction and of the
reading of references (:mod:`qmesh.memory.coref`, for the rule-based
extractors), and every sentence written, so a caller that gives up stops the
work soon, and it leaves nothing behind.

Not for: async code. Every method blocks (SQLite and CPU work); Trio
callers wrap them in ``trio.to_thread.run_sync`` (the HTTP API does, on a
limiter of its own).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Final

from qmesh.memory.convert import FORMATS, convert
from qmesh.memory.coref import resolve_references
from qmesh.memory.errors import DocumentTooLarge, InvalidDocument
from qmesh.memory.extract import RuleExtractor
from qmesh.memory.extraction import Extraction, Extractor, check_extraction
from qmesh.memory.query import DEFAULT_LIMIT, Answer, ask, check_question
from qmesh.memory.records import (
    OPERATOR,
    Access,
    Checkpoint,
    DeleteReport,
    DocumentInfo,
    IngestReport,
    PreparedDocument,
    StoredSentence,
)
from qmesh.memory.sentences import split_sentences
from qmesh.memory.store import MemoryStore
from qmesh.state import StateStore

__all__ = [
    "DEFAULT_MAX_DOCUMENT_BYTES",
    "MAX_DOCUMENT_MENTIONS",
    "MAX_SENTENCES",
    "MAX_TITLE_CHARS",
    "Memory",
    "check_document_id",
]

DEFAULT_MAX_DOCUMENT_BYTES: Final = 512 * 1024
"""UTF-8 bytes of submitted source per document, unless configured
(``[gate.memory] max_document_bytes``): a long book's worth of prose."""
MAX_SENTENCES: Final = 50_000
"""Sentences per document: 2 MiB of prose has about 20,000; a document of
one-word lines would otherwise give a row (and a full-text entry) per word."""
MAX_DOCUMENT_MENTIONS: Final = 250_000
"""Mentions per document: with the sentences, what bounds the rows one
ingest writes, and so how long it holds the state store's lock."""
MAX_TITLE_CHARS: Final = 300
# Sentences extracted between two checkpoints: a few milliseconds of rules.
_EXTRACT_BATCH: Final = 64
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


def _no_checkpoint() -> None:
    pass


def _utf8(text: str, what: str) -> bytes:
    """``text`` as UTF-8; InvalidDocument for a lone surrogate, which JSON
    can carry ("\\ud800") but no UTF-8 text, and so no stored document, can,
    and for NUL, which PostgreSQL's text cannot hold (refused on SQLite too:
    a document is stored alike on either backend)."""
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidDocument(
            f"{what} is not valid Unicode: a lone surrogate at character {exc.start}"
        ) from None
    if b"\0" in encoded:
        raise InvalidDocument(f"{what} holds a NUL character (U+0000) at {text.index(chr(0))}")
    return encoded


def _rules_of(extractor: Extractor) -> RuleExtractor | None:
    """The rule extractor that ``extractor`` is or builds on (the LLM
    extractor adds a model's triples to the rules'), which reads the
    sentences again once their references are resolved; None for an
    extractor of another kind, whose output is stored as it is."""
    if isinstance(extractor, RuleExtractor):
        return extractor
    rules = getattr(extractor, "rules", None)
    return rules if isinstance(rules, RuleExtractor) else None


class Memory:
    """Graph memory over the Gate's state store."""

    def __init__(
        self,
        state: StateStore,
        extractor: Extractor | None = None,
        *,
        max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
    ) -> None:
        self.store = MemoryStore(state)
        self.extractor: Extractor = extractor or RuleExtractor()
        self.max_document_bytes = max_document_bytes

    def check_size(self, size: int) -> None:
        """DocumentTooLarge if ``size`` bytes of source are over the limit."""
        if size > self.max_document_bytes:
            raise DocumentTooLarge(
                f"the document is {size:,} bytes; the limit is {self.max_document_bytes:,} "
                "bytes of UTF-8 text ([gate.memory] max_document_bytes)"
            )

    def prepare(
        self,
        text: object,
        *,
        format: object = "text",
        document_id: object = None,
        title: object = None,
        added_by: str | None = None,
        shared: bool | None = None,
        extractor: Extractor | None = None,
        checkpoint: Checkpoint = _no_checkpoint,
    ) -> PreparedDocument:
        """Validate, convert, split and extract (with ``extractor``, or the
        memory's own); raises InvalidDocument (DocumentTooLarge over a limit)."""
        extractor = extractor or self.extractor
        if not isinstance(format, str) or format not in FORMATS:
            raise InvalidDocument(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
        if not isinstance(text, str):
            raise InvalidDocument("text must be a string")
        # Characters first: a string over the limit in characters is over it
        # in bytes too, and is refused without being encoded.
        if len(text) > self.max_document_bytes:
            self.check_size(len(text))
        source = _utf8(text, "text")
        self.check_size(len(source))
        if not text.strip():
            raise InvalidDocument("text is empty")
        if title is not None and (not isinstance(title, str) or len(title) > MAX_TITLE_CHARS):
            raise InvalidDocument(f"title must be a string of at most {MAX_TITLE_CHARS} characters")
        if title is not None:
            _utf8(title, "title")
        if shared is not None and not isinstance(shared, bool):
            raise InvalidDocument("shared must be true or false")
        source_sha256 = hashlib.sha256(source).hexdigest()
        if document_id is None:
            # An app's own text gets an id of its own: the same text from two
            # apps must not meet under one id, where the second would learn
            # that the first stored exactly this text.
            seed = source if added_by is None else f"{added_by}\n".encode() + source
            document_id = f"doc-{hashlib.sha256(seed).hexdigest()[:16]}"
        document_id = check_document_id(document_id)
        checkpoint()
        converted = convert(text, format)
        checkpoint()
        sentences = split_sentences(document_id, converted.text, limit=MAX_SENTENCES + 1)
        if not sentences:
            raise InvalidDocument(f"no text left to store after converting from {format}")
        if len(sentences) > MAX_SENTENCES:
            raise DocumentTooLarge(
                f"the document has more than {MAX_SENTENCES:,} sentences, the limit"
            )
        texts = [s.text for s in sentences]
        extractions: list[Extraction] = []
        for first in range(0, len(texts), _EXTRACT_BATCH):
            checkpoint()
            extractions += extractor.extract(texts[first : first + _EXTRACT_BATCH])
        if len(extractions) != len(sentences):
            raise InvalidDocument(
                f"extractor {extractor.name!r} returned {len(extractions)} results "
                f"for {len(sentences)} sentences"
            )
        rules = _rules_of(extractor)
        if rules is not None:
            # Pronouns and descriptions ("it", "the firm") need the paragraph:
            # resolved here, over the whole document, and read again by the rules.
            extractions = resolve_references(
                converted.text, sentences, extractions, rules.extract_one, checkpoint
            )
        mentions = 0
        for sentence, extraction in zip(sentences, extractions, strict=True):
            check_extraction(sentence.text, extraction)
            mentions += len(extraction.mentions)
        if mentions > MAX_DOCUMENT_MENTIONS:
            raise DocumentTooLarge(
                f"the document names {mentions:,} things; the limit is {MAX_DOCUMENT_MENTIONS:,}"
            )
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
            shared=shared,
        )

    def add(
        self,
        text: object,
        *,
        format: object = "text",
        document_id: object = None,
        title: object = None,
        added_by: str | None = None,
        shared: bool | None = None,
        replace: bool = False,
        extractor: Extractor | None = None,
        access: Access | None = None,
        checkpoint: Checkpoint = _no_checkpoint,
    ) -> IngestReport:
        """Add a document for ``added_by`` (None: the operator), with the
        rights of ``access`` (default: those of ``added_by``). ``shared``
        lets every app read it (None: as the document it repeats or
        replaces, else not)."""
        if access is None:
            access = OPERATOR if added_by is None else Access.of_app(added_by)
        document = self.prepare(
            text,
            format=format,
            document_id=document_id,
            title=title,
            added_by=added_by,
            shared=shared,
            extractor=extractor,
            checkpoint=checkpoint,
        )
        return self.store.ingest(document, replace=replace, access=access, checkpoint=checkpoint)

    def delete(
        self, document_id: str, *, access: Access, checkpoint: Checkpoint = _no_checkpoint
    ) -> DeleteReport:
        """See :meth:`MemoryStore.delete`."""
        return self.store.delete(
            check_document_id(document_id), access=access, checkpoint=checkpoint
        )

    def share(self, document_id: str, shared: bool, *, access: Access) -> None:
        """See :meth:`MemoryStore.set_shared`."""
        self.store.set_shared(check_document_id(document_id), shared, access=access)

    def documents(self, *, access: Access) -> list[DocumentInfo]:
        return self.store.list_documents(access)

    def document(
        self, document_id: str, *, access: Access
    ) -> tuple[DocumentInfo, str, list[StoredSentence]]:
        return self.store.get_document(check_document_id(document_id), access)

    def ask(self, question: object, limit: object = DEFAULT_LIMIT, *, access: Access) -> Answer:
        """Answer from the documents ``access`` may read; InvalidQuestion for
        an empty or over-long question or a limit outside 1-100 (None means
        the default)."""
        text, count = check_question(question, limit)
        return ask(self.store, text, count, access=access)

    def stored_sentences(self, sentence_ids: Iterable[str], *, access: Access) -> dict[str, str]:
        """Sentence id → stored text of the sentences ``access`` may read,
        for :func:`qmesh.memory.verify.verify_answer`."""
        with self.store.reader(access) as reader:
            return {i: s.text for i, s in reader.sentences_by_id(sentence_ids).items()}
