"""The graph memory on a real state store, SQLite and PostgreSQL: ingest,
questions with citations, provenance enforced by the schema, entity
merging, deletion, and the check of LLM-composed answers."""

from __future__ import annotations

import contextlib
import functools
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from memory_corpus import DOCUMENTS, QUESTIONS

from qmesh.memory.errors import (
    DocumentConflict,
    DocumentNotFound,
    DocumentTooLarge,
    InvalidDocument,
    InvalidQuestion,
    NotDocumentOwner,
    ProvenanceError,
)
from qmesh.memory.extraction import Extraction, Mention, Relation
from qmesh.memory.query import NOT_FOUND, Answer
from qmesh.memory.records import OPERATOR, Access
from qmesh.memory.service import Memory
from qmesh.memory.verify import Source, verify_answer
from qmesh.state import StateStore
from qmesh.state.db import DATABASE_ERRORS, INTEGRITY_ERRORS, Connection


@pytest.fixture
def state(state_location: str | Path) -> Iterator[StateStore]:
    with StateStore.open(state_location) as store:
        yield store


@pytest.fixture
def memory(state: StateStore) -> Memory:
    memory = Memory(state)
    for document_id, (fmt, text) in DOCUMENTS.items():
        memory.add(text, format=fmt, document_id=document_id)
    return memory


@contextlib.contextmanager
def raw(state: StateStore) -> Iterator[Connection]:
    """A connection outside the memory's code, as a person with the sqlite3
    shell (foreign keys on, as the store runs) or psql would have; each
    statement is its own transaction unless it says BEGIN."""
    if state.path is None:
        with state._read() as conn:  # a session of its own, in autocommit
            yield conn
        return
    conn = sqlite3.connect(state.path, isolation_level=None)
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        yield conn
    finally:
        conn.close()


def answer_sentences(answer: Answer) -> set[str]:
    used = {c.n for c in answer.citations if f"[{c.n}]" in answer.answer}
    return {c.text for c in answer.citations if c.n in used}


def assert_sound(state: StateStore) -> None:
    """Provenance over the whole store, checked with SQL written here (not
    the store's own check)."""
    with raw(state) as conn:
        queries = {
            "entity without a mention": "SELECT id FROM memory_entities e WHERE NOT EXISTS"
            " (SELECT 1 FROM memory_mentions m WHERE m.entity_id = e.id)",
            "relation without a supporting sentence": "SELECT id FROM memory_relations r WHERE"
            " NOT EXISTS (SELECT 1 FROM memory_relation_support p WHERE p.relation_id = r.id)",
            "support that does not mention the subject": "SELECT p.relation_id FROM"
            " memory_relation_support p JOIN memory_relations r ON r.id = p.relation_id WHERE"
            " NOT EXISTS (SELECT 1 FROM memory_mentions m WHERE m.entity_id = r.subject_id AND"
            " m.sentence_seq = p.sentence_seq)",
            "support that does not mention the object": "SELECT p.relation_id FROM"
            " memory_relation_support p JOIN memory_relations r ON r.id = p.relation_id WHERE"
            " NOT EXISTS (SELECT 1 FROM memory_mentions m WHERE m.entity_id = r.object_id AND"
            " m.sentence_seq = p.sentence_seq)",
            "support by a missing sentence": "SELECT relation_id FROM memory_relation_support"
            " WHERE sentence_seq NOT IN (SELECT seq FROM memory_sentences)",
            "mention in a missing sentence": "SELECT entity_id FROM memory_mentions"
            " WHERE sentence_seq NOT IN (SELECT seq FROM memory_sentences)",
            "entity named by none of its mentions": "SELECT id FROM memory_entities e WHERE NOT"
            " EXISTS (SELECT 1 FROM memory_mentions m WHERE m.entity_id = e.id AND"
            " m.surface_key = e.key)",
        }
        for problem, sql in queries.items():
            assert conn.execute(sql).fetchall() == [], problem
        documents = dict(conn.execute("SELECT id, text FROM memory_documents"))
        for document_id, start, end, text in conn.execute(
            "SELECT document_id, char_start, char_end, text FROM memory_sentences"
        ):
            assert documents[document_id][start:end] == text
        for start, end, surface, s_start, s_text in conn.execute(
            "SELECT m.char_start, m.char_end, m.surface, s.char_start, s.text"
            " FROM memory_mentions m JOIN memory_sentences s ON s.seq = m.sentence_seq"
        ):
            assert s_text[start - s_start : end - s_start] == surface
    assert set(state_problems(state).values()) == {0}


def state_problems(state: StateStore) -> dict[str, int]:
    return Memory(state).store.integrity_problems()


