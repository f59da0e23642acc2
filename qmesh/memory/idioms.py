"""Relations that English states through an idiom rather than a verb between
its subject and object, one sentence (or clause) at a time.

For: :func:`add_idioms`, the second half of the rules of
:mod:`qmesh.memory.extract`, run on the same :class:`MaskedSentence`:

* where an organisation is: "Springfield-based toy maker Acme", "X is a
  furniture maker from Ohio", "X is a Swiss drug maker based in Geneva";
* what it makes: "X is a maker of toys", "X is a furniture maker";
* its headquarters: "The headquarters of X are in Y";
* who founded it, first: "Founded by X in 1998, Y grew quickly";
* when it was founded, in an apposition: "X, a maker of pumps founded in
  1990";
* who funds it: "X raised $5 million in a round led by Y", "… from Y";
* who supplies whom: "X supplies chips to Y", "Y buys its engines from X";
* where it expands: "X plans to enter Canada", "X expanded into Spain";
* people: "his wife, the painter X", "X is married to Y", "X studied law
  at Y", "after ten years at Y, X …" (X worked for Y);
* counts: "X employs about 300 people", "its fleet numbers twelve ships".

Each is a pattern over the masked text, with the kinds of the mentions it
joins checked, and nothing else: a sentence that does not say it in one of
these ways yields nothing here. Not for: the verb patterns
(:mod:`qmesh.memory.extract`) or anything across sentences.
"""

from __future__ import annotations

import re
from typing import Final

from qmesh.memory.masked import (
    AGENT_KINDS,
    LIST,
    NP_STOP,
    THE,
    E,
    MaskedSentence,
    agents,
    index_of,
    indexes,
)
from qmesh.memory.terms import STOPWORDS

__all__ = ["COMPANY_NOUNS", "add_idioms"]

COMPANY_NOUNS: Final = frozenset(
    """
    company firm startup start-up business group carmaker automaker maker manufacturer
    producer operator airline retailer chain supplier brand conglomerate enterprise
    corporation venture developer publisher lender bank insurer utility shipbuilder
    distributor
    """.split()
)
"""Nouns that describe a company, in the singular: "the firm", "a furniture
maker", "the airline". (Not institutions: a university is not "the
company".)"""

_BE_NOW: Final = r"(?:is|was|are|were|remains|remained)"
_COMPANY: Final = "|".join(sorted(COMPANY_NOUNS, key=len, reverse=True))
_WORDS: Final = rf"(?:(?:[\w-]+|{E})\s+)"
"""A word or a name before a noun: "a Swiss drug maker" (where "Swiss" is a mention)."""

