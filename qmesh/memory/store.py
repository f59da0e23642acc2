"""The graph memory's SQL: storing a prepared document with its facts,
deleting one, listing, the look-ups a query needs, and an integrity check.

For: all reads and writes of the ``memory_*`` tables (see
:mod:`qmesh.memory.schema` for what the database itself enforces). Entity
resolution happens here because it needs the stored graph: a mention joins
the entity whose key it normalises to (:func:`~qmesh.memory.terms.entity_key`),
else the one entity that already has a mention with that surface key (an
alias), else a new entity. Within one document, a lone surname ("Doe")
joins the one person of the document whose name ends with it, and an alias
pair from the extractor ("International Business Machines (IBM)") merges the
two entities, moving every mention and every supporting sentence to the
survivor, so merging never loses provenance.

Not for: splitting, extracting or ranking (pure code elsewhere), or
threads: every method is synchronous and runs under the state store's lock,
and Trio callers use ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final

import attrs

from qmesh.memory.errors import (
    DocumentConflict,
    DocumentNotFound,
    NotDocumentOwner,
    ProvenanceError,
)
from qmesh.memory.extract import Extraction
from qmesh.memory.sentences import Sentence
from qmesh.memory.terms import entity_key
from qmesh.state import StateStore

__all__ = [
    "DeleteReport",
    "DocumentInfo",
    "EntityRef",
    "Fact",
    "IngestReport",
    "MemoryReader",
    "MemoryStore",
    "PreparedDocument",
    "StoredSentence",
]


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
class Fact:
    relation_id: int
    subject: EntityRef
    predicate: str
    object: EntityRef
    support: tuple[int, ...]
    """Sequence numbers of the supporting sentences, in document order."""


def _json_ids(ids: Iterable[int]) -> str:
    return json.dumps(sorted(set(ids)))


_IN_IDS: Final = "(SELECT value FROM json_each(?))"
_IN_KEYS: Final = _IN_IDS


class MemoryStore:
    """The memory tables of one :class:`~qmesh.state.StateStore`."""

    def __init__(self, state: StateStore) -> None:
        self.state = state

    # -- writing ------------------------------------------------------------

    def ingest(self, document: PreparedDocument, *, replace: bool = False) -> IngestReport:
        """Store ``document``. The same text under the same id again changes
        nothing (``created=False``); other text under an existing id raises
        DocumentConflict unless ``replace``, which deletes the old one first
        in the same transaction. ProvenanceError if a fact would lack a source."""
        if len(document.sentences) != len(document.extractions):
            raise ProvenanceError("one extraction per sentence is required")
        for sentence in document.sentences:
            if document.text[sentence.start : sentence.end] != sentence.text:
                raise ProvenanceError(f"sentence {sentence.id} does not slice its document")
        try:
            with self.state._write() as conn:
                row = conn.execute(
                    "SELECT sha256, format FROM memory_documents WHERE id = ?", (document.id,)
                ).fetchone()
                replaced = False
                if row is not None:
                    if row[0] == document.sha256 and row[1] == document.format:
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
                    _delete(conn, document.id)
                    replaced = True
                mentions, relations = _insert(conn, document)
        except sqlite3.IntegrityError as exc:
            # The schema refused a fact without a source: the extractor's
            # output and the checks in Python disagree, which is a bug.
            raise ProvenanceError(f"the store refused an unsupported fact: {exc}") from exc
        return IngestReport(
            document.id, True, replaced, len(document.sentences), mentions, relations
        )

    def delete(self, document_id: str, *, owner: str | None = None) -> DeleteReport:
        """Delete a document, its sentences and every fact that only it
        supported; facts with other sources stay, with those sources. With
        ``owner``, refuse (NotDocumentOwner) unless that app added the document."""
        with self.state._write() as conn:
            if owner is not None:
                row = conn.execute(
                    "SELECT added_by FROM memory_documents WHERE id = ?", (document_id,)
                ).fetchone()
                if row is not None and row[0] != owner:
                    raise NotDocumentOwner(
                        f"document {document_id!r} was added by another application"
                    )
            return _delete(conn, document_id)

    # -- reading ------------------------------------------------------------

    @contextlib.contextmanager
    def reader(self) -> Iterator[MemoryReader]:
        """A consistent snapshot for a sequence of reads (one read transaction)."""
        with self.state._read() as conn:
            conn.execute("BEGIN")
            try:
                yield MemoryReader(conn)
            finally:
                conn.execute("COMMIT")

    def list_documents(self) -> list[DocumentInfo]:
        with self.reader() as reader:
            return reader.documents()

    def get_document(self, document_id: str) -> tuple[DocumentInfo, str, list[StoredSentence]]:
        """A document's record, its stored text and its sentences. DocumentNotFound."""
        with self.reader() as reader:
            return reader.document(document_id)

    def integrity_problems(self) -> dict[str, int]:
        """Counts of provenance violations over the whole store (all zero when sound)."""
        with self.reader() as reader:
            return reader.integrity_problems()


