"""The graph memory reading as a careful reader does, on a real state store
(SQLite and PostgreSQL): facts stated through a pronoun, a description, a
surname or a short name are found and cited with the exact sentence and the
resolution; a question is answered only by a sentence that has an answer of
the asked type in the asked role; and a value with a competitor from
another source comes with the conflict."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from qmesh.memory.extraction import Extraction, Mention, Relation
from qmesh.memory.query import NOT_FOUND, Answer, Citation
from qmesh.memory.records import OPERATOR
from qmesh.memory.service import Memory
from qmesh.state import StateStore

# Invented companies and people; each fact below is stated the way prose
# states it after the first mention.
DOCUMENTS: dict[str, tuple[str, str]] = {
    "acme-profile": (
        "markdown",
        "# Acme Corporation\n\n"
        "Acme Corporation is a maker of garden tools based in Springfield. "
        "It was founded in 1998 by Jane Doe and John Smith in Shelbyville. "
        "In 2015 it acquired Initech for $2 billion.\n\n"
        "## People\n\n"
        "Jane Doe is the company's chief executive. "
        "Jane Doe hired Carl Carlson in 2001. "
        "She was born in Ogdenville. "
        "He was born in Capital City.\n",
    ),
    "acme-wiki": (
        "text",
        "Acme Corporation was established in 1999. It is headquartered in Springfield.",
    ),
    "globex-news": (
        "text",
        "Globex Industries, based in Cypress Creek, reported record sales. "
        "The firm was set up in 1989 by Hank Scorpio. "
        "Globex now employs 4,000 people.\n\n"
        "Scorpio is the company's chief executive.",
    ),
    "vandelay": (
        "text",
        "Vandelay Industries was founded in 1990 in Austin. "
        "Monarch Foods is based in Ohio. Monarch Motors is based in Texas.",
    ),
    "orphan": ("text", "It was founded in 2001 by Bob Lee."),
}


@pytest.fixture
def memory(state_location: str | Path) -> Iterator[Memory]:
    with StateStore.open(state_location) as state:
        memory = Memory(state)
        for document_id, (fmt, text) in DOCUMENTS.items():
            memory.add(text, format=fmt, document_id=document_id)
        yield memory


def quoted(answer: Answer) -> list[Citation]:
    return [c for c in answer.citations if f"[{c.n}]" in answer.answer]


def stored_text(memory: Memory, document_id: str) -> str:
    return memory.document(document_id, access=OPERATOR)[1]


def assert_exact(memory: Memory, citation: Citation) -> None:
    """The citation slices its stored document to exactly its text, and so
    does each resolution to exactly its reference."""
    text = stored_text(memory, citation.document_id)
    assert text[citation.start : citation.end] == citation.text
    for resolution in citation.resolutions:
        assert citation.start <= resolution.start < resolution.end <= citation.end
        assert text[resolution.start : resolution.end] == resolution.text


def resolutions(citation: Citation) -> list[tuple[str, str]]:
    return [(r.text, r.entity) for r in citation.resolutions]


# -- references -----------------------------------------------------------------------


def test_a_pronoun_is_resolved_and_the_cited_sentence_stays_exact(memory: Memory) -> None:
    answer = memory.ask("Who founded Acme Corporation?", access=OPERATOR)
    assert answer.found
    (citation,) = quoted(answer)
    assert citation.text == "It was founded in 1998 by Jane Doe and John Smith in Shelbyville."
    assert answer.answer == f"{citation.text} [{citation.n}]"
    assert resolutions(citation) == [("It", "Acme Corporation")]
    assert_exact(memory, citation)
    founders = {f.subject for f in answer.facts if f.predicate == "founded"}
    assert founders == {"Jane Doe", "John Smith"}
    for fact in answer.facts:
        if fact.predicate == "founded":
            assert [c.text for c in fact.citations] == [citation.text]
            assert fact.object == "Acme Corporation"
    bought = memory.ask("Who bought Initech?", access=OPERATOR)
    (citation,) = quoted(bought)
    assert citation.text == "In 2015 it acquired Initech for $2 billion."
    assert resolutions(citation) == [("it", "Acme Corporation")]
    assert ("Acme Corporation", "acquired", "Initech") in {
        (f.subject, f.predicate, f.object) for f in bought.facts
    }
    assert_exact(memory, citation)


def test_descriptions_surnames_and_short_names_are_resolved(memory: Memory) -> None:
    founded = memory.ask("Who founded Globex Industries?", access=OPERATOR)
    (citation,) = quoted(founded)
    assert citation.text == "The firm was set up in 1989 by Hank Scorpio."
    assert resolutions(citation) == [("The firm", "Globex Industries")]
    assert_exact(memory, citation)
    # A new paragraph: "the company" is what the text is about; "Scorpio" the
    # one person of the document with that surname.
    ceo = memory.ask("Who is the CEO of Globex Industries?", access=OPERATOR)
    (citation,) = quoted(ceo)
    assert citation.text == "Scorpio is the company's chief executive."
    assert resolutions(citation) == [
        ("Scorpio", "Hank Scorpio"),
        ("the company", "Globex Industries"),
    ]
    assert_exact(memory, citation)
    # "Globex" in the text and in the question is the one longer name it starts.
    people = memory.ask("How many people work at Globex?", access=OPERATOR)
    (citation,) = quoted(people)
    assert citation.text == "Globex now employs 4,000 people."
    assert resolutions(citation) == [("Globex", "Globex Industries")]
    assert people.entities == ("Globex Industries",)
    runs = memory.ask("Who runs Acme Corporation?", access=OPERATOR)
    assert [c.text for c in quoted(runs)] == ["Jane Doe is the company's chief executive."]


def test_he_and_she_follow_the_gender_the_text_gave(memory: Memory) -> None:
    jane = memory.ask("Where was Jane Doe born?", access=OPERATOR)
    assert [(c.text, resolutions(c)) for c in quoted(jane)] == [
        ("She was born in Ogdenville.", [("She", "Jane Doe")])
    ]
    carl = memory.ask("Where was Carl Carlson born?", access=OPERATOR)
    assert [(c.text, resolutions(c)) for c in quoted(carl)] == [
        ("He was born in Capital City.", [("He", "Carl Carlson")])
    ]


def test_a_reference_never_reaches_another_document_nor_becomes_a_name(
    memory: Memory,
) -> None:
    # "It" opens a document of its own: there is nothing for it to stand for.
    assert not memory.ask("What did Bob Lee found?", access=OPERATOR).found
    assert not memory.ask("Who founded it?", access=OPERATOR).found
    with memory.store.reader() as reader:
        assert reader.entities_by_key(["it", "company", "firm", "she"]) == {}
    assert not any(memory.store.integrity_problems().values())
    # Deleting the source takes its resolved facts along.
    memory.delete("globex-news", access=OPERATOR)
    assert not memory.ask("Who founded Globex Industries?", access=OPERATOR).found
    assert not any(memory.store.integrity_problems().values())


def test_an_extractor_cannot_point_a_reference_outside_its_document(
    state_location: str | Path,
) -> None:
    """A reference names an entity by an earlier mention of the same document;
    one that names anything else is not stored, and nor is its fact."""

    class Pointing:
        name = "pointing"

        def extract(self, sentences: Sequence[str]) -> list[Extraction]:
            out = []
            for sentence in sentences:
                if sentence.startswith("It "):
                    mentions = (
                        Mention(0, 2, "It", "org", refers="Acme Corporation"),
                        Mention(26, 33, "Bob Lee", "name"),
                    )
                    out.append(Extraction(mentions, (Relation(1, "founded", 0),)))
                else:
                    out.append(Extraction())
            return out

    with StateStore.open(state_location) as state:
        memory = Memory(state)
        memory.add(DOCUMENTS["acme-wiki"][1], document_id="acme-wiki")
        report = memory.add(
            "It was founded in 2001 by Bob Lee.", document_id="other", extractor=Pointing()
        )
        assert report.relations == 0
        assert not memory.ask("Who founded Acme Corporation?", access=OPERATOR).found
        assert not any(memory.store.integrity_problems().values())


# -- answer types ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "question",
    [
        "Who founded Vandelay Industries?",  # when and where only: no founder
        "Who is the CFO of Globex Industries?",  # its CEO is named, not its CFO
        "What did Initech acquire?",  # it was acquired
        "Who acquired Acme Corporation?",  # it acquired
        "How many employees does Acme Corporation have?",  # no count of people
        "When was Initech founded?",
        "Where was Globex Industries founded?",  # when and by whom only
        "Who founded Acme Labs?",  # a name nobody wrote, not "Acme Corporation"
    ],
)
def test_a_question_is_not_answered_without_the_asked_role(memory: Memory, question: str) -> None:
    answer = memory.ask(question, access=OPERATOR)
    assert not answer.found
    assert answer.answer == NOT_FOUND
    assert not answer.conflicts


@pytest.mark.parametrize(
    ("question", "sentence"),
    [
        ("When was Vandelay Industries founded?",
         "Vandelay Industries was founded in 1990 in Austin."),
        ("Where was Vandelay Industries founded?",
         "Vandelay Industries was founded in 1990 in Austin."),
        ("Where was Acme Corporation founded?",
         "It was founded in 1998 by Jane Doe and John Smith in Shelbyville."),
        ("How much did Acme pay for Initech?", "In 2015 it acquired Initech for $2 billion."),
        ("When did Acme Corporation acquire Initech?",
         "In 2015 it acquired Initech for $2 billion."),
    ],
)  # fmt: skip
def test_when_where_and_how_much_are_answered_by_a_value_of_their_type(
    memory: Memory, question: str, sentence: str
) -> None:
    answer = memory.ask(question, access=OPERATOR)
    assert [c.text for c in quoted(answer)] == [sentence]
    for citation in answer.citations:
        assert_exact(memory, citation)


def test_an_ambiguous_short_name_names_no_entity(memory: Memory) -> None:
    answer = memory.ask("Who founded Monarch?", access=OPERATOR)
    assert answer.entities == ()
    assert not answer.found


# -- conflicts ------------------------------------------------------------------------


def test_a_competing_value_from_another_source_is_surfaced(memory: Memory) -> None:
    answer = memory.ask("When was Acme Corporation founded?", access=OPERATOR)
    by_number = {c.n: c for c in answer.citations}
    assert {c.text for c in quoted(answer)} == {
        "It was founded in 1998 by Jane Doe and John Smith in Shelbyville.",
        "Acme Corporation was established in 1999.",
    }
    (conflict,) = answer.conflicts
    assert (conflict.about, conflict.predicate) == ("Acme Corporation", "founded")
    values = dict(conflict.values)
    assert set(values) == {"1998", "1999"}
    assert {by_number[n].document_id for n in values["1998"]} == {"acme-profile"}
    assert {by_number[n].document_id for n in values["1999"]} == {"acme-wiki"}
    # Asked who, the answer quotes one source; the dates it disagrees on still show.
    who = memory.ask("Who founded Acme Corporation?", access=OPERATOR)
    assert [dict(c.values).keys() for c in who.conflicts] == [{"1998", "1999"}]
    # No competitor, no conflict: both sources put the headquarters in Springfield.
    assert memory.ask("Where is Acme Corporation based?", access=OPERATOR).conflicts == ()


def test_the_command_line_shows_resolutions_and_conflicts(
    tmp_path: Path, state_location: str | Path
) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QMESH_")}
    if isinstance(state_location, str):
        env["QMESH_GATE__DATABASE_URL"] = state_location
    files = []
    for document_id in ("acme-profile", "acme-wiki"):
        fmt, text = DOCUMENTS[document_id]
        path = tmp_path / f"{document_id}{'.md' if fmt == 'markdown' else '.txt'}"
        path.write_text(text)
        files.append(str(path))

    def qmesh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "qmesh", "--data-dir", str(data), "memory", *args],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip

    assert qmesh("add", *files).returncode == 0
    asked = qmesh("ask", "When was Acme Corporation founded?")
    assert asked.returncode == 0, asked.stderr
    lines = asked.stdout.splitlines()
    it = next(i for i, line in enumerate(lines) if line.endswith("and John Smith in Shelbyville."))
    assert lines[it].startswith("[")
    assert lines[it + 1].strip().startswith("It → Acme Corporation [")
    assert any(
        line.startswith("note: sources disagree on Acme Corporation / founded: 1998 [")
        and "1999 [" in line
        for line in lines
    )
