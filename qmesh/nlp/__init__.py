"""The Gate's internal NLP: extractive summaries, keywords, classification,
PII redaction and hashing embeddings, in pure Python, fast enough to answer
thousands of requests per second on one core (``bench/nlp.py``).

:mod:`qmesh.nlp.skills` wraps them as routable skills with measured capacity.
"""
