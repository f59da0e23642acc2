"""The graph memory's records: who reads (:class:`Access`), what a document,
a sentence, an entity and a fact look like when they leave the store, and
the reports of an ingest and a delete.

For: values shared by the store's writes (:mod:`qmesh.memory.store`), its
reads (:mod:`qmesh.memory.reader`) and their callers, and the small SQL
helpers both use. Not for: SQL statements of their own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import attrs

from qmesh.memory.extraction import Extraction
from qmesh.memory.sentences import Sentence

__all__ = [
    "OPERATOR",
    "SHARED_ONLY",
    "Access",
    "Checkpoint",
    "DeleteReport",
    "DocumentInfo",
    "EntityRef",
    "Fact",
    "IngestReport",
    "Lists",
    "MentionSpan",
    "PreparedDocument",
    "StoredSentence",
    "document_info",
    "no_checkpoint",
]


Checkpoint = Callable[[], None]
"""Called between units of blocking work; raises to stop it (the work then
leaves nothing behind). ``trio.from_thread.check_cancelled`` is one."""


def no_checkpoint() -> None:
    pass


@attrs.frozen
class Access:
    """Who reads or changes the memory.

    ``app`` is the application (None: nobody in particular); ``everything``
    lets it see and change every document, as the operator does."""

    app: str | None
    everything: bool = False

    @classmethod
    def of_app(cls, app: str) -> Access:
        """An application: its own documents and the shared ones."""
        return cls(app)

    def may_read(self, added_by: str | None, shared: bool) -> bool:
        return self.everything or shared or (self.app is not None and added_by == self.app)

    def may_change(self, added_by: str | None) -> bool:
        return self.everything or (self.app is not None and added_by == self.app)

    def visible(self, document: str) -> tuple[str, tuple[object, ...]]:
        """A SQL condition on the ``memory_documents`` row aliased ``document``
        that holds for the documents this reader may see, and its parameters."""
        if self.everything:
            return "TRUE", ()
        # added_by = NULL is never true: with no app, only shared documents.
        return f"({document}.shared = 1 OR {document}.added_by = ?)", (self.app,)


OPERATOR: Final = Access(None, everything=True)
"""The operator (the CLI, the ``admin`` app): every document."""
SHARED_ONLY: Final = Access(None)
"""A reader that is no application in particular: the shared documents only."""


@attrs.frozen
class PreparedDocument:
    """A document ready to store: converted, split and extracted (by the service)."""

    id: str
    title: str | None
    format: str
    text: str
    sha256: str
    source_sha256: str
    sentences: Sequence[Sentence]
    extractions: Sequence[Extraction]
    extractor: str
    added_by: str | None = None
    shared: bool | None = None
    """Whether other applications may read it; None: as the document it
    replaces or repeats was, else not."""


@attrs.frozen
class IngestReport:
    document_id: str
    created: bool
    """False when the same text was already stored under this id (nothing changed)."""
    replaced: bool
    sentences: int
    mentions: int
    relations: int


@attrs.frozen
class DeleteReport:
    document_id: str
    sentences: int
    entities_removed: int
    entities_kept: int
    relations_removed: int
    relations_kept: int


@attrs.frozen
class DocumentInfo:
    id: str
    title: str | None
    format: str
    chars: int
    sentences: int
    sha256: str
    added_by: str | None
    extractor: str
    created_at: float
    shared: bool


@attrs.frozen
class StoredSentence:
    seq: int
    id: str
    document_id: str
    start: int
    end: int
    text: str
    title: str | None = None


@attrs.frozen
class EntityRef:
    id: int
    name: str
    kind: str


@attrs.frozen
class MentionSpan:
    """A stored mention: ``document[start:end] == surface``, naming ``entity``."""

    entity: EntityRef
    start: int
    end: int
    surface: str
    resolved: bool
    """The surface is not the entity's own name: a pronoun, a description, a
    surname or a short name that the memory resolved to it ("it" → "Acme
    Corporation")."""


@attrs.frozen
class Fact:
    relation_id: int
    subject: EntityRef
    predicate: str
    object: EntityRef
    support: tuple[int, ...]
    """Sequence numbers of the supporting sentences, in document order."""


@attrs.frozen
class Lists:
    """A list of values bound as one parameter, as each backend reads one:
    a JSON array for SQLite's ``json_each``, an array for PostgreSQL's
    ``= ANY``. One parameter, whatever the list's length, so the statement
    stays one text (prepared once) and never meets a limit on parameters."""

    dialect: str

    def among(self, column: str) -> str:
        """A condition that ``column`` is one of the values given by :meth:`of`."""
        if self.dialect == "sqlite":
            return f"{column} IN (SELECT value FROM json_each(?))"
        return f"{column} = ANY(?)"

    def of(self, values: Iterable[int] | Iterable[str]) -> object:
        """The parameter for :meth:`among`."""
        ordered: list[Any] = sorted(set(values))
        return json.dumps(ordered) if self.dialect == "sqlite" else ordered


def document_info(row: Sequence[Any]) -> DocumentInfo:
    """From the columns id, title, format, chars, sentences, sha256,
    added_by, extractor, created_at, shared."""
    id_, title, fmt, chars, sentences, sha256, added_by, extractor, created_at, shared = row
    return DocumentInfo(
        id_, title, fmt, chars, sentences, sha256, added_by, extractor, created_at, bool(shared)
    )
