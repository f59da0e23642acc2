"""The graph memory's SQL: storing a prepared document with its facts,
deleting one, listing, the look-ups a query needs, and an integrity check.

Every read and every change is made as someone (:class:`Access`): an
application sees the documents it added and those shared with every app,
and changes only its own; the operator (the CLI, the ``admin`` app) sees
and changes everything. The graph itself is one per Gate (an entity is a
normalised name, whoever wrote it), but what a reader is shown of it comes
only from the sentences of documents it may see: an entity it knows from
no such sentence does not exist for it, a relation is listed with its
visible supporting sentences only, and an entity's name is the surface of
one of its visible mentions. So nothing of a private document reaches
another app, not even the spelling of a name it merged into an alias.

For: all reads and writes of the ``memory_*`` tables (see
:mod:`qmesh.state.memory_tables` for what the database itself enforces). Entity
resolution happens here because it needs the stored graph: a mention joins
the entity whose key it normalises to (:func:`~qmesh.memory.terms.entity_key`),
else the one entity that already has a mention with that surface key (an
alias), else a new entity; a mention that refers to an earlier one of the
document (a pronoun or a description resolved by :mod:`qmesh.memory.coref`)
joins that one's entity, keyed by its key so that it never becomes an alias,
and one that refers to nothing the document named is not stored. Within
one document, a lone surname ("Doe") joins the one person of the document
whose name ends with it, and an alias pair from the extractor
("International Business Machines (IBM)") merges the two entities, moving
every mention and every supporting sentence to the survivor, so merging
never loses provenance.

The same statements run on both backends of the state store (SQLite, and
PostgreSQL with the schema of :mod:`qmesh.state.memory_tables`); a write
takes the memory's own writer lock, so on PostgreSQL an ingest never holds
up the ledger or a key rotation.

Not for: splitting, extracting or ranking (pure code elsewhere), or
threads: every method is synchronous and blocks on the database,
and Trio callers use ``trio.to_thread.run_sync``. A long ingest calls its
``checkpoint`` once per sentence, so a caller that gives up (a request
cancelled, the Gate stopping) can make it roll back and let go of the lock.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any, Final

from qmesh.memory.coref import is_description
from qmesh.memory.errors import (
    DocumentConflict,
    DocumentNotFound,
    NotDocumentOwner,
    ProvenanceError,
)
from qmesh.memory.extraction import Mention
from qmesh.memory.reader import MemoryReader
from qmesh.memory.records import (
    OPERATOR,
    Access,
    Checkpoint,
    DeleteReport,
    DocumentInfo,
    IngestReport,
    Lists,
    PreparedDocument,
    StoredSentence,
    no_checkpoint,
)
from qmesh.memory.terms import entity_key
from qmesh.state import StateStore
from qmesh.state.db import INTEGRITY_ERRORS, Connection, Dialect

__all__ = ["MemoryStore"]

# Sentences deleted per statement: a few milliseconds of cascades.
_DELETE_BATCH: Final = 500


class MemoryStore:
    """The memory tables of one :class:`~qmesh.state.StateStore`."""

    def __init__(self, state: StateStore) -> None:
        self.state = state

    def _write(self) -> contextlib.AbstractContextManager[Connection]:
        # No Gate reacts to the memory's rows: its writes wake no watcher.
        return self.state._write(announce=False, scope="memory")

    # -- writing ------------------------------------------------------------

    def ingest(
        self,
        document: PreparedDocument,
        *,
        replace: bool = False,
        access: Access = OPERATOR,
        checkpoint: Checkpoint = no_checkpoint,
    ) -> IngestReport:
        """Store ``document`` as ``access``. The same text under the same id
        again changes nothing but, if asked, whether it is shared
        (``created=False``); other text under an existing id raises
        DocumentConflict unless ``replace``, which deletes the old one first
        in the same transaction and keeps its owner. Only the owner (or the
        operator) may do either: another app gets NotDocumentOwner for a
        document it can read (a shared one) and DocumentConflict for one it
        cannot, without learning anything of its content. ProvenanceError if
        a fact would lack a source; whatever ``checkpoint`` raises rolls the
        whole document back."""
        if len(document.sentences) != len(document.extractions):
            raise ProvenanceError("one extraction per sentence is required")
        for sentence in document.sentences:
            if document.text[sentence.start : sentence.end] != sentence.text:
                raise ProvenanceError(f"sentence {sentence.id} does not slice its document")
        # Normalised before the transaction: the state store's lock is held
        # only for the SQL.
        keys = [[_keys(m) for m in e.mentions] for e in document.extractions]
        checkpoint()
        try:
            with self._write() as conn:
                row = conn.execute(
                    "SELECT sha256, format, added_by, shared FROM memory_documents WHERE id = ?",
                    (document.id,),
                ).fetchone()
                replaced = False
                owner, shared = document.added_by, bool(document.shared)
                if row is not None:
                    old_sha256, old_format, old_owner, old_shared = row
                    if not access.may_change(old_owner):
                        if access.may_read(old_owner, bool(old_shared)):
                            raise NotDocumentOwner(
                                f"document {document.id!r} belongs to another application; "
                                "only it can replace it"
                            )
                        raise DocumentConflict(
                            f"the document id {document.id!r} is taken; choose another"
                        )
                    if document.shared is None:
                        shared = bool(old_shared)
                    if old_sha256 == document.sha256 and old_format == document.format:
                        if shared != bool(old_shared):
                            conn.execute(
                                "UPDATE memory_documents SET shared = ? WHERE id = ?",
                                (int(shared), document.id),
                            )
                        count = conn.execute(
                            "SELECT count(*) FROM memory_sentences WHERE document_id = ?",
                            (document.id,),
                        ).fetchone()[0]
                        return IngestReport(document.id, False, False, count, 0, 0)
                    if not replace:
                        raise DocumentConflict(
                            f"a different document with id {document.id!r} exists; delete it "
                            "first or ask to replace it"
                        )
                    _delete(conn, self.state.dialect, document.id, OPERATOR, checkpoint)
                    replaced = True
                    owner = old_owner  # replacing is editing: the owner stays
                checkpoint()
                mentions, relations = _insert(conn, document, keys, owner, shared, checkpoint)
        except INTEGRITY_ERRORS as exc:
            # The schema refused a fact without a source: the extractor's
            # output and the checks in Python disagree, which is a bug.
            raise ProvenanceError(f"the store refused an unsupported fact: {exc}") from exc
        return IngestReport(
            document.id, True, replaced, len(document.sentences), mentions, relations
        )

    def delete(
        self,
        document_id: str,
        *,
        access: Access = OPERATOR,
        checkpoint: Checkpoint = no_checkpoint,
    ) -> DeleteReport:
        """Delete a document, its sentences and every fact that only it
        supported; facts with other sources stay, with those sources.
        DocumentNotFound unless ``access`` may see it, NotDocumentOwner
        unless it may change it. The report counts what ``access`` can see.
        Whatever ``checkpoint`` raises rolls the deletion back."""
        with self._write() as conn:
            _check_owner(conn, document_id, access, "delete")
            return _delete(conn, self.state.dialect, document_id, access, checkpoint)

    def set_shared(self, document_id: str, shared: bool, *, access: Access = OPERATOR) -> None:
        """Share a document with every application, or stop sharing it
        (DocumentNotFound, NotDocumentOwner as for :meth:`delete`)."""
        with self._write() as conn:
            _check_owner(conn, document_id, access, "share")
            conn.execute(
                "UPDATE memory_documents SET shared = ? WHERE id = ?", (int(shared), document_id)
            )

    # -- reading ------------------------------------------------------------

    @contextlib.contextmanager
    def reader(self, access: Access = OPERATOR) -> Iterator[MemoryReader]:
        """A consistent snapshot for a sequence of reads (one read
        transaction) of what ``access`` may see."""
        with self.state._snapshot() as conn:
            yield MemoryReader(conn, self.state.dialect, access)

    def list_documents(self, access: Access = OPERATOR) -> list[DocumentInfo]:
        with self.reader(access) as reader:
            return reader.documents()

    def get_document(
        self, document_id: str, access: Access = OPERATOR
    ) -> tuple[DocumentInfo, str, list[StoredSentence]]:
        """A document's record, its stored text and its sentences.
        DocumentNotFound, also for one that ``access`` may not see."""
        with self.reader(access) as reader:
            return reader.document(document_id)

    def integrity_problems(self) -> dict[str, int]:
        """Counts of provenance violations over the whole store (all zero when sound)."""
        with self.reader() as reader:
            return reader.integrity_problems()


class _Resolver:
    """Maps mentions of one document to entity ids, creating and merging entities."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.local: dict[str, int] = {}  # key -> entity, within this document
        self.surnames: dict[str, set[int]] = {}  # last word of a person's name -> entities
        self.merged: dict[int, int] = {}  # dropped entity -> survivor

    def canonical(self, entity_id: int) -> int:
        while entity_id in self.merged:
            entity_id = self.merged[entity_id]
        return entity_id

    def resolve(self, key: str, surface: str, kind: str, seq: int, start: int) -> int:
        entity = self.local.get(key)
        if entity is None and kind == "name" and " " not in key:
            people = {self.canonical(e) for e in self.surnames.get(key, ())}
            if len(people) == 1:
                entity = people.pop()
        if entity is None:
            row = self.conn.execute(
                "SELECT id FROM memory_entities WHERE key = ?", (key,)
            ).fetchone()
            if row is not None:
                entity = int(row[0])
        if entity is None:
            rows = self.conn.execute(
                "SELECT DISTINCT entity_id FROM memory_mentions WHERE surface_key = ? LIMIT 2",
                (key,),
            ).fetchall()
            if len(rows) == 1:  # an alias of exactly one entity
                entity = int(rows[0][0])
        if entity is None:
            entity = int(
                self.conn.execute(
                    "INSERT INTO memory_entities (key, name, kind, anchor_seq, anchor_start)"
                    " VALUES (?, ?, ?, ?, ?) RETURNING id",
                    (key, surface, kind, seq, start),
                ).fetchone()[0]
            )
            # SQLite reuses the id of an entity a merge deleted: the new one
            # is not that entity ("X (Y) … Z": Z must not become X).
            self.merged.pop(entity, None)
        entity = self.canonical(entity)
        self.local[key] = entity
        if kind == "name" and " " in key:
            self.surnames.setdefault(key.rsplit(" ", 1)[1], set()).add(entity)
        return entity

    def merge(self, keep: int, drop: int) -> None:
        keep, drop = self.canonical(keep), self.canonical(drop)
        if keep == drop:
            return
        _merge(self.conn, keep, drop)
        self.merged[drop] = keep
        for key, entity in self.local.items():
            if entity == drop:
                self.local[key] = keep
        for people in self.surnames.values():
            if drop in people:
                people.discard(drop)
                people.add(keep)