class MemoryReader:
    """Reads on one connection inside one transaction (see :meth:`MemoryStore.reader`)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def documents(self) -> list[DocumentInfo]:
        rows = self.conn.execute(
            "SELECT d.id, d.title, d.format, length(d.text),"
            " (SELECT count(*) FROM memory_sentences AS s WHERE s.document_id = d.id),"
            " d.sha256, d.added_by, d.extractor, d.created_at"
            " FROM memory_documents AS d ORDER BY d.created_at, d.id"
        ).fetchall()
        return [DocumentInfo(*row) for row in rows]

    def document(self, document_id: str) -> tuple[DocumentInfo, str, list[StoredSentence]]:
        row = self.conn.execute(
            "SELECT d.id, d.title, d.format, length(d.text),"
            " (SELECT count(*) FROM memory_sentences AS s WHERE s.document_id = d.id),"
            " d.sha256, d.added_by, d.extractor, d.created_at, d.text"
            " FROM memory_documents AS d WHERE d.id = ?",
            (document_id,),
        ).fetchone()
        if row is None:
            raise DocumentNotFound(f"no document with id {document_id!r}")
        sentences = [
            StoredSentence(r[0], r[1], r[2], r[3], r[4], r[5], title=row[1])
            for r in self.conn.execute(
                "SELECT seq, id, document_id, char_start, char_end, text FROM memory_sentences"
                " WHERE document_id = ? ORDER BY char_start",
                (document_id,),
            )
        ]
        return DocumentInfo(*row[:9]), row[9], sentences

    def entities_by_key(self, keys: Iterable[str]) -> dict[str, list[EntityRef]]:
        """For each key that names something: the entity with that key first,
        then every other entity that has a mention with that surface key."""
        keys_json = json.dumps(sorted(set(keys)))
        found: dict[str, list[EntityRef]] = {}
        for key, eid, name, kind, _ in self.conn.execute(
            "SELECT key, id, name, kind, 0 FROM memory_entities WHERE key IN " + _IN_KEYS
            + " UNION SELECT m.surface_key, e.id, e.name, e.kind, 1 FROM memory_mentions AS m"
            " JOIN memory_entities AS e ON e.id = m.entity_id"
            " WHERE m.surface_key IN " + _IN_KEYS + " ORDER BY 5, 2",
            (keys_json, keys_json),
        ).fetchall():  # fmt: skip
            refs = found.setdefault(key, [])
            if all(r.id != eid for r in refs):
                refs.append(EntityRef(eid, name, kind))
        return found

    def facts_about(self, entity_ids: Iterable[int], limit: int) -> list[Fact]:
        """Relations with one of ``entity_ids`` at either end (their 1-hop neighbourhood)."""
        ids = _json_ids(entity_ids)
        rows = self.conn.execute(
            "SELECT id FROM memory_relations WHERE subject_id IN " + _IN_IDS
            + " UNION SELECT id FROM memory_relations WHERE object_id IN " + _IN_IDS
            + " LIMIT ?",
            (ids, ids, limit),
        ).fetchall()  # fmt: skip
        return self.facts([r[0] for r in rows])

    def facts_in_sentences(self, seqs: Iterable[int]) -> list[Fact]:
        rows = self.conn.execute(
            "SELECT DISTINCT relation_id FROM memory_relation_support WHERE sentence_seq IN "
            + _IN_IDS,
            (_json_ids(seqs),),
        ).fetchall()
        return self.facts([r[0] for r in rows])

    def facts(self, relation_ids: Sequence[int]) -> list[Fact]:
        if not relation_ids:
            return []
        ids = _json_ids(relation_ids)
        support: dict[int, list[int]] = {}
        for rid, seq in self.conn.execute(
            "SELECT relation_id, sentence_seq FROM memory_relation_support"
            " WHERE relation_id IN " + _IN_IDS + " ORDER BY sentence_seq",
            (ids,),
        ):
            support.setdefault(rid, []).append(seq)
        facts = []
        for rid, sid, sname, skind, predicate, oid, oname, okind in self.conn.execute(
            "SELECT r.id, s.id, s.name, s.kind, r.predicate, o.id, o.name, o.kind"
            " FROM memory_relations AS r"
            " JOIN memory_entities AS s ON s.id = r.subject_id"
            " JOIN memory_entities AS o ON o.id = r.object_id"
            " WHERE r.id IN " + _IN_IDS + " ORDER BY r.id",
            (ids,),
        ):
            facts.append(
                Fact(
                    rid,
                    EntityRef(sid, sname, skind),
                    predicate,
                    EntityRef(oid, oname, okind),
                    tuple(support.get(rid, ())),
                )
            )
        return facts

    def sentences_mentioning(self, entity_ids: Iterable[int], limit: int) -> list[int]:
        rows = self.conn.execute(
            "SELECT DISTINCT sentence_seq FROM memory_mentions WHERE entity_id IN " + _IN_IDS
            + " ORDER BY sentence_seq LIMIT ?",
            (_json_ids(entity_ids), limit),
        ).fetchall()  # fmt: skip
        return [r[0] for r in rows]

    def search(
        self, terms: Sequence[str], limit: int, *, phrases: Sequence[str] = ()
    ) -> list[tuple[int, float]]:
        """Full-text hits (sentence seq, bm25 score; larger is better), best
        first: sentences with any of ``terms`` and, if given, every one of
        ``phrases``. Requiring the question's names keeps the match set
        small, so that bm25 does not have to score every sentence that
        says "founded"."""
        if not terms and not phrases:
            return []

        def quoted(text: str) -> str:
            return '"' + text.replace('"', '""') + '"'

        parts = [quoted(p) for p in phrases]
        if terms:
            parts.append("(" + " OR ".join(quoted(t) for t in terms) + ")")
        rows = self.conn.execute(
            "SELECT rowid, bm25(memory_sentences_fts) FROM memory_sentences_fts"
            " WHERE memory_sentences_fts MATCH ? ORDER BY rank LIMIT ?",
            (" AND ".join(parts), limit),
        ).fetchall()
        return [(int(r[0]), -float(r[1])) for r in rows]

    def sentences(self, seqs: Iterable[int]) -> dict[int, StoredSentence]:
        rows = self.conn.execute(
            "SELECT s.seq, s.id, s.document_id, s.char_start, s.char_end, s.text, d.title"
            " FROM memory_sentences AS s JOIN memory_documents AS d ON d.id = s.document_id"
            " WHERE s.seq IN " + _IN_IDS,
            (_json_ids(seqs),),
        ).fetchall()
        return {r[0]: StoredSentence(*r) for r in rows}

    def sentences_by_id(self, ids: Iterable[str]) -> dict[str, StoredSentence]:
        rows = self.conn.execute(
            "SELECT s.seq, s.id, s.document_id, s.char_start, s.char_end, s.text, d.title"
            " FROM memory_sentences AS s JOIN memory_documents AS d ON d.id = s.document_id"
            " WHERE s.id IN (SELECT value FROM json_each(?))",
            (json.dumps(sorted(set(ids))),),
        ).fetchall()
        return {r[1]: StoredSentence(*r) for r in rows}

    def mentions_in(self, seqs: Iterable[int]) -> dict[int, dict[int, str]]:
        """For each sentence: the entities it mentions, with their kinds."""
        found: dict[int, dict[int, str]] = {}
        for seq, eid, kind in self.conn.execute(
            "SELECT m.sentence_seq, m.entity_id, e.kind FROM memory_mentions AS m"
            " JOIN memory_entities AS e ON e.id = m.entity_id"
            " WHERE m.sentence_seq IN " + _IN_IDS,
            (_json_ids(seqs),),
        ):
            found.setdefault(seq, {})[eid] = kind
        return found

    def integrity_problems(self) -> dict[str, int]:
        checks = {
            "entities_without_mentions": "SELECT count(*) FROM memory_entities AS e WHERE NOT"
            " EXISTS (SELECT 1 FROM memory_mentions AS m WHERE m.entity_id = e.id)",
            "entities_named_by_no_mention": "SELECT count(*) FROM memory_entities AS e WHERE NOT"
            " EXISTS (SELECT 1 FROM memory_mentions AS m WHERE m.entity_id = e.id"
            " AND m.surface_key = e.key)",
            "relations_without_support": "SELECT count(*) FROM memory_relations AS r WHERE NOT"
            " EXISTS (SELECT 1 FROM memory_relation_support AS p WHERE p.relation_id = r.id)",
            "support_not_mentioning_both_ends": "SELECT count(*) FROM memory_relation_support"
            " AS p JOIN memory_relations AS r ON r.id = p.relation_id WHERE NOT EXISTS"
            " (SELECT 1 FROM memory_mentions WHERE entity_id = r.subject_id"
            " AND sentence_seq = p.sentence_seq) OR NOT EXISTS (SELECT 1 FROM memory_mentions"
            " WHERE entity_id = r.object_id AND sentence_seq = p.sentence_seq)",
            "mentions_not_slicing_their_sentence": "SELECT count(*) FROM memory_mentions AS m"
            " JOIN memory_sentences AS s ON s.seq = m.sentence_seq WHERE m.char_start <"
            " s.char_start OR m.char_end > s.char_end OR substr(s.text, m.char_start -"
            " s.char_start + 1, m.char_end - m.char_start) != m.surface",
            "sentences_not_slicing_their_document": "SELECT count(*) FROM memory_sentences AS s"
            " JOIN memory_documents AS d ON d.id = s.document_id WHERE"
            " substr(d.text, s.char_start + 1, s.char_end - s.char_start) != s.text",
            "dangling_anchors": "SELECT (SELECT count(*) FROM memory_entities AS e WHERE NOT"
            " EXISTS (SELECT 1 FROM memory_mentions AS m WHERE m.entity_id = e.id AND"
            " m.sentence_seq = e.anchor_seq AND m.char_start = e.anchor_start)) + (SELECT"
            " count(*) FROM memory_relations AS r WHERE NOT EXISTS (SELECT 1 FROM"
            " memory_relation_support AS p WHERE p.relation_id = r.id AND p.sentence_seq ="
            " r.anchor_seq))",
            "fts_rows_missing": "SELECT (SELECT count(*) FROM memory_sentences) -"
            " (SELECT count(*) FROM memory_sentences_fts_docsize)",
        }
        problems = {name: int(self.conn.execute(sql).fetchone()[0]) for name, sql in checks.items()}
        problems["foreign_key_violations"] = sum(
            len(self.conn.execute(f"PRAGMA foreign_key_check({table})").fetchall())
            for table in (
                "memory_sentences",
                "memory_entities",
                "memory_mentions",
                "memory_relations",
                "memory_relation_support",
            )
        )
        return problems


# -- ingest -------------------------------------------------------------------


class _Resolver:
    """Maps mentions of one document to entity ids, creating and merging entities."""

    def __init__(self, conn: sqlite3.Connection) -> None:
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
                    " VALUES (?, ?, ?, ?, ?)",
                    (key, surface, kind, seq, start),
                ).lastrowid
                or 0
            )
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


def _insert(conn: sqlite3.Connection, document: PreparedDocument) -> tuple[int, int]:
    conn.execute(
        "INSERT INTO memory_documents (id, title, format, text, sha256, source_sha256, added_by,"
        " extractor, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            document.id,
            document.title,
            document.format,
            document.text,
            document.sha256,
            document.source_sha256,
            document.added_by,
            document.extractor,
            time.time(),
        ),
    )
    resolver = _Resolver(conn)
    mention_count = 0
    supports: set[tuple[int, int]] = set()
    for sentence, extraction in zip(document.sentences, document.extractions, strict=True):
        seq = int(
            conn.execute(
                "INSERT INTO memory_sentences (id, document_id, char_start, char_end, text)"
                " VALUES (?, ?, ?, ?, ?)",
                (sentence.id, document.id, sentence.start, sentence.end, sentence.text),
            ).lastrowid
            or 0
        )
        entities: list[int | None] = []
        for mention in extraction.mentions:
            key = entity_key(mention.text)
            if not key:
                entities.append(None)
                continue
            start = sentence.start + mention.start
            entity = resolver.resolve(key, mention.text, mention.kind, seq, start)
            conn.execute(
                "INSERT OR IGNORE INTO memory_mentions (entity_id, sentence_seq, char_start,"
                " char_end, surface, surface_key) VALUES (?, ?, ?, ?, ?, ?)",
                (entity, seq, start, sentence.start + mention.end, mention.text, key),
            )
            mention_count += 1
            entities.append(entity)
        for a, b in extraction.same_as:
            ea, eb = entities[a], entities[b]
            if ea is not None and eb is not None:
                resolver.merge(ea, eb)
        for relation in extraction.relations:
            subject, obj = entities[relation.subject], entities[relation.object]
            if subject is None or obj is None:
                continue
            subject, obj = resolver.canonical(subject), resolver.canonical(obj)
            if subject == obj:
                continue
            relation_id = _relation(conn, subject, relation.predicate, obj, seq)
            conn.execute(
                "INSERT OR IGNORE INTO memory_relation_support (relation_id, sentence_seq)"
                " VALUES (?, ?)",
                (relation_id, seq),
            )
            supports.add((relation_id, seq))
    return mention_count, len(supports)


def _relation(conn: sqlite3.Connection, subject: int, predicate: str, obj: int, seq: int) -> int:
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
            " VALUES (?, ?, ?, ?)",
            (subject, predicate, obj, seq),
        ).lastrowid
        or 0
    )


def _merge(conn: sqlite3.Connection, keep: int, drop: int) -> None:
    """Fold entity ``drop`` into ``keep``: its mentions and its relations'
    supporting sentences move to ``keep``; then ``drop`` is deleted."""
    conn.execute(
        "INSERT OR IGNORE INTO memory_mentions (entity_id, sentence_seq, char_start, char_end,"
        " surface, surface_key) SELECT ?, sentence_seq, char_start, char_end, surface,"
        " surface_key FROM memory_mentions WHERE entity_id = ?",
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
            "INSERT OR IGNORE INTO memory_relation_support (relation_id, sentence_seq)"
            " VALUES (?, ?)",
            [(target, seq) for seq in support],
        )
    conn.execute("DELETE FROM memory_entities WHERE id = ?", (drop,))


def _delete(conn: sqlite3.Connection, document_id: str) -> DeleteReport:
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
    # whose last source went is deleted.
    conn.execute("DELETE FROM memory_documents WHERE id = ?", (document_id,))
    kept_entities = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM memory_entities WHERE id IN " + _IN_IDS, (_json_ids(entities),)
        )
    ]
    _relabel(conn, kept_entities)
    kept_relations = conn.execute(
        "SELECT count(*) FROM memory_relations WHERE id IN " + _IN_IDS, (_json_ids(relations),)
    ).fetchone()[0]
    return DeleteReport(
        document_id=document_id,
        sentences=int(sentences),
        entities_removed=len(entities) - len(kept_entities),
        entities_kept=len(kept_entities),
        relations_removed=len(relations) - int(kept_relations),
        relations_kept=int(kept_relations),
    )


def _relabel(conn: sqlite3.Connection, entity_ids: Sequence[int]) -> None:
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
            " GROUP BY surface_key ORDER BY count(*) DESC, length(surface_key) DESC LIMIT 1",
            (entity,),
        ).fetchone()
        other = conn.execute("SELECT id FROM memory_entities WHERE key = ?", (key,)).fetchone()
        if other is not None:
            _merge(conn, int(other[0]), entity)
        else:
            conn.execute(
                "UPDATE memory_entities SET key = ?, name = ? WHERE id = ?", (key, surface, entity)
            )
