"""Paths the user typed, resolved against the user's working directory.

Ray workers and tasks run in directories of their own: a relative path that reaches them
points somewhere else (results once landed in Ray's session folder). Every local path is
made absolute on the driver, before anything reaches Ray; ``s3://`` URIs are left as given.
"""

from __future__ import annotations

import os

from agp_data import storage


def absolute(path: str | None) -> str | None:
    """``path`` made absolute (``~`` expanded) when local; None and s3:// URIs unchanged."""
    if not path or storage.is_s3(path):
        return path
    return os.path.abspath(os.path.expanduser(path))
