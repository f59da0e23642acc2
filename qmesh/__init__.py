"""qmesh — a federated AI service mesh.

Roles: the Gate (the brain), MiniGate (the edge sidecar) and Daemons (compute
nodes), all in this one package and one ``qmesh`` executable.
"""

__version__ = "0.1.0"
