"""The graph memory's reads: what one reader may see of documents,
sentences, entities and relations, inside one transaction.

For: every look-up a query, a listing or the integrity check makes; each
answers from the sentences of documents the reader's :class:`Access` may
see, so nothing of a private document reaches another app. Not for:
writes (:mod:`qmesh.memory.store`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Final

from qmesh.memory.coref import is_description
from qmesh.memory.errors import (
    DocumentNotFound,
)
from qmesh.memory.records import (
    OPERATOR,
    Access,
    DocumentInfo,
    EntityRef,
    Fact,
    Lists,
    MentionSpan,
    StoredSentence,
    document_info,
)
from qmesh.memory.terms import entity_key
from qmesh.state.db import Connection, Dialect

__all__ = ["MemoryReader"]

_MEMORY_TABLES: Final = (
    "memory_sentences",
    "memory_entities",
    "memory_mentions",
    "memory_relations",
    "memory_relation_support",
)


class MemoryReader:
    """Reads on one connection inside one transaction (see
    :meth:`MemoryStore.reader`), of what ``access`` may see: every method
    answers from the sentences of visible documents only."""

    def __init__(self, conn: Connection, dialect: Dialect, access: Access = OPERATOR) -> None:
        self.conn = conn
        self.dialect = dialect
        self.access = access
        self._lists = Lists(dialect)
        visible, self._params = access.visible("d")
        # Sentences (aliased s) of visible documents; "?" stands for _params.
        self._sentence_visible = (
            "EXISTS (SELECT 1 FROM memory_documents AS d WHERE d.id = s.document_id AND "
            + visible + ")"
        )  # fmt: skip
        self._document_visible = visible

    def _visible_sentence(self, seq_column: str) -> str:
        """A condition that the sentence ``seq_column`` is in a visible document."""
        if self.access.everything:
            return "TRUE"
        return (
            f"EXISTS (SELECT 1 FROM memory_sentences AS s WHERE s.seq = {seq_column} AND "
            + self._sentence_visible + ")"
        )  # fmt: skip

    def documents(self) -> list[DocumentInfo]:
        rows = self.conn.execute(
            "SELECT d.id, d.title, d.format, length(d.text),"
            " (SELECT count(*) FROM memory_sentences AS s WHERE s.document_id = d.id),"
            " d.sha256, d.added_by, d.extractor, d.created_at, d.shared"
            " FROM memory_documents AS d WHERE " + self._document_visible
            + " ORDER BY d.created_at, d.id",
            self._params,
        ).fetchall()  # fmt: skip
        return [document_info(row) for row in rows]

    def document(self, document_id: str) -> tuple[DocumentInfo, str, list[StoredSentence]]:
        row = self.conn.execute(
            "SELECT d.id, d.title, d.format, length(d.text),"
            " (SELECT count(*) FROM memory_sentences AS s WHERE s.document_id = d.id),"
            " d.sha256, d.added_by, d.extractor, d.created_at, d.shared, d.text"
            " FROM memory_documents AS d WHERE d.id = ? AND " + self._document_visible,
            (document_id, *self._params),
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
        return document_info(row[:10]), row[10], sentences

    def entities_by_key(self, keys: Iterable[str]) -> dict[str, list[EntityRef]]:
        """For each key that names something: the entity with that key first,
        then every other entity that has a mention with that surface key.
        Only visible mentions count: that an alias ("International Business
        Machines" for "IBM") was learnt from a document the reader cannot
        see must not let the reader look an entity up by it. (An entity's own
        key is the surface key of one of its mentions, so for the operator
        this is every entity with that key.)"""
        found: dict[str, list[EntityRef]] = {}
        for key, eid, kind, _ in self.conn.execute(
            "SELECT DISTINCT v.surface_key, e.id, e.kind, e.key != v.surface_key"
            " FROM memory_mentions AS v JOIN memory_entities AS e ON e.id = v.entity_id"
            " WHERE " + self._lists.among("v.surface_key") + " AND "
            + self._visible_sentence("v.sentence_seq") + " ORDER BY 4, 2",
            (self._lists.of(keys), *self._params),
        ).fetchall():  # fmt: skip
            refs = found.setdefault(key, [])
            if all(r.id != eid for r in refs):
                refs.append(EntityRef(eid, "", kind))
        names = self._names({r.id for refs in found.values() for r in refs})
        return {
            key: [EntityRef(r.id, names[r.id], r.kind) for r in refs if r.id in names]
            for key, refs in found.items()
        }

    def entities_by_prefix(self, prefixes: Iterable[str]) -> dict[str, list[EntityRef]]:
        """For each prefix (a key of one or more words): the visible entities
        whose key starts with it and goes on with more words ("globex" →
        "globex industries"), for a short name that no mention wrote."""
        found: dict[str, list[EntityRef]] = {}
        for prefix in sorted(set(prefixes)):
            head = prefix + " "
            rows = self.conn.execute(
                "SELECT e.id, e.kind FROM memory_entities AS e"
                " WHERE substr(e.key, 1, ?) = ? AND EXISTS (SELECT 1 FROM memory_mentions AS v"
                " WHERE v.entity_id = e.id AND " + self._visible_sentence("v.sentence_seq")
                + ") ORDER BY e.id LIMIT 3",
                (len(head), head, *self._params),
            ).fetchall()  # fmt: skip
            if rows:
                found[prefix] = [EntityRef(int(r[0]), "", r[1]) for r in rows]
        names = self._names({r.id for refs in found.values() for r in refs})
        return {
            prefix: [EntityRef(r.id, names[r.id], r.kind) for r in refs if r.id in names]
            for prefix, refs in found.items()
        }

    def _names(self, entity_ids: Iterable[int]) -> dict[int, str]:
        """Each entity's name as this reader may see it: its own name when a
        visible mention says it, else the commonest visible surface of its
        key, else of any visible mention (the name may come from a document
        the reader cannot see). Entities with no visible mention are left out."""
        ids = self._lists.of(entity_ids)
        if self.access.everything:
            return {
                int(r[0]): r[1]
                for r in self.conn.execute(
                    "SELECT id, name FROM memory_entities WHERE " + self._lists.among("id"), (ids,)
                )
            }
        surfaces: dict[int, Counter[tuple[bool, str]]] = {}
        own: dict[int, str] = {}
        for eid, name, key, surface, surface_key, count in self.conn.execute(
            "SELECT e.id, e.name, e.key, v.surface, v.surface_key, count(*)"
            " FROM memory_mentions AS v JOIN memory_entities AS e ON e.id = v.entity_id"
            " WHERE " + self._lists.among("v.entity_id") + " AND "
            + self._visible_sentence("v.sentence_seq")
            + " GROUP BY e.id, v.surface, v.surface_key",
            (ids, *self._params),
        ):  # fmt: skip
            if surface == name:
                own[eid] = name
            surfaces.setdefault(eid, Counter())[(surface_key == key, surface)] += count
        names = {}
        for eid, counts in surfaces.items():
            # Names before pronouns and descriptions ("it" is keyed by what it
            # stands for), then own-key surfaces, the commonest, the smallest.
            best = min(
                counts.items(),
                key=lambda item: (
                    is_description(item[0][1]),
                    not item[0][0],
                    -item[1],
                    item[0][1],
                ),
            )
            names[eid] = own.get(eid, best[0][1])
        return names

    def facts_about(self, entity_ids: Iterable[int], limit: int) -> list[Fact]:
        """Relations with one of ``entity_ids`` at either end (their 1-hop
        neighbourhood) that a visible sentence supports."""
        ids = self._lists.of(entity_ids)
        supported = self._supported("r.id")
        rows = self.conn.execute(
            "SELECT r.id FROM memory_relations AS r WHERE " + self._lists.among("r.subject_id")
            + " AND " + supported
            + " UNION SELECT r.id FROM memory_relations AS r WHERE "
            + self._lists.among("r.object_id") + " AND " + supported + " ORDER BY 1 LIMIT ?",
            (ids, *self._params, ids, *self._params, limit),
        ).fetchall()  # fmt: skip
        return self.facts([r[0] for r in rows])

    def _supported(self, relation_column: str) -> str:
        """A condition that a visible sentence supports ``relation_column``."""
        if self.access.everything:
            return "TRUE"
        return (
            "EXISTS (SELECT 1 FROM memory_relation_support AS p WHERE p.relation_id = "
            + relation_column + " AND " + self._visible_sentence("p.sentence_seq") + ")"
        )  # fmt: skip

    def facts_in_sentences(self, seqs: Iterable[int]) -> list[Fact]:
        rows = self.conn.execute(
            "SELECT DISTINCT p.relation_id FROM memory_relation_support AS p"
            " WHERE " + self._lists.among("p.sentence_seq") + " AND "
            + self._visible_sentence("p.sentence_seq"),
            (self._lists.of(seqs), *self._params),
        ).fetchall()  # fmt: skip
        return self.facts([r[0] for r in rows])

    def facts(self, relation_ids: Sequence[int]) -> list[Fact]:
        """The relations, each with its visible supporting sentences (one
        with none is left out) and the names this reader may see."""
        if not relation_ids:
            return []
        ids = self._lists.of(relation_ids)
        support: dict[int, list[int]] = {}
        for rid, seq in self.conn.execute(
            "SELECT p.relation_id, p.sentence_seq FROM memory_relation_support AS p"
            " WHERE " + self._lists.among("p.relation_id") + " AND "
            + self._visible_sentence("p.sentence_seq") + " ORDER BY p.sentence_seq",
            (ids, *self._params),
        ):  # fmt: skip
            support.setdefault(rid, []).append(seq)
        rows = self.conn.execute(
            "SELECT r.id, s.id, s.kind, r.predicate, o.id, o.kind"
            " FROM memory_relations AS r"
            " JOIN memory_entities AS s ON s.id = r.subject_id"
            " JOIN memory_entities AS o ON o.id = r.object_id"
            " WHERE " + self._lists.among("r.id") + " ORDER BY r.id",
            (ids,),
        ).fetchall()
        rows = [row for row in rows if row[0] in support]
        names = self._names({row[1] for row in rows} | {row[4] for row in rows})
        facts = []
        for rid, sid, skind, predicate, oid, okind in rows:
            if sid not in names or oid not in names:
                continue  # cannot happen: a support mentions both ends
            facts.append(
                Fact(
                    rid,
                    EntityRef(sid, names[sid], skind),
                    predicate,
                    EntityRef(oid, names[oid], okind),
                    tuple(support[rid]),
                )
            )
        return facts

    def sentences_mentioning(self, entity_ids: Iterable[int], limit: int) -> list[int]:
        rows = self.conn.execute(
            "SELECT DISTINCT m.sentence_seq FROM memory_mentions AS m WHERE "
            + self._lists.among("m.entity_id") + " AND " + self._visible_sentence("m.sentence_seq")
            + " ORDER BY m.sentence_seq LIMIT ?",
            (self._lists.of(entity_ids), *self._params, limit),
        ).fetchall()  # fmt: skip
        return [r[0] for r in rows]

    def search(self, terms: Sequence[str], limit: int, *, phrases: Sequence[str] = ()) -> list[int]:
        """Full-text hits (sentence seqs), best first: visible sentences
        with any of ``terms`` and, if given, every one of ``phrases``.
        Requiring the question's names keeps the match set small, so that
        ranking does not have to score every sentence that says "founded".
        SQLite ranks by FTS5's bm25, PostgreSQL by ``ts_rank`` normalised by
        length; only which sentences are among the best ``limit`` depends on
        it (the query scores the hits itself, alike on both)."""
        if not terms and not phrases:
            return []
        if self.dialect == "postgresql":
            return self._search_tsvector(terms, limit, phrases)

        def quoted(text: str) -> str:
            return '"' + text.replace('"', '""') + '"'

        parts = [quoted(p) for p in phrases]
        if terms:
            parts.append("(" + " OR ".join(quoted(t) for t in terms) + ")")
        rows = self.conn.execute(
            "SELECT rowid FROM memory_sentences_fts"
            " WHERE memory_sentences_fts MATCH ? AND "
            + self._visible_sentence("memory_sentences_fts.rowid") + " ORDER BY rank LIMIT ?",
            (" AND ".join(parts), *self._params, limit),
        ).fetchall()  # fmt: skip
        return [int(r[0]) for r in rows]

    def _search_tsvector(
        self, terms: Sequence[str], limit: int, phrases: Sequence[str]
    ) -> list[int]:
        # Each term and phrase is one bound parameter, read as a phrase in the
        # index's own configuration: the same words, stems and folding.
        phrase = "phraseto_tsquery('memory_search', memory_fold(?))"
        query = " && ".join(
            [phrase] * len(phrases)
            + (["(" + " || ".join([phrase] * len(terms)) + ")"] if terms else [])
        )
        rows = self.conn.execute(
            "SELECT hit.seq FROM memory_sentences AS hit,"
            " (SELECT " + query + " AS query) AS q"
            " WHERE hit.search @@ q.query AND " + self._visible_sentence("hit.seq")
            + " ORDER BY ts_rank(hit.search, q.query, 1) DESC, hit.seq LIMIT ?",
            (*phrases, *terms, *self._params, limit),
        ).fetchall()  # fmt: skip
        return [int(r[0]) for r in rows]

    def sentences(self, seqs: Iterable[int]) -> dict[int, StoredSentence]:
        rows = self.conn.execute(
            "SELECT s.seq, s.id, s.document_id, s.char_start, s.char_end, s.text, d.title"
            " FROM memory_sentences AS s JOIN memory_documents AS d ON d.id = s.document_id"
            " WHERE " + self._lists.among("s.seq") + " AND " + self._document_visible,
            (self._lists.of(seqs), *self._params),
        ).fetchall()
        return {r[0]: StoredSentence(*r) for r in rows}

    def sentences_by_id(self, ids: Iterable[str]) -> dict[str, StoredSentence]:
        rows = self.conn.execute(
            "SELECT s.seq, s.id, s.document_id, s.char_start, s.char_end, s.text, d.title"
            " FROM memory_sentences AS s JOIN memory_documents AS d ON d.id = s.document_id"
            " WHERE " + self._lists.among("s.id") + " AND " + self._document_visible,
            (self._lists.of(ids), *self._params),
        ).fetchall()
        return {r[1]: StoredSentence(*r) for r in rows}

    def mentions_in(self, seqs: Iterable[int]) -> dict[int, dict[int, str]]:
        """For each visible sentence: the entities it mentions, with their kinds."""
        found: dict[int, dict[int, str]] = {}
        for seq, eid, kind in self.conn.execute(
            "SELECT m.sentence_seq, m.entity_id, e.kind FROM memory_mentions AS m"
            " JOIN memory_entities AS e ON e.id = m.entity_id"
            " WHERE " + self._lists.among("m.sentence_seq") + " AND "
            + self._visible_sentence("m.sentence_seq"),
            (self._lists.of(seqs), *self._params),
        ):  # fmt: skip
            found.setdefault(seq, {})[eid] = kind
        return found

    def mention_spans(self, seqs: Iterable[int]) -> dict[int, list[MentionSpan]]:
        """For each visible sentence: its mentions, in order, with their
        entities (named as this reader may see them)."""
        rows = self.conn.execute(
            "SELECT m.sentence_seq, m.entity_id, e.kind, e.key, m.char_start, m.char_end,"
            " m.surface FROM memory_mentions AS m"
            " JOIN memory_entities AS e ON e.id = m.entity_id"
            " WHERE " + self._lists.among("m.sentence_seq") + " AND "
            + self._visible_sentence("m.sentence_seq") + " ORDER BY m.sentence_seq, m.char_start",
            (self._lists.of(seqs), *self._params),
        ).fetchall()  # fmt: skip
        names = self._names({r[1] for r in rows})
        found: dict[int, list[MentionSpan]] = {}
        for seq, eid, kind, key, start, end, surface in rows:
            if eid not in names:
                continue
            found.setdefault(seq, []).append(
                MentionSpan(
                    EntityRef(eid, names[eid], kind),
                    start,
                    end,
                    surface,
                    resolved=entity_key(surface) != key,
                )
            )
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
        }
        if self.dialect == "sqlite":
            checks["fts_rows_missing"] = (
                "SELECT (SELECT count(*) FROM memory_sentences) -"
                " (SELECT count(*) FROM memory_sentences_fts_docsize)"
            )
        problems = {name: int(self.conn.execute(sql).fetchone()[0]) for name, sql in checks.items()}
        if self.dialect == "sqlite":
            # PostgreSQL checks every foreign key at its statement or COMMIT,
            # and derives the search column from the text: nothing to count.
            problems["foreign_key_violations"] = sum(
                len(self.conn.execute(f"PRAGMA foreign_key_check({table})").fetchall())
                for table in _MEMORY_TABLES
            )
        else:
            problems["fts_rows_missing"] = problems["foreign_key_violations"] = 0
        return problems
