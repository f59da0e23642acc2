#!/usr/bin/env python3
"""Benchmark of qmesh's graph memory: ingest rate, query latency, citation quality.

Run it from the repository root with the project's interpreter::

    .venv/bin/python bench/memory.py              # 200 documents, ~11,000 sentences
    .venv/bin/python bench/memory.py --quick      # smoke run, ~1,100 sentences
    .venv/bin/python bench/memory.py --docs 400 --queries 1000
    .venv/bin/python bench/memory.py --qa-only    # part 4 alone, on SQLite: seconds

Part 1, ingest. A corpus is generated deterministically (``--seed``): each
document is news-like prose about a few of 200 fictional companies, built
from templates (founding, headquarters, CEO, acquisitions in active and
passive voice, products, head counts, appositions, and three phrasings the
rules do not read, which count against recall) mixed with sentences that
state nothing extractable, in all three formats (plain text, Markdown,
HTML). Each company has one set of true attributes, but about 5% of founding
statements give another year, as real sources disagree. Rates are sentences
per second for the whole ``Memory.add`` (convert, split, extract, SQL in one
transaction per document, into a fresh state store),
and separately for the rule-based extractor alone.

Part 2, queries: ``--queries`` questions about random companies (who founded
it, where it is headquartered, who its CEO is, how many employees it has,
what it acquired) plus 10% about companies that do not exist; latency of
``Memory.ask`` per question, p50/p99. Because the corpus is generated, the
sentences that state each fact are known, so the same run also gives
citation precision and recall at this scale (cited answer sentences that
state the asked fact / all cited; stated facts cited / all stating
sentences) and the share of unanswerable questions answered "not found".

Part 3, the hand-written test corpus (``tests/memory_corpus.py``): citation
precision and recall of the answers against the sentences each question is
known to need, "not found" on the unsupported questions, and a check that
every citation's offsets slice the stored document to exactly its text.

Part 4, the QA set (``bench/memory_qa.py``): questions written the way
users ask them, about short documents in which many facts are stated
through a pronoun or a description ("It was founded in 2011 by ...", "The
firm opened a second plant in Porto"), some sources disagree, and a third
of the questions cannot be answered from the text (traps where a sentence
speaks of the asked event but not the asked role, unknown companies,
attributes never stated). Reported separately: answerable questions
answered with an exact citation (the answer names an expected answer, in
its quoted text or in a fact that cites a quoted sentence, and quotes at
least one of the sentences that state it), split into plainly stated and
pronoun- or description-stated facts; citation precision over the
answerable questions that got an answer (quoted sentences that state the
answer / all quoted); unsupported claims (unanswerable questions answered
instead of "not found"); and conflicts surfaced (the answer's ``conflicts``
hold both values the sources give). Then every miss, with the question and
what came back. ``--qa-only`` runs this part alone (on SQLite unless
``--backends`` says otherwise).

Each part runs on every backend of ``--backends`` (default: SQLite, then
PostgreSQL on a throwaway local cluster started with scripts/pgcluster.py),
printed side by side, and the run ends with how many questions got the same
answer on both (found or not, and the same cited sentences), listing any
that differ.

Nothing is asserted; the numbers move by tens of percent on a small shared
machine, so compare within a run.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import memory_qa  # noqa: E402
from memory_corpus import DOCUMENTS, QUESTIONS  # noqa: E402

from qmesh.memory.extract import RuleExtractor  # noqa: E402
from qmesh.memory.query import Answer  # noqa: E402
from qmesh.memory.records import OPERATOR  # noqa: E402
from qmesh.memory.sentences import split_sentences  # noqa: E402
from qmesh.memory.service import Memory  # noqa: E402
from qmesh.state import StateStore  # noqa: E402

_PREFIXES = (
    "Acme Globex Initech Umbrella Hooli Stark Wayne Cyberdyne Soylent Tyrell Wonka Vandelay "
    "Aperture Oscorp Monarch Nakatomi Virtucon Gekko Duff Sirius"
).split()
_SUFFIXES = (
    "Systems Labs Industries Holdings Dynamics Analytics Foods Motors Energy Robotics".split()
)
_FIRST = (
    "Jane John Maria Wei Aisha Carlos Olga Kenji Fatima Liam Noor Pedro Ingrid Tariq Chloe "
    "Dmitri Amara Hugo Sofia Ravi"
).split()
_LAST = (
    "Doe Smith Garcia Chen Okafor Silva Petrova Tanaka Haddad Murphy Rahman Costa Larsen Aziz "
    "Martin Volkov Mensah Laurent Rossi Patel"
).split()
_CITIES = (
    "Springfield Shelbyville Riverton Lakeside Fairview Kingsport Ashford Brookfield Clearwater "
    "Dunmore Eastwick Glenwood Hartford Ironwood Juniper Kelso Linden Marlow Northgate Oakridge"
).split()
_MONTHS = "January February March April May June July August September October November".split()
_PRODUCTS = "Falcon Nimbus Quasar Ranger Summit Vertex Zephyr Orion Pulse Atlas".split()
_NOUNS = "sensor drone battery turbine scanner router engine filter pump camera".split()
_FILLER = (
    "Analysts expect growth to continue next year.",
    "The quarterly report noted strong demand across the region.",
    "Shares rose slightly after the announcement.",
    "Several investors asked about margins during the call.",
    "The market remained volatile for most of the quarter.",
    "Costs fell as supply chains recovered.",
    "Observers said the outlook was uncertain but improving.",
    "The board will meet again in the spring.",
)


@attrs.frozen
class Company:
    name: str
    founder: str
    year: int
    city: str
    ceo: str
    employees: int
    product: str
    noun: str


@attrs.define
class Generated:
    documents: list[tuple[str, str, str]]  # id, format, source
    # (company, relation) -> sentences stating it
    stating: dict[tuple[str, str], set[str]]


def _companies(rng: random.Random) -> list[Company]:
    companies = []
    for prefix in _PREFIXES:
        for suffix in _SUFFIXES:
            companies.append(
                Company(
                    name=f"{prefix} {suffix}",
                    founder=f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
                    year=rng.randint(1950, 2020),
                    city=rng.choice(_CITIES),
                    ceo=f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
                    employees=rng.randint(20, 90) * 100,
                    product=rng.choice(_PRODUCTS),
                    noun=rng.choice(_NOUNS),
                )
            )
    return companies


def generate(docs: int, per_doc: int, seed: int) -> tuple[Generated, list[Company]]:
    rng = random.Random(seed)
    companies = _companies(rng)
    stating: dict[tuple[str, str], set[str]] = {}

    def state(company: Company, relation: str, sentence: str) -> str:
        stating.setdefault((company.name, relation), set()).add(sentence)
        return sentence

    documents = []
    for index in range(docs):
        cast = rng.sample(companies, 6)
        sentences: list[str] = []
        while len(sentences) < per_doc:
            c = rng.choice(cast)
            other = rng.choice([x for x in cast if x is not c])
            kind = rng.randrange(14)
            if kind == 0:
                year = c.year if rng.random() > 0.05 else c.year + rng.choice((-1, 1))
                sentences.append(
                    state(
                        c, "founded", f"{c.name} was founded in {year} by {c.founder} in {c.city}."
                    )
                )
            elif kind == 1:
                sentences.append(state(c, "located", f"{c.name} is headquartered in {c.city}."))
            elif kind == 2:
                sentences.append(state(c, "ceo", f"{c.ceo} is the CEO of {c.name}."))
            elif kind == 3:
                amount = rng.randint(2, 900)
                year = rng.randint(1990, 2023)
                sentences.append(
                    state(
                        c,
                        "acquired",
                        f"In {year}, {c.name} acquired {other.name} for ${amount} million.",
                    )
                )
            elif kind == 4:
                day, month, year = rng.randint(1, 28), rng.choice(_MONTHS), rng.randint(1990, 2023)
                sentences.append(
                    state(
                        c,
                        "acquired",
                        f"{other.name} was acquired by {c.name} on {day} {month} {year}.",
                    )
                )
            elif kind == 5:
                sentences.append(f'{c.name} makes the "{c.product}", a compact {c.noun}.')
            elif kind == 6:
                sentences.append(state(c, "employees", f"{c.name} has {c.employees:,} employees."))
            elif kind == 7:
                sentences.append(
                    f"{c.ceo}, the CEO of {c.name}, said the results were encouraging."
                )
                state(c, "ceo", sentences[-1])
            elif kind == 8:
                # The rules do not read these three: they count against recall.
                sentences.append(
                    state(
                        c, "founded", f"Founded by {c.founder} in {c.year}, {c.name} grew quickly."
                    )
                )
            elif kind == 9:
                sentences.append(
                    state(c, "located", f"The headquarters of {c.name} are in {c.city}.")
                )
            elif kind == 10:
                sentences.append(
                    state(c, "ceo", f"{c.name}'s chief executive, {c.ceo}, spoke at the event.")
                )
            else:
                sentences.append(rng.choice(_FILLER))
        fmt = ("text", "markdown", "html")[index % 3]
        paragraphs = [" ".join(sentences[i : i + 5]) for i in range(0, len(sentences), 5)]
        if fmt == "text":
            source = "\n\n".join(paragraphs)
        elif fmt == "markdown":
            source = f"# Report {index}\n\n" + "\n\n".join(paragraphs)
        else:
            body = "".join(f"<p>{html.escape(p)}</p>\n" for p in paragraphs)
            source = f"<html><head><title>Report {index}</title></head><body>{body}</body></html>"
        documents.append((f"report-{index:04d}", fmt, source))
    return Generated(documents, stating), companies


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _cited(answer: Answer) -> set[str]:
    return {c.text for c in answer.citations if f"[{c.n}]" in answer.answer}


Rows = dict[str, tuple[str, str]]
"""Label -> (value, note), in the order printed."""
Answers = list[tuple[str, bool, frozenset[str]]]
"""Question, found, cited sentences: what two backends must agree on."""


def bench_ingest(memory: Memory, generated: Generated) -> Rows:
    start = time.perf_counter()
    sentences = 0
    for document_id, fmt, source in generated.documents:
        sentences += memory.add(source, format=fmt, document_id=document_id).sentences
    elapsed = time.perf_counter() - start
    rows: Rows = {
        "documents": (f"{len(generated.documents):,}", ""),
        "sentences": (f"{sentences:,}", ""),
        "ingest (convert+split+extract+SQL)": (f"{sentences / elapsed:,.0f}", "sentences/s"),
    }
    texts = [
        s.text
        for document_id, fmt, source in generated.documents[:60]
        for s in split_sentences(document_id, memory.prepare(source, format=fmt).text)
    ]
    extractor = RuleExtractor()
    start = time.perf_counter()
    extractor.extract(texts)
    rows["rule extractor alone"] = (
        f"{len(texts) / (time.perf_counter() - start):,.0f}",
        "sentences/s",
    )
    with memory.store.reader() as reader:
        counts = {
            table: reader.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("memory_entities", "memory_relations", "memory_mentions")
        }
    rows["entities / relations / mentions stored"] = (
        "{memory_entities:,} / {memory_relations:,} / {memory_mentions:,}".format(**counts),
        "",
    )
    return rows


_ASKS = {
    "founded": "Who founded {}?",
    "located": "Where is {} headquartered?",
    "ceo": "Who is the CEO of {}?",
    "employees": "How many employees does {} have?",
    "acquired": "What did {} acquire?",
}


def bench_queries(
    memory: Memory, generated: Generated, companies: list[Company], n: int, seed: int
) -> tuple[Rows, Answers]:
    rng = random.Random(seed + 1)
    answers: Answers = []
    latencies: list[float] = []
    cited_total = cited_right = stating_total = stating_cited = 0
    answerable = found = unanswerable = abstained = 0
    for _ in range(n):
        relation = rng.choice(list(_ASKS))
        if rng.random() < 0.1:
            name = f"{rng.choice(_PRODUCTS)} {rng.choice(_CITIES)} Partners"
            question, gold = _ASKS[relation].format(name), set()
        else:
            company = rng.choice(companies)
            question = _ASKS[relation].format(company.name)
            gold = generated.stating.get((company.name, relation), set())
        start = time.perf_counter()
        answer = memory.ask(question, access=OPERATOR)
        latencies.append(time.perf_counter() - start)
        cited = _cited(answer)
        answers.append((question, answer.found, frozenset(cited)))
        if gold:
            answerable += 1
            found += answer.found
            cited_total += len(cited)
            cited_right += len(cited & gold)
            stating_total += min(len(gold), 3)  # an answer quotes at most 3 sentences
            stating_cited += min(len(cited & gold), 3)
        else:
            unanswerable += 1
            abstained += not answer.found
    ms = [x * 1000 for x in latencies]
    rows: Rows = {
        "questions": (f"{n:,}", ""),
        "query latency p50": (f"{_percentile(ms, 0.5):.2f}", "ms"),
        "query latency p99": (f"{_percentile(ms, 0.99):.2f}", "ms"),
        "query latency mean": (f"{statistics.fmean(ms):.2f}", "ms"),
        "answerable questions answered": (f"{found}/{answerable}", ""),
        "citation precision (generated)": (
            f"{cited_right / max(1, cited_total):.3f}",
            "cited sentences that state the asked fact",
        ),
        "citation recall (generated, <=3 per answer)": (
            f"{stating_cited / max(1, stating_total):.3f}",
            "",
        ),
        "unanswerable -> 'not found'": (f"{abstained}/{unanswerable}", ""),
    }
    return rows, answers


def bench_test_corpus(location: Path | str) -> tuple[Rows, Answers]:
    answers: Answers = []
    with StateStore.open(location) as state:
        memory = Memory(state)
        for document_id, (fmt, text) in DOCUMENTS.items():
            memory.add(text, format=fmt, document_id=document_id)
        cited_total = cited_right = needed = needed_cited = 0
        unsupported = abstained = exact = citations = 0
        stored = {
            d.id: memory.document(d.id, access=OPERATOR)[1]
            for d in memory.documents(access=OPERATOR)
        }
        for question, gold in QUESTIONS.items():
            answer = memory.ask(question, access=OPERATOR)
            cited = _cited(answer)
            answers.append((question, answer.found, frozenset(cited)))
            for citation in (*answer.citations, *(c for f in answer.facts for c in f.citations)):
                citations += 1
                exact += stored[citation.document_id][citation.start : citation.end] == (
                    citation.text
                )
            if gold:
                cited_total += len(cited)
                cited_right += len(cited & set(gold))
                needed += len(gold)
                needed_cited += len(cited & set(gold))
            else:
                unsupported += 1
                abstained += not answer.found
        problems = sum(memory.store.integrity_problems().values())
    rows: Rows = {
        "questions": (f"{len(QUESTIONS)}", ""),
        "citation precision": (f"{cited_right / max(1, cited_total):.3f}", ""),
        "citation recall": (f"{needed_cited / max(1, needed):.3f}", ""),
        "unsupported -> 'not found'": (f"{abstained}/{unsupported}", ""),
        "citations whose offsets slice exactly": (f"{exact}/{citations}", ""),
        "provenance violations in the store": (f"{problems}", ""),
    }
    return rows, answers


def _shorten(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _names_answer(answer: Answer, expected: tuple[str, ...], quoted: set[str]) -> bool:
    """Whether the answer names one of ``expected``: in its quoted text, or
    as the subject or object of a fact that cites a quoted sentence (so that
    "In 2022 it bought Lumeo Diagnostics" answers "Who bought Lumeo?" when
    the memory knows, and says, that "it" is Kestrel Pharma)."""
    # Whole words only: "60" is not named by "1960", nor "200" by "2009".
    wanted = [re.compile(rf"(?<!\w){re.escape(e)}(?!\w)", re.IGNORECASE) for e in expected]
    names = [answer.answer] + [
        name
        for fact in answer.facts
        if quoted.intersection(c.text for c in fact.citations)
        for name in (fact.subject, fact.object)
    ]
    return any(w.search(name) for w in wanted for name in names)


def _surfaced(answer: Answer, values: tuple[str, ...]) -> bool:
    """Whether one of the answer's conflicts holds at least two of ``values``."""
    for conflict in answer.conflicts:
        given = [v.lower() for v, _ in conflict.values]
        if sum(any(x.lower() in g or g in x.lower() for g in given) for x in values) >= 2:
            return True
    return False


