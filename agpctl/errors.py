"""Errors that are the user's to fix: printed as one line, exit code 2, no traceback."""

from __future__ import annotations

import sys

from agp_data.errors import DataError


class UserError(Exception):
    """A mistake in the command line, config or environment; the message names the fix."""


class Interrupted(Exception):
    """The user stopped a command (Ctrl-C, SIGTERM); what it had written is kept. The message
    says what is left and how to continue; the exit status is 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its class name when it has none)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else exc.__class__.__name__


def user_error_from_remote(exc: BaseException) -> UserError | None:
    """The user's mistake inside an exception Ray re-raised from a worker or task, if any.

    Ray wraps remote exceptions in its own types with the remote traceback in the text, so
    the original type is recognised by its name there and its message taken as the line."""
    text = str(exc)
    for marker in ("DataError:", "UserError:", "BackboneError:"):
        if marker in text:
            return UserError(text.split(marker, 1)[1].strip().splitlines()[0])
    return None


def remote_error(exc: BaseException) -> BaseException:
    """What to raise on the driver for an exception from Ray: the user's mistake as a
    :class:`UserError`, anything else as it came."""
    return user_error_from_remote(exc) or exc


def remote_error_line(exc: BaseException) -> str:
    """One line for an exception from Ray: the user's mistake, else the last line of the
    remote traceback (where Ray puts the exception itself)."""
    known = user_error_from_remote(exc)
    if known is not None:
        return str(known)
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else exc.__class__.__name__


def user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [UserError, DataError]
    backbones = sys.modules.get("agp_models.backbones")
    if backbones is not None:  # never imported: none of its errors can be in flight
        types.append(backbones.BackboneError)
    return tuple(types)