def search_hits(state: StateStore, conn: Connection, word: str) -> int:
    """Sentences the full-text index finds ``word`` in."""
    sql = (
        "SELECT count(*) FROM memory_sentences_fts WHERE memory_sentences_fts MATCH ?"
        if state.dialect == "sqlite"
        else "SELECT count(*) FROM memory_sentences WHERE search @@ to_tsquery('memory_search', ?)"
    )
    return int(conn.execute(sql, (word,)).fetchone()[0])


def count(state: StateStore, table: str) -> int:
    with raw(state) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


# -- ingest and questions -----------------------------------------------------------


def test_every_fact_has_provenance_after_ingest(memory: Memory, state: StateStore) -> None:
    assert count(state, "memory_relations") >= 25
    assert count(state, "memory_entities") >= 30
    assert_sound(state)


@pytest.mark.parametrize("question", list(QUESTIONS))
def test_questions_cite_exactly_the_supporting_sentences(memory: Memory, question: str) -> None:
    answer = memory.ask(question, access=OPERATOR)
    expected = set(QUESTIONS[question])
    if not expected:
        assert not answer.found
        assert answer.answer == NOT_FOUND
        assert not answer.conflicts
        return
    assert answer.found
    assert answer_sentences(answer) == expected
    # The answer is those sentences, quoted, each followed by its markers.
    assert answer.answer.replace("[", "\x00[").count("\x00") >= len(expected)
    for text in expected:
        assert text in answer.answer


def test_citations_slice_the_original_document(memory: Memory) -> None:
    checked = 0
    for question in QUESTIONS:
        answer = memory.ask(question, access=OPERATOR)
        for citation in (*answer.citations, *(c for f in answer.facts for c in f.citations)):
            fmt, source = DOCUMENTS[citation.document_id]
            # Plain text is stored as given, so the caller's own string slices;
            # Markdown and HTML are stored as the converted text.
            stored = memory.document(citation.document_id, access=OPERATOR)[1]
            original = source if fmt == "text" else stored
            assert original[citation.start : citation.end] == citation.text
            assert citation.sentence_id.startswith(f"{citation.document_id}:{citation.start}-")
            checked += 1
    assert checked > 40


def test_conflicting_sources_are_reported_with_their_citations(memory: Memory) -> None:
    answer = memory.ask("When was Acme founded?", access=OPERATOR)
    (conflict,) = answer.conflicts
    assert conflict.about == "Acme Corporation"
    assert conflict.predicate == "founded"
    values = dict(conflict.values)
    assert set(values) == {"1998", "1999"}
    by_number = {c.n: c for c in answer.citations}
    assert {by_number[n].document_id for n in values["1998"]} == {"acme-history"}
    assert {by_number[n].document_id for n in values["1999"]} == {"acme-wiki"}
    headquarters = memory.ask("Where is Acme headquartered?", access=OPERATOR).conflicts
    assert [dict(c.values).keys() for c in headquarters] == [{"Springfield", "Shelbyville"}]


def test_facts_of_the_neighbourhood_are_returned_with_citations(memory: Memory) -> None:
    answer = memory.ask("Who founded Acme?", limit=5, access=OPERATOR)
    assert len(answer.facts) == 5
    top = {(f.subject, f.predicate, f.object) for f in answer.facts[:2]}
    assert top == {
        ("Jane Doe", "founded", "Acme Corporation"),
        ("John Smith", "founded", "Acme Corporation"),
    }
    jane = next(f for f in answer.facts if f.subject == "Jane Doe" and f.predicate == "founded")
    assert {c.document_id for c in jane.citations} == {"acme-history", "acme-wiki"}
    assert answer.entities == ("Acme Corporation",)
    # Unsupported: the facts about Initech are still there, the answer is not.
    initech = memory.ask("Who is the CEO of Initech?", access=OPERATOR)
    assert not initech.found
    assert any(f.object == "Initech" for f in initech.facts)


def test_aliases_and_surnames_join_one_entity(memory: Memory) -> None:
    ibm = memory.ask("Who is the CEO of International Business Machines?", access=OPERATOR)
    assert ibm.entities == ("International Business Machines",)
    doe = memory.ask("Where did Doe work before?", access=OPERATOR)
    assert "Jane Doe" in doe.entities
    assert any(
        f.subject == "Jane Doe" and f.predicate == "works for" and f.object == "Globex Corporation"
        for f in doe.facts
    )


