"""Typed errors of raid1fs.

Inside the engine every failure is one of these classes; the CLI turns them
into one line on stderr and the contract's exit status, and the FUSE layer
into an errno. The message always names the member or path at fault.
"""

from __future__ import annotations

import errno as _errno


class Raid1fsError(Exception):
    """Base class: a failure with a one-line, user-facing message."""

    exit_code = 1
    errno = _errno.EIO

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(Raid1fsError):
    """The command line is wrong (exit status 2, like argparse)."""

    exit_code = 2
    errno = _errno.EINVAL


class BadMemberError(Raid1fsError):
    """A member path cannot be used as asked (guarantee 9)."""

    errno = _errno.EINVAL


class MetadataError(Raid1fsError):
    """A member's metadata is missing or corrupt."""

    errno = _errno.EIO


class AssemblyError(Raid1fsError):
    """The members given do not make a volume that can be mounted."""


class SplitBrainError(AssemblyError):
    """Members were changed apart from each other."""


class ControlError(Raid1fsError):
    """The control channel of a mount could not be used."""


class NotPermittedError(Raid1fsError):
    """The caller may not do this (guarantee 10)."""

    errno = _errno.EPERM


class VolumeIOError(Raid1fsError):
    """No member could serve an operation."""

    errno = _errno.EIO


class MemberIOError(Exception):
    """One member failed one operation. Handled inside the engine."""

    def __init__(self, member: str, op: str, cause: BaseException | str) -> None:
        text = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        super().__init__(f"{member}: {op} failed: {text}")
        self.reason = f"{op} failed: {text}"  # without the path, for status
        self.member = member
        self.op = op
        self.cause = cause
        self.errno = cause.errno if isinstance(cause, OSError) and cause.errno else _errno.EIO


class MemberTimeoutError(MemberIOError):
    """One member did not finish an operation within the I/O timeout."""
