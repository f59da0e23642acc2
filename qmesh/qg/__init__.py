"""qg:// capability routing: the DSN, the candidates, the router and its
decisions. Applications say what they need; this package decides who does it.

The HTTP surface lives in :mod:`qmesh.llm.api`; execution with failover
in :mod:`qmesh.llm.executor`; the books in :mod:`qmesh.finops`.
"""
