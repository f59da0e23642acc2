"""The daemon's exception family: why a request on this node did not run.

Each class carries the ``code`` that the ``infer`` service writes in its
``error`` line (:data:`qmesh.daemon.wire.ERROR_CODES`), so the Gate can
tell "send it elsewhere" (``busy``) from "nobody can run this"
(``bad_request``) without parsing messages. Split by who is at fault:

- the caller: :class:`BadRequest`, :class:`UnknownModel`;
- the operator: :class:`ModelStopped`;
- this node's capacity: :class:`Busy`;
- the model or its runtime: :class:`LoadFailed`, :class:`RuntimeFailed`.

Runtime adapters raise these too (translating their HTTP and process errors
at the boundary), so the scheduler and the service see nothing else.
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "Busy",
    "DaemonError",
    "LoadFailed",
    "ModelStopped",
    "RuntimeFailed",
    "UnknownModel",
]


class DaemonError(Exception):
    """Base class; ``code`` is the wire error code."""

    code = "runtime_failed"


class BadRequest(DaemonError):
    """The request is malformed (no prompt, bad types, unknown endpoint)."""

    code = "bad_request"


class UnknownModel(DaemonError):
    """No runtime on this node has a model by that name."""

    code = "unknown_model"


class ModelStopped(DaemonError):
    """An operator stopped the model on this node (``qmesh models stop``)."""

    code = "stopped"


class Busy(DaemonError):
    """The model's queue is full (``daemon.queue_limit`` requests already wait)."""

    code = "busy"


class LoadFailed(DaemonError):
    """The model could not be loaded: larger than the memory budget, a bad
    file, or the model server did not become ready."""

    code = "load_failed"


class RuntimeFailed(DaemonError):
    """The runtime failed: unreachable, crashed, or broke off mid-generation."""

    code = "runtime_failed"
