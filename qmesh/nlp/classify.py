"""Classification by lexicon: language, sentiment and topic.

For: ``task=classify`` answered by the Gate in microseconds. Language from
the share of each language's commonest function words; sentiment from a
small polarity lexicon with negation (``not good`` counts as negative) and
intensifiers; topic from keyword lists per topic. Each result carries a
confidence in [0, 1] so a caller can fall back to a model when it is low.

Not for: nuanced or sarcastic sentiment, languages outside the list, or
topics outside the list (those answer ``general`` with low confidence).
"""

from __future__ import annotations

from typing import Final

import attrs

from qmesh.nlp.text import WORD_RE

__all__ = ["Classification", "classify"]

_LANGUAGES: Final = {
    "en": "the and of to in is that it for was on are with as be this have from by not",
    "fr": "le la les de des et est un une que qui dans pour pas sur au avec il elle ce",
    "de": "der die das und ist nicht ein eine zu den von mit sich des auf für im dem auch",
    "es": "el la los las de que y en un una es por con para no se del al lo como",
    "it": "il la di che e un una per non sono del della con si le gli da in è anche",
    "pt": "o a os as de que e do da em um uma para com não é se no na por mais",
    "nl": "de het een en van is dat op te in niet zijn met voor die er maar ook als",
}
_LANGUAGE_WORDS: Final = {
    word: lang for lang, text in reversed(list(_LANGUAGES.items())) for word in text.split()
}
# Words shared by several languages count for each of them.
_LANGUAGE_SETS: Final = {lang: frozenset(text.split()) for lang, text in _LANGUAGES.items()}

_POSITIVE: Final = frozenset(
    """good great excellent amazing wonderful fantastic love loved loves like liked enjoy
    enjoyed happy glad pleased delighted best better perfect nice awesome brilliant superb
    outstanding positive success successful win won winning welcome welcomed recommend
    helpful impressive beautiful fast easy reliable improved improve improves strong
    benefit benefits gain gains growth record celebrate thanks thank fun favourite favorite
    satisfied smooth safe clean friendly effective efficient""".split()
)
_NEGATIVE: Final = frozenset(
    """bad terrible awful horrible hate hated hates dislike poor worst worse disappointing
    disappointed sad angry annoyed annoying broken fail failed fails failure problem
    problems issue issues bug bugs crash crashed slow difficult hard negative loss losses
    lost lose risk risks danger dangerous wrong error errors useless expensive ugly dirty
    rude complaint complain complained refund delay delayed cancel cancelled vulnerable
    attack attacks flaw decline declined fell fall cut cuts""".split()
)
_NEGATIONS: Final = frozenset(
    "not no never none nobody nothing neither nor cannot can't don't doesn't didn't "
    "isn't wasn't aren't weren't won't wouldn't shouldn't hardly barely".split()
)
_INTENSIFIERS: Final = frozenset("very really extremely so too absolutely totally".split())

_TOPICS: Final = {
    "technology": """software hardware computer computers app apps update security flaw
        data cloud server servers internet online digital code program programming network
        chip chips device devices ai model models robot robots algorithm users user""",
    "finance": """revenue profit profits income margin market markets stock stocks shares
        share investors investment bank banks interest rate rates inflation dollars euro
        quarter earnings budget tax taxes price prices economy economic buyback cash""",
    "health": """health disease diseases doctor doctors hospital patients patient risk heart
        blood medical medicine treatment study exercise walking diet symptoms vaccine
        cancer therapy mental sleep""",
    "sports": """team teams match game games player players goal goals championship
        tournament coach league season win won final score trophy fans penalty club""",
    "politics": """government minister election elections vote voted council mayor policy
        parliament president party law laws senate campaign federal grant officials""",
    "science": """scientists researchers research experiment experiments planet planets star
        stars telescope astronomers molecules physics chemistry biology species evolution
        discovery atmosphere neurons brain""",
    "travel": """travel trip route routes path cycling walking railway station hotel
        visitors tourists flight flights airport bus train valley town towns city""",
    "food": """bread flour water salt yeast recipe cook cooking bake baking oven dough
        meal meals dish kitchen taste sugar ingredients""",
    "culture": """museum art artist artists exhibition history masks community music film
        book books theatre culture cultural heritage collection""",
}
_TOPIC_WORDS: Final = {word: topic for topic, text in _TOPICS.items() for word in text.split()}


@attrs.frozen
class Classification:
    language: str
    language_confidence: float
    sentiment: str
    """``positive``, ``negative`` or ``neutral``."""
    sentiment_score: float
    """In [-1, 1]."""
    topic: str
    topic_confidence: float

    def as_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


def classify(text: str) -> Classification:
    tokens = WORD_RE.findall(text.lower())
    language, language_confidence = _language(tokens)
    score = _sentiment(tokens)
    sentiment = "positive" if score > 0.1 else "negative" if score < -0.1 else "neutral"
    topic, topic_confidence = _topic(tokens)
    return Classification(
        language=language,
        language_confidence=round(language_confidence, 3),
        sentiment=sentiment,
        sentiment_score=round(score, 3),
        topic=topic,
        topic_confidence=round(topic_confidence, 3),
    )


def _language(tokens: list[str]) -> tuple[str, float]:
    counts = dict.fromkeys(_LANGUAGE_SETS, 0)
    for token in tokens:
        if token in _LANGUAGE_WORDS:
            for lang, words in _LANGUAGE_SETS.items():
                if token in words:
                    counts[lang] += 1
    best = max(counts, key=counts.__getitem__)
    hits = counts[best]
    if hits == 0:
        return "unknown", 0.0
    second = max(v for k, v in counts.items() if k != best)
    coverage = min(1.0, hits / max(1.0, 0.25 * len(tokens)))
    margin = (hits - second) / hits
    return best, coverage * (0.5 + 0.5 * margin)


def _sentiment(tokens: list[str]) -> float:
    total = 0.0
    hits = 0
    negate_until = -1
    boost = 1.0
    for i, token in enumerate(tokens):
        if token in _NEGATIONS:
            negate_until = i + 3
            continue
        if token in _INTENSIFIERS:
            boost = 1.5
            continue
        polarity = 1.0 if token in _POSITIVE else -1.0 if token in _NEGATIVE else 0.0
        if polarity:
            if i <= negate_until:
                polarity = -polarity
            total += polarity * boost
            hits += 1
        boost = 1.0
    if not hits:
        return 0.0
    return max(-1.0, min(1.0, total / (hits + 1)))


def _topic(tokens: list[str]) -> tuple[str, float]:
    counts: dict[str, int] = {}
    hits = 0
    for token in tokens:
        topic = _TOPIC_WORDS.get(token)
        if topic is not None:
            counts[topic] = counts.get(topic, 0) + 1
            hits += 1
    if not counts:
        return "general", 0.0
    best = max(counts, key=counts.__getitem__)
    return best, counts[best] / hits * min(1.0, hits / 5)
