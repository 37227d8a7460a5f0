"""Exception families.

Two families, after h11: ``ProtocolError`` means the *peer* (guest driver or
vhost-user frontend) sent something malformed; the layer that catches it turns
it into an errno reply / NACK / disconnect and a log line, and keeps serving.
``FuseError`` is what a backend raises to answer a request with an errno.
Anything else escaping a backend is a bug in the backend: the session answers
EIO and logs the traceback.
"""
from __future__ import annotations

import errno as _errno
import os


class VirtioFsError(Exception):
    """Base class of every exception this library raises on purpose."""


class ProtocolError(VirtioFsError):
    """The peer sent malformed input. ``errno`` is the reply to give, if any."""

    errno: int = _errno.EINVAL

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class FuseProtocolError(ProtocolError):
    """A malformed FUSE request or reply (bad length, unknown opcode, bad name).

    ``unique`` is the request's id when its header could be read, so the
    session can still answer that request with ``errno``; None otherwise.
    """

    def __init__(self, message: str, errno: int | None = None, unique: int | None = None) -> None:
        super().__init__(message, errno)
        self.unique = unique


class VringError(ProtocolError):
    """A malformed descriptor chain or a guest address outside mapped memory.

    ``head`` is the chain's head index when the chain can still be returned
    to the used ring (with length 0), None otherwise."""

    errno = _errno.EFAULT
    head: int | None = None


class VhostUserProtocolError(ProtocolError):
    """A malformed or out-of-sequence vhost-user message."""


class FuseError(VirtioFsError):
    """Raised by a backend to answer the current request with ``errno``."""

    def __init__(self, errno: int, message: str | None = None) -> None:
        self.errno = errno
        super().__init__(message or os.strerror(errno))

    def __repr__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"FuseError({name})"
