"""A question-answering set for the graph memory, written the way users ask.

For: ``bench/memory.py --qa-only`` (and part 4 of its full run). Nineteen
short documents of news- and wiki-like prose about invented companies and
people (the places are real, the companies and people are not). Many facts
are stated the way prose states them after the first mention: through a
pronoun ("It was founded in 2014 by ...", "She was born in Coimbra ...") or
a description ("The firm opened a second plant in Porto ...", "The startup
has 230 employees."); others plainly, naming the company; and five facts
are stated differently by two sources (three founding years, two
headquarters).

Each question is either answerable, with the answers that count (any one
of them named by the answer is enough) and the sentences that state it,
verbatim as they stand in the documents; or unanswerable, with the reason:

- ``trap``: a sentence speaks of the asked event or entity but not the
  asked role ("Who founded Corvina Foods?" where the text only says when
  and where it was founded; a CFO where the CEO is asked; a head count of
  tins where employees are asked; a buyer asked of a company that bought);
- ``unknown``: the question names a company nobody wrote about (some share
  a word with one that exists);
- ``unstated``: a known entity, but the asked attribute is never stated.

``stated`` says how the answer is written where it is best written:
``plain`` when some supporting sentence names both what the question is
about and the answer; otherwise ``pronoun`` or ``description`` for how the
sentence refers to the one it leaves unnamed ("it", "she", "its"; "the
firm", "the startup", a surname alone). ``conflict`` lists the values that
the sources give when they disagree: the expected behaviour is to answer
and to show the competing value with its citation.

The set was written from the questions a reader of these documents would
ask, before the memory was changed to read pronouns, and is not to be
edited to suit an implementation: a question that a change gets wrong is a
finding, not a typo. Not for: tests (tests/memory_corpus.py is the small
corpus that the memory's tests assert on).
"""

from __future__ import annotations

from typing import Final, Literal

import attrs

__all__ = ["DOCUMENTS", "QA", "QUESTIONS"]

Stated = Literal["plain", "pronoun", "description"]
Why = Literal["trap", "unknown", "unstated"]


@attrs.frozen(kw_only=True)
class QA:
    question: str
    answers: tuple[str, ...] = ()
    """Any one of these, named by the answer, answers it; () = unanswerable."""
    support: tuple[str, ...] = ()
    """Exact sentences of the documents that state the answer."""
    stated: Stated | None = None
    """Answerable: how the best supporting sentence states it (see the module docstring)."""
    conflict: tuple[str, ...] = ()
    """Values that different sources give for the asked fact."""
    why: Why | None = None
    """Unanswerable: why (see the module docstring)."""

    @property
    def answerable(self) -> bool:
        return bool(self.answers)


def _yes(
    question: str,
    answers: str | tuple[str, ...],
    *support: str,
    stated: Stated,
    conflict: tuple[str, ...] = (),
) -> QA:
    answers = (answers,) if isinstance(answers, str) else answers
    return QA(question=question, answers=answers, support=support, stated=stated, conflict=conflict)


def _no(question: str, why: Why) -> QA:
    return QA(question=question, why=why)