def _share(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / whole:.0f}%)" if whole else "0/0"


def bench_qa(location: Path | str) -> tuple[Rows, Answers, list[str]]:
    """Part 4: the QA set of bench/memory_qa.py on a fresh store. Returns
    the rows, the answers (for the comparison between backends) and the
    miss list."""
    answers: Answers = []
    misses: list[str] = []
    with StateStore.open(location) as state:
        memory = Memory(state)
        for document_id, (fmt, text) in memory_qa.DOCUMENTS.items():
            memory.add(text, format=fmt, document_id=document_id)
        stored = {
            s.text
            for d in memory.documents(access=OPERATOR)
            for s in memory.document(d.id, access=OPERATOR)[2]
        }
        support = {s for qa in memory_qa.QUESTIONS for s in qa.support}
        for sentence in sorted(support - stored):
            misses.append(f"QA DATA: not a stored sentence: {sentence!r}")
        results = [(qa, memory.ask(qa.question, access=OPERATOR)) for qa in memory_qa.QUESTIONS]
    exact = dict.fromkeys(("plain", "pronoun", "description"), 0)
    asked = dict.fromkeys(("plain", "pronoun", "description"), 0)
    wrong = not_found = cited_total = cited_right = 0
    claims = dict.fromkeys(("trap", "unknown", "unstated"), 0)
    unanswerable = dict.fromkeys(("trap", "unknown", "unstated"), 0)
    conflicts = surfaced = 0
    for qa, answer in results:
        cited = _cited(answer)
        answers.append((qa.question, answer.found, frozenset(cited)))
        came = _shorten(answer.answer)
        if qa.answerable:
            assert qa.stated is not None
            asked[qa.stated] += 1
            gold = set(qa.support)
            if not answer.found:
                not_found += 1
                misses.append(
                    f"NOT FOUND ({qa.stated}): {qa.question!r} expected {' / '.join(qa.answers)}"
                    f" from {_shorten(qa.support[0], 90)!r}"
                )
            else:
                cited_total += len(cited)
                cited_right += len(cited & gold)
                if cited & gold and _names_answer(answer, qa.answers, cited):
                    exact[qa.stated] += 1
                    if cited - gold:
                        misses.append(
                            f"EXTRA CITATION ({qa.stated}): {qa.question!r} also quotes "
                            + "; ".join(repr(_shorten(t, 90)) for t in sorted(cited - gold))
                        )
                else:
                    wrong += 1
                    misses.append(
                        f"WRONG ({qa.stated}): {qa.question!r} expected {' / '.join(qa.answers)}"
                        f"; came back {came!r}"
                    )
            if qa.conflict:
                conflicts += 1
                if _surfaced(answer, qa.conflict):
                    surfaced += 1
                else:
                    given = "; ".join(
                        f"{c.about} {c.predicate}: {', '.join(v for v, _ in c.values)}"
                        for c in answer.conflicts
                    )
                    misses.append(
                        f"CONFLICT NOT SURFACED: {qa.question!r} sources say "
                        f"{' / '.join(qa.conflict)}; conflicts: {given or 'none'};"
                        f" came back {came!r}"
                    )
        else:
            assert qa.why is not None
            unanswerable[qa.why] += 1
            if answer.found:
                claims[qa.why] += 1
                misses.append(f"UNSUPPORTED ({qa.why}): {qa.question!r} came back {came!r}")
    answerable = sum(asked.values())
    indirect = asked["pronoun"] + asked["description"]
    rows: Rows = {
        "documents / questions": (
            f"{len(memory_qa.DOCUMENTS)} / {len(memory_qa.QUESTIONS)}",
            "",
        ),
        "answerable answered, exact citation": (
            _share(sum(exact.values()), answerable),
            "names the answer, quotes a sentence stating it",
        ),
        "  stated plainly": (_share(exact["plain"], asked["plain"]), ""),
        "  stated through a pronoun or description": (
            _share(exact["pronoun"] + exact["description"], indirect),
            "",
        ),
        "    pronoun": (_share(exact["pronoun"], asked["pronoun"]), ""),
        "    description": (_share(exact["description"], asked["description"]), ""),
        "answerable answered without exact citation": (f"{wrong}", "wrong or weaker source"),
        "answerable 'not found'": (f"{not_found}", ""),
        "citation precision (answerable, answered)": (
            f"{cited_right / max(1, cited_total):.3f}",
            f"{cited_right}/{cited_total} quoted sentences state the answer",
        ),
        "unsupported claims (unanswerable answered)": (
            f"{sum(claims.values())}/{sum(unanswerable.values())}",
            "should be 0",
        ),
        "  traps / unknown / unstated": (
            " / ".join(f"{claims[k]}/{unanswerable[k]}" for k in claims),
            "",
        ),
        "conflicts surfaced": (f"{surfaced}/{conflicts}", "both values in Answer.conflicts"),
        "supporting sentences stored as sentences": (
            f"{len(support & stored)}/{len(support)}",
            "QA data check",
        ),
    }
    # The acceptance targets, on this set.
    precision = cited_right / cited_total if cited_total else 0.0
    for label, met in (
        ("target: >= 90% answered, exact citation", sum(exact.values()) >= 0.9 * answerable),
        ("target: 0 unsupported claims", not sum(claims.values())),
        ("target: citation precision >= 0.95", precision >= 0.95),
    ):
        rows[label] = ("met" if met else "NOT met", "")
    return rows, answers, misses


