"""qg:// capability routing: the DSN, the candidates, admission (one verdict
per candidate, for deciding, explaining and executing alike), the router
and its decisions. Applications say what they need; this package decides who does it.

The HTTP surface lives in :mod:`qmesh.llm.api`; execution with failover
in :mod:`qmesh.llm.executor`; the books in :mod:`qmesh.finops`.
"""