def test_question_and_document_limits(memory: Memory, state: StateStore) -> None:
    for question, limit in (("", 10), ("   ", 10), ("x" * 5000, 10), ("ok?", 0), ("ok?", 101)):
        with pytest.raises(InvalidQuestion):
            memory.ask(question, limit, access=OPERATOR)
    with pytest.raises(InvalidQuestion):
        memory.ask("ok?", True, access=OPERATOR)
    small = Memory(state, max_document_bytes=100)
    with pytest.raises(DocumentTooLarge, match="limit is 100"):
        small.add("x " * 60)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"text": ""}, "empty"),
        ({"text": " \n "}, "empty"),
        ({"text": 5}, "string"),
        ({"text": "Fine.", "format": "pdf"}, "format"),
        ({"text": "Fine.", "document_id": "a:b"}, "document id"),
        ({"text": "Fine.", "document_id": ""}, "document id"),
        ({"text": "Fine.", "title": "t" * 301}, "title"),
        ({"text": "<script>only()</script>", "format": "html"}, "no text left"),
    ]
    for kwargs, message in bad:
        with pytest.raises(InvalidDocument, match=message):
            memory.add(**kwargs)


def test_same_text_is_idempotent_and_other_text_needs_replace(memory: Memory) -> None:
    fmt, text = DOCUMENTS["globex-press"]
    again = memory.add(text, format=fmt, document_id="globex-press")
    assert not again.created
    with pytest.raises(DocumentConflict):
        memory.add("Globex was founded in 1989.", document_id="globex-press")
    replaced = memory.add("Globex was founded in 1989.", document_id="globex-press", replace=True)
    assert replaced.created and replaced.replaced
    assert memory.ask("When was Globex founded?", access=OPERATOR).found
    assert not memory.ask("Who is the CEO of Globex?", access=OPERATOR).found
    generated = memory.add("Initech is based in Austin.")
    assert generated.document_id.startswith("doc-")
    assert memory.add("Initech is based in Austin.").document_id == generated.document_id


# -- deletion -----------------------------------------------------------------------


def test_deleting_a_document_keeps_facts_with_other_sources(
    memory: Memory, state: StateStore
) -> None:
    before = memory.ask("Who founded Acme?", access=OPERATOR)
    jane = next(f for f in before.facts if f.subject == "Jane Doe" and f.predicate == "founded")
    assert {c.document_id for c in jane.citations} == {"acme-history", "acme-wiki"}

    with raw(state) as conn:
        assert search_hits(state, conn, "Shelbyville") > 0
    report = memory.delete("acme-wiki", access=OPERATOR)
    assert report.sentences == 5
    assert report.relations_removed > 0 and report.relations_kept > 0
    assert_sound(state)

    after = memory.ask("Who founded Acme?", access=OPERATOR)
    facts = {(f.subject, f.predicate, f.object): f for f in after.facts}
    # Supported by both: kept, now with only the remaining source.
    kept = facts[("Jane Doe", "founded", "Acme Corporation")]
    assert {c.document_id for c in kept.citations} == {"acme-history"}
    acquired = memory.ask("What did Acme acquire?", access=OPERATOR)
    initech = next(f for f in acquired.facts if f.predicate == "acquired")
    assert {c.document_id for c in initech.citations} == {"acme-history"}
    # Supported only by the deleted document: gone, and so are its entities.
    assert ("John Smith", "founded", "Acme Corporation") not in facts
    assert not memory.ask("Who does John Smith work for?", access=OPERATOR).found
    assert memory.ask("When was Acme founded?", access=OPERATOR).conflicts == ()
    assert answer_sentences(after) == {
        "Acme Corporation was founded in 1998 by Jane Doe in Springfield."
    }
    with raw(state) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM memory_entities")}
        assert "John Smith" not in names and "Shelbyville" not in names
        assert conn.execute(
            "SELECT count(*) FROM memory_sentences WHERE document_id = 'acme-wiki'"
        ).fetchone() == (0,)
        assert search_hits(state, conn, "Shelbyville") == 0
    with pytest.raises(DocumentNotFound):
        memory.delete("acme-wiki", access=OPERATOR)


def test_deleting_everything_leaves_an_empty_graph(memory: Memory, state: StateStore) -> None:
    for document in memory.documents(access=OPERATOR):
        memory.delete(document.id, access=OPERATOR)
    for table in ("memory_sentences", "memory_entities", "memory_mentions", "memory_relations",
                  "memory_relation_support"):  # fmt: skip
        assert count(state, table) == 0, table
    if state.dialect == "sqlite":
        assert count(state, "memory_sentences_fts") == 0


def test_only_the_owner_deletes(state: StateStore) -> None:
    memory = Memory(state)
    memory.add("Initech is based in Austin.", document_id="n", added_by="app-a", shared=True)
    with pytest.raises(NotDocumentOwner):
        memory.delete("n", access=Access.of_app("app-b"))
    memory.delete("n", access=Access.of_app("app-a"))