@attrs.frozen
class BackendRun:
    ingest: Rows | None
    queries: Rows | None
    corpus: Rows | None
    qa: Rows
    qa_misses: list[str]
    answers: Answers


def run_backend(
    generated: Generated | None,
    companies: list[Company],
    args: argparse.Namespace,
    locations: tuple[Path | str, Path | str, Path | str],
) -> BackendRun:
    """The four parts on one backend (only the fourth without ``generated``):
    ``locations`` are three empty stores."""
    if generated is None:
        qa, qa_answers, qa_misses = bench_qa(locations[2])
        return BackendRun(None, None, None, qa, qa_misses, qa_answers)
    with StateStore.open(locations[0]) as state:
        memory = Memory(state)
        ingest = bench_ingest(memory, generated)
        queries, answers = bench_queries(memory, generated, companies, args.queries, args.seed)
        start = time.perf_counter()
        report = memory.delete(generated.documents[0][0], access=OPERATOR)
        queries["delete one document"] = (
            f"{(time.perf_counter() - start) * 1000:.1f}",
            f"ms ({report.sentences} sentences)",
        )
    corpus, corpus_answers = bench_test_corpus(locations[1])
    qa, qa_answers, qa_misses = bench_qa(locations[2])
    return BackendRun(ingest, queries, corpus, qa, qa_misses, answers + corpus_answers + qa_answers)