# "Springfield-based toy maker Acme": the place names where the name that
# follows it (after at most three lower-case words) is.
_BASED_MODIFIER: Final = re.compile(
    rf"(?P<o>{E})-(?:based|headquartered)\s+(?:[a-z][\w-]*\s+){{0,3}}?(?P<s>{E})"
)
# "Globex is an industrial holding company based in Cypress Creek", "X is a
# Spanish maker of vans, based in Madrid".
_IS_A_BASED: Final = re.compile(
    rf"(?P<s>{LIST})\s+{_BE_NOW}\s+(?:a|an|the)\s+{_WORDS}{{0,4}}?[a-z][\w-]*"
    rf"(?:\s+of\s+[^;:«»(),]{{1,60}}?)?,?\s+(?:based|located|headquartered)\s+(?:in|at)\s+"
    rf"{THE}(?P<o>{E})"
)
# "Acme is a furniture maker from Ohio": a company from a place.
_IS_A_FROM: Final = re.compile(
    rf"(?P<s>{LIST})(?:\s+{_BE_NOW}\s+|\s*,\s*)(?:a|an)\s+{_WORDS}{{0,3}}?(?:{_COMPANY})\s+"
    rf"(?:from|in)\s+{THE}(?P<o>{E})"
)
# "X is a (German) maker of pumps", "X, a maker of office chairs".
_MAKER_OF: Final = re.compile(
    rf"(?P<s>{E})(?:\s+{_BE_NOW}\s+|\s*,\s*)(?:a|an|the)\s+{_WORDS}{{0,3}}?"
    rf"(?:maker|manufacturer|producer|developer|builder)s?\s+of\s+"
    rf"(?P<np>[a-z][a-z-]*(?:\s+[a-z][a-z-]*){{0,3}}?){NP_STOP}"
)
# "Acme is a furniture maker": the noun before "maker" is what it makes.
_NOUN_MAKER: Final = re.compile(
    rf"(?P<s>{E})(?:\s+{_BE_NOW}\s+|\s*,\s*)(?:a|an)\s+{_WORDS}{{0,2}}?"
    r"(?P<np>[a-z][a-z-]*)\s+(?:maker|manufacturer|producer)\b"
)
# "Initech, a maker of office software founded in 1989".
_FOUNDED_APPOSITION: Final = re.compile(
    rf"(?P<s>{E})\s*,\s*(?:a|an|the)\s+[^,;«»()]{{1,60}}?\s+"
    rf"(?P<v>founded|established|set up|started|created)\s+(?P<p>in|on)\s+(?P<d>{E})"
)
# "X raised $5 million in a round led by Y", "… from investors led by Y", "… from Y".
_RAISED: Final = re.compile(
    rf"(?P<s>{E})(?:\s+(?:has|had|have|just|also))*\s+raised\s+(?:about\s+|some\s+)?{E}\s+"
    rf"(?:(?:in|from)\s+(?:(?:an?|the|its|their|new)\s+)?(?:[a-z][\w-]*\s+){{0,3}}?"
    rf"(?:round|investors|funding|financing|backers|group)\s+led\s+by|from)\s+{THE}(?P<o>{LIST})"
)
# "X supplies chips to Y", "X sells its trucks to Y".
_SUPPLIES_TO: Final = re.compile(
    rf"(?P<s>{E})(?:\s+(?:also|now|still|mainly|mostly))?\s+"
    rf"(?:supplies|supplied|sells|sold|provides|provided|delivers|delivered)\s+"
    rf"(?:(?:its|their|the|{E}['’]s)\s+)?(?:[a-z][\w-]*\s+){{1,3}}?to\s+{THE}(?P<o>{LIST})"
)
# "Y buys (most of) its engines from X": X supplies Y.
_BUYS_FROM: Final = re.compile(
    rf"(?P<s>{E})(?:\s+(?:also|now|still|mainly|mostly))?\s+"
    rf"(?:buys|bought|buy|sources|sourced|purchases|purchased|gets|got)\s+"
    rf"(?:(?:most|all|some|much|many|half|part)\s+of\s+)?(?:(?:its|their|the|{E}['’]s)\s+)?"
    rf"(?:[a-z][\w-]*\s+){{0,2}}?[a-z][\w-]*\s+from\s+{THE}(?P<o>{E})"
)
# "X plans to enter Canada", "X expanded into Spain".
_EXPANDS: Final = re.compile(
    rf"(?P<s>{E})\s+(?:(?:plans|planned|intends|intended|aims|aimed|hopes|hoped|wants|wanted|"
    rf"expects|expected|is\s+planning|is\s+preparing|is\s+set|is\s+about)\s+to\s+|will\s+)?"
    rf"(?:enter|enters|entered|expand(?:s|ed)?\s+(?:in)?to|move\s+into|moved\s+into|"
    rf"launch(?:es|ed)?\s+in)\s+{THE}(?P<o>{E})"
)
# "his wife, the painter X"; "X is married to Y".
_SPOUSE: Final = re.compile(
    rf"(?P<s>{E})['’]s\s+(?:husband|wife|spouse)\s*,?\s+"
    rf"(?:(?:the|a|an)\s+(?:[a-z][\w-]*\s+){{0,2}}?)?(?P<o>{E})"
    rf"|(?P<s2>{E})\s+(?:is|was|has been)\s+married\s+to\s+(?P<o2>{E})"
)
# "X studied law at Y".
_STUDIED: Final = re.compile(
    rf"(?P<s>{E})(?:\s+(?:later|then|also|first))?\s+(?:studied|studies|read|trained)\s+"
    rf"(?:[a-z][\w-]*\s+){{1,3}}?(?:at|in)\s+{THE}(?P<o>{E})"
)
# "After ten years at (the research lab of) Globex, she …": she worked there.
_YEARS_AT: Final = re.compile(
    rf"\b(?:[Aa]fter|[Ff]ollowing)\s+(?:{E}|[a-z]+)\s+years?\s+(?:at|with)\s+"
    rf"(?:the\s+(?:[a-z][\w-]*\s+){{1,3}}?of\s+)?{THE}(?P<o>{E})\s*,\s*(?P<s>{E})"
)
# "X employs about 300 people", "it had 45 people".
_PEOPLE: Final = re.compile(
    rf"(?P<s>{E})\s+(?:employs|employed|employing|has|had|have)\s+(?:about\s+|around\s+|"
    rf"over\s+|more than\s+|nearly\s+|almost\s+|some\s+|roughly\s+)?(?P<o>{E})\s+people\b"
)
# "Its fleet numbers twelve ships", "X has a fleet of 30 aircraft".
_FLEET: Final = re.compile(
    rf"(?P<s>{E})(?:['’]s\s+fleet\s+(?:numbers|comprises|includes|totals|is|has|consists\s+of)|"
    rf"\s+(?:has|had|operates|operated|runs|ran)\s+a\s+fleet\s+of)\s+(?:about\s+|around\s+|"
    rf"over\s+|more than\s+|some\s+|nearly\s+)?(?P<o>{E})\s+(?:[a-z][\w-]*\s+)?"
    rf"(?P<unit>vessels|ships|boats|ferries|aircraft|planes|trucks|buses|vehicles|trains)\b"
)
# "Founded by Jane Doe in 1998, Acme grew": the founder, and the year.
_FOUNDED_BY_FIRST: Final = re.compile(
    rf"^(?:Founded|Established|Started|Set\s+up|Created|Co-founded)\s+by\s+"
    rf"(?:(?:the|a|an|two|three)\s+(?:[a-z][\w-]*,?\s+){{0,2}}?)?(?P<a>{LIST})"
    rf"(?P<gap>(?:\s+(?:in|on|at)\s+{THE}{E})*)\s*,\s*{THE}(?P<s>{E})"
)
# "The headquarters of X are in Y", "X's headquarters are in Y".
_HEADQUARTERS: Final = re.compile(
    rf"(?:\b[Tt]he\s+(?:headquarters|head\s+office)\s+of\s+{THE}(?P<s>{E})"
    rf"|(?P<s2>{E})['’]s\s+(?:headquarters|head\s+office))\s+"
    rf"(?:are|is|were|was|has\s+been|have\s+been)\s+(?:located\s+|based\s+)?(?:in|at)\s+"
    rf"{THE}(?P<o>{E})"
)
_UNITS: Final = {"ships": "vessels", "boats": "vessels", "ferries": "vessels", "planes": "aircraft"}