def _keys(mention: Mention) -> tuple[str, str | None]:
    """A mention's surface key and, for one that refers to an earlier
    mention, that mention's key. A pronoun or a description ("it", "the
    firm") is keyed by what it refers to, so that it never becomes an alias
    ("it" naming every company); a surname or a short name keeps its own
    key, an alias by which its entity can be looked up."""
    own = entity_key(mention.text)
    if mention.refers is None:
        return own, None
    antecedent = entity_key(mention.refers)
    if not own or is_description(mention.text):
        return antecedent, antecedent
    return own, antecedent


def _insert(
    conn: Connection,
    document: PreparedDocument,
    keys: Sequence[Sequence[tuple[str, str | None]]],
    owner: str | None,
    shared: bool,
    checkpoint: Checkpoint,
) -> tuple[int, int]:
    conn.execute(
        "INSERT INTO memory_documents (id, title, format, text, sha256, source_sha256, added_by,"
        " extractor, created_at, shared) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            document.id,
            document.title,
            document.format,
            document.text,
            document.sha256,
            document.source_sha256,
            owner,
            document.extractor,
            time.time(),
            int(shared),
        ),
    )
    resolver = _Resolver(conn)
    mention_count = 0
    supports: set[tuple[int, int]] = set()
    # (subject, predicate, object) -> relation id, found or created by this
    # ingest; a merge rewrites relations, so it empties this.
    relation_ids: dict[tuple[int, str, int], int] = {}
    rows = zip(document.sentences, document.extractions, keys, strict=True)
    for sentence, extraction, mention_keys in rows:
        checkpoint()
        seq = int(
            conn.execute(
                "INSERT INTO memory_sentences (id, document_id, char_start, char_end, text)"
                " VALUES (?, ?, ?, ?, ?) RETURNING seq",
                (sentence.id, document.id, sentence.start, sentence.end, sentence.text),
            ).fetchone()[0]
        )
        entities: list[int | None] = []
        for mention, (key, antecedent) in zip(extraction.mentions, mention_keys, strict=True):
            start = sentence.start + mention.start
            if antecedent is not None:
                # Only an entity this document named before: a reference
                # never creates one, nor reaches into another document.
                found = resolver.local.get(antecedent)
                entity = None if found is None or not key else resolver.canonical(found)
                if entity is not None and key != antecedent:
                    resolver.local.setdefault(key, entity)
            elif key:
                entity = resolver.resolve(key, mention.text, mention.kind, seq, start)
            else:
                entity = None
            if entity is None:
                entities.append(None)
                continue
            conn.execute(
                "INSERT INTO memory_mentions (entity_id, sentence_seq, char_start, char_end,"
                " surface, surface_key) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (entity, seq, start, sentence.start + mention.end, mention.text, key),
            )
            mention_count += 1
            entities.append(entity)
        for a, b in extraction.same_as:
            ea, eb = entities[a], entities[b]
            if ea is not None and eb is not None:
                resolver.merge(ea, eb)
                relation_ids.clear()
        for relation in extraction.relations:
            subject, obj = entities[relation.subject], entities[relation.object]
            if subject is None or obj is None:
                continue
            subject, obj = resolver.canonical(subject), resolver.canonical(obj)
            if subject == obj:
                continue
            triple = (subject, relation.predicate, obj)
            relation_id = relation_ids.get(triple)
            if relation_id is None:
                relation_id = relation_ids[triple] = _relation(conn, *triple, seq)
            conn.execute(
                "INSERT INTO memory_relation_support (relation_id, sentence_seq)"
                " VALUES (?, ?) ON CONFLICT DO NOTHING",
                (relation_id, seq),
            )
            supports.add((relation_id, seq))
    return mention_count, len(supports)


