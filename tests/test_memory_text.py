"""The graph memory's pure parts: conversion to text, sentence spans and ids,
entity keys and stems, and the rule-based extractor."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmesh.memory.convert import convert
from qmesh.memory.errors import ProvenanceError
from qmesh.memory.extract import RuleExtractor
from qmesh.memory.extraction import Extraction, Mention, Relation, check_extraction
from qmesh.memory.sentences import MAX_SENTENCE_CHARS, sentence_hash, split_sentences
from qmesh.memory.terms import entity_key, stem

# -- sentences ------------------------------------------------------------------


def texts(text: str) -> list[str]:
    return [s.text for s in split_sentences("d", text)]


def test_sentences_slice_the_document_and_have_stable_ids() -> None:
    text = "  Acme was founded in 1998.\r\nIt makes traps!  Does it? Yes.\r\n\r\nNew paragraph here"
    sentences = split_sentences("doc-1", text)
    assert [s.text for s in sentences] == [
        "Acme was founded in 1998.",
        "It makes traps!",
        "Does it?",
        "Yes.",
        "New paragraph here",
    ]
    for s in sentences:
        assert text[s.start : s.end] == s.text
        assert s.id == f"doc-1:{s.start}-{s.end}:{sentence_hash(s.text)}"
        assert s.hash == sentence_hash(s.text)
    assert split_sentences("doc-1", text) == sentences
    assert split_sentences("doc-2", text)[0].id.startswith("doc-2:")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Dr. Jane Doe met Mr. Smith. They talked.",
         ["Dr. Jane Doe met Mr. Smith.", "They talked."]),
        ("J. R. R. Tolkien wrote it. Fine.", ["J. R. R. Tolkien wrote it.", "Fine."]),
        ("Pi is 3.14 roughly. Yes.", ["Pi is 3.14 roughly.", "Yes."]),
        ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
        ("It grew (a lot.) Then it shrank.", ["It grew (a lot.)", "Then it shrank."]),
        ("Acme Corp. was founded early.", ["Acme Corp. was founded early."]),
        ("It bought Umbrella Ltd. Hank was pleased.",
         ["It bought Umbrella Ltd.", "Hank was pleased."]),
        ("e.g. this one. and lower case.", ["e.g. this one. and lower case."]),
        ("Items:\n- first one\n- second one\nwrapped line",
         ["Items:", "- first one", "- second one\nwrapped line"]),
        ("A heading\n\nBody text.", ["A heading", "Body text."]),
        ("Zoë met Đorđe in Kraków… They smiled 😀. End",
         ["Zoë met Đorđe in Kraków…", "They smiled 😀.", "End"]),
    ],
)  # fmt: skip
def test_sentence_boundaries(text: str, expected: list[str]) -> None:
    assert texts(text) == expected


def test_a_run_without_punctuation_is_cut_at_a_space() -> None:
    text = " ".join(["word"] * 600)
    sentences = split_sentences("d", text)
    assert len(sentences) > 1
    assert all(len(s.text) <= MAX_SENTENCE_CHARS for s in sentences)
    assert all(text[s.start : s.end] == s.text for s in sentences)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab C.!?\n\r\t\"')é😀3")), max_size=400))
def test_sentences_cover_all_text_exactly(text: str) -> None:
    """Every sentence slices the text, none overlap, and only whitespace is left out."""
    sentences = split_sentences("d", text)
    position = 0
    for s in sentences:
        assert s.start >= position
        assert text[position : s.start].strip() == ""
        assert text[s.start : s.end] == s.text
        assert s.text == s.text.strip() and s.text
        position = s.end
    assert text[position:].strip() == ""


# -- conversion -----------------------------------------------------------------


def test_text_is_kept_exactly() -> None:
    source = "  a\r\nb  \n"
    assert convert(source, "text").text == source


def test_markdown_becomes_blocks_of_plain_text() -> None:
    source = """Intro Title
