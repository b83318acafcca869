"""Errors that are the user's to fix: printed as one line, exit code 2, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the command line, config or environment; the message names the fix."""


def user_error_types() -> tuple[type[BaseException], ...]:
    from agp_data.errors import DataError

    types: list[type[BaseException]] = [UserError, DataError]
    try:
        from agp_models.backbones import BackboneError

        types.append(BackboneError)
    except ImportError:  # backbones not importable yet: nothing of theirs to catch
        pass
    return tuple(types)
