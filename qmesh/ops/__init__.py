"""Operating a Gate: metrics, the dashboard, live tunnel sessions.

- :mod:`~qmesh.ops.metrics` — counters, histograms and the dashboard's history;
- :mod:`~qmesh.ops.overview` — the dashboard's snapshot of the whole mesh;
- :mod:`~qmesh.ops.api` — ``/``, ``/api/dashboard[/stream]``, ``/metrics``,
  ``/api/discovery``;
- :mod:`~qmesh.ops.sessions` and :mod:`~qmesh.ops.cli` — ``/healthz``,
  ``/api/sessions[/kill]`` and ``qmesh sessions [kill]``.
"""