===========

# Acme *Corporation*

**Acme** was founded by [Jane Doe](https://example.com/jane)
in `1998`.

- Makes traps
* Makes skates

> Quoted words.

| Year | Event |
|------|-------|
| 1998 | Founded |

```
code = "not prose"
```

    indented code too
"""
    converted = convert(source, "markdown")
    assert converted.title == "Intro Title"
    assert converted.text.split("\n\n") == [
        "Intro Title",
        "Acme Corporation",
        "Acme was founded by Jane Doe in 1998.",
        "Makes traps",
        "Makes skates",
        "Quoted words.",
        "Year; Event",
        "1998; Founded",
    ]


def test_html_becomes_blocks_of_plain_text() -> None:
    source = """<html><head><title>The &amp; Title</title><style>p{}</style></head>
<body><h1>Heading <em>one</em></h1><p>First &ldquo;para&rdquo;<br>second line</p>
<script>alert("no")</script><ul><li>item one</li><li>item two</li></ul>
<table><tr><td>a</td><td><p>b</p></td></tr></table><pre>code</pre>tail</body></html>"""
    converted = convert(source, "html")
    assert converted.title == "The & Title"
    assert converted.text.split("\n\n") == [
        "Heading one",
        "First “para”",
        "second line",
        "item one",
        "item two",
        "a; b",
        "tail",
    ]
    assert convert("<h2>Only</h2><p>x</p>", "html").title == "Only"


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        convert("x", "pdf")


# -- keys and stems ---------------------------------------------------------------


def test_entity_keys_merge_surface_variants() -> None:
    assert {
        entity_key(s)
        for s in ("Acme", "ACME Corporation", "Acme Corp.", "the Acme corporation", "Acme's",
                  "Acme, Inc.", "Acme Co., Ltd.")
    } == {"acme"}  # fmt: skip
    assert entity_key("U.S.") == "us"
    assert entity_key("5,000") == "5000"
    assert entity_key("3.5") == "3.5"
    assert entity_key("The Hobbit") == "hobbit"
    assert entity_key("Corporation") == "corporation"  # a suffix alone is a name
    assert entity_key("Jane  Doe") == entity_key("jane doe")


def test_stems_are_consistent_across_forms() -> None:
    assert {stem(w) for w in ("founded", "founder", "founding", "found")} == {"found"}
    assert stem("acquired") == stem("acquire") == stem("acquires")
    assert stem("headquartered") == stem("headquarters")
    assert stem("companies") == stem("company")
    assert stem("makes") == stem("make") == stem("made")
    assert stem("planned") == stem("plan")


# -- extraction -------------------------------------------------------------------


def triples(sentence: str) -> set[tuple[str, str, str]]:
    extraction = RuleExtractor().extract_one(sentence)
    check_extraction(sentence, extraction)
    m = extraction.mentions
    return {(m[r.subject].text, r.predicate, m[r.object].text) for r in extraction.relations}


@pytest.mark.parametrize(
    ("sentence", "expected"),
    [
        ("Acme Corporation was founded in 1998 by Jane Doe in Springfield.",
         {("Jane Doe", "founded", "Acme Corporation"), ("Acme Corporation", "founded in", "1998")}),
        ("Jane Doe and John Smith co-founded Initech.",
         {("Jane Doe", "founded", "Initech"), ("John Smith", "founded", "Initech")}),
        ("In 2015, Acme acquired Initech for $2 billion.", {("Acme", "acquired", "Initech")}),
        ("Initech was acquired by Globex on 3 March 2020.",
         {("Globex", "acquired", "Initech"), ("Initech", "acquired on", "3 March 2020")}),
        ("Globex is based in Cypress Creek.", {("Globex", "located in", "Cypress Creek")}),
        ("Red Hat, based in Raleigh, makes Linux.",
         {("Red Hat", "located in", "Raleigh"), ("Red Hat", "makes", "Linux")}),
        ("John Smith works for Acme Corp. as chief engineer.",
         {("John Smith", "works for", "Acme Corp.")}),
        ("Hank Scorpio is the CEO of Globex.", {("Hank Scorpio", "ceo of", "Globex")}),
        ("Hank Scorpio, the CEO of Globex, said nothing.", {("Hank Scorpio", "ceo of", "Globex")}),
        ("Acme's CEO, Jane Doe, resigned.", {("Jane Doe", "ceo of", "Acme")}),
        ("The capital of France is Paris.", {("Paris", "capital of", "France")}),
        ("Marie Curie was a physicist and chemist.",
         {("Marie Curie", "is a", "physicist"), ("Marie Curie", "is a", "chemist")}),
        ("Marie Curie was born in Warsaw.", {("Marie Curie", "born in", "Warsaw")}),
        ('Acme makes the "Roadrunner Trap", a mechanical trap.',
         {("Acme", "makes", "Roadrunner Trap"), ("Roadrunner Trap", "is a", "mechanical trap")}),
        ("Acme also makes rocket skates.", {("Acme", "makes", "rocket skates")}),
        ("Acme has 5,000 employees.", {("Acme", "has employees", "5,000")}),
        ("Founded in 1911, IBM is based in Armonk.",
         {("IBM", "founded in", "1911"), ("IBM", "located in", "Armonk")}),
        ('Dr. J. R. R. Tolkien wrote "The Hobbit" in 1937.',
         {("J. R. R. Tolkien", "wrote", "The Hobbit"), ("The Hobbit", "written in", "1937")}),
        # Nothing the sentence does not say: negations, pronouns, headings.
        ("Acme did not acquire Initech.", set()),
        ("Acme never acquired Initech.", set()),
        ("She founded Acme in 1998.", set()),
        ("Products And Services", set()),
    ],
)  # fmt: skip
def test_rule_extractor_relations(sentence: str, expected: set[tuple[str, str, str]]) -> None:
    assert triples(sentence) == expected


def test_rule_extractor_mentions_and_aliases() -> None:
    sentence = (
        "International Business Machines (IBM) paid $34 billion, 12% more, "
        "on March 3, 2019 for 1,200 patents."
    )
    extraction = RuleExtractor().extract_one(sentence)
    kinds = {m.text: m.kind for m in extraction.mentions}
    assert kinds == {
        "International Business Machines": "name",
        "IBM": "name",
        "$34 billion": "money",
        "12%": "percent",
        "March 3, 2019": "date",
        "1,200": "number",
    }
    (pair,) = extraction.same_as
    assert [extraction.mentions[i].text for i in pair] == ["International Business Machines", "IBM"]
    # A parenthesis that is not an acronym of the name is not an alias.
    assert RuleExtractor().extract_one("Acme (Springfield) grew.").same_as == ()


def test_check_extraction_refuses_facts_without_a_source() -> None:
    sentence = "Acme acquired Initech."
    good = Extraction(
        (Mention(0, 4, "Acme", "name"), Mention(14, 21, "Initech", "name")),
        (Relation(0, "acquired", 1),),
    )
    check_extraction(sentence, good)
    bad = [
        Extraction((Mention(0, 5, "Acme", "name"),)),  # span does not match its text
        Extraction((Mention(15, 40, "Initech.", "name"),)),  # outside the sentence
        Extraction((Mention(0, 4, "Acme", "alien"),)),  # unknown kind
        Extraction(good.mentions, (Relation(0, "acquired", 2),)),  # no such mention
        Extraction(good.mentions, (Relation(0, "acquired", 0),)),  # to itself
        Extraction(good.mentions, (Relation(0, " ", 1),)),  # no predicate
        Extraction(good.mentions, (), ((0, 3),)),
    ]
    for extraction in bad:
        with pytest.raises(ProvenanceError):
            check_extraction(sentence, extraction)