def _relation(conn: Connection, subject: int, predicate: str, obj: int, seq: int) -> int:
    """The id of (subject, predicate, object), created with ``seq`` as its anchor
    if new: the caller must insert that support in the same transaction."""
    row = conn.execute(
        "SELECT id FROM memory_relations WHERE subject_id = ? AND predicate = ? AND object_id = ?",
        (subject, predicate, obj),
    ).fetchone()
    if row is not None:
        return int(row[0])
    return int(
        conn.execute(
            "INSERT INTO memory_relations (subject_id, predicate, object_id, anchor_seq)"
            " VALUES (?, ?, ?, ?) RETURNING id",
            (subject, predicate, obj, seq),
        ).fetchone()[0]
    )


def _merge(conn: Connection, keep: int, drop: int) -> None:
    """Fold entity ``drop`` into ``keep``: its mentions and its relations'
    supporting sentences move to ``keep``; then ``drop`` is deleted."""
    conn.execute(
        "INSERT INTO memory_mentions (entity_id, sentence_seq, char_start, char_end, surface,"
        " surface_key) SELECT ?, sentence_seq, char_start, char_end, surface, surface_key"
        " FROM memory_mentions WHERE entity_id = ? ON CONFLICT DO NOTHING",
        (keep, drop),
    )
    relations = conn.execute(
        "SELECT id, subject_id, predicate, object_id FROM memory_relations"
        " WHERE subject_id = ? OR object_id = ?",
        (drop, drop),
    ).fetchall()
    for relation_id, subject, predicate, obj in relations:
        subject = keep if subject == drop else subject
        obj = keep if obj == drop else obj
        if subject == obj:
            continue  # "X is X" after the merge: the mentions keep the sentence
        support = [
            r[0]
            for r in conn.execute(
                "SELECT sentence_seq FROM memory_relation_support WHERE relation_id = ?",
                (relation_id,),
            )
        ]
        target = _relation(conn, subject, predicate, obj, support[0])
        conn.executemany(
            "INSERT INTO memory_relation_support (relation_id, sentence_seq)"
            " VALUES (?, ?) ON CONFLICT DO NOTHING",
            [(target, seq) for seq in support],
        )
    conn.execute("DELETE FROM memory_entities WHERE id = ?", (drop,))


