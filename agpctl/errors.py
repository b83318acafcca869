"""Errors that are the user's to fix: printed as one line, exit code 2, no traceback."""

from __future__ import annotations

import sys


class UserError(Exception):
    """A mistake in the command line, config or environment; the message names the fix."""


def user_error_types() -> tuple[type[BaseException], ...]:
    from agp_data.errors import DataError

    types: list[type[BaseException]] = [UserError, DataError]
    backbones = sys.modules.get("agp_models.backbones")
    if backbones is not None:  # never imported: none of its errors can be in flight
        types.append(backbones.BackboneError)
    return tuple(types)
