"""Errors that are the user's to fix: printed as one line, exit code 2, no traceback."""

from __future__ import annotations

import sys


class UserError(Exception):
    """A mistake in the command line, config or environment; the message names the fix."""


def user_error_from_remote(exc: BaseException) -> UserError | None:
    """The user's mistake inside an exception Ray re-raised from a worker or task, if any.

    Ray wraps remote exceptions in its own types with the remote traceback in the text, so
    the original type is recognised by its name there and its message taken as the line."""
    text = str(exc)
    for marker in ("DataError:", "UserError:", "BackboneError:"):
        if marker in text:
            return UserError(text.split(marker, 1)[1].strip().splitlines()[0])
    return None


def user_error_types() -> tuple[type[BaseException], ...]:
    from agp_data.errors import DataError

    types: list[type[BaseException]] = [UserError, DataError]
    backbones = sys.modules.get("agp_models.backbones")
    if backbones is not None:  # never imported: none of its errors can be in flight
        types.append(backbones.BackboneError)
    return tuple(types)
