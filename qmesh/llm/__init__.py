"""LLM requests through the mesh, from an application's port to a model.

The path of one chat completion, module by module:

- :mod:`~qmesh.llm.edge` — the MiniGate's OpenAI-compatible port
  (``127.0.0.1:11435``): each connection becomes an ``llm`` tunnel stream;
- :mod:`~qmesh.llm.relay` — the Gate's ``llm`` service: serves HTTP on that
  stream with the app-facing routes only;
- :mod:`~qmesh.llm.api` — ``/v1/chat/completions``, ``/v1/models`` and the
  ``/qg/v1/*`` API: the app's key, the ``qg://`` DSN or model name;
- :mod:`~qmesh.llm.service` — the Gate's capability service: candidates
  from skills, providers and daemons; the router (:mod:`qmesh.qg`), budgets
  and the ledger (:mod:`qmesh.finops`);
- :mod:`~qmesh.llm.executor` — runs the routed call, failing over between
  candidates, settling the budget and writing the ledger;
- workers: :mod:`~qmesh.llm.backends` (the built-in skills),
  :mod:`~qmesh.llm.providers` (remote OpenAI-compatible and Anthropic-style
  endpoints, with keys from :mod:`~qmesh.llm.provider_keys`) and
  :mod:`~qmesh.llm.daemon_backend` (a model on a compute node, through
  :mod:`qmesh.fleet.daemons`).

:mod:`~qmesh.llm.calls` holds the call and answer types they share;
:mod:`~qmesh.llm.cli` the ``qmesh route`` and ``qmesh providers`` commands.
"""
