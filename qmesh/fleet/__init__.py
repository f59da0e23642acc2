"""The fleet: every compute node and service the Gate knows, and how it knows.

- :mod:`~qmesh.fleet.inventory` — nodes, their models and telemetry, and
  whether each is fresh, stale or gone (sans-IO);
- :mod:`~qmesh.fleet.daemons` — the daemons' ``inventory`` streams in, and
  :class:`~qmesh.fleet.daemons.DaemonClient` (inference on a named node) out;
- :mod:`~qmesh.fleet.probes` and :mod:`~qmesh.fleet.discovery` — what to send
  to an address and what the answers say (sans-IO), and the scanner that
  probes the configured targets;
- :mod:`~qmesh.fleet.api` and :mod:`~qmesh.fleet.cli` — ``/api/inventory``,
  ``/api/daemons/…`` and ``qmesh inventory``.

The daemon's own side is :mod:`qmesh.daemon`; choosing a node for a
request is the router's (:mod:`qmesh.llm`).
"""
