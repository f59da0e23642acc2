"""Attributable graph memory: a knowledge graph in which every entity and
every relation is linked to the exact sentences that support it, and answers
that quote and cite those sentences or say "not found".

Modules, each with one job: :mod:`~qmesh.memory.convert` (Markdown/HTML to
text), :mod:`~qmesh.memory.sentences` (sentence spans and ids),
:mod:`~qmesh.memory.terms` (words, stems, entity keys),
:mod:`~qmesh.memory.extraction` (what an extractor returns, and its check),
:mod:`~qmesh.memory.mentions`, :mod:`~qmesh.memory.masked`,
:mod:`~qmesh.memory.extract` and :mod:`~qmesh.memory.idioms` (the rules:
mentions, then relations, per sentence), :mod:`~qmesh.memory.coref` (what
"it", "the firm" and "she" stand for, per document),
:mod:`~qmesh.memory.records`,
:mod:`~qmesh.memory.reader` and :mod:`~qmesh.memory.store` (SQLite reads and
writes; the tables are in :mod:`qmesh.state.memory_tables`),
:mod:`~qmesh.memory.question` (what a question asks),
:mod:`~qmesh.memory.support` (which sentences answer it, in the asked role),
:mod:`~qmesh.memory.query` (questions to cited facts and answers),
:mod:`~qmesh.memory.verify` (checking an LLM-composed answer's citations),
:mod:`~qmesh.memory.service` (the facade the API and CLI use),
:mod:`~qmesh.memory.api` and :mod:`~qmesh.memory.cli`.
"""
