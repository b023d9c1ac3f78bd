"""User-facing error types.

Every mistake a user can make has one exception type here. Code below the edge raises them with a
message that names the problem and the fix; the edges (CLI, Triton models) turn them into one line
or a Triton 400. Nothing below the edge prints or exits.
"""


class UserError(Exception):
    """Base class: a problem the user can fix. The message says what and how."""


class SourceError(UserError):
    """The model source is missing, incomplete or unreadable."""


class UnsupportedModelError(UserError):
    """The checkpoint's architecture or format is not one we can build."""


class UnsafeCheckpointError(UserError):
    """The checkpoint would need pickle loading or remote code, which we never do."""


class InvalidArgumentError(UserError):
    """A command-line or deployment-file value is out of range or malformed."""


class BuildError(UserError):
    """An engine could not be built, or failed its accuracy floor."""


class ServeError(UserError):
    """The server could not be started or did not become ready."""


class StorageError(UserError):
    """Object storage could not be read or written, or its content failed verification."""


class ProxyError(UserError):
    """The nginx front could not be configured, validated or reloaded."""


class RequestError(UserError):
    """An inference request is invalid (turned into a Triton 400 by the backends)."""
