"""The Gate's side of the ghost wire that is not the wire itself.

For: the vault of real database credentials (:mod:`qmesh.pg.vault`,
encrypted at rest with the operator's master key, :mod:`qmesh.pg.masterkey`),
parsing the DSNs an operator stores there (:mod:`qmesh.pg.dsn`), per-app
policy read from the configuration (:mod:`qmesh.pg.policy`), the statement
audit log (:mod:`qmesh.pg.audit`) and password rotation on the real server
(:mod:`qmesh.pg.rotate`). Errors: :mod:`qmesh.pg.errors`.

Not for: the Postgres wire protocol, the MiniGate's listener or the Gate's
relay (``qmesh.pg.service``, ``qmesh.pg.edge`` and the Rust parser build on
this package and are not part of it).
"""
