"""FinOps: what each routed request cost, budgets that bound it, and the
hash-chained ledger and audit trail that record it.

- :mod:`qmesh.state.finops_tables`: the tables (one state-store migration).
- :mod:`qmesh.finops.chain`: HMAC hash chains and their verification.
- :mod:`qmesh.finops.ledger`: the request ledger, written in batches.
- :mod:`qmesh.finops.budgets`: reservation at admission, settlement after.
- :mod:`qmesh.finops.report`: spend by app/model/provider, burn-down.
- :mod:`qmesh.finops.cli`: ``qmesh finops …``, ``qmesh ledger verify``.
"""
