"""The graph memory's careful reading, as pure functions: the idioms the
rules read, what a pronoun or a description stands for in its document
(:mod:`qmesh.memory.coref`), and what a question asks
(:mod:`qmesh.memory.question`)."""

from __future__ import annotations

import pytest

from qmesh.memory.coref import is_description, resolve_references
from qmesh.memory.errors import ProvenanceError
from qmesh.memory.extract import RuleExtractor
from qmesh.memory.extraction import Extraction, Mention, check_extraction
from qmesh.memory.mentions import RULE_MENTIONS
from qmesh.memory.question import Question, candidate_spans, names_in, parse, tokens_of
from qmesh.memory.records import EntityRef
from qmesh.memory.sentences import split_sentences
from qmesh.memory.terms import stem

RULES = RuleExtractor()


def triples(sentence: str, references: tuple[Mention, ...] = ()) -> set[tuple[str, str, str]]:
    extraction = RULES.extract_one(sentence, references)
    check_extraction(sentence, extraction)
    m = extraction.mentions
    return {(m[r.subject].text, r.predicate, m[r.object].text) for r in extraction.relations}


@pytest.mark.parametrize(
    ("sentence", "expected"),
    [
        ("Springfield-based toy maker Acme said it was hiring.",
         {("Acme", "located in", "Springfield")}),
        ("Acme is a furniture maker from Ohio.",
         {("Acme", "located in", "Ohio"), ("Acme", "makes", "furniture"),
          ("Acme", "is a", "furniture maker")}),
        ("Globex is a German maker of pumps, based in Kiel.",
         {("Globex", "located in", "Kiel"), ("Globex", "makes", "pumps")}),
        ("The headquarters of Initech are in Austin.", {("Initech", "located in", "Austin")}),
        ("Founded by Jane Doe in 1998, Acme grew quickly.",
         {("Jane Doe", "founded", "Acme"), ("Acme", "founded in", "1998")}),
        ("Globex raised $5 million in a round led by Initech Ventures.",
         {("Initech Ventures", "funded", "Globex")}),
        ("Acme supplies chips to Globex and Initech.",
         {("Acme", "supplies", "Globex"), ("Acme", "supplies", "Initech")}),
        ("Globex plans to enter Canada next year.", {("Globex", "expands to", "Canada")}),
        ("Jane Doe studied law at Springfield University.",
         {("Jane Doe", "studied at", "Springfield University")}),
        ("Acme employs about 300 people.", {("Acme", "has employees", "300")}),
        ("Acme was founded in 1998 and is headquartered in Springfield.",
         {("Acme", "founded in", "1998"), ("Acme", "located in", "Springfield")}),
        ("Initech was founded in 1990 and is owned by the Lumbergh family.",
         {("Initech", "founded in", "1990"), ("Lumbergh", "owns", "Initech")}),
        ("Acme was set up in 1998 by the physicist Jane Doe.",
         {("Jane Doe", "founded", "Acme"), ("Acme", "founded in", "1998")}),
        ("Hank Scorpio is the chief financial officer of Globex.",
         {("Hank Scorpio", "cfo of", "Globex")}),
        ("Jane Doe was born in Warsaw in 1867.",
         {("Jane Doe", "born in", "Warsaw"), ("Jane Doe", "born in", "1867")}),
        # A date that another event claims is not the acquisition's.
        ("Acme bought Initech, a maker of staplers founded in 1989.",
         {("Acme", "acquired", "Initech"), ("Initech", "founded in", "1989"),
          ("Initech", "makes", "staplers"), ("Initech", "is a", "maker")}),
        # Not the object: "Globex's unit" is not Globex.
        ("Acme bought Globex's unit.", set()),
    ],
)  # fmt: skip
def test_the_rules_read_common_idioms(sentence: str, expected: set[tuple[str, str, str]]) -> None:
    assert triples(sentence) == expected


def test_a_reference_is_read_like_the_name_it_stands_for() -> None:
    its = Mention(0, 3, "Its", "org", refers="Globex")
    assert triples("Its chief executive is Hank Scorpio.", (its,)) == {
        ("Hank Scorpio", "ceo of", "Its")
    }
    it = Mention(8, 10, "it", "org", refers="Acme")
    assert triples("In 2015 it acquired Initech.", (it,)) == {("it", "acquired", "Initech")}
    # Without the reference the sentence states nothing the rules can cite.
    assert triples("In 2015 it acquired Initech.") == set()


def resolved(text: str) -> list[tuple[str, str, str]]:
    """(sentence, mention, what it refers to) for every reference the
    document's reading resolved, each checked to slice its sentence."""
    sentences = split_sentences("d", text)
    extractions = resolve_references(
        text, sentences, RULES.extract([s.text for s in sentences]), RULES.extract_one
    )
    found = []
    for sentence, extraction in zip(sentences, extractions, strict=True):
        check_extraction(sentence.text, extraction)
        for mention in extraction.mentions:
            if mention.refers is not None:
                found.append((sentence.text, mention.text, mention.refers))
    return found


def refers(text: str) -> list[tuple[str, str]]:
    return [(mention, antecedent) for _, mention, antecedent in resolved(text)]


def test_it_and_descriptions_stand_for_the_nearest_organisation() -> None:
    assert refers(
        "Acme is a toy maker. It was founded in 1998 by Jane Doe. The company opened a plant "
        "in Ohio. Its chief executive is Jane Doe."
    ) == [("It", "Acme"), ("The company", "Acme"), ("Its", "Acme")]
    # The subject of the sentence before, not what sits in a phrase after a preposition.
    assert refers("Globex lent money to Initech Labs. It was founded in 1950.") == [
        ("It", "Globex")
    ]
    # "Its rival Initech": the rival, not the possessive, is the subject.
    assert refers("Globex makes pumps. Its rival Initech opened a lab. The company hired.") == [
        ("Its", "Globex"),
        ("The company", "Initech"),
    ]


