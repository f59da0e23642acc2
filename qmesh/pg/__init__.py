"""PostgreSQL through the mesh: the ghost wire and what governs it.

The path of one query, module by module:

- :mod:`~qmesh.pg.edge` — the MiniGate's Postgres listener
  (``127.0.0.1:11438``): answers SSLRequest, reads the StartupMessage and
  opens a ``pg`` tunnel stream with it;
- :mod:`~qmesh.pg.service` — the Gate's ``pg`` and ``pg-cancel`` services:
  the app's SCRAM login (:mod:`~qmesh.pg.scram`), its policy
  (:mod:`~qmesh.pg.policy`), the real credentials (:mod:`~qmesh.pg.vault`,
  sealed with :mod:`~qmesh.masterkey`), live-session control;
- :mod:`~qmesh.pg.login` — the Gate's login to the real server (TLS as the
  alias's sslmode says, :mod:`~qmesh.pg.server_tls`; SCRAM/MD5);
- :mod:`~qmesh.pg.relay` — both directions after login, in the tunnel
  engine where it can: the statement guard (:mod:`~qmesh.pg.guard`) and the
  statement audit (:mod:`~qmesh.pg.audit`).

Also: :mod:`~qmesh.pg.dsn` (the DSNs operators store),
:mod:`~qmesh.pg.rotate` (password rotation on the real server),
:mod:`~qmesh.pg.cli` (``qmesh secrets``, ``qmesh audit``) and
:mod:`~qmesh.pg.errors`. Message parsing is the Rust core's
(``rust/qmesh-pg``, as ``qmesh._core``).
"""