def _print_part(title: str, parts: list[Rows]) -> None:
    print(f"\n{title}")
    for label, (_, note) in parts[0].items():
        values = "".join(f"{rows[label][0]:>24}" for rows in parts)
        print(f"  {label:<44}{values}  {note}")


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--sentences-per-doc", type=int, default=55)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="20 documents, 100 questions")
    parser.add_argument(
        "--qa-only",
        action="store_true",
        help="only part 4, the QA set of bench/memory_qa.py (on SQLite unless --backends)",
    )
    parser.add_argument(
        "--backends",
        default=None,
        help="state stores to run on, side by side (PostgreSQL: a throwaway local cluster);"
        " default sqlite,postgresql, or sqlite with --qa-only",
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.quick:
        args.docs, args.queries = 20, 100
    if args.backends is None:
        args.backends = "sqlite" if args.qa_only else "sqlite,postgresql"
    backends = args.backends.split(",")
    if not set(backends) <= {"sqlite", "postgresql"}:
        parser.error("--backends takes sqlite and/or postgresql")
    generated: Generated | None = None
    companies: list[Company] = []
    if not args.qa_only:
        generated, companies = generate(args.docs, args.sentences_per_doc, args.seed)
    runs: dict[str, BackendRun] = {}
    with contextlib.ExitStack() as cleanup:
        tmp = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="qmesh-bench-memory-")))
        for backend in backends:
            locations: tuple[Path | str, Path | str, Path | str]
            if backend == "sqlite":
                locations = (tmp / "state.db", tmp / "corpus.db", tmp / "qa.db")
            else:
                locations = _postgres_databases(cleanup, tmp)
            print(f"running on {backend}...", file=sys.stderr)
            runs[backend] = run_backend(generated, companies, args, locations)
    print("graph memory benchmark, one thread: " + " against ".join(
        {"sqlite": "SQLite (WAL file)", "postgresql": "PostgreSQL (local, over TCP)"}[b]
        for b in backends
    ))  # fmt: skip
    print(f"  {'':<44}" + "".join(f"{b:>24}" for b in backends))
    done = list(runs.values())
    if not args.qa_only:
        _print_part("1. ingest, generated corpus", [r.ingest for r in done if r.ingest])
        _print_part(
            f"2. queries on that store ({args.queries} questions)",
            [r.queries for r in done if r.queries],
        )
        _print_part(
            "3. the test corpus (tests/memory_corpus.py)", [r.corpus for r in done if r.corpus]
        )
    _print_part("4. the QA set, asked as users ask (bench/memory_qa.py)", [r.qa for r in done])
    print(f"\nQA misses on {backends[0]} ({len(done[0].qa_misses)}):")
    for line in done[0].qa_misses:
        print(f"  {line}")
    if len(done) == 2:
        first, second = done[0].answers, done[1].answers
        same = sum(a == b for a, b in zip(first, second, strict=True))
        print(
            f"\nsame answers on both backends (found, and the sentences cited): {same}/{len(first)}"
        )
        for a, b in zip(first, second, strict=True):
            if a != b:
                print(f"  differs: {a[0]!r}: {backends[0]} found={a[1]} cites {sorted(a[2])};"
                      f" {backends[1]} found={b[1]} cites {sorted(b[2])}")  # fmt: skip
    return 0


def _postgres_databases(cleanup: contextlib.ExitStack, tmp: Path) -> tuple[str, str, str]:
    """Three empty databases on a throwaway PostgreSQL (scripts/pgcluster.py)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from pgcluster import PgCluster

    # Its own directory, open to the postgres user (the server runs as it under root).
    base = tmp / "pg"
    base.mkdir()
    os.chmod(tmp, 0o755)
    os.chmod(base, 0o755)
    cluster = cleanup.enter_context(PgCluster(base / "cluster"))
    cluster.psql("CREATE DATABASE bench_memory")
    cluster.psql("CREATE DATABASE bench_corpus")
    cluster.psql("CREATE DATABASE bench_qa")
    return (
        cluster.dsn_for("postgres", cluster.password, "bench_memory"),
        cluster.dsn_for("postgres", cluster.password, "bench_corpus"),
        cluster.dsn_for("postgres", cluster.password, "bench_qa"),
    )


if __name__ == "__main__":
    raise SystemExit(main())