def test_a_new_section_speaks_of_what_the_document_is_about() -> None:
    text = "Acme Corporation\n\nAcme makes toys.\n\nHistory\n\nThe company started in a barn."
    assert refers(text) == [("The company", "Acme")]


def test_it_never_stands_for_a_person_a_place_or_an_institution() -> None:
    assert refers("Jane Doe moved to Springfield. It was founded in 1998.") == []
    assert (
        refers("Jane Doe teaches at Springfield University. The company was founded in 1998.") == []
    )
    # Nor across documents: a document that opens with "It" has nothing to refer to.
    assert refers("It was founded in 2001 by Bob Lee.") == []
    # "It is expected that…" names nothing.
    assert refers("Acme reported results. It is expected that sales will grow.") == []


def test_he_and_she_follow_gender() -> None:
    assert refers(
        "Jane Doe hired John Smith. She was born in Ogdenville. He was born in Austin."
    ) == [("She", "Jane Doe"), ("He", "John Smith")]
    # The text says which: "his daughter" is a woman.
    assert refers("Gus Lind founded Acme. Today Ada Lind, his daughter, runs it.") == [
        ("his", "Gus Lind"),
        ("it", "Acme"),
    ]


def test_surnames_and_short_names_stand_for_the_one_longer_name() -> None:
    assert refers("Hank Scorpio founded Globex Industries. Scorpio said Globex would grow.") == [
        ("Scorpio", "Hank Scorpio"),
        ("Globex", "Globex Industries"),
    ]
    # Two people of that surname: the surname alone stands for neither.
    assert refers("Anna Berg met Erik Berg. Berg studied law.") == []


def test_a_sentence_of_many_pronouns_is_read_within_bounds() -> None:
    text = "Acme makes toys. " + "It and it and it. " * 5 + ("it " * 200).strip() + "."
    found = resolved(text)
    per_sentence: dict[str, int] = {}
    for sentence, _, _ in found:
        per_sentence[sentence] = per_sentence.get(sentence, 0) + 1
    assert max(per_sentence.values()) <= RULE_MENTIONS


def test_descriptions_and_pronouns_are_not_names() -> None:
    for text in ("it", "Its", "she", "The company", "the family-run business", "the airline"):
        assert is_description(text), text
    for text in ("Acme", "Jane Doe", "Company Store Inc", "Initech"):
        assert not is_description(text), text


def asked(question: str, names: dict[str, str] | None = None) -> Question:
    """The parse of ``question``, with ``names`` (key → kind) as the entities known."""
    tokens = tokens_of(question)
    spans = candidate_spans(question, tokens, names_in(question))
    known = {
        key: [EntityRef(i, key, kind)]
        for i, (key, kind) in enumerate((names or {}).items())
        if any(key == k for _, _, k in spans)
    }
    return parse(question, tokens, spans, known, names_in(question))


@pytest.mark.parametrize(
    ("question", "names", "wh", "family", "roles"),
    [
        ("Who founded Acme?", {"acme": "name"}, "who", "founded", ("object",)),
        ("What did Acme buy?", {"acme": "name"}, "what", "acquired", ("subject",)),
        ("When was Acme acquired?", {"acme": "name"}, "when", "acquired", ("object",)),
        ("Who is the CFO of Acme?", {"acme": "name"}, "who", "cfo", ("object",)),
        ("Who is Acme's chief executive?", {"acme": "name"}, "who", "ceo", ("object",)),
        ("where's acme based", {"acme": "name"}, "where", "located", ("subject",)),
        ("Who runs Acme?", {"acme": "name"}, "who", "leads", ("object",)),
        ("Who invested in Acme?", {"acme": "name"}, "who", "funded", ("object",)),
        ("Who led Acme's funding round?", {"acme": "name"}, "who", "funded", ("object",)),
        # The possessed noun says what is asked, and "product" asks no relation.
        ("What is Acme's best-known product?", {"acme": "name"}, "what", None, (None,)),
        ("How much did Acme pay for Initech?", {"acme": "name", "initech": "name"},
         "how much", "acquired", ("subject", "object")),
        ("When did Acme move its headquarters to Ohio?", {"acme": "name", "ohio": "name"},
         "when", "located", ("subject", "object")),
    ],
)  # fmt: skip
def test_what_a_question_asks(
    question: str,
    names: dict[str, str],
    wh: str,
    family: str | None,
    roles: tuple[str | None, ...],
) -> None:
    parsed = asked(question, names)
    assert parsed.wh == wh
    assert (parsed.family.name if parsed.family else None) == family
    assert parsed.roles == roles


def test_how_many_counts_a_noun_and_its_synonyms() -> None:
    people = asked("How many people work at Acme?", {"acme": "name"})
    assert people.wh == "how many"
    assert {stem(w) for w in ("employees", "staff", "people")} <= people.counted
    ships = asked("How many ships does Acme have?", {"acme": "name"})
    assert stem("vessels") in ships.counted
    assert asked("Who founded it?").dangling


def test_unknown_extraction_kinds_stay_refused() -> None:
    # A reference must name a person or an organisation, with an antecedent.
    for mention in (
        Mention(0, 2, "It", "date", refers="Acme"),
        Mention(0, 2, "It", "org", refers=" "),
    ):
        with pytest.raises(ProvenanceError, match="antecedent"):
            check_extraction("It grew.", Extraction((mention,)))