@pytest.mark.parametrize("definition_first", [True, False])
def test_alias_merge_keeps_provenance_and_survives_deletion(
    state: StateStore, definition_first: bool
) -> None:
    memory = Memory(state)
    definition = ("def", "International Business Machines (IBM) makes mainframes.")
    use = ("use", "IBM acquired Red Hat in 2019.")
    for document_id, text in (definition, use) if definition_first else (use, definition):
        memory.add(text, document_id=document_id)
    assert_sound(state)
    answer = memory.ask("What did International Business Machines acquire?", access=OPERATOR)
    assert answer_sentences(answer) == {"IBM acquired Red Hat in 2019."}
    assert answer.entities == ("International Business Machines",)
    with raw(state) as conn:
        aliases = conn.execute(
            "SELECT a.alias_key, a.mentions FROM memory_aliases a JOIN memory_entities e"
            " ON e.id = a.entity_id WHERE e.key = 'international business machines'"
            " ORDER BY a.alias_key"
        ).fetchall()
    assert aliases == [("ibm", 2), ("international business machines", 1)]
    # Without the definition, the entity is named by what is left: "IBM".
    memory.delete("def", access=OPERATOR)
    assert_sound(state)
    assert memory.ask("What did IBM acquire?", access=OPERATOR).entities == ("IBM",)
    assert not memory.ask(
        "What did International Business Machines acquire?", access=OPERATOR
    ).found


def test_a_name_after_an_alias_merge_is_its_own_entity(state: StateStore) -> None:
    """A merge deletes the alias's entity and SQLite hands its id to the next
    new entity: "Lotus" must not be folded into IBM as if it were the alias
    (the ingest used to fail its foreign key check at COMMIT)."""
    memory = Memory(state)
    memory.add(
        "International Business Machines (IBM) makes mainframes. IBM acquired Lotus.",
        document_id="ibm",
    )
    assert_sound(state)
    answer = memory.ask("What did IBM acquire?", access=OPERATOR)
    assert [(f.subject, f.predicate, f.object) for f in answer.facts] == [
        ("International Business Machines", "acquired", "Lotus")
    ]


# -- what the schema refuses ------------------------------------------------------------


def test_the_schema_refuses_facts_without_provenance(memory: Memory, state: StateStore) -> None:
    with raw(state) as conn:
        seq, doc_start = conn.execute(
            "SELECT seq, char_start FROM memory_sentences WHERE text = ?",
            ("Globex is based in Cypress Creek.",),
        ).fetchone()
        other_seq = conn.execute(
            "SELECT seq FROM memory_sentences WHERE text = 'IBM is based in Armonk.'"
        ).fetchone()[0]
        globex, cypress, ibm = (
            conn.execute("SELECT id FROM memory_entities WHERE key = ?", (k,)).fetchone()[0]
            for k in ("globex", "cypress creek", "international business machines")
        )

        def refused(*statements: tuple[str, tuple[object, ...]]) -> str:
            conn.execute("BEGIN")
            try:
                for sql, params in statements:
                    conn.execute(sql, params)
                conn.execute("COMMIT")
            except DATABASE_ERRORS as exc:
                conn.execute("ROLLBACK")
                return str(exc)
            raise AssertionError("the store accepted a fact without provenance")

        new_relation = (
            "INSERT INTO memory_relations (subject_id, predicate, object_id, anchor_seq)"
            " VALUES (?, 'rivals', ?, ?)"
        )
        # An edge with no supporting sentence: refused at COMMIT.
        assert "foreign key" in refused((new_relation, (globex, ibm, seq))).lower()
        # Supported by a sentence that does not mention both ends.
        assert "mention both ends" in refused(
            (new_relation, (globex, ibm, seq)),
            (
                "INSERT INTO memory_relation_support SELECT id, ? FROM memory_relations"
                " WHERE predicate = 'rivals'",
                (seq,),
            ),
        )
        # A node with no mention.
        assert "foreign key" in refused((
            "INSERT INTO memory_entities (key, name, kind, anchor_seq, anchor_start)"
            " VALUES ('ghost', 'Ghost', 'name', ?, 0)", (seq,),
        )).lower()  # fmt: skip
        # A mention that is not the text at its offsets.
        assert "exact span" in refused((
            "INSERT INTO memory_mentions VALUES (?, ?, ?, ?, 'Glob', 'glob')",
            (globex, other_seq, doc_start, doc_start + 4),
        ))  # fmt: skip
        assert "never change" in refused(
            ("UPDATE memory_sentences SET text = 'x' WHERE seq = ?", (seq,))
        )
        assert "never change" in refused(
            ("UPDATE memory_relations SET object_id = ? WHERE subject_id = ?", (ibm, globex))
        )
        assert "never change" in refused(
            ("UPDATE memory_documents SET text = 'x' WHERE id = 'ibm-notes'", ())
        )
        # Removing the last source removes the fact (the relation goes with its support).
        relation = conn.execute(
            "SELECT id FROM memory_relations WHERE subject_id = ? AND object_id = ?",
            (globex, cypress),
        ).fetchone()[0]
        conn.execute("DELETE FROM memory_relation_support WHERE relation_id = ?", (relation,))
        assert conn.execute(
            "SELECT count(*) FROM memory_relations WHERE id = ?", (relation,)
        ).fetchone() == (0,)
    assert_sound(state)