def _check_owner(conn: Connection, document_id: str, access: Access, verb: str) -> None:
    """DocumentNotFound unless ``access`` may see the document (another
    app's private one does not exist for it), NotDocumentOwner unless it may
    ``verb`` it."""
    row = conn.execute(
        "SELECT added_by, shared FROM memory_documents WHERE id = ?", (document_id,)
    ).fetchone()
    if row is None or not access.may_read(row[0], bool(row[1])):
        raise DocumentNotFound(f"no document with id {document_id!r}")
    if not access.may_change(row[0]):
        raise NotDocumentOwner(
            f"document {document_id!r} was added by another application; only it can {verb} it"
        )


def _delete(
    conn: Connection, dialect: Dialect, document_id: str, access: Access, checkpoint: Checkpoint
) -> DeleteReport:
    """Delete the document (which exists; the caller checked who may);
    the report counts, of what was there, what ``access`` can still see."""
    if (
        conn.execute("SELECT 1 FROM memory_documents WHERE id = ?", (document_id,)).fetchone()
        is None
    ):
        raise DocumentNotFound(f"no document with id {document_id!r}")
    sentences = conn.execute(
        "SELECT count(*) FROM memory_sentences WHERE document_id = ?", (document_id,)
    ).fetchone()[0]
    entities = [
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT m.entity_id FROM memory_mentions AS m JOIN memory_sentences AS s"
            " ON s.seq = m.sentence_seq WHERE s.document_id = ?",
            (document_id,),
        )
    ]
    relations = [
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT p.relation_id FROM memory_relation_support AS p"
            " JOIN memory_sentences AS s ON s.seq = p.sentence_seq WHERE s.document_id = ?",
            (document_id,),
        )
    ]
    # The cascade and the triggers in the schema do the pruning: sentences go,
    # their mentions and supports go with them, and an entity or relation
    # whose last source went is deleted. Sentences go a batch at a time, so
    # that a caller that gives up is heard within a batch, not after seconds.
    while True:
        checkpoint()
        deleted = conn.execute(
            "DELETE FROM memory_sentences WHERE seq IN (SELECT seq FROM memory_sentences"
            " WHERE document_id = ? LIMIT ?)",
            (document_id, _DELETE_BATCH),
        ).rowcount
        if deleted < _DELETE_BATCH:
            break
    conn.execute("DELETE FROM memory_documents WHERE id = ?", (document_id,))
    lists = Lists(dialect)
    kept_entities = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM memory_entities WHERE " + lists.among("id"), (lists.of(entities),)
        )
    ]
    # What is left is counted as the caller sees it: that another app's
    # private document still states a fact is not the caller's to know.
    reader = MemoryReader(conn, dialect, access)
    visible_entities = len(reader._names(kept_entities))
    kept_relations = len(reader.facts(relations))
    _relabel(conn, kept_entities)
    return DeleteReport(
        document_id=document_id,
        sentences=int(sentences),
        entities_removed=len(entities) - visible_entities,
        entities_kept=visible_entities,
        relations_removed=len(relations) - int(kept_relations),
        relations_kept=int(kept_relations),
    )


def _relabel(conn: Connection, entity_ids: Sequence[int]) -> None:
    """Give an entity whose name lost its last mention the name of its
    commonest remaining mention (merging into the entity that already has
    that key, if one does), so that every entity's name has a source."""
    for entity in entity_ids:
        row: Any = conn.execute(
            "SELECT key FROM memory_entities WHERE id = ?", (entity,)
        ).fetchone()
        if row is None:
            continue
        if conn.execute(
            "SELECT 1 FROM memory_mentions WHERE entity_id = ? AND surface_key = ?",
            (entity, row[0]),
        ).fetchone():
            continue
        key, surface = conn.execute(
            "SELECT surface_key, min(surface) FROM memory_mentions WHERE entity_id = ?"
            " GROUP BY surface_key ORDER BY count(*) DESC, length(surface_key) DESC, surface_key"
            " LIMIT 1",
            (entity,),
        ).fetchone()
        other = conn.execute("SELECT id FROM memory_entities WHERE key = ?", (key,)).fetchone()
        if other is not None:
            _merge(conn, int(other[0]), entity)
        else:
            conn.execute(
                "UPDATE memory_entities SET key = ?, name = ? WHERE id = ?", (key, surface, entity)
            )
