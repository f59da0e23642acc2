"""The Gate's internal NLP: throughput on one core, and summary quality
against sumy's TextRank and LexRank on the same texts.

Usage: .venv/bin/python bench/nlp.py [--seconds 1.0] [--runs 5] [--cpu 0]

Needs ``sumy`` (``pip install sumy``). sumy's default tokenizer needs
NLTK's ``punkt`` data, which is a download this machine cannot make, so
sumy gets a tokenizer that works offline: the same sentence splitter the
Gate uses (so both sides choose among the very same sentences, and overlap
measures the *choice*, not the segmentation) and a simple word regex.
Stemming is NLTK's Snowball stemmer, which needs no data.

Throughput is summaries per second on one core (the process pins itself to
``--cpu``), median of ``--runs`` runs of ``--seconds`` each, over the ~1 KB
English texts in bench/nlp_texts.py. Quality is the mean share of the
3 chosen sentences that qmesh and sumy's algorithm have in common; the
TextRank-vs-LexRank line shows how much two standard algorithms agree with
each other, for scale. Target: ≥ 3,600 summaries/s. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nlp_texts import TEXTS

from qmesh.nlp.classify import classify
from qmesh.nlp.embed import embed
from qmesh.nlp.keywords import keywords
from qmesh.nlp.redact import redact
from qmesh.nlp.summarize import summarize, summary_sentences
from qmesh.nlp.text import sentence_spans

COUNT = 3
_WORDS = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


class OfflineTokenizer:
    """What sumy's parsers need from a tokenizer, without NLTK data."""

    language = "english"

    def to_sentences(self, paragraph: str) -> tuple[str, ...]:
        return tuple(paragraph[a:b] for a, b in sentence_spans(paragraph))

    def to_words(self, sentence: str) -> tuple[str, ...]:
        return tuple(_WORDS.findall(sentence))


def rate(fn: Callable[[str], object], seconds: float, runs: int) -> float:
    results = []
    for _ in range(runs):
        done = 0
        start = time.process_time()
        deadline = start + seconds
        now = start
        while now < deadline:
            for text in TEXTS:
                fn(text)
            done += len(TEXTS)
            now = time.process_time()
        results.append(done / (now - start))
    return statistics.median(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cpu", type=int, default=0)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})

    from sumy.nlp.stemmers import Stemmer
    from sumy.parsers.plaintext import PlaintextParser
    from sumy.summarizers.lex_rank import LexRankSummarizer
    from sumy.summarizers.text_rank import TextRankSummarizer
    from sumy.utils import get_stop_words

    tokenizer = OfflineTokenizer()
    stemmer = Stemmer("english")
    stop_words = get_stop_words("english")
    textrank = TextRankSummarizer(stemmer)
    textrank.stop_words = stop_words
    lexrank = LexRankSummarizer(stemmer)
    lexrank.stop_words = stop_words

    def sumy_choice(summarizer: Callable[..., Iterable[object]], text: str) -> set[int]:
        document = PlaintextParser.from_string(text, tokenizer).document
        sentences = [str(s) for s in document.sentences]
        chosen = summarizer(document, COUNT)
        return {sentences.index(str(s)) for s in chosen}

    sizes = [len(t.encode()) for t in TEXTS]
    print(
        f"corpus: {len(TEXTS)} English texts, {min(sizes)}-{max(sizes)} bytes "
        f"(mean {statistics.mean(sizes):.0f}); one core (cpu {args.cpu}); "
        f"median of {args.runs} × {args.seconds:g} s CPU time"
    )
    print()
    print(f"{'skill':<34} {'per second':>12}")
    ours = rate(lambda t: summarize(t, COUNT), args.seconds, args.runs)
    verdict = "met" if ours >= 3600 else "NOT met"
    print(f"{'qmesh summarize (3 sentences)':<34} {ours:>12,.0f}   target ≥ 3,600: {verdict}")
    for name, fn in (
        ("qmesh keywords", keywords),
        ("qmesh classify", classify),
        ("qmesh redact", redact),
        ("qmesh embed (256-d)", embed),
    ):
        print(f"{name:<34} {rate(fn, args.seconds / 2, 3):>12,.0f}")
    short = max(0.3, args.seconds / 3)
    for name, summarizer in (("sumy TextRank", textrank), ("sumy LexRank", lexrank)):
        speed = rate(lambda t, s=summarizer: sumy_choice(s, t), short, 1)  # type: ignore[misc]
        print(f"{name + ' (3 sentences)':<34} {speed:>12,.0f}")

    print()
    overlap_tr, overlap_lr, overlap_ref = [], [], []
    for text in TEXTS:
        mine = set(summary_sentences(text, COUNT))
        tr = sumy_choice(textrank, text)
        lr = sumy_choice(lexrank, text)
        overlap_tr.append(len(mine & tr) / COUNT)
        overlap_lr.append(len(mine & lr) / COUNT)
        overlap_ref.append(len(tr & lr) / COUNT)
    print("quality: share of the 3 chosen sentences in common (mean over the corpus)")
    print(f"  qmesh vs sumy TextRank   {statistics.mean(overlap_tr):.2f}")
    print(f"  qmesh vs sumy LexRank    {statistics.mean(overlap_lr):.2f}")
    print(f"  TextRank vs LexRank      {statistics.mean(overlap_ref):.2f}   (reference)")


if __name__ == "__main__":
    main()