def test_a_commit_refused_by_the_schema_leaves_the_store_usable(state: StateStore) -> None:
    memory = Memory(state)
    memory.add("Acme acquired Initech.", document_id="a")
    with pytest.raises(INTEGRITY_ERRORS), state._write() as conn:
        conn.execute(
            "INSERT INTO memory_relations (subject_id, predicate, object_id, anchor_seq)"
            " SELECT a.id, 'sued', b.id, 1 FROM memory_entities a, memory_entities b"
            " WHERE a.key = 'acme' AND b.key = 'initech'"
        )
    # The failed COMMIT was rolled back: the next write works.
    memory.add("Globex acquired Umbrella.", document_id="b")
    assert [d.id for d in memory.documents(access=OPERATOR)] == ["a", "b"]


class _LyingExtractor:
    """An extractor (as an LLM might be) that claims what its sentence does not say."""

    name = "lying"

    def __init__(self, extraction: Extraction) -> None:
        self.extraction = extraction

    def extract(self, sentences: Sequence[str]) -> list[Extraction]:
        return [self.extraction for _ in sentences]


def test_an_extractor_cannot_store_unsupported_facts(state: StateStore) -> None:
    made_up = [
        Extraction((Mention(0, 4, "Acme", "name"), Mention(5, 12, "Initech", "name")),
                   (Relation(0, "acquired", 1),)),
        Extraction((Mention(0, 4, "Acme", "name"),), (Relation(0, "acquired", 1),)),
    ]  # fmt: skip
    for extraction in made_up:
        memory = Memory(state, _LyingExtractor(extraction))
        with pytest.raises(ProvenanceError):
            memory.add("Acme grew fast. It hired many people.", document_id="lie")
        assert memory.documents(access=OPERATOR) == []
    assert count(state, "memory_sentences") == 0


# -- composed answers ------------------------------------------------------------------


def test_composed_answers_keep_only_sentences_that_cite_stored_sentences(memory: Memory) -> None:
    answer = memory.ask("When was Acme founded?", access=OPERATOR)
    sources = [Source(c.n, c.sentence_id, c.text) for c in answer.citations[:2]]
    assert [s.document_id for s in answer.citations[:2]] == ["acme-history", "acme-wiki"]
    composed = (
        "Acme Corporation was founded by Jane Doe in 1998 [1]. "
        "It was also founded in 1999 by Jane Doe and John Smith. [2] "
        "Acme is the oldest company in Springfield. "
        "Acme was founded on the Moon [1]. "
        "Acme was founded in 2001 by Jane Doe [1][2]. "
        "It later moved to Mars [7]."
    )
    stored = functools.partial(memory.stored_sentences, access=OPERATOR)
    checked = verify_answer(composed, sources, stored)
    assert [s.kept for s in checked.sentences] == [True, True, False, False, False, False]
    assert [s.reason for s in checked.dropped] == [
        "cites nothing",
        "says more than the sentences it cites",
        "states 2001, which the sentences it cites do not",
        "cites [7], which no source has",
    ]
    assert checked.answer == (
        "Acme Corporation was founded by Jane Doe in 1998 [1]. "
        "It was also founded in 1999 by Jane Doe and John Smith. [2]"
    )
    assert checked.cited == (1, 2)
    # A source deleted (or altered) since it was given no longer supports anything.
    memory.delete("acme-wiki", access=OPERATOR)
    after = verify_answer(composed, sources, stored)
    assert [s.kept for s in after.sentences] == [True, False, False, False, False, False]
    tampered = [Source(1, sources[0].sentence_id, sources[0].text + " Allegedly.")]
    assert not verify_answer("Acme was founded in 1998 [1].", tampered,
                             stored).found  # fmt: skip
    assert not verify_answer("Nothing cited here.", sources, stored).found
