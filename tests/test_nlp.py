"""The Gate's internal NLP skills."""

from __future__ import annotations

import math
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from qmesh.nlp.classify import classify
from qmesh.nlp.embed import embed
from qmesh.nlp.keywords import keywords
from qmesh.nlp.redact import find_pii, redact
from qmesh.nlp.skills import builtin_skills, measure
from qmesh.nlp.summarize import summarize, summary_sentences
from qmesh.nlp.text import sentence_spans

NEWS = (
    "Dr. Smith of the U.S. team said the trial worked. The vaccine trial enrolled 3,000 "
    "volunteers in five countries. Volunteers who got the vaccine had far fewer infections "
    "than those who got a placebo. The vaccine trial will now expand to children. "
    "Lunch was served at noon. The team expects approval for the vaccine next year."
)


def test_sentences_respect_abbreviations() -> None:
    spans = sentence_spans(NEWS)
    first = NEWS[spans[0][0] : spans[0][1]]
    assert first == "Dr. Smith of the U.S. team said the trial worked."
    assert len(spans) == 6
    assert sentence_spans("no punctuation at all") == [(0, 21)]
    assert sentence_spans("   ") == []


def test_summary_picks_central_sentences_in_order() -> None:
    chosen = summary_sentences(NEWS, 3)
    assert chosen == sorted(chosen) and len(chosen) == 3
    assert 4 not in chosen  # "Lunch was served at noon." shares nothing
    text = summarize(NEWS, 2)
    assert "vaccine" in text and "Lunch" not in text
    assert summarize("One sentence only.") == "One sentence only."


@given(st.text(max_size=2000))
def test_summarize_never_fails_and_quotes_the_input(text: str) -> None:
    summary = summarize(text)
    for piece in summary.split(" "):
        assert piece in text


def test_keywords() -> None:
    found = keywords(NEWS, 5)
    assert "vaccine" in found[0]
    assert all(word not in found for word in ("the", "and", "of"))


def test_classification() -> None:
    english = classify("I love this phone, the battery is great and the screen is excellent.")
    assert (english.language, english.sentiment) == ("en", "positive")
    assert classify("The update is not good: it crashed and the app is broken.").sentiment == (
        "negative"
    )
    assert classify("Le gouvernement a voté la loi pour les écoles et les villes.").language == "fr"
    assert classify("Der Zug ist nicht pünktlich und die Fahrt ist zu lang.").language == "de"
    assert classify("La empresa y los trabajadores de la ciudad no están de acuerdo.").language == (
        "es"
    )
    assert classify("The striker scored two goals and the team won the championship.").topic == (
        "sports"
    )
    assert classify("Quarterly revenue and profit rose; the stock price jumped.").topic == "finance"
    assert classify("xyzzy").topic == "general"


def test_redaction() -> None:
    text = (
        "Mail jane.doe@example.com or call +44 20 7946 0958. Card 4111 1111 1111 1111, "
        "not 4111 1111 1111 1112. IBAN GB82 WEST 1234 5698 7654 32. Server 192.168.10.20, "
        "SSN 078-05-1120, key sk-abcdefghijklmnop1234. Order 12345 on 2024-05-01."
    )
    redacted, counts = redact(text)
    assert counts == {"EMAIL": 1, "PHONE": 1, "CARD": 1, "IBAN": 1, "IP": 1, "SSN": 1, "SECRET": 1}
    assert "jane.doe" not in redacted and "4111 1111 1111 1111" not in redacted
    assert "4111 1111 1111 1112" in redacted  # fails the Luhn check
    assert "12345" in redacted and "2024-05-01" in redacted
    kinds = [f.kind for f in find_pii(text)]
    assert kinds[0] == "EMAIL" and "CARD" in kinds


def test_embeddings_are_deterministic_unit_vectors_across_processes() -> None:
    a = embed("The cat sat on the mat")
    assert math.isclose(sum(v * v for v in a), 1.0)
    assert a == embed("the cat sat on the mat")
    near = sum(x * y for x, y in zip(a, embed("A cat sat on a mat"), strict=True))
    far = sum(x * y for x, y in zip(a, embed("Interest rates rose sharply"), strict=True))
    assert near > 0.5 > far
    assert embed("") == [0.0] * 256
    code = "from qmesh.nlp.embed import embed; print(embed('The cat sat on the mat')[:8])"
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert other.strip() == str(a[:8])


def test_skills_measure_and_advertise_capacity() -> None:
    skills = builtin_skills()
    measure(skills, seconds=0.01)
    assert set(skills) == {"summarize", "keywords", "classify", "extract", "redact", "embed"}
    for skill in skills.values():
        assert skill.capacity > 50
        assert skill.describe().startswith(f"{skill.task}: yes, ")