# document id -> (format, source)
DOCUMENTS: Final[dict[str, tuple[str, str]]] = {
    "veltra-profile": (
        "markdown",
        "# Veltra\n\n"
        "Veltra is a Portuguese maker of batteries for electric delivery vans. "
        "It was founded in 2011 by Mara Quell and Tobias Renn in Aveiro. "
        "In 2019 it moved its headquarters to Lisbon.\n\n"
        "## History\n\n"
        "The company started in a rented workshop near the Aveiro lagoon, where its founders "
        "assembled the first packs by hand. "
        "The firm opened a second plant in Porto in 2016. "
        "Two years later it signed a supply deal with Dorvane Motors, which now buys most of "
        "its output.\n\n"
        "## Today\n\n"
        "Veltra employs about 1,400 people. "
        "Its best-known product is the Kite cell, a solid-state cell that charges in twelve "
        "minutes. "
        "Mara Quell is the company's chief executive.\n",
    ),
    "veltra-funding": (
        "text",
        "Lisbon-based battery maker Veltra said on Tuesday that it had raised €120 million from "
        "investors led by Brightwater Capital. "
        "Veltra was founded in 2012 and supplies cells to Dorvane Motors and two bus makers. "
        "The money will pay for a third plant, in Setúbal, the company said. "
        "Chief executive Mara Quell told reporters that the firm expected to double its output "
        "by 2026.\n",
    ),
    "mara-quell": (
        "markdown",
        "# Mara Quell\n\n"
        "Mara Quell is a Portuguese engineer and businesswoman. "
        "She was born in Coimbra in 1979 and studied chemistry at the Delmar Institute of "
        "Technology. "
        "After eight years at the battery lab of Harrow Energy, she co-founded Veltra with "
        "Tobias Renn.\n\n"
        "Quell sits on the board of the Lusa Clean Transport Forum. "
        "She lives in Lisbon with her husband, the architect Rui Bastos.\n",
    ),
    "veltra-early-days": (
        "markdown",
        "# How Veltra began\n\n"
        "Tobias Renn still keeps the first battery pack that he and Mara Quell built. "
        "The two met in 2006 at Harrow Energy, where both worked on lithium cells. "
        "Renn, who was born in Hamburg, now teaches at the Delmar Institute of Technology. "
        "He left the company in 2018, seven years after they founded it.\n",
    ),
    "halden-robotics": (
        "text",
        "Halden Robotics is a Norwegian company that builds picking robots for warehouses. "
        "It was founded in 2014 by the siblings Ines Varga and Mats Varga in Trondheim. "
        "The startup's first customer was the grocery chain Fjordkjøp, which still uses its "
        "robots in three depots.\n\n"
        "In 2021 the startup was acquired by Tessaly Group for $310 million. "
        "Halden Robotics kept its name and its Trondheim office after the deal. "
        "At the time of the sale it had about 380 employees.\n",
    ),
    "tessaly-group": (
        "html",
        "<!doctype html>\n<html><head><title>Tessaly Group</title></head>\n<body>\n"
        "<h1>Tessaly Group</h1>\n"
        "<p>Tessaly Group is an industrial holding company based in Bergen. "
        "The group owns eleven businesses, from ship repair yards to warehouse automation. "
        "Its chief executive is Rune Halvorsen, who joined from a logistics firm in 2017.</p>\n"
        "<p>Tessaly Group was founded in 1962 as a ship chandler. "
        "In 2021 it bought Halden Robotics, a maker of warehouse robots founded in 2013.</p>\n"
        "<p>Rune Halvorsen spoke about the group's plans at a conference in Oslo in May. "
        "He said Tessaly would keep buying small engineering companies.</p>\n"
        "</body></html>\n",
    ),
    "ines-varga": (
        "markdown",
        "# Ines Varga\n\n"
        "Ines Varga is a Norwegian roboticist. "
        "She was born in Tromsø in 1983 and trained as a mechanical engineer. "
        "With her brother Mats she founded Halden Robotics, and she led its engineering team "
        "for seven years. "
        "After the sale of the company she became chief technology officer of Tessaly Group.\n",
    ),
    "corvina-foods": (
        "text",
        "Sardines have been canned in northern Portugal for two centuries. "
        "Corvina Foods was founded in 1987 in Braga. "
        "The family-owned business is run by Duarte Leme, a grandson of its first owner. "
        "It sold 12 million tins of sardines last year, most of them abroad. "
        "Its factory in Matosinhos was rebuilt after a fire in 2009.\n",
    ),
    "orrin-labs": (
        "markdown",
        "## Orrin Labs\n\n"
        "Orrin Labs is a biotech company that develops enzyme treatments for rare liver "
        "diseases. "
        "It was started in 2008 by two chemists, Yusuf Adeyemi and Clara Bösch, in a basement "
        "lab in Leiden. "
        "Orrin Labs was acquired by Kestrel Pharma. "
        "The company's lead drug, ORN-12, is in late-stage trials.\n",
    ),
    "brisa-mobility": (
        "text",
        "Brisa Mobility rents out electric scooters in eleven Spanish cities. "
        "Brisa Mobility was founded in 2017 by Pablo Ferrán and is headquartered in Valencia. "
        "The startup has 230 employees. "
        "Its chief financial officer, Lea Monti, said the company would be profitable next "
        "year.\n",
    ),
    "brisa-funding": (
        "text",
        "Madrid-based scooter startup Brisa Mobility has raised €18 million in a round led by "
        "Calloway Ventures. "
        "The company plans to enter Portugal next spring. "
        "Founder Pablo Ferrán said the money would go into sturdier scooters.\n",
    ),
    "pellmark": (
        "text",
        "Pellmark is a furniture maker from Kaunas. "
        "It makes oak tables and chairs for hotels. "
        "The company was sold in 2018, a year after its founder, Ada Brill, retired.\n",
    ),
    "kestrel-pharma": (
        "markdown",
        "# Kestrel Pharma\n\n"
        "Kestrel Pharma is a Swiss drug maker based in Basel. "
        "The firm was set up in 1994 by the pharmacologist Henrik Sole. "
        "In 2022 it bought Lumeo Diagnostics for $95 million. "
        "Kestrel Pharma has 2,600 employees and sells its medicines in forty countries.\n",
    ),
    "kestrel-results": (
        "text",
        "Kestrel Pharma, which is headquartered in Zug, reported a 9% rise in sales on Thursday. "
        "The company said demand for its kidney drugs had grown in Asia.\n",
    ),
    "lumeo-diagnostics": (
        "text",
        "Lumeo Diagnostics makes rapid test kits for urinary infections. "
        "The company was founded by Sanna Koivu in Tampere in 2016. "
        "Its kits are sold in pharmacies across the Nordic countries. "
        "Before the takeover it employed 60 people.\n",
    ),
    "norrvik-ferries": (
        "text",
        "Norrvik Ferries runs passenger ferries between the islands of the Varholm "
        "archipelago. "
        "The company was established in 1921 by the shipowner Gustav Lind. "
        "Its fleet numbers fourteen vessels, the oldest of them built in 1968. "
        "Today it is managed by Elin Lind, his great-granddaughter. "
        "The operator carried 2.3 million passengers last year.\n",
    ),
    "varholm-guide": (
        "markdown",
        "# Getting around Varholm\n\n"
        "Norrvik Ferries, founded in 1923, is the only ferry operator in the Varholm "
        "archipelago. "
        "Its boats are slow but reliable. "
        "A day pass costs 240 kroner.\n",
    ),
    "dorvane-motors": (
        "text",
        "Dorvane Motors is a Spanish maker of electric delivery vans, based in Zaragoza. "
        "The carmaker was founded in 2009 and is owned by the Ferrer family. "
        "It buys most of its batteries from Veltra. "
        "Dorvane Motors sold 9,000 vans in 2023.\n",
    ),
    "battery-roundup": (
        "text",
        "Two Iberian battery startups announced plans this week. "
        "Solvar Energy, which makes home storage units, said it would hire 200 engineers in "
        "Seville. "
        "Its rival Amprix opened a research centre in Bilbao. "
        "The company was founded in 2015 by Teodora Vance. "
        "Analysts said both firms would need more capital.\n",
    ),
}

