"""The graph memory's exceptions, split by who is at fault.

For: telling the API and the CLI what to answer (400, 404, 409, 413) without
them knowing the memory's internals. Not for: database failures, which stay
:class:`qmesh.state.StateError` (the store is shared with the rest of the Gate).
"""

from __future__ import annotations

__all__ = [
    "DocumentConflict",
    "DocumentNotFound",
    "DocumentTooLarge",
    "GraphMemoryError",
    "InvalidDocument",
    "InvalidQuestion",
    "NotDocumentOwner",
    "ProvenanceError",
]


class GraphMemoryError(Exception):
    """Base class: the graph memory cannot do what was asked."""


class InvalidDocument(GraphMemoryError, ValueError):
    """The caller's document is unusable: empty text, an unknown format, a bad
    id or title, or text with no sentence in it."""


class DocumentTooLarge(InvalidDocument):
    """The document's text is over the size limit."""


class InvalidQuestion(GraphMemoryError, ValueError):
    """The caller's question is empty, too long, or asks for a bad limit."""


class DocumentNotFound(GraphMemoryError, LookupError):
    """No document has this id."""


class DocumentConflict(GraphMemoryError):
    """A different document already has this id (and replacing was not asked for)."""


class NotDocumentOwner(GraphMemoryError, PermissionError):
    """Only the application that added a document (or the operator) may delete it."""


class ProvenanceError(GraphMemoryError):
    """An extractor produced a fact that no stored sentence supports: a span
    that does not slice its sentence, or a relation between mentions that are
    not in the sentence. This is a bug in the extractor, never the caller's
    input; nothing of the document is stored."""
