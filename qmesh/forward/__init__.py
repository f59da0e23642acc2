"""Generic TCP forwarding through the tunnel, for services qmesh does not
speak natively: :mod:`~qmesh.forward.edge` (a MiniGate's local listener per
``[[minigate.forward]]`` entry) and :mod:`~qmesh.forward.service` (the Gate's
``forward`` service, which connects only where its allow rules say).
"""
