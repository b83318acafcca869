"""User-facing data errors: agpctl prints them as one line and exits with code 2."""


class DataError(Exception):
    """Something about the user's data or storage is wrong; the message names it and the fix."""