def _pair(match: re.Match[str], s: str = "s", o: str = "o") -> tuple[int, int]:
    return index_of(match.group(s)), index_of(match.group(o))


def _places(state: MaskedSentence, pattern: re.Pattern[str], predicate: str) -> None:
    for match in pattern.finditer(state.masked):
        place = index_of(match.group("o"))
        if state.kind(place) not in ("name", "org"):
            continue
        for subject in agents(state, match.group("s")):
            state.add(subject, predicate, place)


def _makes(state: MaskedSentence, pattern: re.Pattern[str]) -> None:
    for match in pattern.finditer(state.masked):
        subject = index_of(match.group("s"))
        words = match.group("np").split()
        if state.kind(subject) not in AGENT_KINDS or words[0] in STOPWORDS:
            continue
        concept = state.add_concept(*match.span("np"))
        if concept is not None:
            state.add(subject, "makes", concept)


def add_idioms(state: MaskedSentence) -> None:
    """Record the relations the idioms of the module docstring state in ``state``."""
    masked = state.masked
    for match in _BASED_MODIFIER.finditer(masked):
        subject, place = _pair(match)
        if state.kind(place) in ("name", "org") and state.kind(subject) in AGENT_KINDS:
            state.add(subject, "located in", place)
    _places(state, _IS_A_BASED, "located in")
    for match in _HEADQUARTERS.finditer(masked):
        subject = index_of(match.group("s") or match.group("s2"))
        place = index_of(match.group("o"))
        if state.kind(subject) in AGENT_KINDS and state.kind(place) in ("name", "org"):
            state.add(subject, "located in", place)
    for match in _FOUNDED_BY_FIRST.finditer(masked):
        founded = index_of(match.group("s"))
        if state.kind(founded) not in AGENT_KINDS:
            continue
        for founder in agents(state, match.group("a")):
            state.add(founder, "founded", founded)
        for date in indexes(match.group("gap")):
            if state.kind(date) == "date":
                state.add(founded, "founded in", date)
                break
    _places(state, _IS_A_FROM, "located in")
    _makes(state, _MAKER_OF)
    _makes(state, _NOUN_MAKER)
    for match in _FOUNDED_APPOSITION.finditer(masked):
        subject, date = _pair(match, "s", "d")
        if state.kind(date) == "date" and state.kind(subject) in AGENT_KINDS:
            state.add(subject, f"founded {match.group('p')}", date)
    for match in _RAISED.finditer(masked):
        raiser = index_of(match.group("s"))
        if state.kind(raiser) not in AGENT_KINDS:
            continue
        for funder in agents(state, match.group("o")):
            state.add(funder, "funded", raiser)
    for match in _SUPPLIES_TO.finditer(masked):
        supplier = index_of(match.group("s"))
        if state.kind(supplier) not in AGENT_KINDS:
            continue
        for customer in agents(state, match.group("o")):
            state.add(supplier, "supplies", customer)
    for match in _BUYS_FROM.finditer(masked):
        customer, supplier = _pair(match)
        if state.kind(customer) in AGENT_KINDS and state.kind(supplier) in AGENT_KINDS:
            state.add(supplier, "supplies", customer)
    for match in _EXPANDS.finditer(masked):
        subject, place = _pair(match)
        if state.kind(subject) in AGENT_KINDS and state.kind(place) in ("name", "org"):
            state.add(subject, "expands to", place)
    for match in _SPOUSE.finditer(masked):
        if match.group("s") is not None:
            a, b = _pair(match)
        else:
            a, b = _pair(match, "s2", "o2")
        if state.kind(a) in ("name", "org") and state.kind(b) in ("name", "org"):
            state.add(a, "married", b)
    for pattern, predicate in ((_STUDIED, "studied at"), (_YEARS_AT, "works for")):
        for match in pattern.finditer(masked):
            person, place = _pair(match)
            if state.kind(person) in ("name", "org") and state.kind(place) in ("name", "org"):
                state.add(person, predicate, place)
    for match in _PEOPLE.finditer(masked):
        subject, count = _pair(match)
        if state.kind(count) == "number" and state.kind(subject) in AGENT_KINDS:
            state.add(subject, "has employees", count)
    for match in _FLEET.finditer(masked):
        subject, count = _pair(match)
        if state.kind(count) == "number" and state.kind(subject) in AGENT_KINDS:
            unit = match.group("unit")
            state.add(subject, f"has {_UNITS.get(unit, unit)}", count)