QUESTIONS: Final[tuple[QA, ...]] = (
    # -- Veltra
    _yes(
        "Who started Veltra?",
        ("Mara Quell", "Tobias Renn"),
        "It was founded in 2011 by Mara Quell and Tobias Renn in Aveiro.",
        "After eight years at the battery lab of Harrow Energy, she co-founded Veltra with "
        "Tobias Renn.",
        stated="plain",
    ),
    _yes(
        "When was Veltra founded?",
        ("2011", "2012"),
        "It was founded in 2011 by Mara Quell and Tobias Renn in Aveiro.",
        "Veltra was founded in 2012 and supplies cells to Dorvane Motors and two bus makers.",
        stated="plain",
        conflict=("2011", "2012"),
    ),
    _yes(
        "Where was Veltra founded?",
        "Aveiro",
        "It was founded in 2011 by Mara Quell and Tobias Renn in Aveiro.",
        "The company started in a rented workshop near the Aveiro lagoon, where its founders "
        "assembled the first packs by hand.",
        stated="pronoun",
    ),
    _yes(
        "Where is Veltra based?",
        "Lisbon",
        "In 2019 it moved its headquarters to Lisbon.",
        "Lisbon-based battery maker Veltra said on Tuesday that it had raised €120 million from "
        "investors led by Brightwater Capital.",
        stated="plain",
    ),
    _yes(
        "When did Veltra move its headquarters to Lisbon?",
        "2019",
        "In 2019 it moved its headquarters to Lisbon.",
        stated="pronoun",
    ),
    _yes(
        "Where did Veltra open its second plant?",
        "Porto",
        "The firm opened a second plant in Porto in 2016.",
        stated="description",
    ),
    _yes(
        "How many people work at Veltra?",
        "1,400",
        "Veltra employs about 1,400 people.",
        stated="plain",
    ),
    _yes(
        "Who runs Veltra?",
        "Mara Quell",
        "Mara Quell is the company's chief executive.",
        "Chief executive Mara Quell told reporters that the firm expected to double its output "
        "by 2026.",
        stated="description",
    ),
    _yes(
        "What is Veltra's best-known product?",
        "Kite cell",
        "Its best-known product is the Kite cell, a solid-state cell that charges in twelve "
        "minutes.",
        stated="pronoun",
    ),
    _yes(
        "What does Veltra make?",
        ("batteries", "battery", "cells"),
        "Veltra is a Portuguese maker of batteries for electric delivery vans.",
        "Lisbon-based battery maker Veltra said on Tuesday that it had raised €120 million from "
        "investors led by Brightwater Capital.",
        "Veltra was founded in 2012 and supplies cells to Dorvane Motors and two bus makers.",
        "It buys most of its batteries from Veltra.",
        stated="plain",
    ),
    _yes(
        "Which carmaker buys Veltra's batteries?",
        "Dorvane Motors",
        "Two years later it signed a supply deal with Dorvane Motors, which now buys most of "
        "its output.",
        "Veltra was founded in 2012 and supplies cells to Dorvane Motors and two bus makers.",
        "It buys most of its batteries from Veltra.",
        stated="plain",
    ),
    _yes(
        "How much money did Veltra raise?",
        "€120 million",
        "Lisbon-based battery maker Veltra said on Tuesday that it had raised €120 million from "
        "investors led by Brightwater Capital.",
        stated="plain",
    ),
    _yes(
        "Who invested in Veltra?",
        "Brightwater Capital",
        "Lisbon-based battery maker Veltra said on Tuesday that it had raised €120 million from "
        "investors led by Brightwater Capital.",
        stated="plain",
    ),
    _yes(
        "Where will Veltra build its third plant?",
        "Setúbal",
        "The money will pay for a third plant, in Setúbal, the company said.",
        stated="description",
    ),
    # -- Mara Quell
    _yes(
        "Where was Mara Quell born?",
        "Coimbra",
        "She was born in Coimbra in 1979 and studied chemistry at the Delmar Institute of "
        "Technology.",
        stated="pronoun",
    ),
    _yes(
        "When was Mara Quell born?",
        "1979",
        "She was born in Coimbra in 1979 and studied chemistry at the Delmar Institute of "
        "Technology.",
        stated="pronoun",
    ),
    _yes(
        "Where did Mara Quell study?",
        "Delmar Institute of Technology",
        "She was born in Coimbra in 1979 and studied chemistry at the Delmar Institute of "
        "Technology.",
        stated="pronoun",
    ),
    _yes(
        "Where did Mara Quell work before Veltra?",
        "Harrow Energy",
        "After eight years at the battery lab of Harrow Energy, she co-founded Veltra with "
        "Tobias Renn.",
        "The two met in 2006 at Harrow Energy, where both worked on lithium cells.",
        stated="pronoun",
    ),
    _yes(
        "Who is Mara Quell married to?",
        "Rui Bastos",
        "She lives in Lisbon with her husband, the architect Rui Bastos.",
        stated="pronoun",
    ),
    _yes(
        "What board does Mara Quell sit on?",
        "Lusa Clean Transport Forum",
        "Quell sits on the board of the Lusa Clean Transport Forum.",
        stated="description",
    ),
    # -- Tobias Renn
    _yes(
        "Where was Tobias Renn born?",
        "Hamburg",
        "Renn, who was born in Hamburg, now teaches at the Delmar Institute of Technology.",
        stated="description",
    ),
    _yes(
        "Where does Tobias Renn teach?",
        "Delmar Institute of Technology",
        "Renn, who was born in Hamburg, now teaches at the Delmar Institute of Technology.",
        stated="description",
    ),
    _yes(
        "When did Tobias Renn leave Veltra?",
        "2018",
        "He left the company in 2018, seven years after they founded it.",
        stated="pronoun",
    ),
    # -- Halden Robotics
    _yes(
        "Who founded Halden Robotics?",
        ("Ines Varga", "Mats Varga"),
        "It was founded in 2014 by the siblings Ines Varga and Mats Varga in Trondheim.",
        "With her brother Mats she founded Halden Robotics, and she led its engineering team "
        "for seven years.",
        stated="pronoun",
    ),
    _yes(
        "When was Halden Robotics founded?",
        ("2014", "2013"),
        "It was founded in 2014 by the siblings Ines Varga and Mats Varga in Trondheim.",
        "In 2021 it bought Halden Robotics, a maker of warehouse robots founded in 2013.",
        stated="plain",
        conflict=("2014", "2013"),
    ),
    _yes(
        "Where was Halden Robotics founded?",
        "Trondheim",
        "It was founded in 2014 by the siblings Ines Varga and Mats Varga in Trondheim.",
        stated="pronoun",
    ),
    _yes(
        "Who bought Halden Robotics?",
        "Tessaly Group",
        "In 2021 the startup was acquired by Tessaly Group for $310 million.",
        "In 2021 it bought Halden Robotics, a maker of warehouse robots founded in 2013.",
        stated="description",
    ),
    _yes(
        "When was Halden Robotics acquired?",
        "2021",
        "In 2021 the startup was acquired by Tessaly Group for $310 million.",
        "In 2021 it bought Halden Robotics, a maker of warehouse robots founded in 2013.",
        stated="plain",
    ),
    _yes(
        "How much did Tessaly pay for Halden Robotics?",
        "$310 million",
        "In 2021 the startup was acquired by Tessaly Group for $310 million.",
        stated="description",
    ),
    _yes(
        "Who was Halden Robotics' first customer?",
        "Fjordkjøp",
        "The startup's first customer was the grocery chain Fjordkjøp, which still uses its "
        "robots in three depots.",
        stated="description",
    ),
    _yes(
        "How many employees did Halden Robotics have?",
        "380",
        "At the time of the sale it had about 380 employees.",
        stated="pronoun",
    ),
    # -- Ines Varga
    _yes(
        "Where was Ines Varga born?",
        "Tromsø",
        "She was born in Tromsø in 1983 and trained as a mechanical engineer.",
        stated="pronoun",
    ),
    _yes(
        "What does Ines Varga do at Tessaly Group?",
        "chief technology officer",
        "After the sale of the company she became chief technology officer of Tessaly Group.",
        stated="pronoun",
    ),
    _yes(
        "Who is the CTO of Tessaly Group?",
        "Ines Varga",
        "After the sale of the company she became chief technology officer of Tessaly Group.",
        stated="pronoun",
    ),
    # -- Tessaly Group
    _yes(
        "Where is Tessaly Group based?",
        "Bergen",
        "Tessaly Group is an industrial holding company based in Bergen.",
        stated="plain",
    ),
    _yes(
        "Who is the CEO of Tessaly Group?",
        "Rune Halvorsen",
        "Its chief executive is Rune Halvorsen, who joined from a logistics firm in 2017.",
        stated="pronoun",
    ),
    _yes(
        "How many businesses does Tessaly Group own?",
        "eleven",
        "The group owns eleven businesses, from ship repair yards to warehouse automation.",
        stated="description",
    ),
    _yes(
        "When was Tessaly Group founded?",
        "1962",
        "Tessaly Group was founded in 1962 as a ship chandler.",
        stated="plain",
    ),
    _yes(
        "What did Tessaly Group buy?",
        "Halden Robotics",
        "In 2021 it bought Halden Robotics, a maker of warehouse robots founded in 2013.",
        "In 2021 the startup was acquired by Tessaly Group for $310 million.",
        stated="pronoun",
    ),
    # -- Corvina Foods
    _yes(
        "When was Corvina Foods founded?",
        "1987",
        "Corvina Foods was founded in 1987 in Braga.",
        stated="plain",
    ),
    _yes(
        "Where was Corvina Foods founded?",
        "Braga",
        "Corvina Foods was founded in 1987 in Braga.",
        stated="plain",
    ),
    _yes(
        "Who runs Corvina Foods?",
        "Duarte Leme",
        "The family-owned business is run by Duarte Leme, a grandson of its first owner.",
        stated="description",
    ),
    _yes(
        "How many tins does Corvina Foods sell a year?",
        "12 million",
        "It sold 12 million tins of sardines last year, most of them abroad.",
        stated="pronoun",
    ),
    _yes(
        "Where is the Corvina Foods factory?",
        "Matosinhos",
        "Its factory in Matosinhos was rebuilt after a fire in 2009.",
        stated="pronoun",
    ),
    # -- Orrin Labs
    _yes(
        "Who started Orrin Labs?",
        ("Yusuf Adeyemi", "Clara Bösch"),
        "It was started in 2008 by two chemists, Yusuf Adeyemi and Clara Bösch, in a basement "
        "lab in Leiden.",
        stated="pronoun",
    ),
    _yes(
        "When was Orrin Labs founded?",
        "2008",
        "It was started in 2008 by two chemists, Yusuf Adeyemi and Clara Bösch, in a basement "
        "lab in Leiden.",
        stated="pronoun",
    ),
    _yes(
        "Where was Orrin Labs founded?",
        "Leiden",
        "It was started in 2008 by two chemists, Yusuf Adeyemi and Clara Bösch, in a basement "
        "lab in Leiden.",
        stated="pronoun",
    ),
    _yes(
        "Who bought Orrin Labs?",
        "Kestrel Pharma",
        "Orrin Labs was acquired by Kestrel Pharma.",
        stated="plain",
    ),
    _yes(
        "What is Orrin Labs' lead drug?",
        "ORN-12",
        "The company's lead drug, ORN-12, is in late-stage trials.",
        stated="description",
    ),
    # -- Brisa Mobility
    _yes(
        "Who founded Brisa Mobility?",
        "Pablo Ferrán",
        "Brisa Mobility was founded in 2017 by Pablo Ferrán and is headquartered in Valencia.",
        "Founder Pablo Ferrán said the money would go into sturdier scooters.",
        stated="plain",
    ),
    _yes(
        "Where is Brisa Mobility headquartered?",
        ("Valencia", "Madrid"),
        "Brisa Mobility was founded in 2017 by Pablo Ferrán and is headquartered in Valencia.",
        "Madrid-based scooter startup Brisa Mobility has raised €18 million in a round led by "
        "Calloway Ventures.",
        stated="plain",
        conflict=("Valencia", "Madrid"),
    ),
    _yes(
        "where is brisa based",
        ("Valencia", "Madrid"),
        "Brisa Mobility was founded in 2017 by Pablo Ferrán and is headquartered in Valencia.",
        "Madrid-based scooter startup Brisa Mobility has raised €18 million in a round led by "
        "Calloway Ventures.",
        stated="plain",
        conflict=("Valencia", "Madrid"),
    ),
    _yes(
        "How many employees does Brisa Mobility have?",
        "230",
        "The startup has 230 employees.",
        stated="description",
    ),
    _yes(
        "Who is the CFO of Brisa Mobility?",
        "Lea Monti",
        "Its chief financial officer, Lea Monti, said the company would be profitable next year.",
        stated="pronoun",
    ),
    _yes(
        "How much did Brisa Mobility raise?",
        "€18 million",
        "Madrid-based scooter startup Brisa Mobility has raised €18 million in a round led by "
        "Calloway Ventures.",
        stated="plain",
    ),
    _yes(
        "Who led Brisa Mobility's funding round?",
        "Calloway Ventures",
        "Madrid-based scooter startup Brisa Mobility has raised €18 million in a round led by "
        "Calloway Ventures.",
        stated="plain",
    ),
    _yes(
        "Which country is Brisa Mobility expanding to?",
        "Portugal",
        "The company plans to enter Portugal next spring.",
        stated="description",
    ),
    # -- Pellmark
    _yes(
        "Where is Pellmark based?",
        "Kaunas",
        "Pellmark is a furniture maker from Kaunas.",
        stated="plain",
    ),
    _yes(
        "What does Pellmark make?",
        ("furniture", "oak tables"),
        "Pellmark is a furniture maker from Kaunas.",
        "It makes oak tables and chairs for hotels.",
        stated="plain",
    ),
    _yes(
        "Who founded Pellmark?",
        "Ada Brill",
        "The company was sold in 2018, a year after its founder, Ada Brill, retired.",
        stated="description",
    ),
    _yes(
        "When was Pellmark sold?",
        "2018",
        "The company was sold in 2018, a year after its founder, Ada Brill, retired.",
        stated="description",
    ),
    # -- Kestrel Pharma
    _yes(
        "where's kestrel pharma based?",
        ("Basel", "Zug"),
        "Kestrel Pharma is a Swiss drug maker based in Basel.",
        "Kestrel Pharma, which is headquartered in Zug, reported a 9% rise in sales on Thursday.",
        stated="plain",
        conflict=("Basel", "Zug"),
    ),
    _yes(
        "How much did Kestrel Pharma's sales grow?",
        "9%",
        "Kestrel Pharma, which is headquartered in Zug, reported a 9% rise in sales on Thursday.",
        stated="plain",
    ),
    _yes(
        "Who founded Kestrel Pharma?",
        "Henrik Sole",
        "The firm was set up in 1994 by the pharmacologist Henrik Sole.",
        stated="description",
    ),
    _yes(
        "When was Kestrel Pharma founded?",
        "1994",
        "The firm was set up in 1994 by the pharmacologist Henrik Sole.",
        stated="description",
    ),
    _yes(
        "What companies has Kestrel Pharma bought?",
        ("Lumeo Diagnostics", "Orrin Labs"),
        "In 2022 it bought Lumeo Diagnostics for $95 million.",
        "Orrin Labs was acquired by Kestrel Pharma.",
        stated="plain",
    ),
    _yes(
        "Who bought Lumeo Diagnostics?",
        "Kestrel Pharma",
        "In 2022 it bought Lumeo Diagnostics for $95 million.",
        stated="pronoun",
    ),
    _yes(
        "How much did Kestrel Pharma pay for Lumeo Diagnostics?",
        "$95 million",
        "In 2022 it bought Lumeo Diagnostics for $95 million.",
        stated="pronoun",
    ),
    _yes(
        "How many employees does Kestrel Pharma have?",
        "2,600",
        "Kestrel Pharma has 2,600 employees and sells its medicines in forty countries.",
        stated="plain",
    ),
    # -- Lumeo Diagnostics
    _yes(
        "Who founded Lumeo Diagnostics?",
        "Sanna Koivu",
        "The company was founded by Sanna Koivu in Tampere in 2016.",
        stated="description",
    ),
    _yes(
        "When was Lumeo founded?",
        "2016",
        "The company was founded by Sanna Koivu in Tampere in 2016.",
        stated="description",
    ),
    _yes(
        "When was Lumeo Diagnostics acquired?",
        "2022",
        "In 2022 it bought Lumeo Diagnostics for $95 million.",
        stated="plain",
    ),
    _yes(
        "How many people worked at Lumeo Diagnostics?",
        "60",
        "Before the takeover it employed 60 people.",
        stated="pronoun",
    ),
    # -- Norrvik Ferries
    _yes(
        "Who founded Norrvik Ferries?",
        "Gustav Lind",
        "The company was established in 1921 by the shipowner Gustav Lind.",
        stated="description",
    ),
    _yes(
        "When was Norrvik Ferries founded?",
        ("1921", "1923"),
        "The company was established in 1921 by the shipowner Gustav Lind.",
        "Norrvik Ferries, founded in 1923, is the only ferry operator in the Varholm archipelago.",
        stated="plain",
        conflict=("1921", "1923"),
    ),
    _yes(
        "How many ships does Norrvik Ferries have?",
        "fourteen",
        "Its fleet numbers fourteen vessels, the oldest of them built in 1968.",
        stated="pronoun",
    ),
    _yes(
        "who runs norrvik ferries",
        "Elin Lind",
        "Today it is managed by Elin Lind, his great-granddaughter.",
        stated="pronoun",
    ),
    _yes(
        "How many passengers did Norrvik Ferries carry last year?",
        "2.3 million",
        "The operator carried 2.3 million passengers last year.",
        stated="description",
    ),
    # -- Dorvane Motors
    _yes(
        "Where is Dorvane Motors based?",
        "Zaragoza",
        "Dorvane Motors is a Spanish maker of electric delivery vans, based in Zaragoza.",
        stated="plain",
    ),
    _yes(
        "Who owns Dorvane Motors?",
        "Ferrer family",
        "The carmaker was founded in 2009 and is owned by the Ferrer family.",
        stated="description",
    ),
    _yes(
        "When was Dorvane Motors founded?",
        "2009",
        "The carmaker was founded in 2009 and is owned by the Ferrer family.",
        stated="description",
    ),
    _yes(
        "Who supplies Dorvane Motors with batteries?",
        "Veltra",
        "It buys most of its batteries from Veltra.",
        "Veltra was founded in 2012 and supplies cells to Dorvane Motors and two bus makers.",
        "Two years later it signed a supply deal with Dorvane Motors, which now buys most of "
        "its output.",
        stated="plain",
    ),
    # -- Solvar Energy and Amprix
    _yes(
        "Who founded Amprix?",
        "Teodora Vance",
        "The company was founded in 2015 by Teodora Vance.",
        stated="description",
    ),
    _yes(
        "When was Amprix founded?",
        "2015",
        "The company was founded in 2015 by Teodora Vance.",
        stated="description",
    ),
    _yes(
        "How many engineers will Solvar Energy hire?",
        "200",
        "Solvar Energy, which makes home storage units, said it would hire 200 engineers in "
        "Seville.",
        stated="plain",
    ),
    # -- unanswerable: the sentence is about the event, not the asked role
    _no("Who founded Corvina Foods?", "trap"),  # when and where only
    _no("Who founded Tessaly Group?", "trap"),  # when, and as what
    _no("Who founded Dorvane Motors?", "trap"),  # when, and who owns it now
    _no("Who founded Harrow Energy?", "trap"),  # someone co-founded something else there
    _no("Who founded Solvar Energy?", "trap"),  # the next sentence's founder is Amprix's
    _no("When was Solvar Energy founded?", "trap"),
    _no("Who bought Pellmark?", "trap"),  # sold, with the founder named, not the buyer
    _no("Who bought Veltra?", "trap"),  # investors, not a buyer
    _no("When was Orrin Labs acquired?", "trap"),  # by whom, not when
    _no("How much did Kestrel Pharma pay for Orrin Labs?", "trap"),  # the price is Lumeo's
    _no("When was Pellmark founded?", "trap"),  # its founder, and the year it was sold
    _no("Where was Tessaly Group founded?", "trap"),  # when, not where
    _no("Where was Rune Halvorsen born?", "trap"),  # he spoke in Oslo
    _no("Who is the CEO of Brisa Mobility?", "trap"),  # its CFO is named
    _no("How many employees does Corvina Foods have?", "trap"),  # tins
    _no("How many people work at Norrvik Ferries?", "trap"),  # vessels and passengers
    _no("How many employees does Tessaly Group have?", "trap"),  # businesses
    _no("What did Halden Robotics acquire?", "trap"),  # it was acquired
    _no("Who acquired Kestrel Pharma?", "trap"),  # it acquired
    # -- unanswerable: nobody wrote about it
    _no("Who founded Zentaro Systems?", "unknown"),
    _no("Where is Quillon Bank based?", "unknown"),
    _no("How many employees does Marrow Textiles have?", "unknown"),
    _no("When was Brightwater Labs founded?", "unknown"),  # Brightwater Capital exists
    _no("Who is the CEO of Halden Marine?", "unknown"),  # Halden Robotics exists
    # -- unanswerable: a known entity, the attribute never stated
    _no("Who is the CEO of Kestrel Pharma?", "unstated"),
    _no("Who founded Brightwater Capital?", "unstated"),
    _no("Where was Sanna Koivu born?", "unstated"),
    _no("How many employees does Orrin Labs have?", "unstated"),
    _no("When did Ines Varga leave Tessaly Group?", "unstated"),
    _no("When was Brisa Mobility acquired?", "unstated"),
    _no("Where is Calloway Ventures based?", "unstated"),
    _no("Who founded Fjordkjøp?", "unstated"),
    _no("When did Veltra go public?", "unstated"),
)
