"""The error hierarchy every layer of residue-monitor raises (STYLE.md rule 10).

It lives in ``detectors`` because that package is the pure root everything else may import;
``service/server`` maps these classes to gRPC status codes in one interceptor.
"""

from __future__ import annotations


class ResidueError(Exception):
    """Base class: every error residue-monitor raises on purpose derives from it."""


class InvalidInput(ResidueError):
    """The caller gave something malformed; the message says what was expected."""


class NotFound(ResidueError):
    """An id (request, fingerprint, CLT) that nothing is stored under."""


class StoreUnavailable(ResidueError):
    """The backing store cannot be reached right now; retrying later may succeed."""


class ModelUnavailable(ResidueError):
    """A model or data package that a command needs is not installed or cannot be built."""


class CLTFormatError(ResidueError):
    """A transcoder file or folder does not match the format it claims (names the file)."""


class ArtifactMismatch(ResidueError):
    """An artifact (fingerprint, forecast) was made for a different model or CLT id."""
